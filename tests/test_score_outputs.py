"""What a score output holds, run after run: the rows of one model (a part
records its writer in its footer; another model's parts are scored again),
plans that know their inputs (a changed list or prefix is refused without
--overwrite), no duplicate rows when the parts change, ``_SUCCESS`` only on a
completed output, and ``**/*.parquet`` reading the scores and nothing else."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from jobs._cli import run
from pipeline.config import StorageConfig, load_config
from pipeline.scoring.commit import (SCHEMA, SUCCESS_NAME, SUMMARY_NAME, NotKept, committed_errors, publish_part,
                                     to_table)
from tests import imagefactory as fx
from tests.test_score import CLASSES, check_scores, make_images, tiny_model  # noqa: F401 - the session fixture


def save_weights(run_dir: Path, seed: int) -> None:
    """The same small model, other weights, saved over ``run_dir``'s model file."""
    from tests.small_model import small_classifier

    small_classifier(len(CLASSES), 75, seed=seed).save(str(run_dir / "model.keras"))


def image_uris(src: Path) -> list[str]:
    return sorted(str(p) for p in src.rglob("*.*"))


def rows_by_file(out: Path) -> dict[str, list[str]]:
    return {p.name: pq.read_table(p, columns=["uri"]).column("uri").to_pylist() for p in out.glob("part-*.parquet")}


def watch_parts(monkeypatch, check) -> list:
    """Call ``check()`` on the driver each time a part is committed, while the
    job runs (in this process); returns the list of its results."""
    from pipeline.scoring import execute

    seen: list = []
    original = execute.Progress.part_done

    def part_done(self, *args, **kwargs):
        seen.append(check())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(execute.Progress, "part_done", part_done)
    return seen


# ---------------------------------------------------------------- no Ray


def test_a_part_is_kept_only_by_the_model_and_settings_that_wrote_it(tmp_path):
    """The footer names the writer; committed_errors reads it and keeps the
    part only when every field matches, and reports why it does not."""
    uris = [str(tmp_path / f"{n}.jpg") for n in "abc"]
    batch = {"uri": uris, "top_k_index": np.array([[0, 1], [1, 0], [-1, -1]]),
             "top_k_scores": np.array([[0.6, 0.3], [0.7, 0.2], [0, 0]], np.float32),
             "error": np.array(["", "", "not an image: x"], dtype=object)}
    writer = {"model": "runs/a", "model_fingerprint": "sha256:1", "labels": "l", "top_k": 2, "recipe": "r"}
    part = str(tmp_path / "part-00000-01234567.parquet")
    publish_part(to_table(batch, CLASSES, "runs/a"), pa.array(uris), part, StorageConfig(), "", writer, "d1")
    assert committed_errors(part, StorageConfig(), 3, writer, "d1") == Counter({"not an image": 1})
    for field, value in (("model_fingerprint", "sha256:2"), ("top_k", 3), ("model", "runs/b"), ("recipe", "r2"),
                         ("labels", "l2")):
        with pytest.raises(NotKept, match=field) as why:
            committed_errors(part, StorageConfig(), 3, {**writer, field: value}, "d1")
        assert why.value.kind == "other model"
    with pytest.raises(NotKept) as why:
        committed_errors(part, StorageConfig(), 3, writer, "d2")  # another part's URIs
    assert why.value.kind == "wrong rows"
    with pytest.raises(NotKept) as why:
        committed_errors(part, StorageConfig(), 4, writer, "d1")
    assert why.value.kind == "wrong rows"
    # A part written before parts recorded their writer.
    pq.write_table(to_table(batch, CLASSES, "runs/a"), part)
    with pytest.raises(NotKept) as why:
        committed_errors(part, StorageConfig(), 3, writer, "d1")
    assert why.value.kind == "unrecorded"


# ---------------------------------------------------------------- whole jobs


@pytest.mark.slow
def test_a_second_model_on_a_half_written_output(ray_session, tiny_model, tmp_path, caplog):
    """Model A scores an output; the same model path then holds other weights
    (B). B's --overwrite run is interrupted with half of its parts written; the
    re-run without --overwrite scores A's parts again: every row is B's, as B
    predicts it (computed here, not taken from the job's counts)."""
    from jobs.predict import predict_files

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=4)
    uris = image_uris(src)
    argv = ["--model", str(model), "--images", str(src), "--output", str(out), "--rows-per-file", "2",
            "--batch-size", "4"]
    assert run(score_job.main, argv) == 0
    # A's parts by the images they hold (part numbers follow the order in
    # which parallel listing produces the parts, so B's may differ).
    a_parts = {tuple(pq.read_table(p).column("uri").to_pylist()): p.read_bytes() for p in out.glob("part-*.parquet")}
    assert len(a_parts) == 6

    save_weights(model, seed=1)
    cfg = load_config()
    a_scores = {u: s for u, _, s, _ in predict_files(cfg, tiny_model, uris, 3)}
    b_scores = {u: s for u, _, s, _ in predict_files(cfg, str(model), uris, 3)}
    assert all(np.abs(np.subtract(a_scores[u], b_scores[u])).max() > 1e-3 for u in uris)  # A and B differ
    # A completed output of A's weights: refused without --overwrite.
    assert run(score_job.main, argv) == 2
    assert run(score_job.main, argv + ["--overwrite"]) == 0

    # What B's --overwrite run leaves when it is killed with half of its
    # parts written: A's other parts, no _SUCCESS, its summary not complete.
    b_parts = {p.name: tuple(pq.read_table(p).column("uri").to_pylist()) for p in out.glob("part-*.parquet")}
    old = sorted(b_parts)[::2]
    for name in old:
        (out / name).write_bytes(a_parts[b_parts[name]])  # A's part of the same images, not yet replaced
    (out / SUCCESS_NAME).unlink()
    summary = json.loads((out / SUMMARY_NAME).read_text())
    (out / SUMMARY_NAME).write_text(json.dumps({**summary, "status": "failed"}))

    caplog.set_level(logging.INFO)
    assert run(score_job.main, argv) == 0
    table = pq.read_table(out)
    check_scores(table, str(model), uris, top_k=5)  # every row B's prediction, each image once
    for row in table.to_pylist():
        np.testing.assert_allclose(row["top_k_scores"], b_scores[row["uri"]], atol=2e-3)

    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["files_rescored_other_model"] == len(old) and summary["files_kept"] == 6 - len(old)
    assert summary["files_written"] == len(old) and (out / SUCCESS_NAME).exists()
    said = [r.getMessage() for r in caplog.records if "scoring" in r.getMessage() and "again" in r.getMessage()]
    assert len(said) == 1 and "model_fingerprint" in said[0] and all(n in said[0] for n in old), said


@pytest.mark.slow
def test_a_changed_list_is_refused_without_overwrite(ray_session, tiny_model, tmp_path, capsys):
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=3)
    uris = image_uris(src)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(uris[:6]) + "\n")
    argv = ["--model", tiny_model, "--images", str(listed), "--output", str(out), "--rows-per-file", "4"]
    assert run(score_job.main, argv) == 0
    plan = json.loads((out / "_plan" / "plan.json").read_text())
    assert plan["input"]["kind"] == "list" and plan["input"]["size"] == listed.stat().st_size
    assert plan["input"]["sha256"] and plan["images"] == 6

    with listed.open("a") as f:
        f.write("\n".join(uris[6:]) + "\n")
    capsys.readouterr()
    assert run(score_job.main, argv) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "was completed" in err and "size" in err and "--overwrite" in err, err
    # The same when the earlier run did not finish (resume): its plan is of the old list.
    (out / SUCCESS_NAME).unlink()
    assert run(score_job.main, argv) == 2
    err = capsys.readouterr().err
    assert "did not finish" in err and "--overwrite" in err, err
    assert sorted(pq.read_table(out)["uri"].to_pylist()) == uris[:6]  # untouched

    assert run(score_job.main, argv + ["--overwrite"]) == 0
    check_scores(pq.read_table(out), tiny_model, uris, top_k=5)
    assert json.loads((out / SUMMARY_NAME).read_text())["input"]["size"] == listed.stat().st_size


@pytest.mark.slow
def test_a_changed_prefix_is_refused_after_a_completed_run(ray_session, tiny_model, tmp_path, capsys):
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=3)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "2"]
    assert run(score_job.main, argv) == 0
    first = image_uris(src)
    plan = json.loads((out / "_plan" / "plan.json").read_text())
    assert plan["input"]["kind"] == "prefix" and plan["input"]["images"] == 9 and plan["input"]["listed_at"]

    fx.write_tree(str(src), {"circle/zz-late.jpg": fx.rgb_jpeg(), "new/late.png": fx.palette_png()})
    Path(first[0]).unlink()
    capsys.readouterr()
    assert run(score_job.main, argv) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "2 images added, 1 removed" in err and "--overwrite" in err, err
    assert sorted(pq.read_table(out)["uri"].to_pylist()) == first and (out / SUCCESS_NAME).exists()

    assert run(score_job.main, argv + ["--overwrite"]) == 0
    now = image_uris(src)
    check_scores(pq.read_table(out), tiny_model, now, top_k=5)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["images"] == 10 and summary["listing_tasks"] > 0 and not summary["plan_reused"]


@pytest.mark.slow
def test_other_rows_per_file_never_shows_an_image_twice(ray_session, tiny_model, tmp_path, monkeypatch):
    """Parts of the old plan are removed before any part of the new one is
    published: checked on the driver at every committed part, and after."""
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=4)
    uris = image_uris(src)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--batch-size", "4"]
    assert run(score_job.main, argv + ["--rows-per-file", "10"]) == 0
    assert len(rows_by_file(out)) == 2  # 3 folders of 4, packed

    def most_rows_of_one_image() -> int:
        return max(Counter(u for us in rows_by_file(out).values() for u in us).values())

    seen = watch_parts(monkeypatch, most_rows_of_one_image)
    assert run(score_job.main, argv + ["--rows-per-file", "3"]) == 0
    assert len(seen) == 4 and max(seen) == 1, seen  # 3 of one folder each, the last 3 packed
    files = rows_by_file(out)
    assert len(files) == 4 and sorted(u for us in files.values() for u in us) == uris
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["stale_files_removed"] == 2 and summary["files_written"] == 4


@pytest.mark.slow
def test_success_marker_only_on_a_completed_output(ray_session, tiny_model, tmp_path, monkeypatch):
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=3)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "2"]
    marker = out / SUCCESS_NAME
    assert run(score_job.main, argv) == 0
    done = json.loads(marker.read_text())
    assert done["parts"] == 5 and done["images"] == 9 and done["model"] == tiny_model and done["completed"]

    # A run that fails: the marker goes before anything changes, and stays away.
    (src / "circle" / "zero.jpg").write_bytes(b"")
    seen = watch_parts(monkeypatch, marker.exists)
    failing = argv + ["--overwrite", "--set", "score.max_error_fraction=0"]
    assert run(score_job.main, failing) == 1
    assert not any(seen)
    assert not marker.exists() and json.loads((out / SUMMARY_NAME).read_text())["status"] == "failed"

    # Resumed: the marker is written last, on success.
    seen.clear()
    assert run(score_job.main, argv) == 0
    assert seen and not any(seen)
    done = json.loads(marker.read_text())
    assert done["images"] == 10 and done["errors"] == 1
    assert json.loads((out / SUMMARY_NAME).read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_recursive_glob_reads_the_scores_and_nothing_else(ray_session, tiny_model, tmp_path):
    """``**/*.parquet`` over a finished output (a list's plan files included)
    is the parts: one schema, each scored image exactly once."""
    import duckdb

    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=3)
    uris = image_uris(src)
    (tmp_path / "list.txt").write_text("\n".join(uris) + "\n")
    assert run(score_job.main, ["--model", tiny_model, "--images", str(tmp_path / "list.txt"), "--output", str(out),
                                "--rows-per-file", "4"]) == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    files = sorted(str(p) for p in out.rglob("*.parquet"))  # hidden files and _plan/ included
    assert files == sorted(summary["parquet"]) and len(files) == summary["files"] > 1
    assert all(pq.read_schema(f).remove_metadata().equals(SCHEMA) for f in files)
    table = pads.dataset(files, format="parquet").to_table()
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert sorted(table["uri"].to_pylist()) == uris
    rows = duckdb.connect().execute(f"select count(*), count(distinct uri) from read_parquet('{out}/**/*.parquet')")
    assert rows.fetchone() == (len(uris), len(uris))


@pytest.mark.slow
@pytest.mark.s3
def test_an_s3_list_changed_in_place_is_refused(ray_session, tiny_model, s3_bucket, capsys):
    """On S3 the list is recognised by its ETag and size."""
    fs, bucket = s3_bucket
    make_images(f"s3://{bucket}/imgs", per_class=2)
    uris = sorted(f"s3://{p}" for p in fs.find(f"{bucket}/imgs"))
    fs.pipe(f"{bucket}/lists/a.txt", ("\n".join(uris[:4]) + "\n").encode())
    out = f"s3://{bucket}/scores"
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/lists/a.txt", "--output", out, "--rows-per-file", "3"]
    assert run(score_job.main, argv) == 0
    plan = json.loads(fs.cat_file(f"{bucket}/scores/_plan/plan.json"))
    assert plan["input"]["etag"] and plan["input"]["size"] > 0
    assert json.loads(fs.cat_file(f"{bucket}/scores/{SUCCESS_NAME}"))["images"] == 4

    fs.pipe(f"{bucket}/lists/a.txt", ("\n".join(uris) + "\n").encode())
    capsys.readouterr()
    assert run(score_job.main, argv) == 2
    err = capsys.readouterr().err
    assert "ETag" in err and "--overwrite" in err, err
    assert run(score_job.main, argv + ["--overwrite"]) == 0
    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in fs.glob(f"{bucket}/scores/*.parquet"))
    check_scores(table, tiny_model, uris, top_k=5)
    # Unchanged since: every part's footer (read from S3) names this model, nothing to do.
    summary = fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}")
    capsys.readouterr()
    assert run(score_job.main, argv) == 0
    assert "is complete, nothing to score" in capsys.readouterr().out
    assert fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}") == summary


@pytest.mark.slow
def test_parts_written_before_parts_recorded_their_writer_are_scored_again(ray_session, tiny_model, tmp_path,
                                                                          caplog):
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=2)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "1"]
    assert run(score_job.main, argv) == 0
    # As an earlier version left the output: parts without the writer, no _SUCCESS.
    for part in out.glob("part-*.parquet"):
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    (out / SUCCESS_NAME).unlink()
    caplog.set_level(logging.INFO)
    assert run(score_job.main, argv) == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["files_rescored_by_reason"] == {"unrecorded": 6} and summary["files_written"] == 6
    said = [r.getMessage() for r in caplog.records if "before parts recorded their writer" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("score: 6 parts"), said
    assert all(b"inception_ray.writer" in pq.read_metadata(p).metadata for p in out.glob("part-*.parquet"))


@pytest.mark.slow
def test_rows_of_each_part_are_sorted_by_uri(ray_session, tiny_model, tmp_path):
    """Readers may rely on it: each part's rows are in ``uri`` order (its
    plan's order), however its decode tasks finish. One file per decode
    task and two per model batch, images of several sizes and missing files
    among them, so the tasks end in any order; a list in reverse order."""
    src, out = tmp_path / "images", tmp_path / "scores"
    make_images(str(src), per_class=4)
    uris = image_uris(src)
    (src / "big.jpg").write_bytes(fx.rgb_jpeg(size=(400, 300)))
    listed = sorted(uris + [str(src / "big.jpg"), str(tmp_path / "missing-a.jpg"), str(src / "zz-missing.jpg")])
    (tmp_path / "list.txt").write_text("\n".join(reversed(listed)) + "\n")
    argv = ["--model", tiny_model, "--images", str(tmp_path / "list.txt"), "--output", str(out), "--rows-per-file",
            "7", "--batch-size", "2", "--set", "score.read_batch=1"]
    assert run(score_job.main, argv) == 0
    parts = rows_by_file(out)
    assert len(parts) > 1 and sorted(u for rows in parts.values() for u in rows) == listed
    for name, rows in parts.items():
        assert rows == sorted(rows), name
    # A prefix too: its listing's parts.
    out2 = tmp_path / "scores-prefix"
    assert run(score_job.main, ["--model", tiny_model, "--images", str(src), "--output", str(out2),
                                "--rows-per-file", "5", "--batch-size", "2", "--set", "score.read_batch=1"]) == 0
    for name, rows in rows_by_file(out2).items():
        assert rows == sorted(rows), name
