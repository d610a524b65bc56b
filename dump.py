"""The oracle's dump: what a run of the reference writes for another runtime to check itself against,
and the comparison of two dumps.

    python generate.py --temperature 0 --dump ours.safetensors "Hello"
    python dump.py compare ours.safetensors theirs.safetensors

A dump is one safetensors file (the format is in write_dump and the README); any runtime can write
one (from numpy: safetensors.numpy.save_file). This module knows nothing of the model or the command
line; its sibling compare_server.py checks a running server against the reference model.
"""
import argparse
import sys
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inputs import InputError

FORMAT = "mistral-small-reference-dump/1"


class Recorder:
    """Collects what --dump writes: logits of every position, optionally each block's hidden state."""

    def __init__(self, hidden: bool):
        self.logits: list[torch.Tensor] = []
        self.hidden: list | None = [] if hidden else None

    def add(self, logits: torch.Tensor, hidden: list | None):
        self.logits.append(logits[0].float().cpu())                                # [S, V]
        if self.hidden is not None:
            self.hidden.append([h[0].float().cpu() for h in hidden])                 # n_layers x [S, D]



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
    """The tensors of a dump; a file that is not one is an InputError naming it."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise InputError(f"{path}: no such dump file") from None
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors dump ({e})") from None
    missing = [key for key in ("prompt_ids", "generated_ids", "logits") if key not in tensors]
    if missing:
        raise InputError(f"{path}: not a dump, it lacks {missing}")
    return tensors


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
