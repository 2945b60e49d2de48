"""The recipe of ``preprocessing.json`` as TensorFlow ops, and the module whose
functions become the SavedModel's serving signatures.

``preprocess_bytes`` turns one encoded file (scalar tf.string) into the uint8
[S, S, 3] tensor ``jobs.score`` sends to its model for the same file:

1. decode: JPEG with the recipe's IDCT (``tf.io.decode_jpeg``, which also
   converts CMYK the way Pillow does), with ``jpeg_scale_to`` at the scale of
   ``pipeline.data.images.jpeg_scale`` (``decode_jpeg``'s ``ratio``: the
   scaled IDCT Pillow's ``draft`` uses; the same pixels); PNG as 16 bits per channel, then
   grayscale scaled (``rint(v / 65535 * 255)``, as Pillow's I;16 path) and
   colour by its high byte (as Pillow reads 16-bit RGB); GIF first frame;
   WebP; BMP. Alpha (PNG colour types 3 with tRNS, 4 and 6; WebP) is
   composited on white with Pillow's own integer arithmetic.
2. EXIF orientation 2-8: the orientation entry of the EXIF block (JPEG APP1,
   PNG eXIf, WebP EXIF) found by its byte pattern in the first 64 KiB, then
   the same flips and rotations as ``PIL.ImageOps.exif_transpose``.
3. ``max_side``: the same target size as Pillow's, Lanczos-3 with
   antialiasing (``tf.image.resize``) instead of Pillow's: a few levels apart.
4. the one resize (``pipeline.data.preprocess.resize_images``) and rounding to
   uint8 (``pipeline.scoring.decode.to_uint8``).

What cannot be matched is refused with an InvalidArgument error that says so
(a GIF with a transparent colour; more pixels than ``prepare.max_pixels``)
rather than decoded differently. docs/export.md lists every difference.
"""

from __future__ import annotations

from typing import Optional, Sequence

from pipeline.data.images import JPEG_SCALES, jpeg_scale_fits
from pipeline.data.preprocess import ACCURATE, Recipe, resize_images

BYTES_SIGNATURE = "serving_bytes"
PIXELS_SIGNATURE = "serving_pixels"
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCAN_BYTES = 1 << 16  # where the EXIF block and a GIF's first control extension are looked for
_PAD = 16
# An IFD entry: tag 0x0112 (orientation), type SHORT, count 1, then the value.
_ORIENTATION_II = b"\x12\x01\x03\x00\x01\x00\x00\x00"  # little-endian TIFF; value at +8, then 0
_ORIENTATION_MM = b"\x01\x12\x00\x03\x00\x00\x00\x01\x00"  # big-endian TIFF; value at +9
_EXIF_MARKERS = (b"Exif\x00\x00", b"eXIf", b"EXIF")  # JPEG APP1, PNG chunk, WebP chunk


def _head(data):
    """The first SCAN_BYTES of ``data`` as int32 [SCAN_BYTES + _PAD], zero padded."""
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(data, 0, SCAN_BYTES), tf.uint8)
    head = tf.cast(head, tf.int32)
    return tf.pad(head, [[0, SCAN_BYTES + _PAD - tf.shape(head)[0]]])


def _starts(head, pattern: bytes):
    """bool [SCAN_BYTES]: where ``pattern`` starts in ``head``."""
    import tensorflow as tf

    hit = tf.ones([SCAN_BYTES], tf.bool)
    for j, byte in enumerate(pattern):
        hit = hit & tf.equal(head[j:j + SCAN_BYTES], byte)
    return hit


def _first(hits):
    """The index of the first True, or SCAN_BYTES when none."""
    import tensorflow as tf

    return tf.where(tf.reduce_any(hits), tf.cast(tf.argmax(tf.cast(hits, tf.int32)), tf.int32), SCAN_BYTES)


def exif_orientation(data):
    """The EXIF orientation (int32 1 to 8; 1 when there is none) of encoded bytes."""
    import tensorflow as tf

    head = _head(data)
    marker = SCAN_BYTES
    for pattern in _EXIF_MARKERS:
        marker = tf.minimum(marker, _first(_starts(head, pattern)))
    ii_value, mm_value = head[8:8 + SCAN_BYTES], head[9:9 + SCAN_BYTES]
    ii = _starts(head, _ORIENTATION_II) & (ii_value >= 1) & (ii_value <= 8) & tf.equal(mm_value, 0)
    mm = _starts(head, _ORIENTATION_MM) & (mm_value >= 1) & (mm_value <= 8)
    after = tf.range(SCAN_BYTES) > marker
    found = (ii | mm) & after
    index = _first(found)
    safe = tf.minimum(index, SCAN_BYTES - 1)
    value = tf.where(ii[safe], ii_value[safe], mm_value[safe])
    return tf.where(index < SCAN_BYTES, value, 1)


def apply_orientation(image, orientation):
    """``PIL.ImageOps.exif_transpose`` for HxWxC: the stored picture upright."""
    import tensorflow as tf

    branches = [
        lambda: image,
        lambda: image[:, ::-1],  # 2: FLIP_LEFT_RIGHT
        lambda: image[::-1, ::-1],  # 3: ROTATE_180
        lambda: image[::-1],  # 4: FLIP_TOP_BOTTOM
        lambda: tf.transpose(image, [1, 0, 2]),  # 5: TRANSPOSE
        lambda: tf.image.rot90(image, k=3),  # 6: ROTATE_270
        lambda: tf.transpose(image, [1, 0, 2])[::-1, ::-1],  # 7: TRANSVERSE
        lambda: tf.image.rot90(image, k=1),  # 8: ROTATE_90
    ]
    return tf.switch_case(orientation - 1, branches)


def composite_on_white(rgb, alpha):
    """int32 HxWx3 and HxW in 0..255 -> uint8 HxWx3: Pillow's ``alpha_composite``
    over opaque white (libImaging/AlphaComposite.c with a white, opaque
    destination), integer for integer."""
    import tensorflow as tf

    a = alpha[..., None]
    t = (rgb * a + 255 * (255 - a)) * 128 + (0x80 * 128)
    t = ((t // 256) + t) // 256
    return tf.cast(t // 128, tf.uint8)


def _check_pixels(height, width, max_pixels: int, what: str):
    import tensorflow as tf

    count = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
    return tf.debugging.Assert(count <= max_pixels, [f"{what}: more pixels than {max_pixels} (prepare.max_pixels):",
                                                     height, width])


def _decode_jpeg(data, recipe: Recipe, orientation, max_pixels: int):
    import tensorflow as tf

    shape = tf.io.extract_jpeg_shape(data)
    with tf.control_dependencies([_check_pixels(shape[0], shape[1], max_pixels, "JPEG")]):
        accurate = lambda: tf.io.decode_jpeg(data, channels=3, dct_method=ACCURATE)  # noqa: E731
        if recipe.jpeg_scale_to is not None:
            return _decode_jpeg_scaled(data, recipe, shape)
        if recipe.jpeg_dct_method == ACCURATE:
            return accurate()
        # A model recorded before the full recipe: the bytes prepare kept then
        # (upright RGB JPEGs) were decoded with the recipe's IDCT; the others by Pillow.
        plain = tf.equal(shape[2], 3) & tf.equal(orientation, 1)
        return tf.cond(plain, lambda: tf.io.decode_jpeg(data, channels=3, dct_method=recipe.jpeg_dct_method),
                       accurate)


def _decode_jpeg_scaled(data, recipe: Recipe, shape):
    """``jpeg_scale`` in the graph: the same rule (``jpeg_scale_fits``, largest
    scale first) on the stored size, then ``decode_jpeg`` at that ``ratio``.
    The EXIF orientation is applied after, as for a full decode (the rule
    looks at the shorter and longer sides only)."""
    import tensorflow as tf

    height, width = shape[0], shape[1]
    index = tf.constant(0)  # full size
    for i, scale in enumerate(reversed(JPEG_SCALES), start=1):  # 2, 4, 8: a larger fitting scale wins
        index = tf.where(jpeg_scale_fits(width, height, scale, recipe.jpeg_scale_to, recipe.max_side), i, index)
    ratios = (1,) + tuple(reversed(JPEG_SCALES))
    return tf.switch_case(index, [
        (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method=recipe.jpeg_dct_method))
        for r in ratios])


def _decode_png(data, max_pixels: int):
    import tensorflow as tf

    ihdr = tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False)
    color_type = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 25, 1), tf.uint8)[0], tf.int32)
    with tf.control_dependencies([_check_pixels(ihdr[1], ihdr[0], max_pixels, "PNG")]):
        px = tf.cast(tf.io.decode_png(data, channels=0, dtype=tf.uint16), tf.int32)  # 8-bit values come as v * 257
    channels = tf.shape(px)[2]
    opaque = tf.fill(tf.shape(px)[:2], 255)

    def gray():  # type 0: Pillow's L, or I;16 scaled to 8 bits
        level = tf.cast(tf.round(tf.cast(px[..., 0], tf.float64) / 65535.0 * 255.0), tf.int32)
        return tf.stack([level] * 3, axis=-1), opaque

    def gray_alpha():  # type 4: LA, high byte
        level = px[..., 0] // 256
        return tf.stack([level] * 3, axis=-1), px[..., 1] // 256

    def colour():  # types 2, 3 and 6: RGB(A) and palettes, high byte; alpha only where Pillow has it
        rgb = px[..., :3] // 256
        has_alpha = tf.equal(channels, 4) & (tf.equal(color_type, 3) | tf.equal(color_type, 6))
        return rgb, tf.cond(has_alpha, lambda: px[..., -1] // 256, lambda: opaque)

    branch = tf.where(tf.equal(color_type, 0), 0, tf.where(tf.equal(color_type, 4), 1, 2))
    rgb, alpha = tf.switch_case(branch, [gray, gray_alpha, colour])
    return composite_on_white(rgb, alpha)


def _decode_gif(data, max_pixels: int):
    import tensorflow as tf

    head = _head(data)
    screen = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 6, 4), tf.uint16), tf.int32)
    control = _starts(head, b"\x21\xf9\x04")
    index = tf.minimum(_first(control), SCAN_BYTES - 1)
    transparent = tf.reduce_any(control) & tf.equal(head[index + 3] % 2, 1)
    checks = [
        _check_pixels(screen[1], screen[0], max_pixels, "GIF"),
        tf.debugging.Assert(tf.logical_not(transparent),
                            ["GIF with a transparent colour: not decoded in the graph (TensorFlow's GIF decoder "
                             "has no alpha; Pillow composites it on white); decode it yourself and use "
                             f"{PIXELS_SIGNATURE}"]),
    ]
    with tf.control_dependencies(checks):
        return tf.io.decode_image(data, channels=3, expand_animations=False)


def _decode_other(data, max_pixels: int, *, alpha: bool):
    """WebP (alpha composited) and BMP (no alpha, as Pillow reads it)."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=0 if alpha else 3, expand_animations=False)
    shape = tf.shape(image)
    with tf.control_dependencies([_check_pixels(shape[0], shape[1], max_pixels, "image")]):
        if not alpha:
            return tf.identity(image)
        pixels = tf.cast(image, tf.int32)
        return tf.cond(tf.equal(shape[2], 4), lambda: composite_on_white(pixels[..., :3], pixels[..., 3]),
                       lambda: tf.cast(pixels[..., :3], tf.uint8))


def decode_upright(data, recipe: Recipe, max_pixels: int):
    """Encoded bytes (scalar tf.string) -> upright uint8 HxWx3, as
    ``pipeline.data.preprocess.file_pixels`` before ``max_side``."""
    import tensorflow as tf

    orientation = exif_orientation(data)
    magic = tf.strings.substr(data, 0, 12)
    is_png = tf.equal(tf.strings.substr(magic, 0, 8), PNG_SIGNATURE)
    is_gif = tf.equal(tf.strings.substr(magic, 0, 4), b"GIF8")
    is_webp = tf.equal(tf.strings.substr(magic, 0, 4), b"RIFF") & tf.equal(tf.strings.substr(magic, 8, 4), b"WEBP")
    branch = tf.where(tf.io.is_jpeg(data), 0, tf.where(is_png, 1, tf.where(is_gif, 2, tf.where(is_webp, 3, 4))))
    image = tf.switch_case(branch, [
        lambda: _decode_jpeg(data, recipe, orientation, max_pixels),
        lambda: _decode_png(data, max_pixels),
        lambda: _decode_gif(data, max_pixels),
        lambda: _decode_other(data, max_pixels, alpha=True),
        lambda: _decode_other(data, max_pixels, alpha=False),
    ])
    image = tf.ensure_shape(image, [None, None, 3])
    return apply_orientation(image, orientation)


def shrink_to_max_side(image, max_side: Optional[int]):
    """Pillow's ``max_side`` shrink (same target size) with TensorFlow's
    antialiased Lanczos-3: uint8 HxWx3 -> uint8."""
    import tensorflow as tf

    if max_side is None:
        return image
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    longer = tf.maximum(height, width)

    def shrink():
        scale = max_side / tf.cast(longer, tf.float64)

        def side(n):  # Python's round (half to even) as in preprocess.shrink_to_max_side
            return tf.clip_by_value(tf.cast(tf.round(tf.cast(n, tf.float64) * scale), tf.int32), 1, max_side)

        out = tf.image.resize(image, tf.stack([side(height), side(width)]), method="lanczos3", antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)

    return tf.cond(longer > max_side, shrink, lambda: image)


def preprocess_bytes(data, recipe: Recipe, max_pixels: int):
    """One encoded file -> uint8 [S, S, 3]: what ``jobs.score`` sends its model."""
    import tensorflow as tf

    image = shrink_to_max_side(decode_upright(data, recipe, max_pixels), recipe.max_side)
    resized = resize_images(image[None], recipe.image_size, recipe.image_size, recipe.resize_method)[0]
    return tf.cast(tf.round(resized), tf.uint8)  # resize_images clips to [0, 255]


def serving_module(model, labels: Sequence[str], recipe: Recipe, *, top_k: int, max_pixels: int):
    """A ``tf.Module`` with the two serving functions, the model's variables
    and the labels (a variable and a graph constant). The Keras model itself
    is not tracked (its per-layer SavedModel functions are not needed)."""
    import tensorflow as tf

    size = recipe.image_size
    k = min(int(top_k), len(labels))
    names = tf.constant(list(labels), tf.string)
    module = tf.Module(name="inception_ray_export")
    module.model_variables = list(model.variables)
    module.labels = tf.Variable(list(labels), trainable=False, dtype=tf.string, name="labels")

    def probabilities(pixels):
        return tf.cast(model(tf.cast(pixels, tf.float32), training=False), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=PIXELS_INPUT)])
    def serving_pixels(pixels):  # no control flow: TFLite converts this one as a plain graph
        return {"probabilities": probabilities(pixels)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    def serving_bytes(image_bytes):
        pixels = tf.map_fn(lambda data: preprocess_bytes(data, recipe, max_pixels), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        # An empty request skips the model (some CPU kernels refuse a batch of 0).
        probs = tf.cond(tf.shape(pixels)[0] > 0, lambda: probabilities(pixels),
                        lambda: tf.zeros([0, len(labels)], tf.float32))
        top = tf.math.top_k(probs, k=k)
        return {"labels": tf.gather(names, top.indices), "probabilities": top.values, "class_ids": top.indices}

    module.serving_pixels = serving_pixels
    module.serving_bytes = serving_bytes
    return module
