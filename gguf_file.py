"""GGUF files (llama.cpp's format): the community's quantized Mistral Small 3.x, read into the reference.

    read_gguf(path) -> GGUF                        the header: metadata and tensor infos (no tensor is read)
    gguf_config(text, mmproj) -> ModelArgs, VisionArgs | None
    gguf_tokenizer(text, mmproj) -> tokenizer.Tekken    the file's own tokenizer (tokenizer.ggml.*)
    native_name, tensor_bytes, dequantized, quant_module, tied_head    for load.py's loop over the tensors

A text file (general.architecture "llama" for the 2025 community files, "mistral3" for current
conversions) holds the text model; an mmproj file ("clip", projector "pixtral") the vision tower, the
patch merger and the adapter. Hyper-parameters come from the `{arch}.*` keys. Tensor names map one to one
onto the native ones (GGUF_TEXT_NAMES, GGUF_VISION_NAMES) and wq / wk need no permutation: llama.cpp's
converter undoes the Hugging Face rotate-half order, so GGUF keeps the native interleaved pairs.
Which files make a model (split sets, the mmproj beside, a quant on the hub) is checkpoint.py's business.

Quantized matrices become quants modules (quants.linear, QuantEmbedding): with quant_math "exact" they stay
in their blocks (on the CPU the file's pages, memory-mapped: never copied) and are dequantized in each
forward; "fast" repacks them once for a kernel. F32 / F16 / BF16 tensors (the norms, an F16 mmproj) become
ordinary parameters in the model's dtype.

The header is parsed by gguf_header.py (not by gguf's GGUFReader, 11 s to open a full vocabulary); the
gguf package is still needed, through quants.py, for the block sizes and the IQ codebooks.
"""
import base64
import math
import mmap
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import quants
from config import build_args
from gguf_header import read_header
from inputs import InputError
from model import ModelArgs
from tokenizer import TEKKEN_PATTERN, Tekken
from vision import NORM_EPS, VisionArgs

# ----------------------------------------------------------------------------- the header

@dataclass
class TensorInfo:
    name: str
    type_name: str        # "Q4_K", "F32", ... (gguf's GGMLQuantizationType names)
    shape: tuple          # torch order [out, in]: the file's ne reversed
    offset: int           # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUF:
    path: Path
    metadata: dict
    tensors: dict         # name -> TensorInfo
    size: int             # the file's size in bytes


def read_gguf(path) -> GGUF:
    """The metadata and tensor infos of one GGUF file (nothing of the tensor data is read). A tensor of a
    type that quants.py cannot read, or held twice, is refused here, before any model is built."""
    header = read_header(path)
    if header.byte_order != "<":
        raise InputError(f"{header.path}: a big-endian GGUF file; its weights are not supported here")
    quants.require_gguf()   # the type ids and block sizes are gguf's
    tensors = {}
    for raw in header.tensors:
        if raw.name in tensors:
            raise InputError(f"{header.path}: tensor {raw.name!r} is listed twice; a weight must be stored once")
        tensors[raw.name] = info = _tensor_info(header.path, raw.name, raw.ne, raw.type_id, raw.offset)
        if info.offset + info.n_bytes > header.size:
            raise InputError(f"{header.path}: tensor {raw.name!r} runs past the end of the file; is the download "
                             f"complete?")
    return GGUF(header.path, header.metadata, tensors, header.size)


def _tensor_info(path: Path, name: str, ne: list, type_id: int, offset: int) -> TensorInfo:
    try:
        qtype = quants.GGMLQuantizationType(type_id)
    except ValueError:
        raise InputError(f"{path}: tensor {name!r} has the unknown GGML type id {type_id}") from None
    quants.check_type(f"{path}: tensor {name!r}", qtype)
    block, size = quants.GGML_QUANT_SIZES[qtype]
    if not ne or not 1 <= len(ne) <= 4 or min(ne) < 1:
        raise InputError(f"{path}: tensor {name!r} has the sizes {ne[:8]}; expected 1 to 4 positive sizes")
    n = math.prod(ne)   # a Python int: no overflow
    if ne[0] % block:
        raise InputError(f"{path}: tensor {name!r} of type {qtype.name}: its rows of {ne[0]} weights are "
                         f"not whole blocks of {block}")
    return TensorInfo(name, qtype.name, tuple(reversed(ne)), offset, n // block * size)


# ----------------------------------------------------------------------------- configuration

TEXT_ARCHS = ("llama", "mistral3")


def text_args(meta: dict, source: str) -> ModelArgs:
    """ModelArgs from a text file's `{arch}.*` keys, checked as params.json's are (config.build_args)."""
    arch = meta.get("general.architecture")
    if arch not in TEXT_ARCHS:
        raise InputError(f"{source}: general.architecture is {arch!r}; expected one of {TEXT_ARCHS} (a Mistral "
                         f"Small 3.x text file; an mmproj goes in mmproj=)")
    for name in ("rope.scaling.type", "expert_count", "attention.sliding_window"):
        if meta.get(f"{arch}.{name}") not in (None, 0, "none"):
            raise InputError(f"{source}: {arch}.{name} = {meta[f'{arch}.{name}']!r:.60} is not supported by this "
                             f"implementation")
    keys = {"dim": "embedding_length", "n_layers": "block_count", "hidden_dim": "feed_forward_length",
            "n_heads": "attention.head_count", "head_dim": "attention.key_length",
            "n_kv_heads": "attention.head_count_kv", "norm_eps": "attention.layer_norm_rms_epsilon",
            "vocab_size": "vocab_size", "rope_theta": "rope.freq_base", "max_position_embeddings": "context_length"}
    values = {ours: meta[f"{arch}.{theirs}"] for ours, theirs in keys.items() if f"{arch}.{theirs}" in meta}
    dim, n_heads = values.get("dim"), values.get("n_heads")
    if "head_dim" not in values and isinstance(dim, int) and isinstance(n_heads, int) and n_heads > 0:
        # llama.cpp's fallback when key_length is absent; wrong for Small 3.x (160, not 128), which the
        # shape check of attn_q then reports.
        values["head_dim"] = dim // n_heads
    values.setdefault("n_kv_heads", n_heads)
    values.setdefault("rope_theta", 10000.0)
    values.setdefault("vocab_size", len(meta.get("tokenizer.ggml.tokens") or []) or None)
    return build_args(ModelArgs, {k: v for k, v in values.items() if v is not None}, source,
                      keys={ours: f"{arch}.{theirs}" for ours, theirs in keys.items()})


def vision_args(meta: dict, source: str, image_token_id: int) -> VisionArgs:
    """VisionArgs from an mmproj's `clip.*` keys, checked as params.json's are (config.build_args)."""
    if meta.get("general.architecture") != "clip" or meta.get("clip.projector_type") != "pixtral":
        raise InputError(f"{source}: not a Pixtral mmproj (general.architecture "
                         f"{meta.get('general.architecture')!r:.40}, clip.projector_type "
                         f"{meta.get('clip.projector_type')!r:.40}; expected 'clip' and 'pixtral')")
    if not meta.get("clip.use_silu"):
        # llama.cpp's note on Mistral Small's tower says GELU; the official tower is SiLU, which runs here.
        flag = "clip.use_gelu" if meta.get("clip.use_gelu") else "no activation flag"
        warnings.warn(f"{source}: the file says {flag}; the official tower's feed-forward is SiLU and runs as such")
    eps = meta.get("clip.vision.attention.layer_norm_epsilon", NORM_EPS)
    if not isinstance(eps, float) or abs(eps - NORM_EPS) > 1e-9:
        raise InputError(f"{source}: clip.vision.attention.layer_norm_epsilon is {eps!r:.40}; this tower has {NORM_EPS}")
    keys = {"hidden_size": "embedding_length", "image_size": "image_size", "patch_size": "patch_size",
            "intermediate_size": "feed_forward_length", "num_hidden_layers": "block_count",
            "num_attention_heads": "attention.head_count", "spatial_merge_size": "spatial_merge_size"}
    values = {ours: meta[f"clip.vision.{theirs}"] for ours, theirs in keys.items() if f"clip.vision.{theirs}" in meta}
    values.update(num_channels=3, max_image_size=values.get("image_size"), image_token_id=image_token_id,
                  # The HF route writes no theta; llama.cpp hard-codes 10000 for this projector.
                  rope_theta=meta.get("clip.rope.freq_base", 10000.0), adapter_bias=False,
                  add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge")
    return build_args(VisionArgs, {k: v for k, v in values.items() if v is not None}, source,
                      keys={ours: f"clip.vision.{theirs}" for ours, theirs in keys.items()})


def gguf_config(text: GGUF, mmproj: GGUF | None) -> tuple[ModelArgs, VisionArgs | None]:
    """The model a GGUF text file (and an mmproj, if any) describes."""
    args = text_args(text.metadata, str(text.path))
    if mmproj is None:
        return args, None
    vision = vision_args(mmproj.metadata, str(mmproj.path), _image_token_id(text.metadata))
    vision.adapter_bias = "mm.1.bias" in mmproj.tensors
    dim = mmproj.metadata.get("clip.vision.projection_dim", args.dim)
    if dim != args.dim:
        raise InputError(f"{mmproj.path}: clip.vision.projection_dim is {dim}, the text model's width {args.dim}")
    return args, vision


def _image_token_id(meta: dict) -> int:
    tokens = meta.get("tokenizer.ggml.tokens", [])
    return tokens.index("[IMG]") if "[IMG]" in tokens else 10   # 10 in every Tekken of this family


# ----------------------------------------------------------------------------- tensor names

GGUF_TEXT_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
                   "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                   "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                   "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
GGUF_VISION_NAMES = {"v.patch_embd": "vision_encoder.patch_conv", "v.pre_ln": "vision_encoder.ln_pre",
                     "ln1": "attention_norm", "ln2": "ffn_norm", "attn_q": "attention.wq",
                     "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_out": "attention.wo",
                     "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
                     "mm.input_norm": "pre_mm_projector_norm", "mm.patch_merger": "patch_merger.merging_layer",
                     "mm.1": "vision_language_adapter.w_in", "mm.2": "vision_language_adapter.w_out"}
# In the mmproj but not a weight of ours: [IMG_BREAK]'s embedding, which we take from the text model.
SKIPPED = {"v.token_embd.img_break"}


def native_name(name: str) -> str | None:
    """blk.3.attn_q.weight -> layers.3.attention.wq.weight; v.blk.3.ln1.weight ->
    vision_encoder.transformer.layers.3.attention_norm.weight; None for a name we do not know."""
    stem, dot, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    block = re.fullmatch(r"(v\.)?blk\.(\d+)\.(.+)", stem)
    if block is not None:
        vision, i, part = block.groups()
        table = GGUF_VISION_NAMES if vision else GGUF_TEXT_NAMES
        prefix = f"vision_encoder.transformer.layers.{i}." if vision else f"layers.{i}."
        return prefix + table[part] + dot + suffix if part in table else None
    table = GGUF_VISION_NAMES if stem.startswith(("v.", "mm.")) else GGUF_TEXT_NAMES
    return table[stem] + dot + suffix if stem in table else None


# ----------------------------------------------------------------------------- weights

# The types held as floats, and the torch dtype of each; any other type is quantized blocks.
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def tensor_bytes(file, info: TensorInfo) -> torch.Tensor:
    """A tensor's raw bytes [rows, row bytes], memory-mapped from `file` (the GGUF, open for reading): nothing
    is read until used. One map per tensor, unmapped when the last view of it goes: a matrix repacked at
    load (quants' fast path) leaves no file pages resident behind it (a page two tensors share can be
    resident twice: 4 KiB a tensor at most). Copy-on-write, as torch wants a writable buffer; nothing
    writes to it."""
    start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY   # a map starts at such a multiple
    data = mmap.mmap(file.fileno(), info.offset + info.n_bytes - start, access=mmap.ACCESS_COPY, offset=start)
    array = np.frombuffer(data, dtype=np.uint8, count=info.n_bytes, offset=info.offset - start)
    return torch.from_numpy(array.reshape(math.prod(info.shape[:-1]), -1))


def dequantized(blocks: torch.Tensor, type_name: str, shape: tuple) -> torch.Tensor:
    """A tensor's float32 values [shape] from its bytes (tensor_bytes)."""
    return quants.dequantize(blocks, type_name, (blocks.shape[0], math.prod(shape) // blocks.shape[0])).view(shape)


def quant_module(embedding: bool, blocks: torch.Tensor, type_name: str, shape: tuple, dtype,
                 quant_math: str = "fast") -> nn.Module:
    """The quants module of a matrix's blocks, on their device, in place of an nn.Embedding (embedding: the
    blocks held where they are) or of an nn.Linear without bias (quants.linear: quant_math "exact" holds
    them, "fast" may repack them). dtype: of the dequantized weights, the model's activations."""
    made = (quants.QuantEmbedding(blocks, type_name, shape, dtype=dtype) if embedding
            else quants.linear(blocks, type_name, shape, dtype, quant_math))
    # .to: an IQ type's codebooks are made on the CPU; the blocks, already there, are not copied
    return made.to(blocks.device)


def tied_head(embedding: nn.Module, quant_math: str = "fast") -> nn.Module:
    """The output head sharing the embedding table's weights, no copy (a copy repacked for the fast path):
    llama.cpp's rule for a file without output.weight."""
    if isinstance(embedding, quants.QuantEmbedding):
        return quant_module(False, embedding.blocks, embedding.qtype, embedding.shape, embedding.dtype, quant_math)
    head = nn.Linear(embedding.weight.shape[1], embedding.weight.shape[0], bias=False)
    head.weight = embedding.weight
    return head


# ----------------------------------------------------------------------------- the tokenizer

# A GGUF names the Tekken pre-tokenizer only (tokenizer.ggml.pre "tekken"): tokenizer.TEKKEN_PATTERN.
CONTROL = 3   # tokenizer.ggml.token_type of a control token


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet, reversed: the printable character that stands for each byte.
    Printable Latin-1 bytes stand for themselves; the others are 256 + n in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def gguf_tokenizer(text: GGUF, mmproj: GGUF | None = None) -> Tekken:
    """The Tekken tokenizer in a GGUF's tokenizer.ggml.* keys, rebuilt as a tekken.json document: ids equal
    the official file's (ids 0..n_special - 1 the control tokens, then the BPE ranks in id order). Its image
    settings, which tekken.json holds, come from the mmproj, if any."""
    path, meta = text.path, text.metadata
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "tekken":
        raise InputError(f"{path}: tokenizer.ggml.model {model!r} / pre {pre!r} is not a Tekken tokenizer "
                         f"(expected 'gpt2' / 'tekken'); pass tokenizer=tekken.json")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type", [])
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) and isinstance(types, list)):
        raise InputError(f"{path}: tokenizer.ggml.tokens must be a list of strings and tokenizer.ggml.token_type "
                         f"a list; pass tokenizer=tekken.json")
    n_special = next((i for i, t in enumerate(types) if t != CONTROL), 0)
    specials = tokens[:n_special]
    alphabet = byte_alphabet()
    try:
        vocab = [{"rank": rank, "token_bytes": base64.b64encode(bytes(alphabet[c] for c in token)).decode()}
                 for rank, token in enumerate(tokens[n_special:])]
    except KeyError as e:
        raise InputError(f"{path}: tokenizer.ggml.tokens holds {e} outside GPT-2's byte alphabet") from None
    # [ARGS] and [CALL_ID] came with v11; v13 cannot be told from v11 by its tokens (pass --tokenizer).
    version = "v11" if {"[ARGS]", "[CALL_ID]"} <= set(specials) else "v7"
    data = {"config": {"version": version, "pattern": TEKKEN_PATTERN, "default_vocab_size": len(tokens),
                       "default_num_special_tokens": n_special},
            "special_tokens": [{"rank": i, "token_str": s} for i, s in enumerate(specials)], "vocab": vocab}
    if mmproj is not None:
        clip = mmproj.metadata
        data["image"] = {"image_patch_size": clip.get("clip.vision.patch_size"),
                         "max_image_size": clip.get("clip.vision.image_size"),
                         "spatial_merge_size": clip.get("clip.vision.spatial_merge_size", 1)}
    return Tekken(path, data)
