"""GGUF files in the reference: the loader against the native path (on the dequantized weights) and against
transformers' own GGUF reader, the mmproj, the tokenizer, memory, and the header parser against gguf's.

Files are written by tests/gguf_files.py from tiny random checkpoints, as llama.cpp's converter lays them out.
"""
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

import generate
import gguf_file
import quants
from checkpoints import (TINY_VISION_PARAMS, image_tokens, permute_rotary, random_weights, real_text_shapes,
                         real_vision_shapes)
from gguf_files import (QUANT_PARAMS, VISION_PREFIXES, decoded, dequantized_mmproj, text_type, write_mmproj,
                        write_random_q4_k, write_text_gguf)
from inputs import InputError
from load import build_model, load_model, parse_params

P = QUANT_PARAMS
VISION_PARAMS = {**P, "vision_encoder": {**TINY_VISION_PARAMS["vision_encoder"], "num_hidden_layers": 3}}
# Every type the tests can write from float weights (gguf's quantizer, and Q4_K / Q2_K packed here)
MIXED = {"attention.wq": "Q4_K", "attention.wk": "Q8_0", "attention.wv": "Q5_1", "attention.wo": "F16",
         "feed_forward.w1": "Q2_K", "feed_forward.w2": "Q4_0", "feed_forward.w3": "BF16",
         "tok_embeddings": "Q4_1", "output": "Q5_0"}


def mixed(name: str) -> str:
    return next(t for part, t in MIXED.items() if part in name)


@pytest.fixture(scope="module")
def weights():
    return random_weights(real_text_shapes(P), seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def native_model(weights: dict, params: dict = P):
    model = build_model(*parse_params(params))
    model.load_state_dict(weights)
    return model.eval()


def dequantized(weights: dict, types) -> dict:
    """The weights as a reader of the file gets them back."""
    return {name: decoded(w, text_type(name, types)) for name, w in weights.items()}


def tokens(length: int = 11, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, P["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(length))


@torch.no_grad()
def diff(a, b, toks=None) -> float:
    toks = tokens() if toks is None else toks
    return (a(toks) - b(toks)).abs().max().item()


@torch.no_grad()
def transformers_model(folder, name: str):
    """transformers reading the GGUF itself: its config, its dequantization and its q / k permutation."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name)).eval()
    # load_gguf_checkpoint rather than from_pretrained(gguf_file=), which also wants accelerate
    state = load_gguf_checkpoint(str(folder / name), return_tensors=True, model_to_load=model)["tensors"]
    assert not model.load_state_dict(state, strict=False).missing_keys
    return model


class HFLogits(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, toks):
        return self.hf(toks).logits.float()


# ----------------------------------------------------------------------------- the text model

@pytest.mark.parametrize("tied", [False, True])
def test_float32_file_equals_the_native_path_exactly(weights, folder, tied):
    w = dict(weights, **{"output.weight": weights["tok_embeddings.weight"]}) if tied else weights
    write_text_gguf(folder / f"f32_{tied}.gguf", w, P, tied=tied)
    ours = load_model(folder / f"f32_{tied}.gguf")
    assert ours.output.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr() if tied else True
    assert diff(ours, native_model(w)) == 0


@pytest.mark.parametrize("types", ["Q8_0", "Q4_K", "Q2_K", "mixed"])
def test_quantized_file_equals_the_native_path_on_its_dequantized_weights(weights, folder, types):
    kind = mixed if types == "mixed" else types
    write_text_gguf(folder / f"{types}.gguf", weights, P, kind)
    ours = load_model(folder / f"{types}.gguf")
    assert isinstance(ours.layers[0].attention.wq, quants.QuantLinear)
    d = diff(ours, native_model(dequantized(weights, kind)))
    print(f"{types}: max abs diff against the native path on the dequantized weights {d:.1e}")
    assert d <= 1e-5


@pytest.mark.parametrize("types", ["F32", "Q8_0", "Q4_K", "mixed"])
def test_quantized_file_equals_transformers_reading_it(weights, folder, types):
    name = f"hf_{types}.gguf"
    write_text_gguf(folder / name, weights, P, mixed if types == "mixed" else types)
    d = diff(load_model(folder / name), HFLogits(transformers_model(folder, name)))
    print(f"{types}: max abs diff against transformers' GGUF loading {d:.1e}")
    assert d <= 1e-4


@pytest.mark.parametrize("which", ["wq", "wk"])
def test_a_q_k_permutation_applied_by_mistake_fails(weights, folder, which):
    """GGUF keeps the native interleaved rows: permuting them to rotate-half (as for transformers) is a bug
    the comparison sees, for wq and for wk (by the kv heads)."""
    heads = P["n_heads"] if which == "wq" else P["n_kv_heads"]
    permute = lambda name, w: permute_rotary(w, heads) if f"attention.{which}." in name else w  # noqa: E731
    write_text_gguf(folder / f"perm_{which}.gguf", weights, P, permute=permute)
    assert diff(load_model(folder / f"perm_{which}.gguf"), native_model(weights)) > 1e-2


def test_mistral3_architecture_and_a_split_set(weights, folder):
    write_text_gguf(folder / "split.gguf", weights, P, "Q8_0", arch="mistral3", split=8)
    parts = sorted(folder.glob("split-*-of-*.gguf"))
    assert len(parts) == 3 and parts[0].name == "split-00001-of-00003.gguf"
    assert diff(load_model(parts[1]), native_model(dequantized(weights, "Q8_0"))) <= 1e-5


def test_head_dim_falls_back_to_dim_over_heads_and_the_shape_check_names_the_tensor(weights, folder):
    path = folder / "no_key_length.gguf"
    write_text_gguf(path, weights, P)
    meta = gguf_file.read_gguf(path).metadata
    del meta["llama.attention.key_length"]
    assert gguf_file.text_args(meta, "x").head_dim == P["dim"] // P["n_heads"]


def test_unsupported_type_is_refused_with_the_tensor_name(weights, folder):
    path = folder / "tq.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, 54 * 2), np.uint8), raw_dtype=quants.GGMLQuantizationType.TQ1_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    info = gguf_file.read_gguf(path).tensors["blk.0.attn_q.weight"]
    with pytest.raises(InputError, match=r"blk\.0\.attn_q\.weight.*TQ1_0"):
        gguf_file._quantized_module(torch.nn.Linear(1, 1), torch.zeros(1), info, str(path), torch.float32)


def test_not_a_gguf_and_a_truncated_file(folder, weights):
    (folder / "bad.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(InputError, match="not a GGUF file"):
        load_model(folder / "bad.gguf")
    write_text_gguf(folder / "whole.gguf", weights, P, "Q8_0")
    (folder / "cut.gguf").write_bytes((folder / "whole.gguf").read_bytes()[:-1000])
    with pytest.raises(InputError, match="runs past the end"):
        load_model(folder / "cut.gguf")


def test_header_parser_equals_gguf_reader(weights, folder):
    path = folder / "reader.gguf"
    write_text_gguf(path, weights, P, mixed)
    ours, theirs = gguf_file.read_gguf(path), GGUFReader(path)
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert (mine.type_name, mine.shape, mine.n_bytes) == (t.tensor_type.name, tuple(t.data.shape[:1]) +
                                                               mine.shape[1:], t.n_bytes)
        assert np.array_equal(gguf_file._tensor_bytes(gguf_file._mapped(path), mine).numpy().ravel(), t.data.view(np.uint8).ravel())


def test_quantized_model_holds_no_dequantized_copy(weights, folder):
    write_text_gguf(folder / "held.gguf", weights, P, "Q4_K")
    model = load_model(folder / "held.gguf")
    tensors = list(model.parameters()) + list(model.buffers())
    floats = sum(t.numel() * t.element_size() for t in tensors if t.is_floating_point())
    blocks = sum(t.numel() for t in tensors if t.dtype == torch.uint8)
    assert floats == 4 * (2 * P["n_layers"] + 1) * P["dim"]            # the norms alone
    assert blocks == sum(info.n_bytes for info in gguf_file.read_gguf(folder / "held.gguf").tensors.values()
                         if info.type_name == "Q4_K")


def test_the_decoding_step_is_one_graph(weights, folder):
    write_text_gguf(folder / "compiled.gguf", weights, P, mixed)
    model = load_model(folder / "compiled.gguf")
    model.setup_cache(1, 8)
    explained = torch._dynamo.explain(generate.decode_step)(model, torch.tensor([[10]]), torch.tensor([3]))
    assert explained.graph_count == 1 and explained.graph_break_count == 0


MEMORY_SCRIPT = """
import sys, torch
sys.path[:0] = [".", "tests"]
from load import build_model, load_model
from gguf_files import QUANT_PARAMS
from load import parse_params
def status(key): return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
# torch's one-off costs of a first model built on the meta device and a first forward (about 75 MB)
tiny = parse_params({**QUANT_PARAMS, "n_layers": 1})
with torch.device("meta"):
    build_model(*tiny)
with torch.no_grad():
    build_model(*tiny)(torch.tensor([[1, 2, 3]]))
open("/proc/self/clear_refs", "w").write("5")   # resets VmHWM, the peak, to the present
base = status("VmRSS")
model = load_model(sys.argv[1])
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))   # reads every block once
print(status("VmHWM") - base)   # VmHWM: this process's peak (ru_maxrss would include pytest's, across exec)
"""


def test_peak_memory_of_a_q4_k_model_is_about_its_file_size(tmp_path):
    """A 230-layer Q4_K model of 100 MB (random blocks), loaded and run once in a fresh process: the blocks
    are the file's pages, and only one matrix at a time (200 k weights here) is dequantized."""
    params = {**P, "n_layers": 230, "dim": 256, "hidden_dim": 768}
    write_random_q4_k(tmp_path / "big.gguf", params)
    size = (tmp_path / "big.gguf").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big.gguf")], capture_output=True,
                         text=True, check=True)
    peak = int(out.stdout.split()[-1])
    print(f"peak resident memory {peak / 1e6:.0f} MB for a file of {size / 1e6:.0f} MB ({peak / size:.2f} x)")
    assert peak <= 1.15 * size


# ----------------------------------------------------------------------------- the mmproj

@pytest.fixture(scope="module")
def vision_weights():
    shapes = {**real_text_shapes(VISION_PARAMS), **real_vision_shapes(VISION_PARAMS)}
    return random_weights(shapes, seed=2)


def vision_inputs():
    pixels = torch.randn(3, 56, 84, generator=torch.Generator().manual_seed(0))   # 2 x 3 image tokens
    toks = torch.tensor([[1, 3, *image_tokens(2, 3), 500, 600, 4]])
    return toks, [pixels]


@torch.no_grad()
def vision_diff(ours, weights) -> float:
    toks, images = vision_inputs()
    return (ours(toks, images=images) - native_model(weights, VISION_PARAMS)(toks, images=images)).abs().max().item()


def test_mmproj_gives_the_native_multimodal_logits(vision_weights, folder):
    (folder / "mm").mkdir()
    write_text_gguf(folder / "mm" / "text.gguf", vision_weights, VISION_PARAMS, "Q8_0")
    write_mmproj(folder / "mm" / "mmproj-F32.gguf", vision_weights, VISION_PARAMS, "F32")
    ours = load_model(folder / "mm" / "text.gguf")   # the mmproj found beside
    text = {k: decoded(w, text_type(k, "Q8_0")) for k, w in vision_weights.items() if not k.startswith(VISION_PREFIXES)}
    d = vision_diff(ours, {**vision_weights, **text})
    print(f"mmproj F32 + text Q8_0: max abs diff against the native path {d:.1e}")
    assert d <= 1e-5
    assert type(load_model(folder / "mm" / "text.gguf", mmproj=False)).__name__ == "Transformer"


@pytest.mark.parametrize("types", ["F16", "Q8_0"])
def test_quantized_mmproj(vision_weights, folder, types):
    write_text_gguf(folder / "vtext.gguf", vision_weights, VISION_PARAMS)
    write_mmproj(folder / f"mmproj_{types}.gguf", vision_weights, VISION_PARAMS, types)
    ours = load_model(folder / "vtext.gguf", mmproj=folder / f"mmproj_{types}.gguf")
    quantized = isinstance(ours.vision_encoder.transformer.layers[0].attention.wq, quants.QuantLinear)
    assert quantized == (types == "Q8_0")
    d = vision_diff(ours, dequantized_mmproj(vision_weights, types))
    print(f"mmproj {types}: max abs diff against the native path on the dequantized weights {d:.1e}")
    assert d <= 1e-5


def test_a_vision_permutation_applied_by_mistake_fails(vision_weights, folder):
    write_text_gguf(folder / "vtext.gguf", vision_weights, VISION_PARAMS)
    heads = VISION_PARAMS["vision_encoder"]["num_attention_heads"]
    wrong = {k: permute_rotary(w, heads) if k.startswith("vision_encoder") and ".wk." in k else w
             for k, w in vision_weights.items()}
    write_mmproj(folder / "mmproj_perm.gguf", wrong, VISION_PARAMS, "F32")
    assert vision_diff(load_model(folder / "vtext.gguf", mmproj=folder / "mmproj_perm.gguf"), vision_weights) > 1e-3


def test_mmproj_that_says_gelu_is_warned_and_runs_silu(vision_weights, folder):
    write_mmproj(folder / "gelu.gguf", vision_weights, VISION_PARAMS, "F32", activation="gelu")
    with pytest.warns(UserWarning, match="use_gelu.*SiLU"):
        ours = load_model(folder / "vtext.gguf", mmproj=folder / "gelu.gguf")
    assert vision_diff(ours, vision_weights) <= 1e-5


def test_text_file_as_mmproj_is_refused(weights, folder):
    write_text_gguf(folder / "t.gguf", weights, P)
    with pytest.raises(InputError, match="not a Pixtral mmproj"):
        load_model(folder / "t.gguf", mmproj=folder / "t.gguf")


# ----------------------------------------------------------------------------- the tokenizer

@pytest.fixture(scope="module", params=["v7", "v11"])
def gguf_tekken(request, tmp_path_factory):
    """A GGUF holding only a tokenizer, made from an official-layout tekken.json of the real vocabulary as
    llama.cpp's converter writes it; with that tekken.json."""
    import json
    from tekken_files import write_tekken
    from gguf_files import add_tokenizer, tekken_tokens, _finish
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    tekken = write_tekken(folder, request.param)
    w = GGUFWriter(str(folder / "tok.gguf"), "llama")
    tokens, types = tekken_tokens(json.loads(tekken.read_text(encoding="utf-8")))
    add_tokenizer(w, tokens, types)
    _finish(w)
    return request.param, folder / "tok.gguf", tekken


def test_gguf_tokenizer_gives_mistral_common_ids(gguf_tekken):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from test_tokenizer import CONTROL_LOOKALIKES, CORPUS, differences
    from tokenizer import Tokenizer
    version, path, tekken = gguf_tekken
    ours, theirs = Tokenizer.from_file(path), Tekkenizer.from_file(tekken)
    assert ours.version == version and ours.n_words == 131072
    assert [ours.special_id(n) for n in ("[INST]", "[IMG]", "[IMG_BREAK]", "<pad>")] == [3, 10, 12, 11]
    problems = {s: found for s in CORPUS if (found := differences(ours, theirs, s))}
    print(f"\n{version}: {len(CORPUS)} strings compared, {len(problems)} mismatches")
    assert not problems
    for text in CONTROL_LOOKALIKES:   # text never becomes a control token
        assert not any(ours.is_special(i) for i in ours.encode(text))


def test_a_tokenizer_that_is_not_tekken_is_refused(tmp_path):
    from gguf_files import add_tokenizer, _finish
    from tokenizer import Tokenizer
    w = GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    add_tokenizer(w, ["a", "b"], [1, 1], pre="llama-bpe")
    _finish(w)
    with pytest.raises(InputError, match="not a Tekken tokenizer"):
        Tokenizer.from_file(tmp_path / "llama3.gguf")
