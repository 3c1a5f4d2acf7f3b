"""Safe image decoding shared by sharding, the train stream and search."""
from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image, ImageOps

# A decompression bomb is refused, never decoded: 89M pixels is Pillow's own warning
# threshold; above it we raise instead of warning. Checked in `probe_image` on every
# open (Pillow's process-wide settings are left to the application).
MAX_IMAGE_PIXELS = 89_478_485


class BadImage(Exception):
    """An input that is not a usable image; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def probe_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open (header only) and check the pixel count; the one place the bad-image
    reasons are decided. Raises BadImage(empty | not_an_image | too_large | corrupt)."""
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise BadImage("too_large", f"{im.width}x{im.height} pixels > {max_pixels}")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:  # its text names a BytesIO object, not the file
        raise BadImage("not_an_image", "not in an image format Pillow reads") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("corrupt", str(e)) from e
    return im


# Peak memory to decode one image, checked from its header before decoding: the pixel
# cap alone lets a 16-bit or RGBA image under it cost several times more.
MAX_DECODE_BYTES = 1 << 30


def decode_cost(mode: str, width: int, height: int) -> int:
    """Peak bytes to decode an image of this mode and size to RGB: Pillow's storage (4
    bytes a pixel for RGB and every multi-band mode, 2 for 16-bit grey) plus what
    `to_rgb` adds (16-bit, 32-bit and float images pass through one float32 array and an
    8-bit copy; alpha is composed over white through two RGBA copies)."""
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    if mode.startswith("I;16") or mode in ("I", "F"):
        extra = 4 + 1 + 4
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):  # P: maybe a transparent palette
        extra = 3 * 4
    else:
        extra = 0 if mode == "RGB" else 4
    return width * height * (stored + extra)


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
               max_decode_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Decode bytes to an upright RGB image: EXIF orientation applied (phone photos;
    captions say left and right), alpha composed over white, 16-bit and float images
    scaled to 8 bits, CMYK/palette/grey converted. Raises BadImage(reason) for empty,
    non-image, truncated or huge input (pixels, or bytes to decode: `decode_cost`)."""
    im = probe_image(data, max_pixels)
    cost = decode_cost(im.mode, im.width, im.height)
    if cost > max_decode_bytes:
        raise BadImage("too_large", f"{im.width}x{im.height} {im.mode} needs {cost >> 20} MB to decode, "
                                    f"over {max_decode_bytes >> 20} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # not a copy of every upright photo
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise BadImage("corrupt", str(e)) from e
    return to_rgb(im)


MAX_FILE_BYTES = 64 * 1024 * 1024  # no photo we index is larger; a bigger file is refused unread


def read_file_capped(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`: a symlink to /dev/zero, a FIFO
    or a device is refused before it is opened for reading, so nothing hangs or fills
    memory. Raises BadImage(missing_file | not_a_file | too_large_file | unreadable_file)."""
    try:
        st = os.stat(path)  # follows symlinks: what would be read is what is checked
    except FileNotFoundError as e:
        raise BadImage("missing_file", str(e)) from e
    except OSError as e:
        raise BadImage("unreadable_file", str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise BadImage("not_a_file", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise BadImage("too_large_file", f"{path}: {st.st_size} bytes > {max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may grow between stat and read
    except OSError as e:
        raise BadImage("unreadable_file", str(e)) from e
    if len(data) > max_bytes:
        raise BadImage("too_large_file", f"{path}: more than {max_bytes} bytes")
    return data


def read_image_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file to RGB, safely (`read_file_capped` + `decode_rgb`). Raises BadImage."""
    return decode_rgb(read_file_capped(path, max_bytes), max_pixels)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with transparency composed over white (not black, as a bare convert does);
    16-bit and 32-bit integer and float images scaled to 8 bits (a bare convert clips
    them: a 16-bit photo came out white)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        import numpy as np

        a = np.array(im, dtype=np.float32)  # one working copy, scaled in place
        if im.mode == "F":
            if a.size and a.max() <= 1.0:
                a *= 255.0
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a /= 257.0  # the 16-bit range onto 0-255
        a += 0.5
        np.clip(a, 0, 255, out=a)
        im = Image.fromarray(a.astype(np.uint8), "L")
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
