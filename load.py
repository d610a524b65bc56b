"""Loading the official checkpoints: their configuration, their tensor names and layouts, and the model.

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
Finding the files: resolve_model (a local folder, or a hub id downloaded once), tokenizer_file, pick_device.
"""
import re
import warnings
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import huggingface_hub
import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from gguf_file import load_gguf_weights, read_gguf_config
from inputs import InputError, MissingFileError, read_json
from model import ModelArgs, Transformer
from parallel import as_shard, parallelize, shard_region
from vision import VisionArgs, VisionLanguageModel


# ----------------------------------------------------------------------------- configuration

def parse_params(params: dict, source: str = "params.json") -> tuple[ModelArgs, VisionArgs | None]:
    """The text model's and the vision encoder's arguments from a params.json document."""
    params = dict(params)
    vision = params.pop("vision_encoder", None)
    args = _build(ModelArgs, params, source)
    if vision is None:
        return args, None
    v = _build(VisionArgs, vision, f"{source}: vision_encoder")
    if v.mm_projector_id != "patch_merge" or not v.add_pre_mm_projector_layer_norm:
        raise InputError(f"{source}: vision_encoder with mm_projector_id {v.mm_projector_id!r} and "
                         f"add_pre_mm_projector_layer_norm {v.add_pre_mm_projector_layer_norm} is not "
                         f"supported (this implementation has the Small 3.x patch merger and its norm)")
    return args, v


# Fields that change the math and that this implementation does not have: refuse, never ignore.
UNSUPPORTED = {"moe", "sliding_window", "rope_scaling", "yarn", "quantization", "lora"}


def _build(cls, values: dict, source: str):
    """Construct dataclass `cls` from a dict: missing required fields are errors, unknown ones warnings."""
    known = {f.name: f for f in fields(cls)}
    missing = [n for n, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and n not in values]
    if missing:
        raise InputError(f"{source}: missing required field(s) {missing}")
    for name, value in values.items():
        if name in UNSUPPORTED and value:
            raise InputError(f"{source}: field {name!r} = {value!r} is not supported by this implementation")
        if name not in known and name not in UNSUPPORTED:
            warnings.warn(f"{source}: ignoring unknown field {name!r}")
    return cls(**{n: values[n] for n in known if n in values})


def parse_hf_config(config: dict, source: str) -> tuple[ModelArgs, VisionArgs | None]:
    """The arguments from a Hugging Face config.json (MistralForCausalLM or Mistral3ForConditionalGeneration)."""
    text = config.get("text_config", config)
    theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))
    names = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
             "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_position_embeddings"}
    values = {ours: text[theirs] for ours, theirs in names.items() if text.get(theirs) is not None}
    if theta is not None:
        values["rope_theta"] = theta
    # No head_dim means dim / n_heads to transformers, which is wrong for this model (5120 / 32 = 160,
    # not 128): a missing head_dim is a missing required field, as in params.json.
    args = _build(ModelArgs, values, source)
    vision = _hf_vision_args(config, source) if "vision_config" in config else None
    return args, vision


def _hf_vision_args(config: dict, source: str) -> VisionArgs:
    """VisionArgs from the config.json of a Mistral3ForConditionalGeneration."""
    vision = config["vision_config"]
    # transformers can configure other activations or feature layers; the model has exactly these.
    for key, value, want in (("vision_config.hidden_act", vision.get("hidden_act"), "silu"),
                             ("projector_hidden_act", config.get("projector_hidden_act"), "gelu"),
                             ("vision_feature_layer", config.get("vision_feature_layer"), -1)):
        if value != want:
            raise InputError(f"{source}: {key} is {value!r}; this model needs {want!r}")
    theta = vision.get("rope_theta", (vision.get("rope_parameters") or {}).get("rope_theta"))
    names = ["hidden_size", "num_channels", "image_size", "patch_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads"]
    values = {name: vision[name] for name in names if name in vision}
    values.update(rope_theta=theta, image_token_id=config.get("image_token_index"),
                  adapter_bias=config.get("multimodal_projector_bias"),
                  spatial_merge_size=config.get("spatial_merge_size"), max_image_size=vision.get("image_size"),
                  # Mistral3ForConditionalGeneration always has the norm and the patch merger.
                  add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge")
    return _build(VisionArgs, {k: v for k, v in values.items() if v is not None}, f"{source}: vision_config")


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


def read_checkpoint(folder: Path, mmproj=None) -> Checkpoint:
    """The folder's layout, weight files and configuration (no tensor is read). A .gguf file instead
    of a folder is read by gguf_file (layout "gguf"), with its mmproj (given or found beside it)."""
    if str(folder).endswith(".gguf"):
        args, vision, files = read_gguf_config(folder, mmproj)
        return Checkpoint("gguf", files[0], files, args, vision)
    if (folder / "params.json").is_file():
        config, layout = folder / "params.json", "native"
        args, vision = parse_params(read_json(config), str(config))
        files = sorted(folder.glob("consolidated*.safetensors"))
    elif (folder / "config.json").is_file():
        config, layout = folder / "config.json", "hf"
        args, vision = parse_hf_config(read_json(config), str(config))
        files = sorted(folder.glob("model*.safetensors"))
    else:
        raise MissingFileError(f"{folder}: no params.json (native layout) or config.json (Hugging Face "
                               f"layout) found; expected an official Mistral checkpoint folder")
    if not files:
        expected = "consolidated.safetensors" if layout == "native" else "model-*.safetensors"
        raise MissingFileError(f"{folder}: no weights found, expected {expected}")
    return Checkpoint(layout, config, files, args, vision)


def build_model(args: ModelArgs, vision: VisionArgs | None = None) -> Transformer:
    """The model the arguments describe, with a vision tower when `vision` is given."""
    return Transformer(args) if vision is None else VisionLanguageModel(args, vision)


def _rotary_heads(name: str, rows: int, checkpoint: Checkpoint) -> int:
    """The head count of `rows` rows of wq / wk `name` (all of them, or a rank's whole heads): the
    Hugging Face permutation is per head of head_dim rows."""
    head_dim = checkpoint.vision.head_dim if name.startswith("vision_encoder.") else checkpoint.args.head_dim
    return rows // head_dim


def _read_tensors(checkpoint: Checkpoint, expected: dict, dtype, device) -> dict:
    """Read every tensor, renamed and un-permuted to the native layout, checked against `expected`
    (name -> the model's tensor on the meta device: its shape and, split by parallel.py, the slice
    that this rank holds), cast to dtype and placed on device one at a time."""
    state, layout, files = {}, checkpoint.layout, checkpoint.files
    progress = loading_bar(len(expected), files[0].parent.name)
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
            for key in keys:
                name = key if layout == "native" else hf_to_native_name(key)
                if name not in expected:
                    raise InputError(f"{path}: unexpected tensor {key!r}: the model that the folder's "
                                     f"config describes has no such weight")
                t, like = _mapped_tensor(path, key), expected[name]
                if t.shape != like.shape:
                    raise InputError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(like.shape)}")
                region = shard_region(like)
                if region is None:
                    state[name] = _place(t, name, checkpoint, dtype, device)
                else:
                    # Only the slice's pages are read (all of them for a column slice, then unmapped);
                    # the copy gives the shard memory of its own, not a view into the whole tensor's map.
                    dim, start, length = region
                    state[name] = as_shard(_place(t.narrow(dim, start, length).clone(), name, checkpoint,
                                                  dtype, device), like)
                del t   # unmaps a converted tensor's pages now
                progress.update()
        except SafetensorError as e:
            raise InputError(f"{path}: not a readable safetensors file ({e}); is the download complete?") from None
    progress.close()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{files[0].parent}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def loading_bar(total: int, name: str) -> tqdm:
    """A progress bar over the tensors loaded, shown only once loading has taken more than a second."""
    return tqdm(total=total, desc=f"loading {name}", unit=" tensors", delay=1, leave=False)


def _mapped_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of the file, memory-mapped (nothing is read until used) through a map of its own:
    when the tensor is converted or moved, dropping it unmaps its pages, so that no more than one
    tensor is ever held twice while loading."""
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.get_tensor(key)


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
               mmproj=None) -> Transformer:
    """Load an official checkpoint folder (params.json + consolidated*.safetensors, or the Hugging
    Face layout config.json + model-*.safetensors). dtype None keeps the stored dtype (bf16).
    mesh: split the text blocks over its ranks (parallel.py; parallel.mesh_from_env makes it).
    Or a GGUF file (a split set by any of its parts; see gguf_file.py) with the vision tower of the
    mmproj file `mmproj`, or of the mmproj*.gguf beside it when None (False: text only)."""
    folder = Path(path)
    if folder.suffix != ".gguf" and not folder.is_dir():
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
        parallelize(model, mesh)   # still on meta: the split weights become DTensors of their slices
    state = _read_tensors(checkpoint, model.state_dict(), dtype, device)
    model.load_state_dict(state, assign=True)
    return model.eval()


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
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or folder.exists():
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
    found = [folder / "tekken.json"] if (folder / "tekken.json").is_file() else sorted(folder.glob("tokenizer.model*"))
    if not found:
        raise MissingFileError(f"{folder}: no tokenizer file (expected tekken.json)")
    return found[0]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError as e:
            raise InputError(f"--device {name!r}: not a torch device ({e})") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
