"""CPU decoding speed of GGUF quants (dequantized on the fly) against the same model in bfloat16 and float32.

    python benchmarks/bench_gguf.py            # about 3 minutes on 2 cores

One random checkpoint of the real architecture's proportions, smaller (D 512, 4 layers, GQA 4:1,
head_dim 128 != D / H, vocabulary 32768, untied head), is written once as native float32 safetensors and
as Q8_0 and Q4_K GGUF files (the Q4_K blocks packed by tests/gguf_files.py). Each then decodes greedily
in this process, the same prompt and threads, the models taking turns (the best of 4 runs counts): tokens
per second after the first token, and the weight bandwidth that reaches (bytes one step reads x tokens
per second, generate.decode_bytes). A quantized step also dequantizes every matrix it reads, which is
what dominates on a CPU.
"""
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from checkpoints import write_native  # noqa: E402
from generate import Sampling, decode_bytes, stream  # noqa: E402
from gguf_files import write_text_gguf  # noqa: E402
from load import load_model  # noqa: E402

PARAMS = {"dim": 512, "n_layers": 4, "head_dim": 128, "hidden_dim": 2048, "n_heads": 8, "n_kv_heads": 2,
          "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 32768, "max_position_embeddings": 4096}
PROMPT, NEW_TOKENS, ROUNDS = 16, 24, 3


def decode_rate(model) -> float:
    """Tokens per second of greedy decoding, between the first token and the last."""
    prompt = torch.randint(1000, PARAMS["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    times = [time.perf_counter() for _ in stream(model, prompt, [], NEW_TOKENS, Sampling(0.0), set())]
    return (len(times) - 1) / (times[-1] - times[0])


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_native(tmp / "native", PARAMS)
        files = {"Q8_0": tmp / "q8_0.gguf", "Q4_K": tmp / "q4_k.gguf"}
        for types, path in files.items():
            write_text_gguf(path, weights, PARAMS, types)
        runs = {"native float32": (tmp / "native", torch.float32), "native bfloat16": (tmp / "native", torch.bfloat16),
                "GGUF Q8_0, float32 activations": (files["Q8_0"], torch.float32),
                "GGUF Q4_K, float32 activations": (files["Q4_K"], torch.float32),
                "GGUF Q4_K, bfloat16 activations": (files["Q4_K"], torch.bfloat16)}
        models = {name: load_model(path, dtype=dtype) for name, (path, dtype) in runs.items()}
        # The machine is shared: the models take turns, ROUNDS times, and the best run of each counts.
        best = {name: max(decode_rate(model) for _ in range(2)) for name, model in models.items()}
        for _ in range(ROUNDS - 1):
            best = {name: max(best[name], decode_rate(model)) for name, model in models.items()}
        print(f"{torch.get_num_threads()} threads, model D {PARAMS['dim']}, {PARAMS['n_layers']} layers, "
              f"vocabulary {PARAMS['vocab_size']}; {NEW_TOKENS} new tokens after {PROMPT}, best of {ROUNDS + 1} runs")
        print(f"{'':34}{'weights read/token':>20}{'decode tok/s':>14}{'GB/s':>8}")
        for name, model in models.items():
            size = decode_bytes(model)
            print(f"{name:34}{size / 1e6:>17.1f} MB{best[name]:>14.1f}{size * best[name] / 1e9:>8.2f}")


if __name__ == "__main__":
    main()
