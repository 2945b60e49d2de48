"""The predictor that keeps an accelerator busy: uint8 batches cast and
scaled on the device with the same results as the float path, top-k there
with the stable sort's tie order, least-loaded dispatch between actors, one
clear error for a model that does not load, ``--concurrency`` the cluster
cannot place refused, and decode that overlaps reading with decoding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data.preprocess import current_recipe
from pipeline.scoring.predictor import ScoringPredictor
from tests import imagefactory as fx

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.small_model import write_run

    return write_run(tmp_path_factory.mktemp("run") / "run", CLASSES)


def float_path(artifact, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """How the predictor scored before: float32 on the host, the model, a
    stable descending sort."""
    probs = artifact.predict_batch(np.asarray(images, np.float32))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top.astype(np.int32), np.take_along_axis(probs, top, axis=1)


def test_uint8_on_the_device_equals_the_float_path_bit_for_bit(tiny_model, monkeypatch):
    predictor = ScoringPredictor(tiny_model, StorageConfig(), top_k=2, recipe=current_recipe(75), device_batch=16)
    artifact = predictor.artifact
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 75, 75, 3), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    expected_index, expected_scores = float_path(artifact, images, 2)

    # The host sends uint8, never the float32 batch (4x the bytes).
    monkeypatch.setattr(type(artifact), "predict_batch", lambda *a: pytest.fail("float32 path used"))
    spec = predictor._call.input_signature[0]
    assert spec.dtype.name == "uint8" and spec.shape.as_list() == [None, 75, 75, 3]

    index, scores = predictor.top_k(images)  # 40 images: device calls of 16, 16, 8
    assert index.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(index, expected_index)
    assert scores.tobytes() == expected_scores.tobytes()  # bit for bit

    ok = np.ones(42, bool)
    ok[[3, 20]] = False
    index, scores = predictor.score(ok, images[:20], images[20:])
    np.testing.assert_array_equal(index[ok], expected_index)
    assert scores[ok].tobytes() == expected_scores.tobytes()
    assert (index[~ok] == -1).all() and (scores[~ok] == 0).all()
    with pytest.raises(TypeError, match="uint8"):
        predictor.top_k(images.astype(np.float32))


def test_top_k_on_the_device_orders_ties_as_the_stable_sort():
    from pipeline.artifact import top_k

    probs = np.array([[0.25, 0.25, 0.5, 0.0, 0.0],
                      [0.2, 0.2, 0.2, 0.2, 0.2],
                      [0.0, 0.1, 0.1, 0.4, 0.4],
                      [0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    for k in (1, 3, 5):
        index, values = top_k(probs, k)
        expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(index.numpy(), expected)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(probs, expected, axis=1))


# ---------------------------------------------------------------- dispatch


def part_task_args(plan) -> tuple[dict, dict]:
    """``score_part``'s plan and settings arguments as the job passes them,
    for a part scored one file a batch, top 2, no lease."""
    shared = {"plan_dir": plan.plan_dir, "output": plan.output, "labels": plan.labels, "model": plan.model,
              "lease_job": "", "writer": plan.writer}
    settings = {"batch_size": 1, "read_batch": 1, "recipe": plan.recipe, "max_bytes": 2**20, "max_pixels": 10**7,
                "top_k": 2, "retry_s": 5.0, "max_error_fraction": None}
    return shared, settings


def test_least_loaded_dispatch_sends_batches_away_from_a_slow_actor(ray_session, tiny_model, tmp_path):
    """A part task (score_part, as the job runs it) with two actors, one of
    which takes 5 s a batch: the fast one gets most of the 16 batches,
    where a fixed rotation gives each 8. The bound leaves room for a loaded
    machine (the part takes longer, so the slow actor is free more often) and
    still fails for rotation."""
    import ray

    from pipeline.scoring.execute import score_part
    from pipeline.scoring.plan import plan_score, prepare_parts

    @ray.remote(num_cpus=0)
    class Stub:
        def __init__(self, delay: float):
            self.delay, self.calls = delay, 0

        def score(self, ok, *images):
            time.sleep(self.delay)
            self.calls += 1
            return np.zeros((len(ok), 2), np.int32), np.full((len(ok), 2), 0.5, np.float32)

        def count(self) -> int:
            return self.calls

    fx.write_tree(str(tmp_path / "images"), {f"{i:02d}.png": fx.palette_png() for i in range(16)})
    cfg = load_config(None, ["score.rows_per_file=100"])
    plan = plan_score(cfg, tiny_model, str(tmp_path / "images"), str(tmp_path / "out"))
    prepare_parts(cfg, plan)
    assert len(plan.parts) == 1
    slow, fast = Stub.remote(5.0), Stub.remote(0.0)
    assert ray.get([slow.count.remote(), fast.count.remote()]) == [0, 0]  # both started, as the job waits for
    shared, settings = part_task_args(plan)
    result = score_part(plan.parts[0], shared, StorageConfig(), [slow, fast], settings)
    assert result["rows"] == 16 and result["errors"] == {}
    calls = {"slow": ray.get(slow.count.remote()), "fast": ray.get(fast.count.remote())}
    assert calls["slow"] + calls["fast"] == 16
    assert calls["fast"] >= 11, calls  # rotation: 8 each


# ---------------------------------------------------------------- start-up


def test_a_model_that_fails_to_load_is_one_error_before_any_part(ray_session, tiny_model, tmp_path, capsys):
    """Its archive's config passes the checks before the job starts; its
    weights do not load: exit 1 with the loader's message, once, from the
    readiness check, and no part is scored."""
    import shutil
    import zipfile

    from jobs import score as score_job
    from jobs._cli import run

    broken = tmp_path / "broken-run"
    shutil.copytree(tiny_model, broken)
    with zipfile.ZipFile(Path(tiny_model) / "model.keras") as src, \
            zipfile.ZipFile(broken / "model.keras", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"not an HDF5 file" if name.endswith(".h5") else src.read(name))
    fx.write_tree(str(tmp_path / "images"), {"a.jpg": fx.rgb_jpeg(), "b.png": fx.palette_png()})
    out = tmp_path / "out"
    capsys.readouterr()
    started = time.monotonic()
    code = run(score_job.main, ["--model", str(broken), "--images", str(tmp_path / "images"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith(("failed: ", "error: "))]
    assert len(lines) == 1 and lines[0].startswith(f"failed: cannot load model {broken}"), err
    assert "Unable to synchronously open file" in lines[0]  # the loader's own words
    assert "died" not in err
    assert not list(out.glob("*.parquet"))
    assert time.monotonic() - started < 120


def test_concurrency_the_cluster_cannot_place_exits_2(ray_session, tiny_model, tmp_path, capsys):
    from jobs import score as score_job
    from jobs._cli import run

    fx.write_tree(str(tmp_path / "images"), {"a.jpg": fx.rgb_jpeg()})
    out = tmp_path / "out"
    capsys.readouterr()
    code = run(score_job.main, ["--model", tiny_model, "--images", str(tmp_path / "images"), "--output", str(out),
                                "--concurrency", "64"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "score.concurrency=64" in err and "(2 CPUs on 1 node) can place 1" in err, err
    assert not out.exists() or not [p.name for p in out.iterdir()]  # refused before the listing and any write


# ---------------------------------------------------------------- decode


def test_decode_overlaps_reading_and_keeps_order(tmp_path, monkeypatch):
    """Files arrive out of order (the last one much later): each is decoded
    as soon as it and those before it are in, before the last read ends, and
    the images land in their rows, as a plain decode of each file gives them."""
    from pipeline import storage as st
    from pipeline.scoring import decode
    from pipeline.scoring.decode import read_and_decode, to_uint8
    from pipeline.data.preprocess import model_inputs

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0), (0, 90, 160), (250, 250, 250)]
    files = {f"{i}.jpg": fx.rgb_jpeg(colour=c, size=(40 + 7 * i, 30 + 3 * i)) for i, c in enumerate(colours)}
    fx.write_tree(str(tmp_path), files)
    uris = [str(tmp_path / name) for name in files]
    delays = {uri: 0.05 * (len(uris) - 1 - i) for i, uri in enumerate(uris)}
    delays[uris[-1]] = 1.0
    events: list = []
    lock = threading.Lock()
    read_bytes, pixels = st.read_bytes, decode.file_pixels

    def slow_read(uri, storage):
        time.sleep(delays[uri])
        with lock:
            events.append(("read", uri, time.monotonic()))
        return read_bytes(uri, storage)

    def timed_pixels(raw, recipe, max_pixels):
        with lock:
            events.append(("decode", None, time.monotonic()))
        return pixels(raw, recipe, max_pixels)

    monkeypatch.setattr(st, "read_bytes", slow_read)
    monkeypatch.setattr(decode, "file_pixels", timed_pixels)
    recipe = current_recipe(75)
    sizes = [len(files[name]) for name in files]
    out = read_and_decode({"uri": uris, "size": sizes}, storage=StorageConfig(), recipe=recipe, max_bytes=2**20,
                          max_pixels=10**7)
    last_read = max(t for kind, uri, t in events if kind == "read" and uri == uris[-1])
    decoded_before = [t for kind, _, t in events if kind == "decode" and t < last_read]
    assert len(decoded_before) == len(uris) - 1, events  # all but the last, while it was still being read
    expected = to_uint8(np.stack(model_inputs([pixels(files[n], recipe, 10**7) for n in files], recipe)))
    assert list(out["uri"]) == uris and list(out["error"]) == [""] * len(uris)
    np.testing.assert_array_equal(out["image"], expected)
