"""The prepare job end to end: local paths and s3:// on a real S3-protocol server;
every file is accounted for; the shards read back with plain tf.data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jobs import prepare as prepare_job
from jobs._cli import run
from pipeline.artifact import manifest_preprocessing_spec
from pipeline.data import demo_data
from pipeline.data.prepare import split_by_hash
from pipeline.data.input import decode_example
from pipeline.data.shards import make_example, parse_example
from tests import imagefactory as fx
from tests.test_preprocess import detailed


def read_split(dst: str, manifest: dict, split: str) -> list[dict]:
    files = [os.path.join(dst, s["file"]) for s in manifest["splits"][split]["shards"]]
    if not files:
        return []
    return [parse_example(r) for r in tf.data.TFRecordDataset(files).as_numpy_iterator()]


def check_shards_match_manifest(dst: str, manifest: dict) -> list[dict]:
    """Every record decodes with the training decoder, at its stated size and
    format, with the manifest's label for its class."""
    records = []
    for split in ("train", "validation"):
        recs = read_split(dst, manifest, split)
        info = manifest["splits"][split]
        assert len(recs) == info["num_examples"] == sum(s["examples"] for s in info["shards"])
        for rec in recs:
            assert manifest["classes"][rec["label"]] == rec["text"]
            img, _ = decode_example(tf.constant(make_example(rec["encoded"], 0, "x", "x", 1, 1)))
            assert rec["format"] == ("jpeg" if rec["encoded"][:2] == b"\xff\xd8" else "png")
            assert tuple(img.shape) == (rec["height"], rec["width"], 3)
            rec["split"] = split
        counts = {c: 0 for c in manifest["classes"]}
        for rec in recs:
            counts[rec["text"]] += 1
        assert counts == info["class_counts"]
        records.extend(recs)
    return records


@pytest.mark.slow
def test_prepare_local_accounts_for_every_file(ray_session, tmp_path):
    src = tmp_path / "raw images"  # a space in the root too
    demo_data.generate(str(src), per_class=12, classes=["circle", "square", "triangle"])
    corpus = fx.bad_and_odd_corpus()
    fx.write_tree(str(src), {f"circle/odd/{name}": data for name, (data, _) in corpus.items()})
    fx.write_tree(str(src), {"README.txt": b"top-level file", "square/.hidden/x.jpg": fx.rgb_jpeg()})
    # A camera-sized JPEG: the default prepare.jpeg_scale_to (299) decodes it at 1/2 (700x500; 1/4 would
    # leave a shorter side of 250).
    big = fx.encode(detailed(1400, 1000, seed=2), "JPEG", quality=90)
    fx.write_tree(str(src), {"triangle/big photo.jpg": big})
    dst = tmp_path / "shards"

    code = run(prepare_job.main, ["--src", str(src), "--dst", str(dst), "--set", "prepare.min_examples_per_shard=8"])
    assert code == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    summary = json.loads((dst / "summary.json").read_text())

    n_good = 37 + sum(ok for _, ok in corpus.values())
    n_seen = 37 + len(corpus) + 2
    assert manifest["files_seen"] == summary["files_seen"] == n_seen
    assert manifest["accepted"] == n_good
    assert manifest["accepted"] + len(manifest["rejected"]) == n_seen
    assert manifest["classes"] == ["circle", "square", "triangle"]

    rejected = {os.path.basename(r["uri"]): r["reason"] for r in manifest["rejected"]}
    expected_bad = {name for name, (_, ok) in corpus.items() if not ok} | {"README.txt", "x.jpg"}
    assert set(rejected) == expected_bad
    assert rejected["README.txt"] == "not inside a class folder"
    assert rejected["x.jpg"] == "inside a hidden folder"
    assert "empty file" in rejected["zero.jpg"]
    assert "too many pixels" in rejected["bomb.png"] or "decompression bomb" in rejected["bomb.png"]

    records = check_shards_match_manifest(str(dst), manifest)
    sources = {r["source"] for r in records}
    assert len(sources) == n_good  # no duplicates
    assert str(src / "circle" / "odd" / "ünïcödé 画像.jpg") in sources
    # the odd-but-good files are labelled by their class folder
    for rec in records:
        assert rec["source"].startswith(str(src / rec["text"]) + os.sep)
    # the deterministic split by path hash is what the records say
    for rec in records:
        rel = os.path.relpath(rec["source"], src)
        assert rec["split"] == split_by_hash(rel, 0.2)
    # plain RGB JPEGs are kept byte for byte
    plain = next(r for r in records if r["source"].endswith("plain rgb.jpg"))
    assert plain["encoded"] == corpus["plain rgb.jpg"][0]
    # ... and a large one is decoded at a scale and stored losslessly, with its scaled pixels
    assert manifest["settings"]["jpeg_scale_to"] == 299
    scaled = next(r for r in records if r["source"].endswith("big photo.jpg"))
    assert scaled["format"] == "png" and (scaled["width"], scaled["height"]) == (700, 500)
    reference = Image.open(io.BytesIO(big))
    reference.draft("RGB", (700, 500))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(scaled["encoded"])).convert("RGB")),
                          np.asarray(reference.convert("RGB")))
    # several train shards, config saved
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    assert (dst / "config.yaml").exists()
    assert not [p for p in os.listdir(dst) if p.startswith(".tmp-")]

    # A second run does not overwrite silently.
    assert run(prepare_job.main, ["--src", str(src), "--dst", str(dst)]) == 2


@pytest.mark.slow
def test_prepare_uses_existing_train_validation_split(ray_session, tmp_path):
    src = tmp_path / "split"
    demo_data.generate(str(src / "train"), per_class=6, classes=["circle", "square"])
    demo_data.generate(str(src / "validation"), per_class=3, seed=1, classes=["circle", "square"])
    fx.write_tree(str(src), {"extra/circle/a.jpg": fx.rgb_jpeg()})
    dst = tmp_path / "out"
    # With prepare.jpeg_scale_to the 128x128 JPEGs are decoded at 1/4 and stored as PNG.
    assert run(prepare_job.main, ["--src", str(src), "--dst", str(dst), "--val-fraction", "0.9",
                                  "--set", "prepare.jpeg_scale_to=32"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["settings"]["jpeg_scale_to"] == 32
    assert manifest_preprocessing_spec(75, manifest)["jpeg_scale_to"] == 32  # what training writes
    assert manifest["layout"] == "split"
    assert manifest["splits"]["train"]["class_counts"] == {"circle": 6, "square": 6}
    assert manifest["splits"]["validation"]["class_counts"] == {"circle": 3, "square": 3}
    assert manifest["rejected"] == [{"uri": str(src / "extra/circle/a.jpg"), "reason": "outside train/ and validation/"}]
    records = check_shards_match_manifest(str(dst), manifest)
    for rec in records:
        assert f"{os.sep}{rec['split']}{os.sep}" in rec["source"]
        side = 32 if rec["source"].endswith(".jpg") else 128
        assert (rec["format"], rec["width"], rec["height"]) == ("png", side, side), rec["source"]


@pytest.mark.slow
@pytest.mark.s3
def test_prepare_on_s3(ray_session, s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    local = tmp_path / "imgs"
    demo_data.generate(str(local), per_class=8, classes=["circle", "square", "stripes"])
    fx.write_tree(str(local), {"stripes/broken.jpg": fx.truncated_jpeg(), "square/empty.png": b""})
    fs.put(str(local) + "/", f"{bucket}/raw/", recursive=True)
    src, dst = f"s3://{bucket}/raw", f"s3://{bucket}/shards"

    assert run(prepare_job.main, ["--src", src, "--dst", dst, "--shard-size-mb", "0.01"]) == 0
    manifest = json.loads(fs.cat_file(f"{bucket}/shards/manifest.json"))
    assert manifest["files_seen"] == 26 and manifest["accepted"] == 24
    assert {r["uri"] for r in manifest["rejected"]} == {f"{src}/stripes/broken.jpg", f"{src}/square/empty.png"}
    # small shard size: several shards per split
    assert len(manifest["splits"]["train"]["shards"]) > 2

    fs.get(f"{bucket}/shards/", str(tmp_path / "got") + "/", recursive=True)
    records = check_shards_match_manifest(str(tmp_path / "got"), manifest)
    assert {r["source"] for r in records} == {
        f"{src}/{c}/{n}" for c in ("circle", "square", "stripes") for n in os.listdir(local / c)
    } - {f"{src}/stripes/broken.jpg", f"{src}/square/empty.png"}
    # image content survives the trip: the decoded pixels match the source file
    rec = next(r for r in records if r["source"].endswith("circle_0000.jpg"))
    assert rec["encoded"] == (local / "circle" / "circle_0000.jpg").read_bytes()


def _prepare_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.prepare", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "no files under"),
        ({"circle/a.jpg": fx.rgb_jpeg()}, "single class folder ('circle')"),
        ({"a.jpg": fx.rgb_jpeg()}, "no class folders under"),
    ],
    ids=["empty", "single-class", "no-class-folders"],
)
def test_unusable_sources_exit_2_before_any_work(tmp_path, layout, message):
    src = tmp_path / "src"
    src.mkdir()
    fx.write_tree(str(src), layout)
    proc = _prepare_cli("--src", str(src), "--dst", str(tmp_path / "dst"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "dst").exists()


def test_a_model_size_over_the_jpeg_scale_is_refused_before_any_work(tmp_path, capsys):
    """With the default prepare.jpeg_scale_to (299), a config whose model input
    is larger would prepare shards that its training then refuses."""
    src = tmp_path / "src"
    fx.write_tree(str(src), {"a/x.jpg": fx.rgb_jpeg(), "b/y.jpg": fx.rgb_jpeg()})
    assert run(prepare_job.main, ["--src", str(src), "--dst", str(tmp_path / "dst"),
                                  "--set", "data.image_size=512"]) == 2
    err = capsys.readouterr().err
    assert "data.image_size=512 is larger than prepare.jpeg_scale_to=299" in err, err
    assert not (tmp_path / "dst").exists()


def test_missing_source_exits_2(tmp_path):
    proc = _prepare_cli("--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "dst"))
    assert proc.returncode == 2 and "source not found" in proc.stderr, proc.stderr


@pytest.mark.s3
def test_missing_bucket_exits_2_with_one_line(s3_endpoint, tmp_path):
    proc = _prepare_cli("--src", "s3://no-such-bucket-here/raw", "--dst", str(tmp_path / "dst"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no-such-bucket-here" in proc.stderr, proc.stderr


def test_split_by_hash_is_deterministic_and_proportional():
    keys = [f"cls/img_{i}.jpg" for i in range(4000)]
    splits = [split_by_hash(k, 0.25) for k in keys]
    assert splits == [split_by_hash(k, 0.25) for k in keys]
    share = splits.count("validation") / len(keys)
    assert 0.22 < share < 0.28
    assert all(split_by_hash(k, 0.0) == "train" for k in keys[:100])
    rng = np.random.default_rng(0)
    assert len({split_by_hash(f"x/{rng.random()}", 0.5) for _ in range(50)}) == 2
