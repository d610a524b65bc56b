"""Chat with Mistral Small 3.x from the command line, or from Python through a Session.

    python generate.py "Why is the sky blue?"
    python generate.py --image photo.png "What should I do here?"
    python generate.py --messages chat.json --tools tools.json
    python generate.py -i                                                # a chat; /help lists its commands
    python generate.py --temperature 0 --dump out.safetensors "Hello"    # then: python dump.py compare ...
    torchrun --nproc_per_node=2 generate.py "Hello"                      # split over 2 GPUs (parallel.py)
    python generate.py --model unsloth/Mistral-Small-3.2-24B-Instruct-2506-GGUF:Q4_K_M "Hello"   # a GGUF

The data flow:

    files -> checkpoint.read_checkpoint -> Checkpoint (config, weight files, tokenizer) -> load_model -> model
    messages -> chat.encode_chat -> prompt ids + pixels -> stream -> Step, Step, ... -> consumers
    consumers: Session.complete (a Reply), the terminal (chat.OutputStream), the dump (dump.Recorder), serve.py

`stream` prefills the prompt once, then samples one token per step through the KV cache until </s> or
the token limit, yielding each token as it is chosen; a consumer stops it by leaving its loop. The
sampler and the loop work on token ids alone; Session adds the files, the tokenizer and the chat layout;
the command line adds flags, printing and dumps.
"""
import argparse
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import readline  # noqa: F401  (input() then edits lines and keeps their history: the interactive chat)
except ImportError:   # not on every platform
    pass

import torch

from chat import (AssistantOutput, OutputStream, drop_reasoning, encode_chat, image_slots, load_system_prompt,
                  parse_output)
from checkpoint import DEFAULT_MODEL, read_checkpoint
from dump import Recorder, write_dump
from images import load_image
from inputs import InputError, read_json, read_text, regular_file
from load import DTYPES, device_problem, load_model, pick_device
from parallel import close, is_lead, launched, mesh_from_env, world_size
from quants import QUANT_MATH


@dataclass
class Sampling:
    """Sampling settings; the defaults per model come from the model cards."""
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None


# The sampling of each model card ("Sampling parameters"). A model takes the first entry whose words all
# appear in its name, case ignored ("unsloth/Magistral-Small-2509-GGUF:Q4_K_M" is "Magistral 2509"); a
# model that matches none, the last entry's. Magistral 2506's card keeps to 40k tokens: past them its
# answers get worse.
MODEL_CARD_DEFAULTS = {
    "Magistral 2509": Sampling(temperature=0.7, top_p=0.95, max_tokens=131072),
    "Magistral 2507": Sampling(temperature=0.7, top_p=0.95, max_tokens=40960),
    "Magistral": Sampling(temperature=0.7, top_p=0.95, max_tokens=40960),
    # The card gives no limit; the KV cache is sized to prompt + max_tokens and every decoding step reads
    # all of it, so a bounded default keeps the 24 B model's cache small (4096 positions: 0.7 GB in bf16).
    "Mistral Small 3.x": Sampling(temperature=0.15, top_p=1.0, max_tokens=4096),
}


def is_reasoning_model(model_name: str) -> bool:
    """Magistral thinks before it answers (see chat.OutputStream)."""
    return "magistral" in model_name.lower()


MAX_SEED = 2**64 - 1   # torch.Generator's seeds: 0 .. 2^64 - 1
# What each sampling value may be, checked here for flags and request fields alike: (in range?, expected).
SAMPLING_RANGES = {
    "temperature": (lambda t: math.isfinite(t) and t >= 0, "a finite number >= 0"),
    "top_p": (lambda p: 0 < p <= 1, "a number in (0, 1]"),
    "top_k": (lambda k: k >= 0, "0 (every token) or more"),
    "max_tokens": (lambda n: n >= 1, "an integer >= 1"),
    "seed": (lambda s: 0 <= s <= MAX_SEED, f"an integer from 0 to {MAX_SEED}"),
}


def sampling_problem(field: str, value) -> str | None:
    """What is expected of a sampling value (SAMPLING_RANGES) that is out of its range; None if it is
    in range or not given."""
    in_range, expected = SAMPLING_RANGES[field]
    return None if value is None or in_range(value) else expected


def card_defaults(model_name: str) -> Sampling:
    name = model_name.lower()
    key = next((key for key in MODEL_CARD_DEFAULTS if all(word in name for word in key.lower().split())),
               list(MODEL_CARD_DEFAULTS)[-1])
    return Sampling(**vars(MODEL_CARD_DEFAULTS[key]))


# ----------------------------------------------------------------------------- sampling

def filter_probs(probs: torch.Tensor, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """probs [B, V] -> probs with all but the top_k most likely tokens zeroed, then all but the
    smallest set (of those, renormalized) whose mass reaches top_p. Not renormalized at the end:
    torch.multinomial does not need it. Sorting the vocabulary costs more than the rest of a small
    model's step: it is sorted only for top_p, and top_k alone takes the k largest."""
    k = top_k if 0 < top_k < probs.shape[-1] else 0            # 0: every token
    if k == 0 and top_p >= 1.0:
        return probs
    sorted_p, order = probs.topk(k, dim=-1) if k else probs.sort(dim=-1, descending=True)   # [B, k or V]
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
    prefill_s: float = 0.0         # to the first token
    decode_s: float = 0.0          # the decoding steps after it, less compile_s
    compile_s: float = 0.0         # with compile: the first decoding step, which compiles it (a new cache size
                                   # compiles again), kept out of decode_s

    @property
    def decode_steps(self) -> int:
        """The steps that decode_s times."""
        return max(self.generated_tokens - 1 - (self.compile_s > 0), 0)


@dataclass
class Step:
    """One generated token, with what was asked for beside it."""
    token: int
    logits: torch.Tensor | None    # [n, V] float32, raw (before temperature), of the n positions this step ran:
                                   # n = 1, or the whole prompt on the first step with prompt_logits; the last
                                   # row is the distribution `token` was sampled from. None unless asked for.
    hidden: list | None            # n_layers x [n, D]: each block's output at those positions, when asked for
    stats: Stats                   # running: the tokens and seconds so far


def prefill(model, prompt: list[int], images: list, hidden: list | None = None,
            all_logits: bool = False) -> torch.Tensor:
    """The prompt (with its images) through the model into its cache -> float32 logits [1, S, V], or
    [1, 1, V] (the last position alone, the only one sampling needs) unless all_logits."""
    device = model.output.weight.device
    return model(torch.tensor([prompt], device=device), input_pos=torch.arange(len(prompt), device=device),
                 collect_hidden=hidden, images=images or None, last_only=not all_logits)


def decode_step(model, token: torch.Tensor, pos: torch.Tensor, collect_hidden: list | None = None,
                kv_len: int | None = None) -> torch.Tensor:
    """One generated token [B, 1] at position pos [1], or each at its own position pos [B, 1] (batch.py),
    -> float32 logits [B, 1, V]. The token is embedded as it is, unchecked (the image check of model.embed
    reads the tokens on the host), so the step never waits for the host. kv_len: the cache positions
    attention reads (the furthest pos + 1, known on the host); None reads the whole cache, masked, so that
    every step has the same shapes: what a CUDA graph needs."""
    return model.forward_embeddings(model.tok_embeddings(token), pos, collect_hidden, kv_len=kv_len)


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled whole. On a GPU, "reduce-overhead" replays it as one CUDA graph, which needs
    the same shapes at every step: the step reads the whole cache (kv_len None). Elsewhere there is no
    graph to replay (the mode falls back to the default) and reading the whole cache, prompt + max_tokens,
    costs more than compiling saves: the step reads up to its own position like an eager one, kv_len a
    dynamic int (dynamic=True), so that one compilation serves every step of an answer (another cache
    size compiles again: the cache buffers' shapes stay static)."""
    if device_type == "cuda":
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    return torch.compile(decode_step, fullgraph=True, dynamic=True)


@torch.inference_mode()
def stream(model, prompt: list[int], images: list, max_tokens: int, sampling: Sampling, stop_ids: set,
           seed: int | None = None, compile: bool = False, logits: bool = False, prompt_logits: bool = False,
           hidden: bool = False) -> Iterator[Step]:
    """Prefill `prompt` (with its images), then sample up to `max_tokens` tokens, one per step through
    the KV cache, yielding each as it is chosen; the answer ends after a stop id. The consumer stops it
    early by leaving its loop. logits / prompt_logits / hidden: put the raw logits (of the prompt's
    positions too) and each block's hidden states in the steps (see Step). compile: decoding steps
    through torch.compile (the first answer compiles them); hidden states need the eager code."""
    if max_tokens < 1:
        raise InputError(f"max_tokens is {max_tokens}: expected at least 1")
    if compile and hidden:
        raise InputError("compile and hidden states cannot be combined: a dump holds the eager code's values")
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    step = compiled_decode_step(device.type) if compile else decode_step
    model.setup_cache(1, len(prompt) + max_tokens)
    stats, states = Stats(prompt_tokens=len(prompt)), [] if hidden else None
    start = time.perf_counter()
    out = prefill(model, prompt, images, states, all_logits=prompt_logits)         # [1, S or 1, V]
    pos = torch.tensor([len(prompt) - 1], device=device)
    for n in range(1, max_tokens + 1):
        next_id = sample(out[:, -1], sampling, generator)                           # [1]
        token = int(next_id)                                                         # the one host sync
        elapsed = time.perf_counter() - start
        if n == 1:
            stats.prefill_s = elapsed
        elif n == 2 and compile:
            stats.compile_s = elapsed - stats.prefill_s
        stats.generated_tokens, stats.decode_s = n, elapsed - stats.prefill_s - stats.compile_s
        yield Step(token, out[0] if logits or prompt_logits else None,
                   [h[0] for h in states] if hidden else None, stats)
        if token in stop_ids or n == max_tokens:
            return
        pos, states = pos + 1, [] if hidden else None
        # Steps read the cache up to the new token; a compiled one on a GPU all of it (fixed shapes).
        kv_len = None if compile and device.type == "cuda" else len(prompt) + n
        out = step(model, next_id[:, None], pos, states, kv_len)                    # [1, 1, V]


def generate(model, prompt: list[int], images: list, max_tokens: int, sampling: Sampling, stop_ids: set,
             seed: int | None = None, compile: bool = False) -> tuple[list[int], Stats]:
    """The whole answer of `stream`: (generated ids, stats). A Ctrl-C ends it with the ids so far."""
    ids, stats = [], Stats(prompt_tokens=len(prompt))
    try:
        for s in stream(model, prompt, images, max_tokens, sampling, stop_ids, seed, compile):
            ids.append(s.token)
            stats = s.stats
    except KeyboardInterrupt:
        pass
    return ids, stats


def default_system_prompt(folder: Path, name: str) -> str | list[dict] | None:
    """The model's SYSTEM_PROMPT.txt filled with its name and today's date (see chat.load_system_prompt);
    None without one."""
    path = folder / "SYSTEM_PROMPT.txt"
    return load_system_prompt(path, name) if os.path.lexists(path) else None


# ----------------------------------------------------------------------------- memory and stats

def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource   # POSIX only
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


def decode_bytes(model) -> int:
    """The weight bytes one decoding step reads: every weight but the vision side's and the embedding table
    (one row of it). A tied head's table counts once, as the head."""
    skip = ("tok_embeddings.", "vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.")
    tensors = {t.data_ptr(): t for name, t in model.state_dict().items() if not name.startswith(skip)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def speed(tokens: int, seconds: float) -> str:
    """Tokens per second, or below 1 seconds per token (where "0.0 tok/s" would say nothing)."""
    if tokens < 1 or seconds <= 0:
        return "-"
    return f"{tokens / seconds:.1f} tok/s" if tokens >= seconds else f"{seconds / tokens:.1f} s/token"


def print_stats(stats: Stats, device: torch.device, weight_bytes: int | None = None):
    """weight_bytes: what decode_bytes gives; the line then adds the bandwidth that decoding achieved
    (decoding is memory-bound: each token reads every weight once)."""
    steps = stats.decode_steps
    bandwidth = f" = {weight_bytes * steps / stats.decode_s / 1e9:.1f} GB/s of weights" \
        if weight_bytes and steps and stats.decode_s > 0 else ""
    compiled = f", compiling the decoding step {stats.compile_s:.1f} s" if stats.compile_s else ""
    print(f"[{stats.prompt_tokens} prompt tokens, time to first token {stats.prefill_s:.2f} s, "
          f"prefill {speed(stats.prompt_tokens, stats.prefill_s)}, "
          f"decode {speed(steps, stats.decode_s)}{bandwidth} ({stats.generated_tokens} tokens){compiled}, "
          f"peak memory {peak_memory_gb(device):.2f} GB]", file=sys.stderr)


# ----------------------------------------------------------------------------- the session

@dataclass
class Reply:
    prompt_ids: list[int]
    ids: list[int]                  # the generated ids, </s> included when it was sampled
    output: AssistantOutput         # those ids parsed: content, tool calls, reasoning
    stats: Stats


class Session:
    """A model with its tokenizer and chat layout, answering one conversation at a time.

        session = Session("path/to/Mistral-Small-3.2-24B-Instruct-2506", device="cuda")
        reply = session.answer([{"role": "user", "content": "Hello"}])
        print(reply.output.content)

    model: a local folder or a hub id, or a GGUF (FILE.gguf, or REPO:QUANT on the hub); dtype: "bfloat16",
    "float16" or "float32"; compile: the decoding step through torch.compile. tokenizer: a tokenizer file
    instead of the model's own; mmproj: a GGUF's vision file, or its type on the hub (see
    checkpoint.py). The files are read and checked against each other here, the weights loaded with the
    first answer, once its prompt is known to fit the context. The defaults are the command line's:
    sampling from the model card (`sampling`), and answer() opens a conversation that has no system
    message with the model's SYSTEM_PROMPT.txt, filled with its name and today's date (`system_prompt`;
    set it to None for none).
    Under torchrun every rank makes its Session and asks it the same questions: the model is split
    over the ranks (parallel.py), each on its own GPU, and every rank gets the same reply."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "bfloat16",
                 compile: bool = False, tokenizer: str | None = None, mmproj: str | None = None,
                 quant_math: str = "fast"):
        if dtype not in DTYPES:
            raise InputError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        device = pick_device(device)   # a bad device fails before any file is read
        self.checkpoint = read_checkpoint(model, mmproj, tokenizer, world_size())
        self.folder, self.name, self.mmproj = self.checkpoint.path, self.checkpoint.name, self.checkpoint.mmproj
        self.tokenizer = self.checkpoint.tokenizer
        self.context = self.checkpoint.args.max_position_embeddings
        self.sampling = card_defaults(self.name)
        self.system_prompt = default_system_prompt(self.folder, self.name)
        # Under torchrun, the process group once every file has been found good: bad input ends every
        # rank alike before the ranks wait on each other.
        self.mesh, self.device = mesh_from_env(device)
        self.reasoning = is_reasoning_model(self.name)
        self.dtype, self.compile, self.quant_math = DTYPES[dtype], compile, quant_math
        self.model = None

    def answer(self, messages: list[dict], tools: list | None = None, sampling: Sampling | None = None,
               seed: int | None = None) -> Reply:
        """The assistant's whole answer to the conversation (OpenAI chat format, see chat.py), opened by
        system_prompt when it has no system message, never past the end of the context."""
        ids, images = self.encode(messages, tools, self.system_prompt)
        return self.complete(ids, images, sampling, seed)

    def encode(self, messages: list[dict], tools: list | None = None, system: str | None = None
               ) -> tuple[list[int], list[torch.Tensor]]:
        """The prompt ids and pixels of a conversation (system: its system prompt if it has no system
        message); refused when it leaves no room for an answer."""
        if self.checkpoint.layout == "gguf" and self.checkpoint.vision is None and image_slots(messages):
            raise InputError(f"{self.folder}: the conversation has images, and no vision file was found beside "
                             f"this GGUF or given: put the model's mmproj*.gguf beside it, or pass mmproj=FILE")
        ids, images = encode_chat(self.tokenizer, messages, tools, system)
        if len(ids) >= self.context:
            raise InputError(f"the prompt is {len(ids)} tokens (images included), more than the model's "
                             f"context of {self.context} tokens")
        return ids, images

    def complete(self, ids: list[int], images: list[torch.Tensor], sampling: Sampling | None = None,
                 seed: int | None = None) -> Reply:
        """The whole answer to an encoded prompt (see encode and stream)."""
        out, stats = [], Stats(prompt_tokens=len(ids))
        for step in self.stream(ids, images, sampling, seed):
            out.append(step.token)
            stats = step.stats
        return Reply(ids, out, parse_output(self.tokenizer, out, tags=self.reasoning), stats)

    def stream(self, ids: list[int], images: list[torch.Tensor], sampling: Sampling | None = None,
               seed: int | None = None, logits: bool = False, prompt_logits: bool = False,
               hidden: bool = False) -> Iterator[Step]:
        """The answer to an encoded prompt as it is generated, one Step per token (see the function
        stream), at most up to the end of the context; the model is loaded on first use."""
        room = self.context - len(ids)
        sampling = sampling or self.sampling
        model = self.load()
        return stream(model, ids, self.on_device(images), min(sampling.max_tokens or room, room), sampling,
                      {self.tokenizer.eos_id}, seed, self.compile, logits, prompt_logits, hidden)

    def on_device(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preprocessed pixels as the model takes them: on its device, in its dtype."""
        return [im.to(self.device, self.load().output.weight.dtype) for im in images]

    def load(self):
        """The model, loaded on first use."""
        if self.model is None:
            self.model = load_model(self.checkpoint, device=self.device, dtype=self.dtype, mesh=self.mesh,
                                    quant_math=self.quant_math)
        return self.model


# ----------------------------------------------------------------------------- the command line

def card_help(field: str) -> str:
    return "default from the model card (" + ", ".join(
        f"{name}: {getattr(s, field)}" for name, s in MODEL_CARD_DEFAULTS.items()) + ")"


def add_model_flags(p: argparse.ArgumentParser, model: str | None = DEFAULT_MODEL, dtype: str = "bfloat16",
                    compile: bool = True, quant_math: bool = True) -> None:
    """--model, --device, --dtype, --mmproj, --tokenizer, (compile) --compile and (quant_math) --quant-math:
    what Session takes, for every command that loads a model. model None: --model is required."""
    p.add_argument("--model", default=model, required=model is None,
                   help="local folder or hub id" + (f" (default: {model})" if model else "") +
                        ", or a GGUF: FILE.gguf, or REPO:QUANT on the hub")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--dtype", default=dtype, choices=sorted(DTYPES), help="(default: %(default)s)")
    if compile:
        p.add_argument("--compile", action="store_true", help="compile the decoding step with torch.compile (one "
                                                              "CUDA graph on a GPU): faster decoding after a slow "
                                                              "first answer")
    p.add_argument("--mmproj", help="a GGUF's vision file (default: the mmproj*.gguf beside it), the type to "
                                    "download with REPO:QUANT (F16 (default), BF16, F32), or none")
    p.add_argument("--tokenizer", help="a tokenizer file (tekken.json) instead of the model's own")
    if quant_math:
        p.add_argument("--quant-math", default="fast", choices=QUANT_MATH,
                       help="how a GGUF's quantized matrices multiply: fast (repacked once at load and read as "
                            "stored: Q4_0/Q4_1/Q4_K by PyTorch's int4 kernels in bfloat16, Q8_0/Q5_K/Q6_K by a "
                            "compiled loop, other types exact) or exact (dequantized to float32 in each step, "
                            "bit-exact with gguf) (default: %(default)s)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --max-tokens, --seed (see flag_sampling)."""
    p.add_argument("--temperature", type=float, help=card_help("temperature") + "; 0 is greedy")
    p.add_argument("--top-p", type=float, help=card_help("top_p"))
    p.add_argument("--top-k", type=int, help="0 keeps every token (default)")
    p.add_argument("--max-tokens", type=int, help=card_help("max_tokens") + ", never past the end of the context")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")


class Parser(argparse.ArgumentParser):
    """An argument parser that speaks from rank 0 alone under torchrun: a bad flag is one usage and one
    error for all the processes (each exits), --help one text."""

    def _print_message(self, message: str, file=None) -> None:
        if is_lead():
            super()._print_message(message, file)


PYTHON_ARGUMENT = re.compile(r"(?<![^\s(])([a-z][a-z_]*)=")   # mmproj=FILE, as library errors name arguments


def as_flags(parser: argparse.ArgumentParser, message: str) -> str:
    """A library error as the command line says it: each Python argument it names (mmproj=FILE, model=...)
    that is a flag of `parser` named as the flag (--mmproj FILE, --model ...)."""
    def flag(m: re.Match) -> str:
        name = "--" + m[1].replace("_", "-")
        if name not in parser._option_string_actions:
            return m[0]
        after = message[m.end():m.end() + 1]
        return name + (" " if after and after not in " ,;:)" else "")
    return PYTHON_ARGUMENT.sub(flag, message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the user message (with -i: the first one); read from standard input "
                                             "when absent, unless -i or --messages")
    add_model_flags(p)
    p.add_argument("--image", action="append", default=[], help="image path or URL, with the prompt (with -i: the "
                                                                "first message); repeatable")
    p.add_argument("--system", help="system prompt text, or a file holding it: one word that ends in .txt or .md "
                                    "or holds a '/' must be a file (default: the model's SYSTEM_PROMPT.txt, "
                                    "filled with its name and the dates)")
    p.add_argument("--messages", help="a JSON file with a conversation in the OpenAI chat format; a prompt "
                                      "continues it")
    p.add_argument("--tools", help="a JSON file with a tool list in the OpenAI format")
    p.add_argument("--keep-reasoning", action="store_true", help="a reasoning model's earlier thoughts stay in the "
                                                                  "prompt (default: left out, as they fill the context)")
    p.add_argument("--interactive", "-i", action="store_true", help="multi-turn chat, with line editing and "
                                                                     "history; /help lists its commands")
    add_sampling_flags(p)
    p.add_argument("--dump", help="write prompt ids, generated ids and float32 logits to this .safetensors "
                                  "(not with --compile; with -i: each answer's in turn)")
    p.add_argument("--dump-hidden", action="store_true", help="with --dump: also each block's hidden state "
                                                              "and the vision features")
    return p


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    """Flags that are wrong on their own or together: refused before anything loads."""
    check_sampling_flags(parser, args)
    if args.compile and args.dump:
        parser.error("--compile and --dump cannot be combined: a dump holds the logits of the eager code")
    if args.dump_hidden and not args.dump:
        parser.error("--dump-hidden needs --dump FILE")
    if args.image and args.messages and args.prompt is None:
        parser.error("--image with --messages goes with a prompt, the message it adds; the images of the --messages "
                     "conversation go in its file")
    if launched() and (args.interactive or args.prompt is None and not args.messages):
        parser.error("under torchrun, give the prompt as an argument or with --messages: every process would "
                     "read standard input (-i, or no prompt) for itself")
    for problem in (device_problem(args.device), system_problem(args.system), dump_problem(args.dump)):
        if problem is not None:
            parser.error(as_flags(parser, problem))


def check_sampling_flags(parser: argparse.ArgumentParser, args) -> None:
    for field in SAMPLING_RANGES:
        expected = sampling_problem(field, getattr(args, field))
        if expected is not None:
            parser.error(f"--{field.replace('_', '-')} {getattr(args, field)}: expected {expected}")


def system_problem(system: str | None) -> str | None:
    """--system takes text or a file. A value that looks like a path (one word that ends in .txt or
    .md, or holds a path separator) must name a regular file: a mistyped path never becomes the prompt."""
    if system is None or re.search(r"\s", system) or Path(system).is_file():
        return None
    if not (system.lower().endswith((".txt", ".md")) or "/" in system or os.sep in system):
        return None
    try:
        regular_file(system, f"--system {system}")
    except InputError as e:
        return f"{e} (a one-word --system that ends in .txt or .md or holds a '/' is taken for a file)"
    return None


def dump_problem(dump: str | None) -> str | None:
    """--dump must be writable where it points, checked before anything is generated."""
    if dump is None:
        return None
    path = Path(dump)
    if path.is_dir():
        return f"--dump {dump}: is a folder; expected a file name such as {path / 'dump.safetensors'}"
    if path.exists() and not path.is_file():
        return f"--dump {dump}: exists and is not a regular file"
    if not path.parent.is_dir():
        return f"--dump {dump}: the folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK):
        return f"--dump {dump}: the folder {path.parent} is not writable"
    return None


def flag_sampling(args, card: Sampling) -> Sampling:
    """The model card's sampling with the flags that were given."""
    return Sampling(temperature=card.temperature if args.temperature is None else args.temperature,
                    top_p=card.top_p if args.top_p is None else args.top_p,
                    top_k=args.top_k or 0,
                    max_tokens=card.max_tokens if args.max_tokens is None else args.max_tokens)


def system_prompt(args, session: Session) -> str | list[dict] | None:
    """The system prompt of a conversation that has none: --system, or the Session's (SYSTEM_PROMPT.txt
    filled, as answer() takes it)."""
    if args.system is None:
        return session.system_prompt
    path = Path(args.system)
    return read_text(path, what=f"--system {args.system}") if path.is_file() else args.system


MAX_PROMPT_CHARS = 64 * 2**20   # a prompt read from standard input


def read_flag_files(args) -> tuple[list | None, list | None]:
    """The --messages and --tools files, read before the model: (messages or None, tools or None)."""
    tools = read_json(Path(args.tools), f"--tools {args.tools}") if args.tools else None
    if not args.messages:
        return None, tools
    messages = read_json(Path(args.messages), f"--messages {args.messages}")
    if not isinstance(messages, list):
        raise InputError(f"--messages {args.messages}: expected a JSON list of messages")
    return messages, tools


def first_messages(args, session: Session, messages: list | None = None) -> list[dict]:
    """The conversation the flags give: the --messages file's, then the user message of the command
    line: the prompt (read from standard input when absent, unless -i or --messages) with --image. (The
    system prompt goes in when it is encoded: respond.)"""
    messages = list(messages or [])
    if args.system is not None and any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        raise InputError(f"--system and the system message of --messages {args.messages}: give one")
    if args.prompt is None and (args.interactive or args.messages):
        return messages
    text = args.prompt if args.prompt is not None else sys.stdin.read(MAX_PROMPT_CHARS + 1)
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt on standard input is longer than {MAX_PROMPT_CHARS} characters")
    return messages + [user_message(text, args.image)]


def user_message(text: str, images: list[str]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] +
            [{"type": "image_url", "image_url": {"url": image}} for image in images]}


def respond(session: Session, messages: list[dict], tools, args) -> AssistantOutput:
    """Answer on the terminal: the answer streamed to stdout and a reasoning model's thought to stderr,
    tool calls as JSON, the stats line; and the dump, if asked for. Earlier thoughts are left out of the
    prompt unless --keep-reasoning. Ctrl-C ends the answer where it is. Under torchrun only rank 0
    prints and writes; every rank records, so that all run the same computation."""
    ids, images = session.encode(messages if args.keep_reasoning else drop_reasoning(messages), tools,
                                 system_prompt(args, session))
    text = OutputStream(session.tokenizer, tags=session.reasoning)
    recorder = Recorder(args.dump_hidden) if args.dump else None
    out, stats = [], Stats(prompt_tokens=len(ids))
    compiling = session.compile and session.model is None   # the first answer compiles the decoding step
    steps = session.stream(ids, images, seed=args.seed, prompt_logits=recorder is not None, hidden=args.dump_hidden)
    try:   # the answer, not the loading before it
        for step in steps:
            out.append(step.token)
            stats = step.stats
            if recorder is not None:
                recorder.add(step.logits, step.hidden)
            if is_lead():
                if compiling and len(out) == 1:   # the second token waits for it
                    print("compiling the decoding step...", file=sys.stderr, flush=True)
                show(text.feed(step.token))
    except KeyboardInterrupt:
        pass
    output = parse_output(session.tokenizer, out, tags=session.reasoning)
    if not is_lead():
        return output
    show(text.close())
    print(flush=True)
    if output.tool_calls:
        print(json.dumps([vars(c) for c in output.tool_calls], ensure_ascii=False, indent=2))
    print_stats(stats, session.device, decode_bytes(session.model))
    if recorder is not None:
        features = session.model.image_features(session.on_device(images)) if images and args.dump_hidden else None
        write_dump(args.dump, ids, out, recorder, features, {"model": args.model})
    return output


def show(pieces: list[tuple[str, str]]) -> None:
    """OutputStream's pieces on the terminal: the thought to stderr, the answer to stdout."""
    for kind, text in pieces:
        print(text, end="", flush=True, file=sys.stderr if kind == "reasoning" else sys.stdout)


CHAT_HELP = """/image PATH   attach an image (a path or URL) to the next message; it is read now
/reset        start the conversation over
/help         this list
/exit         leave (or Ctrl-D); Ctrl-C stops an answer
Arrow keys edit the line and recall earlier ones. A line that starts with '/' is a command: to send
one to the model, start it with a space."""


def image_problem(session: Session, source: str) -> str | None:
    """What is wrong with an image for this model (unreadable, or a model without vision), found when
    it is named."""
    try:
        load_image(source)
        session.encode([user_message("", [source])])
    except InputError as e:
        return str(e)
    return None


def interactive(session: Session, messages: list[dict], tools, args, parser: argparse.ArgumentParser):
    """The chat: each line typed is a message answered in turn, or a command (CHAT_HELP). A conversation
    that ends with a user message (the prompt given with -i) is answered first."""
    start = list(messages)
    waiting = bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "user"
    pending = [] if waiting else list(args.image)   # --image goes with the first message
    for image in pending:
        if problem := image_problem(session, image):
            raise InputError(problem)

    def answer():
        try:
            messages.append(respond(session, messages, tools, args).to_message(reasoning=True))
        except InputError as e:   # a prompt past the context: this turn is dropped
            messages.pop()
            print(f"error: {as_flags(parser, str(e))} (message dropped)", file=sys.stderr)

    if waiting:
        answer()
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)")
            continue
        command, _, rest = line.partition(" ")
        if command == "/exit":
            return
        if command == "/help":
            print(CHAT_HELP)
        elif command == "/reset":
            messages[:], pending = list(start), []
            print("(a new conversation)")
        elif command == "/image":
            problem = image_problem(session, rest.strip()) if rest.strip() else "/image needs a path or URL"
            if problem:
                print(f"error: {as_flags(parser, problem)} (not attached)", file=sys.stderr)
            else:
                pending.append(rest.strip())
                print(f"(attached to the next message: {len(pending)} image{'s' * (len(pending) > 1)})")
        elif line.startswith("/"):
            print(f"error: unknown command {command} (/help lists the commands)", file=sys.stderr)
        elif line.strip():
            messages.append(user_message(line, pending))
            pending = []
            answer()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    try:
        messages, tools = read_flag_files(args)
        session = Session(args.model, args.device, args.dtype, args.compile, args.tokenizer, args.mmproj,
                          args.quant_math)
        session.sampling = flag_sampling(args, session.sampling)
        messages = first_messages(args, session, messages)
        if args.interactive:
            interactive(session, messages, tools, args, parser)
        else:
            respond(session, messages, tools, args)
        return 0
    except InputError as e:   # bad input: one line; anything else is a bug and keeps its traceback
        if is_lead():         # every rank meets the same bad input
            print(f"error: {as_flags(parser, str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        close()   # the process group, under torchrun
