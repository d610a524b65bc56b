"""Real servers for compare_server's tests: a tiny random Mistral 3 in the Hugging Face layout (what mlx-lm
and llama.cpp's converter read), its GGUF written by llama.cpp's own converter, and the servers started on
them (mlx_lm.server, llama-server, serve.py in a process), each on 127.0.0.1 and a free port, bounded in time.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

from checkpoints import hf_mistral3_model
from tekken_files import write_tekken

# preprocessor_config.json of the official Hugging Face layout of Mistral Small 3.1 / 3.2 (llama.cpp's
# converter reads the normalization of the vision file from it)
PREPROCESSOR = {"image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
                "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "patch_size": 14, "resample": 3, "rescale_factor": 1 / 255, "size": {"longest_edge": 1540}}


def write_hf(folder: Path, weights: dict, params: dict, template: str) -> Path:
    """The weights as Mistral3ForConditionalGeneration in the Hugging Face layout (config.json,
    model.safetensors, tokenizer.json with `template`, preprocessor_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    hf_mistral3_model(weights, params).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    # mlx-lm reads rope_theta, not transformers 5's rope_parameters (without it: 10000, silently)
    config["text_config"]["rope_theta"] = params["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    with tempfile.TemporaryDirectory() as scratch:   # transformers converts the official tekken.json
        tekken = write_tekken(scratch, "v11")
        convert_tekken_tokenizer(str(tekken), chat_template=template).save_pretrained(folder)
    return folder


def to_gguf(hf: Path, native: Path, converter: Path, out: Path) -> tuple[Path, Path]:
    """(model.gguf, mmproj.gguf) in float32, written by llama.cpp's convert_hf_to_gguf.py: the text model
    from the Hugging Face layout (its chat template included), the vision file from the native layout
    (--mistral-format): from the Hugging Face layout, this llama.cpp (0c1e570) drops every language_model.*
    tensor of the vision file, the [IMG_BREAK] embedding it needs among them, and llama-server refuses it."""
    model, mmproj = out / "model-f32.gguf", out / "mmproj-f32.gguf"
    for args in ([str(hf), "--outfile", str(model)], [str(native), "--mistral-format", "--mmproj", "--outfile", str(mmproj)]):
        subprocess.run([sys.executable, str(converter), *args, "--outtype", "f32"], check=True, capture_output=True,
                       timeout=300)
    return model, mmproj


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    """Until GET url answers 200 (at most `seconds`); the server's log if it exits or never answers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} in {seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def server_process(command: list[str], port: int, log: Path, ready: str = "/health", seconds: float = 300):
    """A server started by `command` on 127.0.0.1:port; its base URL once `ready` answers; stopped at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        wait_ready(f"http://127.0.0.1:{port}{ready}", proc, log, seconds)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@contextmanager
def mlx_server(hf: Path, log: Path):
    port = free_port()
    with server_process([sys.executable, "-m", "mlx_lm.server", "--model", str(hf), "--host", "127.0.0.1",
                         "--port", str(port)], port, log) as url:
        yield url


@contextmanager
def llama_server(binary: str, model: Path, mmproj: Path, log: Path):
    """llama-server as close to float32 as it runs: f32 KV cache, no flash attention, no weight repacking
    (which crashes on AMX CPUs), greedy."""
    port = free_port()
    with server_process([binary, "-m", str(model), "--mmproj", str(mmproj), "--jinja", "--host", "127.0.0.1",
                         "--port", str(port), "-c", "4096", "-t", "2", "-nr", "-fa", "off", "-ctk", "f32",
                         "-ctv", "f32", "--no-warmup"], port, log) as url:
        yield url


def tool_caller(weights: dict, params: dict, chain: list[int]) -> dict:
    """The weights changed so that each token of `chain` is followed, at temperature 0, by the next one:
    every block's output projections (wo, w2) zeroed, the residual stream is the token's embedding, and
    the output row of each successor points along the last hidden state of its predecessor. The rest of
    the vocabulary keeps its random logits, so every other answer is random text as before."""
    assert len(set(chain[:-1])) == len(chain) - 1, "a token of the chain would need two successors"
    out = {k: v.clone() for k, v in weights.items()}
    for name in out:
        if name.startswith("layers.") and name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            out[name].zero_()
    for token, successor in zip(chain, chain[1:]):
        e = out["tok_embeddings.weight"][token]
        h = e * torch.rsqrt(e.pow(2).mean() + params["norm_eps"]) * out["norm.weight"]   # the final norm
        out["output.weight"][successor] = 30 * h / h.pow(2).sum()                       # its logit: 30
    return out
