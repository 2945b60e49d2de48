"""How an image file becomes the model's input: one recipe, one decoder, one
resize, used by prepare (what a shard stores), the training input, evaluation,
the promotion gate, ``jobs.predict`` and ``jobs.score``.

1. Pixels: Pillow decodes the file (first frame of animations; a JPEG, when
   the recipe has ``jpeg_scale_to``, at the largest DCT scale 1/2, 1/4 or 1/8
   that keeps its shorter side >= ``jpeg_scale_to`` and its longer side >=
   ``max_side``: ``pipeline.data.images.jpeg_scale``), applies the
   EXIF orientation, converts to 8-bit RGB (alpha composited on white, 16-bit
   and float grayscale scaled, not clipped) and, when ``max_side`` is set and
   the longer side is over it, shrinks it once with a Lanczos filter
   (antialiased) keeping the aspect ratio: ``file_pixels``.
2. What prepare stores (``prepare_image``): the original bytes when TensorFlow's
   record decoder (``decode_image``: ``tf.io.decode_jpeg`` with
   ``dct_method="INTEGER_ACCURATE"``, which is the IDCT Pillow's libjpeg uses,
   or ``tf.io.decode_png``) accepts them and gives exactly those pixels;
   otherwise (a JPEG decoded at a scale among them) the pixels re-encoded
   losslessly as PNG. So a training record
   always decodes, and to the very pixels scoring gets from the file.
3. The one resize (``resize_images``): the whole image to ``image_size`` x
   ``image_size`` (no crop). A side longer than that is shrunk by area
   averaging (``tf.image.resize(method="area")``: each output pixel is the mean
   of the input area it covers, so fine detail cannot alias), then a side
   shorter than that is enlarged bilinearly (half-pixel centres); each step is
   an exact identity on the sides it does not change. tf.data calls it per
   image, predict and scoring per group of same-shape images; the results are
   bit-identical. Values are float32 in [0, 255]; the model scales them to
   [-1, 1] itself. Scoring sends them to its model actors rounded to uint8
   (at most 0.5 apart), a quarter of the bytes.

A run directory's ``preprocessing.json`` is ``Recipe.to_dict()``: score and
predict read it back (``Recipe.from_dict``) and apply that recipe, so a model
keeps being scored the way it was trained when the defaults change. A file
written before the recipe was recorded in full maps to what the code did then:
TensorFlow's default JPEG IDCT (``INTEGER_FAST``), resize without antialiasing,
no ``max_side``. Recipes before version 3 have no ``jpeg_scale_to``: full-size
JPEG decodes.

No Ray; TensorFlow is imported only inside the functions that need it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import exif_orientation, jpeg_scale_of, open_image, to_rgb, upright

RECIPE_VERSION = 3  # 3: jpeg_scale_to
ACCURATE = "INTEGER_ACCURATE"  # libjpeg's JDCT_ISLOW: the IDCT Pillow decodes with
TF_DEFAULT_DCT = "INTEGER_FAST"  # what tf.io.decode_jpeg uses when not told (JDCT_IFAST)
DCT_METHODS = (ACCURATE, TF_DEFAULT_DCT)
AREA_THEN_BILINEAR = "area_then_bilinear"  # area average to shrink, bilinear to enlarge
BILINEAR = "bilinear"  # bilinear both ways, no antialiasing (models recorded before the full recipe)
RESIZE_ANTIALIAS = {AREA_THEN_BILINEAR: True, BILINEAR: False}


@dataclass(frozen=True)
class Recipe:
    """Every choice between an image file and the model's input tensor.
    ``to_dict`` is what ``preprocessing.json`` holds."""

    image_size: int
    version: int = RECIPE_VERSION
    decoder: str = "pillow"  # files; shard records use TensorFlow's, verified identical by prepare
    jpeg_dct_method: str = ACCURATE
    orientation: str = "exif"  # EXIF orientation applied
    color: str = "RGB"
    alpha: str = "composite on white"
    high_bit_depth: str = "scaled to 8 bits"
    max_side: Optional[int] = None  # longer side shrunk to this, once, before anything else
    max_side_filter: str = "lanczos"
    # JPEGs decoded at the largest DCT scale keeping the shorter side >= this
    # (and the longer >= max_side): pipeline.data.images.jpeg_scale. None: full size (before version 3).
    jpeg_scale_to: Optional[int] = None
    resize_method: str = AREA_THEN_BILINEAR
    resize_antialias: bool = True  # follows from resize_method, written for the reader
    resize_geometry: str = "whole image to image_size x image_size, half-pixel centres, no crop"
    input_dtype: str = "float32"
    input_range: tuple[float, float] = (0.0, 255.0)
    scaling: str = "inside the model: x / 127.5 - 1 (InceptionV3)"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["input_range"] = list(self.input_range)
        if self.version < 3:
            del out["jpeg_scale_to"]  # as code before version 3 wrote it
        return out

    @classmethod
    def from_dict(cls, spec: dict) -> "Recipe":
        """A recipe from ``preprocessing.json``. A file without ``version`` was
        written before the recipe was recorded in full: it means TensorFlow's
        default JPEG IDCT, no antialiasing and no ``max_side``, which is how
        such models were trained. Raises ValueError for what this code cannot
        apply."""
        if not isinstance(spec, dict) or "image_size" not in spec:
            raise ValueError("no image_size")
        image_size = int(spec["image_size"])
        if image_size < 1:
            raise ValueError(f"image_size {image_size}")
        if "version" not in spec:
            return cls(image_size=image_size, version=1, jpeg_dct_method=TF_DEFAULT_DCT, resize_method=BILINEAR,
                       resize_antialias=False)
        version = int(spec["version"])
        if version > RECIPE_VERSION:
            raise ValueError(f"recipe version {version} is newer than this code's ({RECIPE_VERSION})")
        defaults = cls(image_size=image_size)
        known = {k: spec[k] for k in asdict(defaults) if k in spec}
        if "input_range" in known:
            known["input_range"] = tuple(float(v) for v in known["input_range"])
        if known.get("max_side") is not None:
            known["max_side"] = int(known["max_side"])
        scale_to = known.get("jpeg_scale_to")
        if scale_to is not None:
            if isinstance(scale_to, bool) or not isinstance(scale_to, int) or scale_to < 1:
                raise ValueError(f"jpeg_scale_to {scale_to!r} is not a positive integer or null")
            if version < 3:
                raise ValueError(f"jpeg_scale_to is new in recipe version 3 (this recipe is version {version})")
        recipe = cls(**{**known, "image_size": image_size, "version": version})
        fixed = ("decoder", "orientation", "color", "alpha", "high_bit_depth", "max_side_filter", "resize_geometry",
                 "input_dtype", "input_range", "scaling")
        for name in fixed:
            if getattr(recipe, name) != getattr(defaults, name):
                raise ValueError(f"{name} {getattr(recipe, name)!r} is not supported "
                                 f"(this code does {getattr(defaults, name)!r})")
        if recipe.jpeg_dct_method not in DCT_METHODS:
            raise ValueError(f"jpeg_dct_method {recipe.jpeg_dct_method!r} is not one of {DCT_METHODS}")
        if recipe.resize_method not in RESIZE_ANTIALIAS:
            raise ValueError(f"resize_method {recipe.resize_method!r} is not one of {tuple(RESIZE_ANTIALIAS)}")
        if recipe.resize_antialias is not RESIZE_ANTIALIAS[recipe.resize_method]:
            raise ValueError(f"resize_antialias {recipe.resize_antialias!r} contradicts resize_method "
                             f"{recipe.resize_method!r}")
        return recipe


def current_recipe(image_size: int, max_side: Optional[int] = None, jpeg_scale_to: Optional[int] = None) -> Recipe:
    """Today's recipe for a model of ``image_size`` trained on shards prepared
    with ``max_side`` and ``jpeg_scale_to``: version 3 only when
    ``jpeg_scale_to`` is set, else version 2 (the same pixels), so that code
    from before scaled decoding still scores such a model."""
    return Recipe(image_size=int(image_size), max_side=None if max_side is None else int(max_side),
                  version=RECIPE_VERSION if jpeg_scale_to is not None else 2,
                  jpeg_scale_to=None if jpeg_scale_to is None else int(jpeg_scale_to))


# ------------------------------------------------------------------- pixels


def shrink_to_max_side(img: Image.Image, max_side: Optional[int]) -> Image.Image:
    """``img`` with its longer side at most ``max_side`` (Lanczos, aspect kept);
    ``img`` itself when it is small enough."""
    width, height = img.size
    if max_side is None or max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    size = (max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale))))
    return img.resize(size, Image.Resampling.LANCZOS)


def pixels_of(img: Image.Image, max_side: Optional[int]) -> np.ndarray:
    """An opened (``open_image``) image -> uint8 HxWx3: upright, RGB, shrunk to
    ``max_side``. The one normalisation of prepare, score and predict."""
    return np.asarray(shrink_to_max_side(to_rgb(upright(img)), max_side), dtype=np.uint8)


def file_pixels(raw: bytes, recipe: Recipe, max_pixels: int) -> np.ndarray:
    """A file's bytes -> the uint8 HxWx3 pixels that ``recipe`` resizes into
    the model's input: for today's recipe, exactly what the training decoder
    gets from the record prepare writes for this file. Raises ImageRejected."""
    img = open_image(raw, max_pixels, jpeg_scale_to=recipe.jpeg_scale_to, max_side=recipe.max_side)
    if recipe.jpeg_dct_method != ACCURATE and _kept_by_old_prepare(img):
        # Such a model was trained on these very bytes, decoded by TensorFlow
        # with the recipe's IDCT (Pillow has only the accurate one).
        decoded = _tf_decode(raw, recipe.jpeg_dct_method)
        if decoded is not None:
            return decoded
    return pixels_of(img, recipe.max_side)


def _kept_by_old_prepare(img: Image.Image) -> bool:
    return img.format == "JPEG" and img.mode == "RGB" and exif_orientation(img) in (None, 1)


# ------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # what the record stores: JPEG or PNG bytes
    format: str  # "jpeg" or "png" (the record's image/format)
    width: int
    height: int
    reencoded: bool


def prepare_image(raw: bytes, *, max_pixels: int, max_side: Optional[int] = None,
                  jpeg_scale_to: Optional[int] = None, png_compress_level: int = 1) -> PreparedImage:
    """Validate ``raw`` and return the bytes of its training record: the
    original JPEG or PNG bytes when ``decode_image`` gives exactly the pixels
    ``file_pixels`` gives (then they are kept byte for byte), else those pixels
    as a lossless PNG (always for a JPEG decoded at a scale, ``jpeg_scale_to``).
    Raises ImageRejected with a reason for anything unusable; never returns
    bytes the training decoder cannot decode."""
    img = open_image(raw, max_pixels, jpeg_scale_to=jpeg_scale_to, max_side=max_side)
    pixels = pixels_of(img, max_side)
    height, width = pixels.shape[:2]
    if _may_keep(img, pixels):
        decoded = _tf_decode(raw, ACCURATE)
        if decoded is not None and np.array_equal(decoded, pixels):
            return PreparedImage(raw, "jpeg" if img.format == "JPEG" else "png", width, height, reencoded=False)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=png_compress_level)
    return PreparedImage(out.getvalue(), "png", width, height, reencoded=True)


def _may_keep(img: Image.Image, pixels: np.ndarray) -> bool:
    """Whether the original bytes can decode to ``pixels`` at all (saves a
    decode where they cannot): a JPEG or PNG of the same size, upright, in a
    mode TensorFlow expands to RGB the way Pillow converts it. The pixel
    comparison decides."""
    if img.format not in ("JPEG", "PNG") or pixels.shape[:2] != (img.height, img.width):
        return False
    if jpeg_scale_of(img) != 1:  # the bytes decode to the full size
        return False
    if exif_orientation(img) not in (None, 1):
        return False
    modes = ("RGB", "L") if img.format == "JPEG" else ("RGB", "L", "P", "1")
    return img.mode in modes and "transparency" not in img.info


def _tf_decode(raw: bytes, dct_method: str) -> Optional[np.ndarray]:
    """``decode_image`` on bytes, eagerly; None where TensorFlow refuses them."""
    import tensorflow as tf

    try:
        return decode_image(tf.constant(raw), dct_method).numpy()
    except (tf.errors.OpError, ValueError):
        return None


# ------------------------------------------------------------------- TensorFlow


def decode_image(data, dct_method: str = ACCURATE):
    """A record's bytes (scalar string tensor) -> uint8 HxWx3, JPEG with the
    recipe's IDCT, PNG losslessly (what prepare stores): ``tf.io.decode_jpeg``,
    which decodes PNGs too, as its documentation says. Works eagerly and inside
    tf.data."""
    import tensorflow as tf

    return tf.io.decode_jpeg(data, channels=3, dct_method=dct_method)


def resize_images(images, height, width, method: str = AREA_THEN_BILINEAR):
    """The one resize: uint8 or float [N, H, W, 3] -> float32 [N, height, width, 3]
    in [0, 255]. ``AREA_THEN_BILINEAR`` (today's recipe): sides longer than
    the target are shrunk by area averaging (``ResizeArea``, antialiased),
    then sides shorter than it are enlarged bilinearly (``ResizeBilinear``,
    half-pixel centres); on a side it does not change each step is an exact
    identity. ``BILINEAR``: bilinear both ways,
    without antialiasing, the recipe of models recorded before the full one."""
    import tensorflow as tf

    size = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)])
    if method == BILINEAR:
        out = tf.raw_ops.ResizeBilinear(images=images, size=size, half_pixel_centers=True)
    elif method == AREA_THEN_BILINEAR:
        # Both steps always run: each is an exact identity on the sides it does
        # not change, and that costs less than choosing per image (tf.cond).
        shrunk = tf.raw_ops.ResizeArea(images=images, size=tf.minimum(tf.shape(images)[1:3], size))
        out = tf.raw_ops.ResizeBilinear(images=shrunk, size=size, half_pixel_centers=True)
    else:
        raise ValueError(f"unknown resize method {method!r}")
    return tf.clip_by_value(out, 0.0, 255.0)


def resize_image(image, size: int, method: str = AREA_THEN_BILINEAR):
    """``resize_images`` for one uint8 HxWx3 tensor to ``size`` x ``size``
    (tf.data: training without augmentation, validation, evaluation, the gate)."""
    return resize_images(image[None], size, size, method)[0]


def resize_arrays(images: Sequence[np.ndarray], size: int, method: str = AREA_THEN_BILINEAR) -> list:
    """``resize_image`` for decoded uint8 HxWx3 arrays outside tf.data (score,
    predict): the same kernels called once per group of images of one shape,
    which saves most of the eager cost of resizing one at a time and gives
    exactly the pixels of ``resize_image``. The caller bounds how many images
    it passes at once."""
    import tensorflow as tf

    out: list = [None] * len(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for members in groups.values():
        batch = tf.convert_to_tensor(np.stack([images[i] for i in members]), dtype=tf.uint8)
        resized = resize_images(batch, size, size, method).numpy()
        for j, i in enumerate(members):
            out[i] = resized[j]
    return out


def model_inputs(pixels: Sequence[np.ndarray], recipe: Recipe) -> list:
    """Decoded pixels (``file_pixels``) -> the model's float32 inputs."""
    return resize_arrays(pixels, recipe.image_size, recipe.resize_method)
