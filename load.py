"""Loading the official checkpoints: their files, their tensor names and layouts, and the model.

    load_model(path, device, dtype) -> model.Transformer (vision.VisionLanguageModel with a vision encoder)

Two layouts of the same weights are read:
- native: params.json + consolidated.safetensors (or consolidated-0000k-of-0000n.safetensors), the
  names the model uses (tok_embeddings, layers.N.attention.wq, ...);
- Hugging Face: config.json + model-0000k-of-0000n.safetensors, renamed here, with wq / wk rows
  permuted for rotate-half RoPE, which the loader undoes.
The model is built on the meta device (no memory); each tensor is then memory-mapped, checked
against the shape the configuration implies, converted and placed one at a time, and assigned.
Under tensor parallel (parallel.py) the meta model is split first, and each rank copies out of the
map only its own slice of each split weight.
The configuration files are parsed and checked by config.py, GGUF files read by gguf_file.py.
Finding the files: resolve_model (a local folder, or a hub id downloaded once), tokenizer_file, pick_device.
"""
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from config import json_object, parse_hf_config, parse_params
from gguf_file import load_gguf_weights, read_gguf_config
from inputs import InputError, MissingFileError, read_json, regular_file
from model import ModelArgs, Transformer
from parallel import as_shard, parallelize, shard_region
from quant_formats import Format, Packed, PackedEmbedding, PackedLinear, gather, read_format
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


# ----------------------------------------------------------------------------- weights

@dataclass
class Checkpoint:
    """What a checkpoint folder holds: its layout, its weight files and the model they make."""
    layout: str           # "native", "hf" or "gguf"
    config: Path          # params.json or config.json (for "gguf": the text file, whose metadata it is)
    files: list[Path]     # for "gguf": the text file's parts, then the mmproj
    args: ModelArgs
    vision: VisionArgs | None
    index: dict | None = None   # Hugging Face: tensor name -> file, from model.safetensors.index.json
    quant: Format | None = None # Hugging Face: the quantization config.json names (MLX, bitsandbytes, compressed-tensors)


def read_checkpoint(folder: Path, mmproj=None) -> Checkpoint:
    """The folder's layout, weight files and configuration (no tensor is read). A .gguf file instead
    of a folder is read by gguf_file (layout "gguf"), with its mmproj (given or found beside it)."""
    if str(folder).endswith(".gguf"):
        args, vision, files = read_gguf_config(folder, mmproj)
        return Checkpoint("gguf", files[0], files, args, vision)
    # lexists: a params.json that is a FIFO or a symlink loop is named as such by read_json.
    if os.path.lexists(folder / "params.json"):
        config, layout, quant = folder / "params.json", "native", None
        args, vision = parse_params(read_json(config), str(config))
    elif os.path.lexists(folder / "config.json"):
        config, layout = folder / "config.json", "hf"
        quant, hf_config = read_format(read_json(config), str(config))
        args, vision = parse_hf_config(hf_config, str(config))
    else:
        raise MissingFileError(f"{folder}: no params.json (native layout) or config.json (Hugging Face "
                               f"layout) found; expected an official Mistral checkpoint folder")
    files, index = weight_files(folder, layout)
    return Checkpoint(layout, config, files, args, vision, index, quant)


# The weight files of each layout: one file, or a complete numbered set (k of n for k = 1..n).
LAYOUT_FILES = {"native": ("consolidated", re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors")),
                "hf": ("model", re.compile(r"model-(\d+)-of-(\d+)\.safetensors"))}
HF_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path, layout: str) -> tuple[list[Path], dict | None]:
    """Exactly the weight files of one layout, each a regular file, and the Hugging Face index
    (tensor name -> file name) where there is one. A stale or stray file in the layout's names
    (consolidated-00001-of-00002.safetensors beside consolidated.safetensors, model_old.safetensors)
    is an error: it could silently override or miss weights."""
    stem, numbered = LAYOUT_FILES[layout]
    found = sorted(p.name for p in folder.glob(f"{stem}*.safetensors"))
    index = None
    if layout == "hf" and os.path.lexists(folder / HF_INDEX):
        index = _read_index(folder / HF_INDEX)
        names = sorted(set(index.values()))
    elif f"{stem}.safetensors" in found:
        names = [f"{stem}.safetensors"]
    else:
        numbers = {name: tuple(map(int, m.groups())) for name in found if (m := numbered.fullmatch(name))}
        total = max((n for _, n in numbers.values()), default=0)
        if sorted(numbers.values()) != [(k, total) for k in range(1, total + 1)]:
            raise InputError(f"{folder}: the weight files {sorted(numbers)} are not one complete set: expected "
                             f"{stem}-0000k-of-0000n.safetensors for every k of 1..n")
        names = sorted(numbers)
    if not names:
        if not found:
            expected = "consolidated.safetensors" if layout == "native" else "model-*.safetensors"
            raise MissingFileError(f"{folder}: no weights found, expected {expected}")
        raise InputError(f"{folder}: the weight files {found} are not named as the layout's: expected "
                         f"{stem}.safetensors or {stem}-0000k-of-0000n.safetensors")
    stray = sorted(set(found) - set(names))
    if stray:
        where = f"not listed in {HF_INDEX}" if index is not None else f"beside {names[0]}"
        raise InputError(f"{folder}: weight file(s) {stray} {where}: remove the stale file(s), or the others; "
                         f"weights are read from exactly one layout")
    return [regular_file(folder / name, f"{folder / name}") for name in names], index


def _read_index(path: Path) -> dict[str, str]:
    """weight_map of a model.safetensors.index.json: tensor name -> file name in the same folder."""
    weight_map = json_object(read_json(path), str(path)).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{path}: expected a non-empty 'weight_map' object (tensor name -> file)")
    for key, name in weight_map.items():
        if not (isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name):
            raise InputError(f"{path}: weight_map[{key!r}] = {name!r:.80}: expected a .safetensors file name "
                             f"in the same folder")
    return weight_map


def build_model(args: ModelArgs, vision: VisionArgs | None = None) -> Transformer:
    """The model the arguments describe, with a vision tower when `vision` is given."""
    return Transformer(args) if vision is None else VisionLanguageModel(args, vision)


def _rotary_heads(name: str, rows: int, checkpoint: Checkpoint) -> int:
    """The head count of `rows` rows of wq / wk `name` (all of them, or a rank's whole heads): the
    Hugging Face permutation is per head of head_dim rows."""
    head_dim = checkpoint.vision.head_dim if name.startswith("vision_encoder.") else checkpoint.args.head_dim
    return rows // head_dim


def _read_tensors(checkpoint: Checkpoint, expected: dict, dtype, device, check_finite: bool = True) -> dict:
    """Read every tensor, renamed and un-permuted to the native layout, checked against `expected`
    (name -> the model's tensor on the meta device: its shape and, split by parallel.py, the slice
    that this rank holds), cast to dtype and placed on device one at a time. A tensor held twice (in
    two files, or under two names of the Hugging Face layout), in another file than the index says, of
    an integer dtype or (check_finite) with a NaN or an infinity is an error naming it. A quantized
    layer (checkpoint.quant) comes as one quant_formats.Packed of all its stored tensors, left as stored."""
    state, layout = {}, checkpoint.layout
    seen: dict[str, tuple[Path, str]] = {}   # native name -> where it was read
    where, maps = _tensor_files(checkpoint), {}
    progress = loading_bar(len(expected), checkpoint.files[0].parent.name)

    def held(key: str) -> torch.Tensor:
        """A quantized layer's tensor, held as stored: through one map of its file for all of them (a map per
        tensor would count the pages of the file's header once per tensor in the process's resident set)."""
        path = where[key]
        maps[path] = maps.get(path) or safe_open(path, framework="pt", device="cpu")
        return maps[path].get_tensor(key)

    for key, stored, t in gather(checkpoint.quant, list(where), lambda k: _mapped_tensor(where[k], k), held):
        path = where[stored]
        name = key if layout == "native" else hf_to_native_name(key)
        if name not in expected:
            raise InputError(f"{path}: unexpected tensor {key!r}: the model that the folder's "
                             f"config describes has no such weight")
        if name in seen:
            raise InputError(f"tensor {key!r} of {path} is also in {seen[name][0]} (as {seen[name][1]!r}): "
                             f"a weight must be stored once")
        seen[name] = (path, key)
        like = expected[name]
        if tuple(t.shape) != tuple(like.shape):
            raise InputError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if isinstance(t, Packed):
            for part, b in t.named_buffers():
                if check_finite and b.is_floating_point():
                    _check_finite(b, path, f"{key} ({part})", converted=False)
            state[name] = t   # load_model puts it in place of its layer
            progress.update()
            continue
        if not t.dtype.is_floating_point:
            raise InputError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected a floating-point "
                             f"type (bfloat16, float16 or float32)")
        region = shard_region(like)
        if region is not None:
            # Only the slice's pages are read (all of them for a column slice, then unmapped);
            # the copy gives the shard memory of its own, not a view into the whole tensor's map.
            dim, start, length = region
            t = t.narrow(dim, start, length).clone()
        placed = _place(t, name, checkpoint, dtype, device)
        if check_finite:
            _check_finite(placed, path, key, converted=placed.dtype != t.dtype)
        state[name] = placed if region is None else as_shard(placed, like)
        del t   # unmaps a converted tensor's pages now
        progress.update()
    progress.close()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{checkpoint.files[0].parent}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def _tensor_files(checkpoint: Checkpoint) -> dict[str, Path]:
    """The file of every tensor (key -> path; no tensor is read): each stored once, where the index says."""
    where: dict[str, Path] = {}
    for path in checkpoint.files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except SafetensorError as e:
            raise InputError(f"{path}: not a readable safetensors file ({e}); is the download complete?") from None
        for key in keys:
            if key in where:
                raise InputError(f"tensor {key!r} of {path} is also in {where[key]}: a weight must be stored once")
            if checkpoint.index is not None and checkpoint.index.get(key) != path.name:
                raise InputError(f"{path}: holds tensor {key!r}, which the index puts in "
                                 f"{checkpoint.index.get(key)!r}")
            where[key] = path
    if checkpoint.index is not None:
        absent = sorted(set(checkpoint.index) - set(where))
        if absent:
            raise InputError(f"{checkpoint.files[0].parent}: {HF_INDEX} lists tensor(s) {absent[:5]} that no file holds")
    return where


def loading_bar(total: int, name: str) -> tqdm:
    """A progress bar over the tensors loaded, shown only once loading has taken more than a second."""
    return tqdm(total=total, desc=f"loading {name}", unit=" tensors", delay=1, leave=False)


def _check_finite(t: torch.Tensor, path: Path, key: str, converted: bool) -> None:
    """Refuse a weight holding NaN or an infinity (in the file, or made by the conversion to a
    narrower dtype). aminmax reads the tensor once without a temporary; NaN propagates to its result."""
    flat = t.t() if t.ndim == 2 and t.t().is_contiguous() else t   # a column-major weight, read in its order
    low, high = torch.aminmax(flat if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else flat.float())
    if math.isfinite(low) and math.isfinite(high):
        return
    bad = (~torch.isfinite(t)).nonzero()[0].tolist()   # the error path only: find the first one
    raise InputError(f"{path}: tensor {key!r} holds a non-finite value ({t[tuple(bad)].item()} at index "
                     f"{bad}){' after conversion to ' + str(t.dtype) if converted else ''}")


def _mapped_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of the file, memory-mapped (nothing is read until used) through a map of its own:
    when the tensor is converted or moved, dropping it unmaps its pages, so that no more than one
    tensor is ever held twice while loading."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); is the download complete?") from None


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


def load_model(path, device="cpu", dtype: torch.dtype | None = None, mesh: DeviceMesh | None = None,
               mmproj=None, check_finite: bool = True) -> Transformer:
    """Load an official checkpoint folder (params.json + consolidated*.safetensors, or the Hugging
    Face layout config.json + model-*.safetensors). dtype None keeps the stored dtype (bf16).
    mesh: split the text blocks over its ranks (parallel.py; parallel.mesh_from_env makes it).
    Or a GGUF file (a split set by any of its parts; see gguf_file.py) with the vision tower of the
    mmproj file `mmproj`, or of the mmproj*.gguf beside it when None (False: text only).
    check_finite: refuse a weight holding NaN or an infinity (one read of every weight; see README)."""
    folder = Path(path)
    if folder.suffix != ".gguf" and not folder.is_dir():
        if os.path.lexists(folder):
            raise InputError(f"{folder}: not a model folder (a file, or a link to none)")
        raise MissingFileError(f"{folder}: no such model folder")
    checkpoint = read_checkpoint(folder, mmproj)
    # Build on the meta device (no memory) and then assign the tensors read from disk, so that
    # the weights are held once.
    with torch.device("meta"):
        model = build_model(checkpoint.args, checkpoint.vision)
    if checkpoint.layout == "gguf":
        if mesh is not None:
            raise InputError(f"{folder}: tensor parallel (parallel.py) is not implemented for GGUF files")
        # A GGUF has no single stored dtype: float32 unless asked (for the activations and float tensors).
        dtype = dtype or torch.float32
        with loading_bar(len(model.state_dict()), folder.name) as progress:
            load_gguf_weights(model, checkpoint.files, device, dtype,
                              lambda name, t: _place(t, name, checkpoint, dtype, device), progress)
        return model.eval()
    if mesh is not None:
        if checkpoint.quant is not None:
            raise InputError(f"{folder}: tensor parallel (parallel.py) is not implemented for quantized checkpoints")
        parallelize(model, mesh)   # still on meta: the split weights become DTensors of their slices
    state = _read_tensors(checkpoint, model.state_dict(), dtype, device, check_finite)
    for name, t in list(state.items()):
        if isinstance(t, Packed):
            state.update(_packed_layer(model, name, state.pop(name), checkpoint, dtype, device))
    model.load_state_dict(state, assign=True)
    return model.eval()


def _packed_layer(model: Transformer, name: str, packed: Packed, checkpoint: Checkpoint, dtype, device) -> dict:
    """Put a quantized weight in place: its nn.Linear / nn.Embedding (without bias) becomes a PackedLinear /
    PackedEmbedding holding it as stored (a Hugging Face wq / wk reorders its outputs to the native rows);
    anything else gets the weight dequantized. Returns the state entries of what it put there."""
    module_name = name.removesuffix(".weight")
    module = model.get_submodule(module_name)
    if not isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "bias", None) is not None:
        return {name: _place(packed.unpack(), name, checkpoint, dtype, device)}
    order = None
    if checkpoint.layout == "hf" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        rows = packed.shape[0]
        order = unpermute_rotary(torch.arange(rows).view(rows, 1), _rotary_heads(name, rows, checkpoint)).view(rows)
    layer = (PackedEmbedding if isinstance(module, nn.Embedding) else PackedLinear)(packed, dtype, order).to(device)
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
    return {f"{module_name}.{key}": t for key, t in layer.state_dict().items()}


# ----------------------------------------------------------------------------- finding the files and the device

DEFAULT_MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
# What a run needs from the official repository: the native weights (not the second, Hugging Face
# layout copy of the same weights), the tokenizer and the system prompt.
HUB_FILES = ["params.json", "consolidated*.safetensors", "tekken.json", "SYSTEM_PROMPT.txt"]


def resolve_model(name: str) -> Path:
    """A local folder as is; a hub id ("owner/name") downloaded once (later runs use the cache)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise InputError(f"--model {name}: not a folder (expected a model folder or a hub id like {DEFAULT_MODEL})")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise MissingFileError(f"--model {name}: no such folder (expected a local folder with params.json, "
                               f"consolidated.safetensors and tekken.json, or a hub id like {DEFAULT_MODEL})")
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # no network, gated repository, missing login, typo in the id
        raise MissingFileError(
            f"--model {name}: could not get the files from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"On a machine with network run `hf download {name} --include {' '.join(HUB_FILES)} "
            f"--local-dir DIR` (after `hf auth login` and accepting the model's terms if it is gated), "
            f"then pass --model DIR") from None


def model_name(model: str) -> str:
    """A local folder is known by its name, a hub id by its last part (Mistral-Small-3.2-24B-Instruct-2506)."""
    return Path(model).resolve().name if Path(model).is_dir() else model.split("/")[-1]


def tokenizer_file(folder: Path) -> Path:
    # lexists: a tekken.json that is not a regular file is named as such by Tokenizer.from_file
    found = ([folder / "tekken.json"] if os.path.lexists(folder / "tekken.json")
             else sorted(folder.glob("tokenizer.model*")))
    if not found:
        raise MissingFileError(f"{folder}: no tokenizer file (expected tekken.json)")
    return found[0]


def device_problem(name: str) -> str | None:
    """Why --device `name` cannot be used here, or None: auto, cpu, cuda, cuda:N and mps are known,
    and cuda / mps must be available on this machine."""
    if name in ("auto", "cpu"):
        return None
    if not re.fullmatch(r"cuda(:\d+)?|mps", name):
        return f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps"
    if name == "mps":
        return None if torch.backends.mps.is_available() else "--device 'mps': MPS is not available on this machine"
    if not torch.cuda.is_available():
        return f"--device {name!r}: CUDA is not available on this machine (torch {torch.__version__})"
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
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
