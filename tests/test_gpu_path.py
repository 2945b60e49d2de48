"""The GPU training path's switches, checked on CPU: no host sync per step
(callbacks take tensor logs, steps_per_execution), the collective and
precision choices, and the model's train step augmenting uint8 input under
XLA and mixed precision."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from tf_keras.src.utils import tf_utils

from pipeline.config import Config, PhaseConfig, load_config
from pipeline.data import input as inp
from pipeline.training import model as mdl
from pipeline.training import worker as wk

AUG = {"enabled": True, "rotation": 20, "width_shift": 0.1, "height_shift": 0.1, "shear": 5, "zoom": 0.1,
       "horizontal_flip": True}


class _Stream:
    checks = 0

    def check(self):
        _Stream.checks += 1


def _conversions(monkeypatch) -> list:
    """Calls of tf_keras' logs-to-numpy conversion (each one waits for the step)."""
    calls = []
    real = tf_utils.sync_to_numpy_or_python_type

    def spy(value):
        calls.append(value)
        return real(value)

    monkeypatch.setattr(tf_utils, "sync_to_numpy_or_python_type", spy)
    return calls


def _worker_callbacks(model, every=1):
    reporter = wk.Reporter("transfer", 0, 1, wk.LoopState(), Config(), 0, model, bad_records=lambda: [])
    return wk.training_callbacks([_Stream()], reporter, every=every)


def _tiny_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    return model


def test_the_worker_callbacks_take_tensor_logs_at_batch_ends(monkeypatch):
    """tf_keras converts a step's logs to numpy (waiting for the step) unless
    every callback with batch hooks says it takes tensors: the worker's do."""
    model = _tiny_model()
    callbacks = keras.callbacks.CallbackList(_worker_callbacks(model), model=model)
    assert callbacks._batch_hooks_support_tf_logs
    calls = _conversions(monkeypatch)
    logs = {"loss": tf.constant(1.0)}
    callbacks.on_train_batch_end(0, logs)
    callbacks.on_test_batch_end(0, logs)
    assert calls == []
    # Without the flag the same hooks convert: the check above can fail.
    plain = _worker_callbacks(model)
    del plain[0]._supports_tf_logs
    keras.callbacks.CallbackList(plain, model=model).on_train_batch_end(0, logs)
    assert len(calls) == 1


@pytest.mark.parametrize("per_execution", [1, 4])
def test_fit_with_the_worker_callbacks_makes_no_host_sync_per_step(monkeypatch, per_execution):
    """Counted over a fit of 8 steps: the batch hooks convert nothing (at most
    the once-per-epoch logs are), and the stream is checked every ``every``
    steps, as steps_per_execution lets the hook see them."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", steps_per_execution=per_execution)
    ds = tf.data.Dataset.from_tensors((tf.zeros([2, 4]), tf.zeros([2], tf.int32))).repeat()
    stream_check = wk.StreamCheck([_Stream()], every=4)
    calls = _conversions(monkeypatch)
    _Stream.checks = 0
    model.fit(ds, epochs=2, steps_per_epoch=8, verbose=0, callbacks=[stream_check])
    # tf_keras converts a few times per epoch (its metrics, the epoch-end
    # logs) and once at the end: never per step.
    per_epochs = len(calls)
    assert per_epochs <= 3 * 2 + 1
    assert _Stream.checks == 2 * (2 + 1)  # steps 0 and 4 (or 3 and 7), and each epoch's end
    calls.clear()
    model.fit(ds, epochs=2, steps_per_epoch=32, verbose=0, callbacks=[stream_check])
    assert len(calls) == per_epochs  # 4x the steps, no more syncs


def test_steps_per_execution_collective_and_precision_choices():
    cfg = Config()
    assert cfg.train.steps_per_execution == "auto"
    assert wk.steps_per_execution(cfg, gpus=8, steps=1000) == wk.GPU_STEPS_PER_EXECUTION
    assert wk.steps_per_execution(cfg, gpus=0, steps=1000) == 1
    assert wk.steps_per_execution(cfg, gpus=1, steps=5) == 5  # never more than an epoch
    assert wk.steps_per_execution(load_config(overrides=["train.steps_per_execution=4"]), 0, 100) == 4
    kinds = tf.distribute.experimental.CommunicationImplementation
    assert wk.collective_implementation("auto", 8) == kinds.NCCL
    assert wk.collective_implementation("auto", 0) == kinds.RING
    assert wk.collective_implementation("ring", 8) == kinds.RING
    assert wk.collective_implementation("nccl", 1) == kinds.NCCL
    with pytest.raises(ValueError, match="needs GPUs"):
        wk.collective_implementation("nccl", 0)
    assert wk.precision_policy(cfg, mixed_precision=True) == "mixed_float16"
    assert wk.precision_policy(cfg, mixed_precision=False) == "float32"
    bf16 = load_config(overrides=["train.precision=mixed_bfloat16"])
    assert wk.precision_policy(bf16, mixed_precision=True) == "mixed_bfloat16"
    assert wk.configure_gpus() == len(tf.config.list_physical_devices("GPU"))


def test_the_train_step_augments_uint8_input_under_xla_and_mixed_precision():
    """The worker's model (count_inputs) takes the uint8 device batches of
    train_input and trains with XLA under mixed_bfloat16; the output layer
    stays float32."""
    size = 75
    mdl.set_precision("mixed_bfloat16")
    try:
        model = mdl.build_model(3, size, mdl.ModelConfig(weights="none", head_units=8))
        # The worker's fine-tuning phase (the top inception block and the head
        # train): the same input, augmentation and precision path as training
        # the whole network, at a fraction of its XLA compile time.
        mdl.set_phase(model, "finetune", "mixed9")
        mdl.compile_for(model, PhaseConfig(optimizer="sgd"), top_k=1, jit_compile=True, steps_per_execution=2)
        mdl.count_inputs(model)
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (s, s + 7, 3), dtype=np.uint8) for s in (90, 120, 40, 150)]
        records = [inp.device_record(tf.constant(im), size, AUG, inp.record_key(0, 0, 0, i))
                   for i, im in enumerate(images)]
        side = inp.canvas_side(size)
        pad = [tf.pad(r["pixels"], [[0, side - tf.shape(r["pixels"])[0]], [0, side - tf.shape(r["pixels"])[1]],
                                    [0, 0]]) for r in records]
        batch = {"pixels": tf.stack(pad), "shape": tf.stack([r["shape"] for r in records]),
                 "transform": tf.stack([r["transform"] for r in records])}
        element = (batch, tf.constant([0, 1, 2, 0]), tf.ones([4]), tf.zeros([4], tf.int64), tf.ones([4]))
        ds = tf.data.Dataset.from_tensors(element).repeat()
        history = model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0).history
        assert np.isfinite(history["loss"][0]) and history["examples"][0] == 8
        assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"
        assert not isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    finally:
        mdl.set_precision("float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_loss_scaling_for_float16_only(policy):
    mdl.set_precision(policy)
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax", dtype="float32")])
        mdl.compile_for(model, PhaseConfig(optimizer="sgd"), top_k=1)
        scaled = isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        assert scaled == (policy == "mixed_float16")
    finally:
        mdl.set_precision("float32")


def test_images_per_s_counts_training_time_only(monkeypatch):
    """The validation pass is timed apart: images_per_s is examples over the
    epoch's time less validation."""
    import ray.train

    import pipeline.training.worker as worker_module

    reported = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    clock = iter([100.0, 101.0, 105.0, 106.0])  # epoch begins, validation 101-105, epoch ends
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(time=lambda: next(clock)))
    model = _tiny_model()
    state = wk.LoopState()
    reporter = wk.Reporter("transfer", 0, 1, state, Config(), 1, model, bad_records=lambda: [])
    reporter.on_epoch_begin(0)
    reporter.on_test_begin()
    reporter.on_test_end()
    reporter.on_epoch_end(0, {"loss": 1.0, "examples": 20.0})
    entry = state.history[-1]
    assert entry["seconds"] == 6.0 and entry["validation_seconds"] == 4.0
    assert entry["images_per_s"] == 10.0  # 20 images in 2 s of training
    assert reported and reported[-1]["images_per_s"] == 10.0
