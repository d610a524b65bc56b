"""GGUF quantized weights, dequantized on the fly in torch (llama.cpp's block formats).

GGUF stores a matrix [R, C] (torch's [out, in]) as R rows of raw bytes. Each row is C / block blocks, and
each block packs `block` weights into Z bytes: fp16 scales, then codes, laid out differently per type.
`dequantize` unpacks all blocks at once on the tensor's device, with no loop over blocks. QuantLinear and
QuantEmbedding keep only the bytes and rebuild the float weights in each forward.
    R rows, C columns (weights per row), N blocks (R * C / block), Z bytes per block.
Each type is bit-exact with gguf's numpy `gguf.quants.dequantize` (tests/test_quants.py). So the float32
arithmetic follows gguf's order: (d * sc) * q rounds twice, d * (sc * q) once, and the two differ.

gguf (llama.cpp's Python package) is an optional dependency, needed only for GGUF files. The block sizes and
the IQ codebooks (grids, sign patterns, IQ4 values) are read from it at run time, not copied here.
"""
from math import gcd

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inputs import InputError

try:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants as gguf_quants
except ImportError:   # optional: load.py imports this module for every checkpoint, only GGUF files need gguf
    GGML_QUANT_SIZES = GGMLQuantizationType = gguf_quants = None

QType = "str | GGMLQuantizationType"  # a type's name, or gguf's enum as GGUFReader gives it


# ----------------------------------------------------------------------------- bytes to fields

def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of every block: [N, Z] uint8 -> [N, 1] float32."""
    return b[:, at:at + 2].view(torch.float16).float()


def _le(b: torch.Tensor) -> torch.Tensor:
    """Little-endian unsigned integers from their bytes: [..., k] uint8 -> [...] int64."""
    return sum(b[..., i].long() << (8 * i) for i in range(b.shape[-1]))


def _split(b: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Each byte as 8 // bits fields of `bits` bits, low bits first, on a new axis at dim."""
    mask = (1 << bits) - 1
    return torch.stack([(b >> shift) & mask for shift in range(0, 8, bits)], dim=dim)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a run of k bytes: [..., k] -> [..., 2k], the k low nibbles then the k high ones."""
    return _split(b, 4, -2).flatten(-2)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 scales and 8 mins (6 bits each) packed into the 12 bytes of Q4_K/Q5_K: [N, 12] -> 2 x [N, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits and the top 2 bits of scales 4-7 in their top 2 bits.
    Bytes 4-7 do the same for the mins. Bytes 8-11 hold the low 4 bits of scale 4-7 (low nibble) and of
    min 4-7 (high nibble).
    """
    sc, mn, low = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([sc & 63, (low & 15) | (sc >> 6) << 4], dim=1)
    min_ = torch.cat([mn & 63, (low >> 4) | (mn >> 6) << 4], dim=1)
    return scale.float(), min_.float()


def _sign_groups(aux: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """The 4 groups of 8 signs named by the four 7-bit indices in the low 28 bits: [N, 8] -> [N, 8, 4, 8]."""
    return signs[torch.stack([(aux >> shift) & 127 for shift in (0, 7, 14, 21)], dim=-1)]


# ----------------------------------------------------------------------------- one function per type
# Each maps blocks [N, Z] uint8 -> weights [N, block] float32. The comment gives the block's byte layout.

def _float32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)


def _float16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()


def _bfloat16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.bfloat16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d, int8 q[32]
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d, q[16] nibbles
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d, m, q[16] nibbles
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5(b: torch.Tensor, at: int) -> torch.Tensor:
    """Q5_0/Q5_1 codes: a u32 of 5th bits at byte `at` (bit j for weight j), then 16 bytes of nibbles."""
    high = _split(b[:, at:at + 4], 1, -1).flatten(-2)  # [N, 32]
    return (_nibbles(b[:, at + 4:at + 20]) | high << 4).float()


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d, qh u32, q[16]
    return _f16(b, 0) * (_q5(b, 2) - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d, m, qh u32, q[16]
    return _f16(b, 0) * _q5(b, 4) + _f16(b, 2)


def _q2_k(b: torch.Tensor) -> torch.Tensor:  # scales[16] (scale | min << 4), q[64] 2-bit, d, dmin; 16 x 16
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 15).float()).view(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _split(b[:, 16:80].reshape(n, 2, 32), 2, -2).reshape(n, 16, 16)  # 128 weights: 32 bytes x 4 shifts
    return (dl * q.float() - ml).view(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:  # hmask[32], q[64] 2-bit, scales[12] 6-bit, d; 16 x 16
    n = b.shape[0]
    high = _split(b[:, 104:108], 2, -2).reshape(n, 16)  # top 2 bits of scale i: byte i % 4, bits 2 * (i // 4)
    scales = (_nibbles(b[:, 96:104]) | high << 4).float() - 32
    dl = (_f16(b, 108) * scales).view(n, 16, 1)
    low = _split(b[:, 32:96].reshape(n, 2, 32), 2, -2).reshape(n, 16, 16)
    hbit = _split(b[:, :32].reshape(n, 1, 32), 1, -2).reshape(n, 16, 16)
    q = low.float() - 4 * (1 - hbit.float())  # a *clear* high bit subtracts 4
    return (dl * q).view(n, 256)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], q[128] nibbles; 8 x 32
    n = b.shape[0]
    scale, min_ = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * scale).view(n, 8, 1)
    dm = (_f16(b, 2) * min_).view(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)  # 32 bytes: sub-block 2k low, 2k + 1 high
    return (d * q.float() - dm).view(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], qh[32], q[128] nibbles; 8 x 32
    n = b.shape[0]
    scale, min_ = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * scale).view(n, 8, 1)
    dm = (_f16(b, 2) * min_).view(n, 8, 1)
    low = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    high = _split(b[:, 16:48], 1, -2)  # [N, 8, 32]: bit j of byte i is the 5th bit of weight i of sub-block j
    return (d * (low | high << 4).float() - dm).view(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # ql[128] nibbles, qh[64] 2-bit, int8 scales[16], d; 16 x 16
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    low = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _split(b[:, 128:192].reshape(n, 2, 32), 2, -2).reshape(n, 8, 32)
    q = (low | high << 4).float() - 32
    return (d * q.view(n, 16, 16)).view(n, 256)


def _iq4_nl(b: torch.Tensor, kvalues: torch.Tensor) -> torch.Tensor:  # d, q[16] nibbles indexing kvalues
    return _f16(b, 0) * kvalues[_nibbles(b[:, 2:]).long()].float()


def _iq4_xs(b: torch.Tensor, kvalues: torch.Tensor) -> torch.Tensor:
    # d, scales_h u16, scales_l[4], q[128] nibbles indexing kvalues; 8 sub-blocks of 32
    n = b.shape[0]
    low = _split(b[:, 4:8], 4, -1).reshape(n, 8)  # scale i: byte i // 2, nibble i % 2
    high = _split(b[:, 2:4], 2, -1).reshape(n, 8)  # bits 2i, 2i + 1 of the u16
    dl = (_f16(b, 0) * ((low | high << 4).float() - 32)).view(n, 8, 1)
    q = _nibbles(b[:, 8:].reshape(n, 8, 16))  # [N, 8, 32]: each 16 bytes are one sub-block, unlike Q4_K
    return (dl * kvalues[q.long()].float()).view(n, 256)


def _iq2_xxs(b: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    # d, then per 32 weights: 4 grid indices (bytes), a u32 of 4 sign indices (7 bits) and a 4-bit scale
    n = b.shape[0]
    qs = b[:, 2:].reshape(n, 8, 8)
    aux = _le(qs[:, :, 4:])  # [N, 8]
    db = (_f16(b, 0) * (0.5 + (aux >> 28).float()) * 0.25).view(n, 8, 1, 1)
    return (db * grid[qs[:, :, :4].long()] * _sign_groups(aux, signs)).view(n, 256)


def _iq2_xs(b: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    # d, 32 x u16 (9-bit grid index, 7-bit sign index), scales[8] (one nibble per 16 weights)
    n = b.shape[0]
    q = _le(b[:, 2:66].reshape(n, 32, 2))  # [N, 32]
    scale = _split(b[:, 66:], 4, -1).reshape(n, 16)
    db = (_f16(b, 0) * (0.5 + scale.float()) * 0.25).view(n, 16, 1, 1)
    return (db * grid[q & 511].view(n, 16, 2, 8) * signs[q >> 9].view(n, 16, 2, 8)).view(n, 256)


def _iq2_s(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # d, qs[32] (grid index bits 0-7), signs[32] (a bit per weight), qh[8] (index bits 8-9), scales[8]
    n = b.shape[0]
    scale = _split(b[:, 74:], 4, -1).reshape(n, 16)
    db = (_f16(b, 0) * (0.5 + scale.float()) * 0.25).view(n, 16, 1, 1)
    index = b[:, 2:34].long() | _split(b[:, 66:74], 2, -1).reshape(n, 32).long() << 8
    sign = 1 - 2 * _split(b[:, 34:66], 1, -1).float()  # [N, 32, 8]: a set bit is a minus
    return (db * grid[index].view(n, 16, 2, 8) * sign.view(n, 16, 2, 8)).view(n, 256)


def _iq3_xxs(b: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    # d, qs[64] (grid indices, 4 weights each), 8 x u32 (4 sign indices of 7 bits, 4-bit scale)
    n = b.shape[0]
    aux = _le(b[:, 66:].reshape(n, 8, 4))  # [N, 8]
    db = (_f16(b, 0) * (0.5 + (aux >> 28).float()) * 0.5).view(n, 8, 1, 1)
    return (db * grid[b[:, 2:66].long()].view(n, 8, 4, 8) * _sign_groups(aux, signs)).view(n, 256)


def _iq3_s(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # d, qs[64] (grid index bits 0-7), qh[8] (bit 8), signs[32] (a bit per weight), scales[4]; 8 x 32
    n = b.shape[0]
    scale = _split(b[:, 106:], 4, -1).reshape(n, 8)
    db = (_f16(b, 0) * (1 + 2 * scale).float()).view(n, 8, 1, 1)
    index = b[:, 2:66].long() | _split(b[:, 66:74], 1, -1).reshape(n, 64).long() << 8
    sign = 1 - 2 * _split(b[:, 74:106], 1, -1).float()  # [N, 32, 8]
    return (db * grid[index].view(n, 8, 4, 8) * sign.view(n, 8, 4, 8)).view(n, 256)


def _iq1_s(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # d, qs[32] (grid index bits 0-7), 8 x u16 (4 x 3 index bits 8-10, 3-bit scale, sign of delta)
    n = b.shape[0]
    qh = _le(b[:, 34:].reshape(n, 8, 2))  # [N, 8]
    dl = (_f16(b, 0) * (2 * ((qh >> 12) & 7) + 1).float()).view(n, 8, 1, 1)
    delta = (0.125 - 0.25 * (qh >> 15).float()).view(n, 8, 1, 1)
    high = torch.stack([(qh >> shift) & 7 for shift in (0, 3, 6, 9)], dim=-1).reshape(n, 32)
    index = b[:, 2:34].long() | high << 8
    return (dl * (grid[index].view(n, 8, 4, 8) + delta)).view(n, 256)


def _iq1_m(b: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # qs[32] (grid index bits 0-7), qh[16] (a nibble per index: bits 8-10, sign of delta), 4 x u16 scales
    n = b.shape[0]
    words = _le(b[:, 48:].reshape(n, 4, 2))  # [N, 4]
    # The fp16 d has no field of its own: its 4 nibbles are the top nibbles of the 4 scale words.
    top = (words >> 12).to(torch.uint8)
    d = torch.stack([top[:, 0] | top[:, 1] << 4, top[:, 2] | top[:, 3] << 4], dim=1)  # [N, 2] bytes
    d = d.view(torch.float16).float()  # [N, 1]
    scale = torch.stack([(words >> shift) & 7 for shift in (0, 3, 6, 9)], dim=-1).reshape(n, 16)
    dl = (d * (2 * scale + 1).float()).view(n, 8, 2, 1, 1)
    qh = _split(b[:, 32:48], 4, -1).reshape(n, 32)
    index = b[:, :32].long() | (qh & 7).long() << 8
    delta = (0.125 - 0.25 * (qh >> 3).float()).view(n, 8, 2, 2, 1)
    return (dl * (grid[index].view(n, 8, 2, 2, 8) + delta)).view(n, 256)


_DEQUANTIZE = {
    "F32": _float32, "F16": _float16, "BF16": _bfloat16,
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs, "IQ3_S": _iq3_s, "IQ3_XXS": _iq3_xxs,
    "IQ2_S": _iq2_s, "IQ2_XS": _iq2_xs, "IQ2_XXS": _iq2_xxs, "IQ1_S": _iq1_s, "IQ1_M": _iq1_m,
}
# (weights, bytes) per block of every type we dequantize; bits per weight = 8 * bytes / weights.
BLOCK = {name: GGML_QUANT_SIZES[GGMLQuantizationType[name]] for name in _DEQUANTIZE} if GGML_QUANT_SIZES else {}


# ----------------------------------------------------------------------------- entry points

def require_gguf():
    if GGML_QUANT_SIZES is None:
        raise InputError("GGUF files need the gguf package (llama.cpp's): pip install gguf")


def check_type(name: str, qtype: QType) -> str:
    """The name of qtype if dequantize handles it; otherwise an InputError naming the tensor `name`."""
    require_gguf()
    type_name = qtype if isinstance(qtype, str) else qtype.name
    if type_name not in _DEQUANTIZE:
        supported = ", ".join(_DEQUANTIZE)
        raise InputError(f"{name}: GGUF type {type_name} is not supported (supported: {supported})")
    return type_name


def lookup_tables(type_name: str) -> dict[str, torch.Tensor]:
    """The codebooks an IQ type indexes, built from gguf's own tables as int8 CPU tensors.

    kvalues [16] (IQ4), grid [entries, 4 or 8], signs [128, 8] of +1/-1 (from gguf's ksigns bytes).
    Integers, so that model.to(torch.bfloat16) leaves them alone. Empty for the other types.
    """
    if type_name in ("IQ4_NL", "IQ4_XS"):
        # device="cpu" even inside a torch.device("meta") block, where a model is often built
        return {"kvalues": torch.tensor(gguf_quants.IQ4_NL.kvalues, dtype=torch.int8, device="cpu")}
    if not type_name.startswith("IQ"):
        return {}
    codebook = getattr(gguf_quants, type_name)
    codebook.init_grid()  # gguf decodes its hex string once, to float32 [1, 1, entries, width] of small ints
    tables = {"grid": torch.from_numpy(codebook.grid[0, 0].astype(np.int8))}
    if type_name in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS"):
        ksigns = torch.frombuffer(bytearray(gguf_quants.IQ2_XXS.ksigns), dtype=torch.uint8)  # [128]
        tables["signs"] = 1 - 2 * _split(ksigns, 1, -1).to(torch.int8)
    return tables


def dequantize(blocks: torch.Tensor, qtype: QType, shape: tuple[int, int],
               tables: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """GGUF rows [R, C / block * Z] uint8 -> float32 [R, C] (shape = (R, C)), on blocks' device.

    tables: lookup_tables(qtype) already on that device, as QuantLinear keeps them. When None they are
    copied there on each call.
    """
    type_name = check_type("dequantize", qtype)
    rows, cols = shape
    block, size = BLOCK[type_name]
    if blocks.dtype != torch.uint8 or cols % block or blocks.shape != (rows, cols // block * size):
        raise ValueError(f"{type_name} blocks {tuple(blocks.shape)} {blocks.dtype} "
                         f"do not hold a {rows} x {cols} matrix")
    if tables is None:
        tables = {key: table.to(blocks.device) for key, table in lookup_tables(type_name).items()}
    return _DEQUANTIZE[type_name](blocks.reshape(-1, size), **tables).view(rows, cols)


class _Matrix(nn.Module):
    """A quantized matrix [R, C] (shape) of a GGUF type, as a module of the model; dtype: of the activations,
    which no integer buffer can carry."""

    def __init__(self, qtype: QType, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.qtype = check_type(type(self).__name__, qtype)
        self.shape = tuple(shape)
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the dequantized weight's shape [R, C], device and dtype, for code that asks a
        layer's weight where the model lives or how many rows it has (setup_cache, generate): one zero
        seen through zero strides, not the weights (forward dequantizes those)."""
        return torch.zeros((), device=next(self.buffers()).device, dtype=self.dtype).expand(self.shape)

    def extra_repr(self) -> str:
        return f"{self.qtype}, shape={self.shape}, dtype={self.dtype}"


class _Quantized(_Matrix):
    """GGUF blocks [R, row bytes] as a buffer, plus the codebooks of their type (from gguf, not saved)."""

    def __init__(self, blocks: torch.Tensor, qtype: QType, shape: tuple[int, int],
                 dtype: torch.dtype = torch.float32):
        super().__init__(qtype, shape, dtype)
        self.register_buffer("blocks", blocks)
        tables = lookup_tables(self.qtype)
        for key, table in tables.items():
            self.register_buffer(key, table, persistent=False)
        self.table_names = tuple(tables)

    def unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        """Some rows of self.blocks [n, row bytes] -> float32 [n, C]."""
        tables = {key: getattr(self, key) for key in self.table_names}
        return dequantize(blocks, self.qtype, (blocks.shape[0], self.shape[1]), tables)


class QuantLinear(_Quantized):
    """nn.Linear without bias, weight [out, in] kept quantized and dequantized in each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return F.linear(x, self.unpack(self.blocks).to(x.dtype))


class QuantEmbedding(_Quantized):
    """nn.Embedding over a quantized table [V, D]: only the looked-up rows are dequantized.

    A row is a whole run of blocks, so indexing the bytes first gives exactly the blocks of those rows.
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., D]
        rows = self.unpack(self.blocks[ids.flatten()])  # [n, D]
        return rows.view(*ids.shape, self.shape[1]).to(self.dtype)


# ----------------------------------------------------------------------------- the fast path
# quant_math "exact" (above): a forward dequantizes the whole matrix to float32 and multiplies, bit-exact
# with gguf, reading and writing 8 to 16 bytes per weight (float32 weights and their temporaries). "fast":
# the matrix is repacked once, at load, into a layout a kernel reads as is, so a token reads only its bytes.

QUANT_MATH = ("fast", "exact")
INT4_GROUP = 32   # the weights of one scale: a Q4_0 / Q4_1 block, a Q4_K sub-block


def _int4_q4_0(b: torch.Tensor) -> tuple[torch.Tensor, ...]:  # w = d * (q - 8)
    d = _f16(b, 0)
    return b[:, 2:].unsqueeze(1), d, torch.zeros_like(d)


def _int4_q4_1(b: torch.Tensor) -> tuple[torch.Tensor, ...]:  # w = d * q + m = d * (q - 8) + (m + 8 d)
    d = _f16(b, 0)
    return b[:, 4:].unsqueeze(1), d, _f16(b, 2) + 8 * d


def _int4_q4_k(b: torch.Tensor) -> tuple[torch.Tensor, ...]:  # w = d sc q - dmin m = d sc (q - 8) + (8 d sc - dmin m)
    scale, min_ = _scale_min_k4(b[:, 4:16])
    d = _f16(b, 0) * scale                                                 # [N, 8]
    return b[:, 16:].view(-1, 4, 32), d, 8 * d - _f16(b, 2) * min_


# blocks [N, Z] -> (the code bytes [N, units, L], scale and zero [N, block / 32] float32): each unit of L bytes
# holds 2L weights, the first L in the low nibbles and the next L in the high ones (a Q4_0 block is one unit,
# a Q4_K block four), and each group of 32 weights is w = (q - 8) * scale + zero: the form of PyTorch's
# grouped int4 kernels.
_INT4 = {"Q4_0": _int4_q4_0, "Q4_1": _int4_q4_1, "Q4_K": _int4_q4_k}


class Int4Linear(_Matrix):
    """nn.Linear without bias over Q4_0 / Q4_1 / Q4_K weights, repacked once into PyTorch's grouped int4
    layout: torch.ops.aten._weight_int4pack_mm_for_cpu on the CPU, _weight_int4pack_mm (tinygemm) on CUDA.
    The 4-bit codes are the file's; each group of 32 keeps its scale and zero as bfloat16 (the kernels'
    type), so a weight is (q - 8) * bf16(scale) + bf16(zero), where gguf computes it in float32. The
    activations enter in bfloat16 and the products accumulate in float32; the kernels round their output
    to bfloat16 (see test_quants.py for the bound). Memory: 4 bits per weight + 32 bits per 32 weights,
    5 bits against Q4_K's 4.5 (Q4_0's 4.5, Q4_1's 5).
        packed [R', C / 2] uint8 on the CPU (R' = R rounded up to 64: the kernel's row tiles), the
        tinygemm int32 tiles on CUDA; scales_zeros [C / 32, R', 2] bfloat16 bits, kept as int16 so that
        model.to(dtype) leaves them alone."""

    def __init__(self, blocks: torch.Tensor, qtype: QType, shape: tuple[int, int], dtype: torch.dtype = torch.float32):
        super().__init__(qtype, shape, dtype)
        packed, scales_zeros = _int4_pack(blocks, self.qtype, self.shape)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros.view(torch.int16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows, cols = self.shape
        flat = x.reshape(-1, cols).to(torch.bfloat16)
        scales_zeros = self.scales_zeros.view(torch.bfloat16)
        if self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, INT4_GROUP, scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, scales_zeros)
        return y[:, :rows].reshape(*x.shape[:-1], rows).to(x.dtype)


def _int4_pack(blocks: torch.Tensor, qtype: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [R, row bytes] -> the kernel's packed codes and bfloat16 scales_zeros [C / 32, R', 2], on
    blocks' device, a few thousand rows at a time (bounded temporaries; each part of the file read once)."""
    rows, cols = shape
    block, size = BLOCK[qtype]
    padded = -(-rows // 64) * 64                  # padding rows: code bytes 0x88 (code 8), scale 0, zero 0
    step = max(64, (1 << 22) // cols // 64 * 64)  # rows per part, a whole number of 64-row tiles: 4 M codes
    device = blocks.device
    scales_zeros = torch.zeros(cols // INT4_GROUP, padded, 2, dtype=torch.bfloat16, device=device)
    packed = torch.empty(padded, cols // 2, dtype=torch.uint8, device=device)
    threads = torch.get_num_threads()
    # One thread: each op here reads a few MB, which split across threads costs more in their meeting than
    # it saves (on a busy 2-core machine, 20 times the CPU time of one thread).
    torch.set_num_threads(1)
    try:
        for start in range(0, padded, step):
            part = blocks[start:start + step]
            n = len(part)
            codes, scale, zero = _INT4[qtype](part.reshape(-1, size))
            codes = codes.view(n, cols // block, *codes.shape[1:])             # [n, blocks, units, L]: a view
            if n % 64:
                codes = torch.cat([codes, codes.new_full((-n % 64, *codes.shape[1:]), 0x88)])
            scales_zeros[:, start:start + n] = torch.stack([scale, zero], -1).view(n, -1, 2).transpose(0, 1)
            _int4_layout(codes, packed[start:start + len(codes)])
    finally:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(packed, next(t for t in (8, 4, 2) if cols % (16 * t) == 0))
    return packed, scales_zeros


def _int4_layout(codes: torch.Tensor, out: torch.Tensor):
    """Code bytes [n, blocks, units, L] (as _INT4 gives them; n a multiple of 64) -> out [n, C / 2], the
    packed codes that the kernel reads. On CUDA, tinygemm's input to _convert_weight_to_int4pack: two
    codes a byte, the even column's in the high nibble. On the CPU with AVX-512, the layout of
    _weight_int4pack_mm_for_cpu: the kernel reads 64 rows at a time, column by column: for each column 32
    bytes, byte j holding row j (low nibble) and row j + 32 (high). Built here from the file's bytes with
    whole-tensor ops; PyTorch's own packing (used without AVX-512) loops over int32 codes, ten times
    slower for a 24 B model's 22 G weights."""
    n, cpu = codes.shape[0], codes.device.type == "cpu"
    if not cpu or torch.backends.cpu.get_cpu_capability() != "AVX512":
        codes = torch.stack([codes & 15, codes >> 4], dim=-2).view(n, -1)  # [n, C]: each unit's L low, L high
        out.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1) if cpu
                  else codes[:, ::2] << 4 | codes[:, 1::2])
        return
    # rows j and j + 32 of each tile, seen with j last, so that the stack writes the layout in one pass
    top, bottom = codes.view(n // 64, 2, 32, *codes.shape[1:]).movedim(2, -1).unbind(1)   # [tiles, ..., L, 32]
    low = (top & 15) | (bottom << 4)                                       # the codes of each unit's first L
    high = (top >> 4) | (bottom & 0xF0)                                    # and of its next L
    torch.stack([low, high], dim=-3, out=out.view(*low.shape[:-2], 2, *low.shape[-2:]))


# Q8_0 / Q5_K / Q6_K: the block fields stored apart in tiles of output rows (FusedLinear). Each function takes
# the fields [n, ..., r] (n: tiles x blocks along a row, r: the rows of a tile) and gives codes
# [n, *sub-blocks, k, r] float32 (the k weights of a sub-block in the input's order), scales [n, *sub, 1, r]
# and offsets (the same, or None): w = codes * scales + offsets, the order of gguf's float32 arithmetic.

def _fused_q8_0(d: torch.Tensor, q: torch.Tensor):  # d [n, 1, r] fp16, q [n, 32, r] int8
    return q.float(), d.float(), None


def _fused_q5_k(d: torch.Tensor, sc: torch.Tensor, qh: torch.Tensor, qs: torch.Tensor):
    # d [n, 2, r] fp16 (d, dmin); sc [n, 2, 8, r] (the 6-bit scales and mins, unpacked); qh [n, 32, r]; qs [n, 128, r]
    n, r = qs.shape[0], qs.shape[-1]
    low = qs.view(n, 4, 1, 32, r) >> _NIBBLE_SHIFTS.to(qs.device) & 15    # [n, 4, 2, 32, r]: sub-block 2c + nibble
    high = qh.view(n, 1, 1, 32, r) >> _SUB_BLOCK_BITS.to(qs.device) & 1   # bit j of byte l: weight l of sub-block j
    scales = (d[:, 0:1].float() * sc[:, 0].float()).view(n, 4, 2, 1, r)
    offsets = -(d[:, 1:2].float() * sc[:, 1].float()).view(n, 4, 2, 1, r)
    return (low | high << 4).float(), scales, offsets


def _fused_q6_k(d: torch.Tensor, sc: torch.Tensor, ql: torch.Tensor, qh: torch.Tensor):
    # d [n, 1, r] fp16; sc [n, 16, r] int8; ql [n, 128, r]; qh [n, 64, r]. Weight 128 h + 64 i + 32 c + l of a
    # block: nibble i of ql byte 64 h + 32 c + l, bits 2 (2 i + c) of qh byte 32 h + l; sub-block (w // 16).
    n, r = ql.shape[0], ql.shape[-1]
    low = ql.view(n, 2, 1, 2, 32, r) >> _NIBBLE_SHIFTS.to(ql.device).view(2, 1, 1, 1) & 15   # [n, h, i, c, l, r]
    high = qh.view(n, 2, 1, 1, 32, r) >> _Q6_K_HIGH_SHIFTS.to(ql.device) & 3
    codes = ((low | high << 4).float() - 32).view(n, 2, 2, 2, 2, 16, r)
    scales = (d.float() * sc.float()).view(n, 2, 2, 2, 2, 1, r)
    return codes, scales, None


_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).view(2, 1, 1)
_SUB_BLOCK_BITS = torch.arange(8, dtype=torch.uint8).view(4, 2, 1, 1)
_Q6_K_HIGH_SHIFTS = torch.tensor([[0, 2], [4, 6]], dtype=torch.uint8).view(2, 2, 1, 1)


def _fields_q8_0(b: torch.Tensor) -> list[torch.Tensor]:  # blocks [R, b, 34] -> d [R, b, 1] fp16, q [R, b, 32] int8
    return [b[..., :2].contiguous().view(torch.float16), b[..., 2:].view(torch.int8)]


def _fields_q5_k(b: torch.Tensor) -> list[torch.Tensor]:
    r, n = b.shape[:2]
    scale, min_ = _scale_min_k4(b[..., 4:16].reshape(-1, 12))
    sc = torch.stack([scale, min_], 1).to(torch.uint8).view(r, n, 2, 8)
    return [b[..., :4].contiguous().view(torch.float16), sc, b[..., 16:48], b[..., 48:]]


def _fields_q6_k(b: torch.Tensor) -> list[torch.Tensor]:
    return [b[..., 208:].contiguous().view(torch.float16), b[..., 192:208].view(torch.int8), b[..., :128],
            b[..., 128:192]]


# type -> (the fields of blocks [R, b, Z], each [R, b, ...]; the codes, scales and offsets from them, rows last)
_FUSED = {"Q8_0": (_fields_q8_0, _fused_q8_0), "Q5_K": (_fields_q5_k, _fused_q5_k),
          "Q6_K": (_fields_q6_k, _fused_q6_k)}
FUSED_TILE = 128   # output rows of a tile: their fields are contiguous, so a tile's loop reads memory in order
# Weights per part of a FusedLinear's product, so that a part's temporaries are 4 MB of float32: decoding's
# sub-block sums (one per 16 or 32 weights), prefill's dequantized weights.
FUSED_DECODE_PART, FUSED_PREFILL_PART = 2**24, 2**20


def fused_weights(type_name: str, *fields: torch.Tensor) -> torch.Tensor:
    """The weights of some tiles [t, C, r] (each tile's W.T) from their fields [t, b, ..., r], as gguf computes them."""
    t, r = fields[0].shape[0], fields[0].shape[-1]
    codes, scales, offsets = _FUSED[type_name][1](*(f.flatten(0, 1) for f in fields))
    w = codes * scales if offsets is None else codes * scales + offsets
    return w.view(t, -1, r)


def fused_matvec(type_name: str, x: torch.Tensor, *fields: torch.Tensor) -> torch.Tensor:
    """One token's product y [t * r] = W x [C] over some tiles, from their fields: each sub-block's codes
    summed against x, then times its scale (plus its offset times x's sum over it). Compiled (_compiled),
    one loop that dequantizes and sums as it goes; the sub-block sums [t, C / k, r] are its one temporary,
    so FusedLinear runs it on a few tiles at a time (all at once, they are 168 MB for a 24 B model's Q6_K head)."""
    t, r = fields[0].shape[0], fields[0].shape[-1]
    codes, scales, offsets = (None if f is None else f.view(t, -1, *f.shape[1:])   # [t, b, *sub, k or 1, r]
                              for f in _FUSED[type_name][1](*(f.flatten(0, 1) for f in fields)))
    x = x.view(*codes.shape[1:-1], 1)
    y = (codes * x).sum(-2, keepdim=True) * scales
    if offsets is not None:
        y = y + offsets * x.sum(-2, keepdim=True)
    return y.view(t, -1, r).sum(1).flatten()


_COMPILED = {}   # function -> its compiled form, made on first use


def _compiled(fn):
    """fn compiled once for every shape (dynamic), each kernel parallel whatever the sizes of the first call
    (dynamic_threads), which would otherwise decide it. Compiled on first use: torch.compile brings in
    dynamo (about 70 MB), which a model without fused types never needs; inside a step being compiled
    whole (--compile), fn itself, traced into that step's graph. (A compilation per shape can run faster,
    but its variants would pass dynamo's limit of 8 per function in a model of several types and shapes,
    past which it runs the eager code.)"""
    if torch.compiler.is_compiling():
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, options={"cpp.dynamic_threads": True})
    return _COMPILED[fn]


class FusedLinear(_Matrix):
    """nn.Linear without bias over Q8_0 / Q5_K / Q6_K weights, their block fields stored at load in tiles of
    FUSED_TILE output rows (fewer when R is not a multiple): each field [R / r, blocks along a row, field
    size, r], a tile's rows innermost. The file's bytes, rearranged (Q5_K's 6-bit scales unpacked to bytes:
    +2 %). A few tiles at a time, one token (decoding) runs a compiled loop that dequantizes and sums as it
    goes; several (prefill) dequantize the weights, as gguf computes them, for a matrix product in float32."""

    def __init__(self, blocks: torch.Tensor, qtype: QType, shape: tuple[int, int], dtype: torch.dtype = torch.float32):
        super().__init__(qtype, shape, dtype)
        rows, cols = self.shape
        block, size = BLOCK[self.qtype]
        tile = gcd(rows, FUSED_TILE)
        fields = _FUSED[self.qtype][0](blocks.view(rows, cols // block, size))
        self.field_names = tuple(f"field{i}" for i in range(len(fields)))
        for name, field in zip(self.field_names, fields):
            self.register_buffer(name, field.view(rows // tile, tile, *field.shape[1:]).movedim(1, -1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows, cols = self.shape
        fields = [getattr(self, name) for name in self.field_names]
        flat = x.reshape(-1, cols).float()
        tiles, tile = fields[0].shape[0], fields[0].shape[-1]
        step = max(1, (FUSED_DECODE_PART if len(flat) == 1 else FUSED_PREFILL_PART) // (cols * tile))   # tiles
        parts = [[f[start:start + step] for f in fields] for start in range(0, tiles, step)]
        if len(flat) == 1:
            y = torch.cat([_compiled(fused_matvec)(self.qtype, flat[0], *part) for part in parts])[None]
        else:
            y = torch.cat([flat @ _compiled(fused_weights)(self.qtype, *part) for part in parts])   # [tiles, n, r]
            y = y.transpose(0, 1).reshape(len(flat), rows)
        return y.reshape(*x.shape[:-1], rows).to(x.dtype)


def linear(blocks: torch.Tensor, qtype: QType, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
           math: str = "fast") -> nn.Module:
    """The nn.Linear (no bias) of a quantized matrix, GGUF rows [R, row bytes] of shape (R, C). math
    "exact": QuantLinear, dequantized in each forward, bit-exact with gguf. "fast": Q4_0 / Q4_1 / Q4_K
    repacked for PyTorch's int4 kernels (Int4Linear), Q8_0 / Q5_K / Q6_K stored in tiles of output rows for
    a compiled loop (FusedLinear); the other types as "exact"."""
    type_name = check_type("quants.linear", qtype)
    if math == "fast" and type_name in _INT4:
        return Int4Linear(blocks, type_name, shape, dtype)
    if math == "fast" and type_name in _FUSED:
        return FusedLinear(blocks, type_name, shape, dtype)
    return QuantLinear(blocks, type_name, shape, dtype)
