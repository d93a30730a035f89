"""Decoding image bytes (PNG, JPEG) into float32 arrays, for preprocessing before a model's input.

    >>> pixels = decode_image(png_bytes)                       # [8, 8] float32, 0-255, grayscale
    >>> digits_input = (255.0 - pixels) * 16.0 / 255.0         # dark ink on white -> load_digits' 0-16
"""

from __future__ import annotations

import io

import numpy as np

FORMATS = ("PNG", "JPEG")
MODES = {"L": 1, "RGB": 3, "RGBA": 4}  # Pillow mode -> channels


def decode_image(data: bytes, *, size: tuple[int, int] | None = (8, 8), mode: str = "L") -> np.ndarray:
    """PNG or JPEG bytes -> float32 pixels in 0-255: [H, W] for mode "L", [H, W, C] for "RGB"/"RGBA".

    size: (height, width) to resize to (Pillow's antialiased bilinear resampling), or None to keep the
      image's own size.
    mode: "L" (grayscale, ITU-R 601-2 luma), "RGB" or "RGBA".
    The EXIF orientation of a JPEG is applied first, so a photo comes out upright.

    Raises ValueError naming the problem for bytes that are not a PNG or JPEG image (empty, truncated,
    another format, too many pixels), or for a bad `size` or `mode`; TypeError for data that is not bytes.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not supported; expected one of {sorted(MODES)}")
    if size is not None and (len(size) != 2 or any(not isinstance(n, int) or n < 1 for n in size)):
        raise ValueError(f"size must be (height, width) of positive ints or None, got {size!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("image data is empty (0 bytes); expected PNG or JPEG bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            img = ImageOps.exif_transpose(img)  # also forces the full decode, so truncation raises here
            img = img.convert(mode)
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except UnidentifiedImageError:
        raise ValueError(
            f"{len(data)} bytes starting {bytes(data[:8])!r} are not a PNG or JPEG image"
        ) from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for truncated or corrupt data
        raise ValueError(f"image data is corrupt or truncated ({e})") from None
    return pixels
