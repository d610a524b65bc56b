"""Tiny random checkpoints in the official on-disk layouts, and the bridge to transformers.

The tiny text model keeps the awkward parts of the real one: GQA 4:1, head_dim != dim / n_heads,
rope_theta 1e9, an untied output head. The tiny vision tower too: a width (64) other than the text
model's (48), 4 heads of 16 (2-D RoPE with 4 row and 4 column pairs), 14-pixel patches merged 2 x 2.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# params.json of Mistral Small 3.1 / 3.2 (the official repositories; docs/model.md, "The official files")
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

# Magistral Small's params.json: the same text model, no vision encoder.
REAL_TEXT_PARAMS = {k: v for k, v in REAL_PARAMS.items() if k != "vision_encoder"}

TINY_PARAMS = {
    "dim": 48, "n_layers": 2, "head_dim": 8, "hidden_dim": 96, "n_heads": 8, "n_kv_heads": 2,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 1000, "max_position_embeddings": 4096,
}

TINY_VISION_PARAMS = {**TINY_PARAMS, "vision_encoder": {
    **REAL_PARAMS["vision_encoder"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4,
}}

IMG, IMG_BREAK, IMG_END = 10, 12, 13


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


def real_vision_shapes(p: dict = REAL_PARAMS) -> dict:
    """Name -> shape of every vision tensor (tower, pre-projector norm, merger, adapter) of the official
    consolidated.safetensors."""
    v = p["vision_encoder"]
    c, hidden, m, d = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"], p["dim"]
    shapes = {"vision_encoder.patch_conv.weight": (c, v["num_channels"], v["patch_size"], v["patch_size"]),
              "vision_encoder.ln_pre.weight": (c,)}
    for i in range(v["num_hidden_layers"]):
        pre = f"vision_encoder.transformer.layers.{i}."
        shapes.update({pre + f"attention.{w}.weight": (c, c) for w in ("wq", "wk", "wv", "wo")})
        shapes.update({
            pre + "attention_norm.weight": (c,),
            pre + "ffn_norm.weight": (c,),
            pre + "feed_forward.w1.weight": (hidden, c),
            pre + "feed_forward.w2.weight": (c, hidden),
            pre + "feed_forward.w3.weight": (hidden, c),
        })
    shapes.update({"pre_mm_projector_norm.weight": (c,), "patch_merger.merging_layer.weight": (c, c * m * m),
                   "vision_language_adapter.w_in.weight": (d, c), "vision_language_adapter.w_out.weight": (d, d)})
    if v["adapter_bias"]:
        shapes.update({"vision_language_adapter.w_in.bias": (d,), "vision_language_adapter.w_out.bias": (d,)})
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
    shapes = real_text_shapes(params)
    if "vision_encoder" in params:
        shapes.update(real_vision_shapes(params))
    weights = random_weights(shapes, seed)
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


VISION_PREFIXES = ("vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.")


def native_to_hf_mistral3(weights: dict, params: dict, permute_vision_qk: bool = True) -> dict:
    """Native keys -> Mistral3ForConditionalGeneration's state dict (the names newer transformers keeps in
    memory: model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head).
    As the official conversion does, the tower's wq / wk are permuted to rotate-half per vision head;
    permute_vision_qk False leaves them native, for a negative control."""
    vision = {k: w for k, w in weights.items() if k.startswith(VISION_PREFIXES)}
    out = native_to_hf_text({k: w for k, w in weights.items() if k not in vision}, params,
                            prefix="model.language_model.")
    ren = [("vision_encoder.", "model.vision_tower."),
           ("pre_mm_projector_norm.", "model.multi_modal_projector.norm."),
           ("patch_merger.", "model.multi_modal_projector.patch_merger."),
           ("vision_language_adapter.w_in.", "model.multi_modal_projector.linear_1."),
           ("vision_language_adapter.w_out.", "model.multi_modal_projector.linear_2."),
           ("attention.wq.", "attention.q_proj."), ("attention.wk.", "attention.k_proj."),
           ("attention.wv.", "attention.v_proj."), ("attention.wo.", "attention.o_proj."),
           ("feed_forward.w1.", "feed_forward.gate_proj."), ("feed_forward.w2.", "feed_forward.down_proj."),
           ("feed_forward.w3.", "feed_forward.up_proj.")]
    for name, w in vision.items():
        if permute_vision_qk and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = permute_rotary(w, params["vision_encoder"]["num_attention_heads"])
        for a, b in ren:
            name = name.replace(a, b)
        out[name] = w
    return out



def hf_mistral3_config(params: dict):
    """Mistral3Config for native params; its defaults are wrong for this model (tied embeddings, a GELU
    tower), so everything is given."""
    from transformers import Mistral3Config, PixtralVisionConfig
    v = params["vision_encoder"]
    vision = PixtralVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
        num_channels=v["num_channels"], image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_act="silu", rope_parameters={"rope_theta": v["rope_theta"], "rope_type": "axial"})
    return Mistral3Config(
        text_config=hf_text_config(params), vision_config=vision, image_token_index=v["image_token_id"],
        spatial_merge_size=v["spatial_merge_size"], multimodal_projector_bias=v["adapter_bias"],
        projector_hidden_act="gelu", vision_feature_layer=-1, tie_word_embeddings=False,
        attn_implementation="eager")


def hf_mistral3_model(weights: dict, params: dict, **convert):
    """transformers' Mistral3ForConditionalGeneration holding the same weights, float32, eval mode."""
    from transformers import Mistral3ForConditionalGeneration
    model = Mistral3ForConditionalGeneration(hf_mistral3_config(params)).eval()
    missing, unexpected = model.load_state_dict(native_to_hf_mistral3(weights, params, **convert), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def hf_pixels(images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel tensors [3, H, W] of different sizes -> transformers' pixel_values [n, 3, H max, W max]
    (zero-padded at the bottom and right) and image_sizes [n, 2] (H, W in pixels)."""
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    pixels = torch.zeros(len(images), 3, height, width)
    for i, im in enumerate(images):
        pixels[i, :, :im.shape[1], :im.shape[2]] = im
    return pixels, torch.tensor([list(im.shape[1:]) for im in images])


def image_tokens(rows: int, cols: int) -> list[int]:
    """The chat layout of an image of rows x cols image tokens: [IMG] * cols + [IMG_BREAK] per row,
    the last [IMG_BREAK] replaced by [IMG_END]."""
    return ([IMG] * cols + [IMG_BREAK]) * (rows - 1) + [IMG] * cols + [IMG_END]


def forward_in_chunks(model, tokens: torch.Tensor, ends: list[int], images: list | None = None) -> torch.Tensor:
    """The logits [B, S, V] of tokens [B, S] fed through the KV cache chunk by chunk: chunk i runs up to
    position ends[i] (the last end is S), with images[i], the images of its [IMG] tokens, if given.
    Chunks of one token are decoding steps. The cache is dropped afterwards."""
    images = images or [None] * len(ends)
    model.setup_cache(batch_size=tokens.shape[0], max_seq_len=64)
    try:
        starts = [0] + ends[:-1]
        return torch.cat([model(tokens[:, a:b], input_pos=torch.arange(a, b), images=im)
                          for a, b, im in zip(starts, ends, images)], dim=1)
    finally:
        model.setup_cache(1, 1)
