"""GGUF on the CPU: the fast path (quants.py) against the exact one, bfloat16, and llama.cpp on the same file.

    python benchmarks/bench_gguf.py                    # tiny files, one per type: about 5 minutes on 2 cores
    python benchmarks/bench_gguf.py --file DIR/random-Q4_K_M.gguf --llama-bench PATH/llama-bench

Tiny files (default): one random checkpoint of the real architecture's proportions, smaller (D 512, 4
layers, GQA 4:1, head_dim 128 != D / H, vocabulary 32768, untied head), written as native float32
safetensors and as one GGUF per type, every matrix of that type (tests/gguf_files.py's quantizers). Each
GGUF loads twice, --quant-math exact and fast, and every model decodes greedily in this process, the same
prompt and threads, the models taking turns (the best run counts): tokens per second after the first
token, and the weight bytes one step reads x tokens per second (generate.decode_bytes). Beside the
speeds, fast against exact on the same 64 teacher-forced positions: the largest logit difference, beside
the exact path's own distance to the float32 checkpoint (the quantization error), and top-1 agreement.

--file: one GGUF (benchmarks/write_q4_k_m.py writes one of the real shapes), measured by the project in
a fresh process (load time, peak resident memory against the file and the KV cache, prefill and decode)
and then by llama.cpp's llama-bench on the same file, prompt and threads (`--repack 0`: llama.cpp's
plain Q4_K kernels, no AMX repacking, which crashes on multi-token batches on this CPU), and the ratio.
--profile adds the project's decoding step under torch.profiler: where its time goes.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from checkpoints import write_native  # noqa: E402
from generate import Sampling, decode_bytes, decode_step, stream  # noqa: E402
from gguf_files import write_text_gguf  # noqa: E402
from load import load_model  # noqa: E402

PARAMS = {"dim": 512, "n_layers": 4, "head_dim": 128, "hidden_dim": 2048, "n_heads": 8, "n_kv_heads": 2,
          "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 32768, "max_position_embeddings": 4096}
TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_K", "Q6_K")
PROMPT, NEW_TOKENS, POSITIONS = 16, 24, 64


def decode_rate(model, vocab: int, prompt: int = PROMPT, new: int = NEW_TOKENS) -> tuple[float, float]:
    """(prefill tokens per second, decode tokens per second between the first token and the last) of a
    greedy answer to `prompt` random tokens."""
    ids = torch.randint(1000, vocab, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    times, stats = [], None
    for step in stream(model, ids, [], new, Sampling(0.0), set()):
        times.append(time.perf_counter())
        stats = step.stats
    return prompt / stats.prefill_s, (len(times) - 1) / (times[-1] - times[0])


@torch.inference_mode()
def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[None])[0].float()


def tiny(threads: int, rounds: int):
    torch.manual_seed(0)
    tokens = torch.randint(0, PARAMS["vocab_size"], (POSITIONS,), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_native(tmp / "native", PARAMS)
        runs = {"native bfloat16": (tmp / "native", torch.bfloat16, "exact"),
                "native float32": (tmp / "native", torch.float32, "exact")}
        for name in TYPES:
            write_text_gguf(tmp / f"{name}.gguf", weights, PARAMS, name)
            runs.update({f"{name} exact": (tmp / f"{name}.gguf", torch.float32, "exact"),
                         f"{name} fast": (tmp / f"{name}.gguf", torch.float32, "fast")})
        models = {run: load_model(path, dtype=dtype, quant_math=math) for run, (path, dtype, math) in runs.items()}
        out = {run: logits(model, tokens) for run, model in models.items()}
        # The machine is shared: the models take turns, --rounds times, and the best run of each counts.
        best = {run: 0.0 for run in models}
        for _ in range(rounds):
            for run, model in models.items():
                best[run] = max(best[run], decode_rate(model, PARAMS["vocab_size"])[1])
    print(f"{threads} threads, load average {os.getloadavg()[0]:.1f}; model D {PARAMS['dim']}, {PARAMS['n_layers']} "
          f"layers, vocabulary {PARAMS['vocab_size']}; {NEW_TOKENS} new tokens after {PROMPT}, best of {rounds} runs; "
          f"logits over {POSITIONS} positions\n")
    print("| model | weights read/token, MB | decode tok/s | GB/s | vs bf16 | fast vs exact: max logit diff "
          "| exact vs float32 | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    bf16 = best["native bfloat16"]
    for run, model in models.items():
        size = decode_bytes(model)
        cells = [f"{size / 1e6:.1f}", f"{best[run]:.1f}", f"{size * best[run] / 1e9:.2f}", f"{best[run] / bf16:.2f}"]
        if run.endswith(" fast"):
            exact = out[run.replace(" fast", " exact")]
            diff = (out[run] - exact).abs().max().item()
            quantization = (exact - out["native float32"]).abs().max().item()
            agree = (out[run].argmax(-1) == exact.argmax(-1)).float().mean().item()
            cells += [f"{diff:.2e}", f"{quantization:.2e}", f"{agree:.1%}"]
        else:
            cells += ["", "", ""]
        print(f"| {run} | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- one real-shape file

def status(key: str) -> int:
    """A /proc/self/status figure (VmHWM: the peak resident set; VmRSS: the present one), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1]) * 1024


def ours(path: str, prompt: int, new: int, quant_math: str, profile: bool) -> dict:
    """The project on one file, in this (fresh) process: figures as a dict."""
    start = time.perf_counter()
    model = load_model(path, quant_math=quant_math)
    load_s = time.perf_counter() - start
    loaded, load_peak = status("VmRSS"), status("VmHWM")
    decode_rate(model, model.args.vocab_size, 4, 3)   # a first answer compiles what the fast path compiles
    prefill_rate, decode = decode_rate(model, model.args.vocab_size, prompt, new)
    cache = [b for name, b in model.named_buffers() if name.endswith(("cache.k", "cache.v"))]
    result = {"load_s": load_s, "loaded_rss": loaded, "load_peak": load_peak, "peak_rss": status("VmHWM"),
              "prefill": prefill_rate,
              "decode": decode, "kv_bytes": sum(b.numel() * b.element_size() for b in cache),
              "weight_bytes": decode_bytes(model)}
    if profile:
        token, pos = torch.tensor([[1]]), torch.tensor([prompt])
        with torch.inference_mode(), torch.profiler.profile() as prof:
            for i in range(3):
                decode_step(model, token, pos + i, kv_len=prompt + i + 1)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return result


def run_child(command: list[str]) -> tuple[str, int]:
    """Run a command to its end: (its standard output, its peak resident set in bytes, from the kernel)."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        out = child.stdout.read()
        _, code, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(code)
    if child.returncode:
        raise SystemExit(f"{command[0]} failed ({child.returncode})")
    return out, usage.ru_maxrss * 1024


def llama_bench(binary: str, path: str, threads: int, prompt: int, new: int, repetitions: int) -> tuple[dict, int]:
    """llama-bench's prefill (-p) and decode (-n) tokens per second on the file, and its peak memory."""
    out, peak = run_child([binary, "-m", path, "-t", str(threads), "--repack", "0", "-p", str(prompt),
                           "-n", str(new), "-r", str(repetitions), "-o", "json"])
    rates = {}
    for test in json.loads(out):
        rates["prefill" if test["n_prompt"] else "decode"] = test["avg_ts"]
    return rates, peak


def compare(args):
    size = Path(args.file).stat().st_size
    load_before = os.getloadavg()
    me = [sys.executable, __file__, "--ours", args.file, "--threads", str(args.threads), "--prompt", str(args.prompt),
          "--new", str(args.new), "--quant-math", args.quant_math] + (["--profile"] if args.profile else [])
    out, _ = run_child(me)
    result = json.loads(out)
    peer, peer_peak = (llama_bench(args.llama_bench, args.file, args.threads, args.prompt, args.new, args.repetitions)
                       if args.llama_bench else ({}, 0))
    load_after = os.getloadavg()
    print(f"{args.file}: {size / 1e9:.2f} GB; {args.threads} threads; load average (1, 5, 15 min) before "
          f"{', '.join(f'{x:.1f}' for x in load_before)}, after {', '.join(f'{x:.1f}' for x in load_after)}; "
          f"quant_math {args.quant_math}\n")
    print("| figure | ours | llama.cpp (--repack 0) | ours / llama.cpp |")
    print("|---|---|---|---|")
    for key, label in (("prefill", f"prefill {args.prompt} tokens, tok/s"),
                       ("decode", f"decode {args.new} tokens, tok/s")):
        theirs = peer.get(key)
        ratio = f"{result[key] / theirs:.2f}" if theirs else ""
        print(f"| {label} | {result[key]:.3f} | {theirs or 0:.3f} | {ratio} |")
    kv = result["kv_bytes"]
    print(f"| peak resident memory, GB | {result['peak_rss'] / 1e9:.2f} ({result['peak_rss'] / (size + kv):.3f} x "
          f"file + KV cache {kv / 1e9:.3f} GB) | {peer_peak / 1e9:.2f} | |")
    print(f"| resident after loading (peak while loading), GB | {result['loaded_rss'] / 1e9:.2f} "
          f"({result['load_peak'] / 1e9:.2f}) | | |")
    print(f"| load time, s | {result['load_s']:.1f} | | |")
    print(f"| weights read per token, GB | {result['weight_bytes'] / 1e9:.2f} | | |")
    if "profile" in result:
        print("\nThe project's decoding step (3 steps) under torch.profiler:\n")
        print(result["profile"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", help="a GGUF to measure against llama.cpp (see write_q4_k_m.py)")
    p.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (with --file)")
    p.add_argument("--threads", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="tiny files: rounds of runs, the models taking turns, the "
                                                         "best run of each counting (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=64, help="--file: prompt tokens (default: %(default)s)")
    p.add_argument("--new", type=int, default=16, help="--file: decoded tokens (default: %(default)s)")
    p.add_argument("--repetitions", type=int, default=2, help="--file: llama-bench's -r (default: %(default)s)")
    p.add_argument("--quant-math", default="fast", choices=("fast", "exact"), help="--file: ours (default: fast)")
    p.add_argument("--profile", action="store_true", help="--file: profile our decoding step")
    p.add_argument("--ours", help=argparse.SUPPRESS)   # the child process that measures the project
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected 1 or more")
    torch.set_num_threads(args.threads)
    if args.ours:
        print(json.dumps(ours(args.ours, args.prompt, args.new, args.quant_math, args.profile)))
    elif args.file:
        compare(args)
    else:
        tiny(args.threads, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
