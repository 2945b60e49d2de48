"""Multi-worker training proven by counting what the train and test steps
actually receive (real TensorflowTrainer runs on CPU, tiny model input), on
shards that include one undecodable validation record:

- 1 and 3 workers, on uneven shards (training 5/5/4/4, validation 3/3/2 over
  3 workers): every replica gets ``data.batch_size`` images per step, and an
  epoch trains on the whole training split (less than one global batch left
  out when the global batch does not divide it); validation covers its split
  exactly once at every worker count, the undecodable record skipped and counted;
- the learning rate follows the global batch (train.lr_scaling auto: square
  root for the transfer phase's RMSprop, linear for fine-tuning's SGD), and
  history.json records the rate each epoch used, read from the optimizer;
- 3 workers x B and 1 worker x 3B give the same loss curve on the head-only
  phase (full-batch steps, so data order cannot matter);
- a 3-worker run is a complete run directory that loads and predicts;
- with ``data.max_bad_record_fraction=0`` the job fails with exit 1 naming the
  shard and the source file.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from jobs import predict as predict_job
from jobs import prepare as prepare_job
from jobs import train as train_job
from jobs._cli import run
from pipeline.data import demo_data
from pipeline.artifact import load_keras_file
from pipeline.data.shards import file_sha256, make_example

pytestmark = pytest.mark.slow

CLASSES = ["circle", "square"]
TRAIN, VAL = 18, 6  # images per split (9 and 3 per class)
RUN_FILES = ["model.keras", "labels.json", "preprocessing.json", "config.yaml", "history.json", "metrics.json",
             "training.png", "confusion.png", "summary.json"]
# Head-only, deterministic: no augmentation, no shuffling, no dropout, seeded init.
BASE = ["--set", "data.image_size=75", "--set", "data.shuffle_buffer=1", "--set", "data.seed=0",
        "--set", "augment.enabled=false", "--set", "model.head_units=16",
        "--set", "train.top_k=2", "--set", "train.early_stopping_patience=null", "--set", "train.bn_stats_batches=1",
        "--set", "train.lr_reference_batch=16", "--set", "train.finetune.epochs=0",
        "--set", "scaling.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory):
    """No-top InceptionV3 weights whose BatchNorm statistics fit these images,
    standing in for pretrained weights: a random base with its initial
    statistics would pass almost nothing to the head (activations vanish
    through 94 convolutions in inference mode), and every loss would be ln 2."""
    from PIL import Image

    from pipeline.training import model as mdl
    from pipeline.config import ModelConfig

    root = tmp_path_factory.mktemp("base")
    demo_data.generate(str(root / "images"), per_class=8, size=75, seed=2, classes=CLASSES)
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32)
                       for p in sorted((root / "images").rglob("*.*"))])
    model = mdl.build_model(2, 75, ModelConfig(weights="none", head_units=16))
    mdl.recompute_bn_statistics(model, [images[:8], images[8:]])
    path = str(root / "no_top.h5")
    mdl.base_of(model).save_weights(path)
    return path


@pytest.fixture(scope="module")
def split_shards(ray_session, tmp_path_factory, base_weights):
    """18 training images in 4 uneven shards, 6 validation images in 2 shards."""
    root = tmp_path_factory.mktemp("dist-data")
    demo_data.generate(str(root / "images" / "train"), per_class=TRAIN // 2, size=80, classes=CLASSES)
    demo_data.generate(str(root / "images" / "validation"), per_class=VAL // 2, size=80, seed=1, classes=CLASSES)
    dst = str(root / "shards")
    assert run(prepare_job.main, ["--src", str(root / "images"), "--dst", dst,
                                  "--set", "prepare.min_examples_per_shard=3"]) == 0
    shutil.copy(base_weights, root / "no_top.h5")
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert sorted(s["examples"] for s in manifest["splits"]["train"]["shards"]) == [4, 4, 5, 5]
    return dst


@pytest.fixture(scope="module")
def shards_with_bad_record(split_shards, tmp_path_factory):
    """The same shards plus one validation shard, written directly (as a broken
    writer would, bypassing prepare), holding one good and one undecodable record."""
    root = tmp_path_factory.mktemp("bad-data")
    dst = str(root / "shards")
    shutil.copytree(split_shards, dst)
    shutil.copy(os.path.join(os.path.dirname(split_shards), "no_top.h5"), root / "no_top.h5")
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    good = open(os.path.join(split_shards, "..", "images", "validation", "circle", "circle_0000.jpg"), "rb").read()
    local = os.path.join(dst, "extra.tmp")
    with tf.io.TFRecordWriter(local) as w:
        w.write(make_example(good, 0, "circle", "file:///extra/good.jpg", 80, 80))
        # Not an image at all (a truncated JPEG would still decode, padded, with a warning).
        w.write(make_example(b"\x00not an image\x00" * 20, 1, "square", "file:///extra/broken.jpg", 80, 80))
    name = f"validation-00002-of-00003-{file_sha256(local)[:16]}.tfrecord"
    os.replace(local, os.path.join(dst, name))
    split = manifest["splits"]["validation"]
    split["shards"].append({"file": name, "examples": 2, "bytes": os.path.getsize(os.path.join(dst, name)),
                            "sha256": file_sha256(os.path.join(dst, name))})
    split["num_examples"] += 2
    split["class_counts"] = {"circle": split["class_counts"]["circle"] + 1, "square": split["class_counts"]["square"] + 1}
    json.dump(manifest, open(os.path.join(dst, "manifest.json"), "w"))
    return dst, name


def train(data: str, out: str, workers: int, batch: int, *extra: str) -> int:
    """jobs.train on ``data`` (shards beside whose folder lies ``no_top.h5``)."""
    weights = os.path.join(os.path.dirname(data), "no_top.h5")
    return run(train_job.main, ["--data", data, "--output", out, *BASE, "--set", f"model.weights={weights}",
                                "--set", f"scaling.num_workers={workers}", "--set", f"data.batch_size={batch}", *extra])


def checkpointed_state(out: str) -> dict:
    """The loop state (history, scaling) of the last checkpoint Ray Train recorded."""
    with open(os.path.join(out, "checkpoints", "checkpoint_manager_snapshot.json")) as f:
        name = json.load(f)["checkpoint_results"][-1]["checkpoint_dir_name"]
    with open(os.path.join(out, "checkpoints", name, "state.json")) as f:
        return json.load(f)


def counted(out: str) -> list[dict]:
    return json.load(open(os.path.join(out, "summary.json")))["history"]


# The reference batch is twice the global batch of the runs compared below:
# RMSprop's rate is scaled by sqrt(18 / 36), SGD's by 18 / 36 (no warmup below 2x).
TRANSFER_LR, FINETUNE_LR = 1e-3 * 0.5 ** 0.5, 1e-4 * 0.5
COMPARED = ["--set", "train.transfer.epochs=2", "--set", "train.lr_reference_batch=36",
            "--set", "data.max_bad_record_fraction=0.5"]


@pytest.fixture(scope="module")
def one_worker_full_batch(shards_with_bad_record, tmp_path_factory):
    """Run with paths relative to the current folder, as users type them (Ray
    Train workers run in another folder)."""
    data, _ = shards_with_bad_record
    out = tmp_path_factory.mktemp("w1") / "run"
    here = os.getcwd()
    os.chdir(out.parent)
    try:
        assert train(os.path.relpath(data), "run", 1, TRAIN, *COMPARED) == 0
    finally:
        os.chdir(here)
    return str(out)


def test_one_worker_counts(one_worker_full_batch):
    summary = json.load(open(os.path.join(one_worker_full_batch, "summary.json")))
    assert summary["scaling"]["global_batch"] == TRAIN and summary["scaling"]["replicas"] == 1
    assert summary["scaling"]["phases"]["transfer"]["learning_rate"] == pytest.approx(TRANSFER_LR)
    assert summary["scaling"]["phases"]["transfer"]["lr_rule"] == "sqrt" and summary["rescales"] == []
    for epoch in summary["history"]:
        assert epoch["learning_rate"] == pytest.approx(TRANSFER_LR), epoch  # read from the optimizer
        assert epoch["replica_batch"] == TRAIN and epoch["examples"] == TRAIN, epoch
        # 6 + 1 good validation images once; the broken one skipped and counted
        assert epoch["val_examples"] == VAL + 1 and epoch["val_skipped_records"] == 1, epoch
    assert summary["metrics"]["examples"] == VAL + 1 and summary["metrics"]["skipped_records"] == 1


def test_three_workers_on_uneven_shards_train_on_the_whole_split_at_the_true_global_batch_and_match_one_worker(
        split_shards, shards_with_bad_record, one_worker_full_batch, tmp_path, capsys):
    data, _ = shards_with_bad_record
    out = str(tmp_path / "run")
    assert train(data, out, 3, 6, *COMPARED, "--set", "train.finetune.epochs=1",
                 "--set", "train.finetune.unfreeze_after=mixed9") == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    scaling = summary["scaling"]
    assert (scaling["workers"], scaling["replicas"], scaling["per_replica_batch"], scaling["global_batch"]) == (3, 3, 6, 18)
    assert scaling["steps_per_epoch"] == 1
    # Scaled on the global batch of 18 (not a worker's 6).
    assert scaling["phases"]["transfer"]["learning_rate"] == pytest.approx(TRANSFER_LR)
    assert scaling["phases"]["finetune"]["learning_rate"] == pytest.approx(FINETUNE_LR)
    history = summary["history"]
    for epoch in history:  # the rate the optimizer applied, per phase
        assert epoch["learning_rate"] == pytest.approx(TRANSFER_LR if epoch["phase"] == "transfer" else FINETUNE_LR)
    assert json.load(open(os.path.join(out, "history.json")))["finetune"][0]["learning_rate"] == \
        pytest.approx(FINETUNE_LR)
    for epoch in history:
        # Counted inside the steps: 6 images per replica, the 18 training images
        # once per epoch, the 7 good validation images once (the 8 validation
        # records over 3 workers as 3, 3 and 2), the broken one counted.
        assert epoch["replica_batch"] == 6, epoch
        assert epoch["examples"] == TRAIN, epoch
        assert epoch["val_examples"] == VAL + 1 and epoch["val_skipped_records"] == 1, epoch
    assert json.load(open(os.path.join(out, "history.json")))["transfer"][0]["examples"] == TRAIN

    # Each full-batch step sees all 18 images either way: the same losses.
    one = [e["loss"] for e in counted(one_worker_full_batch)]
    two = [e["loss"] for e in history if e["phase"] == "transfer"]
    assert len(one) == len(two) == 2
    assert one[0] != one[1]  # the head really trained
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    val_one = [e["val_loss"] for e in counted(one_worker_full_batch)]
    val_two = [e["val_loss"] for e in history if e["phase"] == "transfer"]
    np.testing.assert_allclose(val_two, val_one, rtol=1e-4, atol=1e-5)

    # A complete run directory that loads and predicts.
    for name in RUN_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard", "train")))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["examples"] == VAL + 1 == int(np.sum(metrics["confusion_matrix"]))
    assert metrics["skipped_records"] == 1
    model = load_keras_file(os.path.join(out, "model.keras"))
    assert model.input_shape == (None, 75, 75, 3)
    labels = json.load(open(os.path.join(out, "labels.json")))
    assert labels == summary["classes"] == CLASSES
    image = os.path.join(split_shards, "..", "images", "validation", "square", "square_0001.jpg")
    plot = str(tmp_path / "pred.png")
    capsys.readouterr()
    assert run(predict_job.main, ["--model", out, image, "--top-k", "2", "--plot", plot]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(image))
    assert line.split(": ", 1)[1].split(" ")[0] in labels
    assert os.path.getsize(plot) > 0
    # a completed run is never silently overwritten
    assert train(data, out, 1, 16) == 2


def test_bad_record_over_the_limit_fails_naming_the_shard(shards_with_bad_record, tmp_path, capsys):
    """2 workers x 5: a global batch of 10 does not divide the 18 training
    images, so an epoch is 18 // 10 = 1 step; the epoch that met the
    undecodable record is checkpointed with its counts, then the job stops."""
    data, bad_shard = shards_with_bad_record
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert train(data, out, 2, 5, "--set", "train.transfer.epochs=2", "--set", "data.max_bad_record_fraction=0") == 1
    err = capsys.readouterr().err
    assert "could not be decoded" in err and bad_shard in err and "broken.jpg" in err, err
    assert not os.path.exists(os.path.join(out, "summary.json"))
    state = checkpointed_state(out)
    assert (state["scaling"]["replicas"], state["scaling"]["global_batch"]) == (2, 10)
    assert state["scaling"]["phases"]["transfer"]["learning_rate"] == pytest.approx(1e-3 * (10 / 16) ** 0.5)
    (epoch,) = state["history"]  # stopped after the first epoch
    assert epoch["replica_batch"] == 5, epoch
    # the split once, less than one global batch left out
    assert TRAIN - 10 < epoch["examples"] == 10 <= TRAIN, epoch
    assert epoch["val_examples"] == VAL + 1 and epoch["val_skipped_records"] == 1, epoch
