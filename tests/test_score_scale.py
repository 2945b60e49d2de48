"""Scoring at bucket scale, at test size: a nested prefix listed by many tasks,
S3 Inventory-style and URI-column Parquet lists, a writer killed mid-run, and
the per-row overhead run of the benchmark (correctness only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from jobs._cli import run
from pipeline.scoring.commit import SUMMARY_NAME
from tests.test_score import ROOT, check_scores, expected_parts, make_images, tiny_model  # noqa: F401 - the session fixture


@pytest.mark.slow
@pytest.mark.s3
def test_thousands_of_files_in_nested_prefixes_one_row_each(ray_session, tiny_model, s3_bucket):
    """4 x 5 sub-prefixes x 100 empty image files (no decode: each is an
    'empty file' row) and some other files: every image exactly once, listed by
    more than one task, a part per folder (a folder split into several parts
    is tested in test_score.py)."""
    fs, bucket = s3_bucket
    objects = {f"{bucket}/images/g{a}/s{b}/img-{i:03d}.jpg": b"" for a in range(4) for b in range(5)
               for i in range(100)}
    objects.update({f"{bucket}/images/g{a}/readme.txt": b"x" for a in range(4)})
    objects[f"{bucket}/images/top.PNG"] = b""
    fs.pipe(objects)
    images = sorted(f"s3://{k}" for k in objects if k.lower().endswith((".jpg", ".png")))
    out = f"s3://{bucket}/scores"
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/images", "--output", out, "--rows-per-file", "100"]
    # Every row an error (empty files): the rows are written, and the job exits 1.
    assert run(score_job.main, argv) == 1

    summary = json.loads(fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}"))
    assert summary["images"] == len(images) == 2001 and summary["ignored_files"] == 4
    assert summary["listing_tasks"] == 1 + 4 + 20  # one per folder level
    assert summary["errors_by_reason"] == {"empty file (0 bytes)": len(images)}
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in fs.glob(f"{bucket}/scores/*.parquet"))
    assert sorted(table["uri"].to_pylist()) == images  # each once
    assert summary["files"] == len(fs.glob(f"{bucket}/scores/part-*.parquet")) == 1 + 20
    assert summary["progress"]["parts_done"] == summary["files"] and summary["progress"]["eta_s"] == 0
    plan = json.loads(fs.cat_file(f"{bucket}/scores/_plan/plan.json"))
    assert sum(p["rows"] for p in plan["parts"]) == len(images)


@pytest.mark.slow
@pytest.mark.s3
def test_parquet_lists_with_bucket_and_key_or_uri_columns(ray_session, tiny_model, s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    count = make_images(f"s3://{bucket}/imgs", per_class=2)
    keys = sorted(p.split("/", 1)[1] for p in fs.find(f"{bucket}/imgs"))
    uris = [f"s3://{bucket}/{k}" for k in keys]
    # An S3 Inventory data file: bucket, key, size (and other columns).
    inventory = pa.table({"bucket": [bucket] * count, "key": keys,
                          "size": [fs.size(f"{bucket}/{k}") for k in keys], "storage_class": ["STANDARD"] * count})
    with fs.open(f"{bucket}/lists/inventory.parquet", "wb") as f:
        pq.write_table(inventory, f)
    # A uri column: relative entries resolve against the list's folder, absolute ones stand.
    half = count // 2
    relative = [k.split("/", 1)[1] for k in keys[:half]]
    # 20 missing files first: a whole decode group (score.read_batch = 16) without an image.
    missing = [f"s3://{bucket}/imgs/aaa-missing-{i:02d}.jpg" for i in range(20)]
    with fs.open(f"{bucket}/imgs/uris.parquet", "wb") as f:
        pq.write_table(pa.table({"uri": missing + relative + uris[half:]}), f)
    # Relative entries never climb above the list's folder.
    with fs.open(f"{bucket}/imgs/sub/uris.parquet", "wb") as f:
        pq.write_table(pa.table({"uri": [f"../{r}" for r in relative]}), f)
    assert run(score_job.main, ["--model", tiny_model, "--images", f"s3://{bucket}/imgs/sub/uris.parquet",
                                "--output", f"s3://{bucket}/refused"]) == 2
    assert not fs.glob(f"{bucket}/refused/*.parquet")
    for name, listed in (("inventory", f"s3://{bucket}/lists/inventory.parquet"),
                         ("uri", f"s3://{bucket}/imgs/uris.parquet")):
        out = f"s3://{bucket}/scores-{name}"
        assert run(score_job.main, ["--model", tiny_model, "--images", listed, "--output", out,
                                    "--rows-per-file", "40"]) == 0, name
        table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in fs.glob(f"{bucket}/scores-{name}/*.parquet"))
        if name == "uri":
            lost = table.filter(pa.compute.is_in(table["uri"], pa.array(missing)))
            assert sorted(lost["uri"].to_pylist()) == missing
            assert set(lost["error"].to_pylist()) == {"cannot read: file not found"}
            table = table.filter(pa.compute.invert(pa.compute.is_in(table["uri"], pa.array(missing))))
        check_scores(table, tiny_model, uris, top_k=5)


@pytest.mark.slow
def test_a_writer_killed_mid_run_leaves_one_row_per_image(tiny_model, tmp_path):
    """SIGKILL of the task writing a part, just before it publishes: Ray runs
    the part again; every image has one row, no temporary file is left."""
    from pipeline.runtime.faults import FAULT_ENV

    src, out = tmp_path / "images", tmp_path / "scores"
    count = make_images(str(src), per_class=6)
    marker = tmp_path / "killed"
    env = {**os.environ, FAULT_ENV: f"score-part-ready:sigkill:{marker}"}
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "4", "-q"]
    proc = subprocess.run([sys.executable, "-m", "jobs.score", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "score-part-ready sigkill" in marker.read_text()  # a writer was killed
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["status"] == "complete" and summary["files_written"] == summary["files"] == expected_parts(src, 4)
    table = pq.read_table(out)
    assert table.num_rows == count and len(set(table["uri"].to_pylist())) == count
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_per_row_overhead_run_is_correct_at_small_size(ray_session, tiny_model, tmp_path):
    """The benchmark's missing-files run (tests/benchmarks/bench_score_scale.py)
    at 500 rows: one error row per listed URI."""
    from tests.benchmarks import bench_score_scale as bench

    address = ray_session.get_runtime_context().gcs_address
    result = bench.missing_files_run(500, str(tmp_path), tiny_model, address=address)
    assert result["rows"] == 500 and result["errors"] == {"cannot read": 500}
    assert result["rows_per_s"] > 0 and result["driver_peak_rss_mb"] > 0
