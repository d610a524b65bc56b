"""The vision side of Mistral Small 3.x: the Pixtral-style tower, the patch merger and the adapter,
and the model that puts their image features in place of the [IMG] tokens' embeddings.

Pixels come from images.py (loading and preprocessing, checked against mistral-common); the blocks
and the text model come from model.py, which knows nothing of images: VisionLanguageModel extends
model.Transformer with the four vision parts under their official names (vision_encoder.*,
pre_mm_projector_norm.*, patch_merger.*, vision_language_adapter.*) and an embed() that fills the
[IMG] positions.
"""
from dataclasses import dataclass
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import nn

from images import cell_size, token_grid
from inputs import InputError
from model import ModelArgs, RMSNorm, Transformer, TransformerBlock, rope_frequencies

NORM_EPS = 1e-5   # every norm of the vision side (tower and projector); params.json does not give it


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
    # Checked against the tokenizer (checkpoint.check_tokenizer); Hugging Face's config.json lacks the last two.
    image_break_token_id: int | None = None
    image_end_token_id: int | None = None
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""
    max_image_size: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def cell(self) -> int:
        """Pixels per side of one image token (28)."""
        return cell_size(self.patch_size, self.spatial_merge_size)


# ---- the encoder -----------------------------------------------------------------------------
#
# Pixels [3, H, W] -> 14 x 14 patches -> a Pixtral-style transformer over the patches of each image
# (2-D RoPE; a patch sees every patch of its own image, none of the others) -> RMSNorm -> each
# 2 x 2 square of patches merged into one image token -> a GELU MLP into the text model's width. Shapes use
#     N patches of all images, C hidden_size, h x w patches of one image, m spatial_merge_size, D text dim.
# For Small 3.x: C 1024, 24 blocks of 16 heads of 64, m 2, D 5120; one image token per 28 x 28 pixels.


def rope_2d(h: int, w: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [h*w, Dh/2] for the h x w patches of an image, row-major. The patch at (row, col)
    turns its first Dh/4 pairs by row angles and its last Dh/4 pairs by column angles; rows take the
    even-indexed frequencies of the 1-D RoPE and columns the odd ones."""
    freqs = rope_frequencies(head_dim, theta).to(device)                          # [Dh/2]
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)   # [h*w]
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)              # [h*w]
    angles = torch.cat((rows[:, None] * freqs[0::2], cols[:, None] * freqs[1::2]), dim=-1)
    return angles.cos(), angles.sin()


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        heads = args.num_attention_heads
        # The text model's block: no GQA here, no causal order, and the norms use NORM_EPS.
        self.layers = nn.ModuleList(
            TransformerBlock(args.hidden_size, heads, heads, args.head_dim, args.intermediate_size, NORM_EPS,
                             causal=False)
            for _ in range(args.num_hidden_layers))

    def forward(self, x, cos, sin):
        # x [1, h*w, C]: the patches of one image, each seeing all the others; cos, sin [h*w, Dh/2]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class VisionEncoder(nn.Module):
    """The tower: patch convolution (no bias), ln_pre, then the transformer; no final norm. (The names
    follow the checkpoint's keys, vision_encoder.transformer.layers.N: mistral-inference calls the tower
    VisionTransformer and this stack VisionTransformerBlocks.)"""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, eps=NORM_EPS)
        self.transformer = VisionTransformer(args)

    def token_grids(self, images: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Check pixel tensors [3, H, W] (one per image) and return each image's grid of image tokens
        (rows, cols); a bad image is named by its index."""
        a = self.args
        if not isinstance(images, (list, tuple)):
            raise InputError(f"images: expected a list of pixel tensors [3, H, W], got {type(images).__name__}")
        grids = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != a.num_channels:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise InputError(f"image {i}: expected pixels [{a.num_channels}, H, W], got {got}")
            if not image.is_floating_point():
                raise InputError(f"image {i}: expected normalized float pixels, got {image.dtype} "
                                 f"(preprocess_image makes them)")
            _, height, width = image.shape
            if height == 0 or width == 0 or height % a.cell or width % a.cell:
                raise InputError(f"image {i}: size {height}x{width} (H x W) is not a multiple of {a.cell} pixels "
                                 f"(patch {a.patch_size} x merge {a.spatial_merge_size}); preprocess_image "
                                 f"resizes to one")
            grids.append(token_grid(image, a.patch_size, a.spatial_merge_size))
        return grids

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Pixels [3, H, W] of each image (checked by token_grids) -> the features [N, C] of all their
        patches, image after image, each row-major; and each image's grid of patches (h, w).

        A patch attends to the patches of its own image only (the official code runs all images as one
        sequence under a block-diagonal mask), and every other step works patch by patch: so each image
        goes through the tower on its own, the same result without an [N, N] mask."""
        weight = self.patch_conv.weight
        features, patch_grids = [], []
        for image in images:
            patches = self.patch_conv(image.to(weight.device, weight.dtype)[None])[0]   # [C, h, w]
            _, h, w = patches.shape
            # contiguous: a transposed view would keep its strides through the norm into every product
            x = self.ln_pre(patches.flatten(1).T.contiguous())                         # [h*w, C]
            cos, sin = rope_2d(h, w, self.args.head_dim, self.args.rope_theta, x.device)
            features.append(self.transformer(x[None], cos, sin)[0])
            patch_grids.append((h, w))
        return torch.cat(features), patch_grids


def merge_patches(x: torch.Tensor, h: int, w: int, m: int) -> torch.Tensor:
    """The patches [h*w, C] of one image -> [(h/m) * (w/m), C*m*m]: one row per m x m square, squares
    row-major. Within a square the features are channel-major, index c*m*m + i*m + j for the patch at
    (i, j) of the square: the order of torch's unfold, which the merging layer was trained on."""
    C = x.shape[-1]
    x = x.view(h // m, m, w // m, m, C)                                   # [square row, i, square col, j, C]
    return x.permute(0, 2, 4, 1, 3).reshape(h // m * (w // m), C * m * m)


class PatchMerger(nn.Module):
    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(dim * merge ** 2, dim, bias=False)

    def forward(self, x: torch.Tensor, patch_grids: list[tuple[int, int]]) -> torch.Tensor:
        # x [N, C] with each image's patch grid (h, w) -> [N / m^2, C]
        parts = x.split([h * w for h, w in patch_grids])
        merged = [merge_patches(part, h, w, self.merge) for part, (h, w) in zip(parts, patch_grids)]
        return self.merging_layer(torch.cat(merged))


class VisionLanguageAdapter(nn.Module):
    """From the tower's width C to the text width D: w_out(gelu(w_in x)), the exact (erf) GELU."""

    def __init__(self, dim: int, text_dim: int, bias: bool):
        super().__init__()
        self.w_in = nn.Linear(dim, text_dim, bias=bias)
        self.w_out = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x)))

# ---- the model with images --------------------------------------------------------------------

class VisionLanguageModel(Transformer):
    """The text transformer whose [IMG] token embeddings are replaced by the features of the images."""

    def __init__(self, args: ModelArgs, vision: VisionArgs):
        super().__init__(args)
        self.vision_args = vision
        self.vision_encoder = VisionEncoder(vision)
        self.pre_mm_projector_norm = RMSNorm(vision.hidden_size, eps=NORM_EPS)
        self.patch_merger = PatchMerger(vision.hidden_size, vision.spatial_merge_size)
        self.vision_language_adapter = VisionLanguageAdapter(vision.hidden_size, args.dim, vision.adapter_bias)

    def embed(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D]: the token embeddings, with the image features in place of the
        [IMG] tokens. The images fill the [IMG] tokens in order, row after row of the batch."""
        h = self.tok_embeddings(tokens)                                 # [B, S, D]
        images = [] if images is None else images
        is_image = tokens == self.vision_args.image_token_id           # [B, S]
        _check_image_tokens(is_image, self.vision_encoder.token_grids(images))   # bad input: names the image
        if not images:
            return h
        return h.masked_scatter(is_image[..., None], self._features(images).to(h.dtype))

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The embeddings [n_image_tokens, D] that replace the [IMG] tokens of `images`, pixel tensors
        [3, H, W] (H, W multiples of the 28-pixel cell) in prompt order: each image's tokens row-major,
        image after image."""
        self.vision_encoder.token_grids(images)
        return self._features(images)

    def _features(self, images: list[torch.Tensor]) -> torch.Tensor:
        x, patch_grids = self.vision_encoder(images)                        # [N patches, C], each (h, w)
        x = self.patch_merger(self.pre_mm_projector_norm(x), patch_grids)   # [n_image_tokens, C]
        return self.vision_language_adapter(x)                              # [n_image_tokens, D]


def _check_image_tokens(is_image: torch.Tensor, token_grids: list[tuple[int, int]]) -> None:
    """The chat layout writes an image of rows x cols image tokens as `rows` runs of `cols` [IMG] tokens
    (runs end at [IMG_BREAK], the last at [IMG_END]). Check that the runs in is_image [B, S] are those
    of the images' grids, in order, so that no image is missing, left over or of another shape."""
    runs = [len(list(run)) for row in is_image.tolist() for flag, run in groupby(row) if flag]
    start = 0
    for i, (rows, cols) in enumerate(token_grids):
        found = runs[start:start + rows]
        if not found:
            raise InputError(f"image {i}: no [IMG] tokens left for it: the prompt has {sum(runs)} [IMG] tokens "
                             f"for {len(token_grids)} images")
        if found != [cols] * rows:
            raise InputError(f"image {i}: its {rows} x {cols} image tokens need {rows} runs of {cols} [IMG] tokens, "
                             f"the prompt has runs of {found} there")
        start += rows
    if start < len(runs):
        raise InputError(f"the prompt has {sum(runs[start:])} [IMG] tokens after those of the {len(token_grids)} "
                         f"image(s) given: image {len(token_grids)} is missing")
