"""The Mistral Small 3.x text transformer and its KV cache.

A dense decoder: token embedding -> n_layers pre-norm blocks (GQA attention with RoPE, SwiGLU
feed-forward) -> RMSNorm -> untied output head. Shapes use
    B batch, S new tokens, T cache length, L cache positions read, D dim, H query heads,
    K kv heads, Dh head_dim, V vocab.
A step through the KV cache gives the positions of its new tokens: one list for the whole batch, [S]
(a prompt, or one answer's next token), or one list per sequence, [B, S] (answers of different lengths
decoded together, batch.py). RoPE angles, cache writes and the attention mask follow either.
For the real 24B model: D 5120, 40 layers, H 32, K 8, Dh 128 (so H * Dh = 4096 != D), V 131072.

This module knows nothing of files or images: load.py reads the checkpoints (params.json or
config.json, safetensors, GGUF) and builds the model; vision.py extends it with the vision tower,
whose features replace the embeddings of the [IMG] tokens.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inputs import InputError


@dataclass
class ModelArgs:
    """The text model's part of params.json. head_dim is explicit: n_heads * head_dim != dim."""
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
    """Rotate ADJACENT pairs (2i, 2i+1) of x [B, S, heads, Dh] by angles [S, Dh/2] or, one row of
    positions per sequence, [B, S, Dh/2] (native layout)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)   # [B, S, heads, Dh/2] each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)          # broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def local_rows(w: torch.Tensor) -> int:
    """The rows of weight w that this process holds: all of them, or, for a weight split by rows
    over several processes (a DTensor, see parallel.py, whose .shape is the whole), its own."""
    return w.to_local().shape[0] if hasattr(w, "to_local") else w.shape[0]


class KVCache(nn.Module):
    """Keys and values of one layer for [B, K, T] positions, written in place at the given positions.
    A forward over b <= B sequences uses the first b rows."""

    def __init__(self, batch: int, length: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # pos [S] or [b, S]; k, v [b, K, S, Dh] into rows 0..b-1 -> the whole buffers [B, K, T, Dh]
        b = k.shape[0]
        if pos.dim() == 1:
            self.k[:b].index_copy_(2, pos, k)
            self.v[:b].index_copy_(2, pos, v)
        else:   # row r's S tokens go to its own positions pos[r]
            rows = torch.arange(b, device=pos.device)[:, None]             # [b, 1]
            self.k[rows, :, pos] = k.transpose(1, 2)                       # [b, S, K, Dh]
            self.v[rows, :, pos] = v.transpose(1, 2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, causal: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.causal = causal   # the text model; the vision tower's patches all see each other
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, pos=None):
        """x [B, S, D]; cos, sin [S, Dh/2] or [B, S, Dh/2] -> [B, S, D].
        pos [S] or [B, S]: the positions of x, where its keys and values are written into the cache.
        mask bool [S, L] or [B, 1, S, L] (True = attend): attend to the first L cache positions. None:
        attend to the keys of x alone (causal in the text model, every patch in the tower)."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim)             # [B, S, H, Dh]
        k = self.wk(x).view(B, S, -1, self.head_dim)             # [B, S, K, Dh]
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))        # [B, heads, S, Dh]
        if pos is not None:
            cached_k, cached_v = self.cache.update(pos, k, v)   # [B, K, T, Dh]
            if mask is not None:
                L = mask.shape[-1]
                k, v = cached_k[:B, :, :L], cached_v[:B, :, :L]   # [B, K, L, Dh]
        # enable_gqa: kv head j serves query heads j*H/K .. (j+1)*H/K - 1, without copying k and v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                             enable_gqa=q.shape[1] != k.shape[1])
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

    def forward(self, x, cos, sin, mask=None, pos=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, pos)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- the model

TEXT_ONLY_ERROR = "this model is text-only (its checkpoint has no vision encoder): it cannot take images"


class Transformer(nn.Module):
    # NOTE: load.py builds the model under torch.device("meta") (no memory) and then assigns the
    # weights read from disk, so any tensor made here is a placeholder until setup_cache() makes it.
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.norm_eps)
            for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                collect_hidden: list | None = None, images: list[torch.Tensor] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> float32 logits [B, S, V].

        input_pos None: a plain causal forward over positions 0..S-1, no cache.
        input_pos [S]: the positions of `tokens` in the sequence; keys and values are written to the
        cache made by setup_cache() and attention sees every cached position up to its own. [B, S]: the
        positions of each sequence (row b of the batch is row b of the cache).
        collect_hidden: if a list is given, the hidden state [B, S, D] after each block is appended to it.
        images: pixel tensors [3, H, W], one per image whose [IMG] tokens are among `tokens` (only a
        vision.VisionLanguageModel takes them).
        last_only: the logits of the last position only, [B, 1, V]: all that generating needs (the
        output head over every position would be most of a prefill's work for a small model).
        """
        kv_len = None if input_pos is None else int(input_pos.max()) + 1
        return self.forward_embeddings(self.embed(tokens, images), input_pos, collect_hidden, last_only, kv_len)

    def forward_embeddings(self, h: torch.Tensor, input_pos: torch.Tensor | None = None,
                           collect_hidden: list | None = None, last_only: bool = False,
                           kv_len: int | None = None) -> torch.Tensor:
        """forward() from the embeddings h [B, S, D] on. A decoding step enters here with
        tok_embeddings(token): it needs nothing from the host.
        kv_len: attention reads the first kv_len cache positions (at least max(input_pos) + 1);
        None reads the whole cache, masked: more reading, but the same shapes at every step, which
        a compiled step needs."""
        if input_pos is None:
            cos, sin = rope_table(torch.arange(h.shape[1], device=h.device), self.args.head_dim, self.args.rope_theta)
            mask = None                                                               # causal over h
        elif self.layers[0].attention.cache is None:
            raise InputError("input_pos given but no cache: call model.setup_cache(batch, max_seq_len) first")
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]             # [(B,) S, Dh/2]
            mask = self.cache_mask(input_pos, kv_len)                                 # [S, L], [B, 1, S, L] or None
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos)
            if collect_hidden is not None:
                collect_hidden.append(h)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def cache_mask(self, input_pos: torch.Tensor, kv_len: int | None) -> torch.Tensor | None:
        """Which of the first L cache positions (L = kv_len, or the whole cache) each new token attends
        to: bool [S, L], True where the cache position is at most the token's own. The scores of S new
        tokens against L cached ones form an [S, L] matrix, and a token at position p must see the
        positions 0..p and nothing after (those hold another answer's keys, or nothing yet).
        Positions per sequence, input_pos [B, S]: [B, 1, S, L], one matrix per sequence (for all heads).
        None for a first chunk (positions 0..S-1): it has no past, so causal attention over its own keys
        is the same and lets attention skip the masked half. (One host read per prefill; a decoding
        step, S = 1, never reads.)"""
        if input_pos.dim() == 1 and input_pos.shape[0] > 1 and int(input_pos[0]) == 0:
            return None
        mask = self.cache_pos[:kv_len] <= input_pos[..., None]                       # [(B,) S, L]
        return mask if input_pos.dim() == 1 else mask[:, None]

    def embed(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [B, S] -> their embeddings [B, S, D]. A text model takes no images."""
        if images is not None and not (isinstance(images, (list, tuple)) and not images):
            raise InputError(TEXT_ONLY_ERROR)
        return self.tok_embeddings(tokens)

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        raise InputError(TEXT_ONLY_ERROR)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate a KV cache for `batch_size` sequences of up to `max_seq_len` tokens (once), with the
        tables that every step through it reads: RoPE's cos and sin per position, and the positions
        that the attention mask compares with."""
        if max_seq_len > self.args.max_position_embeddings:
            raise InputError(f"max_seq_len {max_seq_len} exceeds the model's context of "
                             f"{self.args.max_position_embeddings} tokens")
        w = self.output.weight
        cache = self.layers[0].attention.cache
        if cache is not None and cache.k.shape[0] == batch_size and cache.k.shape[2] == max_seq_len \
                and cache.k.dtype == w.dtype and cache.k.device == w.device:
            # Keep the same buffers (a compiled step's CUDA graph holds their addresses). What they hold
            # is never read: a position attends to positions up to its own, all written before it.
            return
        for layer in self.layers:
            # The kv heads this process computes: all of them, or its share under tensor parallel.
            n_kv_heads = local_rows(layer.attention.wk.weight) // self.args.head_dim
            layer.attention.cache = KVCache(batch_size, max_seq_len, n_kv_heads, self.args.head_dim,
                                            w.dtype, w.device)
        # Buffers, not plain attributes: a CUDA graph reads buffers in place, other inputs it copies.
        positions = torch.arange(max_seq_len, device=w.device)                                # [T]
        cos, sin = rope_table(positions, self.args.head_dim, self.args.rope_theta)            # [T, Dh/2]
        self.register_buffer("cache_pos", positions, persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
