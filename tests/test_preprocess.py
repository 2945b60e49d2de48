"""One path from file to model input (pipeline.data.preprocess): for every kind of
accepted file, the tensor evaluation feeds the model from the file's shard
record equals, bit for bit, the tensor score and predict make from the file;
the recipe written with a model reads back as written, and an old one as what
the code did when it was written."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jobs.predict import read_inputs
from pipeline.data import input as inp
from pipeline.artifact import preprocessing_spec
from pipeline.config import StorageConfig, load_config
from pipeline.data.images import jpeg_scale, open_image
from pipeline.data.preprocess import (ACCURATE, TF_DEFAULT_DCT, Recipe, current_recipe, file_pixels, prepare_image,
                                 shrink_to_max_side)
from pipeline.scoring.decode import NO_ERROR, read_and_decode, to_uint8
from pipeline.data.shards import make_example, parse_example
from tests import imagefactory as fx

SIZE = 75
LIMIT = 89_478_485


def detailed(width: int, height: int, seed: int = 0) -> Image.Image:
    """Fine detail at every scale: noise over stripes of several periods."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(x / 1.3) * np.cos(y / 2.1) + 40 * np.sin((x + 2 * y) / 7.0)
    arr = np.stack([base, np.roll(base, 3, axis=1), 255 - base], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


T = Image.Transpose
# How a camera stores an upright picture for each EXIF orientation (the inverse
# of what the orientation tells a viewer to do).
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90,
             7: T.TRANSVERSE, 8: T.ROTATE_270}


def exif_jpeg(orientation: int) -> bytes:
    """An upright 48x30 picture (blue, a red block top left), stored turned as
    ``orientation`` says, with that orientation in its EXIF."""
    img = Image.new("RGB", (48, 30), (20, 40, 220))
    img.paste((230, 30, 30), (0, 0, 20, 12))
    if STORED_AS[orientation] is not None:
        img = img.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return fx.encode(img, "JPEG", quality=92, exif=exif.tobytes())


@functools.lru_cache(maxsize=1)
def parity_corpus() -> dict[str, bytes]:
    noise = detailed(120, 90, seed=1)
    rgba = noise.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(noise.size))
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return {
        "baseline.jpg": fx.encode(noise, "JPEG", quality=90),
        "progressive.jpg": fx.encode(noise, "JPEG", quality=80, progressive=True),
        "alpha.png": fx.encode(rgba, "PNG"),
        "palette.gif": fx.encode(noise.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "GIF"),
        "sixteen-bit.png": fx.encode(Image.fromarray(ramp), "PNG"),
        "cmyk.jpg": fx.encode(noise.convert("CMYK"), "JPEG", quality=90),
        "gray.jpg": fx.encode(noise.convert("L"), "JPEG", quality=90),
        **{f"exif-{o}.jpg": exif_jpeg(o) for o in range(2, 9)},
        "detailed-4000x3000.jpg": fx.encode(Image.fromarray(np.tile(np.asarray(detailed(1000, 750, seed=2)), (4, 4, 1))),
                                            "JPEG", quality=85),
        "one-pixel.png": fx.encode(Image.new("RGB", (1, 1), (12, 200, 99)), "PNG"),
        "rgb.png": fx.encode(noise, "PNG"),
    }


def prepare_shard(tmp_path, files: dict[str, bytes], max_side, jpeg_scale_to=None) -> tuple[str, list[str], list]:
    """Each file as prepare stores it, in one shard (label = index), and the files
    themselves as score and predict read them."""
    src = tmp_path / "src"
    src.mkdir()
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    uris, prepared = [], []
    with tf.io.TFRecordWriter(shard) as writer:
        for label, (name, data) in enumerate(files.items()):
            (src / name).write_bytes(data)
            uris.append(str(src / name))
            out = prepare_image(data, max_pixels=LIMIT, max_side=max_side, jpeg_scale_to=jpeg_scale_to)
            writer.write(make_example(out.data, label, "c", uris[-1], out.height, out.width, image_format=out.format))
            prepared.append(out)
    return shard, uris, prepared


def evaluation_inputs(shard: str, count: int, recipe=None) -> np.ndarray:
    """What evaluation (and the gate) feed the model: make_dataset, validation mode."""
    ds = inp.make_dataset([shard], image_size=SIZE, batch_size=count,
                          training=False, repeat=False, recipe=recipe)
    images, labels = next(iter(ds))
    assert labels.numpy().tolist() == list(range(count))  # every record decoded, in order
    return images.numpy()


def score_inputs(uris: list[str], recipe: Recipe) -> np.ndarray:
    batch = {"uri": np.array(uris, dtype=object), "size": np.full(len(uris), -1)}
    out = read_and_decode(batch, storage=StorageConfig(), recipe=recipe, max_bytes=2**30, max_pixels=LIMIT)
    assert list(out["error"]) == [NO_ERROR] * len(uris)
    return out["image"]


@pytest.mark.parametrize("max_side, jpeg_scale_to", [(None, None), (64, None), (None, 40), (300, 40)],
                         ids=["full-size", "max-side-64", "jpeg-scale-to-40", "max-side-300-jpeg-scale-to-40"])
def test_scoring_and_predict_give_the_model_exactly_what_evaluation_gives_it(tmp_path, max_side, jpeg_scale_to):
    """jpeg_scale_to 40 (below the model's 75, which training refuses, so that
    the small JPEGs of the corpus are scaled too): 120x90 at 1/2 (not with
    max_side 300: 60 < 300), 4000x3000 at 1/8 (with max_side 300 as well: 500
    >= 300, then Lanczos to 300), 48x30 not at all."""
    files = parity_corpus()
    if max_side is not None:  # the large image is shrunk once by prepare, and by score and predict alike
        files = {name: files[name] for name in ("baseline.jpg", "alpha.png", "exif-6.jpg", "detailed-4000x3000.jpg",
                                                "one-pixel.png", "rgb.png")}
    shard, uris, prepared = prepare_shard(tmp_path, files, max_side, jpeg_scale_to)
    spec = preprocessing_spec(SIZE, max_side, jpeg_scale_to)
    recipe = Recipe.from_dict(json.loads(json.dumps(spec)))  # as the artifact has it
    assert recipe.jpeg_scale_to == jpeg_scale_to and recipe.version == (2 if jpeg_scale_to is None else 3)

    evaluated = evaluation_inputs(shard, len(files))
    scored = score_inputs(uris, recipe)
    ok, predicted, rejected = read_inputs(load_config(), uris, recipe)
    assert ok == uris and not rejected
    for i, name in enumerate(files):
        # Scoring sends the model's input to the predictor as uint8: the nearest values.
        np.testing.assert_array_equal(scored[i], to_uint8(evaluated[i]), err_msg=f"score vs evaluation: {name}")
        np.testing.assert_array_equal(predicted[i], evaluated[i], err_msg=f"predict vs evaluation: {name}")

    kept = {name for name, out in zip(files, prepared) if not out.reencoded}
    sizes = {name: (out.width, out.height) for name, out in zip(files, prepared)}
    if jpeg_scale_to is not None:  # a scaled JPEG's record is its pixels as PNG
        if max_side is None:
            assert kept == {"one-pixel.png", "rgb.png"} and sizes["baseline.jpg"] == (60, 45)
        else:  # 120x90 is not scaled: 60 < max_side
            assert kept == {"baseline.jpg", "one-pixel.png", "rgb.png"} and sizes["baseline.jpg"] == (120, 90)
        assert sizes["exif-6.jpg"] == (48, 30)
        assert sizes["detailed-4000x3000.jpg"] == ((500, 375) if max_side is None else (300, 225))
    elif max_side is None:
        assert kept == {"baseline.jpg", "progressive.jpg", "gray.jpg", "detailed-4000x3000.jpg", "one-pixel.png",
                        "rgb.png"}
    else:
        assert kept == {"one-pixel.png"}  # everything larger than 64 px is shrunk, so re-encoded
        for out in prepared:
            assert max(out.width, out.height) <= 64


def test_exif_orientations_come_out_upright():
    """Every orientation gives the same upright picture: 48 wide, 30 tall, the
    red block top left."""
    recipe = current_recipe(SIZE)
    for orientation in range(1, 9):
        px = file_pixels(exif_jpeg(orientation), recipe, LIMIT).astype(int)
        assert px.shape == (30, 48, 3), orientation
        assert px[3, 3, 0] > 180 and px[3, 3, 2] < 90, orientation  # red, top left
        assert px[26, 44, 2] > 180 and px[26, 44, 0] < 90, orientation  # blue, bottom right


def test_shrink_to_max_side_keeps_aspect_and_leaves_small_images_alone():
    img = detailed(400, 150)
    small = shrink_to_max_side(img, 100)
    assert small.size == (100, 38)
    assert shrink_to_max_side(img, 400) is img and shrink_to_max_side(img, None) is img
    assert shrink_to_max_side(Image.new("RGB", (1000, 1)), 100).size == (100, 1)


def test_recipe_round_trips_through_preprocessing_json():
    recipe = current_recipe(299, max_side=800, jpeg_scale_to=299)
    written = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(written) == recipe and written["version"] == 3 and written["jpeg_scale_to"] == 299
    for key in ("jpeg_dct_method", "orientation", "color", "alpha", "max_side", "max_side_filter", "resize_method",
                "resize_antialias", "image_size", "input_range", "decoder", "jpeg_scale_to"):
        assert key in written
    assert written["jpeg_dct_method"] == ACCURATE and written["resize_antialias"] is True
    assert written["max_side"] == 800 and written["input_range"] == [0.0, 255.0]


def test_a_recipe_without_scaled_decoding_is_written_as_version_2():
    """What code from before scaled decoding can read: a model that does not
    use it keeps recording version 2, without the new key (that code refuses
    a newer version)."""
    written = json.loads(json.dumps(current_recipe(299, max_side=800).to_dict()))
    assert written["version"] == 2 and "jpeg_scale_to" not in written
    assert Recipe.from_dict(written) == current_recipe(299, max_side=800)


def test_a_recipe_written_before_the_full_recipe_means_the_old_behaviour():
    old = {"image_size": 150, "color": "RGB",
           "decode": "any supported format; EXIF orientation applied; alpha composited on white",
           "resize": "bilinear to image_size x image_size, no crop (tf.image.resize)",
           "input_range": "float32 in [0, 255]", "scaling": "inside the model: x / 127.5 - 1 (InceptionV3)"}
    recipe = Recipe.from_dict(old)
    assert recipe.image_size == 150 and recipe.version == 1
    assert recipe.jpeg_dct_method == TF_DEFAULT_DCT and recipe.resize_antialias is False and recipe.max_side is None


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "newer than this code"),
    ({"resize_method": "lanczos3"}, "resize_method"),
    ({"jpeg_dct_method": "FLOAT"}, "jpeg_dct_method"),
    ({"orientation": "ignore"}, "orientation"),
    ({"resize_antialias": "yes"}, "resize_antialias"),
    ({"jpeg_scale_to": 0}, "jpeg_scale_to"),
    ({"jpeg_scale_to": "299"}, "jpeg_scale_to"),
    ({"jpeg_scale_to": 7.5}, "jpeg_scale_to"),
    ({"jpeg_scale_to": True}, "jpeg_scale_to"),
    ({"jpeg_scale_to": 299, "version": 2}, "version 3"),
])
def test_a_recipe_this_code_cannot_apply_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict({**current_recipe(75).to_dict(), **change})


@pytest.mark.parametrize("width, height, scale_to, max_side, scale", [
    (1600, 1200, None, None, 1),  # off
    (1600, 1200, 75, None, 8),  # 200x150
    (1200, 1600, 75, None, 8),  # portrait alike
    (1600, 1200, 150, None, 8),  # 150 exactly
    (1600, 1200, 151, None, 4),
    (1600, 1200, 299, None, 4),  # 400x300
    (1600, 1200, 301, None, 2),
    (1601, 1193, 150, None, 8),  # odd sizes round up, as libjpeg's: ceil(1193 / 8) = 150
    (1600, 1192, 150, None, 4),  # 149 at 1/8
    (597, 333, 167, None, 2),  # ceil(333 / 2) = 167
    (299, 299, 299, None, 1),  # the shorter side is the target already
    (10, 8, 16, None, 1),  # tiny: smaller than the target
    (17, 9, 1, None, 8),  # down to 3x2
    (9, 7, 1, None, 4),  # never past the shorter side (7 < 8)
    (1600, 1200, 75, 800, 2),  # 800x600: the longer side stays >= max_side
    (1600, 1200, 75, 400, 4),
    (1600, 1200, 75, 401, 2),
    (1600, 1200, 299, 1000, 1),  # 800 < 1000 at 1/2
    (1600, 1200, 75, 2000, 1),  # smaller than max_side: never scaled
])
def test_the_jpeg_scale_rule(width, height, scale_to, max_side, scale):
    assert jpeg_scale(width, height, scale_to, max_side) == scale
    assert jpeg_scale(height, width, scale_to, max_side) == scale  # only the shorter and longer sides count


def test_jpegs_decode_at_the_rules_scale_and_other_formats_at_full_size():
    """open_image asks Pillow's draft for exactly the rule's scale (libjpeg's
    ceil sizes) on odd and tiny sizes; PNG, WebP, GIF and BMP are untouched."""
    for (width, height), scale_to, max_side, size in [
        ((161, 121), 16, None, (21, 16)),  # 1/8: ceil(121 / 8) = 16
        ((161, 119), 16, None, (41, 30)),  # ceil(119 / 8) = 15 < 16: 1/4
        ((161, 121), 40, None, (81, 61)),  # 1/2
        ((161, 121), 16, 80, (81, 61)),  # 1/4 would leave the longer side 41 < 80
        ((17, 9), 1, None, (3, 2)),  # 1/8 of a tiny image
        ((9, 7), 1, None, (3, 2)),  # 1/4: 7 < 8
        ((30, 20), 16, None, (30, 20)),  # not scaled
    ]:
        scale = jpeg_scale(width, height, scale_to, max_side)
        img = open_image(fx.encode(detailed(width, height), "JPEG", quality=90), LIMIT, jpeg_scale_to=scale_to,
                         max_side=max_side)
        assert img.size == size == (-(-width // scale), -(-height // scale)), (width, height, scale_to, max_side)
    noise = detailed(160, 120)
    for fmt in ("PNG", "WEBP", "GIF", "BMP"):
        raw = fx.encode(noise if fmt != "GIF" else noise.convert("P"), fmt)
        assert open_image(raw, LIMIT, jpeg_scale_to=16).size == (160, 120), fmt
        np.testing.assert_array_equal(file_pixels(raw, current_recipe(SIZE, jpeg_scale_to=16), LIMIT),
                                      file_pixels(raw, current_recipe(SIZE), LIMIT), err_msg=fmt)


def test_a_version_2_recipe_decodes_jpegs_at_full_size():
    """preprocessing.json of a model trained before version 3 (no
    jpeg_scale_to) gives exactly the pixels it gave then: a full decode."""
    raw = fx.encode(detailed(400, 300, seed=6), "JPEG", quality=90)
    v2 = {k: v for k, v in current_recipe(SIZE).to_dict().items() if k != "jpeg_scale_to"}
    recipe = Recipe.from_dict({**v2, "version": 2})
    assert recipe.version == 2 and recipe.jpeg_scale_to is None
    full = tf.io.decode_jpeg(raw, channels=3, dct_method=ACCURATE).numpy()
    np.testing.assert_array_equal(file_pixels(raw, recipe, LIMIT), full)
    assert file_pixels(raw, current_recipe(SIZE, jpeg_scale_to=SIZE), LIMIT).shape == (75, 100, 3)  # v3: 1/4


def test_old_recipe_decodes_jpeg_with_tensorflows_default_idct():
    """A model recorded before the full recipe was trained on the JPEG bytes
    decoded with TensorFlow's default IDCT; scoring it does the same."""
    raw = fx.encode(detailed(90, 60), "JPEG", quality=90)
    legacy = Recipe.from_dict({"image_size": SIZE})
    expected = tf.io.decode_jpeg(raw, channels=3).numpy()
    np.testing.assert_array_equal(file_pixels(raw, legacy, LIMIT), expected)
    accurate = file_pixels(raw, current_recipe(SIZE), LIMIT)
    np.testing.assert_array_equal(accurate, tf.io.decode_jpeg(raw, channels=3, dct_method=ACCURATE).numpy())
    assert not np.array_equal(accurate, expected)


def test_the_gate_reads_an_old_model_the_way_it_is_scored(tmp_path):
    """The promotion gate evaluates the production model on today's shards with
    that model's own recipe: for a JPEG kept byte for byte, the tensor it gets
    is the tensor scoring gives that model from the file (TensorFlow's default
    IDCT, bilinear resize), not today's."""
    files = {"kept.jpg": fx.encode(detailed(300, 200, seed=3), "JPEG", quality=90)}
    shard, uris, prepared = prepare_shard(tmp_path, files, None)
    assert not prepared[0].reencoded
    legacy = Recipe.from_dict({"image_size": SIZE})

    gate = evaluation_inputs(shard, 1, recipe=legacy)
    np.testing.assert_array_equal(to_uint8(gate[0]), score_inputs(uris, legacy)[0])  # scoring ships uint8
    assert np.abs(gate[0] - evaluation_inputs(shard, 1)[0]).max() > 1  # today's recipe would differ
    with pytest.raises(ValueError, match="evaluation only"):
        inp.make_dataset([shard], image_size=SIZE, batch_size=1, training=True, recipe=legacy)


def test_every_record_decodes_and_says_its_format(tmp_path):
    files = {"a.jpg": fx.rgb_jpeg(), "b.bmp": fx.bmp(), "c.png": fx.rgba_png()}
    shard, _, prepared = prepare_shard(tmp_path, files, None)
    records = [parse_example(r) for r in tf.data.TFRecordDataset([shard]).as_numpy_iterator()]
    assert [r["format"] for r in records] == ["jpeg", "png", "png"] == [p.format for p in prepared]
    for rec in records:
        assert Image.open(io.BytesIO(rec["encoded"])).format.lower() == rec["format"]
