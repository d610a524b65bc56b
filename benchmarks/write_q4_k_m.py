"""Write a GGUF of the real Mistral Small 3.x text shapes with random Q4_K_M blocks, for bench_gguf.py --file.

    python benchmarks/write_q4_k_m.py DIR/random-Q4_K_M.gguf      # 13.6 GB outside the repository, a few minutes
    python benchmarks/write_q4_k_m.py --llama-recipe DIR/llama-Q4_K_M.gguf    # 14.3 GB

40 layers, dim 5120, 32 query heads and 8 key/value heads of 128, hidden 32768, vocabulary 131072: every
matrix Q4_K but the embedding table and the output head, Q6_K, as in llama.cpp's Q4_K_M (which also gives
some layers' attn_v and ffn_down Q6_K). --llama-recipe: llama.cpp's own recipe instead (Q6_K head, attn_v
and ffn_down of 20 layers, Q4_K embedding: tests/gguf_files.llama_q4_k_m), the mix of the community's
Q4_K_M files. The blocks are random with small scales: speed and memory are
those of a real file, the outputs are noise. Written one tensor at a time (tests/gguf_files.py), never
held whole in memory; not a file to commit.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from checkpoints import REAL_PARAMS  # noqa: E402
from gguf_files import llama_q4_k_m, q4_k_m, write_random_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--llama-recipe", action="store_true", help="llama.cpp's own Q4_K_M mix of Q4_K and Q6_K")
    args = p.parse_args(argv)
    params = {key: value for key, value in REAL_PARAMS.items() if key != "vision_encoder"}
    write_random_gguf(args.out, params, llama_q4_k_m(params["n_layers"]) if args.llama_recipe else q4_k_m)
    print(f"{args.out}: {Path(args.out).stat().st_size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
