"""Found once, read once: read_checkpoint and the one loop over the tensors of every layout.

A counted trace of the command line (each file of a checkpoint opened once, each GGUF header parsed once),
load_model taking a Checkpoint, the finiteness check on a GGUF's float tensors, and the file-finding errors.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import gguf_header
from checkpoints import TINY_VISION_PARAMS, random_weights, real_text_shapes, real_vision_shapes, write_native
from gguf_files import QUANT_PARAMS, tekken_tokens, write_mmproj, write_text_gguf
from inputs import InputError
from load import load_model
from tekken_files import write_tekken

ROOT = Path(__file__).parents[1]
PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same tiny multimodal model as an official folder (params.json, tekken.json, SYSTEM_PROMPT.txt) and
    as GGUF files (an F32 text file with the tokenizer, an F32 mmproj beside it); and an image."""
    native = tmp_path_factory.mktemp("native")
    weights = write_native(native, PARAMS, seed=3)
    tekken = write_tekken(native, "v11")
    (native / "SYSTEM_PROMPT.txt").write_text("You are {name}. Today is {today}.")
    gguf = tmp_path_factory.mktemp("gguf")
    tokens, types = tekken_tokens(json.loads(tekken.read_text(encoding="utf-8")))
    write_text_gguf(gguf / "Tiny-F32.gguf", weights, PARAMS, tokenizer={"tokens": tokens, "types": types})
    write_mmproj(gguf / "mmproj-F32.gguf", weights, PARAMS, "F32")
    image = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(image)
    return native, gguf / "Tiny-F32.gguf", image


# ----------------------------------------------------------------------------- the counted trace

# Runs the command line in a fresh process with an audit hook that counts every open() of the files under
# the given folders (os.open too; not the maps safetensors makes in Rust), and counts the GGUF header parses.
TRACE = """
import collections, json, os, sys
folders = [os.path.realpath(f) for f in sys.argv[1].split(os.pathsep)]
opens = collections.Counter()
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(path.startswith(f + os.sep) for f in folders):
            opens[path] += 1
sys.addaudithook(hook)
import generate, gguf_header
parses, parse = collections.Counter(), gguf_header._parse
gguf_header._parse = lambda path: parses.update([os.path.realpath(path)]) or parse(path)
codes = [generate.main(json.loads(args)) for args in sys.argv[2:]]
print(json.dumps({"codes": codes, "opens": opens, "parses": parses}))
"""


def test_the_command_line_reads_each_file_once(files):
    """An answer about an image from the official folder, then from the GGUF text file with its mmproj:
    params.json and tekken.json are opened once; each GGUF header is parsed once (the tokenizer and the
    loader use the parsed header) and its file opened twice: for the header, then mapped for the tensors."""
    native, gguf, image = files
    flags = ["--max-tokens", "2", "--temperature", "0", "--dtype", "float32", "--image", str(image), "What is it?"]
    runs = [["--model", str(native), *flags], ["--model", str(gguf), *flags]]
    out = subprocess.run([sys.executable, "-c", TRACE, os.pathsep.join([str(native), str(gguf.parent)]),
                          *map(json.dumps, runs)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.splitlines()[-1])
    opens = {os.path.relpath(path, os.path.realpath(native.parent)): n for path, n in found["opens"].items()}
    parses = {os.path.relpath(path, os.path.realpath(native.parent)): n for path, n in found["parses"].items()}
    print(f"\nopens {opens}\nheader parses {parses}")
    assert found["codes"] == [0, 0]
    native, gguf, mmproj = native.name, f"{gguf.parent.name}/{gguf.name}", f"{gguf.parent.name}/mmproj-F32.gguf"
    assert opens == {f"{native}/params.json": 1, f"{native}/tekken.json": 1, f"{native}/SYSTEM_PROMPT.txt": 1,
                     gguf: 2, mmproj: 2}
    assert parses == {gguf: 1, mmproj: 1}


def test_load_model_takes_the_checkpoint_and_parses_no_header_again(files, monkeypatch):
    """The Checkpoint keeps the parsed headers: loading from it parses nothing, and gives the model that
    loading from the path gives."""
    _, gguf, _ = files
    parsed, parse = [], gguf_header._parse
    monkeypatch.setattr(gguf_header, "_parse", lambda path: parsed.append(path.name) or parse(path))
    read = checkpoint.read_checkpoint(gguf)
    assert parsed == ["Tiny-F32.gguf", "mmproj-F32.gguf"]
    assert read.tokenizer.n_words == 131072 and read.mmproj == gguf.parent / "mmproj-F32.gguf"
    model = load_model(read)
    assert len(parsed) == 2
    again = load_model(gguf)
    assert len(parsed) == 4   # the control: a path is read anew, and the count sees it
    toks = torch.tensor([[1, 3, 500, 600, 4]])
    with torch.no_grad():
        assert torch.equal(model(toks), again(toks))


# ----------------------------------------------------------------------------- finiteness of a GGUF's floats

VISION = {**QUANT_PARAMS, "vision_encoder": {**TINY_VISION_PARAMS["vision_encoder"], "num_hidden_layers": 2}}


@pytest.mark.parametrize("name, types, key", [
    ("layers.1.feed_forward.w2.weight", "F16", "blk.1.ffn_down.weight"),         # a float matrix
    ("layers.0.attention_norm.weight", "Q8_0", "blk.0.attn_norm.weight"),        # the F32 norm of a quantized file
    ("vision_encoder.transformer.layers.1.ffn_norm.weight", "F16", "v.blk.1.ln2.weight"),   # in the mmproj
])
def test_a_nan_in_a_gguf_float_tensor_is_refused_naming_it(tmp_path, name, types, key):
    weights = random_weights({**real_text_shapes(VISION), **real_vision_shapes(VISION)}, seed=4)
    index = (3, 4) if weights[name].ndim == 2 else (5,)
    weights[name][index] = math.nan
    write_text_gguf(tmp_path / "text.gguf", weights, VISION, types)
    write_mmproj(tmp_path / "mmproj.gguf", weights, VISION, types)
    where = "mmproj.gguf" if key.startswith("v.") else "text.gguf"
    with pytest.raises(InputError, match=rf"{where}: tensor '{key}' holds a non-finite value \(nan at index "
                                         rf"\[{', '.join(map(str, index))}\]\)"):
        load_model(tmp_path / "text.gguf")
    # the control: the same file loads unchecked, and holds the NaN where it was written
    model = load_model(tmp_path / "text.gguf", check_finite=False)
    assert model.get_parameter(name)[index].isnan()


# ----------------------------------------------------------------------------- finding the files

def test_an_mmproj_with_a_model_folder_is_refused(files):
    native, gguf, _ = files
    with pytest.raises(InputError, match=r"mmproj=.*mmproj-F32.gguf: only a GGUF model takes an mmproj"):
        checkpoint.read_checkpoint(str(native), mmproj=str(gguf.parent / "mmproj-F32.gguf"))
    assert checkpoint.read_checkpoint(str(native), mmproj="none").vision is not None   # its own tower


def test_one_hub_failure_message_for_a_model_and_a_quant(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    for model, include in [("someone/Model", "params.json"), ("someone/Model-GGUF:Q4_K_M", "'*Q4_K_M*.gguf'")]:
        with pytest.raises(InputError) as error:
            checkpoint.read_checkpoint(model)
        message = str(error.value)
        assert message.startswith(f"model={model}: could not get the files from the Hugging Face hub (OSError: "
                                  f"network unreachable)")
        assert f"--include {include}" in message and "--local-dir DIR" in message
