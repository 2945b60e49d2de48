"""The training job's guards before and around its workers, without training:
the run directory's lease (a live holder refused, a dead one taken over), a
resume whose config or data differs from the first attempt, a resume at
another global batch, and a worker group that the job's own local Ray cannot
place. jobs.train runs in this process with Ray's start replaced by a stop
(everything after it needs a cluster); the placement test runs it in a
subprocess that has no Ray of its own or of the test session to find."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import train as train_job
from pipeline.errors import UsageError
from pipeline.storage.lease import LEASE_NAME, _process_start, identity
from pipeline.training import driver

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square"]
# Planning only: no fine-tuning phase (its cut check builds InceptionV3's layer list).
FAST = ["--set", "train.finetune.epochs=0", "--set", "model.weights=none"]


class RayStarted(Exception):
    """Raised by the stand-in for start_ray: the job got past every check before Ray."""


def write_shards(root: Path, settings: dict) -> str:
    """A manifest of shards prepared with ``settings`` (the shards themselves
    are never read: every test stops before Ray)."""
    from pipeline.data.shards import MANIFEST_NAME, build_manifest

    root.mkdir()
    counts = {c: 3 for c in CLASSES}
    entries = {split: [{"file": f"{split}-00000-{'0' * 12}.tfrecord", "examples": 6, "bytes": 4096,
                        "sha256": "0" * 64, "class_counts": counts}] for split in ("train", "validation")}
    manifest = build_manifest(source="images", classes=CLASSES, shards=entries, rejected=[], files_seen=12,
                              layout="flat", settings=settings)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture
def shards(tmp_path) -> str:
    return write_shards(tmp_path / "shards", {})


@pytest.fixture
def no_ray(monkeypatch):
    """jobs.train stops where it would start Ray; records the lease it held then."""
    seen = {}

    def stop(cfg, data=False):
        out = seen["output"]
        seen["lease"] = json.loads((Path(out) / LEASE_NAME).read_text())
        raise RayStarted()

    monkeypatch.setattr(train_job, "start_ray", stop)
    monkeypatch.setattr(driver, "check_local_placement", lambda cfg: None)
    return seen


def train(shards: str, out: str, no_ray: dict, *extra: str) -> int | str:
    """jobs.train's exit code, or "ray" when it got as far as starting Ray."""
    no_ray["output"] = out
    try:
        return train_job.main(["--data", shards, "--output", out, *FAST, *extra])
    except RayStarted:
        return "ray"
    except UsageError as exc:  # as jobs._cli.run reports it
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def test_a_model_larger_than_the_shards_jpeg_scale_to_is_refused_before_any_work(tmp_path, no_ray, capsys):
    """Shards prepared with prepare.jpeg_scale_to hold JPEGs decoded down to a
    shorter side of about that size: training a larger model on them is a
    configuration error (exit 2) naming both numbers and the fix."""
    data = write_shards(tmp_path / "shards", {"jpeg_scale_to": 150, "max_side": None})
    out = tmp_path / "run"
    assert train(data, str(out), no_ray, "--set", "data.image_size=299") == 2
    err = capsys.readouterr().err
    assert "data.image_size=299" in err and "prepare.jpeg_scale_to=150" in err, err
    assert "data.image_size <= 150" in err and "prepare.jpeg_scale_to >= 299" in err, err
    assert not out.exists()  # nothing written
    assert train(data, str(out), no_ray, "--set", "data.image_size=150") == "ray"


# --- the run directory's lease ----------------------------------------------------------

def _lease_file(out: Path, pid: int, heartbeat: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # As a process of this machine and pid namespace writes it: its pid decides.
    (out / LEASE_NAME).write_text(json.dumps({
        "holder": "other-job", **identity(), "host": socket.gethostname(), "pid": pid,
        "pid_start": _process_start(pid), "args": {}, "heartbeat": heartbeat, "timeout_s": 300}))


def test_a_run_directory_held_by_a_live_job_is_refused_at_once(shards, tmp_path, no_ray, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "run"
        _lease_file(out, holder.pid, time.time())
        started = time.monotonic()
        assert train(shards, str(out), no_ray) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert "being written by another training job" in err and f"pid {holder.pid}" in err, err
        assert not (out / driver.ATTEMPT_FILE).exists()  # nothing written
        assert json.loads((out / LEASE_NAME).read_text())["holder"] == "other-job"
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_is_taken_over_and_the_lease_released(shards, tmp_path, no_ray):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run"
    _lease_file(out, gone.pid, time.time())
    assert train(shards, str(out), no_ray) == "ray"
    held = no_ray["lease"]
    assert held["holder"] != "other-job" and held["pid"] == os.getpid()
    assert held["args"]["data"] == shards and held["args"]["config_sha256"]
    assert not (out / LEASE_NAME).exists()  # released when the job ended
    assert (out / driver.ATTEMPT_FILE).exists()


def test_a_retried_training_job_waits_for_its_failed_attempts_lease(shards, tmp_path, no_ray, capsys):
    """The retry of a failed training job (same data and config, another
    machine's lease with a recent heartbeat) waits for the heartbeat to go
    stale and then runs; the same lease with other arguments is refused at once."""
    out = tmp_path / "run"
    assert train(shards, str(out), no_ray) == "ray"
    args = no_ray["lease"]["args"]  # what this job's lease names
    record = {**no_ray["lease"], "holder": "failed-attempt", "boot_id": "another-machine", "heartbeat": time.time(),
              "timeout_s": 2}
    (out / LEASE_NAME).write_text(json.dumps({**record, "args": {**args, "config_sha256": "0" * 16}}))
    started = time.monotonic()
    assert train(shards, str(out), no_ray, "--set", "train.lease_timeout_s=2") == 2
    assert time.monotonic() - started < 2
    assert "other arguments" in capsys.readouterr().err
    (out / LEASE_NAME).write_text(json.dumps(record))
    started = time.monotonic()
    assert train(shards, str(out), no_ray, "--set", "train.lease_timeout_s=2") == "ray"
    assert time.monotonic() - started >= 1.0  # waited for the heartbeat to go stale
    assert no_ray["lease"]["holder"] not in ("failed-attempt", record["holder"])
    assert not (out / LEASE_NAME).exists()


# --- a resume must train what the first attempt started ---------------------------------

def test_a_resume_with_a_changed_config_or_data_is_refused_naming_the_difference(shards, tmp_path, no_ray, capsys):
    out = tmp_path / "run"
    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.001") == "ray"
    first = json.loads((out / driver.ATTEMPT_FILE).read_text())
    assert first["config"]["train"]["transfer"]["learning_rate"] == 0.001 and first["manifest_sha256"]
    (out / "checkpoints").mkdir()  # the first attempt checkpointed
    capsys.readouterr()

    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.01") == 2
    err = capsys.readouterr().err
    assert "train.transfer.learning_rate: 0.001 -> 0.01" in err and "train.allow_changed_resume" in err, err
    assert not (out / LEASE_NAME).exists()

    # Where and how it runs may change: not blocked.
    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.001",
                 "--set", "scaling.num_workers=3", "--set", "ray.address=127.0.0.1:1",
                 "--set", "train.max_failures=5") == "ray"

    # Another manifest under the same path.
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    manifest["splits"]["train"]["num_examples"] += 1
    (Path(shards) / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.001") == 2
    assert "data manifest" in capsys.readouterr().err

    # Allowed: recorded, and the new config is the reference from then on.
    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.01",
                 "--set", "train.allow_changed_resume=true") == "ray"
    record = json.loads((out / driver.ATTEMPT_FILE).read_text())
    (accepted,) = record["accepted_changes"]
    assert any(c.startswith("train.transfer.learning_rate") for c in accepted["changes"])
    assert any(c.startswith("data manifest") for c in accepted["changes"])
    assert record["config"]["train"]["transfer"]["learning_rate"] == 0.01
    assert train(shards, str(out), no_ray, "--set", "train.transfer.learning_rate=0.01") == "ray"


def test_batch_size_may_change_on_resume_only_with_rescale(shards, tmp_path, no_ray, capsys):
    out = tmp_path / "run"
    assert train(shards, str(out), no_ray, "--set", "data.batch_size=8") == "ray"
    (out / "checkpoints").mkdir()
    capsys.readouterr()
    assert train(shards, str(out), no_ray, "--set", "data.batch_size=16") == 2
    assert "data.batch_size: 8 -> 16" in capsys.readouterr().err
    assert train(shards, str(out), no_ray, "--set", "data.batch_size=16",
                 "--set", "train.rescale_on_resume=true") == "ray"


# --- a resume at another global batch ----------------------------------------------------

def _checkpoint(out: Path, scaling: dict, rescales=()) -> None:
    folder = out / "checkpoints" / "checkpoint_000001"
    folder.mkdir(parents=True)
    (out / "checkpoints" / driver.RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}}))
    (folder / "state.json").write_text(json.dumps({"phase_index": 0, "epoch": 1, "history": [{}],
                                                   "scaling": scaling, "rescales": list(rescales)}))


def test_a_resume_at_another_global_batch_is_refused_unless_rescaled(tmp_path):
    from pipeline.config import load_config

    out = tmp_path / "run"
    _checkpoint(out, {"workers": 2, "replicas": 2, "per_replica_batch": 8, "global_batch": 16})
    cfg = load_config(overrides=["data.batch_size=8"])
    _, state = driver.last_checkpoint_state(cfg, str(out))
    assert driver.check_resume_batch(cfg, str(out), state, driver.expected_global_batch(cfg, 2, False)) is None
    with pytest.raises(UsageError) as refused:
        driver.check_resume_batch(cfg, str(out), state, driver.expected_global_batch(cfg, 3, False))
    message = str(refused.value)
    assert "global batch of 16" in message and "at 24" in message and "train.rescale_on_resume" in message
    # two GPUs per worker: two replicas each
    assert driver.expected_global_batch(load_config(overrides=["scaling.gpus_per_worker=2"]), 2, True) == 4 * 32
    rescale = load_config(overrides=["data.batch_size=8", "train.rescale_on_resume=true"])
    assert driver.check_resume_batch(rescale, str(out), state, 24) == {"from": 16, "to": 24}

    # After a rescale, the batch in force is the rescale's.
    later = tmp_path / "later"
    _checkpoint(later, {"global_batch": 16}, [{"to_global_batch": 24, "scaling": {"global_batch": 24}}])
    _, state = driver.last_checkpoint_state(cfg, str(later))
    assert driver.check_resume_batch(cfg, str(later), state, 24) is None
    with pytest.raises(UsageError, match="global batch of 24"):
        driver.check_resume_batch(cfg, str(later), state, 16)


def test_the_loop_state_keeps_the_starting_scaling_and_records_a_rescale():
    from pipeline.training.worker import LoopState, adopt_scaling, scaling_in_force

    state = LoopState()
    start = {"global_batch": 16, "workers": 2}
    assert adopt_scaling(state, start, rescale_allowed=False) is None and state.scaling == start
    # A restart at the same batch (a worker failure) changes nothing.
    assert adopt_scaling(state, dict(start, workers=1), rescale_allowed=False) is None and not state.rescales
    with pytest.raises(RuntimeError, match="global batch of 16"):
        adopt_scaling(state, {"global_batch": 32}, rescale_allowed=False)
    state.epoch, state.history = 2, [{}, {}]
    rescale = adopt_scaling(state, {"global_batch": 32, "workers": 4}, rescale_allowed=True)
    assert (rescale["from_global_batch"], rescale["to_global_batch"], rescale["epoch"]) == (16, 32, 2)
    assert state.scaling == start and scaling_in_force(state)["global_batch"] == 32
    assert adopt_scaling(state, {"global_batch": 32}, rescale_allowed=False) is None  # in force now


# --- placement ----------------------------------------------------------------------------

def test_a_worker_group_too_large_for_the_jobs_own_local_ray_exits_2_naming_the_cpus(shards, tmp_path):
    """3 workers x 1 CPU on this 2-CPU machine: refused before Ray starts. The
    subprocess has its own Ray temp dir, so it finds no Ray running here."""
    from pipeline.training.driver import local_resources

    cpus = int(local_resources()["CPU"])
    env = dict(os.environ, RAY_TMPDIR=str(tmp_path / "ray"))
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--data", shards, "--output", str(tmp_path / "run"), *FAST,
         "--set", f"scaling.num_workers={cpus + 1}", "--set", "scaling.cpus_per_worker=1"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 60
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{cpus + 1} CPUs" in lines[0] and f"{cpus:g} CPUs" in lines[0], done.stderr
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").rglob("session_*"))  # no Ray started


def test_local_placement_allows_what_fits_and_counts_fractions(monkeypatch):
    from pipeline.config import load_config

    monkeypatch.setattr(driver, "starts_own_ray", lambda cfg: True)
    monkeypatch.setattr(driver, "local_resources", lambda: {"CPU": 2.0, "GPU": 0.0})
    driver.check_local_placement(load_config(overrides=["scaling.num_workers=3", "scaling.cpus_per_worker=0.5"]))
    driver.check_local_placement(load_config(overrides=["scaling.num_workers=2"]))
    with pytest.raises(UsageError, match=r"3 workers x 1 CPU = 3 CPUs .* 2 CPUs"):
        driver.check_local_placement(load_config(overrides=["scaling.num_workers=3"]))
    with pytest.raises(UsageError, match="no GPUs"):
        driver.check_local_placement(load_config(overrides=["scaling.use_gpu=true"]))
    monkeypatch.setattr(driver, "local_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(UsageError, match="3 GPUs"):
        driver.check_local_placement(load_config(overrides=["scaling.num_workers=3"]))
    # Ray Train V1's trainer actor takes a CPU beside the workers.
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    monkeypatch.setattr(driver, "local_resources", lambda: {"CPU": 2.0, "GPU": 0.0})
    with pytest.raises(UsageError, match="trainer"):
        driver.check_local_placement(load_config(overrides=["scaling.num_workers=2"]))


def test_cluster_growth_tells_a_hand_started_cluster_from_an_autoscaler(monkeypatch):
    import ray.experimental.internal_kv as kv
    from ray._private import state as ray_state

    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: None)
    status = {}
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: json.dumps(status) if status else None)
    assert driver.cluster_growth(own_ray=True) == ("fixed", None)
    assert driver.cluster_growth(own_ray=False) == ("unknown", None)
    status["autoscaler_report"] = {"node_type_mapping": {"abc": "node_abc", "def": "node_def"}}
    assert driver.cluster_growth(own_ray=False) == ("fixed", None)
    status["autoscaler_report"] = {"node_type_mapping": {"abc": "head", "def": "gpu_worker"}}
    assert driver.cluster_growth(own_ray=False) == ("autoscaler", None)
    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64, "GPU": 8})
    assert driver.cluster_growth(own_ray=False) == ("autoscaler", {"CPU": 64.0, "GPU": 8.0})


def test_a_fixed_cluster_refuses_and_an_autoscaler_is_waited_for_then_given_up(monkeypatch, caplog):
    """ensure_placeable against stand-ins for Ray's view of the cluster."""
    import types

    from pipeline.config import load_config
    from pipeline.errors import JobFailed

    fake = types.SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}],
                                 available_resources=lambda: {"CPU": 2.0})
    monkeypatch.setitem(sys.modules, "ray", fake)
    cfg = load_config(overrides=["scaling.placement_timeout_s=0.1"])
    monkeypatch.setattr(driver, "cluster_growth", lambda own: ("fixed", None))
    driver.ensure_placeable(cfg, 2, False)  # fits and is free: no wait
    with pytest.raises(UsageError, match=r"3 workers x 1 CPU = 3 CPUs .*no autoscaler.* 2 CPUs"):
        driver.ensure_placeable(cfg, 3, False)
    monkeypatch.setattr(driver, "cluster_growth", lambda own: ("autoscaler", {"CPU": 2.0}))
    with pytest.raises(UsageError, match="autoscaler may ever provide"):
        driver.ensure_placeable(cfg, 3, False)

    waited = []

    class Group:
        def wait(self, timeout_seconds):
            waited.append(timeout_seconds)
            return False

    pg = types.SimpleNamespace(placement_group=lambda bundles, strategy: Group(),
                               remove_placement_group=lambda group: waited.append("removed"))
    monkeypatch.setitem(sys.modules, "ray.util", types.SimpleNamespace(placement_group=pg))
    monkeypatch.setitem(sys.modules, "ray.util.placement_group", pg)
    monkeypatch.setattr(driver, "cluster_growth", lambda own: ("autoscaler", None))
    with caplog.at_level("WARNING"), pytest.raises(JobFailed, match="scaling.placement_timeout_s=0.1"):
        driver.ensure_placeable(cfg, 3, False)
    assert waited == [0.1, "removed"]
    assert sum("waiting up to" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------- early stopping


def test_early_stopping_stops_after_patience_and_ends_on_the_best_epochs_weights(tmp_path):
    """The worker's early stopping (``EarlyStop``, driven by val_loss after
    every epoch): no stop while val_loss improves, a stop after ``patience``
    worse epochs, with the weights of the best epoch put back; in between,
    the best weights written beside a checkpoint, the model left as it is."""
    import numpy as np
    import tf_keras as keras

    from pipeline.training.worker import EarlyStop, LoopState

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    state = LoopState()
    early = EarlyStop(2, state)
    weights_at = {}
    losses = {1: 1.0, 2: 0.5, 3: 0.7, 4: 0.8}
    stopped = []
    for epoch, val_loss in losses.items():
        model.set_weights([np.full(w.shape, float(epoch), np.float32) for w in model.get_weights()])
        weights_at[epoch] = model.get_weights()
        if epoch == 3:
            stop = early.update(model, epoch, val_loss)
            early.save_best(model, str(tmp_path / "best" / "model"))
            for a, b in zip(model.get_weights(), weights_at[3]):  # the model keeps epoch 3's weights
                np.testing.assert_array_equal(a, b)
            saved = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            saved.load_weights(str(tmp_path / "best" / "model")).expect_partial()
            for a, b in zip(saved.get_weights(), weights_at[2]):
                np.testing.assert_array_equal(a, b)
        else:
            stop = early.update(model, epoch, val_loss)
        stopped.append(stop)
    assert stopped == [False, False, False, True]
    assert (state.best_epoch, state.best_val_loss, state.wait) == (2, 0.5, 2)
    for a, b in zip(model.get_weights(), weights_at[2]):
        np.testing.assert_array_equal(a, b)

    # A restarted group (counters from the checkpoint's state, best weights from its file) ends the same way.
    resumed = EarlyStop(2, LoopState(best_val_loss=0.5, best_epoch=2, wait=1), best_weights=weights_at[2])
    model.set_weights(weights_at[3])
    assert resumed.update(model, 4, 0.9) is True
    for a, b in zip(model.get_weights(), weights_at[2]):
        np.testing.assert_array_equal(a, b)
