"""Bad input, one table: every case must fail with an InputError (exit status 2 and no traceback on the
command line) whose message names the file, key, flag or value, and must not hang.

Seven classes: 1 hangs and unbounded reads, 2 params.json / config.json values, 3 weight files,
4 tokenizer files, 5 chat and images, 6 the command line, 7 dumps and compare. Each case builds its
bad input under a fresh folder and calls a public entry point (load_model, Tokenizer.from_file,
load_image, encode_chat, load_system_prompt, generate.main, dump.main), in a thread given CASE_TIMEOUT
seconds: a read that blocks (a FIFO opened for reading waits for a writer) fails the case instead of
the run. The controls show that the unbroken inputs pass, so that each case fails for its own reason.
"""
import base64
import contextlib
import http.server
import io
import json
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dump
import generate
import images
import inputs
import load
import tokenizer
from chat import encode_chat, load_system_prompt
from checkpoints import TINY_PARAMS, native_to_hf_text, write_native
from images import load_image
from inputs import InputError
from load import load_model
from tekken_files import write_tekken
from tokenizer import Tokenizer

CASE_TIMEOUT = 30.0   # seconds; every case takes well under one
DEEP = 100_000        # nesting far past both MAX_DEPTH and Python's recursion limit
REPO_PARAMS = {**TINY_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}   # tekken.json's vocabulary
HF_CONFIG = {"architectures": ["MistralForCausalLM"], "hidden_size": 48, "num_hidden_layers": 2, "head_dim": 8,
             "intermediate_size": 96, "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
             "vocab_size": 1000, "rope_theta": 1e9, "max_position_embeddings": 4096, "sliding_window": None,
             "hidden_act": "silu", "tie_word_embeddings": False}


# ----------------------------------------------------------------------------- shared inputs

class Server(http.server.BaseHTTPRequestHandler):
    """/big: 4 MB without a Content-Length; /huge: a Content-Length of 10 GB; /slow: a byte every 0.05 s."""

    def do_GET(self):
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if self.path == "/huge":
                self.send_header("Content-Length", str(10 * 2**30))
            if self.path == "/slow":
                self.send_header("Content-Length", "2000")
            self.end_headers()
            for _ in range(64 if self.path == "/big" else 2000 if self.path == "/slow" else 0):
                self.wfile.write(b"\x89" * (2**16 if self.path == "/big" else 1))
                self.wfile.flush()
                if self.path == "/slow":
                    time.sleep(0.05)
        except OSError:   # the client gave up, as it should
            pass

    def log_message(self, *args):
        pass


def make_context(root: Path) -> SimpleNamespace:
    """The unbroken inputs the cases break: a tiny text model (vocabulary 1000), the same in the Hugging
    Face layout, a model folder with tekken.json for the command line, an image, a dump, a web server."""
    root.mkdir(parents=True, exist_ok=True)
    ctx = SimpleNamespace(root=root)
    ctx.tiny = root / "tiny"
    ctx.weights = write_native(ctx.tiny)
    ctx.repo = root / "Mistral-Small-3.2-24B-Instruct-2506"
    write_native(ctx.repo, REPO_PARAMS, seed=3)
    write_tekken(ctx.repo, "v11")
    (ctx.repo / "SYSTEM_PROMPT.txt").write_text("You are {name}.")
    ctx.tokenizer = Tokenizer.from_file(ctx.repo / "tekken.json")
    ctx.png = root / "ok.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(ctx.png)
    ctx.dump = root / "ok.safetensors"
    write_dump(ctx.dump)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx.server, ctx.url = server, f"http://127.0.0.1:{server.server_address[1]}"
    return ctx


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = make_context(tmp_path_factory.mktemp("bad_input"))
    yield context
    context.server.shutdown()
    context.server.server_close()


class Env:
    """What a case sees: the shared inputs, its own empty folder, and patch() (undone after the case)."""

    def __init__(self, ctx, tmp: Path):
        self.ctx, self.tmp, self.undo = ctx, tmp, []

    def __getattr__(self, name):
        return getattr(self.ctx, name)

    def patch(self, owner, name: str, value):
        self.undo.append((owner, name, getattr(owner, name, None)))
        setattr(owner, name, value)

    def restore(self):
        for owner, name, value in reversed(self.undo):
            setattr(owner, name, value)


# ----------------------------------------------------------------------------- building bad inputs

def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def loop(path: Path) -> Path:
    path.symlink_to(path)   # a link to itself: stat fails with ELOOP
    return path


def nested(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def deep_dict(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"x": value}}
    return value


def native_folder(e: Env, params=None, weights: dict | None = None, name: str = "consolidated.safetensors") -> Path:
    """params.json (a dict, or raw text) and the tiny weights (a link to them, or `weights` written)."""
    folder = e.tmp / "model"
    folder.mkdir(exist_ok=True)
    params = dict(TINY_PARAMS) if params is None else params
    (folder / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    if weights is None:
        (folder / name).symlink_to(e.tiny / "consolidated.safetensors")
    else:
        save_file(weights, folder / name)
    return folder


def with_params(**changes) -> Callable:
    return lambda e: load_model(native_folder(e, {**TINY_PARAMS, **changes}))


def with_vision(**changes) -> Callable:
    vision = {"hidden_size": 64, "num_channels": 3, "image_size": 1540, "max_image_size": 1540, "patch_size": 14,
              "rope_theta": 10000.0, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
              "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}
    return lambda e: load_model(native_folder(e, {**TINY_PARAMS, "vision_encoder": {**vision, **changes}}))


def hf_folder(e: Env, config: dict | None = None, files: dict | None = None, index: dict | None = None) -> Path:
    """config.json and model.safetensors of the tiny model in the Hugging Face layout; `files`
    (name -> tensors) and `index` (the weight_map of model.safetensors.index.json) replace them."""
    folder = e.tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG if config is None else config))
    for name, tensors in (files or {"model.safetensors": hf_weights(e)}).items():
        save_file(tensors, folder / name)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def hf_weights(e: Env) -> dict:
    return {k: v.contiguous() for k, v in native_to_hf_text(e.weights, TINY_PARAMS).items()}


def with_hf_config(**changes) -> Callable:
    return lambda e: load_model(hf_folder(e, {**HF_CONFIG, **changes}))


def split(weights: dict) -> tuple[dict, dict]:
    names = sorted(weights)
    return {k: weights[k] for k in names[:10]}, {k: weights[k] for k in names[10:]}


def changed(weights: dict, name: str, value: torch.Tensor) -> dict:
    return {**weights, name: value}


def with_nan(name: str, value: float = math.nan) -> Callable:
    def run(e):
        w = e.weights[name].clone()
        w.view(-1)[7] = value
        load_model(native_folder(e, weights=changed(e.weights, name, w)))
    return run


def tekken(e: Env, change: Callable) -> Path:
    """A valid tiny tekken.json (tests/test_tokenizer.py's), broken by `change`."""
    from test_tokenizer import tiny_tekken
    data = tiny_tekken()
    change(data)
    path = e.tmp / "tekken.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def with_tekken(change: Callable) -> Callable:
    return lambda e: Tokenizer.from_file(tekken(e, change))


def entry(key: str, index: int, **values) -> Callable:
    return lambda data: data[key][index].update(values)


def config(**values) -> Callable:
    return lambda data: data["config"].update(values)


def image_file(e: Env, name: str, content: bytes | None = None, fmt: str | None = None) -> Path:
    path = e.tmp / name
    if fmt is not None:
        Image.new("RGB", (16, 16), (0, 120, 255)).save(path, fmt)
    else:
        path.write_bytes(content)
    return path


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


def png_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def chat_with(message: dict) -> Callable:
    return lambda e: encode_chat(e.tokenizer, [message])


def chat_with_call(arguments) -> Callable:
    calls = [{"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": arguments}}]
    return lambda e: encode_chat(e.tokenizer, [{"role": "user", "content": "a"},
                                               {"role": "assistant", "content": "", "tool_calls": calls},
                                               {"role": "tool", "tool_call_id": "abcDEF123", "content": "r"}])


def cli(*flags, model: str | None = None) -> Callable:
    """generate.main with `flags` and a short greedy answer (if it gets that far)."""
    return lambda e: ("generate", ["--model", (model or "{repo}").format(tmp=e.tmp, repo=e.repo), "--max-tokens", "2",
                                   "--temperature", "0",
                                   "--dtype", "float32", *[f.format(tmp=e.tmp, repo=e.repo) for f in flags], "hi"])


def cli_file(flag: str, make: Callable) -> Callable:
    """generate.main with `flag` naming the file that make(env) returns."""
    def run(e):
        return cli(flag, str(make(e)))(e)
    return run


def write(path: Path, content) -> Path:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def write_dump(path: Path, logits=None, prompt=(1, 3, 5), generated=(7, 2), extra: dict | None = None,
               metadata: dict | None = None, drop: tuple = ()) -> Path:
    logits = torch.randn(len(prompt) + len(generated) - 1, 50, generator=torch.Generator().manual_seed(0)) \
        if logits is None else logits
    ids = [t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.int64) for t in (prompt, generated)]
    tensors = {"prompt_ids": ids[0], "generated_ids": ids[1], "logits": logits, **(extra or {})}
    save_file({k: v.contiguous() for k, v in tensors.items() if k not in drop}, str(path),
              metadata={"format": dump.FORMAT, **(metadata or {})})
    return path


def compare_with(make: Callable) -> Callable:
    """dump.main compare of the good dump against the one that make(path) writes."""
    def run(e):
        bad = make(e.tmp / "b.safetensors")
        return "dump", ["compare", str(e.dump), str(bad)]
    return run


def logits_with(row: int, col: int, value: float) -> Callable:
    def make(path):
        logits = torch.randn(4, 50)
        logits[row, col] = value
        return write_dump(path, logits)
    return make


# ----------------------------------------------------------------------------- the table

@dataclass
class Case:
    id: str
    run: Callable                 # env -> None (an API call), or ("generate" | "dump", argv)
    names: tuple[str, ...]        # what the message must name ("{tmp}": the case's folder)


C = Case
CASES = [
    # 1 hangs and unbounded reads: refused by name, never opened; reads bounded in bytes and time
    C("1-params-fifo", lambda e: load_model(_fifo_params(e)), ("{tmp}/model/params.json", "FIFO")),
    C("1-tekken-fifo", lambda e: Tokenizer.from_file(fifo(e.tmp / "tekken.json")), ("{tmp}/tekken.json", "FIFO")),
    C("1-sentencepiece-fifo", lambda e: Tokenizer.from_file(fifo(e.tmp / "tokenizer.model.v3")),
      ("tokenizer.model.v3", "FIFO")),
    C("1-image-fifo", lambda e: load_image(str(fifo(e.tmp / "photo.png"))), ("{tmp}/photo.png", "FIFO")),
    C("1-image-file-url-fifo", lambda e: load_image(fifo(e.tmp / "photo.png").as_uri()), ("photo.png", "FIFO")),
    C("1-image-dev-zero", lambda e: load_image("/dev/zero"), ("/dev/zero", "device")),
    C("1-image-symlink-loop", lambda e: load_image(str(loop(e.tmp / "loop.png"))), ("loop.png", "symlink loop")),
    C("1-image-over-byte-limit", lambda e: (e.patch(images, "MAX_IMAGE_BYTES", 1000),
                                             load_image(image_file(e, "big.png", png_bytes(200)))),
      ("big.png", "limit of 1000")),
    C("1-data-url-over-byte-limit", lambda e: (e.patch(images, "MAX_IMAGE_BYTES", 1000), load_image(
        "data:image/png;base64," + base64.b64encode(png_bytes(200)).decode())), ("data:image/png", "limit of 1000")),
    C("1-http-over-byte-limit", lambda e: (e.patch(images, "MAX_IMAGE_BYTES", 100_000),
                                            load_image(f"{e.url}/big")), ("/big", "limit of 100000")),
    C("1-http-content-length-over-limit", lambda e: load_image(f"{e.url}/huge"), ("/huge", "10737418240 bytes")),
    C("1-http-past-deadline", lambda e: (e.patch(images, "URL_DEADLINE", 1.0), load_image(f"{e.url}/slow")),
      ("/slow", "not complete after 1 s")),
    C("1-system-prompt-fifo", lambda e: load_system_prompt(fifo(e.tmp / "SYSTEM_PROMPT.txt"), "m"),
      ("SYSTEM_PROMPT.txt", "FIFO")),
    C("1-weights-fifo", lambda e: load_model(_fifo_weights(e)), ("consolidated.safetensors", "FIFO")),
    C("1-weights-folder", lambda e: load_model(_folder_weights(e)), ("consolidated.safetensors", "folder")),
    C("1-params-symlink-loop", lambda e: load_model(_looped_params(e)), ("params.json", "symlink loop")),
    C("1-model-folder-is-a-file", lambda e: load_model(e.repo / "tekken.json"), ("tekken.json", "not a model folder")),
    C("1-params-over-json-limit", lambda e: (e.patch(inputs, "MAX_JSON_BYTES", 1000), load_model(native_folder(
        e, json.dumps(TINY_PARAMS) + " " * 2000))), ("params.json", "limit of 1000")),
    C("1-cli-messages-fifo", cli_file("--messages", lambda e: fifo(e.tmp / "chat.json")), ("--messages", "FIFO")),
    C("1-cli-tools-dev-zero", cli("--tools", "/dev/zero"), ("--tools /dev/zero", "device")),
    C("1-cli-system-fifo", cli_file("--system", lambda e: fifo(e.tmp / "system.txt")), ("--system", "FIFO")),
    C("1-dump-fifo", lambda e: ("dump", ["compare", str(e.dump), str(fifo(e.tmp / "b.safetensors"))]),
      ("b.safetensors", "FIFO")),

    # 2 params.json / config.json: types, ranges, structure, each named
    C("2-dim-string", with_params(dim="48"), ("params.json", "'dim'", "'48'", "an integer")),
    C("2-n-layers-float", with_params(n_layers=2.0), ("'n_layers'", "2.0", "an integer")),
    C("2-n-heads-bool", with_params(n_heads=True), ("'n_heads'", "True", "an integer")),
    C("2-vocab-size-null", with_params(vocab_size=None), ("'vocab_size'", "None")),
    C("2-norm-eps-nan", with_params(norm_eps=math.nan), ("'norm_eps'", "nan", "finite")),
    C("2-norm-eps-infinite", with_params(norm_eps=math.inf), ("'norm_eps'", "inf", "finite")),
    C("2-norm-eps-zero", with_params(norm_eps=0), ("'norm_eps'", "0.0", "> 0")),
    C("2-norm-eps-string", with_params(norm_eps="1e-5"), ("'norm_eps'", "'1e-5'")),
    C("2-rope-theta-negative", with_params(rope_theta=-1.0), ("'rope_theta'", "-1.0", "> 0")),
    C("2-head-dim-odd", with_params(head_dim=7), ("'head_dim'", "7", "even")),
    C("2-heads-not-multiple-of-kv-heads", with_params(n_kv_heads=3), ("n_heads", "n_kv_heads", "3")),
    C("2-n-layers-huge", with_params(n_layers=100_000), ("'n_layers'", "100000", "1024")),
    C("2-n-layers-negative", with_params(n_layers=-1), ("'n_layers'", "-1")),
    C("2-hidden-dim-zero", with_params(hidden_dim=0), ("'hidden_dim'", "0")),
    C("2-max-positions-negative", with_params(max_position_embeddings=-5), ("'max_position_embeddings'", "-5")),
    C("2-params-a-list", lambda e: load_model(native_folder(e, "[1, 2, 3]")), ("params.json", "list")),
    C("2-params-a-number", lambda e: load_model(native_folder(e, "5120")), ("params.json", "int")),
    C("2-params-nested-deep", lambda e: load_model(native_folder(e, nested())),
      ("params.json", "nested deeper than 64")),
    C("2-vision-not-an-object", with_params(vision_encoder="pixtral"), ("vision_encoder", "str")),
    C("2-vision-bool-as-string", with_vision(adapter_bias="false"), ("'adapter_bias'", "'false'", "true or false")),
    C("2-vision-heads-do-not-divide", with_vision(num_attention_heads=5), ("hidden_size", "num_attention_heads", "5")),
    C("2-vision-image-id-outside-vocab", with_vision(image_token_id=5000), ("'image_token_id'", "5000", "1000")),
    C("2-vision-channels", with_vision(num_channels=4), ("'num_channels'", "4")),
    C("2-hf-sliding-window", with_hf_config(sliding_window=4096), ("config.json", "sliding_window", "4096")),
    C("2-hf-rope-scaling", with_hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
      ("config.json", "rope_scaling", "yarn")),
    C("2-hf-rope-parameters-yarn", with_hf_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e9}),
      ("config.json", "rope_parameters", "'yarn'")),
    C("2-hf-layers-string", with_hf_config(num_hidden_layers="2"), ("config.json", "'num_hidden_layers'", "'2'")),
    C("2-hf-eps-negative", with_hf_config(rms_norm_eps=-1e-5), ("'rms_norm_eps'", "-1e-05")),
    C("2-hf-hidden-act", with_hf_config(hidden_act="gelu"), ("config.json", "hidden_act", "gelu")),
    C("2-hf-quantization-awq", with_hf_config(quantization_config={"quant_method": "awq", "bits": 4}),
      ("config.json", "quant_method 'awq'", "supported: MLX affine")),
    C("2-mlx-quantization-mode", with_hf_config(quantization={"group_size": 32, "bits": 4, "mode": "nvfp4"}),
      ("config.json", "MLX mode 'nvfp4'", "supported: MLX affine")),
    C("2-hf-config-a-list", lambda e: load_model(_hf_raw(e, "[]")), ("config.json", "list")),
    C("2-hf-text-config-not-an-object", with_hf_config(text_config=[1]), ("config.json", "text_config")),
    C("2-vocab-smaller-than-tokenizer", lambda e: cli(model=str(_small_vocab_repo(e)))(e),
      ("131072 ids", "vocab_size 1000", "tekken.json", "params.json")),

    # 3 weight files: exactly one layout, each tensor once, float, finite
    C("3-stale-split-beside-single", lambda e: load_model(_with_files(e, {"consolidated-00001-of-00002.safetensors":
                                                                          split(e.weights)[0]})),
      ("consolidated-00001-of-00002.safetensors", "beside consolidated.safetensors")),
    C("3-incomplete-split-set", lambda e: load_model(_split_folder(e, parts=(1,))),
      ("consolidated-00001-of-00002.safetensors", "not one complete set")),
    C("3-stray-consolidated-file", lambda e: load_model(_with_files(e, {"consolidated_old.safetensors": e.weights})),
      ("consolidated_old.safetensors",)),
    C("3-tensor-in-two-files", lambda e: load_model(_split_folder(e, overlap=True)),
      ("consolidated-00001-of-00002.safetensors", "consolidated-00002-of-00002.safetensors", "stored once")),
    C("3-hf-model-old-beside-model", lambda e: load_model(hf_folder(
        e, files={"model.safetensors": hf_weights(e), "model_old.safetensors": hf_weights(e)})),
      ("model_old.safetensors", "beside model.safetensors")),
    C("3-hf-file-not-in-index", lambda e: load_model(_hf_sharded(e, stray=True)),
      ("model-00003-of-00003.safetensors", "not listed in model.safetensors.index.json")),
    C("3-hf-index-names-missing-file", lambda e: load_model(_hf_sharded(e, missing=True)),
      ("model-00002-of-00002.safetensors", "no such file")),
    C("3-hf-tensor-not-where-index-says", lambda e: load_model(_hf_sharded(e, misplaced=True)),
      ("model.norm.weight", "which the index puts in")),
    C("3-hf-index-path-outside-folder", lambda e: load_model(hf_folder(
        e, index={"model.norm.weight": "../x.safetensors"})),
      ("model.safetensors.index.json", "../x.safetensors")),
    C("3-hf-same-tensor-two-names", lambda e: load_model(hf_folder(e, files={"model.safetensors": {
        **hf_weights(e), "language_model.model.norm.weight": e.weights["norm.weight"].clone()}})),
      ("language_model.model.norm.weight", "model.norm.weight", "stored once")),
    C("3-integer-dtype", lambda e: load_model(native_folder(e, weights=changed(
        e.weights, "layers.0.ffn_norm.weight", torch.ones(48, dtype=torch.int32)))),
      ("layers.0.ffn_norm.weight", "int32", "floating-point")),
    C("3-nan-weight", with_nan("layers.0.attention.wq.weight"), ("layers.0.attention.wq.weight", "nan")),
    C("3-infinite-weight", with_nan("output.weight", math.inf), ("output.weight", "inf")),
    C("3-overflow-in-conversion", lambda e: load_model(native_folder(e, weights=changed(
        e.weights, "norm.weight", torch.full((48,), 1e6))), dtype=torch.float16),
      ("norm.weight", "after conversion to torch.float16")),

    # 4 tokenizer files: strict base64, duplicates named, no bool for an int, bounded nesting
    C("4-base64-junk", with_tekken(entry("vocab", 260, token_bytes="Y*WI=")), ("tekken.json", "vocab[260]")),
    C("4-base64-inner-space", with_tekken(entry("vocab", 259, token_bytes="IG E=")), ("vocab[259]",)),
    C("4-duplicate-token-bytes", with_tekken(entry("vocab", 260, token_bytes="YWI=")),  # b"ab" is vocab[256]
      ("vocab[256]", "vocab[260]", "b'ab'")),
    C("4-rank-true", with_tekken(entry("vocab", 1, rank=True)), ("vocab[1]", "True")),
    C("4-special-rank-true", with_tekken(entry("special_tokens", 1, rank=True)), ("special_tokens[1]", "True")),
    C("4-vocab-size-true", with_tekken(config(default_vocab_size=True)), ("default_vocab_size", "True")),
    C("4-special-count-true", with_tekken(config(default_num_special_tokens=True)),
      ("default_num_special_tokens", "True")),
    C("4-image-patch-size-true", with_tekken(lambda d: d.update(image={"image_patch_size": True,
                                                                       "max_image_size": 1540})),
      ("tekken.json", "image_patch_size", "True")),
    C("4-nested-deep", lambda e: Tokenizer.from_file(write(e.tmp / "tekken.json", nested())),
      ("tekken.json", "nested deeper than 64")),

    # 5 chat and images: schemes, data: URLs, roles, depth, formats
    C("5-ftp-url", lambda e: load_image("ftp://example.com/a.png"), ("ftp://example.com/a.png", "'ftp'")),
    C("5-javascript-url", lambda e: load_image("javascript:alert(1)"), ("javascript:alert(1)", "'javascript'")),
    C("5-ftp-url-in-chat", chat_with({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}), ("message 0", "part 0", "ftp")),
    C("5-data-url-junk", lambda e: load_image("data:image/png;base64," + base64.b64encode(png_bytes()).decode()
                                              + "*junk*"), ("data:image/png;base64", "not valid base64")),
    C("5-data-url-inner-space", lambda e: load_image("data:image/png;base64,iVBO Rw0K"), ("not valid base64",)),
    C("5-data-url-not-an-image-type", lambda e: load_image("data:text/plain;base64,aGVsbG8="),
      ("data:text/plain", "media type")),
    C("5-role-dict", chat_with({"role": {"name": "user"}, "content": "hi"}), ("message 0", "role", "dict")),
    C("5-role-list", chat_with({"role": ["user"], "content": "hi"}), ("message 0", "role", "list")),
    C("5-role-number", chat_with({"role": 5, "content": "hi"}), ("message 0", "role", "5")),
    C("5-tool-schema-deep", lambda e: encode_chat(e.tokenizer, [{"role": "user", "content": "a"}], [
        {"type": "function", "function": {"name": "f", "parameters": deep_dict(5000)}}]),
      ("tool 0 (f) parameters", "nested deeper than 64")),
    C("5-tool-schema-circular", lambda e: encode_chat(e.tokenizer, [{"role": "user", "content": "a"}], [
        {"type": "function", "function": {"name": "f", "parameters": _circular()}}]), ("tool 0 (f)",)),
    C("5-call-arguments-deep-dict", chat_with_call(deep_dict(5000)), ("message 1", "arguments", "nested")),
    C("5-call-arguments-deep-string", chat_with_call(nested()), ("message 1", "arguments", "nested deeper than 64")),
    C("5-eps-image", lambda e: load_image(image_file(e, "figure.eps", EPS)), ("figure.eps", "supported format")),
    C("5-ppm-image", lambda e: load_image(image_file(e, "photo.ppm", fmt="PPM")), ("photo.ppm", "supported format")),
    C("5-ico-image", lambda e: load_image(image_file(e, "icon.ico", fmt="ICO")), ("icon.ico", "supported format")),
    C("5-pcx-image", lambda e: load_image(image_file(e, "old.pcx", fmt="PCX")), ("old.pcx", "supported format")),

    # 6 the command line: each flag checked before the model loads
    C("6-device-unknown", cli("--device", "tpu"), ("--device 'tpu'", "cuda:N")),
    C("6-device-malformed", cli("--device", "cuda:x"), ("--device 'cuda:x'",)),
    C("6-device-cuda-unavailable", lambda e: (e.patch(torch.cuda, "is_available", lambda: False),
                                              cli("--device", "cuda")(e))[1], ("--device 'cuda'", "not available")),
    C("6-device-cuda-index", lambda e: (e.patch(torch.cuda, "is_available", lambda: True),
                                        e.patch(torch.cuda, "device_count", lambda: 1),
                                        cli("--device", "cuda:3")(e))[2], ("--device 'cuda:3'", "1 CUDA device")),
    C("6-device-mps-unavailable", lambda e: (e.patch(torch.backends.mps, "is_available", lambda: False),
                                             cli("--device", "mps")(e))[1], ("--device 'mps'", "not available")),
    C("6-messages-folder", cli("--messages", "{tmp}"), ("--messages {tmp}", "folder")),
    C("6-messages-not-utf8", cli_file("--messages", lambda e: write(e.tmp / "m.json", b'[{"role": "\xff"}]')),
      ("--messages {tmp}/m.json", "not valid JSON", "utf-8")),
    C("6-messages-nested-deep", cli_file("--messages", lambda e: write(e.tmp / "m.json", nested())),
      ("--messages {tmp}/m.json", "nested deeper than 64")),
    C("6-messages-over-limit", lambda e: (e.patch(inputs, "MAX_JSON_BYTES", 100), cli_file(
        "--messages", lambda e: write(e.tmp / "m.json", json.dumps([{"role": "user", "content": "x" * 200}])))(e))[1],
      ("--messages {tmp}/m.json", "limit of 100")),
    C("6-messages-role-dict", cli_file("--messages", lambda e: write(e.tmp / "m.json", json.dumps(
        [{"role": {"a": 1}, "content": "hi"}]))), ("message 0", "role")),
    C("6-tools-folder", cli("--tools", "{tmp}"), ("--tools {tmp}", "folder")),
    C("6-tools-schema-deep", cli_file("--tools", lambda e: write(e.tmp / "t.json", json.dumps(
        [{"type": "function", "function": {"name": "f", "parameters": deep_dict(40)}}]))),
      ("--tools {tmp}/t.json", "nested deeper than 64")),
    C("6-system-missing-path", cli("--system", "./no/such/prompt.txt"),
      ("--system ./no/such/prompt.txt", "no such file")),
    C("6-system-missing-md", cli("--system", "prompt.md"), ("--system prompt.md", "no such file")),
    C("6-dump-missing-folder", cli("--dump", "{tmp}/no/such/out.safetensors"),
      ("--dump {tmp}/no/such/out.safetensors", "does not exist")),
    C("6-dump-onto-folder", cli("--dump", "{tmp}"), ("--dump {tmp}", "folder")),
    C("6-model-is-a-file", cli(model="{repo}/tekken.json"), ("--model", "tekken.json", "not a folder")),
    C("6-image-ftp", cli("--image", "ftp://example.com/a.png"), ("ftp://example.com/a.png", "ftp")),

    # 7 dumps and compare: a dump that passes compare is a valid dump
    C("7-nan-logits", compare_with(logits_with(2, 5, math.nan)), ("b.safetensors", "logits", "nan", "row 2")),
    C("7-infinite-logits", compare_with(logits_with(0, 1, -math.inf)), ("b.safetensors", "logits", "-inf", "row 0")),
    C("7-fewer-rows-than-positions", compare_with(lambda p: write_dump(p, torch.randn(3, 50))),
      ("b.safetensors", "logits has 3 rows", "expected S + N - 1 = 4")),
    C("7-logits-rank-1", compare_with(lambda p: write_dump(p, torch.randn(4 * 50))),
      ("b.safetensors", "logits", "[200]")),
    C("7-logits-float64", compare_with(lambda p: write_dump(p, torch.randn(4, 50, dtype=torch.float64))),
      ("b.safetensors", "logits must be float32", "float64")),
    C("7-prompt-ids-rank-2", compare_with(lambda p: write_dump(p, prompt=[[1, 3, 5]])),
      ("b.safetensors", "prompt_ids")),
    C("7-prompt-ids-float", compare_with(lambda p: write_dump(p, prompt=torch.tensor([1.0, 3.0, 5.0]))),
      ("b.safetensors", "prompt_ids must be int64", "float32")),
    C("7-missing-logits", compare_with(lambda p: write_dump(p, drop=("logits",))), ("b.safetensors", "['logits']")),
    C("7-different-vocabularies", compare_with(lambda p: write_dump(p, torch.randn(4, 60))),
      ("ok.safetensors", "b.safetensors", "different vocabularies", "50", "60")),
    C("7-token-outside-vocabulary", compare_with(lambda p: write_dump(p, generated=(7, 99))),
      ("b.safetensors", "token id 99", "V = 50")),
    C("7-not-safetensors", compare_with(lambda p: write(p, b"\x00junk" * 100)),
      ("b.safetensors", "not a readable safetensors")),
    C("7-other-tensors", compare_with(lambda p: (save_file({"weights": torch.zeros(3)}, str(p)), p)[1]),
      ("b.safetensors", "not a dump")),
    C("7-unknown-tensor", compare_with(lambda p: write_dump(p, extra={"attention": torch.zeros(4, 4)})),
      ("b.safetensors", "'attention'")),
    C("7-hidden-gap", compare_with(lambda p: write_dump(p, extra={"hidden.1": torch.zeros(4, 8)})),
      ("b.safetensors", "hidden")),
    C("7-hidden-wrong-rows", compare_with(lambda p: write_dump(p, extra={"hidden.0": torch.zeros(3, 8)})),
      ("b.safetensors", "hidden.0 has 3 rows")),
    C("7-nan-hidden", compare_with(lambda p: write_dump(p, extra={"hidden.0": torch.full((4, 8), math.nan)})),
      ("b.safetensors", "hidden.0", "nan")),
    C("7-wrong-format", compare_with(lambda p: write_dump(p, metadata={"format": "someone-else/2"})),
      ("b.safetensors", "someone-else/2")),
    C("7-empty-prompt", compare_with(lambda p: write_dump(p, torch.randn(1, 50), prompt=())),
      ("b.safetensors", "prompt_ids is empty")),
    C("7-dump-is-a-folder", lambda e: ("dump", ["compare", str(e.dump), str(e.tmp)]), ("{tmp}", "folder")),
]


def _fifo_params(e: Env) -> Path:
    folder = e.tmp / "model"
    folder.mkdir()
    fifo(folder / "params.json")
    (folder / "consolidated.safetensors").symlink_to(e.tiny / "consolidated.safetensors")
    return folder


def _fifo_weights(e: Env) -> Path:
    folder = native_folder(e, name="linked.safetensors")
    fifo(folder / "consolidated.safetensors")
    os.remove(folder / "linked.safetensors")
    return folder


def _folder_weights(e: Env) -> Path:
    folder = native_folder(e, name="linked.safetensors")
    (folder / "consolidated.safetensors").mkdir()
    os.remove(folder / "linked.safetensors")
    return folder


def _looped_params(e: Env) -> Path:
    folder = native_folder(e)
    os.remove(folder / "params.json")
    loop(folder / "params.json")
    return folder


def _hf_raw(e: Env, text: str) -> Path:
    folder = hf_folder(e)
    (folder / "config.json").write_text(text)
    return folder


def _small_vocab_repo(e: Env) -> Path:
    folder = e.tmp / "small"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(TINY_PARAMS))
    (folder / "consolidated.safetensors").symlink_to(e.tiny / "consolidated.safetensors")
    (folder / "tekken.json").symlink_to(e.repo / "tekken.json")
    return folder


def _with_files(e: Env, extra: dict) -> Path:
    folder = native_folder(e)
    for name, tensors in extra.items():
        save_file(tensors, folder / name)
    return folder


def _split_folder(e: Env, parts=(1, 2), overlap: bool = False) -> Path:
    folder = e.tmp / "model"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(TINY_PARAMS))
    first, second = split(e.weights)
    if overlap:
        second = {**second, "norm.weight": e.weights["norm.weight"]}
        first = {**first, "norm.weight": e.weights["norm.weight"]}
    for k, tensors in zip((1, 2), (first, second)):
        if k in parts:
            save_file(tensors, folder / f"consolidated-0000{k}-of-00002.safetensors")
    return folder


def _hf_sharded(e: Env, stray: bool = False, missing: bool = False, misplaced: bool = False) -> Path:
    weights = hf_weights(e)
    names = sorted(weights)
    first, second = {k: weights[k] for k in names[:10]}, {k: weights[k] for k in names[10:]}
    index = {**{k: "model-00001-of-00002.safetensors" for k in first},
             **{k: "model-00002-of-00002.safetensors" for k in second}}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    if stray:
        files["model-00003-of-00003.safetensors"] = first
    if missing:
        del files["model-00002-of-00002.safetensors"]
    if misplaced:
        index["model.norm.weight"] = ("model-00002-of-00002.safetensors" if "model.norm.weight" in first
                                      else "model-00001-of-00002.safetensors")
    return hf_folder(e, files=files, index=index)


def _circular() -> dict:
    schema: dict = {"type": "object", "properties": {}}
    schema["properties"]["self"] = schema
    return schema


# ----------------------------------------------------------------------------- running a case

@dataclass
class Outcome:
    kind: str                 # "error" (raised), "exit" (CLI status), "ok" (no error), "hang"
    cli: bool = False         # the case ran generate.main or dump.main
    error: BaseException | None = None
    status: int | None = None
    stderr: str = ""
    seconds: float = 0.0


MAINS = {"generate": generate.main, "dump": dump.main}


def outcome(case: Case, ctx, tmp: Path, timeout: float = CASE_TIMEOUT) -> Outcome:
    """Run one case in a thread with a timeout; what came out."""
    tmp.mkdir(parents=True, exist_ok=True)
    env, result, err = Env(ctx, tmp), {"cli": False}, io.StringIO()

    def target():
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                got = case.run(env)
                if isinstance(got, tuple) and len(got) == 2 and got[0] in MAINS:
                    result["cli"] = True
                    try:
                        result["out"] = Outcome("exit", status=MAINS[got[0]](got[1]))
                    except SystemExit as e:
                        result["out"] = Outcome("exit", status=e.code)
                else:
                    result["out"] = Outcome("ok")
        except BaseException as e:   # noqa: B036 -- a case may raise anything; the test judges it
            result["out"] = Outcome("error", error=e, stderr="".join(traceback.format_exception(e)))

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    env.restore()
    if thread.is_alive():
        _release_fifos(tmp)
        return Outcome("hang", seconds=timeout)
    out = result["out"]
    out.cli, out.stderr, out.seconds = result["cli"], out.stderr or err.getvalue(), time.monotonic() - start
    return out


def _release_fifos(tmp: Path):
    """A reader blocked on a FIFO gets end of file once a writer comes and goes."""
    for path in tmp.rglob("*"):
        if path.is_fifo():
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def message_of(out: Outcome) -> str:
    return str(out.error) if out.kind == "error" else out.stderr


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, ctx, tmp_path):
    out = outcome(case, ctx, tmp_path)
    assert out.kind != "hang", f"no answer in {CASE_TIMEOUT} s"
    if out.cli:
        assert out.kind == "exit", f"expected the command line to exit, got {out.kind}: {out.stderr[-2000:]}"
        assert out.status == 2, out.stderr
        assert "Traceback" not in out.stderr and "error: " in out.stderr, out.stderr
    else:
        assert out.kind == "error", f"expected an InputError, got {out.kind}"
        assert isinstance(out.error, InputError), out.stderr
    message = message_of(out)
    for name in case.names:
        expected = name.format(tmp=tmp_path, repo=ctx.repo)
        assert expected in message, f"{expected!r} not in {message!r}"


def test_the_table_covers_every_class():
    counts = {k: sum(case.id.startswith(f"{k}-") for case in CASES) for k in "1234567"}
    assert len(CASES) >= 60 and min(counts.values()) >= 5, counts


def test_controls_are_valid(ctx, tmp_path):
    """The unbroken inputs that the cases start from pass, so each case fails for its own reason."""
    def env(name: str) -> Env:
        (tmp_path / name).mkdir()
        return Env(ctx, tmp_path / name)
    for folder in (native_folder(env("native")), hf_folder(env("hf")), _split_folder(env("split")),
                   _hf_sharded(env("sharded"))):
        load_model(folder)
    Tokenizer.from_file(tekken(env("tekken"), lambda data: None))
    assert load_image(ctx.png).size == (30, 20)
    assert dump.main(["compare", str(ctx.dump), str(write_dump(tmp_path / "b.safetensors"))]) == 0
    encode_chat(ctx.tokenizer, [{"role": "user", "content": "a"}], [
        {"type": "function", "function": {"name": "f", "parameters": deep_dict(30)}}])   # 61 levels: allowed


# ----------------------------------------------------------------------------- beyond the table

def test_interactive_bad_image_keeps_the_session(ctx, interactive_session, capsys):
    """A bad /image is reported when it is typed and not attached; every message is answered (issue 21:
    it was reported with the next message, which was then dropped)."""
    prompts = interactive_session(["/image /no/such/photo.png", "Hello", "/image ftp://example.com/a.png", "Hi",
                                   "And now?"])
    assert generate.main(["--model", str(ctx.repo), "-i", "--max-tokens", "2", "--dtype", "float32",
                          "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "/no/such/photo.png" in err and "'ftp'" in err and "Traceback" not in err
    assert len(prompts) == 3                                            # Hello, Hi and And now? answered
    answered = ctx.tokenizer.decode(prompts[-1])
    assert all(text in answered for text in ("Hello", "Hi", "And now?"))
    assert ctx.tokenizer.special_id("[IMG]") not in prompts[-1]        # no image went with them


def test_interrupt_during_loading_is_not_swallowed(ctx, monkeypatch):
    """Ctrl-C while the weights load stops the loading: no except clause takes the KeyboardInterrupt."""
    placed = []

    def interrupted(*args, **kwargs):
        placed.append(1)
        if len(placed) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    real = load._place
    monkeypatch.setattr(load, "_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model(ctx.tiny)
    placed.clear()
    with pytest.raises(KeyboardInterrupt):
        generate.main(["--model", str(ctx.repo), "--max-tokens", "1", "--dtype", "float32", "hi"])


def test_weight_check_finds_nan_in_bfloat16_as_stored(ctx, tmp_path):
    """A bfloat16 file used as stored (mapped, not converted) is checked too."""
    weights = {k: v.to(torch.bfloat16) for k, v in ctx.weights.items()}
    weights["layers.1.feed_forward.w2.weight"][3, 4] = math.nan
    folder = native_folder(Env(ctx, tmp_path), weights=weights)
    with pytest.raises(InputError, match=r"layers.1.feed_forward.w2.weight.*nan at index \[3, 4\]"):
        load_model(folder)
    assert load_model(folder, check_finite=False).layers[1].feed_forward.w2.weight.isnan().any()


def test_json_depth_is_counted_outside_strings():
    for text, depth in [(b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": []}]}', 4), (b'["[[[[", "\\\\", "\\"]"]', 1),
                        (b'{"": "", "[": [[""]]}', 3), (nested(70).encode(), 65), (b'[{"a": "}"}]', 2)]:
        assert inputs.json_depth(text) == depth, text


# ---- the tokenizer: text of any length encodes, with the ids of unchunked encoding

@pytest.fixture(scope="module")
def v11(ctx) -> tuple:
    """Our v11 Tekken tokenizer and mistral-common's, on the official vocabulary."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    return ctx.tokenizer, Tekkenizer.from_file(ctx.repo / "tekken.json")


def test_a_million_spaces_encode(v11):
    ours, _ = v11
    text = " " * 1_000_000
    with pytest.raises(BaseException, match="StackOverflow"):   # tiktoken alone: a Rust panic
        ours._bpe.encode_ordinary(text)
    for s in (text, "x" + text + "y", "a\n" + "\t" * 1_000_000 + "!", " \u3000" * 600_000):
        ids = ours.encode(s)
        assert ours.decode(ids) == s


WHITE = [chr(c) for c in (9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                          0x202F, 0x205F, 0x3000)]
NEAR_WHITE = ["\x1c", "\x1d", "\x1e", "\x1f", "\u180e", "\u200b", "\ufeff"]   # str.isspace or once White_Space


def blank_mixtures(count: int = 4000, seed: int = 0) -> list[str]:
    """Short texts dense in blanks of every kind, line breaks, and what can follow blanks."""
    import random
    rng = random.Random(seed)
    parts = WHITE + NEAR_WHITE + ["a", "B", "1", "!", "/", "中", "\u0301", "'s", " x", "\r\n", "\n\n", "  "]
    return ["".join(rng.choice(parts) for _ in range(rng.randrange(1, 30))) for _ in range(count)]


def test_cutting_blank_runs_keeps_the_ids(v11, monkeypatch):
    """With runs cut from 2 blanks on, our ids equal tiktoken's unchunked ones on the tokenizer corpus
    and on blank-heavy mixtures; cutting whole runs instead (a wrong rule) is caught."""
    from test_tokenizer import CORPUS
    ours, _ = v11
    texts = CORPUS + blank_mixtures()
    monkeypatch.setattr(tokenizer, "LONG_BLANKS", 2)
    cut = sum(len(list(tokenizer.long_blank_pieces(s))) for s in texts)
    differ = [s for s in texts if ours.encode(s) != ours._bpe.encode_ordinary(s)]
    print(f"{len(texts)} texts, {cut} blank pieces cut out, {len(differ)} differ")
    assert cut > 1000 and differ == []
    # Negative control: the whole run, its last blank included, as one piece.
    monkeypatch.setattr(tokenizer, "long_blank_pieces", lambda s, n=None: (
        m.span() for m in tokenizer._blank_runs(2).finditer(s)))
    assert sum(ours.encode(s) != ours._bpe.encode_ordinary(s) for s in texts) > 100


@pytest.mark.parametrize("text", [
    " " * 300_000, "x" + " " * 300_000 + "y", "!\n\n" + "\t" * 200_000 + "word", " \n" * 150_000 + " " * 200_000 + ".",
    "a" + "\u3000" * 200_000, "\u00a0" * 100_000 + "\n" * 100_000, "code:" + " " * 250_000,
], ids=["spaces", "between-letters", "tabs-after-punctuation", "mixed-then-spaces", "ideographic", "nbsp-newlines",
        "trailing"])
def test_long_runs_equal_mistral_common(v11, text):
    """Where mistral-common itself does not crash (runs under about 800,000 blanks), the same ids."""
    ours, theirs = v11
    assert ours.encode(text) == theirs.encode(text, bos=False, eos=False)
