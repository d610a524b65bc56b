"""Speed and memory of this implementation against transformers on the same random weights, on CPU.

    python benchmarks/bench_model.py             # 0.5 B and 30 M, float32 and bfloat16 (about 12 minutes, 2 cores)
    python benchmarks/bench_model.py --quick     # the 30 M model only (about 2 minutes)

Two random checkpoints of the real architecture (GQA 4:1, head_dim 128 != dim / n_heads, vocabulary
131072, untied head, a Pixtral tower of 64-wide heads merging 2 x 2 patches; fewer and narrower layers)
are written once to a temporary folder, in the native layout for us and in the Hugging Face layout
for transformers' Mistral3ForConditionalGeneration. Each (model, dtype, side) then runs in a fresh
process, so that load time and peak memory are clean:
    load          load_model / from_pretrained, files in the page cache, imports done before; peak
                  memory: the growth of the process's peak resident set (VmHWM) over its size before
                  loading, through the load and a first 1-token answer (so lazily mapped weights count)
    prefill       a 512-token prompt to its first token: tokens per second
    decode        greedy, 128 new tokens after a 16-token prompt, timed as they arrive (our stream,
                  transformers' streamer): (128 - 1) / (time of the last - time of the first); also ours
                  with compile=True (generate.py --compile), compile time apart. Ours with the KV cache
                  of a default answer (prompt + 4096 positions, generate.py's --max-tokens), stopped
                  after the 128th token; transformers' cache grows with the tokens
    TTFT image    a prompt with one 1000 x 700 image (25 x 36 image tokens) to its first token, from
                  normalized pixels (preprocessing, the same for both, is not timed)
Then the speeds are measured again (--rounds), the two sides taking turns, and the best run counts.
Ours is generate.stream (greedy); theirs model.generate(do_sample=False). Same weights, dtype and
threads. The machine's memory bandwidth is measured in the same run (a 1 GiB float32
matrix-vector product), and decode is read against it: weight bytes read per token x tokens per second.
So is what a decoding step's own matrix-vector products reach alone (step_bandwidth).
"""
import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 131072
TEXT = {"head_dim": 128, "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": VOCAB, "max_position_embeddings": 131072}
TOWER = {"num_channels": 3, "image_size": 1540, "max_image_size": 1540, "patch_size": 14, "rope_theta": 10000.0,
         "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
         "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}
MODELS = {
    # The real tower's width (1024, 16 heads of 64), 2 of its 24 layers.
    "0.5B": {**TEXT, "dim": 1024, "n_layers": 12, "hidden_dim": 4096, "n_heads": 16, "n_kv_heads": 4,
             "vision_encoder": {**TOWER, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2,
                                "num_attention_heads": 16}},
    # Nearly all embeddings and output head: per-token overhead dominates.
    "30M": {**TEXT, "dim": 128, "n_layers": 6, "hidden_dim": 512, "n_heads": 4, "n_kv_heads": 1,
            "vision_encoder": {**TOWER, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                               "num_attention_heads": 4}},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFILL_TOKENS, DECODE_TOKENS, DECODE_PROMPT = 512, 128, 16
DEFAULT_MAX_TOKENS = 4096   # generate.py's default --max-tokens: the cache a user's answer gets
IMAGE_SIZE = (1000, 700)   # width, height: 25 rows x 36 columns of image tokens


# ----------------------------------------------------------------------------- checkpoints

def write_checkpoints(folder: Path, name: str, dtypes: list[str]) -> None:
    """folder/{name}-{dtype}/native and .../hf: the same random weights in both layouts."""
    from checkpoints import (hf_mistral3_config, native_to_hf_mistral3, random_weights, real_text_shapes,
                             real_vision_shapes)
    params = MODELS[name]
    weights = random_weights({**real_text_shapes(params), **real_vision_shapes(params)}, seed=0)
    hf_weights = native_to_hf_mistral3(weights, params)
    for dtype in dtypes:
        native, hf = folder / f"{name}-{dtype}" / "native", folder / f"{name}-{dtype}" / "hf"
        native.mkdir(parents=True)
        hf.mkdir(parents=True)
        (native / "params.json").write_text(json.dumps(params, indent=2))
        save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in weights.items()},
                  native / "consolidated.safetensors")
        config = hf_mistral3_config(params)
        config.dtype = dtype
        config.save_pretrained(hf)
        save_file({k: v.to(DTYPES[dtype]).contiguous() for k, v in hf_weights.items()}, hf / "model.safetensors",
                  metadata={"format": "pt"})


def parameter_counts(params: dict) -> tuple[int, int]:
    """(all parameters, text weights read per decoded token: all but the embedding table)."""
    from checkpoints import real_text_shapes, real_vision_shapes
    shapes = {**real_text_shapes(params), **real_vision_shapes(params)}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    text = sum(torch.Size(s).numel() for s in real_text_shapes(params).values())
    return total, text - params["vocab_size"] * params["dim"]


def memory_bandwidth(n: int = 16384, repeats: int = 10) -> float:
    """GB/s of a float32 matrix-vector product on an n x n matrix (1 GiB): what decode can reach."""
    w, x = torch.randn(n, n), torch.randn(n)
    torch.mv(w, x)
    best = min(_timed(lambda: torch.mv(w, x))[0] for _ in range(repeats))
    return w.numel() * 4 / best / 1e9


def step_bandwidth(params: dict, repeats: int = 5) -> float:
    """GB/s of the matrix-vector products of one float32 decoding step alone: every text weight but the
    embedding table, laid out as load_model holds it, times one vector, in the model's order. Smaller
    matrices stream less well than the 1 GiB one: this is what a decoding step could reach here."""
    import torch.nn.functional as F
    from checkpoints import real_text_shapes
    from load import _column_major
    device = torch.device("cpu")
    weights = []
    for name, shape in real_text_shapes(params).items():
        if len(shape) == 2 and name != "tok_embeddings.weight":
            column_major = _column_major(name, shape, torch.float32, device)
            w = torch.randn(shape[::-1]).t() if column_major else torch.randn(shape)
            weights.append((w, torch.randn(1, 1, shape[1])))
    best = min(_timed(lambda: [F.linear(x, w) for w, x in weights])[0] for _ in range(repeats))
    return sum(w.numel() * 4 for w, _ in weights) / best / 1e9


# ----------------------------------------------------------------------------- one implementation, one process

def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _memory_gb(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_memory() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # Linux: VmHWM starts again from VmRSS


def _prompts(params: dict):
    from checkpoints import IMG_END, image_tokens
    from images import image_grid, preprocess_image
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1000, params["vocab_size"], (PREFILL_TOKENS,), generator=g).tolist()
    rows, cols = image_grid(*IMAGE_SIZE)
    image = Image.fromarray(torch.randint(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), generator=g,
                                          dtype=torch.uint8).numpy())
    with_image = [1, 3] + image_tokens(rows, cols) + text[:24] + [4]
    assert with_image.count(IMG_END) == 1
    tiny = [1, 3] + image_tokens(2, 2) + text[:4] + [4]
    return text, with_image, preprocess_image(image), tiny


class Clock:
    """When each new token arrives: called by our loop over the stream, and transformers' streamer
    interface (whose first put() is the prompt)."""

    def __init__(self, skip_first: bool = False):
        self.times, self.skip = [], skip_first

    def __call__(self, token):
        self.times.append(time.perf_counter())

    def put(self, value):
        if not self.skip:
            self.times.append(time.perf_counter())
        self.skip = False

    def end(self):
        pass

    def tokens_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _ours(folder: Path, dtype):
    from generate import Sampling, stream
    from load import load_model
    model = load_model(folder / "native", dtype=dtype)

    def run(prompt, images, n, clock=None, compile=False, max_tokens=None):
        # max_tokens: the cache's room (prompt + max_tokens positions); the clock stops the answer at n
        images = [im.to(dtype) for im in images]
        out = []
        for step in stream(model, prompt, images, max_tokens or n, Sampling(temperature=0.0), stop_ids=set(),
                           compile=compile):
            out.append(step.token)
            if clock is not None:
                clock(step.token)
            if len(out) == n:
                break
        return out
    return run


def _theirs(folder: Path, dtype):
    from transformers import Mistral3ForConditionalGeneration
    model = Mistral3ForConditionalGeneration.from_pretrained(folder / "hf", dtype=dtype).eval()
    model.generation_config.eos_token_id = None      # random weights: never stop early
    model.generation_config.pad_token_id = 11

    @torch.inference_mode()
    def run(prompt, images, n, clock=None):
        kwargs = {}
        if images:
            kwargs = {"pixel_values": torch.stack(images).to(dtype),
                      "image_sizes": torch.tensor([list(im.shape[1:]) for im in images])}
        if clock is not None:
            clock.skip = True
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, streamer=clock, **kwargs)
        return out[0, len(prompt):].tolist()
    return run


def worker(impl: str, folder: Path, name: str, dtype_name: str, threads: int, repeats: int,
           again: bool = False) -> dict:
    """The figures of one side in this process; again: the speeds only (no compiling)."""
    torch.set_num_threads(threads)
    dtype, params = DTYPES[dtype_name], MODELS[name]
    text, with_image, pixels, tiny = _prompts(params)
    # Imports are not loading: import what each side needs first (the first nn.Module built on the
    # meta device imports torch._dynamo, for either side).
    for module in ["torch._dynamo", "generate", "load"] + (["transformers"] if impl == "theirs" else []):
        importlib.import_module(module)
    _reset_peak_memory()
    before = _memory_gb("VmRSS")
    load_s, run = _timed(lambda: (_ours if impl == "ours" else _theirs)(folder / f"{name}-{dtype_name}", dtype))
    # Weights may be mapped lazily: the peak counts through a first 1-token answer, when all are read.
    run(text[:DECODE_PROMPT], [], 1)
    out = {"load_s": load_s, "load_gb": _memory_gb("VmHWM") - before}

    def decode(**kwargs) -> float:
        clock = Clock()
        if impl == "ours":
            kwargs["max_tokens"] = DEFAULT_MAX_TOKENS
        out["ids"] = run(text[:DECODE_PROMPT], [], DECODE_TOKENS, clock, **kwargs)
        return clock.tokens_per_second()
    out["decode_tps"] = max(decode() for _ in range(repeats + 1))
    run(tiny, [pixels[:, :56, :56]], 4)                                            # warm-up, every path
    out["prefill_tps"] = PREFILL_TOKENS / min(_timed(lambda: run(text, [], 1))[0] for _ in range(repeats))
    out["ttft_s"] = min(_timed(lambda: run(with_image, [pixels], 1))[0] for _ in range(repeats))
    if impl == "ours" and not again:
        out["compile_s"] = _timed(lambda: decode(compile=True))[0]                    # compiles the step
        out["decode_compiled_tps"] = max(decode(compile=True) for _ in range(repeats))
    return out


def run_worker(impl, folder, name, dtype, threads, repeats, again=False) -> dict:
    # Read the checkpoint into the page cache first, so that both loads read from memory.
    for f in (folder / f"{name}-{dtype}").rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    cmd = [sys.executable, __file__, "--worker", json.dumps([impl, str(folder), name, dtype, threads, repeats, again])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {name} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the table

def table(results: dict, sizes: dict, bandwidth: float) -> str:
    """One row per figure; 'gain' > 1 means ours is better (faster, or smaller)."""
    lines = ["| model | dtype | figure | ours | transformers | gain |", "|---|---|---|---|---|---|"]
    for (name, dtype), r in results.items():
        ours, theirs = r["ours"], r["theirs"]
        total, read = parameter_counts(MODELS[name])
        per_token = read * torch.finfo(DTYPES[dtype]).bits / 8 / 1e9                   # GB of weights
        size = sizes[name, dtype]
        same = next((i for i, (a, b) in enumerate(zip(ours["ids"], theirs["ids"])) if a != b), len(ours["ids"]))
        rows = [
            ("load time, s", ours["load_s"], theirs["load_s"], "{:.2f}", False),
            (f"peak memory, load + 1st token, GB (file {size:.2f} GB)", ours["load_gb"], theirs["load_gb"],
             "{:.2f}", False),
            (f"prefill {PREFILL_TOKENS} tokens, tok/s", ours["prefill_tps"], theirs["prefill_tps"], "{:.0f}", True),
            (f"decode {DECODE_TOKENS} tokens, tok/s (same greedy ids: first {same})", ours["decode_tps"],
             theirs["decode_tps"], "{:.1f}", True),
            (f"decode, weight reads GB/s ({per_token:.2f} GB/token; bandwidth {bandwidth:.1f})",
             ours["decode_tps"] * per_token, theirs["decode_tps"] * per_token, "{:.1f}", True),
            (f"decode with compile=True, tok/s (compiled in {ours['compile_s']:.0f} s)",
             ours["decode_compiled_tps"], theirs["decode_tps"], "{:.1f}", True),
            ("time to first token, 1000 x 700 image, s", ours["ttft_s"], theirs["ttft_s"], "{:.2f}", False),
        ]
        label = f"{name} ({total / 1e6:.0f} M)"
        for title, a, b, fmt, higher in rows:
            if "weight reads" in title:
                a_text = f"{a:.1f} ({100 * a / bandwidth:.0f} %)"
                b_text = f"{b:.1f} ({100 * b / bandwidth:.0f} %)"
            else:
                a_text, b_text = fmt.format(a), fmt.format(b)
            gain = a / b if higher else b / a
            lines.append(f"| {label} | {dtype} | {title} | {a_text} | {b_text} | {gain:.2f} |")
            label = ""
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import transformers
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 30 M model only")
    p.add_argument("--models", default=None, help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own count, one per core)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure the speeds again this many times, the two sides taking turns (default 1)")
    p.add_argument("--folder", help="keep the checkpoints here (reused when present) instead of a temporary one")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, folder, *rest = json.loads(args.worker)
        print(json.dumps(worker(impl, Path(folder), *rest)))
        return
    names = args.models.split(",") if args.models else (["30M"] if args.quick else ["0.5B", "30M"])
    dtypes = args.dtypes.split(",")
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        for name in names:
            if not all((folder / f"{name}-{d}").exists() for d in dtypes):
                print(f"writing the {name} checkpoints ...", file=sys.stderr)
                write_checkpoints(folder, name, [d for d in dtypes if not (folder / f"{name}-{d}").exists()])
        bandwidth = [memory_bandwidth()]
        results, sizes, ceiling = {}, {}, {}
        for name in names:
            repeats = 1 if name == "0.5B" else 3
            for dtype in dtypes:
                print(f"running {name} {dtype} ...", file=sys.stderr)
                r = results[name, dtype] = {impl: run_worker(impl, folder, name, dtype, args.threads, repeats)
                                            for impl in ("ours", "theirs")}
                # The speeds again, the two sides taking turns, the best run counting: other load on the
                # shared machine comes and goes.
                for _ in range(args.rounds):
                    for impl in ("ours", "theirs"):
                        again = run_worker(impl, folder, name, dtype, args.threads, repeats, again=True)
                        for key in ("decode_tps", "prefill_tps"):
                            r[impl][key] = max(r[impl][key], again[key])
                        r[impl]["ttft_s"] = min(r[impl]["ttft_s"], again["ttft_s"])
                native = folder / f"{name}-{dtype}" / "native" / "consolidated.safetensors"
                sizes[name, dtype] = native.stat().st_size / 1e9
                bandwidth.append(memory_bandwidth())
                ceiling[name] = max(ceiling.get(name, 0.0), step_bandwidth(MODELS[name]))
        print(f"\n{machine()}; memory bandwidth: float32 matrix-vector product on 1 GiB, best of "
              f"{len(bandwidth)} measurements between the runs: {max(bandwidth):.1f} GB/s")
        for name, gbs in ceiling.items():
            print(f"{name}: the matrix-vector products of a float32 decoding step alone: {gbs:.1f} GB/s "
                  f"({100 * gbs / max(bandwidth):.0f} % of the bandwidth)")
        print()
        print(table(results, sizes, max(bandwidth)))


if __name__ == "__main__":
    main()
