"""The Mistral Small 3.x transformer, its KV cache, and loading of the official checkpoints.

A dense decoder: token embedding -> n_layers pre-norm blocks (GQA attention with RoPE, SwiGLU
feed-forward) -> RMSNorm -> untied output head. Shapes use
    B batch, S new tokens, T cache length, D dim, H query heads, K kv heads, Dh head_dim, V vocab.
For the real 24B model: D 5120, 40 layers, H 32, K 8, Dh 128 (so H * Dh = 4096 != D), V 131072.
Images (vision.py turns their pixels into embeddings) replace the embeddings of the [IMG] tokens.
"""
import json
import re
import warnings
from dataclasses import MISSING, dataclass, fields
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn


# ----------------------------------------------------------------------------- configuration

@dataclass
class VisionArgs:
    """The `vision_encoder` block of params.json (Pixtral-style tower, patch merger, adapter)."""
    hidden_size: int
    num_channels: int
    image_size: int
    patch_size: int
    rope_theta: float
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_token_id: int
    # The model itself uses only image_token_id; Hugging Face's config.json lacks the other two.
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""
    max_image_size: int | None = None


@dataclass
class ModelArgs:
    """params.json of the native checkpoint. head_dim is explicit: n_heads * head_dim != dim."""
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int = 131072  # older params.json omit it; the model cards give 128k
    vision: VisionArgs | None = None

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        params = dict(params)
        vision = params.pop("vision_encoder", None)
        args = _build(cls, params, source, skip={"vision"})
        if vision is not None:
            args.vision = v = _build(VisionArgs, vision, f"{source}: vision_encoder")
            if v.mm_projector_id != "patch_merge" or not v.add_pre_mm_projector_layer_norm:
                raise ValueError(f"{source}: vision_encoder with mm_projector_id {v.mm_projector_id!r} and "
                                 f"add_pre_mm_projector_layer_norm {v.add_pre_mm_projector_layer_norm} is not "
                                 f"supported (this implementation has the Small 3.x patch merger and its norm)")
        return args


# Fields that change the math and that this implementation does not have: refuse, never ignore.
UNSUPPORTED = {"moe", "sliding_window", "rope_scaling", "yarn", "quantization", "lora"}


def _build(cls, values: dict, source: str, skip: frozenset = frozenset()):
    """Construct dataclass `cls` from a dict: missing required fields are errors, unknown ones warnings."""
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    missing = [n for n, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and n not in values]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    for name, value in values.items():
        if name in UNSUPPORTED and value:
            raise ValueError(f"{source}: field {name!r} = {value!r} is not supported by this implementation")
        if name not in known and name not in UNSUPPORTED:
            warnings.warn(f"{source}: ignoring unknown field {name!r}")
    return cls(**{n: values[n] for n in known if n in values})


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics in float32 whatever the weights' dtype, then back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[Dh/2] inverse frequencies theta^(-2i/Dh), in float32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_table(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh/2] of the angles position * frequency, for positions [S], in float32."""
    angles = positions.float()[:, None] * rope_frequencies(head_dim, theta).to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ADJACENT pairs (2i, 2i+1) of x [B, S, heads, Dh] by angles [S, Dh/2] (native layout)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)   # [B, S, heads, Dh/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]              # broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one layer for [B, K, T] positions, written in place at the given positions."""

    def __init__(self, batch: int, length: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # pos [S]; k, v [B, K, S, Dh] -> the whole buffers [B, K, T, Dh]
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal   # the text model; the vision tower's patches all see each other
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, pos=None):
        # x [B, S, D]; cos, sin [S, Dh/2]; mask: bool [S, L] (True = attend) over the first L cache positions,
        # or None: causal (or, if not self.causal, full) attention over x alone
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))        # [B, heads, S, Dh]
        if self.cache is not None and pos is not None:
            cached_k, cached_v = self.cache.update(pos, k, v)   # [B, K, T, Dh]
            if mask is not None:                                # else a first chunk: no past to read
                L = mask.shape[-1]                              # the cache positions the mask covers
                k, v = cached_k[:, :, :L], cached_v[:, :, :L]
        # enable_gqa: kv head j serves query heads j*H/K .. (j+1)*H/K - 1, without copying k and v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block, shared by the text model and the vision tower."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, hidden_dim, norm_eps, causal=True):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, head_dim, causal)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x, cos, sin, mask, pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- the model

TEXT_ONLY = "this model is text-only (its checkpoint has no vision encoder): it cannot take images"


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.norm_eps)
            for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.vision_encoder = None
        if args.vision is not None:
            # vision.py builds on the blocks above, so it can only be imported once this module is loaded
            from vision import PatchMerger, VisionEncoder, VisionLanguageAdapter
            v = args.vision
            self.vision_encoder = VisionEncoder(v)
            self.pre_mm_projector_norm = RMSNorm(v.hidden_size, eps=1e-5)
            self.patch_merger = PatchMerger(v.hidden_size, v.spatial_merge_size)
            self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, args.dim, v.adapter_bias)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate a KV cache for `batch_size` sequences of up to `max_seq_len` tokens (once), with the
        tables that every step through it reads: RoPE's cos and sin per position, and the positions
        that the attention mask compares with."""
        if max_seq_len > self.args.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context of "
                             f"{self.args.max_position_embeddings} tokens")
        w = self.output.weight
        cache = self.layers[0].attention.cache
        if cache is not None and cache.k.shape[0] == batch_size and cache.k.shape[2] == max_seq_len \
                and cache.k.dtype == w.dtype and cache.k.device == w.device:
            # Keep the same buffers (a compiled step's CUDA graph holds their addresses). What they hold
            # is never read: a position attends to positions up to its own, all written before it.
            return
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, max_seq_len, self.args.n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)
        # Buffers, not plain attributes: a CUDA graph reads buffers in place, other inputs it copies.
        positions = torch.arange(max_seq_len, device=w.device)                                # [T]
        cos, sin = rope_table(positions, self.args.head_dim, self.args.rope_theta)            # [T, Dh/2]
        self.register_buffer("cache_pos", positions, persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The embeddings [n_image_tokens, D] that replace the [IMG] tokens of `images`, pixel tensors
        [3, H, W] (H, W multiples of 28) in prompt order: each image's tokens row-major, image after image."""
        if self.vision_encoder is None:
            raise ValueError(TEXT_ONLY)
        x, grids = self.vision_encoder(images)                        # [N patches, C], each image's (h, w)
        x = self.patch_merger(self.pre_mm_projector_norm(x), grids)   # [n_image_tokens, C]
        return self.vision_language_adapter(x)                        # [n_image_tokens, D]

    def embed(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D]: the token embeddings, with the image features in place of the
        [IMG] tokens. The images fill the [IMG] tokens in order, row after row of the batch."""
        h = self.tok_embeddings(tokens)                               # [B, S, D]
        images = [] if images is None else images
        if self.vision_encoder is None:
            if isinstance(images, (list, tuple)) and not images:
                return h
            raise ValueError(TEXT_ONLY)
        is_image = tokens == self.args.vision.image_token_id          # [B, S]
        _check_image_tokens(is_image, self.vision_encoder.token_grids(images))
        if not images:
            return h
        return h.masked_scatter(is_image[..., None], self.image_features(images).to(h.dtype))

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, hidden: list | None = None,
                images: list[torch.Tensor] | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> float32 logits [B, S, V].

        input_pos None: a plain causal forward over positions 0..S-1, no cache.
        input_pos [S]: the positions of `tokens` in the sequence; keys and values are written to the
        cache made by setup_cache() and attention sees every cached position up to its own.
        hidden: if a list is given, the hidden state [B, S, D] after each block is appended to it.
        images: pixel tensors [3, H, W], one per image whose [IMG] tokens are among `tokens`, in their
        order (see embed); H and W are multiples of 28 (vision.preprocess_image makes them).
        last_only: the logits of the last position only, [B, 1, V]: all that generating needs (the
        output head over every position would be most of a prefill's work for a small model).
        """
        length = None if input_pos is None else int(input_pos.max()) + 1
        return self.forward_embeddings(self.embed(tokens, images), input_pos, hidden, last_only, length)

    def forward_embeddings(self, h: torch.Tensor, input_pos: torch.Tensor | None = None, hidden: list | None = None,
                           last_only: bool = False, length: int | None = None) -> torch.Tensor:
        """forward() from the embeddings h [B, S, D] on. A decoding step enters here with
        tok_embeddings(token): it needs nothing from the host.
        length: attention reads the first `length` cache positions (at least max(input_pos) + 1);
        None reads the whole cache, masked: more reading, but the same shapes at every step, which
        a compiled step needs."""
        S = h.shape[1]
        if input_pos is None:
            cos, sin = rope_table(torch.arange(S, device=h.device), self.args.head_dim, self.args.rope_theta)
            mask = None                                                               # causal
        elif self.layers[0].attention.cache is None:
            raise ValueError("input_pos given but no cache: call model.setup_cache(batch, max_seq_len) first")
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]             # [S, Dh/2]
            mask = self.cache_pos[:length] <= input_pos[:, None]                      # [S, L]
            if S > 1 and int(input_pos[0]) == 0:
                # A first chunk (positions 0..S-1) has no past: causal attention over its own keys is
                # the same and lets attention skip the masked half. (One host read per prefill; a
                # decoding step, S = 1, never reads.)
                mask = None
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos)
            if hidden is not None:
                hidden.append(h)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()


def _check_image_tokens(is_image: torch.Tensor, grids: list[tuple[int, int]]) -> None:
    """The chat layout writes an image of rows x cols image tokens as `rows` runs of `cols` [IMG] tokens
    (runs end at [IMG_BREAK], the last at [IMG_END]). Check that the runs in is_image [B, S] are those
    of the images' grids, in order, so that no image is missing, left over or of another shape."""
    runs = [len(list(run)) for row in is_image.tolist() for flag, run in groupby(row) if flag]
    start = 0
    for i, (rows, cols) in enumerate(grids):
        found = runs[start:start + rows]
        if not found:
            raise ValueError(f"image {i}: no [IMG] tokens left for it: the prompt has {sum(runs)} [IMG] tokens "
                             f"for {len(grids)} images")
        if found != [cols] * rows:
            raise ValueError(f"image {i}: its {rows} x {cols} image tokens need {rows} runs of {cols} [IMG] tokens, "
                             f"the prompt has runs of {found} there")
        start += rows
    if start < len(runs):
        raise ValueError(f"the prompt has {sum(runs[start:])} [IMG] tokens after those of the {len(grids)} "
                         f"image(s) given: image {len(grids)} is missing")


# ----------------------------------------------------------------------------- loading

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # invalid JSON or invalid UTF-8
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _hf_args(config: dict, source: str) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (MistralForCausalLM or Mistral3ForConditionalGeneration)."""
    text = config.get("text_config", config)
    theta = text.get("rope_theta", (text.get("rope_parameters") or {}).get("rope_theta"))
    names = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "head_dim": "head_dim",
             "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "vocab_size": "vocab_size",
             "max_position_embeddings": "max_position_embeddings"}
    values = {ours: text[theirs] for ours, theirs in names.items() if text.get(theirs) is not None}
    if theta is not None:
        values["rope_theta"] = theta
    values.setdefault("head_dim", values.get("dim", 0) // max(values.get("n_heads", 1), 1))
    args = _build(ModelArgs, values, source, skip={"vision"})
    if "vision_config" in config:
        args.vision = _hf_vision_args(config, source)
    return args


def _hf_vision_args(config: dict, source: str) -> VisionArgs:
    """VisionArgs from the config.json of a Mistral3ForConditionalGeneration."""
    vision = config["vision_config"]
    # transformers can configure other activations or feature layers; the model has exactly these.
    for key, value, want in (("vision_config.hidden_act", vision.get("hidden_act"), "silu"),
                             ("projector_hidden_act", config.get("projector_hidden_act"), "gelu"),
                             ("vision_feature_layer", config.get("vision_feature_layer"), -1)):
        if value != want:
            raise ValueError(f"{source}: {key} is {value!r}; this model needs {want!r}")
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


def _rotary_heads(name: str, args: ModelArgs) -> int:
    """The head count of the Hugging Face permutation of wq / wk `name` (the vision tower has no GQA:
    its wk is permuted by its query heads)."""
    if name.startswith("vision_encoder."):
        return args.vision.num_attention_heads
    return args.n_heads if ".wq." in name else args.n_kv_heads


def checkpoint_files(folder: Path) -> tuple[str, list[Path], ModelArgs]:
    """The folder's layout ("native" or "hf"), its weight files and the model's arguments."""
    if (folder / "params.json").is_file():
        args = ModelArgs.from_params(read_json(folder / "params.json"), str(folder / "params.json"))
        files = sorted(folder.glob("consolidated*.safetensors"))
        layout = "native"
    elif (folder / "config.json").is_file():
        args = _hf_args(read_json(folder / "config.json"), str(folder / "config.json"))
        files = sorted(folder.glob("model*.safetensors"))
        layout = "hf"
    else:
        raise FileNotFoundError(f"{folder}: no params.json (native layout) or config.json (Hugging Face "
                                f"layout) found; expected an official Mistral checkpoint folder")
    if not files:
        expected = "consolidated.safetensors" if layout == "native" else "model-*.safetensors"
        raise FileNotFoundError(f"{folder}: no weights found, expected {expected}")
    return layout, files, args


def _read_tensors(files: list[Path], layout: str, args: ModelArgs, expected: dict, dtype, device) -> dict:
    """Read every tensor, renamed and un-permuted to the native layout, checked against `expected`
    (name -> shape), cast to dtype and placed on device one at a time."""
    state = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
            for key in keys:
                name = key if layout == "native" else hf_to_native_name(key)
                if name not in expected:
                    raise ValueError(f"{path}: unexpected tensor {key!r}: the model that the folder's "
                                     f"config describes has no such weight")
                t = _mapped_tensor(path, key)
                if tuple(t.shape) != expected[name]:
                    raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                     f"expected {expected[name]}")
                state[name] = _place(t, name, layout, args, dtype, device)
                del t   # unmaps a converted tensor's pages now
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); is the download complete?") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{files[0].parent}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def _mapped_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of the file, memory-mapped (nothing is read until used) through a map of its own:
    when the tensor is converted or moved, dropping it unmaps its pages, so that no more than one
    tensor is ever held twice while loading."""
    with safe_open(path, framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def _place(t: torch.Tensor, name: str, layout: str, args: ModelArgs, dtype, device) -> torch.Tensor:
    """A tensor as the model holds it: native row order, on device, in dtype. Tensors used as stored
    (same dtype, on the CPU, row-major) stay mapped: never copied."""
    if layout == "hf" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
        t = unpermute_rotary(t, _rotary_heads(name, args))
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


def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load an official checkpoint folder (params.json + consolidated*.safetensors, or the Hugging
    Face layout config.json + model-*.safetensors). dtype None keeps the stored dtype (bf16)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    layout, files, args = checkpoint_files(folder)
    # Build on the meta device (no memory) and then assign the tensors read from disk, so that
    # the weights are held once.
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state = _read_tensors(files, layout, args, expected, dtype, device)
    model.load_state_dict(state, assign=True)
    return model.eval()
