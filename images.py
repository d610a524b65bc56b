"""Images -> pixels: loading and preprocessing for the vision encoder (vision.py).

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
import re
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import torch
from PIL import Image

from inputs import InputError, read_bytes

PATCH_SIZE = 14          # pixels per side of one vision patch
SPATIAL_MERGE_SIZE = 2   # patches per side merged into one image token: 28-pixel cells
MAX_IMAGE_SIZE = 1540    # longest side the encoder sees (55 cells)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # RGB, on 0..1 values
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CUBIC_A = -0.75          # OpenCV's bicubic kernel (Pillow's bicubic uses -0.5 and antialiases)
URL_TIMEOUT = 30.0       # seconds that one read of an http(s) image may wait
URL_DEADLINE = 60.0      # seconds to fetch an http(s) image, all reads together
MAX_IMAGE_BYTES = 64 * 2**20   # an image file, data: URL payload or download, encoded
USER_AGENT = "mistral-small-reference/1.0"  # some servers refuse urllib's default agent
# The formats a user sends. Pillow knows many more, some handed to external programs (EPS to
# Ghostscript): those are never tried.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]+):")   # two letters at least: C:\... is a path


# ---- loading ---------------------------------------------------------------------------------

def load_image(source) -> Image.Image:
    """A decoded PIL image from a PIL image, a path, or a file://, data:image/...;base64, or http(s) URL.

    Broken input fails here with an InputError naming the source (MissingFileError for a missing
    file): another URL scheme, a file that is not a regular file, more than MAX_IMAGE_BYTES, a
    download past URL_DEADLINE, a format outside FORMATS. Images above Pillow's decompression-bomb
    limit are refused, never decoded.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Path):
        return _decode(_read_file(source), str(source))
    if not isinstance(source, str):
        raise InputError(f"cannot load an image from a {type(source).__name__}: "
                         "expected a PIL image, a path or a URL")
    scheme = SCHEME.match(source)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme == "data":
        return _decode(_decode_data_url(source), _shorten(source))
    if scheme in ("http", "https"):
        return _decode(_fetch(source), source)
    if scheme == "file":
        return _decode(_read_file(file_url_path(source)), source)
    if scheme is not None:
        raise InputError(f"{_shorten(source)}: unsupported URL scheme {scheme!r}; expected a path, or a file://, "
                         f"data: or http(s) URL (a file whose name has a colon: write it ./{_shorten(source)})")
    return _decode(_read_file(Path(source)), source)


def _shorten(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _read_file(path: Path) -> bytes:
    return read_bytes(path, MAX_IMAGE_BYTES, f"image file {path}")


def file_url_path(url: str) -> Path:
    parts = urllib.parse.urlparse(url)
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"{url}: only local file:// URLs are supported")
    return Path(urllib.request.url2pathname(parts.path))  # undoes %-escapes such as %20


def _decode_data_url(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InputError(f"{_shorten(url)}: expected a data URL of the form data:image/...;base64,<data>")
    if not header.lower().startswith("data:image/"):
        raise InputError(f"{_shorten(url)}: the data URL's media type is not an image (data:image/...)")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InputError(f"{_shorten(url)}: the data URL holds more than the limit of {MAX_IMAGE_BYTES} bytes")
    try:
        # validate: a character outside the base64 alphabet is an error, not silently dropped
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:   # ValueError: a character outside ASCII
        raise InputError(f"{_shorten(url)}: the data URL payload is not valid base64 ({e})") from None


def _opener() -> urllib.request.OpenerDirector:
    """urllib with http(s), their proxies and redirects only: a redirect to ftp: or file: is refused
    (urllib's default opener would follow it)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler, urllib.request.HTTPHandler, urllib.request.HTTPSHandler,
                    urllib.request.HTTPRedirectHandler, urllib.request.HTTPErrorProcessor,
                    urllib.request.HTTPDefaultErrorHandler):
        opener.add_handler(handler())
    return opener


def _fetch(url: str) -> bytes:
    """The body at `url`: at most MAX_IMAGE_BYTES, read in chunks against a deadline URL_DEADLINE
    seconds after the start (a read in progress waits at most URL_TIMEOUT more), so that a server
    that sends a byte at a time cannot hold us."""
    deadline = time.monotonic() + URL_DEADLINE
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _opener().open(request, timeout=min(URL_TIMEOUT, URL_DEADLINE)) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > MAX_IMAGE_BYTES:
                raise InputError(f"cannot fetch image {url}: {size} bytes, more than the limit of {MAX_IMAGE_BYTES}")
            chunks, total = [], 0
            while chunk := response.read1(2**16):
                chunks.append(chunk)
                total += len(chunk)
                if total > MAX_IMAGE_BYTES:
                    raise InputError(f"cannot fetch image {url}: more than the limit of {MAX_IMAGE_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise InputError(f"cannot fetch image {url}: not complete after {URL_DEADLINE:g} s")
            return b"".join(chunks)
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise InputError(f"cannot fetch image {url}: {e}") from None


def _decode(data: bytes, name: str) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse the whole range.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            image.load()  # decode now, so a truncated file fails here and not during preprocessing
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{name}: refusing a possible decompression bomb: {e}") from None
        except Image.UnidentifiedImageError:
            raise InputError(f"{name} is not an image in a supported format ({', '.join(FORMATS)})") from None
        except Exception as e:  # decoders raise OSError, SyntaxError, EOFError, struct.error, ...
            raise InputError(f"{name} is not a readable image: {e}") from None
    return image


# ---- preprocessing ---------------------------------------------------------------------------

def cell_size(patch_size: int, spatial_merge_size: int) -> int:
    """Pixels per side of one image token: a square of merge x merge patches (14 x 2 = 28 for Small 3.x)."""
    return patch_size * spatial_merge_size


def token_grid(pixels: torch.Tensor, patch_size: int = PATCH_SIZE,
               spatial_merge_size: int = SPATIAL_MERGE_SIZE) -> tuple[int, int]:
    """(rows, cols) of image tokens of preprocessed pixels [3, H, W] (sides multiples of the cell)."""
    cell = cell_size(patch_size, spatial_merge_size)
    return pixels.shape[1] // cell, pixels.shape[2] // cell


def image_grid(width: int, height: int, patch_size: int = PATCH_SIZE,
               spatial_merge_size: int = SPATIAL_MERGE_SIZE, max_image_size: int = MAX_IMAGE_SIZE) -> tuple[int, int]:
    """(rows, cols) of image tokens for a width x height image; the prompt holds rows * (cols + 1)
    tokens: each row is cols [IMG] then [IMG_BREAK], the last [IMG_BREAK] becoming [IMG_END]."""
    if width < 1 or height < 1:
        raise InputError(f"image size {width}x{height}: both sides must be at least 1 pixel")
    ratio = max(width, height) / max_image_size
    if ratio > 1:
        # Python's round (half to even), as the reference; a thin strip keeps at least 1 pixel
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    cell = cell_size(patch_size, spatial_merge_size)
    return math.ceil(height / cell), math.ceil(width / cell)


def preprocess_image(image: Image.Image, patch_size: int = PATCH_SIZE, spatial_merge_size: int = SPATIAL_MERGE_SIZE,
                     max_image_size: int = MAX_IMAGE_SIZE) -> torch.Tensor:
    """A PIL image -> [3, rows*cell, cols*cell] float32 normalized pixels (cell = 28 by default)."""
    rows, cols = image_grid(image.width, image.height, patch_size, spatial_merge_size, max_image_size)
    cell = cell_size(patch_size, spatial_merge_size)
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
        raise InputError(f"cannot read the pixels of a {image.mode} {image.width}x{image.height} image: {e}") from None
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
