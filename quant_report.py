"""How far a quantized GGUF is from the reference: KL divergence, top-1 agreement and perplexity, teacher-forced.

    python quant_report.py reference --model FOLDER --text wiki.txt [--messages chat.json] --out ref.safetensors
    python quant_report.py score --model Model-Q4_K_M.gguf --reference ref.safetensors

As llama.cpp's `llama-perplexity --kl-divergence`, but against the official weights and with images. The
reference model runs once over fixed tokens: the text cut into chunks of `context` tokens (each opened by
<s>, the second half of each scored, as llama.cpp does), and optionally a conversation with an image whose
last assistant answer is scored. Its distributions are stored; any GGUF is then scored against them.

This measures the weight-quantization error alone: the quantized model here dequantizes its weights and
multiplies in float, so two runs differ only by their weights. llama.cpp also quantizes the activations in
its dot products (Q8_0 / Q8_K), so its own KL for the same file reads higher, for Q8_0 about twice.

The reference file (safetensors) holds, for P scored positions and its top-k (--top-k, default 64):
    top_ids int32 [P, k], top_logprobs float32 [P, k]   the reference's k most likely next tokens
    target_logprob float32 [P]                          its log-probability of the actual next token
    text_tokens int32 [C, context]                      the chunks, and for a conversation:
    chat_tokens int32 [S], chat_image_N float32 [3, H, W], chat_first int64 [1] (its first scored position)
    architecture int64 [7]                              the model's shapes (ARCHITECTURE)
About 8 k + 4 bytes per position: 516 kB per 1000 positions at k = 64 (the full float16 log-softmax of the
131072-token vocabulary would be 262 MB). The command line also records a digest of the tokenizer's
vocabulary (metadata `tokenizer`): score refuses a reference that does not fit the model scored (another
model's shapes, another tokenizer, ids outside the vocabulary, images for a model without vision). The KL
is that of the distributions coarsened to the reference's top k plus one "rest" bucket: a lower bound of
the full KL (merging outcomes can only lower it), exact when k is the vocabulary size, and close to it
when the top k hold nearly all the mass.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from chat import encode_chat
from generate import Session, add_model_flags, as_flags
from inputs import InputError, read_json, read_text, regular_file

FORMAT = "quant_report/2"   # /2: the reference names its model (architecture, and the tokenizer's digest)
# The shapes that make two files the same model, quantized or not.
ARCHITECTURE = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size")


# ----------------------------------------------------------------------------- inputs

def text_chunks(ids: list[int], bos: int, context: int, chunks: int | None = None) -> torch.Tensor:
    """The text's ids cut into chunks [C, context], each <s> + context - 1 ids (the remainder dropped)."""
    n = len(ids) // (context - 1)
    n = min(n, chunks) if chunks else n
    if n < 1:
        raise InputError(f"the text has {len(ids)} tokens: not enough for one chunk of {context}")
    body = torch.tensor(ids[:n * (context - 1)], dtype=torch.int32).view(n, context - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int32), body], dim=1)


def conversation(tokenizer, messages: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """A conversation ending with an assistant answer -> its ids [S], its images, and the first scored
    position: the answer's tokens are scored, given the conversation and its images."""
    if not messages or messages[-1].get("role") != "assistant":
        raise InputError("--messages: the conversation must end with the assistant answer to score")
    # The answer as a prefix to continue (chat.py ends a prompt there), then the </s> that closes it.
    ids, images = encode_chat(tokenizer, messages[:-1] + [{**messages[-1], "prefix": True}])
    prompt, _ = encode_chat(tokenizer, messages[:-1])
    return torch.tensor(ids + [tokenizer.eos_id], dtype=torch.int32), images, len(prompt) - 1


# ----------------------------------------------------------------------------- the reference

@torch.inference_mode()
def logprobs(model, tokens: torch.Tensor, images: list | None = None) -> torch.Tensor:
    """Teacher-forced float32 log-probabilities [S, V] of the next token after each of tokens [S]."""
    device = model.output.weight.device
    images = [im.to(device, model.output.weight.dtype) for im in images] if images else None
    return torch.log_softmax(model(tokens[None].long().to(device), images=images)[0].float(), dim=-1).cpu()


def scored_positions(tokens: list[torch.Tensor], firsts: list[int]):
    """(logprobs row, target) pairs: for sequence i, positions firsts[i] .. S - 2 predict tokens 1 .. S - 1."""
    return [(torch.arange(first, len(t) - 1), t[first + 1:].long()) for t, first in zip(tokens, firsts)]


def sequences(ref: dict) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[int], list[str]]:
    """The scored sequences of a reference: tokens, images, first scored position, and part ("text"/"chat")."""
    chunks = ref["text_tokens"]
    context = chunks.shape[1]
    seqs, images, firsts, parts = list(chunks), [None] * len(chunks), [context // 2] * len(chunks), ["text"] * len(chunks)
    if "chat_tokens" in ref:
        seqs.append(ref["chat_tokens"])
        images.append([ref[k] for k in sorted(k for k in ref if k.startswith("chat_image_"))])
        firsts.append(int(ref["chat_first"]))
        parts.append("chat")
    return seqs, images, firsts, parts


def make_reference(model, chunks: torch.Tensor, top_k: int = 64, chat=None) -> dict:
    """The reference's distributions over chunks [C, context] (and a conversation (ids, images, first))."""
    ref = {"text_tokens": chunks, "architecture": architecture(model.args)}
    if chat is not None:
        ids, images, first = chat
        ref.update(chat_tokens=ids, chat_first=torch.tensor([first]))
        ref.update({f"chat_image_{i}": im.float().contiguous() for i, im in enumerate(images)})
    top_ids, top_lp, target_lp = [], [], []
    seqs, images, firsts, _ = sequences(ref)
    for tokens, ims, (rows, targets) in zip(seqs, images, scored_positions(seqs, firsts)):
        lp = logprobs(model, tokens, ims)[rows]                                     # [p, V]
        values, ids = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        top_ids.append(ids.int()), top_lp.append(values), target_lp.append(lp.gather(1, targets[:, None])[:, 0])
    ref.update(top_ids=torch.cat(top_ids), top_logprobs=torch.cat(top_lp), target_logprob=torch.cat(target_lp))
    return ref


def save_reference(path, ref: dict, about: dict):
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path), metadata={"format": FORMAT, **about})


def load_reference(path) -> tuple[dict, dict]:
    """The stored distributions and their metadata; a file that is not a reference is an InputError."""
    path = regular_file(path, f"--reference {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            about = f.metadata() or {}
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if about.get("format") != FORMAT:
        raise InputError(f"{path}: not a quant_report reference (format {about.get('format')!r}, expected {FORMAT!r})")
    return tensors, about


# ----------------------------------------------------------------------------- what a reference fits

def architecture(args) -> torch.Tensor:
    """The shapes that make two checkpoints the same model, quantized or not: int64 [len(ARCHITECTURE)]."""
    return torch.tensor([getattr(args, name) for name in ARCHITECTURE])


def vocabulary_digest(tokenizer) -> str:
    """What the reference's token ids mean: each id's bytes, or a control token's name, hashed."""
    digest = hashlib.sha256()
    for i in range(tokenizer.n_words):
        special = tokenizer.is_special(i)
        data = tokenizer.special_name(i).encode() if special else tokenizer.token_bytes(i)
        digest.update(bytes([special]) + len(data).to_bytes(4, "little") + data)
    return f"sha256:{digest.hexdigest()}"


def check_fit(ref: dict, about: dict, args, tokenizer, vision: bool, path) -> None:
    """Refuse a reference made from another model than the one scored: other shapes, another tokenizer
    (when the reference names its own), token ids outside the vocabulary, or an image conversation for a
    model without vision."""
    theirs = ref.get("architecture")
    if theirs is None or theirs.shape != (len(ARCHITECTURE),):
        raise InputError(f"{path}: the reference records no architecture [{len(ARCHITECTURE)}]: make it again")
    differ = [f"{name} {int(a)} (reference) vs {b}" for name, a, b in zip(ARCHITECTURE, theirs, architecture(args))
              if a != b]
    if differ:
        raise InputError(f"{path}: made from another model: {', '.join(differ)}")
    if "tokenizer" in about and about["tokenizer"] != (ours := vocabulary_digest(tokenizer)):
        raise InputError(f"{path}: made with another tokenizer (vocabulary digest {about['tokenizer']:.20}..., this "
                         f"model's {ours:.20}...): its token ids mean other text")
    for name in ("text_tokens", "top_ids", "chat_tokens"):
        if name in ref and ref[name].numel() and not 0 <= int(ref[name].min()) <= int(ref[name].max()) < args.vocab_size:
            raise InputError(f"{path}: {name} holds ids outside this model's vocabulary of {args.vocab_size}")
    if "chat_tokens" in ref and any(k.startswith("chat_image_") for k in ref) and not vision:
        raise InputError(f"{path}: the reference scores a conversation with images, and this model has no vision "
                         f"encoder (a GGUF's is its mmproj file: mmproj=FILE)")


# ----------------------------------------------------------------------------- scoring

def coarse_kl(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) [P] over the reference's top k [P, k] (log-probabilities of both at the same
    ids) plus the rest of the mass, in float64."""
    ref_lp, lp = ref_lp.double(), lp.double()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    # log(1 - sum p), as log1p(-sum p): the rest of the mass, which can be tiny
    ref_rest = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1.0))
    rest = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
    tail = torch.where(ref_rest > -torch.inf, ref_rest.exp() * (ref_rest - rest), torch.zeros_like(kl))
    return (kl + tail).clamp(min=0)   # rounding can leave -1e-17 for equal distributions


def summary(kl: torch.Tensor, agree: torch.Tensor, ref_target: torch.Tensor, target: torch.Tensor) -> dict:
    ppl_ref, ppl = ref_target.double().mean().neg().exp().item(), target.double().mean().neg().exp().item()
    return {"positions": len(kl), "kl_mean": kl.mean().item(), "kl_median": kl.median().item(),
            "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(), "top1": agree.double().mean().item(),
            "ppl_reference": ppl_ref, "ppl": ppl, "ppl_ratio": ppl / ppl_ref}


def score(model, ref: dict) -> dict:
    """The model against a reference: {"text": summary, "chat": summary (when the reference has one)}."""
    seqs, images, firsts, parts = sequences(ref)
    per_part = {part: ([], [], [], []) for part in parts}   # KL, top-1 agreement, reference and own target lp
    at = 0
    for tokens, ims, part, (rows, target) in zip(seqs, images, parts, scored_positions(seqs, firsts)):
        lp = logprobs(model, tokens, ims)[rows]                                     # [p, V]
        ids, here = ref["top_ids"][at:at + len(rows)].long(), slice(at, at + len(rows))
        for found, value in zip(per_part[part], (coarse_kl(ref["top_logprobs"][here], lp.gather(1, ids)),
                                                 lp.argmax(-1) == ids[:, 0], ref["target_logprob"][here],
                                                 lp.gather(1, target[:, None])[:, 0])):
            found.append(value)
        at += len(rows)
    return {part: summary(*(torch.cat(v) for v in values)) for part, values in per_part.items()}


def print_report(results: dict, name: str, reference: str, file=sys.stdout):
    titles = {"text": "text", "chat": "image conversation"}
    cols = list(results)
    rows = [("positions scored", "positions", "{:.0f}"), ("KL divergence, mean", "kl_mean", "{:.6f}"),
            ("  median", "kl_median", "{:.6f}"), ("  99th percentile", "kl_p99", "{:.6f}"),
            ("  max", "kl_max", "{:.6f}"), ("top-1 agreement", "top1", "{:.2%}"),
            ("perplexity, reference", "ppl_reference", "{:.4f}"), ("perplexity, this model", "ppl", "{:.4f}"),
            ("perplexity ratio", "ppl_ratio", "{:.5f}")]
    print(f"{name} against {reference} (weight-quantization error alone)", file=file)
    print(f"{'':24}" + "".join(f"{titles[c]:>22}" for c in cols), file=file)
    for label, key, fmt in rows:
        print(f"{label:24}" + "".join(f"{fmt.format(results[c][key]):>22}" for c in cols), file=file)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["reference", "score"])
    add_model_flags(p, model=None, dtype="float32", compile=False, quant_math=False)
    p.add_argument("--text", help="reference: the text file to score")
    p.add_argument("--messages", help="reference: a conversation (OpenAI format, images allowed) ending with the "
                                      "assistant answer to score")
    p.add_argument("--context", type=int, help="reference: tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, help="reference: at most this many chunks")
    p.add_argument("--top-k", type=int, help="reference: top-k stored per position (default 64)")
    p.add_argument("--out", help="reference: the file to write")
    p.add_argument("--reference", help="score: the reference file")
    p.add_argument("--json", help="score: also write the results to this JSON file")
    args = p.parse_args(argv)
    other_mode = {"reference": ("reference", "json"), "score": ("text", "messages", "context", "chunks", "top_k",
                                                                 "out")}[args.mode]
    if given := [f"--{name.replace('_', '-')}" for name in other_mode if getattr(args, name) is not None]:
        p.error(f"{args.mode} does not take {', '.join(given)} (the other mode's)")
    if args.mode == "reference" and not (args.text and args.out):
        p.error("reference needs --text and --out")
    if args.mode == "score" and not args.reference:
        p.error("score needs --reference")
    context, top_k = args.context or 512, args.top_k or 64
    if context < 2 or top_k < 1 or args.chunks is not None and args.chunks < 1:
        p.error("--context must be at least 2, --top-k and --chunks at least 1")
    try:
        session = Session(args.model, args.device, args.dtype, tokenizer=args.tokenizer, mmproj=args.mmproj,
                          quant_math="exact")
        tokenizer, model_args = session.tokenizer, session.checkpoint.args
        if args.mode == "reference":
            ids = tokenizer.encode(read_text(args.text, what=f"--text {args.text}"))
            chunks = text_chunks(ids, tokenizer.bos_id, context, args.chunks)
            chat = conversation(tokenizer, read_json(Path(args.messages))) if args.messages else None
            ref = make_reference(session.load(), chunks, top_k, chat)
            save_reference(args.out, ref, {"model": args.model, "dtype": args.dtype, "top_k": str(top_k),
                                           "tokenizer": vocabulary_digest(tokenizer)})
            print(f"{args.out}: {len(ref['target_logprob'])} positions, {Path(args.out).stat().st_size / 1e6:.1f} MB")
        else:
            ref, about = load_reference(args.reference)
            check_fit(ref, about, model_args, tokenizer, session.checkpoint.vision is not None, args.reference)
            results = score(session.load(), ref)
            print_report(results, args.model, f"{about.get('model')} ({about.get('dtype')})")
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    except InputError as e:
        print(f"error: {as_flags(p, str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
