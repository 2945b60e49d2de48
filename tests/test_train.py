"""The training job end to end on a real Ray: resume after a worker failure,
with every weight and optimizer slot verified against the checkpoint, and the
quality gate. (Multi-worker runs: tests/test_distributed.py.)"""

from __future__ import annotations

import json
import os

import pytest

from jobs import prepare as prepare_job
from jobs import train as train_job
from jobs._cli import run
from pipeline import demo_data
from pipeline.artifact import load_keras_file
from pipeline.faults import FAULT_ENV

pytestmark = pytest.mark.slow

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
    # Mid-phase: the model and the SGD optimizer (momentum slots, step count)
    # came back, each variable compared with the checkpoint file.
    resumed = summary["resumed_from"]
    assert resumed["optimizer_restored"] is True
    model = load_keras_file(os.path.join(out, "model.keras"))
    # every model variable, plus the optimizer's step count and momentum slots
    assert resumed["variables_verified"] > len(model.variables) + 1
    assert os.path.exists(os.path.join(out, "model.keras"))
