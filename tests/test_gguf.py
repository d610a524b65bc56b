"""GGUF files in the reference: the loader against the native path (on the dequantized weights) and against
transformers' own GGUF reader, the mmproj, the tokenizer, memory, and the header parser against gguf's.

Files are written by tests/gguf_files.py from tiny random checkpoints, as llama.cpp's converter lays them out.
"""
import json
import os
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import checkpoint
import generate
import gguf_file
import quant_report
import quants
from checkpoints import (TINY_VISION_PARAMS, image_tokens, permute_rotary, random_weights, real_text_shapes,
                         real_vision_shapes, write_native)
from gguf_files import (QUANT_PARAMS, VISION_PREFIXES, add_tokenizer, decoded, dequantized_mmproj, finish,
                        tekken_tokens, text_type, write_mmproj, write_random_q4_k, write_text_gguf)
from inputs import InputError
from config import parse_params
from load import build_model, load_model
from tekken_files import write_tekken
from test_tokenizer import CONTROL_LOOKALIKES, CORPUS, differences

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
    ours = load_model(folder / f"{types}.gguf", quant_math="exact")
    assert isinstance(ours.layers[0].attention.wq, quants.QuantLinear)
    d = diff(ours, native_model(dequantized(weights, kind)))
    print(f"{types}: max abs diff against the native path on the dequantized weights {d:.1e}")
    assert d <= 1e-5


def test_a_quantized_tied_head_shares_the_embedding_blocks(weights, folder):
    tied = dict(weights, **{"output.weight": weights["tok_embeddings.weight"]})
    write_text_gguf(folder / "tied_q4_k.gguf", tied, P, "Q4_K", tied=True)
    ours = load_model(folder / "tied_q4_k.gguf", quant_math="exact")
    assert ours.output.blocks.data_ptr() == ours.tok_embeddings.blocks.data_ptr()
    assert diff(ours, native_model(dequantized(tied, "Q4_K"))) <= 1e-5


@pytest.mark.parametrize("types", ["F32", "Q8_0", "Q4_K", "mixed"])
def test_quantized_file_equals_transformers_reading_it(weights, folder, types):
    name = f"hf_{types}.gguf"
    write_text_gguf(folder / name, weights, P, mixed if types == "mixed" else types)
    d = diff(load_model(folder / name, quant_math="exact"), HFLogits(transformers_model(folder, name)))
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


def test_without_key_length_head_dim_is_dim_over_heads_and_the_shape_check_names_the_tensor(weights, folder):
    """As llama.cpp: head_dim = D / H (here 128, not the model's 64), which attn_q's shape then refutes."""
    write_text_gguf(folder / "no_key_length.gguf", weights, P, key_length=False)
    assert gguf_file.text_args(gguf_file.read_gguf(folder / "no_key_length.gguf").metadata, "x").head_dim == 128
    with pytest.raises(InputError, match=r"blk\.0\.attn_q\.weight' has shape \(256, 512\), expected \(512, 512\)"):
        load_model(folder / "no_key_length.gguf")


def test_unsupported_type_is_refused_with_the_tensor_name(weights, folder):
    path = folder / "tq.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((256, 54 * 2), np.uint8), raw_dtype=quants.GGMLQuantizationType.TQ1_0)
    finish(w)
    with pytest.raises(InputError, match=r"blk\.0\.attn_q\.weight.*TQ1_0"):
        gguf_file.read_gguf(path)   # refused with the header, before a model is built


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
        assert mine.type_name == t.tensor_type.name and mine.n_bytes == t.n_bytes
        assert mine.shape == tuple(int(n) for n in reversed(t.shape))   # GGUF's ne, innermost first
        with open(path, "rb") as file:
            assert np.array_equal(gguf_file.tensor_bytes(file, mine).numpy().ravel(), t.data.view(np.uint8).ravel())


def test_quantized_model_holds_no_dequantized_copy(weights, folder):
    write_text_gguf(folder / "held.gguf", weights, P, "Q4_K")
    model = load_model(folder / "held.gguf", quant_math="exact")
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
import quants
from gguf_files import QUANT_PARAMS
from config import parse_params
from load import build_model, load_model
def status(key): return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
# torch's one-off costs (about 75 MB): a first model built on the meta device, a first forward, the code
# of a first Q4_K dequantization and of a first int4 product
tiny = parse_params({**QUANT_PARAMS, "n_layers": 1})
with torch.device("meta"):
    build_model(*tiny)
with torch.no_grad():
    build_model(*tiny)(torch.tensor([[1, 2, 3]]))
    quants.dequantize(torch.zeros(4, 144, dtype=torch.uint8), "Q4_K", (4, 256))
    quants.Int4Linear(torch.zeros(64, 144, dtype=torch.uint8), "Q4_K", (64, 256))(torch.zeros(1, 256))
open("/proc/self/clear_refs", "w").write("5")   # resets VmHWM, the peak, to the present
base = status("VmRSS")
model = load_model(sys.argv[1], quant_math=sys.argv[2])
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))   # reads every block once
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(held, status("VmHWM") - base)   # VmHWM: this process's peak (ru_maxrss would include pytest's, across exec)
"""


@pytest.mark.parametrize("quant_math", ["exact", "fast"])
def test_peak_memory_of_a_q4_k_model_is_about_its_file_size(tmp_path, quant_math):
    """A 115-layer Q4_K model of 103 MB (random blocks), loaded and run once in a fresh process. exact: the
    blocks are the file's pages, and only one matrix at a time (400 k weights here) is dequantized. fast:
    each matrix repacked for the int4 kernel (5 bits a weight against the file's 4.5: 1.11 x) as it is read,
    its file pages unmapped behind it."""
    params = {**P, "n_layers": 115, "hidden_dim": 768}
    write_random_q4_k(tmp_path / "big.gguf", params)
    size = (tmp_path / "big.gguf").stat().st_size
    # A fixed mmap threshold: glibc's adaptive one keeps freed dequantization buffers in its heap, 0-10 MB
    # of noise from run to run that is the allocator's, not the model's.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big.gguf"), quant_math],
                         capture_output=True, text=True, check=True, env=env)
    held, peak = map(int, out.stdout.split()[-2:])
    print(f"peak resident memory {peak / 1e6:.0f} MB for a file of {size / 1e6:.0f} MB ({peak / size:.2f} x), "
          f"the model's tensors {held / 1e6:.0f} MB")
    if quant_math == "exact":
        assert peak <= 1.15 * size
    else:   # what the model holds, and a matrix's temporaries at a time: loading never doubles the file
        assert held <= 1.12 * size and peak <= 1.15 * held


# ----------------------------------------------------------------------------- the fast path (quants.py)

INT4_TYPES, FUSED_TYPES = ("Q4_0", "Q4_1", "Q4_K"), ("Q8_0", "Q5_K", "Q6_K")


@torch.inference_mode()
def forced_logits(model, toks: torch.Tensor, prompt: int = 6) -> torch.Tensor:
    """[S, V]: a prefill of the first `prompt` tokens (matrix products), then one-token decoding steps
    (matrix-vector products), teacher-forced through the rest of toks [1, S]."""
    model.setup_cache(1, toks.shape[1])
    out = [generate.prefill(model, toks[0, :prompt].tolist(), [], all_logits=True)[0]]
    for i in range(prompt, toks.shape[1]):
        out.append(generate.decode_step(model, toks[:, i:i + 1], torch.tensor([i]), kv_len=i + 1)[0])
    return torch.cat(out)


def fast_against_exact(weights, folder, name: str) -> tuple[float, float, float]:
    """(max |fast - exact| logit, max |exact - float32 checkpoint| (the quantization error), top-1 agreement)."""
    write_text_gguf(folder / f"fast_{name}.gguf", weights, P, name)
    toks = tokens(16, 1)
    exact = forced_logits(load_model(folder / f"fast_{name}.gguf", quant_math="exact"), toks)
    fast = forced_logits(load_model(folder / f"fast_{name}.gguf"), toks)
    quantization = (exact - forced_logits(native_model(weights), toks)).abs().max().item()
    agree = (fast.argmax(-1) == exact.argmax(-1)).float().mean().item()
    return (fast - exact).abs().max().item(), quantization, agree


@pytest.mark.parametrize("name", INT4_TYPES + FUSED_TYPES)
def test_the_fast_path_is_close_to_the_exact_one(weights, folder, name):
    """Int4 types: the activations, each group's scale and zero and each product in bfloat16 (the kernels'
    type): their logits stay within a tenth of the quantization error itself. Fused types: the prefill's
    weights are gguf's, its products the same; a decoding step sums in another order (float32)."""
    diff, quantization, agree = fast_against_exact(weights, folder, name)
    print(f"{name}: fast vs exact {diff:.1e} (quantization error {quantization:.1e}), top-1 agreement {agree:.0%}")
    if name in INT4_TYPES:
        assert diff <= 0.1 * quantization and agree >= 0.9
    else:
        assert diff <= 1e-4 and agree == 1


def test_a_wrong_int4_zero_is_outside_the_fast_paths_bound(weights, folder, monkeypatch):
    """The negative control: Q4_K repacked without its mins (the zero 8 * scale alone)."""
    monkeypatch.setitem(quants._INT4, "Q4_K", lambda b: (*quants._int4_q4_k(b)[:2], 8 * quants._int4_q4_k(b)[1]))
    diff, quantization, _ = fast_against_exact(weights, folder, "Q4_K")
    assert diff > 0.1 * quantization


def test_fast_modules_by_type_and_the_exact_path_on_request(weights, folder):
    write_text_gguf(folder / "modules.gguf", weights, P, mixed)
    fast, exact = load_model(folder / "modules.gguf"), load_model(folder / "modules.gguf", quant_math="exact")
    layer = fast.layers[0]
    kinds = [type(m).__name__ for m in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                                          layer.feed_forward.w1, layer.feed_forward.w2, fast.output)]
    assert kinds == ["Int4Linear", "FusedLinear", "QuantLinear", "QuantLinear", "Int4Linear", "QuantLinear"]
    assert all(type(m).__name__ == "QuantLinear" for m in exact.modules() if hasattr(m, "qtype")
               and not isinstance(m, quants.QuantEmbedding))
    with pytest.raises(InputError, match="quant_math 'quick': expected one of"):
        load_model(folder / "modules.gguf", quant_math="quick")


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
    write_mmproj(folder / f"vproj_{types}.gguf", vision_weights, VISION_PARAMS, types)
    ours = load_model(folder / "vtext.gguf", mmproj=folder / f"vproj_{types}.gguf", quant_math="exact")
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
    write_mmproj(folder / "vproj_perm.gguf", wrong, VISION_PARAMS, "F32")
    assert vision_diff(load_model(folder / "vtext.gguf", mmproj=folder / "vproj_perm.gguf"), vision_weights) > 1e-3


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
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    tekken = write_tekken(folder, request.param)
    w = GGUFWriter(str(folder / "tok.gguf"), "llama")
    tokens, types = tekken_tokens(json.loads(tekken.read_text(encoding="utf-8")))
    add_tokenizer(w, tokens, types)
    finish(w)
    return request.param, folder / "tok.gguf", tekken


def test_gguf_tokenizer_gives_mistral_common_ids(gguf_tekken):
    version, path, tekken = gguf_tekken
    ours, theirs = gguf_file.gguf_tokenizer(gguf_file.read_gguf(path)), Tekkenizer.from_file(tekken)
    assert ours.version == version and ours.n_words == 131072
    assert [ours.special_id(n) for n in ("[INST]", "[IMG]", "[IMG_BREAK]", "<pad>")] == [3, 10, 12, 11]
    problems = {s: found for s in CORPUS if (found := differences(ours, theirs, s))}
    print(f"\n{version}: {len(CORPUS)} strings compared, {len(problems)} mismatches")
    assert not problems
    for text in CONTROL_LOOKALIKES:   # text never becomes a control token
        assert not any(ours.is_special(i) for i in ours.encode(text))


def test_a_tokenizer_that_is_not_tekken_is_refused(tmp_path):
    w = GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    add_tokenizer(w, ["a", "b"], [1, 1], pre="llama-bpe")
    finish(w)
    with pytest.raises(InputError, match="not a Tekken tokenizer"):
        gguf_file.gguf_tokenizer(gguf_file.read_gguf(tmp_path / "llama3.gguf"))


# ----------------------------------------------------------------------------- the command line

CLI_PARAMS = {**TINY_VISION_PARAMS, "vocab_size": 131072, "max_position_embeddings": 600}


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """The same tiny multimodal model as an official folder (tekken.json) and as GGUF files: an F32 text file
    with the tokenizer, and an F32 mmproj beside it."""
    native = tmp_path_factory.mktemp("native")
    weights = write_native(native, CLI_PARAMS, seed=3)
    tekken = write_tekken(native, "v11")
    gguf = tmp_path_factory.mktemp("gguf")
    tokens, types = tekken_tokens(json.loads(tekken.read_text(encoding="utf-8")))
    write_text_gguf(gguf / "Tiny-Q.gguf", weights, CLI_PARAMS, tokenizer={"tokens": tokens, "types": types})
    write_mmproj(gguf / "mmproj-F32.gguf", weights, CLI_PARAMS, "F32")
    return native, gguf / "Tiny-Q.gguf"


def test_a_gguf_session_answers_as_the_official_files(cli_files):
    """Text file, mmproj and tokenizer all from the GGUFs: the same greedy answer to a message with an image."""
    native, gguf = cli_files
    image = gguf.parent / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(image)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": str(image)}}]}]
    sampling = generate.Sampling(temperature=0.0, max_tokens=6)
    ours = generate.Session(str(gguf), dtype="float32").answer(messages, sampling=sampling)
    official = generate.Session(str(native), dtype="float32").answer(messages, sampling=sampling)
    assert ours.prompt_ids == official.prompt_ids and ours.ids == official.ids


def test_cli_runs_a_gguf_with_a_tokenizer_override_and_prints_the_bandwidth(cli_files, capsys):
    native, gguf = cli_files
    args = ["--model", str(gguf), "--tokenizer", str(native / "tekken.json"), "--mmproj", "none",
            "--temperature", "0", "--max-tokens", "4", "--dtype", "float32", "Hello"]
    assert generate.main(args) == 0
    assert "GB/s of weights" in capsys.readouterr().err


def test_hub_quant_downloads_only_that_quant_and_the_f16_mmproj(cli_files, monkeypatch):
    _, gguf = cli_files
    files = ["README.md", "Tiny-Q.gguf", "Tiny-UD-Q4_K_XL.gguf", "Tiny-Q8_0.gguf",
             "BF16/Tiny-BF16-00001-of-00002.gguf", "BF16/Tiny-BF16-00002-of-00002.gguf",
             "mmproj-F16.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf"]
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: files)

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(gguf.parent)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    text, mmproj = checkpoint.local_files("someone/Tiny-GGUF:q")
    assert calls[-1] == ("someone/Tiny-GGUF", ["Tiny-Q.gguf", "mmproj-F16.gguf"])
    assert text == gguf and mmproj == gguf.parent / "mmproj-F16.gguf"
    checkpoint.local_files("someone/Tiny-GGUF:BF16", mmproj="f32")
    assert calls[-1][1] == ["BF16/Tiny-BF16-00001-of-00002.gguf", "BF16/Tiny-BF16-00002-of-00002.gguf",
                            "mmproj-F32.gguf"]
    checkpoint.local_files("someone/Tiny-GGUF:Q4_K_XL", mmproj="none")
    assert calls[-1][1] == ["Tiny-UD-Q4_K_XL.gguf"]
    with pytest.raises(InputError, match="has no Q5_K_M file"):
        checkpoint.local_files("someone/Tiny-GGUF:Q5_K_M")


# ----------------------------------------------------------------------------- the KL report

@pytest.fixture(scope="module")
def reference(weights):
    chunks = torch.randint(0, P["vocab_size"], (3, 48), generator=torch.Generator().manual_seed(5)).int()
    return quant_report.make_reference(native_model(weights), chunks, top_k=32)


def test_the_report_of_a_model_against_itself_is_zero(weights, reference, tmp_path):
    quant_report.save_reference(tmp_path / "ref.safetensors", reference, {"model": "tiny"})
    ref, about = quant_report.load_reference(tmp_path / "ref.safetensors")
    text = quant_report.score(native_model(weights), ref)["text"]
    assert text["positions"] == 3 * 23 and about["model"] == "tiny"
    assert text["kl_max"] == 0 and text["top1"] == 1 and text["ppl_ratio"] == 1


def test_the_report_orders_the_quants(weights, reference, folder, capsys):
    results = {}
    for types in ("Q8_0", "Q4_K", "Q2_K"):
        write_text_gguf(folder / f"kl_{types}.gguf", weights, P, types)
        results[types] = quant_report.score(load_model(folder / f"kl_{types}.gguf", quant_math="exact"), reference)
        quant_report.print_report(results[types], f"kl_{types}.gguf", "tiny (float32)")
    print(capsys.readouterr().out)
    kl = [results[t]["text"]["kl_mean"] for t in ("Q8_0", "Q4_K", "Q2_K")]
    assert 0 < kl[0] < kl[1] < kl[2]
    assert results["Q8_0"]["text"]["top1"] >= results["Q2_K"]["text"]["top1"]


def test_the_full_vocabulary_top_k_gives_the_exact_kl(weights):
    chunks = torch.randint(0, P["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(6)).int()
    reference = quant_report.make_reference(native_model(weights), chunks, top_k=P["vocab_size"])
    other = native_model(dequantized(weights, "Q4_K"))
    p = quant_report.logprobs(native_model(weights), chunks[0])[8:15]
    q = quant_report.logprobs(other, chunks[0])[8:15]
    exact = (p.exp() * (p - q)).sum(-1).double().mean().item()
    assert quant_report.score(other, reference)["text"]["kl_mean"] == pytest.approx(exact, rel=1e-4)


def test_the_report_on_a_conversation_with_an_image(vision_weights, folder):
    toks, images = vision_inputs()
    chat = (toks[0].int(), images, len(toks[0]) - 4)
    chunks = torch.randint(0, P["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(7)).int()
    reference = quant_report.make_reference(native_model(vision_weights, VISION_PARAMS), chunks, 32, chat)
    write_text_gguf(folder / "kl_vtext.gguf", vision_weights, VISION_PARAMS, "Q8_0")
    write_mmproj(folder / "kl_vproj.gguf", vision_weights, VISION_PARAMS, "Q8_0")
    model = load_model(folder / "kl_vtext.gguf", mmproj=folder / "kl_vproj.gguf", quant_math="exact")
    result = quant_report.score(model, reference)
    assert result["chat"]["positions"] == 3 and 0 < result["chat"]["kl_mean"] < 0.1


def test_quant_report_command_line(cli_files, tmp_path, capsys):
    """reference over a text file and a conversation with an image (official folder), then score a GGUF of
    the same float32 weights: the same distributions."""
    native, gguf = cli_files
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}]},
            {"role": "assistant", "content": "A picture of noise."}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    ref = tmp_path / "ref.safetensors"
    assert quant_report.main(["reference", "--model", str(native), "--text", str(tmp_path / "text.txt"),
                              "--context", "32", "--chunks", "3", "--messages", str(tmp_path / "chat.json"),
                              "--out", str(ref)]) == 0
    assert quant_report.main(["score", "--model", str(gguf), "--reference", str(ref),
                              "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    print(capsys.readouterr().out)
    assert results["text"]["positions"] == 3 * 15 and results["chat"]["positions"] >= 5
    for part in ("text", "chat"):
        assert results[part]["kl_max"] < 1e-9 and results[part]["top1"] == 1


@pytest.mark.parametrize("key, value, message", [
    ("attention.head_count", 0, r"field 'llama.attention.head_count' = 0: expected > 0"),
    ("block_count", 10**9, r"field 'llama.block_count' = 1000000000: expected between 1 and 1024"),
    ("attention.layer_norm_rms_epsilon", float("nan"), r"'llama.attention.layer_norm_rms_epsilon' = nan"),
])
def test_gguf_metadata_is_checked_as_params_json_is(key, value, message):
    """The {arch}.* keys go through config.build_args: a bad value names its key, before a block is built."""
    meta = {"general.architecture": "llama", "llama.embedding_length": 48, "llama.block_count": 2,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 8, "llama.attention.head_count_kv": 2,
            "llama.attention.key_length": 8, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 1000, f"llama.{key}": value}
    with pytest.raises(InputError, match=message):
        gguf_file.text_args(meta, "model.gguf")


# ----------------------------------------------------------------------------- what a new user trips over (issue 21)

def test_an_image_for_a_gguf_without_its_mmproj_names_the_missing_file(cli_files, tmp_path, capsys):
    """Not "this tokenizer has no image support": the mmproj*.gguf that is missing and how to give it, as a
    flag on the command line and as the argument from Python. Control: with its mmproj the image is read."""
    native, gguf = cli_files
    alone = tmp_path / gguf.name
    alone.symlink_to(gguf)                                     # the text file without the mmproj beside it
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    args = ["--dtype", "float32", "--max-tokens", "1", "--image", str(image), "What is this?"]
    assert generate.main(["--model", str(alone)] + args) == 2
    err = capsys.readouterr().err
    assert "no vision file was found beside this GGUF" in err and "mmproj*.gguf" in err and "--mmproj FILE" in err
    assert "mmproj=" not in err and "no image support" not in err, err
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": str(image)}}]}]
    with pytest.raises(InputError, match=r"mmproj\*\.gguf beside it, or pass mmproj=FILE"):
        generate.Session(str(alone), dtype="float32").answer(messages)
    assert generate.main(["--model", str(alone), "--mmproj", str(gguf.parent / "mmproj-F32.gguf")] + args) == 0


def test_score_refuses_a_reference_made_from_another_model(cli_files, tmp_path, capsys):
    """Another model's shapes, another tokenizer: refused, naming what differs (it printed "top-1 0.00 %",
    exit 0). Control: the GGUF of the reference's own weights is scored."""
    native, gguf = cli_files
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    ref = tmp_path / "ref.safetensors"
    assert quant_report.main(["reference", "--model", str(native), "--text", str(tmp_path / "text.txt"),
                              "--context", "32", "--chunks", "2", "--out", str(ref)]) == 0
    wider = tmp_path / "wider"
    write_native(wider, {k: v for k, v in CLI_PARAMS.items() if k != "vision_encoder"} | {"dim": 64}, seed=5)
    write_tekken(wider, "v11")
    retokenized = tmp_path / "retokenized"
    retokenized.mkdir()
    for name in ("params.json", "consolidated.safetensors"):
        (retokenized / name).symlink_to(native / name)
    write_tekken(retokenized, "v7")
    capsys.readouterr()
    for model, message in [(wider, "made from another model: dim 48 (reference) vs 64"),
                           (retokenized, "made with another tokenizer")]:
        assert quant_report.main(["score", "--model", str(model), "--reference", str(ref)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert quant_report.main(["score", "--model", str(gguf), "--reference", str(ref), "--json",
                              str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["text"]["top1"] == 1
