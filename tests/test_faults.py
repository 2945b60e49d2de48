"""Faults done for real: a training worker killed with SIGKILL (found through
Ray's state API), training drivers killed with SIGKILL and re-run, secrets that
must never be written anywhere, models that carry code."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from jobs import train as train_job
from jobs._cli import run
from pipeline.faults import FAULT_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--set", "data.image_size=75", "--set", "data.batch_size=8", "--set", "model.weights=none",
         "--set", "model.head_units=16", "--set", "train.transfer.epochs=0", "--set", "train.finetune.epochs=3",
         "--set", "train.finetune.unfreeze_after=mixed9", "--set", "train.early_stopping_patience=null",
         "--set", "train.bn_stats_batches=2", "--set", "train.top_k=2", "--set", "scaling.num_workers=1"]


def checkpoints(run_dir) -> list[str]:
    """Checkpoints Ray Train has registered (uploaded and recorded), not merely
    folders being uploaded."""
    try:
        with open(os.path.join(str(run_dir), "checkpoints", "checkpoint_manager_snapshot.json")) as f:
            return [c["checkpoint_dir_name"] for c in json.load(f)["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def epochs_of(summary: dict) -> list[tuple[str, int]]:
    return [(h["phase"], h["epoch"]) for h in summary["history"]]


@pytest.mark.slow
def test_worker_killed_with_sigkill_resumes_from_last_checkpoint(learnable_shards, tmp_path):
    from ray.util.state import list_actors

    data, _ = learnable_shards
    out = tmp_path / "run"
    result = {}

    def train():
        try:
            result["code"] = run(train_job.main, ["--data", data, "--output", str(out), *QUICK,
                                                  "--set", "train.max_failures=2"])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = repr(exc)

    job = threading.Thread(target=train)
    job.start()
    deadline = time.time() + 600
    while not checkpoints(out) and time.time() < deadline and job.is_alive():
        time.sleep(0.2)
    assert checkpoints(out), "no checkpoint appeared"
    import ray

    address = ray.get_runtime_context().gcs_address
    dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]
    workers = list_actors(address=f"http://{dashboard}", filters=[("class_name", "=", "RayTrainWorker"),
                                                                 ("state", "=", "ALIVE")])
    assert len(workers) == 1, (address, workers)
    os.kill(workers[0].pid, signal.SIGKILL)  # mid-epoch 2 (or later), a real process kill
    job.join(900)
    assert result == {"code": 0}
    summary = json.load(open(out / "summary.json"))
    assert summary["resumed"] and summary["resumed_from"]["epoch"] >= 1
    # every epoch exactly once: the killed epoch was redone, nothing before it
    assert epochs_of(summary) == [("finetune", 1), ("finetune", 2), ("finetune", 3)]
    # killed inside the phase: weights and optimizer state restored, each variable checked against the file
    assert summary["resumed_from"]["optimizer_restored"] is True and summary["resumed_from"]["variables_verified"] > 0
    assert json.load(open(out / "metrics.json"))["examples"] > 0


def train_cli(data, out, *extra, env=None, log=None) -> subprocess.Popen:
    """``python -m jobs.train``; its output to a pipe (``finish``) or to the file ``log``."""
    return subprocess.Popen([sys.executable, "-m", "jobs.train", "--data", data, "--output", str(out), *QUICK, *extra],
                            cwd=ROOT, stdout=open(log, "w") if log else subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen, timeout=900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and the local Ray it started (its own session)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


@pytest.mark.slow
def test_training_driver_killed_before_and_after_the_first_checkpoint_then_resumes(learnable_shards, tmp_path):
    """Killed before any checkpoint, a re-run starts clean; killed after one,
    the next re-run resumes from it and every epoch runs exactly once. The
    last, successful run looks like one: quiet, ending with the summary."""
    data, _ = learnable_shards
    out = tmp_path / "run"
    proc = train_cli(data, out)
    deadline = time.time() + 300
    while not (out / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert (out / "config.yaml").exists() and not checkpoints(out)
    kill_group(proc)
    assert not checkpoints(out) and not (out / "model.keras").exists() and not (out / "summary.json").exists()

    second = tmp_path / "second.log"
    proc = train_cli(data, out, log=second)  # starts clean, then is killed after its first checkpoint
    deadline = time.time() + 600
    while not checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoints(out)
    kill_group(proc)
    log = second.read_text()
    assert "train: 3 classes" in log and "(resuming)" not in log, log[-3000:]  # started clean
    assert not (out / "summary.json").exists() and not (out / "model.keras").exists()
    assert not [p for p in os.listdir(out) if ".tmp-" in p]

    code, log = finish(train_cli(data, out))
    assert code == 0, log[-3000:]
    assert "(resuming)" in log
    summary = json.load(open(out / "summary.json"))
    assert summary["resumed"] and summary["resumed_from"]["epoch"] >= 1
    assert epochs_of(summary) == [("finetune", i) for i in (1, 2, 3)]
    # A run that worked looks like one: no native start-up notices or Ray
    # notices from the driver or any worker, and it ends with the summary.
    for notice in ("E0000", "cuInit", "absl::InitializeLog", "I0000", "oneDNN", "cudart_stub",
                   "Failed to query Ray Train Controller", "PreemptionWatcher", "Token authentication"):
        assert notice not in log, (notice, log[-3000:])
    assert "trained in" in log


SENTINEL = "SENTINEL-9f2c4e-SECRET"


@pytest.mark.slow
def test_driver_killed_while_publishing_finishes_on_rerun_and_secrets_never_reach_logs_or_files(
        learnable_shards, tmp_path):
    """Killed after the model was written but before summary.json, a re-run
    publishes without training again, and a completed run is never overwritten.
    All three runs carry credentials (config and environment): none of them
    reaches the output, the run directory or Ray's own session files."""
    data, _ = learnable_shards
    out = tmp_path / "run"
    marker = tmp_path / "killed"
    ray_tmp = tempfile.mkdtemp(prefix="ir-", dir="/tmp")  # short: Ray's socket paths are length-limited
    secret = ["--set", f"storage.secret_access_key={SENTINEL}", "--set", "storage.access_key_id=AKIDSENTINEL00"]
    env = {"AWS_SECRET_ACCESS_KEY": SENTINEL, "RAY_TMPDIR": ray_tmp}
    logs = []
    code, log = finish(train_cli(data, out, *secret, env={**env, FAULT_ENV: f"published:sigkill:{marker}"}))
    logs.append(log)
    assert code == -signal.SIGKILL and marker.exists(), log[-2000:]
    assert (out / "model.keras").exists() and not (out / "summary.json").exists()  # not complete-looking

    code, log = finish(train_cli(data, out, *secret, env=env))
    logs.append(log)
    assert code == 0, log[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert epochs_of(summary) == [("finetune", i) for i in (1, 2, 3)]  # nothing retrained
    # and a completed run is never overwritten
    code, log = finish(train_cli(data, out, *secret, env=env))
    logs.append(log)
    assert code == 2 and "completed run" in log

    for log in logs:
        assert SENTINEL not in log and "AKIDSENTINEL00" not in log
    assert "**********" in (out / "config.yaml").read_text()
    scanned = 0
    for folder in (out, ray_tmp):
        for path in glob.glob(os.path.join(str(folder), "**", "*"), recursive=True):
            if os.path.isfile(path) and not os.path.islink(path):
                blob = open(path, "rb").read()
                assert SENTINEL.encode() not in blob, path
                assert b"AKIDSENTINEL00" not in blob, path
                scanned += 1
    assert scanned > 20  # the run's artifacts and Ray's own session logs were read
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_model_with_lambda_layer_is_refused_unless_allowed(tmp_path):
    import tf_keras as keras

    from pipeline.artifact import load_artifact
    from pipeline.config import StorageConfig
    from pipeline.errors import UsageError

    inputs = keras.Input((75, 75, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(UsageError, match="refused in safe mode"):
        load_artifact(str(tmp_path), StorageConfig())
    assert load_artifact(str(tmp_path), StorageConfig(), allow_unsafe=True).labels == ["a", "b"]
