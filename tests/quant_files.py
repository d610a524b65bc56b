"""Quantized folders written by the formats' own libraries from a tiny Hugging Face checkpoint, and each
library's own dequantization of them: the oracles of tests/test_quant_formats.py.

- MLX: mlx_lm's quantize_model and save_model (what `mlx_lm.convert -q` runs), read back by mlx.core.dequantize;
- bitsandbytes: transformers' from_pretrained with a BitsAndBytesConfig (how unsloth's -bnb-4bit folders are
  made) and save_pretrained, read back by bitsandbytes.functional.dequantize_4bit;
- compressed-tensors: its apply_quantization_config, scales from its calculate_qparams over each tile's min
  and max (llm-compressor's min-max observer), its ModelCompressor, save_pretrained and update_config,
  read back by its decompressors.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import hf_mistral3_model, hf_text_model
from tekken_files import special_list, write_tekken


def write_hf(folder: Path, weights: dict, params: dict) -> Path:
    """The tiny model as transformers saves it in bfloat16 (the quantizers' input): a MistralForCausalLM, or
    with a vision encoder a Mistral3ForConditionalGeneration."""
    model = hf_mistral3_model(weights, params) if "vision_encoder" in params else hf_text_model(weights, params)
    model.to(torch.bfloat16).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = params["rope_theta"]   # mlx_lm reads only this spelling (docs: PEERS)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_mlx(folder: Path, hf: Path, bits: int, group: int, predicate=None) -> Path:
    """mlx_lm.convert -q --q-bits bits --q-group-size group, without the tokenizer; predicate(path, module)
    -> False or per-layer {"bits", "group_size"} makes a mixed recipe, as mlx_lm's own recipes do."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model
    model, config = load_model(hf)
    model, config = quantize_model(model, config, group, bits, quant_predicate=predicate)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def write_bnb(folder: Path, hf: Path, quant_type: str = "nf4", double: bool = True) -> Path:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(hf, quantization_config=config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def write_compressed(folder: Path, hf: Path, scheme: str) -> Path:
    """A compressed-tensors preset scheme (W4A16, FP8_DYNAMIC, ...) on every Linear but the head."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    multimodal = "vision_config" in json.loads((hf / "config.json").read_text())
    model = (AutoModelForImageTextToText if multimodal else AutoModelForCausalLM).from_pretrained(hf, dtype=torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            _min_max_scales(module)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder


def _min_max_scales(module):
    """Scale (and zero point) of each tile of the weight from its min and max, by compressed-tensors."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args, w = module.quantization_scheme.weights, module.weight.float()
    if args.strategy == "group":
        w = w.unflatten(-1, (-1, args.group_size))
    elif args.strategy == "block":
        rows, cols = args.block_structure
        w = w.unflatten(0, (-1, rows)).unflatten(-1, (-1, cols)).transpose(1, 2).flatten(-2)
    elif args.strategy == "tensor":
        w = w.reshape(1, -1)
    scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
    module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype)


def small_tekken(folder: Path, vocab: int) -> Path:
    """An official-layout tekken.json cut to `vocab` ids (100 special), for a tiny model's vocabulary."""
    path = write_tekken(folder)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["config"].update(default_vocab_size=vocab, default_num_special_tokens=100)
    data["special_tokens"] = special_list("v11", 100)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the libraries' dequantization

def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def library_weights(folder: Path) -> dict[str, torch.Tensor]:
    """{NAME.weight: the weights the format's library dequantizes} for every quantized layer NAME of a folder."""
    config, tensors = json.loads((folder / "config.json").read_text()), stored(folder)
    if "quantization" in config:
        return _mlx_weights(config["quantization"], tensors)
    method = config["quantization_config"]["quant_method"]
    return (_bnb_weights if method == "bitsandbytes" else _compressed_weights)(config["quantization_config"], tensors)


def _mlx_weights(settings: dict, tensors: dict) -> dict:
    import mlx.core as mx

    def array(t):
        return mx.array(t.view(torch.int32).numpy().view(np.uint32) if t.dtype == torch.uint32 else t.float().numpy())
    out = {}
    for key in tensors:
        if key.endswith(".scales"):
            layer = key.removesuffix(".scales")
            entry = settings.get(layer, settings)
            dtype = getattr(mx, str(tensors[key].dtype).removeprefix("torch."))
            w = mx.dequantize(array(tensors[layer + ".weight"]), array(tensors[key]).astype(dtype),
                              array(tensors[layer + ".biases"]).astype(dtype), group_size=entry["group_size"],
                              bits=entry["bits"])
            out[layer + ".weight"] = torch.from_numpy(np.array(w.astype(mx.float32))).to(tensors[key].dtype)
    return out


def _bnb_weights(settings: dict, tensors: dict) -> dict:
    from bitsandbytes.functional import QuantState, dequantize_4bit
    out = {}
    for key in tensors:
        if ".weight.quant_state." in key:
            weight = key.split(".quant_state.")[0]
            state = {k.removeprefix(weight + "."): t for k, t in tensors.items() if k.startswith(weight + ".")}
            out[weight] = dequantize_4bit(tensors[weight], QuantState.from_dict(state, torch.device("cpu")))
    return out


def _compressed_weights(settings: dict, tensors: dict) -> dict:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    (group,) = settings["config_groups"].values()   # the tests' folders have one group
    scheme = QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
    compressor = BaseCompressor.load_from_registry(group.get("format") or settings["format"])
    out = {}
    for key in tensors:
        if key.endswith(".weight_scale"):
            layer = key.removesuffix("weight_scale")
            parts = {k.removeprefix(layer): t for k, t in tensors.items() if k.startswith(layer)}
            out[layer + "weight"] = compressor.decompress(parts, scheme)["weight"]
    return out


def write_dequantized(folder: Path, quantized: Path) -> Path:
    """The same model as a plain Hugging Face folder: the library's dequantized weights in place of each
    quantized layer, every other tensor as stored, config.json without its quantization."""
    weights, tensors = library_weights(quantized), stored(quantized)
    layers = {key.removesuffix(".weight") for key in weights}
    plain = {k: t for k, t in tensors.items() if k.rpartition(".")[0] not in layers and
             k.split(".weight.")[0] not in layers}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**plain, **weights}, folder / "model.safetensors")
    config = json.loads((quantized / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
