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


class _Quantized(nn.Module):
    """GGUF blocks [R, row bytes] as a buffer, plus the codebooks of their type (from gguf, not saved).
    dtype: of the dequantized weights, the model's activations (the uint8 buffer cannot carry one)."""

    def __init__(self, blocks: torch.Tensor, qtype: QType, shape: tuple[int, int],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qtype = check_type(type(self).__name__, qtype)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.register_buffer("blocks", blocks)
        tables = lookup_tables(self.qtype)
        for key, table in tables.items():
            self.register_buffer(key, table, persistent=False)
        self.table_names = tuple(tables)

    def unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        """Some rows of self.blocks [n, row bytes] -> float32 [n, C]."""
        tables = {key: getattr(self, key) for key in self.table_names}
        return dequantize(blocks, self.qtype, (blocks.shape[0], self.shape[1]), tables)

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the dequantized weight's shape [R, C], device and dtype, for code that asks a
        layer's weight where the model lives or how many rows it has (setup_cache, generate): one zero
        seen through zero strides, not the weights (forward dequantizes those)."""
        return torch.zeros((), device=self.blocks.device, dtype=self.dtype).expand(self.shape)

    def extra_repr(self) -> str:
        return f"{self.qtype}, shape={self.shape}, dtype={self.dtype}"


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
