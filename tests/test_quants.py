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
