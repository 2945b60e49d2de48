"""Hostile and odd inputs: every kind is accounted for with a reason, good files
are used, nothing crashes; random bytes never escape the decode path as anything
but a rejection, and a file prepare accepts always gives a record that decodes in
tf.data, to the pixels scoring gets from the file.

The hypothesis tests run a fixed set of examples in `make test` (the "ci"
profile in conftest.py) and random ones in `make fuzz`."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example, given
from hypothesis import strategies as hs
from PIL import Image

from jobs import prepare as prepare_job
from jobs._cli import run
from pipeline.data import input as inp
from pipeline.data.images import ImageRejected, decode_rgb
from pipeline.data.preprocess import current_recipe, file_pixels, prepare_image
from pipeline.data.shards import make_example, parse_example
from tests import imagefactory as fx

LIMIT = 89_478_485


def hostile_tree(root) -> dict[str, object]:
    """Writes the corpus under two classes; returns {relative path: usable?}
    (None: either outcome is fine as long as it is accounted for)."""
    corpus = {**fx.bad_and_odd_corpus(), **fx.more_hostile_corpus()}
    expected = {}
    for name, (data, ok) in corpus.items():
        expected[f"good/{name}"] = ok
    deep = "other/" + "/".join(f"level{i}" for i in range(12)) + "/deep.jpg"
    expected[deep] = True
    expected["other/plain.jpg"] = True
    files = {rel: corpus[rel.split("/", 1)[1]][0] for rel in expected if rel.startswith("good/")}
    files[deep] = fx.rgb_jpeg((10, 10, 200))
    files["other/plain.jpg"] = fx.rgb_jpeg((10, 200, 10))
    fx.write_tree(str(root), files)
    os.symlink(str(root / "other"), str(root / "other" / "loop"))  # a symlink loop
    expected["other/loop"] = False
    return expected


@pytest.mark.slow
def test_prepare_accounts_for_every_hostile_file(ray_session, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected = hostile_tree(src)
    assert len(expected) >= 30
    assert run(prepare_job.main, ["--src", str(src), "--dst", str(dst), "--val-fraction", "0"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    rejected = {os.path.relpath(r["uri"], src): r["reason"] for r in manifest["rejected"]}
    records = [parse_example(r) for r in tf.data.TFRecordDataset(
        [str(dst / s["file"]) for s in manifest["splits"]["train"]["shards"]]).as_numpy_iterator()]
    accepted = {os.path.relpath(r["source"], src) for r in records}
    assert manifest["files_seen"] == len(expected)
    assert accepted | set(rejected) == set(expected) and not accepted & set(rejected)
    for rel, ok in expected.items():
        if ok is True:
            assert rel in accepted, (rel, rejected.get(rel))
        elif ok is False:
            assert rel in rejected and rejected[rel], rel
    for rec in records:  # everything accepted decodes with the training decoder, at its stated size
        image, _ = inp.decode_example(tf.constant(make_example(rec["encoded"], 0, "x", "x", 1, 1)))
        assert tuple(image.shape) == (rec["height"], rec["width"], 3)
    assert "cannot read" in rejected["other/loop"]


@given(hs.binary(max_size=4096))
def test_random_bytes_never_crash_the_decode_path(data):
    for fn in (lambda d: prepare_image(d, max_pixels=LIMIT, max_side=64), lambda d: decode_rgb(d, LIMIT)):
        try:
            fn(data)
        except ImageRejected:
            pass


def _valid_images() -> list[bytes]:
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
        buf = io.BytesIO()
        noise.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


VALID = _valid_images()


def mutate(which: int, flips: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(VALID[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    return bytes(data[: max(1, cut % (len(data) + 1))])


def decode_in_tf_data(record: bytes) -> np.ndarray:
    """The record through the training pipeline's decoder, inside tf.data."""
    ds = tf.data.Dataset.from_tensors(record).map(inp.decode_example)
    return next(iter(ds))[0].numpy()


# Pillow decodes this damaged JPEG; TensorFlow's decoder refuses it (a file that
# prepare once kept byte for byte and that then crashed training).
@example(which=0, flips=[(231, 0)], cut=701)
@given(hs.sampled_from(range(len(VALID))), hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)),
                                                   max_size=8), hs.integers(0, 10**6))
def test_mutated_images_never_crash_the_decode_path(which, flips, cut):
    data = mutate(which, flips, cut)
    try:
        out = prepare_image(data, max_pixels=LIMIT)
    except ImageRejected as exc:
        assert str(exc)  # a rejection always has a reason
        return
    # Accepted means usable: the record decodes in tf.data, at the stated size,
    # to exactly the pixels scoring gets from the file itself.
    record = make_example(out.data, 0, "x", "x", out.height, out.width, image_format=out.format)
    pixels = decode_in_tf_data(record)
    assert pixels.shape == (out.height, out.width, 3)
    np.testing.assert_array_equal(pixels, file_pixels(data, current_recipe(75), LIMIT))


def test_the_damaged_jpeg_is_stored_as_a_decodable_png():
    data = mutate(0, [(231, 0)], 701)
    with pytest.raises(tf.errors.InvalidArgumentError):  # the training decoder refuses the file itself
        tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    out = prepare_image(data, max_pixels=LIMIT)
    assert out.reencoded and out.format == "png" and out.data.startswith(b"\x89PNG")
    pixels = decode_in_tf_data(make_example(out.data, 0, "x", "x", out.height, out.width, image_format="png"))
    np.testing.assert_array_equal(pixels, np.asarray(decode_rgb(data, LIMIT)))


def test_manifest_entries_cannot_escape_the_shards_folder(tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.errors import UsageError
    from pipeline.data.shards import read_manifest

    secret = tmp_path / "outside.tfrecord"
    secret.write_bytes(b"not yours")
    shards = tmp_path / "shards"
    shards.mkdir()
    for bad in ("../outside.tfrecord", str(secret), "sub/../../outside.tfrecord", "s3://elsewhere/x.tfrecord"):
        manifest = {"format_version": 1, "classes": ["a", "b"],
                    "splits": {"train": {"shards": [{"file": bad, "examples": 1}]}, "validation": {"shards": []}}}
        (shards / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UsageError, match="not a plain .tfrecord file name"):
            read_manifest(str(shards), StorageConfig())
