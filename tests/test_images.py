"""Image validation and normalisation: every accepted output decodes with the
training decoder to the right colours, kept byte for byte where that decoder
takes the file as it is; every bad input gets a reason."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data.images import ImageRejected
from pipeline.data.preprocess import decode_image, prepare_image
from tests import imagefactory as fx

LIMIT = 89_478_485


def tf_pixels(data: bytes) -> np.ndarray:
    return decode_image(tf.constant(data)).numpy().astype(int)


def mean_colour(data: bytes) -> np.ndarray:
    return tf_pixels(data).reshape(-1, 3).mean(axis=0)


def test_plain_rgb_jpeg_is_kept_byte_for_byte():
    raw = fx.rgb_jpeg()
    out = prepare_image(raw, max_pixels=LIMIT)
    assert out.data == raw and not out.reencoded and out.format == "jpeg"
    assert (out.width, out.height) == (40, 30)


@pytest.mark.parametrize(
    "make, fmt, colour",
    [
        (lambda: fx.gray_jpeg(128), "jpeg", (128, 128, 128)),
        (fx.palette_png, "png", (30, 30, 200)),
        (lambda: fx.encode(fx.solid((10, 20, 30)), "PNG"), "png", (10, 20, 30)),
    ],
    ids=["gray-jpeg", "palette-png", "rgb-png"],
)
def test_files_the_training_decoder_takes_as_they_are_are_kept(make, fmt, colour):
    raw = make()
    out = prepare_image(raw, max_pixels=LIMIT)
    assert out.data == raw and not out.reencoded and out.format == fmt
    np.testing.assert_array_equal(mean_colour(out.data), colour)


@pytest.mark.parametrize(
    "make, colour",
    [
        (fx.cmyk_jpeg, (255, 0, 0)),
        (fx.rgba_png, (255, 255, 255)),
        (fx.png16, (255, 255, 255)),
        (lambda: fx.png16(level=32768), (128, 128, 128)),
        (fx.bmp, (30, 200, 30)),
        (fx.webp, (30, 200, 30)),
        (fx.animated_gif, (255, 0, 0)),
    ],
    ids=["cmyk", "alpha", "png16-white", "png16-mid", "bmp", "webp", "gif-first-frame"],
)
def test_other_inputs_are_reencoded_losslessly_with_right_colours(make, colour):
    out = prepare_image(make(), max_pixels=LIMIT)
    assert out.reencoded and out.format == "png"
    assert out.data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(mean_colour(out.data), colour, atol=1)


def test_exif_orientation_is_applied():
    out = prepare_image(fx.exif_rotated_jpeg(size=(40, 20)), max_pixels=LIMIT)
    px = tf_pixels(out.data)
    assert px.shape[:2] == (40, 20)  # was 40 wide x 20 tall, rotated 90° to 20 wide x 40 tall
    # Rotating 90° clockwise puts the left (red) half on top.
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60


def test_max_side_downsizes_once_and_keeps_aspect():
    out = prepare_image(fx.rgb_jpeg(size=(400, 200)), max_pixels=LIMIT, max_side=100)
    assert out.reencoded and out.format == "png" and (out.width, out.height) == (100, 50)
    assert tf_pixels(out.data).shape == (50, 100, 3)
    small = fx.rgb_jpeg(size=(80, 40))
    assert prepare_image(small, max_pixels=LIMIT, max_side=100).data == small


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (fx.truncated_jpeg(), "truncated"),
        (fx.truncated_png(), "truncated"),
        (fx.random_bytes(), "not an image"),
        (b"hello, world\n", "not an image"),
        (fx.png_bomb(), "decompression bomb"),
        (fx.tiff(), "unsupported image format TIFF"),
    ],
    ids=["zero", "truncated-jpeg", "truncated-png", "random", "text", "bomb", "tiff"],
)
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        prepare_image(data, max_pixels=LIMIT)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageRejected, match="too many pixels: 40x30"):
        prepare_image(fx.rgb_jpeg(size=(40, 30)), max_pixels=1000)
