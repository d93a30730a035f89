import io

import numpy as np
import pytest
from PIL import Image

from bulkinfer.models.images import decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(h=8, w=8) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint8).reshape(h, w) * 3)  # distinct values 0..189


def test_png_grayscale_decodes_exactly():
    pixels = _gradient()
    got = decode_image(_encode(Image.fromarray(pixels, "L"), "PNG"))
    assert got.dtype == np.float32 and got.shape == (8, 8)
    np.testing.assert_array_equal(got, pixels.astype(np.float32))


def test_png_rgb_keeps_channels_and_grayscale_is_luma():
    rgb = np.stack([_gradient(), 255 - _gradient(), np.full((8, 8), 40, np.uint8)], axis=-1)
    data = _encode(Image.fromarray(rgb, "RGB"), "PNG")
    got = decode_image(data, mode="RGB", size=None)
    assert got.shape == (8, 8, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, rgb.astype(np.float32))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's "L"
    np.testing.assert_allclose(decode_image(data), luma, atol=1.0)
    assert decode_image(data, mode="RGBA").shape == (8, 8, 4)


def test_jpeg_decodes_close_to_its_source():
    pixels = np.full((8, 8), 200, np.uint8)
    pixels[2:6, 2:6] = 20
    got = decode_image(_encode(Image.fromarray(pixels, "L"), "JPEG", quality=95))
    assert got.shape == (8, 8) and got.dtype == np.float32
    assert np.abs(got - pixels).mean() < 8  # lossy, but the square is where it was
    assert got[3:5, 3:5].max() < 60 and got[0, 0] > 170


def test_resize_takes_height_then_width():
    img = Image.fromarray(np.full((32, 48), 120, np.uint8), "L")  # 32 rows, 48 columns
    got = decode_image(_encode(img, "PNG"), size=(4, 6))
    assert got.shape == (4, 6)
    np.testing.assert_allclose(got, 120.0)
    assert decode_image(_encode(img, "PNG"), size=None).shape == (32, 48)


def test_jpeg_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((2, 4), np.uint8), "L")  # 2 rows, 4 columns as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    got = decode_image(_encode(img, "JPEG", exif=exif), size=None)
    assert got.shape == (4, 2)


@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (b"hello, not an image", "not a PNG or JPEG image"),
    (_encode(Image.new("L", (8, 8)), "GIF"), "not a PNG or JPEG image"),
    (_encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")[:300],
     "corrupt or truncated"),
])
def test_bytes_that_are_not_an_image_raise_value_error_naming_the_problem(data, problem):
    with pytest.raises(ValueError, match=problem):
        decode_image(data)


def test_bad_arguments_are_named():
    png = _encode(Image.new("L", (8, 8)), "PNG")
    with pytest.raises(TypeError, match="must be bytes, got str"):
        decode_image("not bytes")
    with pytest.raises(ValueError, match="mode 'CMYK' is not supported"):
        decode_image(png, mode="CMYK")
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        decode_image(png, size=(0, 8))
