"""A checkpoint: where a model's files come from, and what they say, read once and before any tensor.

    read_checkpoint(source, mmproj=None, tokenizer=None, processes=1) -> Checkpoint

source, as --model takes it:
- a model folder, in the native layout (params.json + consolidated.safetensors, or a complete set
  consolidated-0000k-of-0000n.safetensors) or the Hugging Face layout (config.json + model-*.safetensors,
  with model.safetensors.index.json when split), quantized or not: a config.json naming an MLX, bitsandbytes
  or compressed-tensors quantization is read by quant_formats.py (others refused);
- a hub id ("owner/name"): the official repository's native files (HUB_FILES), downloaded once;
- a GGUF text file, or any part of a split set NAME-0000k-of-0000n.gguf;
- REPO:QUANT (llama.cpp's -hf syntax): one quant of a GGUF repository on the hub, and its mmproj.
mmproj, for a GGUF: the vision file (default: the mmproj*.gguf beside the text file), the type to download
with REPO:QUANT (F16 (default), BF16, F32), or "none". tokenizer: a file to use instead of the model's own
(tekken.json, or a .gguf's tokenizer.ggml.*); False: no tokenizer (load.load_model reads only the weights).
processes: how many ranks the model will be split over (torchrun, parallel.py).

The Checkpoint holds the configuration (config.py; a GGUF's from its metadata, gguf_file.py), the weight
files, the GGUF headers and the tokenizer, checked against each other: the processes split the heads
evenly, every token id has an embedding, and the images the tokenizer lays out are those the vision
encoder reads. Each file is read once: a GGUF's header is parsed here and kept, for the tokenizer and for
load.py, which maps the files for their tensors.
"""
import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from config import json_object, parse_hf_config, parse_params
from gguf_file import GGUF, gguf_config, gguf_tokenizer, read_gguf
from inputs import InputError, MissingFileError, read_json, regular_file
from model import ModelArgs
from parallel import check_split
from quant_formats import Format, read_format
from tokenizer import Tokenizer
from vision import VisionArgs


@dataclass
class Checkpoint:
    """A model's files and what they say (no tensor read): load.load_model makes the model of it."""
    name: str                  # how the model is known: a folder by its name, a hub id by its last part
    path: Path                 # the model folder, or the GGUF text file given (SYSTEM_PROMPT.txt is looked for in it)
    layout: str                # "native", "hf" or "gguf"
    config: Path               # params.json or config.json; for "gguf" the text file, whose metadata it is
    files: list[Path]          # the weight files; for "gguf" the text file's parts, then the mmproj
    args: ModelArgs
    vision: VisionArgs | None
    index: dict | None = None            # Hugging Face: tensor name -> file, from model.safetensors.index.json
    headers: list[GGUF] | None = None    # "gguf": the header of each of `files`, parsed once
    tokenizer: Tokenizer | None = None   # None when read without one
    quant: Format | None = None          # "hf": the quantization config.json names (quant_formats.py)

    @property
    def mmproj(self) -> Path | None:
        """The GGUF vision file read, if any."""
        return self.files[-1] if self.layout == "gguf" and self.vision is not None else None


def read_checkpoint(source, mmproj=None, tokenizer=None, processes: int = 1) -> Checkpoint:
    """The checkpoint that `source` names, with its tokenizer (see the module's docstring): no tensor is read."""
    path, mmproj = local_files(str(source), mmproj)
    name = model_name(str(source))
    checkpoint = read_gguf_files(name, path, mmproj) if path.suffix == ".gguf" else read_folder(name, path)
    check_split(checkpoint.args, processes)
    if tokenizer is not False:
        checkpoint.tokenizer, where = read_tokenizer(checkpoint, tokenizer)
        check_tokenizer(checkpoint, where)
    return checkpoint


def model_name(source: str) -> str:
    """A local folder is known by its name, a hub id by its last part (Mistral-Small-3.2-24B-Instruct-2506)."""
    return Path(source).resolve().name if Path(source).is_dir() else source.split("/")[-1]


# ----------------------------------------------------------------------------- local files, from the hub if need be

DEFAULT_MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
# What a run needs from the official repository: the native weights (not the second, Hugging Face
# layout copy of the same weights), the tokenizer and the system prompt.
HUB_FILES = ["params.json", "consolidated*.safetensors", "tekken.json", "SYSTEM_PROMPT.txt"]
HUB_QUANT = re.compile(r"([\w.-]+/[\w.-]+):([\w.-]+)")   # llama.cpp's -hf syntax, REPO:QUANT
MMPROJ_TYPES = ("F16", "BF16", "F32")


def local_files(model: str, mmproj=None) -> tuple[Path, Path | None]:
    """--model and --mmproj as local files: the model folder or the GGUF text file, downloaded when it is a
    hub id or REPO:QUANT, and the mmproj to read with a GGUF (None: none). mmproj None, or a type: the one
    beside a local file, the type's (F16 by default) from the hub; False or "none": none; else a file."""
    named = mmproj.upper() if isinstance(mmproj, str) else None
    if mmproj is False or named == "NONE":
        choice = False
    elif mmproj is None or named in MMPROJ_TYPES:
        choice = None   # the one beside, or the type's from the hub
    else:
        choice = Path(mmproj)
    hub_quant = HUB_QUANT.fullmatch(model) and not Path(model).exists()
    if not (model.endswith(".gguf") or hub_quant):
        if choice or named in MMPROJ_TYPES:
            raise InputError(f"mmproj={mmproj}: only a GGUF model takes an mmproj; the model folder {model} holds "
                             f"its vision encoder in its own weights")
        return resolve_model(model), None
    if choice and not choice.is_file():
        raise MissingFileError(f"mmproj={mmproj}: no such file (or give a type: {', '.join(MMPROJ_TYPES)})")
    if hub_quant:
        text, found = download_gguf(model, (named or "F16") if choice is None else None)
        return text, found if choice is None else (choice or None)
    path = Path(model).expanduser()
    if not path.is_file():
        raise MissingFileError(f"model={model}: no such GGUF file")
    return path, find_mmproj(path) if choice is None else (choice or None)


def resolve_model(name: str) -> Path:
    """A local folder as is; a hub id ("owner/name") downloaded once (later runs use the cache)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise InputError(f"model={name}: not a folder (expected a model folder or a hub id like {DEFAULT_MODEL})")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise MissingFileError(f"model={name}: no such folder (expected a local folder with params.json, "
                               f"consolidated.safetensors and tekken.json, or a hub id like {DEFAULT_MODEL})")
    return Path(from_hub(name, huggingface_hub.snapshot_download, name, allow_patterns=HUB_FILES))


def from_hub(model: str, call, *args, **kwargs):
    """A huggingface_hub call for --model `model`; its failure is the one message a user can act on."""
    try:
        return call(*args, **kwargs)
    except Exception as e:   # no network, gated repository, missing login, typo in the id
        repo, _, quant = model.partition(":")
        include, local = (f"'*{quant}*.gguf' 'mmproj*'", "DIR/FILE.gguf") if quant else (" ".join(HUB_FILES), "DIR")
        raise MissingFileError(
            f"model={model}: could not get the files from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"On a machine with network run `hf download {repo} --include {include} --local-dir DIR` (after "
            f"`hf auth login` and accepting the model's terms if it is gated), then pass model={local}") from None


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
    files = from_hub(model, huggingface_hub.list_repo_files, repo)
    text = quant_files(files, quant)
    if not text:
        quants_found = sorted({m.group(1) for f in files
                               if (m := re.search(r"-((?:UD-)?[A-Z0-9_]+?)(-\d{5}-of-\d{5})?\.gguf$", f))})
        raise InputError(f"model={model}: {repo} has no {quant} file (it has {', '.join(quants_found)})")
    projectors = [f for f in files if mmproj and re.fullmatch(rf"(.*/)?mmproj.*{mmproj}\.gguf", f, re.IGNORECASE)]
    folder = Path(from_hub(model, huggingface_hub.snapshot_download, repo, allow_patterns=text + projectors[:1]))
    return folder / text[0], (folder / projectors[0]) if projectors else None


# ----------------------------------------------------------------------------- GGUF files

def read_gguf_files(name: str, path: Path, mmproj: Path | None) -> Checkpoint:
    """A GGUF text file's parts and the mmproj: each header parsed once, and the model they describe."""
    parts = gguf_parts(path)
    headers = [read_gguf(p) for p in parts] + ([read_gguf(mmproj)] if mmproj else [])
    args, vision = gguf_config(headers[0], headers[-1] if mmproj else None)
    return Checkpoint(name, path, "gguf", parts[0], [h.path for h in headers], args, vision, headers=headers)


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


def find_mmproj(text: Path) -> Path | None:
    """The mmproj*.gguf beside a text file, if there is exactly one."""
    found = sorted(text.parent.glob("mmproj*.gguf"))
    if len(found) > 1:
        raise InputError(f"{text.parent}: several mmproj files {[p.name for p in found]}; pass one as mmproj=")
    return found[0] if found else None


# ----------------------------------------------------------------------------- model folders

def read_folder(name: str, folder: Path) -> Checkpoint:
    """A model folder's layout, configuration and weight files."""
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
    return Checkpoint(name, folder, layout, config, files, args, vision, index, quant=quant)


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


# ----------------------------------------------------------------------------- the tokenizer

def read_tokenizer(checkpoint: Checkpoint, path=None) -> tuple[Tokenizer, Path]:
    """The tokenizer and its file: the file given, else the model's own: tekken.json beside the weights,
    or a GGUF's tokenizer.ggml.* from the header already read. A GGUF tokenizer takes its image settings
    from the checkpoint's mmproj."""
    mmproj = checkpoint.headers[-1] if checkpoint.mmproj else None
    if path is not None:
        path = Path(path)
        return (gguf_tokenizer(read_gguf(path), mmproj) if path.suffix == ".gguf" else Tokenizer.from_file(path)), path
    if checkpoint.layout == "gguf":
        return gguf_tokenizer(checkpoint.headers[0], mmproj), checkpoint.config
    path = tokenizer_file(checkpoint.path)
    return Tokenizer.from_file(path), path


def tokenizer_file(folder: Path) -> Path:
    # lexists: a tekken.json that is not a regular file is named as such by Tokenizer.from_file
    found = ([folder / "tekken.json"] if os.path.lexists(folder / "tekken.json")
             else sorted(folder.glob("tokenizer.model*")))
    if not found:
        raise MissingFileError(f"{folder}: no tokenizer file (expected tekken.json)")
    return found[0]


def check_tokenizer(checkpoint: Checkpoint, source: Path) -> None:
    """The tokenizer (read from `source`) against the model: every id has an embedding, and the images
    that the tokenizer preprocesses and lays out (tekken.json's image section) are those the vision
    encoder reads (params.json's vision_encoder)."""
    tokenizer, args, vision, config = checkpoint.tokenizer, checkpoint.args, checkpoint.vision, checkpoint.config
    if tokenizer.n_words > args.vocab_size:
        raise InputError(f"the tokenizer {source} has {tokenizer.n_words} ids but {config} gives vocab_size "
                         f"{args.vocab_size}: the model has no embedding for the tokenizer's last ids")
    if vision is None:
        return
    image = tokenizer.image
    if image is None:
        raise InputError(f"{config} has a vision encoder but the tokenizer has no image settings")
    pairs = [("patch size", image.patch_size, vision.patch_size),
             ("spatial merge size", image.spatial_merge_size, vision.spatial_merge_size),
             ("[IMG] id", tokenizer.special_id("[IMG]"), vision.image_token_id)]
    if vision.max_image_size is not None:
        pairs.append(("max image size", image.max_image_size, vision.max_image_size))
    for name, token, ident in (("[IMG_BREAK] id", "[IMG_BREAK]", vision.image_break_token_id),
                               ("[IMG_END] id", "[IMG_END]", vision.image_end_token_id)):
        if ident is not None:
            pairs.append((name, tokenizer.special_id(token), ident))
    for name, theirs, ours in pairs:
        if theirs != ours:
            raise InputError(f"the tokenizer and {config} disagree on the {name}: {theirs} in the tokenizer, "
                             f"{ours} in the model's configuration")
