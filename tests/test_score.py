"""The score job: one row per input file, the same answers as jobs.predict, bad
files as error rows, resume after a kill, output any Parquet reader takes, and
usage errors (exit 2) before any cluster work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import score as score_job
from jobs._cli import run
from pipeline.data import demo_data
from pipeline.config import StorageConfig, load_config
from pipeline.errors import UsageError
from pipeline.data.preprocess import Recipe, current_recipe
from pipeline.scoring.commit import SCHEMA, SUCCESS_NAME, SUMMARY_NAME, to_table
from pipeline.scoring.decode import read_and_decode, to_uint8
from pipeline.scoring.plan import plan_score, prepare_parts
from pipeline.scoring.predictor import ScoringPredictor
from pipeline.scoring.listing import list_level
from pipeline.scoring.parts import read_plan_chunk
from tests import imagefactory as fx

CLASSES = ["circle", "square", "triangle"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A completed run directory with a small untrained 75x75 classifier (no
    training, no download; tests.small_model)."""
    from tests.small_model import write_run

    return write_run(tmp_path_factory.mktemp("run") / "run", CLASSES)


def make_images(root: str, per_class: int = 8, storage: StorageConfig | None = None) -> int:
    return demo_data.generate(root, per_class=per_class, size=96, classes=CLASSES, storage=storage)


def expected_parts(src: Path, rows_per_file: int) -> int:
    """Parts of a listed folder tree: each folder's images in full parts of
    rows_per_file, the last few of every folder packed together into parts of
    rows_per_file."""
    per_folder: dict = {}
    for path in src.rglob("*.*"):
        per_folder[path.parent] = per_folder.get(path.parent, 0) + 1
    rest = sum(n % rows_per_file for n in per_folder.values())
    return sum(n // rows_per_file for n in per_folder.values()) + -(-rest // rows_per_file)


def check_scores(table: pa.Table, model: str, uris: list[str], top_k: int) -> dict:
    """Exactly one row per URI; good rows are what the model gives for
    jobs.predict's inputs rounded to uint8 (the form in which the job sends
    images to the model), and within the effect of that rounding of
    jobs.predict's own answers; top-k lists sorted, within [0, 1] and summing
    to at most 1. Returns {uri: error}."""
    from jobs.predict import predict_files, read_inputs
    from pipeline.artifact import load_artifact

    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(uris)
    cfg = load_config()
    expected = {r[0]: r for r in predict_files(cfg, model, uris, top_k)}
    artifact = load_artifact(model, cfg.storage)
    decoded, inputs, _ = read_inputs(cfg, [u for u in uris if expected[u][3] is None], artifact.recipe)
    rounded = dict(zip(decoded, artifact.predict(to_uint8(inputs).astype(np.float32)))) if decoded else {}
    for row in rows:
        _, labels, scores, error = expected[row["uri"]]
        assert row["model"] == model
        assert (row["error"] is None) == (error is None), (row, error)
        if row["error"] is not None:
            assert row["label"] is None and row["score"] is None
            assert row["top_k_labels"] == [] and row["top_k_scores"] == []
            continue
        probs = rounded[row["uri"]]
        k = min(top_k, len(CLASSES))
        assert len(row["top_k_labels"]) == k
        order = np.argsort(-probs, kind="stable")[:k]
        assert row["top_k_labels"] == [artifact.labels[i] for i in order]
        np.testing.assert_allclose(row["top_k_scores"], probs[order], atol=1e-5)
        assert row["label"] == row["top_k_labels"][0] and row["score"] == row["top_k_scores"][0]
        np.testing.assert_allclose(row["top_k_scores"], scores, atol=2e-3)  # jobs.predict: float inputs
        assert row["top_k_scores"] == sorted(row["top_k_scores"], reverse=True)
        assert 0 <= min(row["top_k_scores"]) and sum(row["top_k_scores"]) <= 1 + 1e-5
    return {r["uri"]: r["error"] for r in rows}


# ---------------------------------------------------------------- no Ray


def planned(tiny_model: str, images: str, output: str, *overrides: str):
    """plan_score and prepare_parts as the job runs them; the plan and {part name: its URIs}."""
    cfg = load_config(None, list(overrides))
    plan = plan_score(cfg, tiny_model, images, output)
    prepare_parts(cfg, plan)
    uris = {p.name: read_plan_chunk(plan.plan_dir, p, StorageConfig()).column("uri").to_pylist() for p in plan.parts}
    return plan, uris


def test_one_folder_level_lists_image_names_only():
    """A listing task sees one level: image files (any case) become plan rows,
    other files are counted as ignored, folders are handed back."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        fx.write_tree(root, {"one.JPG": fx.rgb_jpeg(), "b/three.WebP": fx.webp(), "notes.txt": b"text",
                             "scan.tiff": fx.tiff(), "two.png": fx.palette_png(), ".tmp-x-3.jpg": b""})
        plan_dir = os.path.join(root, "plan")
        out = list_level(root, root, StorageConfig(), plan_dir, rows_per_file=1)
        assert out["prefixes"] == [os.path.join(root, "b")] and out["ignored"] == 2 and out["files"] == 2
        assert [p["first"] for p in out["parts"]] == [os.path.join(root, "one.JPG"), os.path.join(root, "two.png")]
        assert all(p["rows"] == 1 for p in out["parts"])


@pytest.mark.slow
def test_planned_parts_cover_every_image_once_and_are_stable(ray_session, tiny_model, tmp_path):
    fx.write_tree(str(tmp_path / "src"), {
        "a/one.JPG": fx.rgb_jpeg(), "a/deep/two.png": fx.palette_png(), "a/deep/four.jpg": fx.rgb_jpeg(),
        "b/three.WebP": fx.webp(), "b/notes.txt": b"text", "b/scan.tiff": fx.tiff(), "top.jpg": fx.rgb_jpeg(),
    })
    src = str(tmp_path / "src")
    plan, parts = planned(tiny_model, src, str(tmp_path / "out"), "score.rows_per_file=1")
    names = ["a/deep/four.jpg", "a/deep/two.png", "a/one.JPG", "b/three.WebP", "top.jpg"]
    assert sorted(u for us in parts.values() for u in us) == [os.path.join(src, n) for n in names]
    assert plan.ignored == 2 and plan.listing_tasks == 4 and not plan.plan_reused  # src, a, a/deep, b
    assert [p.index for p in plan.parts] == list(range(5))

    # Another output: the same parts (numbered in the order listing produced them).
    again, parts_again = planned(tiny_model, src, str(tmp_path / "out2"), "score.rows_per_file=1")
    assert sorted(parts_again.values()) == sorted(parts.values())
    assert {p.digest for p in again.parts} == {p.digest for p in plan.parts}
    # The same output: the plan is reused, nothing is listed.
    (tmp_path / "src" / "late.jpg").write_bytes(fx.rgb_jpeg())
    reused, parts_reused = planned(tiny_model, src, str(tmp_path / "out"), "score.rows_per_file=1")
    assert reused.plan_reused and reused.listing_tasks == 0 and parts_reused == parts
    # Two per part: full parts of one folder (a/deep; late.jpg with top.jpg), the
    # last few files of folders packed together (a/one.JPG with b/three.WebP).
    _, pairs = planned(tiny_model, src, str(tmp_path / "out3"), "score.rows_per_file=2")
    assert sorted(len(u) for u in pairs.values()) == [2, 2, 2]
    assert sum(len(u) for u in pairs.values()) == 6
    assert sorted(u for us in pairs.values() for u in us if len({os.path.dirname(x) for x in us}) > 1) == [
        os.path.join(src, "a/one.JPG"), os.path.join(src, "b/three.WebP")]
    assert all(us == sorted(us) for us in pairs.values())


@pytest.mark.slow
def test_uri_lists_text_csv_parquet(ray_session, tiny_model, tmp_path):
    images = tmp_path / "imgs"
    fx.write_tree(str(images), {"x.jpg": fx.rgb_jpeg(), "y.png": fx.palette_png(), "sub/z.jpg": fx.rgb_jpeg()})
    x, y, z = str(images / "x.jpg"), str(images / "y.png"), str(images / "sub" / "z.jpg")
    (tmp_path / "list.txt").write_text(f"\ufeff# images to score\n{x}\n\nimgs/y.png\n{x}\nimgs/./sub/../sub/z.jpg\n")
    (tmp_path / "list.csv").write_text(f"id,uri\n1,{x}\n2,{y}\n3,imgs/sub/z.jpg\n")
    pq.write_table(pa.table({"uri": [y, x, "imgs/sub/z.jpg", y]}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        plan, parts = planned(tiny_model, str(tmp_path / name), str(tmp_path / f"out-{name}"))
        assert sorted(u for us in parts.values() for u in us) == sorted([x, y, z]), name  # each once
        assert plan.images == 3

    # Many parts: every entry hashed to exactly one of them.
    many = [str(images / f"n{i:03d}.jpg") for i in range(200)]
    (tmp_path / "many.txt").write_text("\n".join(many + many[:50]) + "\n")
    plan, parts = planned(tiny_model, str(tmp_path / "many.txt"), str(tmp_path / "out-many"), "score.rows_per_file=40")
    assert len(parts) > 3 and sorted(u for us in parts.values() for u in us) == sorted(many)
    assert all(us == sorted(us) for us in parts.values())

    (tmp_path / "bad.csv").write_text(f"path\n{x}\n")
    with pytest.raises(UsageError, match="no 'uri' column"):
        plan_score(load_config(), tiny_model, str(tmp_path / "bad.csv"), str(tmp_path / "o"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UsageError, match="lists no images"):
        plan_score(load_config(), tiny_model, str(tmp_path / "empty.txt"), str(tmp_path / "o"))


def test_predictor_is_a_plain_class_on_a_batch(tiny_model, tmp_path):
    fx.write_tree(str(tmp_path), {"good.jpg": fx.rgb_jpeg(size=(90, 60)), "zero.jpg": b"", "bad.png": fx.truncated_png()})
    uris = [str(tmp_path / n) for n in ("good.jpg", "zero.jpg", "bad.png", "missing.jpg")]
    batch = {"uri": np.array(uris, dtype=object), "size": np.array([-1] * 4)}
    decoded = read_and_decode(batch, storage=StorageConfig(), recipe=current_recipe(75), max_bytes=2**20,
                              max_pixels=10**7)
    # What crosses the object store: uint8 at the model's size.
    assert decoded["image"].shape == (4, 75, 75, 3) and decoded["image"].dtype == np.uint8
    assert list(decoded["error"][:1]) == [""]
    assert "empty file" in decoded["error"][1] and "truncated" in decoded["error"][2]
    assert decoded["error"][3] == "cannot read: file not found"

    predictor = ScoringPredictor(tiny_model, StorageConfig(), top_k=5, recipe=current_recipe(75))
    whole = predictor(decoded)
    table = to_table(whole, CLASSES, "run-dir")
    # As the job calls it: the decoded images of several decode tasks, one of
    # which had no image that decoded; rows stay aligned.
    ok = decoded["error"] == ""
    index, scores = predictor.score(np.concatenate([ok[1:], ok[:1]]), decoded["image"][1:][ok[1:]],
                                    decoded["image"][:1])
    np.testing.assert_array_equal(index[-1], whole["top_k_index"][0])
    np.testing.assert_allclose(scores[-1], whole["top_k_scores"][0], atol=1e-6)
    assert (index[:-1] == -1).all()
    with pytest.raises(ValueError, match="2 images for 1 decoded rows"):
        predictor.score(ok, decoded["image"][:2])
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert rows[0]["error"] is None and sorted(rows[0]["top_k_labels"]) == CLASSES
    assert all(r["error"] and r["label"] is None and r["top_k_scores"] == [] for r in rows[1:])


# preprocessing.json as models trained before the full recipe was recorded have it.
OLD_PREPROCESSING = {
    "image_size": 75, "color": "RGB",
    "decode": "any supported format; EXIF orientation applied; alpha composited on white",
    "resize": "bilinear to image_size x image_size, no crop (tf.image.resize)",
    "input_range": "float32 in [0, 255]", "scaling": "inside the model: x / 127.5 - 1 (InceptionV3)",
}


def test_an_old_model_is_scored_with_its_own_recipe(tiny_model, tmp_path, monkeypatch):
    """score and predict apply the recipe in the model's preprocessing.json, not
    today's defaults: for a model recorded before the full recipe, JPEGs decoded
    with TensorFlow's default IDCT and resized without antialiasing, as it was
    trained; today's recipe gives other pixels for the same files."""
    import shutil

    import tensorflow as tf

    from jobs.predict import read_inputs

    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("model.keras", "labels.json", "summary.json"):
        shutil.copy(Path(tiny_model, name), old / name)
    (old / "preprocessing.json").write_text(json.dumps(OLD_PREPROCESSING))
    noisy = Image.fromarray(np.random.default_rng(4).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    fx.write_tree(str(tmp_path / "images"), {"a.jpg": fx.encode(noisy, "JPEG", quality=90),
                                             "b.png": fx.encode(noisy, "PNG")})
    uris = [str(tmp_path / "images" / n) for n in ("a.jpg", "b.png")]

    plan = plan_score(load_config(), str(old), str(tmp_path / "images"), str(tmp_path / "out"))
    assert plan.recipe == Recipe.from_dict(OLD_PREPROCESSING) and plan.recipe.resize_antialias is False
    predictor = ScoringPredictor(str(old), StorageConfig(), top_k=2, recipe=plan.recipe)
    artifact = predictor.artifact  # what predict loads too (load_artifact)
    assert artifact.recipe == plan.recipe

    raw = (tmp_path / "images" / "a.jpg").read_bytes()
    as_trained = [tf.io.decode_jpeg(raw, channels=3).numpy(), np.asarray(noisy)]
    expected = np.stack([tf.raw_ops.ResizeBilinear(images=x[None], size=[75, 75], half_pixel_centers=True)[0]
                         for x in as_trained])
    batch = {"uri": np.array(uris, dtype=object), "size": np.array([-1, -1])}
    scored = read_and_decode(batch, storage=StorageConfig(), recipe=plan.recipe, max_bytes=2**24, max_pixels=10**7)
    # The model's input, rounded to uint8 for the trip to the predictor.
    np.testing.assert_array_equal(scored["image"], to_uint8(expected))
    _, predicted, _ = read_inputs(load_config(), uris, artifact.recipe)
    np.testing.assert_array_equal(predicted, expected)

    today = read_and_decode(batch, storage=StorageConfig(), recipe=current_recipe(75), max_bytes=2**24,
                            max_pixels=10**7)
    assert np.abs(today["image"].astype(np.float32) - expected).mean() > 1
    # Images decoded with another recipe than the model's are never scored.
    monkeypatch.setattr("pipeline.artifact.load_artifact", lambda *args, **kwargs: artifact)
    with pytest.raises(ValueError, match="preprocessing.json changed"):
        ScoringPredictor(str(old), StorageConfig(), top_k=2, recipe=current_recipe(75))


def test_registry_reference_scores_the_production_version(tiny_model, tmp_path):
    from pipeline import registry as reg

    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    version = reg.register_run(registry, "shapes", tiny_model, storage, metrics={}, data="test")["version"]
    reg.promote(registry, "shapes", version, storage, reason="test")
    fx.write_tree(str(tmp_path / "images"), {"a.jpg": fx.rgb_jpeg()})

    plan = plan_score(load_config(), f"{registry}#shapes", str(tmp_path / "images"), str(tmp_path / "out"))
    assert plan.model == f"{registry}#shapes@{version}"  # the `model` column names the version
    assert plan.model_uri == reg.version_uri(registry, "shapes", version)
    assert plan.labels == CLASSES and plan.image_size == 75


# ---------------------------------------------------------------- whole jobs


@pytest.mark.slow
def test_score_local_tree(ray_session, tiny_model, tmp_path, capsys):
    src = tmp_path / "my images"
    count = make_images(str(src))
    out = tmp_path / "scores"
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out),
            "--top-k", "2", "--batch-size", "8", "--rows-per-file", "10"]
    assert run(score_job.main, argv) == 0

    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["images"] == summary["scored"] == count and summary["errors"] == 0
    assert summary["files"] == summary["files_written"] == 3 and summary["images_per_s"] > 0
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(Path(p).name for p in summary["parquet"])
    # Nothing but the parts ends in .parquet, plan chunks included: a recursive glob reads one schema.
    assert sorted(p.name for p in out.rglob("*.parquet")) == sorted(Path(p).name for p in summary["parquet"])
    import duckdb
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{out}/**/*.parquet')").fetchone()[0] == count
    uris = [str(p) for p in sorted(src.rglob("*.*"))]
    check_scores(pq.read_table(out), tiny_model, uris, top_k=2)

    # Every reader takes the folder or its files as they are.
    import duckdb
    import pandas as pd

    frame = pd.read_parquet(out)
    assert len(frame) == count and frame["uri"].is_unique
    assert duckdb.sql(f"select count(*), count(distinct uri) from '{out}/*.parquet'").fetchall() == [(count, count)]

    # The same command again: the folder is listed again and has not changed:
    # nothing to do, nothing written (the summary and _SUCCESS are as the
    # completing run left them).
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    stored, marker = (out / SUMMARY_NAME).read_bytes(), (out / SUCCESS_NAME).read_bytes()
    assert json.loads(marker)["parts"] == 3 and json.loads(marker)["images"] == count
    capsys.readouterr()
    assert run(score_job.main, argv) == 0
    assert "is complete, nothing to score" in capsys.readouterr().out
    assert (out / SUMMARY_NAME).read_bytes() == stored and (out / SUCCESS_NAME).read_bytes() == marker
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before


@pytest.mark.slow
@pytest.mark.s3
def test_score_s3_bucket_with_bad_files(ray_session, tiny_model, s3_bucket):
    fs, bucket = s3_bucket
    good = make_images(f"s3://{bucket}/images/good", per_class=4)
    corpus = fx.bad_and_odd_corpus()
    noisy = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    corpus["huge.png"] = (fx.encode(Image.fromarray(noisy), "PNG"), False)
    for name, (data, _) in corpus.items():
        fs.pipe(f"{bucket}/images/odd/{name}", data)
    out = f"s3://{bucket}/scores"
    argv = ["--model", tiny_model, "--images", f"s3://{bucket}/images", "--output", out,
            "--rows-per-file", "16", "--set", "score.max_file_mb=0.1"]
    assert run(score_job.main, argv) == 0

    image_names = {n: ok for n, (_, ok) in corpus.items() if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"))}
    uris = sorted(f"s3://{p}" for p in fs.find(f"{bucket}/images") if p.rsplit("/", 1)[-1] in image_names or "/good/" in p)
    with fs.open(f"{bucket}/scores/{SUMMARY_NAME}") as f:
        summary = json.load(f)
    assert summary["images"] == len(uris) == good + len(image_names)
    assert summary["ignored_files"] == len(corpus) - len(image_names)  # notes.txt, scan.tiff
    assert summary["errors"] == sum(not ok for ok in image_names.values())

    table = pa.concat_tables(pq.read_table(f, filesystem=fs) for f in sorted(fs.glob(f"{bucket}/scores/*.parquet")))
    good_uris = [u for u in uris if "huge.png" not in u]  # jobs.predict has no size limit
    errors = check_scores(table.filter(pa.compute.is_in(table["uri"], pa.array(good_uris))), tiny_model, good_uris, top_k=5)
    errors.update({r["uri"]: r["error"] for r in table.to_pylist() if "huge.png" in r["uri"]})
    by_name = {u.rsplit("/", 1)[-1]: e for u, e in errors.items()}
    for name, ok in image_names.items():
        assert (by_name[name] is None) == ok, (name, by_name[name])
    assert "empty file" in by_name["zero.jpg"]
    assert "truncated" in by_name["truncated.jpg"] and "truncated" in by_name["truncated.png"]
    assert by_name["random.jpg"].startswith("not an image")
    assert "too many pixels" in by_name["bomb.png"] or "decompression bomb" in by_name["bomb.png"]
    assert by_name["huge.png"].startswith("file too large")


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_session, tiny_model, tmp_path):
    src, out = tmp_path / "images", tmp_path / "scores"
    count = make_images(str(src), per_class=12)
    parts = expected_parts(src, 4)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out),
            "--rows-per-file", "4", "--batch-size", "1", "--set", "score.read_batch=1"]
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score", *argv, "--address", address, "-q"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the driver started
        except ProcessLookupError:
            pass
    committed = list(out.glob("part-*.parquet"))
    assert 0 < len(committed) < parts, "the kill should land between the first and the last part"

    assert run(score_job.main, argv) == 0
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["files_kept"] >= len(committed) and summary["files_written"] == parts - summary["files_kept"]
    assert summary["plan_reused"] and summary["listing_tasks"] == 0  # resumed from _plan/, nothing listed again
    assert len(list(out.glob("part-*.parquet"))) == parts and not list(out.glob(".tmp-*"))
    table = pq.read_table(out)
    assert table.num_rows == count and len(set(table["uri"].to_pylist())) == count
    assert summary["images"] == summary["scored"] == count


# ---------------------------------------------------------------- usage errors

USAGE_SCRIPT = """
import json, sys
from jobs import score
from jobs._cli import run
results = []
for argv in json.loads(sys.argv[1]):
    code = run(score.main, argv)
    results.append(code)
print(json.dumps({"codes": results, "tensorflow": "tensorflow" in sys.modules, "ray": "ray" in sys.modules}))
"""


def test_usage_errors_exit_2_before_any_work(tiny_model, tmp_path):
    images = tmp_path / "images"
    fx.write_tree(str(images), {"a/x.jpg": fx.rgb_jpeg()})
    (tmp_path / "empty").mkdir()
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("hi")
    (tmp_path / "a-file").write_text("not a folder")
    used = tmp_path / "used"
    used.mkdir()
    (used / SUMMARY_NAME).write_text(json.dumps({"model": "other", "source": str(images), "top_k": 5}))
    (used / "part-00000-0123abcd.parquet").write_bytes(b"")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.parquet").write_bytes(b"")
    ok = ["--model", tiny_model, "--images", str(images), "--output", str(tmp_path / "out")]

    def swap(flag, value):
        argv = list(ok)
        argv[argv.index(flag) + 1] = value
        return argv

    cases = {
        "model not found": swap("--model", str(tmp_path / "nowhere")),
        "has no production version": swap("--model", f"{tmp_path}/registry#flowers"),
        "source not found": swap("--images", str(tmp_path / "missing")),
        "no image files under": swap("--images", str(tmp_path / "empty")),
        "no image files under ": swap("--images", str(tmp_path / "only-text")),
        "is a file": swap("--images", str(tmp_path / "a-file")),
        "cannot write to": swap("--output", str(tmp_path / "a-file" / "out")),
        "already holds scores": swap("--output", str(used)),
        "did not write": swap("--output", str(tmp_path / "foreign")),
        "unknown config key": ok + ["--set", "score.batch=3"],
        "greater than or equal to 1": ok + ["--batch-size", "0"],
    }
    proc = subprocess.run([sys.executable, "-c", USAGE_SCRIPT, json.dumps(list(cases.values()))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(cases)
    assert not result["tensorflow"] and not result["ray"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(cases) and all(line.startswith("error: ") for line in lines), proc.stderr
    for expected, line in zip(cases, lines):
        assert expected.strip() in line, (expected, line)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_two_scoring_jobs_on_one_output_at_once(tiny_model, tmp_path):
    """Two jobs (each with its own local Ray, as two schedulers would start them)
    write the same output at once: both finish (or one refuses with a clear
    line), and the output has exactly one row per image either way."""
    src, out = tmp_path / "images", tmp_path / "scores"
    count = make_images(str(src), per_class=10)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "5"]
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.score", *argv, "-q"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, results
    for code, (_, err) in zip(codes, results):
        assert code in (0, 2), err[-2000:]
        if code == 2:
            assert len(err.strip().splitlines()) == 1
    table = pq.read_table(out)
    assert table.num_rows == count and len(set(table["uri"].to_pylist())) == count
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_driver_killed_during_the_final_publish(tiny_model, tmp_path):
    """SIGKILL after the last part is committed, before the final summary: the
    re-run finds every part, writes nothing twice and completes the summary."""
    from pipeline.runtime.faults import FAULT_ENV

    src, out = tmp_path / "images", tmp_path / "scores"
    count = make_images(str(src), per_class=6)
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--rows-per-file", "5", "-q"]
    env = {**os.environ, FAULT_ENV: f"score-parts-committed:sigkill:{tmp_path / 'killed'}"}
    proc = subprocess.run([sys.executable, "-m", "jobs.score", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / "killed").exists(), proc.stderr[-2000:]
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(parts) == expected_parts(src, 5)
    assert json.loads((out / SUMMARY_NAME).read_text())["status"] == "running"

    proc = subprocess.run([sys.executable, "-m", "jobs.score", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["status"] == "complete" and summary["files_written"] == 0 and summary["files_kept"] == len(parts)
    table = pq.read_table(out)
    assert table.num_rows == count and len(set(table["uri"].to_pylist())) == count
