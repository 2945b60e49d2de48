"""Score throughput: the score job against the tutorial's per-image loop and
against plain batched ``predict``, and how its time and memory scale.

    python -m tests.benchmarks.run score

One model (the demo's: InceptionV3 at 75x75, 5 classes, untrained weights, since
speed does not depend on them) and the demo images (128x128, one in seven PNG):
N images, and 4N for the scale runs. Every round runs, side by side:

(a) loop: the tutorial's per-image loop in this process: PIL open, convert,
    resize, ``model.predict`` on one image.
(b) ceiling: ``model.predict(batch_size=64)`` over the 4N images already decoded
    and resized in memory: no reading, no decoding, no Ray. Also timed, for
    reference: the same batches through the compiled inference call the job's
    predictor uses (``ModelArtifact.predict_batch``), which skips ``predict``'s
    per-call set-up.
(c) job: ``python -m jobs.score`` as its own process, which starts its own local
    Ray, on N and on 4N images. Its time is the job's own ``elapsed_s`` (listing
    done, from Ray up to the last Parquet file and the summary), so it includes
    starting the predictor actor (TensorFlow import, model load); peak memory is
    the largest sum of resident memory over the job's process tree (driver, Ray
    services and workers), sampled every 0.1 s.

Each figure is its fastest round, because load from other processes only ever
adds time; peak memory is the largest seen in any round.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.data import demo_data
from tests.benchmarks import accounting

PER_CLASS = 120  # N = 5 classes x 120 = 600 images
SCALE = 4
STEADY_SCALE = 12  # the long run that (d) is read from: start-up noise of a second is 2% of its extra time
IMAGE_SIZE = 128
MODEL_SIZE = 75
BATCH = 64
ROUNDS = 3
ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"job_vs_loop": 3.0, "job_vs_ceiling": 0.8, "time_ratio_max": 4.4, "memory_ratio_max": 1.2}


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        model_dir = build_model_dir(os.path.join(tmp, "run"))
        small = os.path.join(tmp, "small")
        large = os.path.join(tmp, "large")
        n_small = demo_data.generate(small, per_class=PER_CLASS, size=IMAGE_SIZE)
        n_large = demo_data.generate(large, per_class=PER_CLASS * SCALE, size=IMAGE_SIZE, seed=1)
        steady = os.path.join(tmp, "steady")
        n_steady = demo_data.generate(steady, per_class=PER_CLASS * STEADY_SCALE, size=IMAGE_SIZE, seed=2)
        artifact = load_model(model_dir)
        model = artifact.model
        ceiling_inputs = decode_all(large)
        runs = {
            "loop": lambda r: time_loop(model, small),
            "ceiling": lambda r: time_ceiling(model, ceiling_inputs),
            "compiled": lambda r: time_compiled(artifact, ceiling_inputs),
            "job_small": lambda r: time_job(model_dir, small, os.path.join(tmp, f"out-small-{r}"), n_small),
            "job_large": lambda r: time_job(model_dir, large, os.path.join(tmp, f"out-large-{r}"), n_large),
            "job_steady": lambda r: time_job(model_dir, steady, os.path.join(tmp, f"out-steady-{r}"), n_steady),
        }
        rounds = []
        for r in range(ROUNDS):
            timings = {name: with_others_cpu(run_one, r) for name, run_one in runs.items()}
            print(f"score bench round {r + 1}/{ROUNDS}: {timings}", file=sys.stderr, flush=True)
            rounds.append(timings)
    return summarise(rounds, n_small, n_large, n_steady)


# --- the model and images -------------------------------------------------------


def build_model_dir(folder: str) -> str:
    import tf_keras as keras

    from pipeline.artifact import preprocessing_spec
    from pipeline.config import ModelConfig
    from pipeline.training.model import build_model

    os.makedirs(folder, exist_ok=True)
    keras.utils.set_random_seed(0)
    model = build_model(len(demo_data.CLASSES), MODEL_SIZE, ModelConfig(weights="none", head_units=256))
    model.save(os.path.join(folder, "model.keras"))
    Path(folder, "labels.json").write_text(json.dumps(list(demo_data.CLASSES)))
    Path(folder, "preprocessing.json").write_text(json.dumps(preprocessing_spec(MODEL_SIZE)))
    Path(folder, "summary.json").write_text(json.dumps({"job": "train"}))  # a completed run
    return folder


def load_model(model_dir: str):
    from pipeline.artifact import load_artifact
    from pipeline.config import StorageConfig

    artifact = load_artifact(model_dir, StorageConfig())
    warm = np.zeros((BATCH, MODEL_SIZE, MODEL_SIZE, 3), np.float32)
    artifact.model.predict(warm, batch_size=BATCH, verbose=0)
    artifact.model.predict(warm[:1], verbose=0)
    artifact.predict_batch(warm)
    return artifact


def image_files(tree: str) -> list[Path]:
    return sorted(p for p in Path(tree).rglob("*") if p.is_file())


def decode_all(tree: str) -> np.ndarray:
    from pipeline.data.preprocess import current_recipe, file_pixels, model_inputs

    recipe = current_recipe(MODEL_SIZE)
    return np.stack(model_inputs([file_pixels(p.read_bytes(), recipe, 10**8) for p in image_files(tree)], recipe))


# --- the runs -------------------------------------------------------------------


def time_loop(model, tree: str) -> dict:
    from PIL import Image

    files = image_files(tree)
    started = time.perf_counter()
    for path in files:
        img = Image.open(path).convert("RGB").resize((MODEL_SIZE, MODEL_SIZE), Image.Resampling.BILINEAR)
        model.predict(np.asarray(img, dtype=np.float32)[None], verbose=0)
    return {"s": round(time.perf_counter() - started, 3), "images": len(files)}


def time_ceiling(model, inputs: np.ndarray) -> dict:
    started = time.perf_counter()
    model.predict(inputs, batch_size=BATCH, verbose=0)
    return {"s": round(time.perf_counter() - started, 3), "images": len(inputs)}


def time_compiled(artifact, inputs: np.ndarray) -> dict:
    started = time.perf_counter()
    for start in range(0, len(inputs), BATCH):
        artifact.predict_batch(inputs[start : start + BATCH])
    return {"s": round(time.perf_counter() - started, 3), "images": len(inputs)}


def time_job(model_dir: str, images: str, output: str, expected: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "jobs.score", "--model", model_dir, "--images", images, "--output", output,
           "--batch-size", str(BATCH), "-q"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    _, stderr = proc.communicate(timeout=1800)
    wall = time.perf_counter() - started
    monitor.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"score job failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads(Path(output, "_summary.json").read_text())
    if summary["images"] != expected or summary["scored"] != expected:
        raise RuntimeError(f"score job scored {summary['scored']} of {expected} images")
    return {"s": summary["elapsed_s"], "wall_s": round(wall, 2), "images": expected,
            "peak_rss_mb": round(monitor.peak / 2**20), "tree_cpu_s": monitor.cpu_s}


def with_others_cpu(run_one, r: int) -> dict:
    """Run and add ``others_cpu``: the share of the machine's CPU time that
    processes other than this one and the job it ran used meanwhile."""
    busy, own, started = accounting.machine_busy_s(), _own_cpu_s(), time.perf_counter()
    result = run_one(r)
    wall = time.perf_counter() - started
    ours = _own_cpu_s() - own + result.pop("tree_cpu_s", 0.0)
    others = (accounting.machine_busy_s() - busy) - ours
    return {**result, "others_cpu": round(max(0.0, others) / (len(os.sched_getaffinity(0)) * wall), 2)}


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _load_note(results: dict) -> str:
    """How busy the machine was, from the share of CPU other processes took per run."""
    shares = [run["others_cpu"] for r in results["rounds"] for run in r.values()
              if isinstance(run, dict) and "others_cpu" in run]
    if shares and max(shares) >= 0.05:
        return (f"Other processes took up to {max(shares):.0%} of the machine's CPU during a run, so "
                "absolute figures are noisy; the ratios compare runs made side by side.")
    return "No other process took a noticeable share of the CPU while measuring."


class TreeMonitor(threading.Thread):
    """Samples a process and its descendants every 0.1 s: the largest sum of
    their resident memory, and the CPU seconds each used (Ray's workers are not
    waited for by the job, so their CPU time never reaches ``os.times``)."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak, self._cpu, self._stop_flag = root, 0, {}, threading.Event()

    def run(self) -> None:
        while not self._stop_flag.wait(0.1):
            rss = 0
            for pid, proc in accounting.tree(self.root).items():
                self._cpu[pid] = proc.cpu_ticks
                rss += proc.rss_pages * os.sysconf("SC_PAGE_SIZE")
            self.peak = max(self.peak, rss)

    def stop(self) -> None:
        self._stop_flag.set()
        self.join()

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values()) / accounting.TICKS


# --- results --------------------------------------------------------------------


def summarise(rounds: list[dict], n_small: int, n_large: int, n_steady: int) -> dict:
    best = {name: min(r[name]["s"] for r in rounds) for name in rounds[0]}
    rate = {name: round(rounds[0][name]["images"] / best[name], 1) for name in best}
    steady = round((n_steady - n_small) / (best["job_steady"] - best["job_small"]), 1)
    memory = {name: max(r[name]["peak_rss_mb"] for r in rounds) for name in ("job_small", "job_large")}
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "images": {"small": n_small, "large": n_large, "steady": n_steady},
        "image_size": IMAGE_SIZE,
        "model_size": MODEL_SIZE,
        "batch_size": BATCH,
        "cpus": len(os.sched_getaffinity(0)),
        "rounds": rounds,
        "images_per_s": {**rate, "steady": steady},
        "job_vs_loop": round(rate["job_large"] / rate["loop"], 2),
        # The same N images through the loop and the job (start-up included).
        "job_vs_loop_same_images": round(rate["job_small"] / rate["loop"], 2),
        "job_vs_ceiling": round(rate["job_large"] / rate["ceiling"], 2),
        "steady_vs_ceiling": round(steady / rate["ceiling"], 2),
        "steady_vs_compiled": round(steady / rate["compiled"], 2),
        "time_ratio": round(best["job_large"] / best["job_small"], 2),
        "peak_rss_mb": memory,
        "memory_ratio": round(memory["job_large"] / memory["job_small"], 2),
        "targets": TARGETS,
    }


def markdown(results: dict) -> str:
    rate, t, n = results["images_per_s"], results["targets"], results["images"]
    mem = results["peak_rss_mb"]
    def cell(run: dict) -> str:
        return f"{run['s']:.2f} ({run['others_cpu']:.0%})"

    per_round = "\n".join(
        f"| {i} | {cell(r['loop'])} | {cell(r['ceiling'])} | {cell(r['compiled'])} | {cell(r['job_small'])} "
        f"| {cell(r['job_large'])} | {cell(r['job_steady'])} "
        f"| {r['job_small']['wall_s']:.1f} / {r['job_large']['wall_s']:.1f} "
        f"| {r['job_small']['peak_rss_mb']} / {r['job_large']['peak_rss_mb']} |"
        for i, r in enumerate(results["rounds"], start=1)
    )
    return f"""## Score throughput

Measured {results['measured_at']} on {results['cpus']} CPUs: demo images ({results['image_size']}x{results['image_size']}),
InceptionV3 at {results['model_size']}x{results['model_size']}, batch {results['batch_size']}; N = {n['small']}, 4N = {n['large']} images;
each figure is its fastest of {len(results['rounds'])} rounds. {_load_note(results)}

| run | images/s | ratio | target | |
|---|---:|---|---|---|
| (a) tutorial loop: PIL open + resize + `predict` on one image | {rate['loop']} | | | |
| (b) ceiling: batched `predict` on decoded tensors in memory | {rate['ceiling']} | | | |
| (c) score job, 4N images, end to end (actor start-up included) | {rate['job_large']} | (c)/(a) = {results['job_vs_loop']:.2f} | ≥ {t['job_vs_loop']} | {_mark(results['job_vs_loop'] >= t['job_vs_loop'])} |
| (c') score job on the loop's N images, end to end | {rate['job_small']} | (c')/(a) = {_same(results)} | ≥ {t['job_vs_loop']} | {_mark_same(results, t)} |
| | | (c)/(b) = {results['job_vs_ceiling']:.2f} | ≥ {t['job_vs_ceiling']} | {_mark(results['job_vs_ceiling'] >= t['job_vs_ceiling'])} |
| (d) score job, steady state: the extra images of a {_steady_n(results)} run over N, per extra second | {rate['steady']} | (d)/(b) = {results['steady_vs_ceiling']:.2f} | ≥ {t['job_vs_ceiling']} | {_mark(results['steady_vs_ceiling'] >= t['job_vs_ceiling'])} |
| (e) for reference: (b) through the predictor's compiled call | {rate['compiled']} | (d)/(e) = {results['steady_vs_compiled']:.2f} | | |

Scale, N to 4N images: time x{results['time_ratio']:.2f} (target ≤ {t['time_ratio_max']}: {_mark(results['time_ratio'] <= t['time_ratio_max'])}),
peak memory {mem['job_small']} MB to {mem['job_large']} MB, x{results['memory_ratio']:.2f} (target ≤ {t['memory_ratio_max']}: {_mark(results['memory_ratio'] <= t['memory_ratio_max'])}).

How it is measured:

- (a), (b) and (e) run in the benchmark process with the model already loaded and
  warmed up; the decoding for (b) and (e) happens before timing. They use both cores through
  TensorFlow's thread pools.
- (c) is `python -m jobs.score` in its own process with its own local Ray; the
  time is the job's `elapsed_s` from `_summary.json`: reading, decoding and
  resizing in Ray Data CPU tasks, one predictor actor, Parquet written and
  published, summary. Ray's own start-up is outside it (the job wall time
  below includes it). The predictor actor's start (TensorFlow import and model
  load, a few seconds) is inside it, which is why (c) gains with more images.
- (d) removes that fixed start-up: the extra images of a {_steady_n(results)} run over its extra time
  (a long run, so that a second of start-up noise moves it by 2%, not 20% as
  with 4N). On 2 cores the job is CPU-bound: decoding and resizing (about
  0.5 ms of CPU per image in the Ray task) share the cores with the model
  (about 4 ms of CPU per image at 75x75), while (b) and (e) only run the
  model. Sampled once a second in such a run's steady state: the predictor
  actor used about 1.5 of the 2 CPUs, the decode tasks 0.2, and about 8%
  stayed idle.
- Memory: the largest sum of resident set sizes over the job's whole process
  tree (driver, Ray services, workers), sampled every 0.1 s; shared pages
  (TensorFlow libraries, Ray's object store) count once per process.

Seconds per round (in brackets: share of the machine's CPU time that other
processes used meanwhile; jobs: `elapsed_s`; the job's own Ray processes count as its own), the job processes' wall seconds
including Ray's start, and their peak MB, for N / 4N images:

| round | (a) loop, N | (b) ceiling, 4N | (e) compiled, 4N | (c) job, N | (c) job, 4N | (d) job, {_steady_n(results)} | job wall s | job peak MB |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{per_round}
"""


def _steady_n(results: dict) -> str:
    n = results["images"]
    return f"{n['steady'] // n['small']}N"


def _same(results: dict) -> str:
    ratio = results.get("job_vs_loop_same_images")  # absent from results saved before it was measured
    return "not measured" if ratio is None else f"{ratio:.2f}"


def _mark_same(results: dict, targets: dict) -> str:
    ratio = results.get("job_vs_loop_same_images")
    return "" if ratio is None else _mark(ratio >= targets["job_vs_loop"])


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"
