"""Loading the model: the tensors of a checkpoint (checkpoint.py) into model.Transformer, checked one by one.

    load_model(checkpoint or path, device, dtype) -> model.Transformer (a vision.VisionLanguageModel with images)

One loop (load_tensors) reads the three layouts of the weights:
- native: consolidated*.safetensors, under the names the model uses (tok_embeddings, layers.N.attention.wq, ...);
- Hugging Face: model-*.safetensors, renamed here, with wq / wk rows permuted for rotate-half RoPE, which
  the loader undoes;
- GGUF: llama.cpp's names (gguf_file.native_name); a matrix of a quantized type stays in its blocks, in a
  quants module that the loop puts in place of its nn.Linear / nn.Embedding;
- a quantized Hugging Face folder (MLX, bitsandbytes, compressed-tensors: checkpoint.quant): each quantized
  layer's tensors come gathered as one quant_formats.Packed (wherever its files put them), which stays as
  stored in a PackedLinear / PackedEmbedding put in place of the layer.
The model is built on the meta device (no memory); each tensor is then memory-mapped, checked (a weight
of the model, stored once, of the shape the configuration implies, finite when it becomes floats),
converted and placed one at a time, and assigned. Under tensor parallel (parallel.py) the meta model is
split first, and each rank copies out of the map only its own slice of each split weight.
Also here: the --device and --dtype values of the command lines (pick_device, DTYPES).
"""
import ctypes
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from checkpoint import HF_INDEX, Checkpoint, read_checkpoint
from gguf_file import FLOAT_TYPES, SKIPPED, dequantized, native_name, quant_module, tensor_bytes, tied_head
from inputs import InputError, MissingFileError
from model import ModelArgs, Transformer
from parallel import as_shard, parallelize, shard_region
from quant_formats import Packed, PackedEmbedding, PackedLinear, gather
from quants import QUANT_MATH
from vision import VisionArgs, VisionLanguageModel


# ----------------------------------------------------------------------------- Hugging Face names

# Hugging Face names -> native names. The prefix is stripped first: the official files of
# Mistral3ForConditionalGeneration use language_model.model.*, language_model.lm_head, vision_tower.*
# and multi_modal_projector.*; newer transformers saves model.language_model.*, model.vision_tower.*,
# model.multi_modal_projector.* and lm_head; MistralForCausalLM model.* and lm_head.
HF_PREFIX = re.compile(r"^(model\.language_model\.|language_model\.model\.|language_model\.|model\.)")
HF_RENAMES = [
    (r"^embed_tokens\.", "tok_embeddings."),
    (r"^lm_head\.", "output."),
    (r"^vision_tower\.", "vision_encoder."),
    (r"^multi_modal_projector\.norm\.", "pre_mm_projector_norm."),
    (r"^multi_modal_projector\.patch_merger\.", "patch_merger."),
    (r"^multi_modal_projector\.linear_1\.", "vision_language_adapter.w_in."),
    (r"^multi_modal_projector\.linear_2\.", "vision_language_adapter.w_out."),
    (r"\.(self_attn|attention)\.q_proj\.", ".attention.wq."),
    (r"\.(self_attn|attention)\.k_proj\.", ".attention.wk."),
    (r"\.(self_attn|attention)\.v_proj\.", ".attention.wv."),
    (r"\.(self_attn|attention)\.o_proj\.", ".attention.wo."),
    (r"\.(mlp|feed_forward)\.gate_proj\.", ".feed_forward.w1."),
    (r"\.(mlp|feed_forward)\.down_proj\.", ".feed_forward.w2."),
    (r"\.(mlp|feed_forward)\.up_proj\.", ".feed_forward.w3."),
    (r"\.input_layernorm\.", ".attention_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
]


def hf_to_native_name(name: str) -> str:
    name = HF_PREFIX.sub("", name)
    for pattern, repl in HF_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the Hugging Face rotate-half row order of wq / wk: per head, HF row j is native row 2j
    and HF row Dh/2 + j is native row 2j + 1. w [n_heads * Dh, D_in]; for wk n_heads is n_kv_heads."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- the tensors

def build_model(args: ModelArgs, vision: VisionArgs | None = None) -> Transformer:
    """The model the arguments describe, with a vision tower when `vision` is given."""
    return Transformer(args) if vision is None else VisionLanguageModel(args, vision)


def _rotary_heads(name: str, rows: int, checkpoint: Checkpoint) -> int:
    """The head count of `rows` rows of wq / wk `name` (all of them, or a rank's whole heads): the
    Hugging Face permutation is per head of head_dim rows."""
    head_dim = checkpoint.vision.head_dim if name.startswith("vision_encoder.") else checkpoint.args.head_dim
    return rows // head_dim


@dataclass
class Stored:
    """One tensor as a file stores it, memory-mapped, nothing of it read yet."""
    path: Path
    key: str                   # the file's name for it
    name: str | None           # the model's name for it (None: none)
    shape: tuple               # as the model holds it
    dtype: torch.dtype | None  # of the stored values; None: GGUF blocks of a quantized type, or a Packed
    data: torch.Tensor | Packed  # the values; for GGUF the bytes [rows, row bytes]; a quantized layer's Packed
    qtype: str | None = None   # GGUF: the type ("F32", "Q4_K", ...)


def stored_tensors(checkpoint: Checkpoint) -> Iterator[Stored]:
    """Every tensor of the checkpoint's files, in file order, under the model's names."""
    if checkpoint.layout == "gguf":
        for gguf in checkpoint.headers:   # parsed by read_checkpoint: only the tensors' pages are read here
            with open(gguf.path, "rb") as file:   # each tensor mapped on its own (tensor_bytes)
                for info in gguf.tensors.values():
                    if info.name not in SKIPPED:
                        yield Stored(gguf.path, info.name, native_name(info.name), info.shape,
                                     FLOAT_TYPES.get(info.type_name), tensor_bytes(file, info), info.type_name)
        return
    where, maps = _tensor_files(checkpoint), {}

    def held(key: str) -> torch.Tensor:
        """A quantized layer's tensor, kept as stored: through one map of its file for all of them (a map per
        tensor would count the pages of the file's header once per tensor in the process's resident set)."""
        try:
            maps[where[key]] = maps.get(where[key]) or safe_open(where[key], framework="pt", device="cpu")
            return maps[where[key]].get_tensor(key)
        except SafetensorError as e:
            raise _unreadable(where[key], e) from None

    # A quantized layer NAME comes as NAME.weight, from the file of the tensor that marks it (`stored`).
    for key, stored, t in gather(checkpoint.quant, list(where), lambda k: _mapped_tensor(where[k], k), held):
        name = key if checkpoint.layout == "native" else hf_to_native_name(key)
        yield Stored(where[stored], key, name, tuple(t.shape), None if isinstance(t, Packed) else t.dtype, t)


def _tensor_files(checkpoint: Checkpoint) -> dict[str, Path]:
    """The file of every tensor of a folder (key -> path; no tensor is read): each stored in one file, the one
    the Hugging Face index says, and every tensor the index lists stored."""
    where: dict[str, Path] = {}
    for path in checkpoint.files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except SafetensorError as e:
            raise _unreadable(path, e) from None
        for key in keys:
            if key in where:
                raise InputError(f"tensor {key!r} of {path} is also in {where[key]}: a weight must be stored once")
            if checkpoint.index is not None and checkpoint.index.get(key) != path.name:
                raise InputError(f"{path}: holds tensor {key!r}, which the index puts in {checkpoint.index.get(key)!r}")
            where[key] = path
    if checkpoint.index is not None:
        absent = sorted(set(checkpoint.index) - set(where))
        if absent:
            raise InputError(f"{checkpoint.path}: {HF_INDEX} lists tensor(s) {absent[:5]} that no file holds")
    return where


def load_tensors(model: nn.Module, checkpoint: Checkpoint, dtype, device, check_finite: bool = True,
                 quant_math: str = "fast") -> None:
    """Fill `model`, built on the meta device (and split by parallel.py), with every tensor of the checkpoint.
    Each must be a weight of the model, stored once (in the file the Hugging Face index says), of the shape
    the model has, and of a floating-point type; every weight must be found. A GGUF file without
    output.weight ties the head to the embedding, as llama.cpp does. quant_math: how a GGUF's quantized
    matrices multiply (gguf_file.quant_module)."""
    expected = model.state_dict()   # name -> the meta tensor: its shape and, split, the slice this rank holds
    seen: dict[str, Stored] = {}
    with loading_bar(len(expected), checkpoint.name) as progress, _weights_out_of_the_heap():
        for stored in stored_tensors(checkpoint):
            _check_stored(stored, expected, seen, checkpoint)
            seen[stored.name] = replace(stored, data=None)   # not its data: a repacked matrix's pages then go
            _assign(model, stored, expected[stored.name], checkpoint, dtype, device, check_finite, quant_math)
            progress.update()
    if checkpoint.layout == "gguf" and "output.weight" not in seen and "tok_embeddings.weight" in seen:
        model.output = tied_head(model.tok_embeddings, quant_math)
        seen["output.weight"] = seen["tok_embeddings.weight"]
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise InputError(f"{checkpoint.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _check_stored(stored: Stored, expected: dict, seen: dict, checkpoint: Checkpoint) -> None:
    if stored.name not in expected:
        raise InputError(f"{stored.path}: unexpected tensor {stored.key!r}: the model that {checkpoint.config.name} "
                         f"describes has no such weight")
    if stored.name in seen:
        first = seen[stored.name]
        raise InputError(f"tensor {stored.key!r} of {stored.path} is also in {first.path} (as {first.key!r}): "
                         f"a weight must be stored once")
    if stored.shape != tuple(expected[stored.name].shape):
        raise InputError(f"{stored.path}: tensor {stored.key!r} has shape {stored.shape}, "
                         f"expected {tuple(expected[stored.name].shape)}")
    if stored.dtype is not None and not stored.dtype.is_floating_point:
        raise InputError(f"{stored.path}: tensor {stored.key!r} has dtype {stored.dtype}, expected a floating-point "
                         f"type (bfloat16, float16 or float32)")


def _assign(model: nn.Module, stored: Stored, like: torch.Tensor, checkpoint: Checkpoint, dtype, device,
            check_finite: bool, quant_math: str = "fast") -> None:
    """Put one tensor in the model. A GGUF matrix of a quantized type (an nn.Linear without bias or an
    nn.Embedding) stays in its blocks: a quants module holding them takes the layer's place; a quantized
    folder's layer (a Packed) likewise, in a PackedLinear / PackedEmbedding. Anything else (floats; a
    quantized conv or biased linear, which are small) becomes a parameter in dtype, checked finite, or the
    slice of it that this rank holds."""
    module_name, _, attr = stored.name.rpartition(".")
    module = model.get_submodule(module_name)
    matrix = isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "bias", None) is None
    if isinstance(stored.data, Packed) and check_finite:
        for part, b in stored.data.named_buffers():
            if b.is_floating_point():   # the scales (an FP8 weight too): the layer's, in one of the folder's files
                _check_finite(b, replace(stored, path=checkpoint.path, key=f"{stored.key} ({part})", dtype=b.dtype))
    if stored.dtype is None and matrix:
        parent, _, child = module_name.rpartition(".")
        layer = _packed_layer(stored, module, checkpoint, dtype).to(device) if isinstance(stored.data, Packed) else \
            quant_module(isinstance(module, nn.Embedding), stored.data.to(device), stored.qtype, stored.shape, dtype,
                         quant_math)
        setattr(model.get_submodule(parent), child, layer)
        return
    t = (stored.data.unpack() if isinstance(stored.data, Packed) else stored.data if stored.qtype is None
         else dequantized(stored.data, stored.qtype, stored.shape))
    region = shard_region(like)
    if region is not None:
        # Only the slice's pages are read (all of them for a column slice, then unmapped); the copy
        # gives the shard memory of its own, not a view into the whole tensor's map.
        dim, start, length = region
        t = t.narrow(dim, start, length).clone()
    placed = _place(t, stored.name, checkpoint, dtype, device)
    if check_finite:
        _check_finite(placed, stored)
    value = placed if region is None else as_shard(placed, like)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))   # for inference: no autograd graph


def _packed_layer(stored: Stored, module: nn.Module, checkpoint: Checkpoint, dtype) -> nn.Module:
    """The PackedLinear / PackedEmbedding holding a quantized layer's Packed weight as stored. The Hugging Face
    wq / wk keep their rotate-half row order: the layer reorders its outputs to the native rows."""
    order, rows = None, stored.shape[0]
    if checkpoint.layout == "hf" and stored.name.endswith(("attention.wq.weight", "attention.wk.weight")):
        order = unpermute_rotary(torch.arange(rows).view(rows, 1), _rotary_heads(stored.name, rows, checkpoint)).view(rows)
    return (PackedEmbedding if isinstance(module, nn.Embedding) else PackedLinear)(stored.data, dtype, order)


M_MMAP_THRESHOLD = -3   # mallopt's parameter (malloc.h)


@contextmanager
def _weights_out_of_the_heap():
    """While loading, give every block of 128 KiB or more a memory map of its own; after, every block of
    1 MiB or more (glibc's malloc, on Linux). glibc serves a block from its heap when it is under a
    threshold that it raises to the size of each mapped block freed (up to 32 MiB). Loading frees many
    blocks of a few MB (the parts of a repacking, converted copies), after which weights of that size land
    in the heap between freed temporaries, memory it cannot give back: 90 MB of a 24 B Q4_K GGUF's. An
    answer's temporaries of a few MB (a prefill's activations) would likewise stay in the heap, 0.2-0.3 GB
    more; smaller ones are reused there, not mapped and zeroed anew (which slowed a small model's bfloat16
    decoding by 30 % at 128 KiB). The price: loading's temporaries are mapped and zeroed anew (that GGUF
    loads in 65 s instead of 48). A threshold the process was given (glibc's MALLOC_MMAP_THRESHOLD_ or
    GLIBC_TUNABLES) is left as it is: it is fixed, not raised."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    given = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    if mallopt is None or given:   # another system, a C library without it, or a threshold already fixed
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 128 * 2**10)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 2**20)


def loading_bar(total: int, name: str) -> tqdm:
    """A progress bar over the tensors loaded, shown only once loading has taken more than a second."""
    return tqdm(total=total, desc=f"loading {name}", unit=" tensors", delay=1, leave=False)


def _check_finite(t: torch.Tensor, stored: Stored) -> None:
    """Refuse a weight holding NaN or an infinity (in the file, or made by the conversion to a
    narrower dtype). aminmax reads the tensor once without a temporary; NaN propagates to its result."""
    flat = t.t() if t.ndim == 2 and t.t().is_contiguous() else t   # a column-major weight, read in its order
    low, high = torch.aminmax(flat if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else flat.float())
    if math.isfinite(low) and math.isfinite(high):
        return
    bad = (~torch.isfinite(t)).nonzero()[0].tolist()   # the error path only: find the first one
    converted = stored.dtype is not None and t.dtype != stored.dtype
    raise InputError(f"{stored.path}: tensor {stored.key!r} holds a non-finite value ({t[tuple(bad)].item()} at "
                     f"index {bad}){' after conversion to ' + str(t.dtype) if converted else ''}")


def _mapped_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of the file, memory-mapped (nothing is read until used) through a map of its own:
    when the tensor is converted or moved, dropping it unmaps its pages, so that no more than one
    tensor is ever held twice while loading."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    except SafetensorError as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: SafetensorError) -> InputError:
    return InputError(f"{path}: not a readable safetensors file ({e}); is the download complete?")


def _place(t: torch.Tensor, name: str, checkpoint: Checkpoint, dtype, device) -> torch.Tensor:
    """A tensor (or a rank's slice of whole heads) as the model holds it: native row order, on device,
    in dtype. Tensors used as stored (same dtype, on the CPU, row-major) stay mapped: never copied."""
    if checkpoint.layout == "hf" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        # Within each head: the rows of whole heads, un-permuted, are those heads' native rows.
        t = unpermute_rotary(t, _rotary_heads(name, t.shape[0], checkpoint))
    t = t.to(device=device, dtype=dtype or t.dtype)
    if _column_major(name, t.shape, t.dtype, t.device):
        t = t.t().contiguous().t()   # the same [out, in] matrix, its columns contiguous
    return t


def _column_major(name: str, shape: torch.Size, dtype, device: torch.device) -> bool:
    """Whether to hold a weight column-major. Decoding multiplies each [out, in] matrix by one vector;
    on the CPU in float32 that reads a tall matrix (out > in: wq, w1, w3, the output head) 15-20 %
    faster column-major (3x for the head of a narrow model), a wide one faster row-major, and a
    bfloat16 one 20x slower column-major. Prefill's matrix products run as fast either way. The
    embedding table is read a row per token: it stays row-major."""
    return (device.type == "cpu" and dtype == torch.float32 and len(shape) == 2 and shape[0] > shape[1]
            and name != "tok_embeddings.weight")


def load_model(source, device="cpu", dtype: torch.dtype | None = None, mesh: DeviceMesh | None = None,
               mmproj=None, check_finite: bool = True, quant_math: str = "fast") -> Transformer:
    """The model of a checkpoint.Checkpoint, or of a local checkpoint read here without its tokenizer: a
    folder (params.json + consolidated*.safetensors, or the Hugging Face layout config.json +
    model-*.safetensors), or a GGUF file (a split set by any of its parts) with the vision tower of the
    mmproj file `mmproj`, or of the mmproj*.gguf beside it when None (False: text only).
    dtype None keeps the stored dtype (bf16; float32 for a GGUF, for the activations and float tensors).
    mesh: split the text blocks over its ranks (parallel.py; parallel.mesh_from_env makes it).
    check_finite: refuse a float weight holding NaN or an infinity (one read of every such weight; see README).
    quant_math: how a GGUF's quantized matrices multiply, "fast" or "exact" (quants.linear)."""
    if quant_math not in QUANT_MATH:
        raise InputError(f"quant_math {quant_math!r}: expected one of {QUANT_MATH}")
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(_local(source), mmproj, tokenizer=False)
    if checkpoint.layout == "gguf":
        if mesh is not None:
            raise InputError(f"{checkpoint.path}: tensor parallel (parallel.py) is not implemented for GGUF files")
        dtype = dtype or torch.float32
    if checkpoint.quant is not None and mesh is not None:
        raise InputError(f"{checkpoint.path}: tensor parallel (parallel.py) is not implemented for quantized folders")
    # Build on the meta device (no memory) and then assign the tensors read from disk, so that
    # the weights are held once.
    with torch.device("meta"):
        model = build_model(checkpoint.args, checkpoint.vision)
    if mesh is not None:
        parallelize(model, mesh)   # still on meta: the split weights become DTensors of their slices
    load_tensors(model, checkpoint, dtype, device, check_finite, quant_math)
    return model.eval()


def _local(path) -> Path:
    """A path that load_model can read: a folder or a .gguf file (a hub id is Session's, through checkpoint.py)."""
    path = Path(path)
    if path.suffix != ".gguf" and not path.is_dir():
        if os.path.lexists(path):
            raise InputError(f"{path}: not a model folder (a file, or a link to none)")
        raise MissingFileError(f"{path}: no such model folder")
    return path


# ----------------------------------------------------------------------------- the device

def device_problem(name: str) -> str | None:
    """Why device `name` cannot be used here, or None: auto, cpu, cuda, cuda:N and mps are known,
    and cuda / mps must be available on this machine."""
    if name in ("auto", "cpu"):
        return None
    if not re.fullmatch(r"cuda(:\d+)?|mps", name):
        return f"device={name!r}: expected auto, cpu, cuda, cuda:N or mps"
    if name == "mps":
        return None if torch.backends.mps.is_available() else "device='mps': MPS is not available on this machine"
    if not torch.cuda.is_available():
        return f"device={name!r}: CUDA is not available on this machine (torch {torch.__version__})"
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def pick_device(name: str) -> torch.device:
    problem = device_problem(name)
    if problem is not None:
        raise InputError(problem)
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
