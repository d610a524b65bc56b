"""Tiny random checkpoints in the official on-disk layouts, and the bridge to transformers.

The tiny text model keeps the awkward parts of the real one: GQA 4:1, head_dim != dim / n_heads,
rope_theta 1e9, an untied output head.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# params.json of Mistral Small 3.1 / 3.2 (../shared/FACTS.md)
REAL_PARAMS = {
    "dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 32768, "n_heads": 32, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072, "max_position_embeddings": 131072,
    "vision_encoder": {
        "hidden_size": 1024, "num_channels": 3, "image_size": 1540, "max_image_size": 1540, "patch_size": 14,
        "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
        "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge",
    },
}

TINY_PARAMS = {
    "dim": 48, "n_layers": 2, "head_dim": 8, "hidden_dim": 96, "n_heads": 8, "n_kv_heads": 2,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 1000, "max_position_embeddings": 4096,
}


def real_text_shapes(p: dict = REAL_PARAMS) -> dict:
    """Name -> shape of every text tensor of the official consolidated.safetensors."""
    d, hd = p["dim"], p["head_dim"]
    shapes = {"tok_embeddings.weight": (p["vocab_size"], d), "norm.weight": (d,),
              "output.weight": (p["vocab_size"], d)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        shapes.update({
            pre + "attention.wq.weight": (p["n_heads"] * hd, d),
            pre + "attention.wk.weight": (p["n_kv_heads"] * hd, d),
            pre + "attention.wv.weight": (p["n_kv_heads"] * hd, d),
            pre + "attention.wo.weight": (d, p["n_heads"] * hd),
            pre + "attention_norm.weight": (d,),
            pre + "ffn_norm.weight": (d,),
            pre + "feed_forward.w1.weight": (p["hidden_dim"], d),
            pre + "feed_forward.w2.weight": (d, p["hidden_dim"]),
            pre + "feed_forward.w3.weight": (p["hidden_dim"], d),
        })
    return shapes


def random_weights(shapes: dict, seed: int = 0) -> dict:
    """Weights with unit-scale activations, so that every mistake shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:   # norms: around 1, not exactly 1
            out[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return out


def write_native(folder, params: dict = TINY_PARAMS, seed: int = 0, dtype=torch.float32) -> dict:
    """Write params.json + consolidated.safetensors; return the weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(real_text_shapes(params), seed)
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, folder / "consolidated.safetensors")
    return weights


# ----------------------------------------------------------------------------- transformers side

def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native (interleaved pairs) -> Hugging Face rotate-half row order, per head (as the official
    conversion script does: the head size is inferred from the head count)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def native_to_hf_text(weights: dict, params: dict, prefix: str = "model.", kv_heads_for_wk: int | None = None):
    """Rename native text keys to MistralForCausalLM's and permute wq / wk.
    kv_heads_for_wk lets a negative control permute wk with the wrong head count."""
    ren = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
           "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
           "ffn_norm": "post_attention_layernorm"}
    out = {}
    for name, w in weights.items():
        if name == "output.weight":
            out["lm_head.weight"] = w
            continue
        if name.endswith("attention.wq.weight"):
            w = permute_rotary(w, params["n_heads"])
        if name.endswith("attention.wk.weight"):
            w = permute_rotary(w, kv_heads_for_wk or params["n_kv_heads"])
        new = name.replace("tok_embeddings", "embed_tokens")
        for a, b in ren.items():
            new = new.replace(a, b)
        out[prefix + new] = w
    return out


def hf_text_config(params: dict):
    from transformers import MistralConfig
    return MistralConfig(
        vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params["n_kv_heads"], head_dim=params["head_dim"],
        max_position_embeddings=params.get("max_position_embeddings", 131072),
        rms_norm_eps=params["norm_eps"], rope_theta=params["rope_theta"], sliding_window=None,
        tie_word_embeddings=False, attn_implementation="eager")


def hf_text_model(weights: dict, params: dict, **convert):
    """transformers' MistralForCausalLM holding the same weights, float32, eval mode."""
    from transformers import MistralForCausalLM
    model = MistralForCausalLM(hf_text_config(params)).eval()
    missing, unexpected = model.load_state_dict(native_to_hf_text(weights, params, **convert), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model
