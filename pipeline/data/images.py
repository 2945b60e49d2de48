"""Open, validate and normalise image files with Pillow (no TensorFlow): the
steps of ``pipeline.data.preprocess`` that turn any accepted file into upright 8-bit
RGB. Nothing here raises on bad data but ImageRejected, whose message is the
reason.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
JPEG_SCALES = (8, 4, 2)  # libjpeg's scaled IDCT: 1/8, 1/4, 1/2 (1/1 is a full decode), largest first
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_EXIF_ORIENTATION = 0x0112


class ImageRejected(Exception):
    """The bytes are not a usable image; ``str(exc)`` is the reason."""


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def jpeg_scale_fits(width, height, scale: int, scale_to, max_side):
    """Whether a JPEG of ``width`` x ``height`` decoded at 1/``scale`` (libjpeg's
    size: ceil(width / scale) x ceil(height / scale)) keeps its shorter side
    >= ``scale_to`` and, when ``max_side`` is set, its longer side >=
    ``max_side``; a side is never scaled below one pixel per scale step. Plain
    arithmetic, comparisons and ``&`` / ``|``, so that it works on Python ints
    and on TensorFlow tensors alike (pipeline.export.graph)."""
    scaled_w, scaled_h = (width + scale - 1) // scale, (height + scale - 1) // scale
    fits = (scaled_w >= scale_to) & (scaled_h >= scale_to) & (width >= scale) & (height >= scale)
    if max_side is not None:
        fits = fits & ((scaled_w >= max_side) | (scaled_h >= max_side))
    return fits


def jpeg_scale(width: int, height: int, scale_to: Optional[int], max_side: Optional[int] = None) -> int:
    """The recipe's ``jpeg_scale_to`` rule: the denominator (1, 2, 4 or 8) of the
    largest DCT scale at which a JPEG of ``width`` x ``height`` is decoded. The
    decoded image's shorter side stays >= ``scale_to`` and, with ``max_side``,
    its longer side >= ``max_side`` (so the ``max_side`` shrink stays the last
    shrink before the resize). ``scale_to`` None: 1 (full-size decode)."""
    if scale_to is None:
        return 1
    for scale in JPEG_SCALES:
        if jpeg_scale_fits(width, height, scale, scale_to, max_side):
            return scale
    return 1


def jpeg_scale_refusal(image_size: int, scale_to: Optional[int]) -> Optional[str]:
    """Why a model input of ``image_size`` cannot be trained from shards
    prepared with ``jpeg_scale_to`` = ``scale_to`` (their JPEGs hold a shorter
    side of about that size, so the model input would be enlarged from them),
    or None when it can. Prepare and training refuse with it."""
    if scale_to is None or image_size <= scale_to:
        return None
    return (f"data.image_size={image_size} is larger than prepare.jpeg_scale_to={scale_to} (JPEGs decoded down "
            f"to a shorter side of {scale_to}); train with data.image_size <= {scale_to}, or prepare with "
            f"prepare.jpeg_scale_to >= {image_size} (or null: full-size decode)")


def open_image(raw: bytes, max_pixels: int, *, jpeg_scale_to: Optional[int] = None,
               max_side: Optional[int] = None) -> Image.Image:
    """Open, check format and size, and fully decode (first frame of animations);
    a JPEG at the scale ``jpeg_scale(width, height, jpeg_scale_to, max_side)``
    (libjpeg's scaled IDCT through Pillow's ``draft``; ``jpeg_scale_to`` None:
    full size). Raises ImageRejected with a reason."""
    if not raw:
        raise ImageRejected("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our own pixel limit below replaces PIL's warning; PIL still raises
        # DecompressionBombError for far larger images, which we report.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError:
            raise ImageRejected("not an image (unrecognised data)") from None
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"decompression bomb: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file
            raise ImageRejected(f"corrupt image header: {_short(exc)}") from None
        if img.format not in ACCEPTED_FORMATS:
            raise ImageRejected(f"unsupported image format {img.format}")
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageRejected(f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(
                f"too many pixels: {width}x{height} is over the limit of {max_pixels} "
                "(prepare.max_pixels; possible decompression bomb)"
            )
        if img.format == "JPEG" and jpeg_scale_to is not None:
            _draft(img, jpeg_scale(width, height, jpeg_scale_to, max_side))
        try:
            img.seek(0)
            img.load()
        except Exception as exc:  # noqa: BLE001
            raise ImageRejected(f"corrupt or truncated image data: {_short(exc)}") from None
    return img


def _draft(img: Image.Image, scale: int) -> None:
    """Make Pillow decode the JPEG ``img`` (not yet loaded) at 1/``scale``.
    ``JpegImageFile.draft(mode, size)`` picks the largest of 8, 4, 2, 1 that is
    at most ``min(width // size[0], height // size[1])``; for
    ``size = (width // scale, height // scale)`` that minimum lies in
    [scale, 2 * scale) because both sides are >= ``scale`` (``jpeg_scale_fits``)."""
    if scale == 1:
        return
    width, height = img.size
    img.draft(None, (width // scale, height // scale))
    expected = ((width + scale - 1) // scale, (height + scale - 1) // scale)
    if img.size != expected or jpeg_scale_of(img) != scale:
        raise RuntimeError(f"Pillow's draft gave {img.size} for {width}x{height} at 1/{scale}, not {expected}")


def jpeg_scale_of(img: Image.Image) -> int:
    """The denominator ``open_image`` decoded ``img`` at (1: full size)."""
    config = getattr(img, "decoderconfig", ())
    return int(config[0]) if img.format == "JPEG" and config else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited on white, 16-bit and
    float grayscale are scaled rather than clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        else:
            arr = arr / top * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(raw: bytes, max_pixels: int) -> Image.Image:
    """Bytes to an upright RGB image (EXIF orientation applied)."""
    return to_rgb(upright(open_image(raw, max_pixels)))


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, if any (``img`` itself when there is none)."""
    if exif_orientation(img) not in range(2, 9):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        return img


def exif_orientation(img: Image.Image) -> Optional[int]:
    """The EXIF orientation tag (1 to 8), or None."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
