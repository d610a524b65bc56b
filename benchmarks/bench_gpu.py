"""Speed of this implementation against transformers on the real 24 B configuration, on one GPU.

    python benchmarks/bench_gpu.py             # one H100 (80 GB): about 5 minutes
    python benchmarks/bench_gpu.py --small     # the same steps on a 30 M model, on any device: checks the script

Random bfloat16 weights of the real architecture (Mistral Small 3.x: 40 layers, vision tower included,
48 GB) are created on the GPU, measured with our code, then handed to transformers'
Mistral3ForConditionalGeneration (the same tensors, rotary rows permuted as the official conversion
does; the two never hold 48 GB each at once). Figures:
    decode        greedy, batch 1, 128 new tokens after a 16-token prompt: (N - 1) / (time of token N
                  - time of token 1); ours eager and with compile=True (generate.py --compile: one CUDA
                  graph per step), theirs model.generate(do_sample=False) as it comes
    bandwidth     weight bytes read per token (every text weight but the embedding table) x tokens per
                  second, against a device-to-device copy measured in the same run (read + write)
    prefill       a 4096-token prompt to its first token
    vision        one 1540 x 1540 image through the tower, patch merger and adapter
Each line is printed as soon as it is measured, so that a run cut short still says what it found.
"""
import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from checkpoints import REAL_PARAMS, hf_mistral3_config, native_to_hf_mistral3  # noqa: E402
from generate import Sampling, generate, stream  # noqa: E402
from config import parse_params  # noqa: E402
from load import build_model  # noqa: E402
from model import Transformer  # noqa: E402

SMALL_PARAMS = {**REAL_PARAMS, "dim": 128, "n_layers": 6, "hidden_dim": 512, "n_heads": 4, "n_kv_heads": 1,
                "vision_encoder": {**REAL_PARAMS["vision_encoder"], "hidden_size": 256, "intermediate_size": 1024,
                                   "num_hidden_layers": 2, "num_attention_heads": 4}}
DTYPE = torch.bfloat16
DECODE_PROMPT, DECODE_TOKENS, PREFILL_TOKENS, IMAGE_SIDE = 16, 128, 4096, 1540
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {text}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


class Clock:
    """When each token arrives: called by our loop over the stream, and transformers' streamer interface (whose
    first put() is the prompt, not a token)."""

    def __init__(self, skip_first: bool = False):
        self.times, self.skip = [], skip_first

    def __call__(self, token):
        self.times.append(time.perf_counter())

    def put(self, value):
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def tokens_per_second(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def copy_bandwidth(device, n_bytes: int) -> float:
    """GB/s of a device-to-device copy, counting what is read and what is written."""
    a = torch.empty(n_bytes // 2, dtype=DTYPE, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    seconds = best_time(lambda: b.copy_(a), device, repeats=10)
    return 2 * a.numel() * a.element_size() / seconds / 1e9


def random_model(params: dict, device) -> Transformer:
    """Our model with random weights made on the device (unit-scale activations, as in the tests)."""
    with torch.device("meta"):
        model = build_model(*parse_params(params))
    g = torch.Generator(device).manual_seed(0)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=DTYPE, device=device)
        if p.dim() == 1:
            state[name] = t.normal_(1.0, 0.2, generator=g)
        else:
            state[name] = t.normal_(0.0, (p.numel() // p.shape[0]) ** -0.5, generator=g)
    model.load_state_dict(state, assign=True)
    return model.eval()


def to_transformers(model: Transformer, params: dict):
    """Mistral3ForConditionalGeneration holding our model's tensors (wq / wk re-ordered for rotate-half)."""
    from transformers import Mistral3ForConditionalGeneration
    device = model.output.weight.device
    state = native_to_hf_mistral3(model.state_dict(), params)
    with torch.device("meta"):
        hf = Mistral3ForConditionalGeneration._from_config(hf_mistral3_config(params), attn_implementation="sdpa",
                                                           dtype=DTYPE)
    hf.load_state_dict(state, assign=True, strict=True)
    # The rotary tables are buffers outside the state dict: build those modules again on the device.
    for parent in list(hf.modules()):
        for name, child in parent.named_children():
            if any(b.is_meta for b in child.buffers(recurse=False)):
                with torch.device(device):
                    setattr(parent, name, type(child)(child.config))
    hf.generation_config.eos_token_id = None          # random weights: never stop early
    hf.generation_config.pad_token_id = 11
    return hf.eval()


def weight_bytes_per_token(params: dict) -> int:
    d, hd, v = params["dim"], params["head_dim"], params["vocab_size"]
    attention = d * hd * (2 * params["n_heads"] + 2 * params["n_kv_heads"])
    layer = attention + 3 * d * params["hidden_dim"] + 2 * d
    return (params["n_layers"] * layer + d + v * d) * torch.finfo(DTYPE).bits // 8


def measure_ours(model, prompts, pixels, device, results: dict) -> None:
    short, long = prompts

    def decode(compile: bool) -> float:
        clock = Clock()
        for step in stream(model, short, [], DECODE_TOKENS, Sampling(0.0), set(), compile=compile):
            clock(step.token)
        return clock.tokens_per_second()

    decode(False)
    results["decode"] = decode(False)
    say(f"ours: decode {results['decode']:.1f} tok/s")
    seconds = best_time(lambda: generate(model, long, [], 1, Sampling(0.0), set()), device)
    results["prefill"] = PREFILL_TOKENS / seconds
    say(f"ours: prefill {results['prefill']:.0f} tok/s")
    with torch.inference_mode():
        model.image_features([pixels])
        results["vision"] = best_time(lambda: model.image_features([pixels]), device)
    say(f"ours: vision tower {results['vision'] * 1e3:.0f} ms")
    start = time.perf_counter()
    decode(True)                                      # compiles, then records the CUDA graph
    say(f"ours: compiled the decoding step in {time.perf_counter() - start:.0f} s")
    decode(True)
    results["decode compiled"] = decode(True)
    say(f"ours: decode with compile {results['decode compiled']:.1f} tok/s")
    from torch._dynamo.utils import counters
    skipped = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    if skipped:
        say(f"ours: CUDA graph counters {skipped} (a skip means the step ran without a graph)")


def measure_theirs(hf, prompts, pixels, device, results: dict) -> None:
    short, long = prompts

    @torch.inference_mode()
    def run(ids, n, streamer=None):
        return hf.generate(torch.tensor([ids], device=device), do_sample=False, max_new_tokens=n,
                           streamer=streamer)[0, -1].item()

    run(short, 8)
    clock = Clock(skip_first=True)
    run(short, DECODE_TOKENS, clock)
    results["decode"] = clock.tokens_per_second()
    say(f"transformers: decode {results['decode']:.1f} tok/s")
    results["prefill"] = PREFILL_TOKENS / best_time(lambda: run(long, 1), device)
    say(f"transformers: prefill {results['prefill']:.0f} tok/s")
    sizes = torch.tensor([list(pixels.shape[1:])], device=device)
    with torch.inference_mode():
        features = lambda: hf.get_image_features(pixel_values=pixels[None], image_sizes=sizes)  # noqa: E731
        features()
        results["vision"] = best_time(features, device)
    say(f"transformers: vision tower {results['vision'] * 1e3:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a 30 M model instead of the 24 B one (checks the script)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    params = SMALL_PARAMS if args.small else REAL_PARAMS
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        machine = device.type
    import transformers
    say(f"{machine}; torch {torch.__version__}, transformers {transformers.__version__}")
    bandwidth = copy_bandwidth(device, 4 << 30 if device.type == "cuda" else 1 << 28)
    say(f"device-to-device copy: {bandwidth:.0f} GB/s")

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, params["vocab_size"], (n,), generator=g).tolist()
               for n in (DECODE_PROMPT, PREFILL_TOKENS)]
    side = IMAGE_SIDE if not args.small else 280
    pixels = torch.randn(3, side, side, generator=g).to(device, DTYPE)

    model = random_model(params, device)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"random model: {n_params / 1e9:.2f} B parameters in {DTYPE}")
    ours, theirs = {}, {}
    measure_ours(model, prompts, pixels, device, ours)
    model.setup_cache(1, 1)
    torch._dynamo.reset()                             # frees the CUDA graphs' memory
    hf = to_transformers(model, params)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measure_theirs(hf, prompts, pixels, device, theirs)

    per_token = weight_bytes_per_token(params)
    print(f"\n{machine}; device-to-device copy {bandwidth:.0f} GB/s; {per_token / 1e9:.1f} GB of weights read "
          f"per decoded token\n")
    print("| figure | ours | transformers | gain |\n|---|---|---|---|")
    rows = [("decode, batch 1, tok/s", ours["decode"], theirs["decode"], "{:.1f}", True),
            ("decode with --compile, tok/s", ours["decode compiled"], theirs["decode"], "{:.1f}", True),
            (f"prefill {PREFILL_TOKENS} tokens, tok/s", ours["prefill"], theirs["prefill"], "{:.0f}", True),
            (f"vision tower, {side} x {side} image, ms", ours["vision"] * 1e3, theirs["vision"] * 1e3, "{:.0f}",
             False)]
    for title, a, b, fmt, higher in rows:
        print(f"| {title} | {fmt.format(a)} | {fmt.format(b)} | {(a / b if higher else b / a):.2f} |")
    for title, a, b in (("decode: weight reads, GB/s (% of copy)", ours["decode"], theirs["decode"]),
                        ("decode with --compile: weight reads, GB/s (% of copy)", ours["decode compiled"],
                         theirs["decode"])):
        a, b = per_token * a / 1e9, per_token * b / 1e9
        print(f"| {title} | {a:.0f} ({100 * a / bandwidth:.0f} %) | {b:.0f} ({100 * b / bandwidth:.0f} %) | |")

if __name__ == "__main__":
    main()
