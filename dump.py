"""The oracle's dump: what a run of the reference writes for another runtime to check itself against,
and the comparison of two dumps.

    python generate.py --temperature 0 --dump ours.safetensors "Hello"
    python dump.py compare ours.safetensors theirs.safetensors

A dump is one safetensors file (the format is in write_dump and the README); any runtime can write
one (from numpy: safetensors.numpy.save_file). This module knows nothing of the model or the command
line; its sibling compare_server.py checks a running server against the reference model.
"""
import argparse
import re
import sys
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from inputs import InputError, regular_file

FORMAT = "mistral-small-reference-dump/1"


class Recorder:
    """Collects what --dump writes: logits of every position, optionally each block's hidden state."""

    def __init__(self, hidden: bool):
        self.logits: list[torch.Tensor] = []
        self.hidden: list | None = [] if hidden else None

    def add(self, logits: torch.Tensor, hidden: list | None):
        """logits [n, V] and hidden n_layers x [n, D] of the n positions one step ran."""
        self.logits.append(logits.float().cpu())
        if self.hidden is not None:
            self.hidden.append([h.float().cpu() for h in hidden])



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
              metadata={"format": FORMAT, **(metadata or {})})


def read_dump(path) -> dict[str, torch.Tensor]:
    """The tensors of a dump, checked against the format (write_dump): a file that is not a valid
    dump is an InputError naming it and the tensor, so that a comparison never passes on one."""
    regular_file(path, f"dump {path}")   # a FIFO or a device is refused, never opened
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors dump ({e})") from None
    if metadata.get("format", FORMAT) != FORMAT:
        raise InputError(f"{path}: metadata format is {metadata['format']!r:.60}, expected {FORMAT!r}")
    missing = [key for key in ("prompt_ids", "generated_ids", "logits") if key not in tensors]
    if missing:
        raise InputError(f"{path}: not a dump, it lacks {missing}")
    check_dump(tensors, str(path))
    return tensors


def check_dump(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Ranks, dtypes, sizes and values of a dump's tensors (the table in the README)."""
    def expect(key: str, dtype: torch.dtype, ndim: int, what: str):
        t = tensors[key]
        if t.dtype != dtype or t.ndim != ndim:
            raise InputError(f"{where}: {key} must be {str(dtype).removeprefix('torch.')} {what}, got "
                             f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
        return t

    prompt, generated = expect("prompt_ids", torch.int64, 1, "[S]"), expect("generated_ids", torch.int64, 1, "[N]")
    logits = expect("logits", torch.float32, 2, "[S + N - 1, V]")
    rows = len(prompt) + len(generated) - 1
    if len(prompt) == 0:
        raise InputError(f"{where}: prompt_ids is empty; a dump starts with at least one prompt token")
    if len(logits) != rows or logits.shape[1] == 0:
        raise InputError(f"{where}: logits has {len(logits)} rows for {len(prompt)} prompt and {len(generated)} "
                         f"generated ids: expected S + N - 1 = {rows} (a row per position), V >= 1")
    ids = torch.cat([prompt, generated])
    if len(ids) and (ids.min() < 0 or ids.max() >= logits.shape[1]):
        raise InputError(f"{where}: token id {int(ids[(ids < 0) | (ids >= logits.shape[1])][0])} is outside the "
                         f"vocabulary of the logits (V = {logits.shape[1]})")
    hidden = sorted(int(m.group(1)) for key in tensors if (m := re.fullmatch(r"hidden\.(\d+)", key)))
    if hidden != list(range(len(hidden))):
        raise InputError(f"{where}: the hidden states are {[f'hidden.{i}' for i in hidden]}: expected hidden.0, "
                         f"hidden.1, ... (one per block, from the first, without a gap)")
    unknown = sorted(set(tensors) - {"prompt_ids", "generated_ids", "logits", "vision_features"}
                     - {f"hidden.{i}" for i in hidden})
    if unknown:
        raise InputError(f"{where}: unknown tensor(s) {unknown}; a dump holds prompt_ids, generated_ids, "
                         f"logits, hidden.{{i}} and vision_features")
    for key in [f"hidden.{i}" for i in hidden] + (["vision_features"] if "vision_features" in tensors else []):
        t = expect(key, torch.float32, 2, "[rows, D]")
        if key.startswith("hidden.") and len(t) != rows:
            raise InputError(f"{where}: {key} has {len(t)} rows, expected {rows} (as logits)")
    for key in ["logits"] + [key for key in tensors if key.startswith("hidden.") or key == "vision_features"]:
        finite = torch.isfinite(tensors[key])
        if not finite.all():
            row, col = (~finite).nonzero()[0].tolist()
            raise InputError(f"{where}: {key} holds a non-finite value ({tensors[key][row, col].item()}) at "
                             f"row {row}, column {col}")


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
    a, b = read_dump(path_a), read_dump(path_b)
    if a["logits"].shape[1] != b["logits"].shape[1]:
        raise InputError(f"{path_a} and {path_b} have different vocabularies: logits of {a['logits'].shape[1]} "
                         f"and {b['logits'].shape[1]} columns")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compare", help="compare two dumps position by position; exit 1 where the "
                                            "argmax or the tokens differ")
    c.add_argument("a", help="a dump (.safetensors), e.g. the reference's")
    c.add_argument("b", help="another dump of the same tokens")
    args = p.parse_args(argv)
    try:
        result = compare(args.a, args.b)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_comparison(result)
    return 0 if result.first_argmax_diff is None and result.first_token_diff is None else 1


if __name__ == "__main__":
    sys.exit(main())
