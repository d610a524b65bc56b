"""Quantized checkpoints in the Hugging Face layout, kept packed and dequantized on the fly.

    read_format(config, source) -> (Format | None, config without its quantization keys)
    gather(fmt, keys, get) -> (key, tensor or Packed), ...   a folder's tensors, each quantized layer's parts in one
    PackedLinear / PackedEmbedding                            nn.Linear / nn.Embedding over a Packed weight

Three formats that people download besides GGUF, told apart by config.json:
- MLX (mlx_lm.convert -q; key "quantization": bits, group_size, mode "affine", per-layer overrides keyed by
  module path): NAME.weight uint32 [out, in * bits / 32], each row one bit stream read from the least
  significant bit of little-endian words; NAME.scales and NAME.biases [out, in / group] in the float dtype;
  w = scales * q + biases per group of `group` weights of a row, q unsigned.
- bitsandbytes 4-bit (quantization_config quant_method "bitsandbytes", load_in_4bit; unsloth's -bnb-4bit):
  NAME.weight uint8 [out * in / 2, 1], the matrix flattened row by row, two codes a byte, the first in the
  high nibble; the code indexes a 16-value codebook (NAME.weight.quant_map: NF4 or FP4) and each block of
  `blocksize` weights is scaled by its absmax. Double-quantized, the absmax are themselves uint8 codes into
  a 256-value map (nested_quant_map) scaled per nested block (nested_absmax), plus one offset. The JSON of
  NAME.weight.quant_state.bitsandbytes__nf4 gives the block sizes, offset, shape and dtype.
- compressed-tensors (quant_method "compressed-tensors"; RedHat AI's, llm-compressor's): "pack-quantized"
  NAME.weight_packed int32 [out, in * bits / 32], a bit stream as MLX's of q + 2^(bits-1), NAME.weight_scale,
  NAME.weight_zero_point (asymmetric; packed the same way along the output dimension), NAME.weight_shape;
  "float-quantized" (FP8 e4m3) and "int-quantized" (int8) keep NAME.weight in that dtype beside
  NAME.weight_scale. w = (q - zero) * scale per tile: the whole matrix ("tensor"), a row ("channel"), a
  group of a row ("group") or a block ("block").
Names keep the Hugging Face spelling and its rotate-half row order of wq / wk (load.py un-permutes it: a
PackedLinear reorders its outputs). Each format's dequantization does its library's float arithmetic in
its order, so that the weights are bit-exact with mlx.core.dequantize, bitsandbytes' dequantize_4bit and
compressed-tensors' decompressors (tests/test_quant_formats.py); those libraries are never imported here.
Activation quantization (FP8 or int8 activations of W8A8 schemes) is not reproduced: as for GGUF, the
model multiplies in float, so that the weights alone make the difference.

A faster path plugs in per format where its arithmetic maps: MLX 4-bit and compressed-tensors int4 groups
are w = scale * code + offset per group (Packed.int4_groups), the input of a grouped int4 kernel (torch's
_weight_int4pack_mm, repacked at load); an FP8 weight is held as torch.float8_e4m3fn, a scaled-matmul input.
Under torch.compile the dequantization is not bit-exact: inductor keeps bfloat16 intermediates in float32.
"""
import json
import re
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from inputs import InputError

SUPPORTED = ("MLX affine 2/3/4/5/6/8-bit; bitsandbytes 4-bit nf4/fp4 (double-quantized or not); compressed-tensors "
             "pack-quantized int4/int8, float-quantized fp8 (e4m3), int-quantized int8")
MLX_BITS = (2, 3, 4, 5, 6, 8)


@dataclass
class Format:
    """A checkpoint's quantization, as its config.json gives it."""
    method: str       # "mlx", "bitsandbytes" or "compressed-tensors"
    settings: dict    # the config's entry: MLX "quantization", else "quantization_config"
    source: str       # the config file, for errors


# ----------------------------------------------------------------------------- the configuration

def read_format(config: dict, source: str) -> tuple[Format | None, dict]:
    """The quantization config.json describes (None: none), checked, and the config without it (what
    config.parse_hf_config reads). A method, mode or bit width not read here is refused in one line."""
    if not isinstance(config, dict):
        return None, config   # config.parse_hf_config names what it is
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    mlx, settings = config.get("quantization"), config.get("quantization_config") or text.get("quantization_config")
    rest = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if "text_config" in rest and isinstance(rest["text_config"], dict):
        rest["text_config"] = {k: v for k, v in text.items() if k != "quantization_config"}
    if mlx is None and settings is None:
        return None, rest
    if mlx is not None:   # mlx_lm also writes the same entry as quantization_config
        fmt = Format("mlx", _object(mlx, f"{source}: quantization"), source)
        for layer, entry in fmt.settings.items():
            if isinstance(entry, dict):
                _mlx_args(entry, f"{source}: quantization[{layer!r}]")
        _mlx_args(fmt.settings, f"{source}: quantization")
        return fmt, rest
    settings = _object(settings, f"{source}: quantization_config")
    method = settings.get("quant_method")
    if method == "bitsandbytes":
        _check_bitsandbytes(settings, source)
    elif method == "compressed-tensors":
        _check_compressed_tensors(settings, source)
    else:
        raise InputError(f"{source}: quantization_config quant_method {method!r:.40} is not supported (supported: "
                         f"{SUPPORTED})")
    return Format(method, settings, source), rest


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object, got {value!r:.60}")
    return value


def _refuse(where: str, what: str, value) -> None:
    raise InputError(f"{where}: {what} {value!r:.60} is not supported (supported: {SUPPORTED})")


def _mlx_args(entry: dict, where: str) -> tuple[int, int]:
    """bits and group_size of an MLX quantization entry (the whole model's, or a layer's)."""
    if entry.get("mode", "affine") != "affine":
        _refuse(where, "MLX mode", entry["mode"])
    bits, group = entry.get("bits"), entry.get("group_size")
    if bits not in MLX_BITS:
        _refuse(where, "MLX bits", bits)
    if not (isinstance(group, int) and not isinstance(group, bool) and group > 0 and group % 8 == 0):
        raise InputError(f"{where}: group_size {group!r:.40}: expected a positive multiple of 8")
    return bits, group


def _check_bitsandbytes(settings: dict, source: str) -> None:
    where = f"{source}: quantization_config"
    if not settings.get("load_in_4bit"):
        _refuse(where, "bitsandbytes", "8-bit (load_in_8bit)" if settings.get("load_in_8bit") else "without load_in_4bit")
    if settings.get("bnb_4bit_quant_type", "fp4") not in ("nf4", "fp4"):
        _refuse(where, "bnb_4bit_quant_type", settings["bnb_4bit_quant_type"])


CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")


def _check_compressed_tensors(settings: dict, source: str) -> None:
    where = f"{source}: quantization_config"
    if settings.get("quantization_status", "compressed") != "compressed":
        _refuse(where, "quantization_status", settings["quantization_status"])
    if settings.get("kv_cache_scheme"):
        _refuse(where, "kv_cache_scheme", settings["kv_cache_scheme"])
    groups = _object(settings.get("config_groups"), f"{where}: config_groups")
    for name, group in groups.items():
        here = f"{where}: config_groups[{name!r}]"
        targets = _object(group, here).get("targets")
        if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise InputError(f"{here}: targets {targets!r:.60}: expected a list of module names or patterns")
        _ct_args(settings, group, here)


def _ct_args(settings: dict, group: dict, where: str) -> tuple[str, dict]:
    """The format and weight arguments of a compressed-tensors config group, checked."""
    fmt = group.get("format") or settings.get("format")
    weights = _object(group.get("weights"), f"{where}: weights")
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    if fmt not in CT_FORMATS:
        _refuse(where, "compressed-tensors format", fmt)
    if fmt == "pack-quantized" and not (kind == "int" and bits in (4, 8)):
        _refuse(where, "pack-quantized", f"{kind} {bits}-bit")
    if fmt != "pack-quantized" and not (bits == 8 and kind in ("int", "float")):
        _refuse(where, fmt, f"{kind} {bits}-bit")
    if strategy not in ("tensor", "channel", "group", "block"):
        _refuse(where, "weight strategy", strategy)
    if weights.get("actorder") not in (None, "weight", "static"):
        _refuse(where, "actorder", weights["actorder"])
    if weights.get("dynamic") not in (None, False):
        _refuse(where, "dynamic weights", weights["dynamic"])
    return fmt, weights


def _ct_group(fmt: Format, layer: str) -> tuple[str, dict]:
    """The format and weight arguments that apply to layer `layer` (its name in the file): the first config
    group whose targets name it (a class "Linear", a name, or "re:" and a regular expression)."""
    for name, group in fmt.settings["config_groups"].items():
        if any(t in ("Linear", "Embedding", layer) or t.startswith("re:") and re.match(t[3:], layer)
               for t in group["targets"]):
            return _ct_args(fmt.settings, group, f"{fmt.source}: quantization_config.config_groups[{name!r}]")
    raise InputError(f"{fmt.source}: the file quantizes {layer!r} but no config group targets it")


# ----------------------------------------------------------------------------- bits

def bit_fields(b: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned `bits`-bit fields of rows of bytes [..., k], read as one bit stream from the least
    significant bit of each byte on (of little-endian words): [..., k * 8 / bits], uint8 where no field
    crosses a byte (2, 4, 8 bits), else int64."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        return torch.stack([(b >> s) & mask for s in range(0, 8, bits)], dim=-1).flatten(-2)
    words = b.unflatten(-1, (-1, bits)).long()   # every `bits` bytes hold 8 fields
    stream = sum(words[..., i] << (8 * i) for i in range(bits))
    return torch.stack([(stream >> (bits * j)) & mask for j in range(8)], dim=-1).flatten(-2)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of an integer tensor [R, C] in memory order, [R, C * itemsize] (on a little-endian machine)."""
    return t.contiguous().view(torch.uint8)


def _tiles(x: torch.Tensor, s: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] as tiles of `tile` rows x columns, and s [R / rows, C / columns] one value per tile, shaped to
    broadcast over them: [R / rows, rows, C / columns, columns] and [R / rows, 1, C / columns, 1]."""
    (rows, cols), (th, tw) = x.shape, tile
    return x.view(rows // th, th, cols // tw, tw), s.reshape(rows // th, 1, cols // tw, 1)


# ----------------------------------------------------------------------------- the formats

class Packed(nn.Module):
    """One quantized matrix [out, in] as its file stores it (buffers), and its exact dequantization."""
    shape: tuple[int, int]
    dtype: torch.dtype          # of the weights it unpacks to: the format's own float dtype

    def unpack(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights [out, in] in self.dtype, or only rows `rows` [n] -> [n, in] (an embedding's lookup)."""
        w = self.dequantize()
        return w if rows is None else w[rows]

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def int4_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """For a grouped int4 kernel (torch's _weight_int4pack_mm): codes [out, in] uint8 0..15, scale and
        offset [out, in / group] float32 and the group size, with w = scale * code + offset in exact
        arithmetic (the kernel rounds its own way); None where the format's arithmetic is not that."""
        return None

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"


class MLXAffine(Packed):
    """MLX: weight uint32 [out, in * bits / 32], scales and biases [out, in / group]; w = scales * q + biases."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group: int):
        super().__init__()
        self.bits, self.group, self.dtype = bits, group, scales.dtype
        self.shape = (weight.shape[0], weight.shape[1] * 32 // bits)
        for name, t in (("weight", weight), ("scales", scales), ("biases", biases)):
            self.register_buffer(name, t)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if rows is None else self.weight[rows]
        return bit_fields(_as_bytes(weight), self.bits)                          # [n, in]

    def unpack(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        s, b = (self.scales, self.biases) if rows is None else (self.scales[rows], self.biases[rows])
        q, s = _tiles(self.codes(rows).to(self.dtype), s, (1, self.group))
        # mlx's order and dtype: the product rounded to the scales' dtype, then the sum
        return (s * q + b.reshape(s.shape)).view(len(s), self.shape[1])

    def dequantize(self) -> torch.Tensor:
        return self.unpack()

    def int4_groups(self):
        if self.bits != 4:
            return None
        return self.codes().to(torch.uint8), self.scales.float(), self.biases.float(), self.group


class BnB4bit(Packed):
    """bitsandbytes 4-bit: codes [out * in / 2, 1] uint8 (high nibble first) into quant_map [16], scaled per
    block by absmax: float32 [blocks], or uint8 codes into nested_quant_map [256] scaled per nested block by
    nested_absmax, plus offset (double quantization)."""

    def __init__(self, parts: dict[str, torch.Tensor], state: dict, where: str):
        super().__init__()
        self.shape, self.dtype = tuple(state["shape"]), getattr(torch, state["dtype"])
        self.blocksize, self.nested_blocksize = state["blocksize"], state.get("nested_blocksize")
        n = self.shape[0] * self.shape[1]
        weight, absmax = parts["weight"], parts["absmax"]
        if n % self.blocksize or weight.dtype != torch.uint8 or weight.numel() * 2 != n or absmax.numel() != n // self.blocksize:
            raise InputError(f"{where}: {weight.numel()} {weight.dtype} codes and {absmax.numel()} block scales are not "
                             f"a {self.shape} matrix in uint8 pairs of codes and whole blocks of {self.blocksize}")
        for name, t in parts.items():
            self.register_buffer(name, t)
        if self.nested_blocksize is not None:   # a float32 scalar, as bitsandbytes rebuilds it from the JSON
            self.register_buffer("offset", torch.tensor(float(state["nested_offset"]), dtype=torch.float32))

    def block_scales(self) -> torch.Tensor:
        """The absmax of every block, float32 [blocks]."""
        if self.nested_blocksize is None:
            return self.absmax
        block = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_blocksize
        return self.nested_quant_map[self.absmax.long()] * self.nested_absmax[block] + self.offset

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [out * in], two a byte, the first in its high nibble."""
        b = self.weight.view(-1)
        return torch.stack([b >> 4, b & 15], dim=-1).view(-1).int()

    def dequantize(self) -> torch.Tensor:
        w = self.quant_map[self.codes()].view(-1, self.blocksize) * self.block_scales().view(-1, 1)   # float32
        return w.view(self.shape).to(self.dtype)


BNB_PARTS = {"absmax": "weight.absmax", "quant_map": "weight.quant_map", "nested_absmax": "weight.nested_absmax",
             "nested_quant_map": "weight.nested_quant_map"}


class CompressedTensor(Packed):
    """compressed-tensors: q [out, in] (packed int32 bit stream, or an int8 / float8 weight), scale and optional
    zero point per tile of `tile` rows x columns; w = (q - zero) * scale in the scale's dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: tuple[int, int],
                 bits: int | None, tile: tuple[int, int]):
        super().__init__()
        self.shape, self.bits, self.tile, self.dtype = shape, bits, tile, scale.dtype
        self.register_buffer("q", q)              # bits None: the weight as stored; else packed int32
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)        # as stored: int8, or packed into int32 as q is

    def values(self) -> torch.Tensor:
        """The stored values [out, in]: signed integers (q of the packed formats, less their offset), or the weight."""
        if self.bits is None:
            return self.q
        return bit_fields(_as_bytes(self.q), self.bits)[:, :self.shape[1]].to(torch.int16) - (1 << (self.bits - 1))

    def zeros(self) -> torch.Tensor | None:
        """The zero point of every tile [out / rows, in / columns] (None: symmetric)."""
        if self.zero is None or self.zero.dtype != torch.int32:
            return self.zero
        return _unpack_zero(self.zero, self.bits, tuple(self.scale.shape))

    def dequantize(self) -> torch.Tensor:
        q, s = _tiles(self.values().to(self.dtype), self.scale, self.tile)
        if self.zero is not None:
            q = q - self.zeros().reshape(s.shape).to(self.dtype)
        return (q * s).view(self.shape)

    def int4_groups(self):
        if self.bits != 4 or self.tile[0] != 1:
            return None
        scale = self.scale.float().reshape(self.shape[0], -1)
        zero = 0 if self.zero is None else self.zeros().float().reshape(scale.shape)
        return (self.values() + 8).to(torch.uint8), scale, -(8 + zero) * scale, self.tile[1]


def _unpack_zero(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """A zero point packed along the output dimension: [ceil(out * bits / 32), groups] int32 -> [out, groups] int8."""
    return (bit_fields(_as_bytes(packed.t()), bits)[:, :shape[0]].t().to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def _ct_tile(strategy: str, weights: dict, shape: tuple[int, int], scale: torch.Tensor, where: str) -> tuple[int, int]:
    rows, cols = shape
    tile = {"tensor": (rows, cols), "channel": (1, cols), "group": (1, weights.get("group_size") or 0),
            "block": tuple(weights.get("block_structure") or (0, 0))}[strategy]
    if not (tile[0] > 0 and tile[1] > 0 and rows % tile[0] == 0 and cols % tile[1] == 0
            and scale.numel() == rows // tile[0] * cols // tile[1]):
        raise InputError(f"{where}: weight_scale {tuple(scale.shape)} is not one scale per {strategy} of "
                         f"{tile[0]} x {tile[1]} of a {rows} x {cols} matrix")
    return tile


# ----------------------------------------------------------------------------- gathering a layer's tensors

# The tensor that marks a quantized layer NAME, and the tensors it is made of, per method: suffixes of NAME.
MARKERS = {"mlx": (".scales",), "bitsandbytes": (".weight.quant_state.bitsandbytes__nf4",
                                                 ".weight.quant_state.bitsandbytes__fp4"),
           "compressed-tensors": (".weight_scale",)}
PARTS = {"mlx": (".weight", ".scales", ".biases"),
         "bitsandbytes": (".weight", *(f".{p}" for p in BNB_PARTS.values())),
         "compressed-tensors": (".weight", ".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape",
                                ".input_scale", ".input_zero_point")}


def gather(fmt: Format | None, keys: list[str], get: Callable[[str], torch.Tensor],
           get_part: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, str, torch.Tensor | Packed]]:
    """Every tensor of a checkpoint as (its key, the key it is stored under, get(key)); with a format, each
    quantized layer NAME instead as (NAME.weight, the key of the tensor that marks it, a Packed of all its
    tensors, mapped by get_part, which maps tensors held as stored), wherever they are."""
    if fmt is None:
        yield from ((key, key, get(key)) for key in keys)
        return
    layers = {key: (key[:-len(m)], m) for key in keys for m in MARKERS[fmt.method] if key.endswith(m)}
    present = set(keys)
    taken = {layer + part for layer, m in layers.values() for part in PARTS[fmt.method] + (m,)} & present
    for key in keys:
        if key in layers:
            layer, m = layers[key]
            parts = {part: get_part(layer + part) for part in PARTS[fmt.method] + (m,) if layer + part in present}
            yield layer + ".weight", key, packed(fmt, layer, parts)
        elif key not in taken:
            yield key, key, get(key)


def packed(fmt: Format, layer: str, parts: dict[str, torch.Tensor]) -> Packed:
    """The Packed weight of layer `layer` (its name in the file) from its tensors (suffix -> tensor)."""
    where = f"{fmt.source}: layer {layer!r}"
    if fmt.method == "mlx":
        entry = fmt.settings.get(layer, fmt.settings)
        if not isinstance(entry, dict):
            raise InputError(f"{where}: the file quantizes it but quantization[{layer!r}] is {entry!r:.40}")
        bits, group = _mlx_args(entry, where)
        need(parts, (".weight", ".scales", ".biases"), where)
        weight, scales, biases = parts[".weight"], parts[".scales"], parts[".biases"]
        cols = weight.shape[-1] * 32 // bits if weight.ndim == 2 else 0
        if weight.dtype != torch.uint32 or cols % group or scales.shape != biases.shape \
                or scales.shape != (weight.shape[0], cols // group):
            raise InputError(f"{where}: weight {weight.dtype} {tuple(weight.shape)}, scales {tuple(scales.shape)}, biases "
                             f"{tuple(biases.shape)} are not {bits}-bit groups of {group} (uint32 [out, in * {bits} / 32], "
                             f"[out, in / {group}])")
        return MLXAffine(weight, scales, biases, bits, group)
    if fmt.method == "bitsandbytes":
        marker = next(p for p in parts if p.startswith(".weight.quant_state."))
        state = _json_state(parts[marker], f"{where}: {marker[1:]}")
        names = ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if "nested_blocksize" in state else ())
        need(parts, (".weight", *(f".{BNB_PARTS[n]}" for n in names)), where)
        return BnB4bit({"weight": parts[".weight"], **{n: parts[f".{BNB_PARTS[n]}"] for n in names}}, state, where)
    kind, weights = _ct_group(fmt, layer)
    scale, zero = parts[".weight_scale"], parts.get(".weight_zero_point")
    if kind == "pack-quantized":
        need(parts, (".weight_packed", ".weight_shape"), where)
        shape, bits, q = tuple(parts[".weight_shape"].tolist()), weights["num_bits"], parts[".weight_packed"]
        if len(shape) != 2 or q.dtype != torch.int32 or tuple(q.shape) != (shape[0], -(-shape[1] * bits // 32)):
            raise InputError(f"{where}: weight_packed {q.dtype} {tuple(q.shape)} does not hold a {bits}-bit {shape} matrix")
    else:
        need(parts, (".weight",), where)
        q, bits = parts[".weight"], None
        shape = tuple(q.shape)
        if q.dtype != (torch.float8_e4m3fn if weights["type"] == "float" else torch.int8):
            raise InputError(f"{where}: weight has dtype {q.dtype}, expected {weights['type']} 8-bit")
    tile = _ct_tile(weights["strategy"], weights, shape, scale, where)
    if (zero is not None) != (weights.get("symmetric") is False):
        raise InputError(f"{where}: weight_zero_point is {'present' if zero is not None else 'missing'}, but the "
                         f"config says symmetric {weights.get('symmetric')}")
    if zero is not None and zero.dtype == torch.int32 and not (
            bits and scale.ndim == 2 and tuple(zero.shape) == (-(-scale.shape[0] * bits // 32), scale.shape[1])):
        raise InputError(f"{where}: weight_zero_point {tuple(zero.shape)} does not pack one {bits}-bit zero point "
                         f"per scale {tuple(scale.shape)} along the output dimension")
    return CompressedTensor(q, scale, zero, shape, bits, tile)


def need(parts: dict, names: tuple[str, ...], where: str) -> None:
    missing = [n[1:] for n in names if n not in parts]
    if missing:
        raise InputError(f"{where}: missing its tensor(s) {missing}")


def _json_state(t: torch.Tensor, where: str) -> dict:
    """bitsandbytes' quant_state: a JSON object stored as uint8 bytes."""
    try:
        state = json.loads(bytes(t.view(-1).tolist()))
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{where}: not a JSON quant_state") from None
    state = _object(state, where)
    shape, blocksize = state.get("shape"), state.get("blocksize")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n > 0 for n in shape)
            and isinstance(blocksize, int) and blocksize > 0 and state.get("dtype") in ("bfloat16", "float16", "float32")):
        raise InputError(f"{where}: expected a 2-D shape, a blocksize and a float dtype, got {state!r:.120}")
    nested = state.get("nested_blocksize", 1), state.get("nested_offset", 0.0)
    if not (isinstance(nested[0], int) and nested[0] > 0 and isinstance(nested[1], (int, float))):
        raise InputError(f"{where}: nested_blocksize and nested_offset are malformed: {state!r:.120}")
    return state


# ----------------------------------------------------------------------------- the layers

class _PackedLayer(nn.Module):
    """A layer over a Packed weight. dtype: of the activations (the model's), which packed buffers cannot carry."""

    def __init__(self, packed: Packed, dtype: torch.dtype | None = None, order: torch.Tensor | None = None):
        super().__init__()
        self.packed, self.dtype = packed, dtype or packed.dtype
        self.register_buffer("order", order)   # a PackedLinear's output i is the file's row order[i]

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's shape, device and dtype (for code that asks where the model lives),
        one zero seen through zero strides: forward dequantizes the real weights."""
        return torch.zeros((), device=next(self.packed.buffers()).device, dtype=self.dtype).expand(self.shape)


class PackedLinear(_PackedLayer):
    """nn.Linear without bias, its weight [out, in] kept packed and dequantized in each forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [..., in] -> [..., out]
        y = F.linear(x, self.packed.unpack().to(x.dtype))
        return y if self.order is None else y.index_select(-1, self.order)


class PackedEmbedding(_PackedLayer):
    """nn.Embedding over a packed table [V, D]: only the rows looked up are dequantized where the format
    stores rows apart (MLX)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:   # [...] -> [..., D]
        return self.packed.unpack(ids.flatten()).view(*ids.shape, self.shape[1]).to(self.dtype)
