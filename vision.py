"""The vision side of Mistral Small 3.x: image loading and preprocessing, then the vision encoder.

Preprocessing equals mistral-common's image encoder, the reference for pixels:
  1. convert to RGB, compositing transparency onto white (no EXIF rotation);
  2. if the longer side exceeds max_image_size, shrink both sides by the same ratio (Python's round);
  3. cover that size with a grid of 28-pixel cells (patch 14 x merge 2): rows x cols image tokens;
  4. stretch the ORIGINAL image straight to rows*28 x cols*28 with OpenCV's bicubic (a = -0.75);
  5. scale to 0..1 and standardize with CLIP's mean and std; channels first, float32.
"""
import base64
import binascii
import http.client
import io
import math
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model import RMSNorm, TransformerBlock, VisionArgs, rope_frequencies

PATCH_SIZE = 14          # pixels per side of one vision patch
SPATIAL_MERGE_SIZE = 2   # patches per side merged into one image token: 28-pixel cells
MAX_IMAGE_SIZE = 1540    # longest side the encoder sees (55 cells)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # RGB, on 0..1 values
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CUBIC_A = -0.75          # OpenCV's bicubic kernel (Pillow's bicubic uses -0.5 and antialiases)
URL_TIMEOUT = 30.0       # seconds to fetch an http(s) image
USER_AGENT = "mistral-small-reference/1.0"  # some servers refuse urllib's default agent


# ---- loading ---------------------------------------------------------------------------------

def load_image(source) -> Image.Image:
    """A decoded PIL image from a PIL image, a path, or a file://, data:image/...;base64, or http(s) URL.

    Broken input fails here with a ValueError naming the source (FileNotFoundError for a missing
    file). Images above Pillow's decompression-bomb limit are refused, never decoded.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Path):
        return _decode(_read_file(source), str(source))
    if not isinstance(source, str):
        raise ValueError(f"cannot load an image from a {type(source).__name__}: "
                         "expected a PIL image, a path or a URL")
    if source.startswith("data:"):
        return _decode(_decode_data_url(source), _shorten(source))
    if source.startswith(("http://", "https://")):
        return _decode(_fetch(source), source)
    if source.startswith("file://"):
        return _decode(_read_file(_file_url_path(source)), source)
    return _decode(_read_file(Path(source)), source)


def _shorten(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except OSError as e:  # a folder, no permission, ...
        raise ValueError(f"cannot read image file {path}: {e.strerror or e}") from None


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url}: only local file:// URLs are supported")
    return Path(urllib.request.url2pathname(parts.path))  # undoes %-escapes such as %20


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"{_shorten(url)}: expected a data URL of the form data:image/...;base64,<data>")
    try:
        return base64.b64decode(payload)
    except binascii.Error as e:
        raise ValueError(f"{_shorten(url)}: the data URL payload is not valid base64 ({e})") from None


def _fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise ValueError(f"cannot fetch image {url}: {e}") from None


def _decode(data: bytes, name: str) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse the whole range.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so a truncated file fails here and not during preprocessing
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{name}: refusing a possible decompression bomb: {e}") from None
        except Image.UnidentifiedImageError:
            raise ValueError(f"{name} is not an image (Pillow cannot identify its format)") from None
        except Exception as e:  # decoders raise OSError, SyntaxError, EOFError, struct.error, ...
            raise ValueError(f"{name} is not a readable image: {e}") from None
    return image


# ---- preprocessing ---------------------------------------------------------------------------

def image_grid(width: int, height: int, patch_size: int = PATCH_SIZE,
               spatial_merge_size: int = SPATIAL_MERGE_SIZE, max_image_size: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
    """(rows, cols) of image tokens for a width x height image; the prompt holds rows * (cols + 1)
    tokens: each row is cols [IMG] then [IMG_BREAK], the last [IMG_BREAK] becoming [IMG_END]."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be at least 1 pixel")
    ratio = max(width, height) / max_image_size
    if ratio > 1:
        # Python's round (half to even), as the reference; a thin strip keeps at least 1 pixel
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    cell = patch_size * spatial_merge_size
    return math.ceil(height / cell), math.ceil(width / cell)


def preprocess_image(image: Image.Image, patch_size: int = PATCH_SIZE, spatial_merge_size: int = SPATIAL_MERGE_SIZE,
                     max_image_size: int = MAX_IMAGE_SIZE) -> torch.Tensor:
    """A PIL image -> [3, rows*cell, cols*cell] float32 normalized pixels (cell = 28 by default)."""
    rows, cols = image_grid(image.width, image.height, patch_size, spatial_merge_size, max_image_size)
    cell = patch_size * spatial_merge_size
    pixels = rgb_pixels(image)                                  # [h, w, 3] uint8
    # One resize from the original straight to the grid (stretching, no padding): the shrunk
    # size of image_grid only chooses the grid, it is never materialized.
    pixels = resize_bicubic(pixels, rows * cell, cols * cell)   # [H, W, 3] float32, 0..255
    return normalize_pixels(pixels)                             # [3, H, W]


def rgb_pixels(image: Image.Image) -> torch.Tensor:
    """[h, w, 3] uint8 RGB values; transparent areas become white."""
    try:
        if image.mode != "RGB":
            # Every mode goes through RGBA (palette transparency included), as in the reference.
            # Pillow clips 16- and 32-bit gray (I;16, I, F) to 0..255 here rather than rescaling it.
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba).convert("RGB")
        data = bytearray(image.tobytes())  # a writable copy, as torch.frombuffer wants
    except (ValueError, OSError) as e:  # a mode Pillow cannot convert, or a lazily opened broken file
        raise ValueError(f"cannot read the pixels of a {image.mode} {image.width}x{image.height} image: {e}") from None
    return torch.frombuffer(data, dtype=torch.uint8).view(image.height, image.width, 3)


def resize_bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[h, w, C] -> [height, width, C] float32, as OpenCV's INTER_CUBIC: kernel a = -0.75,
    half-pixel centers, edge pixels repeated, no antialiasing; one axis after the other."""
    return _resize_axis(_resize_axis(pixels, height, dim=0), width, dim=1)


def _resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    index, weight = _cubic_taps(x.shape[dim], size)                  # [size, 4] each
    shape = [-1 if d == dim else 1 for d in range(x.dim())]          # a weight per position along dim
    return sum(x.index_select(dim, index[:, k]) * weight[:, k].view(shape) for k in range(4))


def _cubic_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input indices and weights [n_out, 4] of the 4 neighbours of each output pixel."""
    # Output pixel centers in input coordinates, in float64 (as OpenCV's x86 builds, via Intel IPP):
    # float32 puts them up to 5e-4 pixel off on a 10000-pixel axis, moving noisy pixels by 2e-3.
    x = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    taps = x.floor()[:, None] + torch.arange(-1, 3)                  # [n_out, 4] positions
    index = taps.long().clamp(0, n_in - 1)                           # edge pixels repeat
    return index, _cubic_kernel(x[:, None] - taps).float()


def _cubic_kernel(d: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution with a = CUBIC_A; the taps lie within 2 pixels, where it reaches 0."""
    d, a = d.abs(), CUBIC_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1       # |d| <= 1
    far = a * (((d - 5) * d + 8) * d - 4)            # 1 < |d| <= 2
    return torch.where(d <= 1, near, far)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[H, W, 3] values 0..255 -> [3, H, W]: to 0..1, then standardized per channel."""
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((pixels / 255 - mean) / std).permute(2, 0, 1).contiguous()


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
        # The text model's block: no GQA here, no causal order, and the norms use eps 1e-5.
        self.layers = nn.ModuleList(
            TransformerBlock(args.hidden_size, heads, heads, args.hidden_size // heads, args.intermediate_size, 1e-5,
                             causal=False)
            for _ in range(args.num_hidden_layers))

    def forward(self, x, cos, sin):
        # x [1, h*w, C]: the patches of one image, each seeing all the others; cos, sin [h*w, Dh/2]
        for layer in self.layers:
            x = layer(x, cos, sin, None)
        return x


class VisionEncoder(nn.Module):
    """The tower: patch convolution (no bias), ln_pre, then the transformer; no final norm."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, eps=1e-5)
        self.transformer = VisionTransformer(args)

    def token_grids(self, images: list[torch.Tensor]) -> list[tuple[int, int]]:
        """Check pixel tensors [3, H, W] (one per image) and return each image's grid of image tokens
        (rows, cols); a bad image is named by its index."""
        a = self.args
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images: expected a list of pixel tensors [3, H, W], got {type(images).__name__}")
        step = a.patch_size * a.spatial_merge_size                    # pixels per image token side: 28
        grids = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != a.num_channels:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"image {i}: expected pixels [{a.num_channels}, H, W], got {got}")
            if not image.is_floating_point():
                raise ValueError(f"image {i}: expected normalized float pixels, got {image.dtype} "
                                 f"(preprocess_image makes them)")
            _, height, width = image.shape
            if height == 0 or width == 0 or height % step or width % step:
                raise ValueError(f"image {i}: size {height}x{width} (H x W) is not a multiple of {step} pixels "
                                 f"(patch {a.patch_size} x merge {a.spatial_merge_size}); preprocess_image "
                                 f"resizes to one")
            grids.append((height // step, width // step))
        return grids

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Pixels [3, H, W] of each image -> the features [N, C] of all their patches, image after image,
        each row-major; and each image's grid of patches (h, w).

        A patch attends to the patches of its own image only (the official code runs all images as one
        sequence under a block-diagonal mask), and every other step works patch by patch: so each image
        goes through the tower on its own, the same result without an [N, N] mask."""
        self.token_grids(images)                                       # bad input: an error naming the image
        weight = self.patch_conv.weight
        head_dim = self.args.hidden_size // self.args.num_attention_heads
        features, grids = [], []
        for image in images:
            patches = self.patch_conv(image.to(weight.device, weight.dtype)[None])[0]   # [C, h, w]
            _, h, w = patches.shape
            # contiguous: a transposed view would keep its strides through the norm into every product
            x = self.ln_pre(patches.flatten(1).T.contiguous())                         # [h*w, C]
            cos, sin = rope_2d(h, w, head_dim, self.args.rope_theta, x.device)
            features.append(self.transformer(x[None], cos, sin)[0])
            grids.append((h, w))
        return torch.cat(features), grids


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

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        # x [N, C] with each image's patch grid (h, w) -> [N / m^2, C]
        parts = x.split([h * w for h, w in grids])
        merged = [merge_patches(part, h, w, self.merge) for part, (h, w) in zip(parts, grids)]
        return self.merging_layer(torch.cat(merged))


class VisionLanguageAdapter(nn.Module):
    """From the tower's width C to the text width D: w_out(gelu(w_in x)), the exact (erf) GELU."""

    def __init__(self, dim: int, text_dim: int, bias: bool):
        super().__init__()
        self.w_in = nn.Linear(dim, text_dim, bias=bias)
        self.w_out = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.w_out(F.gelu(self.w_in(x)))
