"""Image modes beyond 8 bits (16-bit PNG/TIFF, 32-bit integer, float) are scaled, not clipped."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sparkloom.pipelines.config import ImageConfig
from sparkloom.pipelines.images import decode_file, prepare_images, prepare_one

K = np.arange(16).reshape(2, 8)  # a 16-step gradient, 2 rows of 8
GRADIENT = (K * 17).astype(np.uint8)  # the same in 8 bits: 0, 17, ..., 255
GRAY = ImageConfig(height=2, width=8, channels=1)
RGB = ImageConfig(height=2, width=8, channels=3)


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png16_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, depth 16), which Pillow cannot write."""
    h, w, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


def decoded(data: bytes, ic: ImageConfig) -> np.ndarray:
    return np.frombuffer(decode_file(data, ic), np.uint8).reshape(ic.channels, ic.height, ic.width)


def test_a_16_bit_png_gradient_is_scaled_not_clipped_to_white():
    img = Image.fromarray((K * 17 * 257).astype(np.uint16))  # 0, 4369, ..., 65535
    data = encoded(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    assert decoded(data, GRAY)[0].tolist() == GRADIENT.tolist()  # was [0, 255, 255, ...]
    assert (decoded(data, RGB) == GRADIENT).all()  # grey -> RGB copies the scaled channel


def test_16_bit_values_keep_their_high_byte_like_pillows_16_bit_rgb():
    """Not the image's own range: a dark 16-bit image stays dark. One set of values stored as
    grey or as colour gives the same pixels (Pillow reduces 16-bit RGB to its high byte)."""
    values = np.array([[0, 0x00FF, 0x0100, 0x12FF, 0x7F80, 0x8000, 0xFF00, 0xFFFF]], np.uint16)
    ic = ImageConfig(height=1, width=8, channels=1)
    grey = decoded(encoded(Image.fromarray(values), "PNG"), ic)
    assert grey.ravel().tolist() == [0, 0, 1, 18, 127, 128, 255, 255]
    colour = png16_rgb(np.repeat(values[:, :, None], 3, axis=2))
    assert Image.open(io.BytesIO(colour)).mode == "RGB"
    assert decoded(colour, ic).tolist() == grey.tolist()


@pytest.mark.parametrize(
    ("mode", "pixels"),
    [
        ("I;16B", (K * 17 * 257).astype(">u2")),  # big-endian 16-bit TIFF
        ("I", (K * 17 * 257).astype(np.int32)),  # 32-bit integer holding 16-bit data
        ("I", (K * 100_000 - 50_000).astype(np.int32)),  # beyond 16 bits: its own min..max
        ("F", (K / 15).astype(np.float32)),  # float in [0, 1]: 1 is white
        ("F", (K * 0.3 - 1).astype(np.float32)),  # float outside [0, 1]: its own min..max
    ],
    ids=["I;16B", "I-16-bit", "I-32-bit", "F-unit", "F-range"],
)
def test_wide_tiff_modes_are_scaled_to_8_bits(mode, pixels):
    img = Image.frombytes(mode, (8, 2), pixels.tobytes())
    data = encoded(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    assert decoded(data, GRAY)[0].tolist() == GRADIENT.tolist()


def test_eight_bit_and_other_modes_decode_as_before():
    assert decoded(encoded(Image.fromarray(GRADIENT), "PNG"), GRAY)[0].tolist() == GRADIENT.tolist()
    rgba = np.dstack([GRADIENT, GRADIENT, GRADIENT, np.full_like(GRADIENT, 255)])
    assert (decoded(encoded(Image.fromarray(rgba), "PNG"), GRAY)[0] == GRADIENT).all()
    p = Image.fromarray(GRADIENT).convert("P")
    assert decoded(encoded(p, "PNG"), GRAY)[0].tolist() == GRADIENT.tolist()


def test_a_float_image_with_nan_is_quarantined():
    pixels = (K / 15).astype(np.float32)
    pixels[0, 3] = np.nan
    data = encoded(Image.frombytes("F", (8, 2), pixels.tobytes()), "TIFF")
    assert prepare_one(data, None, None, GRAY) == (None, "pixel_out_of_range")


def test_the_spark_udf_stores_the_scaled_16_bit_gradient(spark):
    data = encoded(Image.fromarray((K * 17 * 257).astype(np.uint16)), "PNG")
    df = spark.createDataFrame(
        [("a", bytearray(data), None, None)],
        "id string, content binary, pixels array<double>, shape array<int>",
    )
    row = prepare_images(df, GRAY).first()
    assert row["image_reason"] is None
    assert np.frombuffer(row["image"], np.uint8).tolist() == GRADIENT.ravel().tolist()
