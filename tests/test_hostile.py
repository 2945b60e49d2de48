"""Hostile and odd inputs: every kind is accounted for with a reason, good files
are used, nothing crashes; random bytes never escape the decode path as anything
but a rejection."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from PIL import Image

from jobs import prepare as prepare_job
from jobs._cli import run
from pipeline.images import ImageRejected, decode_rgb, prepare_image
from pipeline.shards import parse_example
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
    for rec in records:  # everything accepted decodes as RGB JPEG
        assert tf.io.decode_jpeg(rec["encoded"], channels=3).shape[-1] == 3
    assert "cannot read" in rejected["other/loop"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.sampled_from(range(len(VALID))), hs.lists(hs.tuples(hs.integers(0, 10**6), hs.integers(0, 255)),
                                                   max_size=8), hs.integers(0, 10**6))
def test_mutated_images_never_crash_the_decode_path(which, flips, cut):
    data = bytearray(VALID[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        out = prepare_image(data, max_pixels=LIMIT)
    except ImageRejected:
        return
    # accepted means usable: the bytes decode as RGB JPEG with the stated size
    img = tf.io.decode_jpeg(out.data, channels=3)
    assert tuple(img.shape) == (out.height, out.width, 3)


def test_manifest_entries_cannot_escape_the_shards_folder(tmp_path):
    from pipeline.config import StorageConfig
    from pipeline.errors import UsageError
    from pipeline.shards import read_manifest

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
