"""The model's configuration: the arguments of model.ModelArgs and vision.VisionArgs, from params.json
(native), config.json (Hugging Face) or a GGUF's metadata (gguf_file.py), each checked the same way.

A missing required field is an error, an unknown one a warning, a field that changes the math and that
this implementation does not have (UNSUPPORTED) an error; every value is checked against its field's type
(bool is not taken for an int, nor NaN for a number) and the range RULES, and the whole against RELATIONS,
so that a bad file is refused here, naming the field, before a single block is built.
"""
import math
import types
import warnings
from dataclasses import MISSING, fields
from typing import Union, get_args, get_origin, get_type_hints

from inputs import InputError
from model import ModelArgs
from vision import VisionArgs


# ----------------------------------------------------------------------------- configuration

def parse_params(params: dict, source: str = "params.json") -> tuple[ModelArgs, VisionArgs | None]:
    """The text model's and the vision encoder's arguments from a params.json document."""
    params = dict(json_object(params, source))
    vision = params.pop("vision_encoder", None)
    args = build_args(ModelArgs, params, source)
    if vision is None:
        return args, None
    v = build_args(VisionArgs, json_object(vision, f"{source}: vision_encoder"), f"{source}: vision_encoder")
    if v.mm_projector_id != "patch_merge" or not v.add_pre_mm_projector_layer_norm:
        raise InputError(f"{source}: vision_encoder with mm_projector_id {v.mm_projector_id!r} and "
                         f"add_pre_mm_projector_layer_norm {v.add_pre_mm_projector_layer_norm} is not "
                         f"supported (this implementation has the Small 3.x patch merger and its norm)")
    _check_image_ids(args, v, f"{source}: vision_encoder")
    return args, v


def json_object(value, source: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


# Fields that change the math and that this implementation does not have: refuse, never ignore.
UNSUPPORTED = {"moe", "sliding_window", "rope_scaling", "yarn", "quantization", "lora"}

MAX_LAYERS = 1024   # more blocks than any real model: a typo, refused before a block is built

# Range rules of the configuration fields, by name (the text model's and the vision encoder's):
# field -> (test, what it must be). Types come from the dataclasses' annotations (_check_value).
POSITIVE = (lambda v: v > 0, "> 0")
LAYERS = (lambda v: 1 <= v <= MAX_LAYERS, f"between 1 and {MAX_LAYERS}")
TOKEN_ID = (lambda v: v >= 0, "a token id >= 0")
RULES = {
    "dim": POSITIVE, "hidden_dim": POSITIVE, "n_heads": POSITIVE, "n_kv_heads": POSITIVE,
    "vocab_size": POSITIVE, "max_position_embeddings": POSITIVE, "norm_eps": POSITIVE, "rope_theta": POSITIVE,
    "head_dim": (lambda v: v > 0 and v % 2 == 0, "a positive even number (RoPE turns pairs)"),
    "n_layers": LAYERS, "num_hidden_layers": LAYERS,
    "hidden_size": POSITIVE, "num_channels": (lambda v: v == 3, "3 (RGB)"), "image_size": POSITIVE,
    "patch_size": POSITIVE, "intermediate_size": POSITIVE, "num_attention_heads": POSITIVE,
    "spatial_merge_size": POSITIVE, "max_image_size": POSITIVE,
    "image_token_id": TOKEN_ID, "image_break_token_id": TOKEN_ID, "image_end_token_id": TOKEN_ID,
}
# Rules between fields of one dataclass: (class, test, what must hold).
RELATIONS = [
    (ModelArgs, lambda a: a.n_heads % a.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads (GQA)"),
    (VisionArgs, lambda v: v.hidden_size % v.num_attention_heads == 0 and v.head_dim % 4 == 0,
     "hidden_size / num_attention_heads must be a whole head size, a multiple of 4 (2-D RoPE)"),
]


def build_args(cls, values: dict, source: str, keys: dict[str, str] | None = None):
    """Construct dataclass `cls` from a dict: missing required fields are errors, unknown ones
    warnings; every value is checked against the field's type and RULES, the whole against RELATIONS.
    keys: the file's name of a field where it differs (config.json's hidden_size for dim), for errors."""
    key = (keys or {}).get
    known = {f.name: f for f in fields(cls)}
    missing = [key(n, n) for n, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and n not in values]
    if missing:
        raise InputError(f"{source}: missing required field(s) {missing}")
    for name, value in values.items():
        if name in UNSUPPORTED and value:
            raise InputError(f"{source}: field {key(name, name)!r} = {value!r:.100} is not supported by this "
                             f"implementation")
        if name not in known and name not in UNSUPPORTED:
            warnings.warn(f"{source}: ignoring unknown field {key(name, name)!r}")
    hints = get_type_hints(cls)
    checked = {n: _check_value(values[n], hints[n], n, source, key(n, n)) for n in known if n in values}
    result = cls(**checked)
    for owner, test, rule in RELATIONS:
        if owner is cls and not test(result):
            shown = {key(n, n): checked[n] for n in ("n_heads", "n_kv_heads", "hidden_size", "num_attention_heads")
                     if n in checked}
            raise InputError(f"{source}: {rule}; got {shown}")
    return result


def _check_value(value, kind, name: str, source: str, shown: str):
    """`value` as field `name` of type `kind` holds it (an int given for a float becomes a float);
    else an InputError naming the field as the file does (`shown`). bool is not taken for an int,
    nor NaN for a number; RULES[name] must hold."""
    options = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    kind = next(k for k in options if k is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, expected = number and isinstance(value, int), "an integer"
    elif kind is float:
        ok, expected = number and math.isfinite(value), "a finite number"
    elif kind is str:
        ok, expected = isinstance(value, str), "a string"
    else:
        raise TypeError(f"field {name}: no check for type {kind}")   # a new field type: a bug here
    if not ok:
        raise InputError(f"{source}: field {shown!r} = {value!r:.60} ({type(value).__name__}): expected {expected}"
                         + (" or null" if type(None) in options else ""))
    value = float(value) if kind is float else value
    test, rule = RULES.get(name, (None, None))
    if test is not None and not test(value):
        raise InputError(f"{source}: field {shown!r} = {value!r}: expected {rule}")
    return value


# config.json's (text_config's) name of each field of ModelArgs, and of the unsupported ones it has.
HF_FIELDS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
             "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta"}
HF_KEYS = {**HF_FIELDS, "quantization": "quantization_config"}


def _check_image_ids(args: ModelArgs, vision: VisionArgs, source: str) -> None:
    for name in ("image_token_id", "image_break_token_id", "image_end_token_id"):
        value = getattr(vision, name)
        if value is not None and value >= args.vocab_size:
            raise InputError(f"{source}: field {name!r} = {value} is outside the vocabulary "
                             f"(vocab_size {args.vocab_size})")


def parse_hf_config(config: dict, source: str) -> tuple[ModelArgs, VisionArgs | None]:
    """The arguments from a Hugging Face config.json (MistralForCausalLM or Mistral3ForConditionalGeneration)."""
    config = json_object(config, source)
    text = json_object(config.get("text_config", config), f"{source}: text_config")
    rope = json_object(text.get("rope_parameters") or {}, f"{source}: rope_parameters")
    theta = text.get("rope_theta", rope.get("rope_theta"))
    values = {ours: text[theirs] for ours, theirs in HF_FIELDS.items() if text.get(theirs) is not None}
    if theta is not None:
        values["rope_theta"] = theta
    # What params.json refuses, config.json spells its own way: refused the same way by _build.
    values["sliding_window"] = text.get("sliding_window")
    values["rope_scaling"] = text.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"{source}: rope_parameters has rope_type {rope['rope_type']!r:.40}; this implementation "
                         f"has the default RoPE only")
    values["quantization"] = config.get("quantization_config") or text.get("quantization_config")
    if text.get("hidden_act", "silu") != "silu":
        raise InputError(f"{source}: hidden_act is {text['hidden_act']!r}; this model needs 'silu'")
    # No head_dim means dim / n_heads to transformers, which is wrong for this model (5120 / 32 = 160,
    # not 128): a missing head_dim is a missing required field, as in params.json.
    args = build_args(ModelArgs, values, source, HF_KEYS)
    vision = _hf_vision_args(config, source) if "vision_config" in config else None
    if vision is not None:
        _check_image_ids(args, vision, source)
    return args, vision


def _hf_vision_args(config: dict, source: str) -> VisionArgs:
    """VisionArgs from the config.json of a Mistral3ForConditionalGeneration."""
    vision = json_object(config["vision_config"], f"{source}: vision_config")
    # transformers can configure other activations or feature layers; the model has exactly these.
    for key, value, want in (("vision_config.hidden_act", vision.get("hidden_act"), "silu"),
                             ("projector_hidden_act", config.get("projector_hidden_act"), "gelu"),
                             ("vision_feature_layer", config.get("vision_feature_layer"), -1)):
        if value != want:
            raise InputError(f"{source}: {key} is {value!r}; this model needs {want!r}")
    rope = json_object(vision.get("rope_parameters") or {}, f"{source}: vision_config.rope_parameters")
    theta = vision.get("rope_theta", rope.get("rope_theta"))
    names = ["hidden_size", "num_channels", "image_size", "patch_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads"]
    values = {name: vision[name] for name in names if name in vision}
    values.update(rope_theta=theta, image_token_id=config.get("image_token_index"),
                  adapter_bias=config.get("multimodal_projector_bias"),
                  spatial_merge_size=config.get("spatial_merge_size"), max_image_size=vision.get("image_size"),
                  # Mistral3ForConditionalGeneration always has the norm and the patch merger.
                  add_pre_mm_projector_layer_norm=True, mm_projector_id="patch_merge")
    return build_args(VisionArgs, {k: v for k, v in values.items() if v is not None}, f"{source}: vision_config")
