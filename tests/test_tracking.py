"""Tracking, live TensorBoard and lineage, on one real training run.

A real MLflow tracking server (``mlflow server``, SQLite backend, on
127.0.0.1) serves the module. The run (1 worker, 75 px, 2 epochs) is first
interrupted by a worker that raises right after its first epoch (no retries:
the job fails), then re-run with the same command: it resumes, registers and
is promoted. Checked: what reached RUN/tensorboard and MLflow before the run
ended, that the resume continued the same MLflow run, one metric value per
epoch, parameters without secrets, artifacts, tags, the MLflow alias; the
lineage of summary.json, version.json and production.json against the
manifest's own digest; and ``jobs.registry show``'s warm-start chain."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata

import pytest

from jobs import registry as registry_job
from jobs import train as train_job
from jobs._cli import run
from pipeline import registry as reg
from pipeline.config import StorageConfig, load_config
from pipeline.runtime.faults import FAULT_ENV

SECRET = "SENTINEL-7d1e-TRACKING-SECRET"
EPOCHS = 2
EVERY = 3  # train.tensorboard_every_steps
ARGS = ["--set", "data.image_size=75", "--set", "data.batch_size=8", "--set", "data.seed=0",
        "--set", "model.weights=none", "--set", "model.head_units=16", "--set", "train.transfer.epochs=0",
        "--set", f"train.finetune.epochs={EPOCHS}", "--set", "train.finetune.unfreeze_after=mixed9",
        "--set", "train.early_stopping_patience=null", "--set", "train.bn_stats_batches=2",
        "--set", "train.top_k=2", "--set", "scaling.num_workers=1", "--set", "augment.enabled=false",
        "--set", "train.max_failures=0", "--set", f"train.tensorboard_every_steps={EVERY}",
        "--set", f"storage.secret_access_key={SECRET}", "--set", "tracking.mlflow_experiment=shapes-exp",
        "--set", "tracking.mlflow_model_name=shapes-model"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend in a temp dir; its URI."""
    pytest.importorskip("mlflow", reason="the mlflow extra (pip install -e .[dev]) is not installed")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", f"file://{root}/artifacts", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer within 300 s"
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        log.close()


def events(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file under ``folder``."""
    import tensorflow as tf

    found: dict = {}
    for path in sorted(glob.glob(os.path.join(str(folder), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, {})[event.step] = number
    return found


@pytest.fixture(scope="module")
def tracked(learnable_shards, mlflow_server, tmp_path_factory):
    """The interrupted run, what it left, then its resume into a registry."""
    from mlflow.tracking import MlflowClient

    data, _ = learnable_shards
    root = tmp_path_factory.mktemp("tracked")
    out, registry = root / "run", str(root / "registry")
    args = ["--data", data, "--output", str(out), *ARGS, "--set", f"tracking.mlflow_uri={mlflow_server}"]
    client = MlflowClient(mlflow_server)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INCEPTION_RAY_COMMIT", COMMIT)
        env.setenv(FAULT_ENV, f"epoch-1:raise:{root / 'raised'}")
        first_code = run(train_job.main, args)
        interrupted = {
            "code": first_code,
            "raised": (root / "raised").exists(),
            "summary": (out / "summary.json").exists(),
            "train": events(out / "tensorboard" / "train"),
            "validation": events(out / "tensorboard" / "validation"),
            "record": json.loads((out / "mlflow.json").read_text()) if (out / "mlflow.json").exists() else None,
        }
        if interrupted["record"]:
            run_id = interrupted["record"]["run_id"]
            interrupted["loss"] = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
        env.delenv(FAULT_ENV)
        code = run(train_job.main, [*args, "--registry", registry, "--name", "shapes"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    return {"data": data, "out": out, "registry": registry, "uri": mlflow_server, "client": client,
            "interrupted": interrupted, "summary": summary}


def manifest_digest(data: str) -> str:
    with open(os.path.join(data, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_tensorboard_scalars_reach_the_run_directory_while_it_trains(tracked):
    first = tracked["interrupted"]
    # The first attempt ended after epoch 1, before summary.json: what it wrote came during the run.
    assert first["code"] == 1 and first["raised"] and not first["summary"]
    steps = 96 // 8  # training images / global batch
    assert first["train"]["epoch_loss"].keys() == {1}
    assert first["validation"]["epoch_loss"].keys() == {1}
    assert {"epoch_accuracy", "epoch_learning_rate", "epoch_images_per_s"} <= first["train"].keys()
    assert sorted(first["train"]["batch_loss"]) == list(range(EVERY, steps + 1, EVERY))
    for tag in ("batch_accuracy", "batch_learning_rate", "batch_images_per_s"):
        assert sorted(first["train"][tag]) == list(range(EVERY, steps + 1, EVERY)), tag
    # The resume adds epoch 2 (and its steps) beside the first attempt's files.
    out = tracked["out"]
    train, validation = events(out / "tensorboard" / "train"), events(out / "tensorboard" / "validation")
    history = tracked["summary"]["history"]
    assert sorted(train["epoch_loss"]) == sorted(validation["epoch_loss"]) == list(range(1, EPOCHS + 1))
    assert max(train["batch_loss"]) == EPOCHS * steps
    for step, entry in enumerate(history, start=1):
        assert train["epoch_loss"][step] == pytest.approx(entry["loss"], rel=1e-6)
        assert validation["epoch_accuracy"][step] == pytest.approx(entry["val_accuracy"], rel=1e-6)


@pytest.mark.slow
def test_mlflow_logs_each_epoch_live_and_a_resume_continues_the_same_run(tracked):
    client, summary = tracked["client"], tracked["summary"]
    first = tracked["interrupted"]
    assert first["record"] is not None and first["record"]["tracking_uri"] == tracked["uri"]
    run_id = first["record"]["run_id"]
    # Epoch 1 was in MLflow when the first attempt failed: logged as it ended.
    assert [step for step, _ in first["loss"]] == [1]
    assert summary["mlflow"]["run_id"] == run_id
    experiment = client.get_experiment_by_name("shapes-exp")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resume made no second run
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"

    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        logged = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in logged) == list(range(1, EPOCHS + 1)), key
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert losses == {i: pytest.approx(h["loss"], rel=1e-6) for i, h in enumerate(summary["history"], start=1)}
    assert mlflow_run.data.metrics["eval_accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert mlflow_run.data.metrics["eval_macro_f1"] == pytest.approx(summary["metrics"]["macro_f1"])

    params = mlflow_run.data.params
    assert params["data.image_size"] == "75" and params["train.finetune.epochs"] == str(EPOCHS)
    assert params["storage.secret_access_key"] == "**********"
    assert not [k for k, v in params.items() if SECRET in v] and "tracking.mlflow_uri" not in params

    tags = mlflow_run.data.tags
    assert tags["inception_ray.data_manifest_sha256"] == manifest_digest(tracked["data"])
    assert tags["inception_ray.code_version"] == COMMIT == tags["mlflow.source.git.commit"]

    artifacts = {a.path for folder in ("", "plots", "reports") for a in client.list_artifacts(run_id, folder)}
    assert {"plots/training.png", "plots/confusion.png", "reports/metrics.json", "scaling.json"} <= artifacts
    local = client.download_artifacts(run_id, "scaling.json")
    assert json.load(open(local))["global_batch"] == summary["scaling"]["global_batch"] == 8


@pytest.mark.slow
def test_a_promotion_sets_the_mlflow_alias(tracked):
    client, summary = tracked["client"], tracked["summary"]
    outcome = summary["registry"]
    assert outcome["promoted"]
    version = client.get_model_version_by_alias("shapes-model", "production")
    assert version.tags["inception_ray.version"] == outcome["version"]
    assert version.tags["inception_ray.registry"] == tracked["registry"]
    assert version.run_id == summary["mlflow"]["run_id"]
    assert outcome["mlflow_alias"] == {"model": "shapes-model", "alias": "production", "version": version.version}


@pytest.mark.slow
def test_lineage_of_the_run_its_version_and_production(tracked):
    summary, data = tracked["summary"], tracked["data"]
    lineage = summary["lineage"]
    assert lineage["data"] == {"uri": data, "manifest_sha256": manifest_digest(data)}
    assert lineage["code"]["commit"] == COMMIT and lineage["code"]["package"] == "inception-ray"
    import ray
    import tensorflow as tf

    assert lineage["libraries"] == {"tensorflow": tf.__version__, "tf_keras": metadata.version("tf_keras"),
                                    "ray": ray.__version__}
    recipe = json.loads((tracked["out"] / "preprocessing.json").read_text())
    assert lineage["recipe_version"] == recipe["version"]
    assert lineage["parent"] is None

    registry, version = tracked["registry"], summary["registry"]["version"]
    record = reg.get_version(registry, "shapes", version, StorageConfig())
    assert record["lineage"] == lineage
    production = json.load(open(reg.production_uri(registry, "shapes")))
    assert production["changes"][-1]["version"] == version
    assert production["changes"][-1]["lineage"]["data"]["manifest_sha256"] == manifest_digest(data)


@pytest.mark.slow
def test_show_prints_the_warm_start_chain_and_a_promotion_by_hand_moves_the_alias(tracked, tmp_path, capsys):
    """A warm start from the registry records its parent; two generations of
    versions warm-started one from the other show the whole chain."""
    from pipeline.tracking import lineage as lin
    from pipeline.training.driver import plan_training

    registry, data = tracked["registry"], tracked["data"]
    storage = StorageConfig()
    root_version = tracked["summary"]["registry"]["version"]
    root_folder = reg.version_uri(registry, "shapes", root_version)
    cfg = load_config(overrides=[f"model.init_from={registry}#shapes", "model.weights=none",
                                 "data.image_size=75", "train.finetune.unfreeze_after=mixed9"])
    plan = plan_training(cfg, data, str(tmp_path / "child-run"))
    assert plan.parent == {"reference": f"{registry}#shapes@{root_version}",
                           "model": f"{root_folder}/model.keras", "folder": root_folder}

    # The child and grandchild runs, not trained here: their folders hold what a run leaves.
    parent, versions = plan.parent, []
    for name in ("child", "grandchild"):
        folder = tmp_path / name
        folder.mkdir()
        # The same MLflow run as the trained one: the alias needs a run to point a version at.
        (folder / "mlflow.json").write_text((tracked["out"] / "mlflow.json").read_text())
        lineage = lin.build(data, storage, recipe_version=2, parent=parent)
        record = reg.register_run(registry, "shapes", str(folder), storage, metrics={"accuracy": 0.5},
                                  data=data, lineage=lineage)
        versions.append(record["version"])
        folder_uri = reg.version_uri(registry, "shapes", record["version"])
        parent = {"reference": f"{registry}#shapes@{record['version']}", "model": f"{folder_uri}/model.keras",
                  "folder": folder_uri}

    capsys.readouterr()
    assert run(registry_job.main, ["show", "--registry", registry, "--name", "shapes", "--version", versions[1]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["parent"]["folder"] == reg.version_uri(registry, "shapes", versions[0])
    assert [c["folder"] for c in shown["chain"]] == [reg.version_uri(registry, "shapes", versions[0]), root_folder]
    assert shown["chain"][1]["lineage"]["data"]["manifest_sha256"] == manifest_digest(data)
    assert shown["chain"][1]["lineage"]["parent"] is None
    assert shown["chain"][1]["reference"] == f"{registry}#shapes@{root_version}"

    assert run(registry_job.main, ["promote", "--registry", registry, "--name", "shapes", "--version", versions[1],
                                   "--set", f"tracking.mlflow_uri={tracked['uri']}",
                                   "--set", "tracking.mlflow_model_name=shapes-model"]) == 0
    moved = tracked["client"].get_model_version_by_alias("shapes-model", "production")
    assert moved.tags["inception_ray.version"] == versions[1]
    assert run(registry_job.main, ["rollback", "--registry", registry, "--name", "shapes",
                                   "--set", f"tracking.mlflow_uri={tracked['uri']}",
                                   "--set", "tracking.mlflow_model_name=shapes-model"]) == 0
    back = tracked["client"].get_model_version_by_alias("shapes-model", "production")
    assert back.tags["inception_ray.version"] == tracked["summary"]["registry"]["version"]


def test_nothing_changes_without_mlflow_configured(monkeypatch, tmp_path):
    """No tracking URI: no MLflow run and no mlflow.json; the environment's URI is taken."""
    from pipeline.tracking import mlflow_runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config()
    assert mlflow_runs.tracking_uri(cfg) is None
    assert mlflow_runs.start_run(cfg, str(tmp_path), tags={}) is None
    mlflow_runs.check(cfg)
    assert not (tmp_path / "mlflow.json").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert mlflow_runs.tracking_uri(cfg) == "http://127.0.0.1:9"


def test_the_tensorboard_batch_hook_keeps_tensor_logs_and_writes_every_n_steps(tmp_path, monkeypatch):
    """The worker's callbacks with rank 0's board: tf_keras keeps the step
    logs as tensors (no host sync per step; tests/test_gpu_path.py counts the
    same way), and batch scalars land at every multiple of
    train.tensorboard_every_steps, also when steps_per_execution lets the hook
    see every 4th step only."""
    import tensorflow as tf
    import tf_keras as keras
    from tf_keras.src.utils import tf_utils

    from pipeline.config import Config
    from pipeline.tracking.tensorboard import LiveBoard
    from pipeline.training import worker as wk

    calls = []
    real = tf_utils.sync_to_numpy_or_python_type
    monkeypatch.setattr(tf_utils, "sync_to_numpy_or_python_type", lambda v: calls.append(v) or real(v))

    class Stream:
        def check(self):
            pass

    def fit(out, per_execution, steps):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"],
                      steps_per_execution=per_execution)
        board = LiveBoard(str(out), Config().storage, every_steps=6, steps_per_epoch=steps, global_batch=2,
                          learning_rate=lambda: 0.01)
        reporter = keras.callbacks.Callback()
        callbacks = wk.training_callbacks([Stream()], reporter, every=4, board=board, epoch_offset=1)
        assert keras.callbacks.CallbackList(callbacks, model=model)._batch_hooks_support_tf_logs
        ds = tf.data.Dataset.from_tensors((tf.zeros([2, 4]), tf.zeros([2], tf.int32))).repeat()
        calls.clear()
        model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
        board.close()
        return len(calls), events(out / "tensorboard" / "train")

    few, written = fit(tmp_path / "a", 1, 12)
    # Epoch offset 1 (a phase before this one): steps 13..36, written at each multiple of 6.
    assert sorted(written["batch_loss"]) == [18, 24, 30, 36]
    assert sorted(written["batch_images_per_s"]) == [18, 24, 30, 36]
    many, _ = fit(tmp_path / "b", 1, 48)
    assert many == few  # 4x the steps, no more conversions to numbers
    _, seen = fit(tmp_path / "c", 4, 12)
    assert sorted(seen["batch_loss"]) == [20, 24, 32, 36]  # the first step seen past each multiple


@pytest.mark.s3
def test_tensorboard_files_reach_object_storage_after_each_epoch(s3_bucket, s3_endpoint, tmp_path):
    """A run directory on S3: the event files are written locally and uploaded
    after each epoch, so the bucket holds every epoch so far."""
    from pipeline.tracking.tensorboard import LiveBoard

    fs, bucket = s3_bucket
    board = LiveBoard(f"s3://{bucket}/run", StorageConfig(endpoint_url=s3_endpoint), every_steps=5,
                      steps_per_epoch=10, global_batch=4, learning_rate=lambda: 0.1)

    def uploaded(split: str) -> dict:
        local = tmp_path / f"copy-{split}"
        fs.get(f"{bucket}/run/tensorboard/{split}/", str(local), recursive=True)
        return events(local)

    board.epoch(1, {"loss": 2.0, "accuracy": 0.25, "val_loss": 2.5, "val_accuracy": 0.2, "images_per_s": 9.0})
    assert uploaded("train")["epoch_loss"] == {1: 2.0}
    board.epoch(2, {"loss": 1.5, "accuracy": 0.5, "val_loss": 2.25, "val_accuracy": 0.4, "learning_rate": 0.1})
    assert uploaded("train")["epoch_loss"] == {1: 2.0, 2: 1.5}
    assert uploaded("validation")["epoch_accuracy"] == {1: pytest.approx(0.2), 2: pytest.approx(0.4)}
    board.close()
