"""The model alone, no Ray: phases, warm start, no-top weights from S3, GPU
switches on CPU, BatchNorm statistics re-estimation."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import tf_keras as keras

from pipeline.training import model as mdl
from pipeline.config import ModelConfig, PhaseConfig
from pipeline.training.worker import fetch_to_local

SIZE = 75
TINY = ModelConfig(weights="none", head_units=16)


def images(n=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_phases_freeze_what_the_recipe_says():
    model = mdl.build_model(3, SIZE, TINY)
    base = mdl.base_of(model)
    assert mdl.set_phase(model, "transfer") == 0
    assert not base.trainable
    assert {w.name for w in model.trainable_weights} <= {w.name for l in model.layers if l.name.startswith(("head", "pred")) for w in l.weights}
    trainable = mdl.set_phase(model, "finetune", "mixed8")
    names = [layer.name for layer in base.layers]
    cut = names.index("mixed8") + 1
    assert cut == 249  # the classic tutorial's "first 249 layers frozen"
    # What planning checks the cut against: the same layers, the same blocks
    # (other layers' names carry Keras's per-process counters).
    planned = mdl.base_layer_names()
    assert len(planned) == len(names) and mdl.freeze_index(planned, "mixed8") == 249
    assert [n for n in planned if n.startswith("mixed")] == [n for n in names if n.startswith("mixed")]
    assert trainable == len(names) - 249
    assert all(not layer.trainable for layer in base.layers[:cut])
    assert all(layer.trainable for layer in base.layers[cut:])
    assert mdl.set_phase(model, "finetune", 172) == len(names) - 172
    with pytest.raises(ValueError, match="not a layer of InceptionV3"):
        mdl.set_phase(model, "finetune", "mixed99")
    # bn_mode frozen: every BatchNorm of the base stays in inference mode while fine-tuning
    bns = [layer for layer in base.layers[cut:] if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and mdl.set_phase(model, "finetune", "mixed8", freeze_bn=True) == len(names) - 249 - len(bns)
    assert not any(layer.trainable for layer in bns)
    x = images(2)
    before = [layer.moving_mean.numpy().copy() for layer in bns]
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, np.array([0, 1]))
    assert all(np.array_equal(b, layer.moving_mean.numpy()) for b, layer in zip(before, bns))


def test_bn_mode_auto_freezes_only_pretrained_weights():
    assert mdl.bn_frozen(ModelConfig(weights="imagenet"))
    assert mdl.bn_frozen(ModelConfig(weights="s3://b/no_top.h5"))
    assert mdl.bn_frozen(ModelConfig(weights="none", init_from="runs/a"))
    assert not mdl.bn_frozen(ModelConfig(weights="none"))
    assert not mdl.bn_frozen(ModelConfig(weights="imagenet", bn_mode="train"))
    assert mdl.bn_frozen(ModelConfig(weights="none", bn_mode="frozen"))


def test_warmup_reaches_the_scaled_rate_and_the_schedule_follows_the_optimizer_step():
    schedule = mdl.WarmupSchedule(0.4, 4)
    assert [round(float(schedule(step)), 6) for step in range(6)] == [0.1, 0.2, 0.3, 0.4, 0.4, 0.4]


def test_batch_scaling_follows_the_global_batch():
    from pipeline.config import load_config
    from pipeline.training.worker import batch_scaling

    cfg = load_config(overrides=["data.batch_size=8", "train.warmup_epochs=0.5", "train.transfer.learning_rate=0.01",
                                 "train.transfer.optimizer=sgd"])
    out = batch_scaling(cfg, workers=2, replicas=4, train_examples=128)
    assert (out["global_batch"], out["steps_per_epoch"], out["batch_ratio"]) == (32, 4, 4.0)
    assert out["phases"]["transfer"] == {"optimizer": "sgd", "lr_rule": "linear", "lr_factor": 4.0,
                                         "base_learning_rate": 0.01, "learning_rate": 0.04, "warmup_epochs": 0.5,
                                         "warmup_steps": 2}
    same = batch_scaling(load_config(overrides=["train.lr_scaling=none"]), workers=2, replicas=4, train_examples=100)
    assert {p["lr_factor"] for p in same["phases"].values()} == {1.0}


@pytest.mark.parametrize("setting, expected", [
    # global batch 4 x 8 = 32, reference 8: ratio 4
    ("auto", {"sgd": 4.0, "rmsprop": 2.0, "adam": 2.0}),
    ("linear", {"sgd": 4.0, "rmsprop": 4.0, "adam": 4.0}),
    ("sqrt", {"sgd": 2.0, "rmsprop": 2.0, "adam": 2.0}),
    ("none", {"sgd": 1.0, "rmsprop": 1.0, "adam": 1.0}),
])
def test_learning_rate_factor_per_optimizer_kind(setting, expected):
    from pipeline.config import load_config
    from pipeline.training.worker import batch_scaling

    for optimizer, factor in expected.items():
        cfg = load_config(overrides=["data.batch_size=8", f"train.lr_scaling={setting}",
                                     f"train.transfer.optimizer={optimizer}", "train.transfer.learning_rate=0.001",
                                     "train.transfer.epochs=10", f"train.finetune.optimizer={optimizer}",
                                     "train.finetune.epochs=40"])
        out = batch_scaling(cfg, workers=4, replicas=4, train_examples=320)
        for name in ("transfer", "finetune"):
            phase = out["phases"][name]
            assert phase["lr_factor"] == pytest.approx(factor), (setting, optimizer)
            assert phase["learning_rate"] == pytest.approx(getattr(cfg.train, name).learning_rate * factor)
            # Automatic warmup only above a factor of 2: a quarter of the phase, at most 5 epochs.
            want = min(5.0, getattr(cfg.train, name).epochs / 4) if factor > 2 else 0.0
            assert phase["warmup_epochs"] == want and phase["warmup_steps"] == math.ceil(want * 10)
    # An explicit warmup overrides the automatic one, either way.
    cfg = load_config(overrides=["data.batch_size=8", "train.warmup_epochs=0", "train.transfer.optimizer=sgd"])
    assert batch_scaling(cfg, workers=4, replicas=4, train_examples=320)["phases"]["transfer"]["warmup_steps"] == 0
    cfg = load_config(overrides=["data.batch_size=8", "train.warmup_epochs=1"])
    assert batch_scaling(cfg, workers=1, replicas=1, train_examples=320)["phases"]["transfer"]["warmup_steps"] == 40


def test_the_optimizer_applies_the_scaled_and_warmed_up_rate_at_every_step():
    """The rate the compiled optimizer applies at step k (read from it, as the
    history does) is the schedule: warmup to the scaled rate, then that rate."""
    from pipeline.config import load_config
    from pipeline.training.worker import batch_scaling

    cfg = load_config(overrides=["data.batch_size=2", "train.transfer.optimizer=sgd",
                                 "train.transfer.learning_rate=0.01", "train.transfer.epochs=16"])
    scaling = batch_scaling(cfg, workers=4, replicas=4, train_examples=8)  # ratio 4, one step an epoch
    phase = scaling["phases"]["transfer"]
    assert (phase["learning_rate"], phase["warmup_steps"]) == (pytest.approx(0.04), 4)  # 16 / 4 epochs
    model = keras.Sequential([keras.layers.Dense(2, activation="softmax", input_shape=(3,))])
    mdl.compile_for(model, cfg.train.transfer, top_k=1, learning_rate=phase["learning_rate"],
                    warmup_steps=phase["warmup_steps"])
    expected = [0.01, 0.02, 0.03, 0.04, 0.04, 0.04]
    assert [mdl.learning_rate_at(model.optimizer, k) for k in range(6)] == pytest.approx(expected)
    used = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            used.append(mdl.learning_rate_at(self.model.optimizer))  # the step just taken

    model.fit(np.zeros((12, 3), np.float32), np.zeros(12), batch_size=2, epochs=1, verbose=0, callbacks=[Record()])
    assert used == pytest.approx(expected)
    assert int(model.optimizer.iterations.numpy()) == 6
    # The same under a loss-scale optimizer (mixed precision): the wrapped optimizer's schedule.
    wrapped = keras.mixed_precision.LossScaleOptimizer(mdl.make_optimizer(cfg.train.transfer, 0.04, 4))
    assert mdl.learning_rate_at(wrapped, 1) == pytest.approx(0.02)
    adam = mdl.make_optimizer(cfg.train.transfer.model_copy(update={"optimizer": "adam"}), 0.003)
    assert mdl.learning_rate_at(adam) == pytest.approx(0.003)


def _trained_checkpoint(tmp_path):
    model = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(model, "finetune", "mixed9")
    mdl.compile_for(model, PhaseConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9), top_k=2)
    model.fit(images(4), np.array([0, 1, 2, 0]), epochs=2, verbose=0)
    path = str(tmp_path / "ckpt" / "model")
    model.save_weights(path)
    return model, path


def test_restore_is_verified_weights_and_optimizer_slots(tmp_path, monkeypatch):
    saved, path = _trained_checkpoint(tmp_path)
    fresh = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(fresh, "finetune", "mixed9")
    mdl.compile_for(fresh, PhaseConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9), top_k=2)
    fresh.optimizer.build(fresh.trainable_variables)
    counts = mdl.restore_verified(fresh, path, with_optimizer=True)
    # Every model variable, the step count, and one momentum slot ("m") per trainable variable, by name.
    assert counts == {"variables": len(fresh.variables), "trainable": len(fresh.trainable_variables),
                      "iterations": 1, "m": len(fresh.trainable_variables)}
    slots = [v for v in fresh.optimizer.variables if v.name.startswith("m/")]
    assert slots and any(np.abs(v.numpy()).sum() > 0 for v in slots)  # momentum really came back
    for a, b in zip(saved.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(saved.variables, fresh.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # Without the optimizer built first, its slots cannot be restored: a loud error, not a partial resume.
    unbuilt = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(unbuilt, "finetune", "mixed9")
    mdl.compile_for(unbuilt, PhaseConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9), top_k=2)
    with pytest.raises(mdl.RestoreError, match="did not restore completely"):
        mdl.restore_verified(unbuilt, path, with_optimizer=True)
    # An optimizer whose slot for one trainable variable is not there after the
    # restore (TensorFlow's own matching would also refuse a checkpoint that
    # lacks it; this is the check by name behind it): named, not a partial resume.
    real_slots = mdl.optimizer_slots

    def one_slot_short(optimizer):
        slots = real_slots(optimizer)
        slots["m"] = slots["m"][:-1]
        return slots

    monkeypatch.setattr(mdl, "optimizer_slots", one_slot_short)
    with pytest.raises(mdl.RestoreError, match="no 'm' slot for 1 trainable variables"):
        mdl.restore_verified(fresh, path, with_optimizer=True)
    monkeypatch.undo()
    # A checkpoint that lacks a slot (its optimizer kept none for the last
    # trainable variable): the restored optimizer's slot would stay zero, a
    # partial resume; refused.
    short = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(short, "finetune", "mixed9")
    mdl.compile_for(short, PhaseConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9), top_k=2)
    short.set_weights(saved.get_weights())
    short.optimizer.build(short.trainable_variables[:-1])
    for a, b in zip(saved.optimizer.variables, short.optimizer.variables):
        b.assign(a)
    short_path = str(tmp_path / "short" / "model")
    short.save_weights(short_path)
    assert len(short.optimizer.variables) == len(saved.optimizer.variables) - 1
    missing = "m/" + fresh.trainable_variables[-1].name.split(":")[0]
    with pytest.raises(mdl.RestoreError, match=re.escape(missing)):  # the slot, by name
        mdl.restore_verified(fresh, short_path, with_optimizer=True)
    # A model of another shape: refused even when only the model is restored.
    other = mdl.build_model(4, SIZE, TINY)
    with pytest.raises(mdl.RestoreError):
        mdl.restore_verified(other, path, with_optimizer=False)


def test_warm_start_keeps_base_and_replaces_head_of_a_different_class_count(tmp_path):
    donor = mdl.build_model(5, SIZE, TINY)
    path = str(tmp_path / "donor.keras")
    donor.save(path)
    model = mdl.build_model(3, SIZE, TINY)
    before_head = model.get_layer("predictions").get_weights()[0].copy()
    report = mdl.warm_start(model, path)
    assert report["skipped"] == ["predictions"]
    for a, b in zip(mdl.base_of(model).get_weights(), mdl.base_of(donor).get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.get_layer("head_dense").get_weights()[0],
                                  donor.get_layer("head_dense").get_weights()[0])
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], before_head)


@pytest.mark.s3
def test_no_top_weights_from_s3_load_into_the_base(s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    source = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    local = str(tmp_path / "notop.h5")
    source.save_weights(local)
    fs.put_file(local, f"{bucket}/weights/notop.h5")
    from pipeline.config import StorageConfig

    fetched = fetch_to_local(f"s3://{bucket}/weights/notop.h5", StorageConfig())
    model = mdl.build_model(3, SIZE, ModelConfig(weights=f"s3://{bucket}/weights/notop.h5", head_units=16),
                            weights_file=fetched)
    for a, b in zip(mdl.base_of(model).get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = str(tmp_path / "other.h5")
    other.save_weights(path)
    with pytest.raises(ValueError, match="does not fit InceptionV3 without top"):
        mdl.build_model(3, SIZE, ModelConfig(weights=path), weights_file=path)


def test_mixed_precision_and_xla_build_and_train_a_step_on_cpu():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mdl.build_model(3, SIZE, TINY)
        mdl.set_phase(model, "finetune", "mixed9")
        mdl.compile_for(model, PhaseConfig(optimizer="sgd", learning_rate=0.01), top_k=2, jit_compile=True)
        assert model.get_layer("head_dense").compute_dtype == "float16"
        assert model.get_layer("predictions").dtype == "float32"
        logs = model.train_on_batch(images(), np.array([0, 1, 2, 0]), return_dict=True)
        assert np.isfinite(logs["loss"])
        out = model.predict(images(2), verbose=0)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bn_statistics_are_re_estimated_from_batches():
    model = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(model, "transfer")
    bn = next(l for l in mdl.base_of(model).layers if isinstance(l, keras.layers.BatchNormalization))
    assert np.allclose(bn.moving_mean.numpy(), 0.0)
    batches = [images(4, seed) for seed in range(3)]
    used = mdl.recompute_bn_statistics(model, iter(batches))
    assert used == 3
    # the first BN follows the first conv: its moving mean is now the average of
    # that conv's batch means (no longer the initial zeros)
    base = mdl.base_of(model)
    first_conv = next(l for l in base.layers if isinstance(l, keras.layers.Conv2D))
    feats = keras.Model(base.input, first_conv.output)
    expected = np.mean([feats(b / 127.5 - 1.0).numpy().mean(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-3, atol=1e-4)
    # flags and momentum are restored
    assert not mdl.base_of(model).trainable and bn.momentum == 0.99


# --- model.weights: imagenet from the Keras cache (the Docker image carries it) ----------

def _md5_of(path) -> str:
    import hashlib

    return hashlib.md5(open(path, "rb").read(), usedforsecurity=False).hexdigest()


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt of Keras to fetch the ImageNet weights fails the test."""
    from tf_keras.src.applications import inception_v3

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- network is unreachable")

    monkeypatch.setattr(inception_v3.data_utils, "get_file", refuse)
    return calls


def test_imagenet_weights_come_from_the_keras_cache_without_network(tmp_path, monkeypatch, no_download):
    keras_home = tmp_path / "keras"
    (keras_home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    keras.utils.set_random_seed(7)
    source = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    cached = keras_home / "models" / mdl.IMAGENET_NO_TOP_FILE
    source.save_weights(str(cached))
    # Stand-in weights: the real file's MD5 is what a real cache must match.
    monkeypatch.setattr(mdl, "IMAGENET_NO_TOP_MD5", _md5_of(cached))
    assert mdl.cached_imagenet_weights() == str(cached)
    model = mdl.build_model(3, SIZE, ModelConfig(weights="imagenet", head_units=16))
    assert no_download == []
    for a, b in zip(mdl.base_of(model).get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_cached_file_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / mdl.IMAGENET_NO_TOP_FILE).write_bytes(b"truncated download")
    if os.path.isfile(os.path.join("/tmp", ".keras", "models", mdl.IMAGENET_NO_TOP_FILE)):
        pytest.skip("this machine keeps real ImageNet weights in /tmp/.keras")
    assert mdl.cached_imagenet_weights() is None
    assert "MD5 differs" in caplog.text


def test_imagenet_without_cache_or_network_is_a_clear_error(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(mdl, "keras_cache_dirs", lambda: [str(tmp_path / ".keras")])
    with pytest.raises(RuntimeError, match="infra/docker/Dockerfile") as failed:
        mdl.build_model(3, SIZE, ModelConfig(weights="imagenet", head_units=16))
    assert str(tmp_path / ".keras" / "models") in str(failed.value) and len(no_download) == 1


def test_imagenet_cache_dirs_follow_keras():
    """KERAS_HOME first (Keras 3 and this project), then where tf_keras's
    get_file() keeps downloads: ~/.keras, or /tmp/.keras when that is read-only."""
    import inspect

    from tf_keras.src.applications import inception_v3
    from tf_keras.src.utils import data_utils

    source = inspect.getsource(inception_v3)
    assert f'"{mdl.IMAGENET_NO_TOP_FILE}"' in source and f'file_hash="{mdl.IMAGENET_NO_TOP_MD5}"' in source
    get_file = inspect.getsource(data_utils.get_file)
    assert 'os.path.join(os.path.expanduser("~"), ".keras")' in get_file
    assert 'os.path.join("/tmp", ".keras")' in get_file
    dirs = mdl.keras_cache_dirs()
    assert dirs[-2:] == [os.path.join(os.path.expanduser("~"), ".keras"), "/tmp/.keras"]
