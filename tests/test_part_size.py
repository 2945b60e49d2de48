"""Part files sized for readers: ``score.part_mb`` gives the rows per part
from the bytes a row of the input's own URIs takes in a part file;
``score.rows_per_file`` caps it; the size is fixed by the plan, so a re-run
keeps the parts, and outputs planned before part_mb keep theirs."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score as score_job
from jobs._cli import run
from pipeline.config import load_config
from pipeline.errors import UsageError
from pipeline.scoring.commit import SUCCESS_NAME, part_bytes, publish_part, to_table
from pipeline.scoring.decode import NO_ERROR
from pipeline.scoring.plan import ScorePlan, plan_score, rows_per_part
from tests.test_score import CLASSES, make_images, tiny_model  # noqa: F401 - the session fixture

LABELS = [f"n{i:08d}" for i in range(1000)]
MODEL = "s3://models/inceptionv3/model.keras"


def numbered(i: int) -> str:
    return f"s3://photos/2026/11/30/camera-07/img-{i:09d}.jpg"


def hashed(i: int) -> str:
    return f"s3://photos/by-hash/{np.random.default_rng(i).bytes(16).hex()}.jpg"


def realistic_part(uris: list[str], top_k: int = 5):
    """Rows as a model scores them: peaked softmax outputs, their top k."""
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(len(LABELS), 0.05), size=len(uris)).astype(np.float32)
    index = np.argsort(-probs, axis=1)[:, :top_k]
    return to_table({"uri": uris, "top_k_index": index, "top_k_scores": np.take_along_axis(probs, index, axis=1),
                     "error": [NO_ERROR] * len(uris)}, LABELS, MODEL)


def sized_plan(source: str) -> ScorePlan:
    return ScorePlan(model=MODEL, model_uri=MODEL, source=source, output="/unused", labels=LABELS, top_k=5,
                     image_size=299, rows_per_file=0)


@pytest.mark.parametrize("name", [numbered, hashed], ids=["numbered", "hashed"])
def test_a_part_file_lands_under_part_mb_and_near_it(tmp_path, name):
    """What a reader sees: a full part's Parquet file, as published, is at
    most score.part_mb and more than half of it, whether the keys compress
    well (numbered) or not (hashed)."""
    cfg = load_config(None, ["score.part_mb=2"])
    rows = rows_per_part(cfg, sized_plan("s3://photos/"), [name(i) for i in range(1000)])
    assert rows % 10 ** (len(str(rows)) - 2) == 0  # two significant digits: a re-run gets the same
    uris = sorted(name(i) for i in range(rows))
    out = tmp_path / f"part-{name.__name__}.parquet"
    publish_part(realistic_part(uris), pa.array(uris, pa.string()), str(out), cfg.storage, tmp_tag="t")
    assert pq.read_metadata(out).num_rows == rows
    size = os.path.getsize(out)
    assert 0.5 * 2 * 2**20 < size <= 2 * 2**20, (rows, size)


def test_rows_per_file_caps_part_mb_and_one_of_them_is_needed():
    sample = [numbered(i) for i in range(1000)]
    assert rows_per_part(load_config(None, ["score.rows_per_file=1000"]), sized_plan("s3://photos/"), sample) == 1000
    assert rows_per_part(load_config(None, ["score.rows_per_file=1000", "score.part_mb=null"]),
                         sized_plan("s3://photos/"), sample) == 1000
    # Longer URIs take more bytes a row: fewer of them in a part.
    long = [f"s3://photos/{'x' * 200}/{i:09d}.jpg" for i in range(1000)]
    assert part_bytes(long, LABELS, 5, MODEL)[0] > part_bytes(sample, LABELS, 5, MODEL)[0]
    cfg = load_config(None, [])
    assert rows_per_part(cfg, sized_plan("s3://photos/"), long) < rows_per_part(cfg, sized_plan("s3://photos/"), sample)
    with pytest.raises(UsageError, match="part_mb and score.rows_per_file are both null"):
        load_config(None, ["score.part_mb=null"])


def test_plan_sizes_parts_from_the_inputs_own_names(tiny_model, tmp_path):
    """Before Ray starts: the first names of a folder (any depth) and of a list
    decide the rows per part; the dry run says it."""
    names = {"short": [f"{i:04d}.jpg" for i in range(50)],
             "long": [f"{np.random.default_rng(i).bytes(60).hex()}.jpg" for i in range(50)]}
    for kind, files in names.items():
        folder = tmp_path / kind / "deeper"
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_bytes(b"")
        (tmp_path / f"{kind}.txt").write_text("".join(f"{folder}/{name}\n" for name in files))
    cfg = load_config(None, ["score.part_mb=1"])
    out = str(tmp_path / "out")
    short, long = (plan_score(cfg, tiny_model, str(tmp_path / k), out).rows_per_file for k in ("short", "long"))
    assert short > 1.5 * long > 0
    listed = [plan_score(cfg, tiny_model, str(tmp_path / f"{k}.txt"), out).rows_per_file for k in ("short", "long")]
    assert listed == [short, long]  # the same URIs, listed or found


@pytest.mark.slow
def test_parts_by_size_resume_and_older_plans_are_kept(ray_session, tiny_model, tmp_path):
    src = tmp_path / "src"
    n = make_images(str(src), per_class=4)
    uris = sorted(str(p) for p in src.rglob("*") if p.is_file())
    assert len(uris) == n
    # A part_mb that holds 4 rows of these names.
    per_row, fixed = part_bytes(uris, CLASSES, 3, tiny_model)
    mb = (4.5 * per_row + fixed) / 2**20
    out = tmp_path / "out"
    argv = ["--model", tiny_model, "--images", str(src), "--output", str(out), "--top-k", "3"]
    assert run(score_job.main, argv + ["--set", f"score.part_mb={mb}"]) == 0
    parts = sorted(out.glob("part-*.parquet"))
    rows = [pq.read_metadata(p).num_rows for p in parts]
    assert max(rows) == 4 and len(parts) >= n // 4
    got = sorted(u for p in parts for u in pq.read_table(p, columns=["uri"]).column("uri").to_pylist())
    assert got == uris  # every image once

    # Re-run with the same settings: nothing is scored again.
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    assert run(score_job.main, argv + ["--set", f"score.part_mb={mb}"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps

    # An output planned before part_mb (plan version 2, parts of rows_per_file)
    # is complete under today's defaults: its parts are kept.
    plan_file = out / "_plan" / "plan.json"
    saved = json.loads(plan_file.read_text())
    saved["key"] = {"version": 2, "images": saved["key"]["images"], "rows_per_file": 4,
                    "uri_protocols": saved["key"]["uri_protocols"]}
    del saved["rows_per_part"]
    plan_file.write_text(json.dumps(saved))
    assert run(score_job.main, argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == stamps
    assert (out / SUCCESS_NAME).exists()
    # ... unless other rows per file are asked for: planned again, each image once.
    assert run(score_job.main, argv + ["--rows-per-file", "5"]) == 0
    again = sorted(out.glob("part-*.parquet"))
    assert max(pq.read_metadata(p).num_rows for p in again) == 5
    assert sorted(u for p in again for u in pq.read_table(p, columns=["uri"]).column("uri").to_pylist()) == uris
    assert json.loads(plan_file.read_text())["rows_per_part"] == 5



def test_few_parts_widen_their_window_within_a_budget():
    """With fewer parts than the actors and decode CPUs need, a part task
    keeps more batches in flight; the total stays within the budget plus 4 a
    part."""
    from pipeline.scoring.execute import BATCHES_AHEAD, PredictorPool, batches_ahead, batches_wanted

    gpus = PredictorPool(actors=8, gpus=1, cpus=4, decode_cpus=96, batch_size=256)
    wanted = batches_wanted(gpus, read_batch=64)
    assert wanted == 24  # 96 decode CPUs at 4 tasks a batch; 8 actors want 16
    windows: list[int] = []
    for _ in range(10):
        windows.append(batches_ahead(wanted, windows))
    assert windows[0] == 24 and windows[1:] == [BATCHES_AHEAD] * 9
    assert batches_ahead(wanted, [24 - 10]) == 10  # a finished part's share goes to the next
    assert batches_wanted(PredictorPool(actors=1, gpus=0, cpus=1, decode_cpus=1, batch_size=64), 64) == 2


@pytest.mark.slow
def test_a_part_task_keeps_its_window_of_calls_in_flight(ray_session, tiny_model, tmp_path):
    """score_part with a window of 8: up to 9 calls are at the actor at once
    (the window, and the one it waits on); the default window keeps 5."""
    import threading
    import time

    import ray

    from pipeline.scoring.execute import BATCHES_AHEAD, score_part
    from pipeline.scoring.plan import prepare_parts
    from tests import imagefactory as fx
    from tests.test_predictor import part_task_args

    @ray.remote(num_cpus=0, max_concurrency=32)
    class Counting:
        def __init__(self):
            self.now = self.most = 0
            self.lock = threading.Lock()

        def score(self, ok, *images):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(3.0)  # long enough for the window's decode tasks to start meanwhile
            with self.lock:
                self.now -= 1
            return np.zeros((len(ok), 2), np.int32), np.full((len(ok), 2), 0.5, np.float32)

        def most_at_once(self) -> int:
            return self.most

    fx.write_tree(str(tmp_path / "images"), {f"{i:02d}.png": fx.palette_png() for i in range(12)})
    cfg = load_config(None, ["score.rows_per_file=100"])
    plan = plan_score(cfg, tiny_model, str(tmp_path / "images"), str(tmp_path / "out"))
    prepare_parts(cfg, plan)
    shared, settings = part_task_args(plan)
    seen = {}
    for ahead in (8, BATCHES_AHEAD):
        actor = Counting.remote()
        assert ray.get(actor.most_at_once.remote()) == 0
        result = score_part(plan.parts[0], shared, cfg.storage, [actor], settings, ahead)
        assert result["rows"] == 12
        seen[ahead] = ray.get(actor.most_at_once.remote())
    assert seen[8] >= 7 and seen[BATCHES_AHEAD] <= BATCHES_AHEAD + 1, seen


def test_an_s3_prefix_is_sized_from_its_first_keys_at_any_depth(s3_endpoint, s3_bucket):
    """On S3 the first keys under the prefix (one request, no delimiter)
    are the sample: image keys at any depth, other files left out, at most n."""
    from pipeline.scoring.listing import sample_uris

    fs, bucket = s3_bucket
    names = [f"{np.random.default_rng(i).bytes(60).hex()}.jpg" for i in range(30)]
    for i, name in enumerate(names):
        fs.pipe(f"{bucket}/imgs/{'a/b/' if i % 2 else 'c/'}{name}", b"")
    fs.pipe(f"{bucket}/imgs/notes.txt", b"text")
    storage = load_config(None, [f"storage.endpoint_url={s3_endpoint}"]).storage
    sample = sample_uris(f"s3://{bucket}/imgs", storage)
    assert sorted(sample) == sorted(f"s3://{bucket}/imgs/{'a/b/' if i % 2 else 'c/'}{n}" for i, n in enumerate(names))
    assert len(sample_uris(f"s3://{bucket}/imgs/", storage, n=7)) == 7
