"""GGUF files (llama.cpp's format): the community's quantized Mistral Small 3.x, read into the reference.

    read_gguf(path) -> GGUF                      the header: metadata and tensor infos (no tensor is read)
    read_gguf_config(path, mmproj) -> ModelArgs, VisionArgs | None, files
    load_gguf_weights(model, files, ...)         fills a model built on the meta device (load.load_model)
    gguf_tokenizer(path) -> tokenizer.Tekken     the file's own tokenizer (tokenizer.ggml.*)
    resolve_gguf("REPO:QUANT") -> the files      downloads only that quant and the mmproj

A text file (general.architecture "llama" for the 2025 community files, "mistral3" for current
conversions) holds the text model; an mmproj file ("clip", projector "pixtral") the vision tower, the
patch merger and the adapter. Hyper-parameters come from the `{arch}.*` keys. Tensor names map one to one
onto the native ones (GGUF_TEXT_NAMES, GGUF_VISION_NAMES) and wq / wk need no permutation: llama.cpp's
converter undoes the Hugging Face rotate-half order, so GGUF keeps the native interleaved pairs.

Quantized matrices stay in their blocks, on the device, as quants.QuantLinear / QuantEmbedding, and are
dequantized in each forward; F32 / F16 / BF16 tensors (the norms, an F16 mmproj) become ordinary
parameters in the model's dtype. On the CPU the blocks are the file's pages, memory-mapped: never copied.

The header is parsed by gguf_header.py (not by gguf's GGUFReader, 11 s to open a full vocabulary); the
gguf package is still needed, through quants.py, for the block sizes and the IQ codebooks.
"""
import base64
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import torch
from torch import nn

import quants
from config import build_args
from gguf_header import read_header
from inputs import InputError, MissingFileError
from model import ModelArgs
from tokenizer import Tekken
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


def read_gguf(path) -> GGUF:
    """The metadata and tensor infos of one GGUF file (nothing of the tensor data is read)."""
    header = read_header(path)
    if header.byte_order != "<":
        raise InputError(f"{header.path}: a big-endian GGUF file; its weights are not supported here")
    quants.require_gguf()   # the type ids and block sizes are gguf's
    tensors = {}
    for raw in header.tensors:
        tensors[raw.name] = info = _tensor_info(header.path, raw.name, raw.ne, raw.type_id, raw.offset)
        if info.offset + info.n_bytes > header.size:
            raise InputError(f"{header.path}: tensor {raw.name!r} runs past the end of the file; is the download "
                             f"complete?")
    return GGUF(header.path, header.metadata, tensors)


def _tensor_info(path: Path, name: str, ne: list, type_id: int, offset: int) -> TensorInfo:
    try:
        qtype = quants.GGMLQuantizationType(type_id)
    except ValueError:
        raise InputError(f"{path}: tensor {name!r} has the unknown GGML type id {type_id}") from None
    block, size = quants.GGML_QUANT_SIZES[qtype]
    if not ne or not 1 <= len(ne) <= 4 or min(ne) < 1:
        raise InputError(f"{path}: tensor {name!r} has the sizes {ne[:8]}; expected 1 to 4 positive sizes")
    n = math.prod(ne)   # a Python int: no overflow
    if ne[0] % block:
        raise InputError(f"{path}: tensor {name!r} of type {qtype.name}: its rows of {ne[0]} weights are "
                         f"not whole blocks of {block}")
    return TensorInfo(name, qtype.name, tuple(reversed(ne)), offset, n // block * size)


def gguf_parts(path: Path) -> list[Path]:
    """A file, or all parts of a split set given any one of them (NAME-00001-of-00003.gguf)."""
    match = re.fullmatch(r"(.+)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if match is None:
        return [path]
    count = int(match.group(3))
    if not 1 <= int(match.group(2)) <= count:
        raise InputError(f"{path}: part {int(match.group(2))} of {count}: not a part of a split set")
    parts = [path.with_name(f"{match.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise MissingFileError(f"{path}: the split set lacks {missing}")
    return parts


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


def find_mmproj(text: Path) -> Path | None:
    """The mmproj*.gguf beside a text file, if there is exactly one."""
    found = sorted(text.parent.glob("mmproj*.gguf"))
    if len(found) > 1:
        raise InputError(f"{text.parent}: several mmproj files {[p.name for p in found]}; pass one as mmproj=")
    return found[0] if found else None


def read_gguf_config(path, mmproj=None) -> tuple[ModelArgs, VisionArgs | None, list[Path]]:
    """The model a GGUF text file (and an mmproj, given or found beside it) describes, and its files: the
    text file's parts, then the mmproj. mmproj False: none."""
    path = Path(path)
    parts = gguf_parts(path)
    text = read_gguf(parts[0])
    args = text_args(text.metadata, str(parts[0]))
    if mmproj is None:
        mmproj = find_mmproj(parts[0])
    vision = None
    if mmproj:
        projector = read_gguf(mmproj)
        vision = vision_args(projector.metadata, str(mmproj), _image_token_id(text.metadata))
        vision.adapter_bias = "mm.1.bias" in projector.tensors
        dim = projector.metadata.get("clip.vision.projection_dim", args.dim)
        if dim != args.dim:
            raise InputError(f"{mmproj}: clip.vision.projection_dim is {dim}, the text model's width {args.dim}")
        parts = parts + [Path(mmproj)]
    return args, vision, parts


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

FLOAT_TYPES = ("F32", "F16", "BF16")


def _mapped(path: Path) -> np.ndarray:
    """The whole file, memory-mapped: nothing is read until used. One map per file, so that a page two
    tensors share is resident once. Copy-on-write (mode "c"), as torch wants a writable buffer; nothing
    writes to it."""
    return np.memmap(path, dtype=np.uint8, mode="c")


def _tensor_bytes(data: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """A tensor's raw bytes [out, row bytes], a view of the mapped file."""
    rows = int(np.prod(info.shape[:-1]))
    return torch.from_numpy(data[info.offset:info.offset + info.n_bytes].reshape(rows, -1))


def _quantized_module(module: nn.Module, blocks: torch.Tensor, info: TensorInfo, source: str, dtype):
    """The quants module in place of nn.Linear / nn.Embedding `module`, holding `blocks` where they are."""
    quants.check_type(f"{source}: tensor {info.name!r}", info.type_name)
    kind = quants.QuantEmbedding if isinstance(module, nn.Embedding) else quants.QuantLinear
    # .to: an IQ type's codebooks are made on the CPU; the blocks, already there, are not copied
    return kind(blocks, info.type_name, info.shape, dtype=dtype).to(blocks.device)


def load_gguf_weights(model: nn.Module, files: list[Path], device, dtype, place, progress) -> None:
    """Fill `model`, built on the meta device, with the tensors of GGUF `files` (text parts, then mmproj).
    dtype: of the activations and of the float parameters. place(name, float32 tensor) puts a float
    tensor where the model holds it (load._place); progress.update() is called per tensor."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    found = set()
    for path in files:
        data = _mapped(path)
        for info in read_gguf(path).tensors.values():
            progress.update()
            name = native_name(info.name)
            if info.name in SKIPPED:
                continue
            if name not in expected:
                raise InputError(f"{path}: unexpected tensor {info.name!r}: the model that the file's metadata "
                                 f"describes has no such weight")
            if info.shape != expected[name]:
                raise InputError(f"{path}: tensor {info.name!r} has shape {info.shape}, expected {expected[name]}")
            _assign(model, name, _tensor_bytes(data, info), info, str(path), device, dtype, place)
            found.add(name)
    if "output.weight" not in found and "tok_embeddings.weight" in found:
        model.output = _tied_head(model.tok_embeddings)   # as llama.cpp: no output.weight, the head is tied
        found.add("output.weight")
    missing = sorted(set(expected) - found)
    if missing:
        raise InputError(f"{files[0]}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _assign(model: nn.Module, name: str, blocks: torch.Tensor, info: TensorInfo, source: str, device, dtype,
            place):
    """Put one tensor in place: a quantized matrix replaces its nn.Linear / nn.Embedding by a quants module
    holding the blocks; anything else (floats; a quantized conv or biased linear, which are small) becomes
    an ordinary parameter."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    parent, _, child = module_name.rpartition(".")
    matrix = isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "bias", None) is None
    if info.type_name not in FLOAT_TYPES and matrix:
        quantized = _quantized_module(module, blocks.to(device), info, source, dtype)
        setattr(model.get_submodule(parent), child, quantized)
        return
    quants.check_type(f"{source}: tensor {info.name!r}", info.type_name)
    w = quants.dequantize(blocks, info.type_name, (blocks.shape[0], int(np.prod(info.shape)) // blocks.shape[0]))
    setattr(module, attr, nn.Parameter(place(name, w.view(info.shape)), requires_grad=False))


def _tied_head(embedding: nn.Module) -> nn.Module:
    """The output head sharing the embedding table's weights (no copy)."""
    if isinstance(embedding, quants.QuantEmbedding):
        head = quants.QuantLinear(embedding.blocks, embedding.qtype, embedding.shape, dtype=embedding.dtype)
        return head.to(embedding.blocks.device)
    head = nn.Linear(embedding.weight.shape[1], embedding.weight.shape[0], bias=False)
    head.weight = embedding.weight
    return head


# ----------------------------------------------------------------------------- the tokenizer

# The Tekken pre-tokenizer (tekken.json's config.pattern). A GGUF names it only (tokenizer.ggml.pre "tekken").
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
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


def gguf_tokenizer(path, mmproj=None) -> Tekken:
    """The Tekken tokenizer in a GGUF's tokenizer.ggml.* keys, rebuilt as a tekken.json document: ids equal
    the official file's (ids 0..n_special - 1 the control tokens, then the BPE ranks in id order). Its image
    settings, which tekken.json holds, come from the mmproj (given, or found beside; False: none)."""
    path = Path(path)
    meta = read_gguf(gguf_parts(path)[0]).metadata
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
    mmproj = find_mmproj(path) if mmproj is None else mmproj
    if mmproj:
        clip = read_gguf(mmproj).metadata
        data["image"] = {"image_patch_size": clip.get("clip.vision.patch_size"),
                         "max_image_size": clip.get("clip.vision.image_size"),
                         "spatial_merge_size": clip.get("clip.vision.spatial_merge_size", 1)}
    return Tekken(path, data)


# ----------------------------------------------------------------------------- files from the hub

HUB_QUANT = re.compile(r"([\w.-]+/[\w.-]+):([\w.-]+)")   # llama.cpp's -hf syntax, REPO:QUANT
MMPROJ_TYPES = ("F16", "BF16", "F32")


def quant_files(files: list[str], quant: str) -> list[str]:
    """The repository's files of one quant: NAME-QUANT.gguf, or its parts NAME-QUANT-0000k-of-0000n.gguf
    (possibly in a folder), the quant matched case-insensitively as llama.cpp does."""
    pattern = re.compile(rf"(.*[-_./])?{re.escape(quant)}(-\d{{5}}-of-\d{{5}})?\.gguf", re.IGNORECASE)
    found = [f for f in files if pattern.fullmatch(f) and not Path(f).name.lower().startswith("mmproj")]
    sets = {re.sub(r"-\d{5}-of-\d{5}\.gguf$", ".gguf", f) for f in found}
    if len(sets) > 1:   # e.g. Q4_K_XL matching both NAME-Q4_K_XL and NAME-UD-Q4_K_XL
        raise InputError(f"quant {quant!r} matches several files {sorted(sets)}; give the whole tag")
    return sorted(found)


def download_gguf(model: str, mmproj: str | None = "F16") -> tuple[Path, Path | None]:
    """REPO:QUANT -> the local path of the quant's (first) file and of the mmproj of type `mmproj` (None:
    none asked for, or the repository has none), downloaded once through huggingface_hub: only those files."""
    repo, quant = HUB_QUANT.fullmatch(model).groups()
    files = _from_hub(model, huggingface_hub.list_repo_files, repo)
    text = quant_files(files, quant)
    if not text:
        quants_found = sorted({m.group(1) for f in files
                               if (m := re.search(r"-((?:UD-)?[A-Z0-9_]+?)(-\d{5}-of-\d{5})?\.gguf$", f))})
        raise InputError(f"model={model}: {repo} has no {quant} file (it has {', '.join(quants_found)})")
    projectors = [f for f in files if mmproj and re.fullmatch(rf"(.*/)?mmproj.*{mmproj}\.gguf", f, re.IGNORECASE)]
    folder = Path(_from_hub(model, huggingface_hub.snapshot_download, repo, allow_patterns=text + projectors[:1]))
    return folder / text[0], (folder / projectors[0]) if projectors else None


def _from_hub(model: str, call, *args, **kwargs):
    """A huggingface_hub call; its failure is the one line a user can act on."""
    try:
        return call(*args, **kwargs)
    except Exception as e:   # no network, gated repository, missing login, typo in the id
        raise MissingFileError(f"model={model}: could not get the files from the Hugging Face hub "
                               f"({type(e).__name__}: {e})") from None


def resolve_gguf(model: str, mmproj: str | None = None) -> tuple[Path, Path | bool | None]:
    """--model FILE.gguf or REPO:QUANT, and --mmproj (a file, a type for the hub: F16 (default), BF16,
    F32, or "none") -> the text file and the mmproj for load_model (None: the one beside, False: none)."""
    if mmproj == "none":
        choice = False
    elif mmproj is None or mmproj.upper() in MMPROJ_TYPES:
        choice = None
    else:
        choice = Path(mmproj)
        if not choice.is_file():
            raise MissingFileError(f"mmproj={mmproj}: no such file (or give a type: {', '.join(MMPROJ_TYPES)})")
    if HUB_QUANT.fullmatch(model) and not Path(model).exists():
        text, found = download_gguf(model, (mmproj or "F16").upper() if choice is None else None)
        return text, (found or False) if choice is None else choice
    path = Path(model).expanduser()
    if not path.is_file():
        raise MissingFileError(f"model={model}: no such GGUF file")
    return path, choice
