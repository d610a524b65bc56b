"""MLX, bitsandbytes and compressed-tensors folders, written by those libraries from one tiny model (tests/
quant_files.py), read by quant_formats.py: the dequantized weights bit-exact with each library's own, the
logits equal to the project's on the library's dequantized weights, the KL report across formats, memory,
and the formats refused. Every comparison has a negative control that fails.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import load
import quant_formats
import quant_report
from checkpoints import (TINY_VISION_PARAMS, forward_in_chunks, image_tokens, random_weights, real_text_shapes,
                         real_vision_shapes)
from config import parse_params
from gguf_files import QUANT_PARAMS, write_text_gguf
from inputs import InputError
from load import build_model, load_model
from quant_files import (library_weights, small_tekken, stored, write_bnb, write_compressed, write_dequantized,
                         write_hf, write_mlx)

# compressed-tensors and bitsandbytes import code that warns about torch.jit's deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

P = QUANT_PARAMS   # dims that MLX groups of 64, bitsandbytes blocks of 64 and compressed-tensors groups of 128 divide


def mixed_recipe(path, module):
    """A mixed MLX recipe as mlx_lm's own: down_proj 6-bit, the embedding 8-bit, the rest 4-bit groups of 64."""
    return {"bits": 6, "group_size": 32} if "down_proj" in path else \
        {"bits": 8, "group_size": 64} if "embed" in path else True


# name -> how the library writes it from the Hugging Face folder
FORMATS = {
    "mlx-4bit": lambda d, hf: write_mlx(d, hf, 4, 64),
    "mlx-8bit": lambda d, hf: write_mlx(d, hf, 8, 64),
    "mlx-3bit": lambda d, hf: write_mlx(d, hf, 3, 32),
    "mlx-mixed": lambda d, hf: write_mlx(d, hf, 4, 64, mixed_recipe),
    "bnb-nf4": lambda d, hf: write_bnb(d, hf, "nf4", double=True),
    "bnb-fp4": lambda d, hf: write_bnb(d, hf, "fp4", double=False),
    "ct-w4a16": lambda d, hf: write_compressed(d, hf, "W4A16"),
    "ct-w4a16-asym": lambda d, hf: write_compressed(d, hf, "W4A16_ASYM"),
    "ct-w8a16": lambda d, hf: write_compressed(d, hf, "W8A16"),
    "ct-fp8": lambda d, hf: write_compressed(d, hf, "FP8_DYNAMIC"),
    "ct-fp8-block": lambda d, hf: write_compressed(d, hf, "FP8_BLOCK"),
    "ct-w8a8-int8": lambda d, hf: write_compressed(d, hf, "W8A8"),
}
LINEARS = 7 * P["n_layers"]   # wq wk wv wo w1 w2 w3 per block; MLX also quantizes the embedding and the head


@pytest.fixture(scope="module")
def weights():
    """The tiny model's weights, rounded to bfloat16 as the folders store them."""
    return {k: v.bfloat16().float() for k, v in random_weights(real_text_shapes(P), seed=1).items()}


@pytest.fixture(scope="module")
def folders(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    hf = write_hf(root / "hf", weights, P)
    return {"hf": hf, **{name: write(root / name, hf) for name, write in FORMATS.items()}}


def reference_model(weights):
    model = build_model(*parse_params(P))
    model.load_state_dict(weights)
    return model.eval()


def packed_layers(folder) -> dict[str, quant_formats.Packed]:
    """{NAME.weight: our Packed} of a folder, read as load.py reads it."""
    fmt, _ = quant_formats.read_format(json.loads((folder / "config.json").read_text()), str(folder))
    tensors = stored(folder)
    return {key: t for key, _, t in quant_formats.gather(fmt, list(tensors), tensors.__getitem__, tensors.__getitem__)
            if isinstance(t, quant_formats.Packed)}


def compare(folder) -> tuple[int, int, int]:
    """(matrices, elements, elements equal) of our dequantization against the library's."""
    ours, theirs = packed_layers(folder), library_weights(folder)
    assert sorted(ours) == sorted(theirs)
    equal = sum(int((ours[k].unpack() == theirs[k]).sum()) if ours[k].unpack().dtype == theirs[k].dtype else 0
                for k in ours)
    return len(ours), sum(t.numel() for t in theirs.values()), equal


# ----------------------------------------------------------------------------- dequantization

@pytest.mark.parametrize("name", FORMATS)
def test_dequantization_is_bit_exact_with_the_library(folders, name):
    matrices, elements, equal = compare(folders[name])
    print(f"| {name} | {matrices} | {elements} | {equal} |")
    assert matrices == LINEARS + 2 * name.startswith("mlx") and elements == equal > 0


BIT_FIELDS, BLOCK_SCALES = quant_formats.bit_fields, quant_formats.BnB4bit.block_scales


def bit_fields_msb_first(b, bits):
    """Negative control: each byte's fields read from its most significant bits down."""
    return BIT_FIELDS(b, bits).unflatten(-1, (-1, 8 // bits)).flip(-1).flatten(-2)


def tiles_by_rows(x, s, tile):
    """Negative control: one scale per tile read as if stored column-major (transposed scale layout)."""
    (rows, cols), (th, tw) = x.shape, tile
    return x.view(rows // th, th, cols // tw, tw), s.reshape(cols // tw, rows // th).t().reshape(rows // th, 1, -1, 1).contiguous()


def codes_low_first(self):
    b = self.weight.view(-1)
    return torch.stack([b & 15, b >> 4], dim=-1).view(-1).long()


def block_scales_without_offset(self):
    return BLOCK_SCALES(self) - self.offset


@pytest.mark.parametrize("name, target, attribute, replacement", [
    ("mlx-4bit", quant_formats, "bit_fields", bit_fields_msb_first),
    ("mlx-4bit", quant_formats, "_tiles", tiles_by_rows),
    ("bnb-nf4", quant_formats.BnB4bit, "codes", codes_low_first),
    ("bnb-nf4", quant_formats.BnB4bit, "block_scales", block_scales_without_offset),
    ("ct-w4a16", quant_formats, "bit_fields", bit_fields_msb_first),
    ("ct-w4a16", quant_formats, "_tiles", tiles_by_rows),
    ("ct-fp8-block", quant_formats, "_tiles", tiles_by_rows),
])
def test_a_wrong_packing_order_or_scale_layout_is_caught(folders, monkeypatch, name, target, attribute, replacement):
    monkeypatch.setattr(target, attribute, replacement)
    _, elements, equal = compare(folders[name])
    assert equal < 0.9 * elements, (name, attribute)


def test_the_zero_point_of_asymmetric_groups_is_caught(folders, monkeypatch):
    """compressed-tensors packs the zero point along the output dimension: its unpacked [groups, out] taken
    for [out, groups] without the transposition fails."""
    monkeypatch.setattr(quant_formats, "_unpack_zero", lambda packed, bits, shape: (
        BIT_FIELDS(quant_formats._as_bytes(packed.t()), bits)[:, :shape[0]].reshape(shape).to(torch.int16) - 8).to(torch.int8))
    _, elements, equal = compare(folders["ct-w4a16-asym"])
    assert equal < 0.9 * elements


def test_an_embedding_lookup_unpacks_only_its_rows(folders):
    table = packed_layers(folders["mlx-mixed"])["model.embed_tokens.weight"]
    ids = torch.tensor([3, 999, 0, 3])
    assert table.bits == 8 and torch.equal(table.unpack(ids), table.unpack()[ids])


@pytest.mark.parametrize("name", ["mlx-4bit", "ct-w4a16", "ct-w4a16-asym", "ct-fp8", "bnb-nf4", "mlx-8bit"])
def test_int4_groups_describe_the_same_weights(folders, name):
    """What a grouped int4 kernel would take (codes, scale, offset per group) rebuilds the weights up to
    the rounding of the format's own arithmetic; formats whose arithmetic is not that give None."""
    for packed in packed_layers(folders[name]).values():
        groups = packed.int4_groups()
        if name in ("ct-fp8", "bnb-nf4", "mlx-8bit"):
            assert groups is None
            continue
        codes, scale, offset, group = groups
        w = (scale.repeat_interleave(group, 1) * codes.float() + offset.repeat_interleave(group, 1))
        exact = packed.unpack().float()
        assert codes.max() <= 15 and (w - exact).abs().max() <= 2 ** -7 * exact.abs().max()


# ----------------------------------------------------------------------------- the model

TOKENS = torch.tensor([[1, 17, 400, 999, 3, 250, 8, 71, 600, 2, 5, 42]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    """Prefill of 8 tokens, then 4 cached decoding steps."""
    return forward_in_chunks(model, TOKENS, [8, 9, 10, 11, 12])


@pytest.mark.parametrize("name", FORMATS)
def test_logits_equal_the_model_on_the_library_dequantized_weights(folders, name, tmp_path):
    quantized = load_model(folders[name], dtype=torch.float32)
    dense = load_model(write_dequantized(tmp_path / "dense", folders[name]), dtype=torch.float32)
    assert isinstance(quantized.layers[0].attention.wq, quant_formats.PackedLinear)
    ours, theirs = logits(quantized), logits(dense)
    print(f"{name}: max |logit difference| {(ours - theirs).abs().max().item():.2e} of {theirs.abs().max():.1f}")
    assert (ours - theirs).abs().max() <= 1e-5
    # Negative control: wq / wk in the file's rotate-half row order, not un-permuted.
    for layer in quantized.layers:
        layer.attention.wq.order = layer.attention.wk.order = None
    assert (logits(quantized) - theirs).abs().max() > 1e-2


@torch.no_grad()
def test_a_multimodal_fp8_folder_with_its_vision_tower_quantized(tmp_path):
    """RedHat AI's FP8 of Small 3.2 is a whole Mistral3ForConditionalGeneration. Here every Linear but the
    head is FP8, the vision tower's too, whose wq / wk follow the rotate-half order of its own heads."""
    params = TINY_VISION_PARAMS
    weights = random_weights({**real_text_shapes(params), **real_vision_shapes(params)}, seed=2)
    fp8 = write_compressed(tmp_path / "fp8", write_hf(tmp_path / "hf", weights, params), "FP8_DYNAMIC")
    quantized = load_model(fp8, dtype=torch.float32)
    dense = load_model(write_dequantized(tmp_path / "dense", fp8), dtype=torch.float32)
    tower = quantized.vision_encoder.transformer.layers[0].attention
    assert isinstance(tower.wq, quant_formats.PackedLinear) and tower.wq.order is not None
    tokens = torch.tensor([[1, 3, *image_tokens(2, 3), 500, 600, 4]])
    images = [torch.randn(3, 56, 84, generator=torch.Generator().manual_seed(0))]
    theirs = dense(tokens, images=images)
    assert (quantized(tokens, images=images) - theirs).abs().max() <= 1e-5
    for layer in quantized.vision_encoder.transformer.layers:   # negative control: the tower's rows unordered
        layer.attention.wq.order = layer.attention.wk.order = None
    assert (quantized(tokens, images=images) - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mlx-4bit", "bnb-nf4", "ct-w4a16"])
def test_a_layer_split_over_two_shards(folders, name, tmp_path):
    """Size-based sharding (save_pretrained's, mlx_lm's) can put a layer's weight and its scales in two files:
    the layer is gathered across them, through the index."""
    tensors = stored(folders[name])
    first = [k for k in tensors if k.startswith("model.layers.0.self_attn.q_proj.weight")][:1]   # the codes only
    files = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in first},
             "model-00002-of-00002.safetensors": {k: t for k, t in tensors.items() if k not in first}}
    for file, part in files.items():
        save_file(part, tmp_path / file)
    index = {"weight_map": {k: file for file, part in files.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(folders[name] / "config.json", tmp_path / "config.json")
    assert torch.equal(logits(load_model(tmp_path, dtype=torch.float32)),
                       logits(load_model(folders[name], dtype=torch.float32)))


def test_the_stored_dtype_is_kept_and_the_embedding_stays_packed(folders):
    model = load_model(folders["mlx-4bit"])
    assert isinstance(model.tok_embeddings, quant_formats.PackedEmbedding)
    assert model.output.weight.dtype == model.norm.weight.dtype == torch.bfloat16
    assert model.tok_embeddings(TOKENS).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the KL report and memory

KL_FORMATS = ["gguf-Q8_0", "gguf-Q4_K", "mlx-8bit", "mlx-4bit", "mlx-3bit", "bnb-nf4", "ct-fp8", "ct-w8a8-int8",
              "ct-w4a16"]


def test_the_kl_report_across_formats(weights, folders, tmp_path, capsys):
    """One reference (the float32 model on the bfloat16 weights every folder was made from), scored against
    GGUF Q4_K and Q8_0 and each library's quantization; one of them also through quant_report's command line."""
    chunks = torch.randint(100, P["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(5)).int()
    chunks[:, 0] = 1
    reference = quant_report.make_reference(reference_model(weights), chunks, top_k=64)
    results = {}
    for name in KL_FORMATS:
        model = folders.get(name, tmp_path / f"{name}.gguf")
        if name.startswith("gguf"):
            write_text_gguf(model, weights, P, name.split("-")[1])
        results[name] = quant_report.score(load_model(model, dtype=torch.float32), reference)["text"]
    with capsys.disabled():
        print("\n| format | KL mean | KL p99 | top-1 | ppl ratio |\n|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['kl_mean']:.6f} | {r['kl_p99']:.6f} | {r['top1']:.2%} | {r['ppl_ratio']:.5f} |")
    kl = {name: r["kl_mean"] for name, r in results.items()}
    assert all(r["positions"] == 4 * 31 for r in results.values())
    assert 0 < max(kl["gguf-Q8_0"], kl["mlx-8bit"], kl["ct-fp8"], kl["ct-w8a8-int8"]) \
        < min(kl["gguf-Q4_K"], kl["mlx-4bit"], kl["bnb-nf4"], kl["ct-w4a16"]) <= kl["mlx-3bit"]
    quant_report.save_reference(tmp_path / "ref.safetensors", reference, {"model": "tiny", "dtype": "float32"})
    assert quant_report.main(["score", "--model", str(folders["bnb-nf4"]), "--reference", str(tmp_path / "ref.safetensors"),
                              "--tokenizer", str(small_tekken(tmp_path, P["vocab_size"])),
                              "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["text"] == results["bnb-nf4"]


def held_bytes(model) -> tuple[int, int]:
    """Bytes of the tensors the model holds (each once), and of those the loader added: the output order
    of the Hugging Face wq / wk."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    order = sum(b.nbytes for name, b in model.named_buffers() if name.endswith(".order"))
    return sum(t.nbytes for t in tensors.values()), order


def test_memory_is_the_file_size(folders, capsys):
    """Loaded in the stored dtype, a quantized model holds its packed tensors as stored (memory-mapped, not
    copied): the bytes of its weight files, less their headers and the few small tensors it does not keep
    (bitsandbytes' quant_state JSON, compressed-tensors' weight_shape), plus the order of wq / wk."""
    rows = []
    for name in ["hf", *FORMATS]:
        size = sum(p.stat().st_size for p in folders[name].glob("model*.safetensors"))
        held, order = held_bytes(load_model(folders[name]))
        rows.append(f"| {name} | {size} | {held} | {order} | {held / size:.3f} |")
        assert 0.98 * size <= held - order <= size, name
    with capsys.disabled():
        print("\n| format | weight files (bytes) | held by the model (bytes) | of which wq/wk order | ratio |")
        print("|---|---|---|---|---|\n" + "\n".join(rows))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_the_packed_tensors_of_a_file_share_one_map(folders, monkeypatch, per_tensor):
    """A map per tensor would hold the file's header pages once per tensor in the resident set (measured on
    a 24-block bitsandbytes folder of 22 MB: 224 MB resident after loading, 21 MB with one map per file).
    All of a file's packed tensors lie within one map of it; a map per tensor (the negative control) does not."""
    if per_tensor:
        monkeypatch.setattr(load, "gather", lambda fmt, keys, get, held: quant_formats.gather(fmt, keys, get, get))
    model = load_model(folders["bnb-nf4"])
    spans = [(b.data_ptr(), b.data_ptr() + b.nbytes) for name, b in model.named_buffers()
             if ".packed." in name and not name.endswith(".offset")]   # the offset is made from the JSON
    size = (folders["bnb-nf4"] / "model.safetensors").stat().st_size
    assert (max(end for _, end in spans) - min(start for start, _ in spans) <= size) != per_tensor


# ----------------------------------------------------------------------------- what is refused

@pytest.mark.parametrize("change, message", [
    (lambda t: t["model.layers.1.mlp.up_proj.scales"].__setitem__((3, 2), float("nan")),
     r"'model.layers.1.mlp.up_proj.weight \(scales\)' holds a non-finite value \(nan"),
    (lambda t: t.update({"model.layers.1.mlp.up_proj.scales": t["model.layers.1.mlp.up_proj.scales"][:, :4].clone()}),
     r"layer 'model.layers.1.mlp.up_proj': weight torch.uint32 \(768, 64\), scales \(768, 4\)"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.biases"), r"layer 'model.layers.1.mlp.up_proj': missing .*'biases'"),
])
def test_a_broken_quantized_layer_is_named(folders, tmp_path, change, message):
    tensors = stored(folders["mlx-4bit"])
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folders["mlx-4bit"] / "config.json", tmp_path / "config.json")
    with pytest.raises(InputError, match=message):
        load_model(tmp_path)


@pytest.mark.parametrize("config, named", [
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}}, "'awq'"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}}, "'gptq'"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "'fp8'"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "8-bit"),
    ({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}, "MLX mode 'mxfp4'"),
    ({"quantization": {"group_size": 64, "bits": 7}}, "MLX bits 7"),
    ({"quantization": {"group_size": 64, "bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 1}}},
     "MLX bits 1"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                  "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}}}}},
     "format 'nvfp4-pack-quantized'"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                                  "num_bits": 3, "type": "int", "strategy": "group", "group_size": 128}}}}},
     "pack-quantized 'int 3-bit'"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                              "kv_cache_scheme": {"num_bits": 8, "type": "float"}, "config_groups": {}}},
     "kv_cache_scheme"),
])
def test_a_recognised_but_unsupported_quantization_is_refused_in_one_line(folders, tmp_path, config, named):
    folder = tmp_path / "q"
    folder.mkdir()
    hf = json.loads((folders["hf"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **config}))
    with pytest.raises(InputError) as e:
        load_model(folder)
    message = str(e.value)
    print(message)
    assert "\n" not in message and "config.json" in message and named in message
    assert "supported: MLX affine" in message and "bitsandbytes 4-bit" in message and "compressed-tensors" in message
