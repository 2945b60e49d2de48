"""The training job end to end on a real Ray: a 2-worker TensorflowTrainer run,
resume after a worker failure, the quality gate, and predict on the result."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tf_keras as keras

from jobs import predict as predict_job
from jobs import prepare as prepare_job
from jobs import train as train_job
from jobs._cli import run
from pipeline import demo_data
from pipeline.faults import FAULT_ENV

pytestmark = pytest.mark.slow

RUN_FILES = ["model.keras", "labels.json", "preprocessing.json", "config.yaml", "history.json", "metrics.json",
             "training.png", "confusion.png", "summary.json"]
TINY = ["--set", "data.image_size=75", "--set", "data.batch_size=4", "--set", "data.shuffle_buffer=32",
        "--set", "model.weights=none", "--set", "model.head_units=16", "--set", "train.top_k=2",
        "--set", "train.early_stopping_patience=null", "--set", "train.bn_stats_batches=2"]


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    demo_data.generate(str(root / "images"), per_class=8, size=80, classes=["circle", "square", "stripes"])
    dst = str(root / "shards")
    assert run(prepare_job.main, ["--src", str(root / "images"), "--dst", dst,
                                  "--set", "prepare.min_examples_per_shard=4"]) == 0
    return dst, root / "images"


def test_two_workers_produce_a_complete_run_that_loads_and_predicts(shards, tmp_path, capsys):
    data, images = shards
    out = str(tmp_path / "run")
    code = run(train_job.main, ["--data", data, "--output", out, *TINY,
                                "--set", "scaling.num_workers=2",
                                "--set", "train.transfer.epochs=1", "--set", "train.finetune.epochs=1",
                                "--set", "train.finetune.unfreeze_after=mixed9"])
    assert code == 0
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard", "train")))
    assert os.listdir(os.path.join(out, "checkpoints"))

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["workers"] == 2 and summary["classes"] == ["circle", "square", "stripes"]
    history = json.load(open(os.path.join(out, "history.json")))
    assert [len(history["transfer"]), len(history["finetune"])] == [1, 1]
    for entry in history["transfer"] + history["finetune"]:
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(entry)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    n_val = json.load(open(os.path.join(data, "manifest.json")))["splits"]["validation"]["num_examples"]
    assert metrics["examples"] == n_val == int(np.sum(metrics["confusion_matrix"]))
    assert set(metrics["per_class"]) == set(summary["classes"])

    model = keras.models.load_model(os.path.join(out, "model.keras"))
    assert model.input_shape == (None, 75, 75, 3)
    labels = json.load(open(os.path.join(out, "labels.json")))
    assert labels == summary["classes"]

    files = [str(images / "circle" / "circle_0000.jpg"), str(images / "stripes" / "stripes_0001.jpg")]
    plot = str(tmp_path / "pred.png")
    capsys.readouterr()
    assert run(predict_job.main, ["--model", out, *files, "--top-k", "2", "--plot", plot]) == 0
    printed = capsys.readouterr().out
    for f in files:
        line = next(l for l in printed.splitlines() if l.startswith(f))
        assert line.split(": ", 1)[1].split(" ")[0] in labels
    assert os.path.getsize(plot) > 0

    # a completed run is never silently overwritten
    assert run(train_job.main, ["--data", data, "--output", out, *TINY]) == 2


def test_worker_failure_resumes_from_checkpoint_and_gate_exits_3(shards, tmp_path, monkeypatch):
    data, _ = shards
    out = str(tmp_path / "run")
    monkeypatch.setenv(FAULT_ENV, f"epoch-2:raise:{tmp_path}/failed-once")
    code = run(train_job.main, ["--data", data, "--output", out, *TINY,
                                "--set", "scaling.num_workers=1", "--set", "train.max_failures=1",
                                "--set", "train.transfer.epochs=1", "--set", "train.finetune.epochs=2",
                                "--set", "train.finetune.learning_rate=0", "--set", "train.transfer.learning_rate=0",
                                "--set", "train.min_val_accuracy=1.0"])
    assert os.path.exists(f"{tmp_path}/failed-once")  # the failure really happened
    assert code == 3  # finished, but nothing learned with lr 0: the gate is missed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["resumed"] is True
    phases = [(h["phase"], h["epoch"]) for h in summary["history"]]
    # epoch 2 (finetune 1) completed and was checkpointed before the failure; the
    # restarted group went on with finetune 2 instead of starting over
    assert phases == [("transfer", 1), ("finetune", 1), ("finetune", 2)]
    assert os.path.exists(os.path.join(out, "model.keras"))
