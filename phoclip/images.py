"""Safe image decoding shared by sharding, the train stream and search."""
from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image, ImageFile

# A decompression bomb is refused, never decoded: 89M pixels is Pillow's own warning
# threshold; above it we raise instead of warning.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An input that is not a usable image; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode bytes to an RGB image; alpha is composed over white, CMYK/palette/grey
    converted. Raises BadImage(reason) for empty, non-image, truncated or huge input."""
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise BadImage("too_large", f"{im.width}x{im.height}")
            im.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadImage("not_an_image", str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("corrupt", str(e)) from e
    return to_rgb(im)


MAX_FILE_BYTES = 64 * 1024 * 1024  # no photo we index is larger; a bigger file is refused unread


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file to RGB, safely: only a regular file (a symlink to /dev/zero,
    a FIFO or a device is refused before it is opened for reading, so nothing hangs),
    at most `max_bytes` read, and the same checks as `decode_rgb`. Raises BadImage."""
    try:
        st = os.stat(path)  # follows symlinks: what would be read is what is checked
    except OSError as e:
        raise BadImage("unreadable", str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_a_file", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise BadImage("too_large", f"{path}: {st.st_size} bytes > {max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow between stat and read
    except OSError as e:
        raise BadImage("unreadable", str(e)) from e
    if len(data) > max_bytes:
        raise BadImage("too_large", f"{path}: more than {max_bytes} bytes")
    return decode_rgb(data, max_pixels)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with transparency composed over white (not black, as a bare convert does)."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def resize_shorter(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (aspect kept); never upsamples."""
    w, h = im.size
    s = min(w, h)
    if s <= size:
        return im
    if w <= h:
        nw, nh = size, max(1, round(h * size / w))
    else:
        nw, nh = max(1, round(w * size / h)), size
    return im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)


def encode_jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
