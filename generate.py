"""Chat with Mistral Small 3.x from the command line, and dump logits for comparing runtimes.

    python generate.py "Why is the sky blue?"
    python generate.py --image photo.png "What should I do here?"
    python generate.py --messages chat.json --tools tools.json
    python generate.py --dump out.safetensors "Hello"      # then: python generate.py compare a.safetensors b.safetensors

The loop: encode the conversation (chat.py), prefill the prompt once, then sample one token per step
through the KV cache until </s> or the token limit, streaming the text as it comes.
"""
import argparse
import codecs
import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from safetensors.torch import load_file, save_file

from chat import encode_chat, load_system_prompt, parse_output
from model import checkpoint_files, load_model
from tokenizer import Tokenizer

DEFAULT_MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
# What a run needs from the official repository: the native weights (not the second, Hugging Face
# layout copy of the same weights), the tokenizer and the system prompt.
HUB_FILES = ["params.json", "consolidated*.safetensors", "tekken.json", "SYSTEM_PROMPT.txt"]


@dataclass
class Sampling:
    """Sampling settings; the defaults per model come from the model cards."""
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None


MODEL_CARD_DEFAULTS = {
    "magistral": Sampling(temperature=0.7, top_p=0.95, max_tokens=40960),
    # The card gives no limit; the KV cache is sized to prompt + max_tokens and every decoding step reads
    # all of it, so a bounded default keeps the 24 B model's cache small (4096 positions: 0.7 GB in bf16).
    "mistral-small": Sampling(temperature=0.15, top_p=1.0, max_tokens=4096),
}


def card_defaults(model_name: str) -> Sampling:
    name = model_name.lower()
    key = "magistral" if "magistral" in name else "mistral-small"
    return Sampling(**vars(MODEL_CARD_DEFAULTS[key]))


# ----------------------------------------------------------------------------- sampling

def filter_probs(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """probs [B, V] -> probs with all but the top_k most likely tokens zeroed, then all but the
    smallest set (of those, renormalized) whose mass reaches top_p. Not renormalized at the end:
    torch.multinomial does not need it."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_p[..., top_k:] = 0.0
    if top_p < 1.0:
        renorm = sorted_p / sorted_p.sum(-1, keepdim=True)
        mass_before = renorm.cumsum(-1) - renorm
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)   # the most likely token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]. Temperature 0 is greedy."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / s.temperature, dim=-1)
    return torch.multinomial(filter_probs(probs, s.top_p, s.top_k), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the loop

@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class Recorder:
    """Collects what --dump writes: logits of every position, optionally each block's hidden state."""

    def __init__(self, hidden: bool):
        self.logits, self.hidden = [], [] if hidden else None

    def add(self, logits: torch.Tensor, hidden: list | None):
        self.logits.append(logits[0].float().cpu())                                # [S, V]
        if self.hidden is not None:
            self.hidden.append([h[0].float().cpu() for h in hidden])                 # n_layers x [S, D]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step(model, token: torch.Tensor, pos: torch.Tensor, hidden: list | None = None,
                length: int | None = None) -> torch.Tensor:
    """One generated token [B, 1] at position pos [1] -> float32 logits [B, 1, V]. The token is embedded
    as it is, unchecked (the image check of model.embed reads the tokens on the host), so the step never
    waits for the host. length: the cache positions attention reads (pos + 1, known on the host);
    None reads the whole cache, masked, so that every step has the same shapes: what a CUDA graph needs."""
    return model.forward_embeddings(model.tok_embeddings(token), pos, hidden, length=length)


@functools.cache
def compiled_decode_step():
    """decode_step compiled whole; "reduce-overhead" replays it as one CUDA graph on a GPU."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


@torch.inference_mode()
def generate(model, prompt: list[int], images: list, max_tokens: int, sampling: Sampling, stop_ids: set,
             on_token=None, seed: int | None = None, recorder: Recorder | None = None,
             compile: bool = False) -> tuple[list[int], Stats]:
    """Prefill `prompt` (with its images), then sample up to `max_tokens` tokens, one per step through
    the KV cache. on_token(id) is called as each token is chosen. Returns (generated ids, stats).
    compile: run the decoding steps through torch.compile (the first call compiles them); a recorder
    keeps the eager steps, so that dumps hold the logits of the code as written.
    A KeyboardInterrupt stops the loop and returns what was generated so far."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens is {max_tokens}: expected at least 1")
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    compiled = compile and recorder is None
    step = compiled_decode_step() if compiled else decode_step
    stats, out = Stats(prompt_tokens=len(prompt)), []
    model.setup_cache(1, len(prompt) + max_tokens)
    pos = torch.arange(len(prompt), device=device)
    hidden = [] if recorder is not None and recorder.hidden is not None else None
    start = time.perf_counter()
    try:
        logits = model(torch.tensor([prompt], device=device), input_pos=pos, hidden=hidden,
                       images=images or None, last_only=recorder is None)            # [1, S or 1, V]
        while True:
            if recorder is not None:
                recorder.add(logits, hidden)
            next_id = sample(logits[:, -1], sampling, generator)                    # [1]
            token = int(next_id)                                                     # the one host sync
            if not out:
                _sync(device)
                stats.prefill_s = time.perf_counter() - start
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_ids or len(out) == max_tokens:
                break
            pos = pos[-1:] + 1
            hidden = [] if hidden is not None else None
            # Eager steps read the cache up to the new token; a compiled one all of it (fixed shapes).
            length = None if compiled else len(prompt) + len(out)
            logits = step(model, next_id[:, None], pos, hidden, length)             # [1, 1, V]
    except KeyboardInterrupt:
        pass
    _sync(device)
    stats.generated_tokens = len(out)
    stats.decode_s = time.perf_counter() - start - stats.prefill_s
    return out, stats


class TextStream:
    """Prints tokens as text; a UTF-8 character split across tokens is printed once complete."""

    def __init__(self, tokenizer, write=None):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.write = write or (lambda text: print(text, end="", flush=True))

    def __call__(self, token: int):
        if not self.tokenizer.is_special(token):
            self.write(self.decoder.decode(self.tokenizer.token_bytes(token)))

    def flush(self):
        self.write(self.decoder.decode(b"", final=True))


class ReasoningSplit:
    """For Magistral: text between <think> and </think> goes to stderr, the answer to stdout."""

    def __init__(self):
        self.buffer, self.thinking = "", False

    def __call__(self, text: str):
        self.buffer += text
        while self.buffer:
            tag = "</think>" if self.thinking else "<think>"
            i = self.buffer.find(tag)
            if i < 0:
                keep = _partial_suffix(self.buffer, tag)   # hold back what may be the start of a tag
                self._emit(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return
            self._emit(self.buffer[:i])
            self.buffer, self.thinking = self.buffer[i + len(tag):], not self.thinking

    def _emit(self, text: str):
        print(text, end="", flush=True, file=sys.stderr if self.thinking else sys.stdout)


def _partial_suffix(text: str, tag: str) -> int:
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


# ----------------------------------------------------------------------------- the oracle dump

def write_dump(path, prompt: list[int], generated: list[int], recorder: Recorder, vision_features=None,
               metadata: dict | None = None):
    """One safetensors file (format documented in the README):
    prompt_ids int64 [S]; generated_ids int64 [N]; logits float32 [S + N - 1, V], row p = the output at
    sequence position p (the distribution of token p + 1); hidden.{i} float32 [S + N - 1, D] after
    block i (with --dump-hidden); vision_features float32 [n_image_tokens, D] when there are images."""
    tensors = {"prompt_ids": torch.tensor(prompt, dtype=torch.int64),
               "generated_ids": torch.tensor(generated, dtype=torch.int64),
               "logits": torch.cat(recorder.logits)}
    if recorder.hidden is not None:
        for i, layer in enumerate(zip(*recorder.hidden)):
            tensors[f"hidden.{i}"] = torch.cat(layer)
    if vision_features is not None:
        tensors["vision_features"] = vision_features.float().cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "mistral-small-reference-dump/1", **(metadata or {})})


@dataclass
class Comparison:
    positions: int
    max_abs_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    first_argmax_diff: int | None
    first_token_diff: int | None


def compare(path_a, path_b) -> Comparison:
    """Compare two dumps position by position, over the positions where both saw the same tokens."""
    a, b = load_file(str(path_a)), load_file(str(path_b))
    seq_a = torch.cat([a["prompt_ids"], a["generated_ids"]])
    seq_b = torch.cat([b["prompt_ids"], b["generated_ids"]])
    n = min(len(seq_a), len(seq_b))
    differ = (seq_a[:n] != seq_b[:n]).nonzero()
    first_token_diff = int(differ[0]) if len(differ) else None
    # row p depends on tokens 0..p: comparable while both sequences agree up to p
    rows = min(first_token_diff if first_token_diff is not None else n, len(a["logits"]), len(b["logits"]))
    la, lb = a["logits"][:rows].double(), b["logits"][:rows].double()
    lpa, lpb = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1)                                          # KL(a || b) [rows]
    agree = la.argmax(-1) == lb.argmax(-1)
    mismatch = (~agree).nonzero()
    return Comparison(rows, (la - lb).abs().max().item() if rows else 0.0,
                      kl.mean().item() if rows else 0.0, kl.max().item() if rows else 0.0,
                      agree.double().mean().item() if rows else 1.0,
                      int(mismatch[0]) if len(mismatch) else None, first_token_diff)


def print_comparison(c: Comparison, file=None):
    print(f"positions compared  {c.positions}", file=file)
    print(f"max abs logit diff  {c.max_abs_diff:.6g}", file=file)
    print(f"mean KL(a||b)       {c.mean_kl:.6g}", file=file)
    print(f"max KL(a||b)        {c.max_kl:.6g}", file=file)
    print(f"top-1 agreement     {c.top1_agreement:.6f}", file=file)
    print(f"first argmax diff   {'none' if c.first_argmax_diff is None else f'position {c.first_argmax_diff}'}",
          file=file)
    if c.first_token_diff is not None:
        print(f"token sequences differ from position {c.first_token_diff}; later positions not compared",
              file=file)


# ----------------------------------------------------------------------------- files and devices

def resolve_model(name: str) -> Path:
    """A local folder as is; a hub id ("owner/name") downloaded once (later runs use the cache)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or folder.exists():
        raise FileNotFoundError(f"--model {name}: no such folder (expected a local folder with params.json, "
                                f"consolidated.safetensors and tekken.json, or a hub id like {DEFAULT_MODEL})")
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # no network, gated repository, missing login, typo in the id
        raise FileNotFoundError(
            f"--model {name}: could not get the files from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"On a machine with network run `hf download {name} --include {' '.join(HUB_FILES)} "
            f"--local-dir DIR` (after `hf auth login` and accepting the model's terms if it is gated), "
            f"then pass --model DIR") from None


def tokenizer_file(folder: Path) -> Path:
    found = [folder / "tekken.json"] if (folder / "tekken.json").is_file() else sorted(folder.glob("tokenizer.model*"))
    if not found:
        raise FileNotFoundError(f"{folder}: no tokenizer file (expected tekken.json)")
    return found[0]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # kilobytes on Linux


def print_stats(stats: Stats, device: torch.device):
    decode_tokens = max(stats.generated_tokens - 1, 0)
    print(f"[{stats.prompt_tokens} prompt tokens, time to first token {stats.prefill_s:.2f} s, "
          f"prefill {stats.prompt_tokens / max(stats.prefill_s, 1e-9):.1f} tok/s, "
          f"decode {decode_tokens / max(stats.decode_s, 1e-9):.1f} tok/s ({stats.generated_tokens} tokens), "
          f"peak memory {peak_memory_gb(device):.2f} GB]", file=sys.stderr)


# ----------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the user message; read from standard input when absent")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local folder or hub id (default: %(default)s)")
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--system", help="system prompt text, or a file holding it (default: the model's "
                                    "SYSTEM_PROMPT.txt, filled with its name and the dates)")
    p.add_argument("--messages", help="a JSON file with a conversation in the OpenAI chat format")
    p.add_argument("--tools", help="a JSON file with a tool list in the OpenAI format")
    p.add_argument("--interactive", "-i", action="store_true", help="multi-turn chat; '/image PATH' attaches "
                                                                     "an image to the next message")
    p.add_argument("--temperature", type=float, help="default from the model card (Small 3.2: 0.15, Magistral: 0.7)")
    p.add_argument("--top-p", type=float, help="default from the model card (Small 3.2: 1.0, Magistral: 0.95)")
    p.add_argument("--top-k", type=int, help="0 keeps every token (default)")
    p.add_argument("--max-tokens", type=int, help="default 4096 (Magistral: 40960), never past the end of the context")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="compile the decoding step with torch.compile (one "
                                                          "CUDA graph on a GPU): faster decoding after a slow "
                                                          "first answer")
    p.add_argument("--dump", help="write prompt ids, generated ids and float32 logits to this .safetensors")
    p.add_argument("--dump-hidden", action="store_true", help="with --dump: also each block's hidden state "
                                                              "and the vision features")
    return p


def read_json_arg(path: str, flag: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: not valid JSON ({e})") from None


def system_prompt(args, folder: Path, name: str) -> str | None:
    if args.system is not None:
        path = Path(args.system)
        return path.read_text(encoding="utf-8") if path.is_file() else args.system
    if (folder / "SYSTEM_PROMPT.txt").is_file():
        return load_system_prompt(folder / "SYSTEM_PROMPT.txt", name)
    return None


def first_messages(args, session) -> list[dict]:
    if args.messages:
        messages = read_json_arg(args.messages, "--messages")
        if not isinstance(messages, list):
            raise ValueError(f"--messages {args.messages}: expected a JSON list of messages")
        return messages
    system = system_prompt(args, session.folder, session.name)
    messages = [{"role": "system", "content": system}] if system else []
    if args.interactive:
        return messages
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    return messages + [user_message(text, args.image)]


def user_message(text: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] +
            [{"type": "image_url", "image_url": {"url": image}} for image in images]}


def context_length(folder: Path) -> int:
    return checkpoint_files(folder)[2].max_position_embeddings   # native or Hugging Face layout


class Session:
    """A loaded model, its tokenizer and settings: answers one conversation at a time."""

    def __init__(self, args):
        self.args = args
        self.folder = resolve_model(args.model)
        self.tokenizer = Tokenizer.from_file(tokenizer_file(self.folder))
        self.context = context_length(self.folder)
        # a local folder is known by its name, a hub id by its last part
        self.name = Path(args.model).resolve().name if Path(args.model).is_dir() else args.model.split("/")[-1]
        s = card_defaults(self.name)
        self.sampling = Sampling(temperature=s.temperature if args.temperature is None else args.temperature,
                                 top_p=s.top_p if args.top_p is None else args.top_p,
                                 top_k=args.top_k or 0,
                                 max_tokens=args.max_tokens or s.max_tokens)
        self.reasoning = "magistral" in self.name.lower()
        self.device = pick_device(args.device)
        self.model = None   # loaded with the first answer, once the prompt is known to fit

    def answer(self, messages: list[dict], tools: list | None):
        """Stream the model's answer to the conversation; return it parsed (chat.AssistantOutput)."""
        ids, images = encode_chat(self.tokenizer, messages, tools)
        room = self.context - len(ids)
        if room < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens (images included), more than the model's "
                             f"context of {self.context} tokens")
        max_tokens = min(self.sampling.max_tokens or room, room)
        if self.model is None:
            self.model = load_model(self.folder, device=self.device, dtype=DTYPES[self.args.dtype])
        images = [im.to(self.device, self.model.output.weight.dtype) for im in images]
        stream = TextStream(self.tokenizer, write=ReasoningSplit() if self.reasoning else None)
        recorder = Recorder(self.args.dump_hidden) if self.args.dump else None
        out, stats = generate(self.model, ids, images, max_tokens, self.sampling, {self.tokenizer.eos_id},
                              on_token=stream, seed=self.args.seed, recorder=recorder, compile=self.args.compile)
        stream.flush()
        print(flush=True)
        parsed = parse_output(self.tokenizer, out)
        if parsed.tool_calls:
            print(json.dumps([vars(c) for c in parsed.tool_calls], ensure_ascii=False, indent=2))
        print_stats(stats, self.device)
        if recorder is not None:
            features = self.model.image_features(images) if images and self.args.dump_hidden else None
            write_dump(self.args.dump, ids, out, recorder, features, {"model": self.args.model})
        return parsed


def interactive(session: Session, messages: list[dict], tools):
    pending_images = []
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.startswith("/image "):
            pending_images.append(line[len("/image "):].strip())
            continue
        if not line.strip():
            continue
        messages.append(user_message(line, pending_images))
        pending_images = []
        messages.append(session.answer(messages, tools).to_message())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            if len(argv) != 3:
                raise ValueError("usage: python generate.py compare A.safetensors B.safetensors")
            c = compare(argv[1], argv[2])
            print_comparison(c)
            return 0 if c.first_argmax_diff is None and c.first_token_diff is None else 1
        args = build_parser().parse_args(argv)
        session = Session(args)
        tools = read_json_arg(args.tools, "--tools") if args.tools else None
        messages = first_messages(args, session)
        if args.interactive:
            interactive(session, messages, tools)
        else:
            session.answer(messages, tools)
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
