"""Reading one image file as 8-bit RGB, whatever mode it was saved in, or a one-line error naming the file.

Decoder choice (measured with `python benchmarks/data_decode.py`, which prints its table and writes no BENCHMARKS.md
section; 1 thread, median, JPEG q90): PIL (libjpeg-turbo 3) takes ~0.3 / 0.35 / 1.5 / 2.5 ms for 64 / 128 / 256 / 500 px
images; `torchvision.io.decode_jpeg` ~0.1 / 0.3 / 0.85 / 1.9 ms. torchvision's decoders are deprecated since 0.29 (moved
to TorchCodec) and the gap is small beside a training step, so PIL is the decoder. For large JPEGs read at a small
resolution, `min_size` asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (`Image.draft`), which is ~1.4x faster at 500 px
-> 96 px. Transforms then run on uint8 CHW tensors (see `transforms.py`), which was 1.4-2.8x faster than on PIL.

Mode conversions (Pillow's own `convert("RGB")` is right for most modes but not all):
- 1, L, P (no transparency), CMYK, YCbCr, LAB, HSV: Pillow's conversion.
- Modes with alpha (RGBA, LA, PA, P with a transparency entry): composited onto black, i.e. colour * alpha. The colour
  stored under a fully transparent pixel is arbitrary (often black, sometimes garbage); compositing makes it
  deterministic, and black matches zero-padding elsewhere in the pipeline.
- 16-bit grayscale (I;16, I;16B, I;16L) and 32-bit integer (I, which is how some 16-bit PNG/TIFF files open): the
  0..65535 range is scaled to 0..255 (Pillow's own conversion clips at 255 instead, turning most images white).
- Float (F): taken as 0..1 and scaled to 0..255, clipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112
_T = Image.Transpose
_ORIENT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
           7: _T.TRANSVERSE, 8: _T.ROTATE_90}


class BadImageError(UserError):
    """An image file that cannot be decoded: missing, empty, truncated, corrupt, or not an image.

    `BadImageError(path, reason)`. It also accepts the single message string that PyTorch's DataLoader passes when it
    re-raises a worker's exception in the main process ("Caught BadImageError in DataLoader worker ... Original
    Traceback ..."); the one-line message is recovered from its last line, so the CLI still prints one line.
    """

    def __init__(self, path, reason: str | None = None):
        if reason is None:  # re-raised from a DataLoader worker: recover "<path>: unreadable image (<reason>)"
            last = str(path).strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(("mnv2.", "BadImageError")) else last
            match = re.match(r"(.*): unreadable image \((.*)\)$", message)
            path, reason = (match.group(1), match.group(2)) if match else (message, "unknown")
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: unreadable image ({reason})")


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode `path` to an 8-bit RGB PIL image (conversions in the module docstring), with EXIF orientation applied.

    `min_size`: for JPEGs, allow libjpeg to decode at a reduced scale as long as both sides stay >= `min_size`.
    Raises `BadImageError(path, reason)` for anything that does not decode completely.
    """
    try:
        with Image.open(path) as im:
            if min_size and im.format == "JPEG":
                im.draft("RGB", (min_size, min_size))
            im.load()  # decode now, inside the try: truncated files fail here
            return upright_rgb(im)
    except FileNotFoundError:
        raise BadImageError(path, "no such file") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file or unknown format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(path, str(e) or type(e).__name__) from None


def upright_rgb(im: Image.Image) -> Image.Image:
    """An opened PIL image as `load_image` makes a file: 8-bit RGB by the conversions of the module docstring (alpha
    composited onto black, 16-bit scaled), turned upright by its EXIF orientation. The Predictor uses it for PIL
    images, so a picture gives the same input as a file and as an image in memory."""
    rgb = _to_rgb(im)
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in _ORIENT:  # camera photos: pixels stored sideways, the EXIF tag says how to turn them
        rgb = rgb.transpose(_ORIENT[orientation])
    return rgb


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im, dtype=np.float64)
        return _gray_to_rgb(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return _gray_to_rgb(np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255))
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # colour * alpha, rounded: composite onto black
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return im.convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    g = gray.astype(np.uint8)
    return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
