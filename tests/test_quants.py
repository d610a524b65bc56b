"""quants.py against gguf's numpy dequantize (bit-exact for every type), with negative controls."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import quants
from inputs import InputError

ROWS, COLS = 16, 1024  # 64 blocks of 256 or 512 of 32
FLOATS = ("F32", "F16", "BF16")
QUANTIZABLE = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the types gguf can also write
# Byte offsets of the fp16 scales: random bytes there often decode to inf or NaN. IQ1_M has none (below).
FP16_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
           "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,),
           "IQ3_S": (0,), "IQ3_XXS": (0,), "IQ2_S": (0,), "IQ2_XS": (0,), "IQ2_XXS": (0,), "IQ1_S": (0,)}


def random_fp16(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite fp16 values in [-1, 1], as [n, 2] little-endian bytes."""
    return rng.uniform(-1, 1, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_blocks(name: str, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """[rows, row bytes] uint8: random codes with sane scales (random finite values for the float types)."""
    rng = np.random.default_rng(seed)
    if name in FLOATS:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        return x.view(np.uint8) if name == "F32" else gguf_quantize(x, GGML[name]).view(np.uint8)
    block, size = GGML_QUANT_SIZES[GGML[name]]
    b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in FP16_AT.get(name, ()):
        b[:, at:at + 2] = random_fp16(rng, len(b))
    if name == "IQ1_M":  # d's 4 nibbles are the top nibbles of the u16 scale words at bytes 48..55
        d = random_fp16(rng, len(b)).view(np.uint16)[:, 0]
        for k in range(4):
            b[:, 49 + 2 * k] = (b[:, 49 + 2 * k] & 0x0F) | (((d >> (4 * k)) & 0xF) << 4).astype(np.uint8)
    return b.reshape(rows, -1)


def oracle(raw: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf_dequantize(raw, GGML[name]), dtype=np.float32))


def ours(raw: np.ndarray, name: str) -> torch.Tensor:
    return quants.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0], COLS))


@pytest.mark.parametrize("name", list(quants.BLOCK))
def test_random_blocks_bit_exact(name):
    raw = random_blocks(name)
    expected, got = oracle(raw, name), ours(raw, name)
    assert got.dtype == torch.float32 and got.shape == (ROWS, COLS)
    assert expected.isfinite().all() and got.isfinite().all()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_data_bit_exact(name):
    x = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
    raw = gguf_quantize(x, GGML[name]).view(np.uint8)
    expected = oracle(raw, name)
    assert (expected - torch.from_numpy(x)).abs().max() < 0.1 * np.abs(x).max()  # real data, not noise
    assert torch.equal(ours(raw, name), expected)


def test_wrong_nibble_order_is_caught(monkeypatch):
    # Interleaved (weight 2j = low nibble of byte j, 2j + 1 its high nibble), not all lows then all highs.
    monkeypatch.setattr(quants, "_nibbles", lambda b: quants._split(b, 4, -1).flatten(-2))
    for name in ("Q4_0", "Q4_K", "Q6_K", "IQ4_XS"):
        raw = random_blocks(name)
        assert not torch.equal(ours(raw, name), oracle(raw, name)), name


def test_wrong_scale_unpacking_is_caught(monkeypatch):
    # Bytes 8-11 of the Q4_K scales read the wrong way round: scales 4-7 from high nibbles, mins from low.
    def swapped(s):
        sc, mn, low = s[:, 0:4], s[:, 4:8], s[:, 8:12]
        scale = torch.cat([sc & 63, (low >> 4) | (sc >> 6) << 4], dim=1)
        min_ = torch.cat([mn & 63, (low & 15) | (mn >> 6) << 4], dim=1)
        return scale.float(), min_.float()

    monkeypatch.setattr(quants, "_scale_min_k4", swapped)
    for name in ("Q4_K", "Q5_K"):
        raw = random_blocks(name)
        assert not torch.equal(ours(raw, name), oracle(raw, name)), name


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ1_M"])
def test_quant_linear(name):
    raw = random_blocks(name, 32, COLS)
    layer = quants.QuantLinear(torch.from_numpy(raw), name, (32, COLS))
    x = torch.randn(2, 3, COLS)
    torch.testing.assert_close(layer(x), F.linear(x, oracle(raw, name)), atol=1e-6, rtol=0)
    assert list(layer.state_dict()) == ["blocks"]  # the codebooks come from gguf, not from the checkpoint


def test_quant_linear_uses_the_activation_dtype():
    raw = random_blocks("Q4_K", 32, COLS)
    layer = quants.QuantLinear(torch.from_numpy(raw), "Q4_K", (32, COLS)).to(torch.bfloat16)
    x = torch.randn(3, COLS, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, oracle(raw, "Q4_K").bfloat16()))


@pytest.mark.parametrize("name", ["Q4_K", "IQ3_S"])
def test_quant_embedding_rows(name):
    raw = random_blocks(name, 64, COLS)
    embedding = quants.QuantEmbedding(torch.from_numpy(raw), name, (64, COLS))
    ids = torch.tensor([[3, 0, 63], [3, 17, 5]])
    assert torch.equal(embedding(ids), oracle(raw, name)[ids])


# inductor imports torch.utils.mkldnn, which warns about its own use of torch.jit
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_quant_linear_compiles_fullgraph():
    raw = random_blocks("Q4_K", 32, 512)
    layer = quants.QuantLinear(torch.from_numpy(raw), "Q4_K", (32, 512))
    x = torch.randn(3, 512)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), atol=1e-6, rtol=0)


def test_unsupported_type_names_the_tensor():
    assert quants.check_type("blk.0.attn_q.weight", GGML.Q4_K) == "Q4_K"
    with pytest.raises(InputError, match=r"blk\.0\.attn_q\.weight: GGUF type Q8_1 is not supported"):
        quants.check_type("blk.0.attn_q.weight", GGML.Q8_1)


def test_wrong_shape_is_refused():
    raw = torch.from_numpy(random_blocks("Q4_K"))
    with pytest.raises(ValueError, match="do not hold a 16 x 512 matrix"):
        quants.dequantize(raw, "Q4_K", (ROWS, 512))


# ----------------------------------------------------------------------------- the fast path

INT4_TYPES, FUSED_TYPES = ("Q4_0", "Q4_1", "Q4_K"), ("Q8_0", "Q5_K", "Q6_K")
BF16_ROUNDING = 2.0 ** -8   # bfloat16 keeps 8 significant bits: rounding to nearest moves a value by this, relatively


def int4_bound(layer_input: torch.Tensor, raw: np.ndarray, name: str) -> torch.Tensor:
    """The most Int4Linear's output can differ from x @ W.T (W gguf's float32 weights), per output: each
    group's scale and zero rounded to bfloat16 (the weight (q - 8) * scale + zero moves by at most
    u (8 |scale| + |zero|)), x rounded to bfloat16, float32 sums, the output rounded to bfloat16."""
    u, cols = BF16_ROUNDING, raw.shape[1] // GGML_QUANT_SIZES[GGML[name]][1] * GGML_QUANT_SIZES[GGML[name]][0]
    _, scale, zero = quants._INT4[name](torch.from_numpy(raw).reshape(-1, GGML_QUANT_SIZES[GGML[name]][1]))
    per_weight = lambda t: t.reshape(raw.shape[0], -1).repeat_interleave(32, dim=1).double()  # noqa: E731
    w = oracle(raw, name).double()
    moved = u * (8 * per_weight(scale).abs() + per_weight(zero).abs()) + 2.0 ** -22 * w.abs()
    x = layer_input.double().abs()
    y = (layer_input.double() @ w.T).abs()
    return 1.01 * (x @ moved.T + (u + cols * 2.0 ** -24) * (x @ (w.abs() + moved).T) + u * y)


@pytest.mark.parametrize("name", INT4_TYPES)
def test_int4_linear_is_within_its_bound_of_gguf(name):
    raw = random_blocks(name, 96, COLS)   # 96 rows: a padded second tile of 64
    layer = quants.Int4Linear(torch.from_numpy(raw), name, (96, COLS))
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(0))
    error = (layer(x).double() - x.double() @ oracle(raw, name).double().T).abs()
    bound = int4_bound(x, raw, name)
    print(f"{name}: error / bound at most {(error / bound).max():.2f}, mean {(error / bound).mean():.2f}")
    assert layer(x).dtype == torch.float32 and (error <= bound).all()


def test_int4_mistakes_exceed_the_bound(monkeypatch):
    raw = random_blocks("Q4_K", 64, COLS)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(0))
    exact, bound = x.double() @ oracle(raw, "Q4_K").double().T, int4_bound(x, raw, "Q4_K")
    swapped = quants._int4_layout   # rows j and j + 32 of a tile exchanged
    monkeypatch.setattr(quants, "_int4_layout", lambda codes, out: swapped(
        codes.view(-1, 2, 32, *codes.shape[1:]).flip(1).reshape(codes.shape), out))
    assert ((quants.Int4Linear(torch.from_numpy(raw), "Q4_K", (64, COLS))(x) - exact).abs() > bound).any()
    monkeypatch.undo()
    without_min = lambda b: (*quants._int4_q4_k(b)[:2], 8 * quants._int4_q4_k(b)[1])  # noqa: E731
    monkeypatch.setitem(quants._INT4, "Q4_K", without_min)
    assert ((quants.Int4Linear(torch.from_numpy(raw), "Q4_K", (64, COLS))(x) - exact).abs() > bound).any()


def test_int4_layout_is_pytorchs():
    """The CPU layout built from the bytes is the one PyTorch's own packing makes from int32 codes."""
    units = torch.randint(0, 256, (128, 16, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    codes = torch.stack([units & 15, units >> 4], dim=-2).view(128, -1).int()
    packed = torch.empty(128, 512, dtype=torch.uint8)
    quants._int4_layout(units.view(128, 2, 8, 32), packed)   # 2 blocks of 8 units a row
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))


@pytest.mark.parametrize("rows", [40, 1152])   # tiles of 8 rows; 9 of 128 (FUSED_TILE), in parts of 2 or 8
@pytest.mark.parametrize("name", FUSED_TYPES)
def test_fused_linear_weights_are_ggufs_and_its_products_close(name, rows, monkeypatch):
    monkeypatch.setattr(quants, "FUSED_DECODE_PART", 2 * 128 * COLS)   # the tiles of a 1152-row matrix in 5 parts
    raw = random_blocks(name, rows, COLS)
    layer = quants.FusedLinear(torch.from_numpy(raw), name, (rows, COLS))
    w = oracle(raw, name)
    fields = [getattr(layer, field) for field in layer.field_names]
    weights = quants.fused_weights(name, *fields)                    # [tiles, C, rows of a tile]
    assert torch.equal(weights.transpose(0, 1).reshape(COLS, rows), w.T)   # the prefill path's weights, bit-exact
    for n in (1, 3):   # one token (the compiled loop), several (weights then a matrix product)
        x = torch.randn(n, COLS, generator=torch.Generator().manual_seed(n))
        reference = x.double() @ w.double().T
        slack = COLS * 2.0 ** -24 * (x.double().abs() @ w.double().abs().T)   # float32 sums in another order
        assert ((layer(x).double() - reference).abs() <= slack).all()


def test_fused_q6_k_with_its_high_bits_swapped_is_caught(monkeypatch):
    raw = random_blocks("Q6_K", 40, COLS)
    monkeypatch.setattr(quants, "_Q6_K_HIGH_SHIFTS", quants._Q6_K_HIGH_SHIFTS.flip(0))
    layer = quants.FusedLinear(torch.from_numpy(raw), "Q6_K", (40, COLS))
    fields = [getattr(layer, field) for field in layer.field_names]
    weights = quants.fused_weights("Q6_K", *fields).transpose(0, 1).reshape(COLS, 40)
    assert not torch.equal(weights, oracle(raw, "Q6_K").T)


@pytest.mark.parametrize("name, kind", [("Q4_K", "Int4Linear"), ("Q4_0", "Int4Linear"), ("Q6_K", "FusedLinear"),
                                        ("Q8_0", "FusedLinear"), ("IQ4_XS", "QuantLinear"), ("Q2_K", "QuantLinear")])
def test_linear_picks_the_module_by_type(name, kind):
    raw = torch.from_numpy(random_blocks(name, 64, COLS))
    assert type(quants.linear(raw, name, (64, COLS), math="fast")).__name__ == kind
    assert type(quants.linear(raw, name, (64, COLS), math="exact")).__name__ == "QuantLinear"
