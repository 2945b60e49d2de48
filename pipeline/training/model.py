"""InceptionV3 + new head, the two training phases, warm start. tf_keras (Keras 2)
only, no Ray imports.

The model takes RGB float images in [0, 255] at ``image_size`` and scales them to
[-1, 1] itself (InceptionV3's preprocessing), so the saved artifact carries its
own preprocessing: scoring only decodes and resizes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Optional, Sequence, Union

import tf_keras as keras

from pipeline.config import ModelConfig, PhaseConfig

log = logging.getLogger(__name__)

BASE_NAME = "inception_v3"
HEAD_LAYERS = ("head_pool", "head_dense", "head_dropout", "predictions")

# tf_keras's InceptionV3 no-top ImageNet weights: the file name and MD5 that
# its get_file() uses, under <Keras cache>/models/. The Docker image carries
# this file (infra/docker/Dockerfile), so that workers never download it.
IMAGENET_NO_TOP_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NO_TOP_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"


def keras_cache_dirs() -> list[str]:
    """Where a cached Keras download may be: $KERAS_HOME (when set), ~/.keras,
    and /tmp/.keras (where tf_keras's get_file() writes when ~/.keras is not
    writable)."""
    dirs = [os.environ["KERAS_HOME"]] if os.environ.get("KERAS_HOME") else []
    dirs += [os.path.join(os.path.expanduser("~"), ".keras"), os.path.join("/tmp", ".keras")]
    return list(dict.fromkeys(dirs))


def _md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_imagenet_weights() -> Optional[str]:
    """The cached no-top ImageNet weights file, if one is present and intact."""
    for folder in keras_cache_dirs():
        path = os.path.join(folder, "models", IMAGENET_NO_TOP_FILE)
        if not os.path.isfile(path):
            continue
        if _md5(path) == IMAGENET_NO_TOP_MD5:
            return path
        log.warning("ignoring %s: not the expected file (MD5 differs)", path)
    return None


def _imagenet_base(input_shape: tuple[int, int, int]) -> keras.Model:
    """InceptionV3 without top, ImageNet weights from the Keras cache when present
    (no network), else downloaded by Keras."""
    cached = cached_imagenet_weights()
    if cached:
        log.info("ImageNet weights: %s", cached)
        return keras.applications.InceptionV3(include_top=False, weights=cached, input_shape=input_shape)
    try:
        return keras.applications.InceptionV3(include_top=False, weights="imagenet", input_shape=input_shape)
    except ValueError:
        raise  # arguments (e.g. an input below 75x75), not the download
    except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception on a failed download
        places = ", ".join(os.path.join(d, "models") for d in keras_cache_dirs())
        raise RuntimeError(
            f"model.weights: imagenet: {IMAGENET_NO_TOP_FILE} is in no Keras cache ({places}) and the download "
            f"failed ({exc}); use the image built from infra/docker/Dockerfile, which carries it, or set "
            "model.weights to a copy of the file (local path or URI)"
        ) from None


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def set_precision(policy: str) -> None:
    """The global Keras dtype policy for models built after this call
    (``train.precision``): float32, mixed_float16 or mixed_bfloat16."""
    if policy not in PRECISIONS:
        raise ValueError(f"unknown precision {policy!r} (one of {PRECISIONS})")
    keras.mixed_precision.set_global_policy(policy)


def build_model(
    num_classes: int,
    image_size: int,
    cfg: ModelConfig,
    *,
    weights_file: Optional[str] = None,
) -> keras.Model:
    """``weights_file`` is a local copy of no-top weights when ``cfg.weights`` is a
    file or URI (the caller fetches it); "imagenet" uses the copy in the Keras
    cache when there is one, else downloads through Keras."""
    weights: Optional[str]
    if cfg.weights == "none":
        weights = None
    elif cfg.weights == "imagenet":
        weights = "imagenet"
    else:
        weights = None  # loaded below, with a clear error on mismatch
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="inception_preprocess")(inputs)
    if weights == "imagenet":
        base = _imagenet_base((image_size, image_size, 3))
    else:
        base = keras.applications.InceptionV3(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
    base._name = BASE_NAME
    if weights_file:
        try:
            base.load_weights(weights_file)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"weights file {cfg.weights} does not fit InceptionV3 without top: {exc}") from None
    if cfg.bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = cfg.bn_momentum
    x = base(scaled)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.Dense(cfg.head_units, activation="relu", name="head_dense")(x)
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    # float32 softmax even under a mixed policy, for stable probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="inception_ray")


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def freeze_index(base: Union[keras.Model, Sequence[str]], unfreeze_after: Union[int, str]) -> int:
    """How many base layers stay frozen in fine-tuning: all layers up to and
    including the named one, or the first N. ``base``: the base model, or the
    names of its layers."""
    names = list(base) if isinstance(base, (list, tuple)) else [layer.name for layer in base.layers]
    if isinstance(unfreeze_after, int):
        if not 0 <= unfreeze_after <= len(names):
            raise ValueError(f"train.finetune.unfreeze_after={unfreeze_after}: the base has {len(names)} layers")
        return unfreeze_after
    if unfreeze_after not in names:
        blocks = ", ".join(n for n in names if n.startswith("mixed"))
        raise ValueError(f"train.finetune.unfreeze_after='{unfreeze_after}' is not a layer of InceptionV3 (blocks: {blocks})")
    return names.index(unfreeze_after) + 1


@functools.lru_cache(maxsize=1)
def base_layer_names() -> tuple[str, ...]:
    """The names of InceptionV3's no-top layers, in order (the same at every
    input size; built once per process, without weights)."""
    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))
    return tuple(layer.name for layer in base.layers)


def set_phase(model: keras.Model, phase: str, unfreeze_after: Union[int, str] = "mixed8", *,
              freeze_bn: bool = False) -> int:
    """Set trainable flags for a phase; returns the number of trainable base layers.
    A frozen BatchNormalization layer runs in inference mode (Keras 2 semantics),
    so frozen statistics are never updated. ``freeze_bn`` keeps every
    BatchNormalization layer of the base frozen in fine-tuning too: pretrained
    statistics are not disturbed by small per-replica batches."""
    base = base_of(model)
    if phase == "transfer":
        base.trainable = False
        return 0
    if phase != "finetune":
        raise ValueError(f"unknown phase {phase!r}")
    base.trainable = True
    cut = freeze_index(base, unfreeze_after)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= cut and not (freeze_bn and isinstance(layer, keras.layers.BatchNormalization))
    return sum(1 for layer in base.layers[cut:] if layer.trainable)


def bn_frozen(cfg: ModelConfig) -> bool:
    """``model.bn_mode``: "auto" freezes BatchNorm when fine-tuning pretrained
    weights (ImageNet, a weights file, or a warm start) and trains it from scratch."""
    if cfg.bn_mode != "auto":
        return cfg.bn_mode == "frozen"
    return cfg.weights != "none" or cfg.init_from is not None


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from ``rate / warmup_steps`` to ``rate`` over the first
    ``warmup_steps`` optimizer steps, then constant. The step is the optimizer's
    own counter, so a resumed run continues where it was."""

    def __init__(self, rate: float, warmup_steps: int):
        self.rate, self.warmup_steps = float(rate), int(warmup_steps)

    def __call__(self, step):
        import tensorflow as tf

        done = tf.cast(step, tf.float32) + 1.0
        return self.rate * tf.minimum(1.0, done / float(max(1, self.warmup_steps)))

    def get_config(self):
        return {"rate": self.rate, "warmup_steps": self.warmup_steps}


# Optimizers that divide each step by a running estimate of the gradient's
# scale: their step grows about with the square root of the batch, not linearly
# (Hoffer et al., 2017; Malladi et al., 2022), so "auto" scales them by sqrt.
ADAPTIVE_OPTIMIZERS = frozenset({"rmsprop", "adam"})
# Automatic warmup (train.warmup_epochs: null): when a phase's rate is scaled up
# more than WARMUP_ABOVE_FACTOR times, a quarter of its epochs, at most 5.
WARMUP_ABOVE_FACTOR = 2.0
AUTO_WARMUP_FRACTION = 0.25
AUTO_WARMUP_MAX_EPOCHS = 5.0


def lr_rule(optimizer: str, lr_scaling: str) -> str:
    """The scaling rule a phase uses: "linear", "sqrt" or "none" (``auto``:
    linear for SGD, sqrt for the adaptive optimizers)."""
    if lr_scaling == "auto":
        return "sqrt" if optimizer in ADAPTIVE_OPTIMIZERS else "linear"
    return lr_scaling


def lr_factor(rule: str, batch_ratio: float) -> float:
    """What the rule multiplies a learning rate by for global batch / reference = ``batch_ratio``."""
    if rule == "linear":
        return float(batch_ratio)
    if rule == "sqrt":
        return float(batch_ratio) ** 0.5
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}")


def warmup_epochs_for(setting: Optional[float], factor: float, phase_epochs: int) -> float:
    """``train.warmup_epochs`` when set; else (auto) a quarter of the phase's
    epochs, at most 5, when the rate is scaled up more than 2x, else 0."""
    if setting is not None:
        return float(setting)
    if factor > WARMUP_ABOVE_FACTOR:
        return min(AUTO_WARMUP_MAX_EPOCHS, AUTO_WARMUP_FRACTION * phase_epochs)
    return 0.0


def learning_rate_at(optimizer, step: Optional[int] = None) -> float:
    """The learning rate ``optimizer`` applies at ``step`` (its schedule, if it
    has one, evaluated there); default: the rate its last step used, i.e. at
    ``iterations - 1`` (a step reads the rate before counting itself). A loss
    scale optimizer (mixed precision) answers for the optimizer it wraps."""
    import tensorflow as tf

    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = getattr(inner, "_learning_rate", None)
    if rate is None:
        rate = inner.learning_rate
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        if step is None:
            step = max(0, int(inner.iterations.numpy()) - 1)
        return float(rate(tf.constant(step, tf.int64)))
    return float(keras.backend.get_value(rate))


def make_optimizer(phase: PhaseConfig, learning_rate: Optional[float] = None,
                   warmup_steps: int = 0) -> keras.optimizers.Optimizer:
    """The phase's optimizer at ``learning_rate`` (default: the phase's own),
    with a linear warmup over ``warmup_steps`` when given."""
    rate = phase.learning_rate if learning_rate is None else learning_rate
    lr = WarmupSchedule(rate, warmup_steps) if warmup_steps > 0 else rate
    if phase.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=phase.momentum)
    if phase.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    return keras.optimizers.RMSprop(learning_rate=lr, momentum=phase.momentum)


def compile_for(model: keras.Model, phase: PhaseConfig, *, top_k: int, jit_compile: bool = False,
                learning_rate: Optional[float] = None, warmup_steps: int = 0, steps_per_execution: int = 1) -> None:
    """Compile for a phase. ``steps_per_execution`` steps run per call of the
    compiled function (the host dispatches them at once). Under the
    mixed_float16 policy tf_keras wraps the optimizer in a LossScaleOptimizer
    itself; mixed_bfloat16 needs no loss scaling."""
    model.compile(
        steps_per_execution=steps_per_execution,
        optimizer=make_optimizer(phase, learning_rate, warmup_steps),
        loss="sparse_categorical_crossentropy",
        # Weighted like the loss: validation padding weighs 0 (see
        # pipeline.data.input.validation_input); with train.class_weights the
        # training accuracy is class-weighted too.
        weighted_metrics=[
            "accuracy",
            keras.metrics.SparseTopKCategoricalAccuracy(k=top_k, name="top_k_accuracy"),
        ],
        jit_compile=jit_compile,
    )


def warm_start(model: keras.Model, source_file: str) -> dict:
    """Copy weights from a saved model layer by layer, skipping layers whose
    shapes differ (a new class set re-initialises the head only). Head layers
    match by name; base layers by their position in InceptionV3, because Keras
    numbers auto-generated names per process ("conv2d_94")."""
    from pipeline.artifact import load_keras_file

    donor = load_keras_file(source_file, safe_mode=True)
    donor_layers = dict(_keyed_layers(donor))
    copied, skipped = [], []
    for key, layer in _keyed_layers(model):
        other = donor_layers.get(key)
        if other is None or not layer.weights:
            continue
        theirs = other.get_weights()
        if [w.shape for w in theirs] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(theirs)
            copied.append(layer.name)
        else:
            skipped.append(layer.name)
    log.info("warm start from %s: %d layers copied, skipped (shape differs): %s",
             source_file, len(copied), ", ".join(skipped) or "none")
    return {"copied": copied, "skipped": skipped}


def _keyed_layers(model: keras.Model):
    for layer in model.layers:
        if layer.name == BASE_NAME and isinstance(layer, keras.Model):
            for i, inner in enumerate(layer.layers):
                yield f"{BASE_NAME}/{i}/{type(inner).__name__}", inner
        else:
            yield layer.name, layer


def recompute_bn_statistics(model: keras.Model, batches) -> int:
    """Re-estimate every BatchNormalization layer's moving mean and variance as
    the average of batch statistics over ``batches`` (images only), so that
    inference mode matches what the weights were trained with. Returns the
    number of batches used."""
    layers = [layer for _, layer in _keyed_layers(model)]
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in bns]
    base = base_of(model)
    flags = [(base, base.trainable)] + [(layer, layer.trainable) for layer in layers]
    n = 0
    try:
        # A frozen BN layer ignores training=True; unfreeze them for the passes.
        base.trainable = True
        for layer in bns:
            layer.trainable = True
        for n, images in enumerate(batches, start=1):
            # Cumulative average: after k batches the moving stats are their mean.
            for layer in bns:
                layer.momentum = (n - 1) / n
            model(images, training=True)
    finally:
        for layer, trainable in flags:  # base first: its setter resets sublayers
            layer.trainable = trainable
        for layer, momentum in zip(bns, momenta):
            layer.momentum = momentum
    return n


def count_inputs(model: keras.Model) -> None:
    """Make the model count what its train and test steps actually receive.

    The steps then take ``(images, labels, weights, skipped[, real])`` elements (see
    ``pipeline.data.input.make_dataset(counted=True)`` and ``train_input``;
    ``real`` 0 marks validation padding, not counted) and log, per epoch, summed
    over every replica of every worker: ``examples`` (images trained on),
    ``replica_batch`` (mean images per replica per step) and
    ``skipped_records`` (undecodable records dropped by the input). Validation
    logs the same with ``val_``. Create it inside the strategy scope; the saved
    model is unchanged (only this instance's steps are wrapped).

    ``images`` may also be the uint8 batches of augmented training input
    (``pipeline.data.input.device_record``): the train step then resamples
    them first (``augment_batch``), on the replica's device, inside the
    compiled step; the model still receives float32 in [0, 255] and scales it
    itself, as in evaluation, predict and scoring."""
    import tensorflow as tf

    from pipeline.data import input as inp

    size = int(model.input_shape[1])

    examples = keras.metrics.Sum(name="examples")
    replica_batch = keras.metrics.Mean(name="replica_batch")
    skipped = keras.metrics.Sum(name="skipped_records")
    model._input_counters = [examples, replica_batch, skipped]  # tracked: reset every epoch
    train_step, test_step = model.train_step, model.test_step

    def counted(data):
        images, labels, weights, skip = data[:4]
        # A fifth element marks real images (1) against validation padding (0).
        n = tf.reduce_sum(data[4]) if len(data) > 4 else tf.cast(tf.shape(labels)[0], tf.float32)
        examples.update_state(n)
        replica_batch.update_state(n)
        skipped.update_state(tf.cast(tf.reduce_sum(skip), tf.float32))
        if inp.is_device_batch(images):
            images = inp.augment_batch(images, size)
        return images, labels, weights

    model.train_step = lambda data: train_step(counted(data))
    model.test_step = lambda data: test_step(counted(data))


class RestoreError(RuntimeError):
    """A checkpoint did not restore completely."""


def required_slots(optimizer) -> tuple[str, ...]:
    """The slots tf_keras' optimizers keep per trainable variable, by name."""
    kind = type(optimizer).__name__
    if kind == "RMSprop":
        return ("velocity", "momentum") if getattr(optimizer, "momentum", 0) else ("velocity",)
    return {"SGD": ("m",), "Adam": ("m", "v")}.get(kind, ())


def optimizer_slots(optimizer) -> dict[str, list]:
    """The optimizer's slot variables by slot name (``m``, ``v``, ``velocity``,
    ``momentum``: the first part of their names), its step count left out."""
    out: dict[str, list] = {}
    for variable in optimizer.variables:
        name = variable.name.split("/", 1)
        if len(name) == 2:
            out.setdefault(name[0], []).append(variable)
    return out


def local_value(variable):
    """What this replica holds: under a distribution strategy, the local copy
    of a mirrored or sync-on-read variable. Reading a sync-on-read variable
    (BatchNorm's moving statistics) as a whole all-reduces the replicas'
    copies and divides, which is not the stored value in the last bit with 3
    or more replicas."""
    import tensorflow as tf

    if isinstance(variable, tf.distribute.DistributedValues):
        return variable.values[0].numpy()
    return variable.numpy()


def restore_verified(model: keras.Model, path: str, *, with_optimizer: bool) -> dict:
    """Restore a ``save_weights`` checkpoint and prove it: TensorFlow's own
    matching must account for every object (``with_optimizer``: every value in
    the checkpoint, optimizer slots included; else every model variable), every
    variable in memory (this replica's copy) must equal a tensor read back from
    the file, and with the optimizer, every trainable variable must have each
    slot its optimizer keeps (named in the error when one is missing). Returns
    counts of what was verified: ``variables`` (model), ``trainable``,
    ``iterations`` and one entry per slot name; raises RestoreError otherwise."""
    import hashlib

    import numpy as np
    import tensorflow as tf

    try:
        status = model.load_weights(path)
        if with_optimizer:
            status.assert_consumed()
        else:
            status.assert_existing_objects_matched()
            status.expect_partial()  # the old phase's optimizer is not needed
    except (AssertionError, ValueError) as exc:
        raise RestoreError(f"checkpoint {path} did not restore completely: {str(exc)[:500]}") from None

    def fingerprint(value) -> tuple:
        arr = np.ascontiguousarray(np.asarray(value))
        return arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest()

    reader = tf.train.load_checkpoint(path)
    stored: dict[tuple, int] = {}
    for key in reader.get_variable_to_shape_map():
        if key.startswith("_CHECKPOINTABLE_OBJECT_GRAPH") or key.startswith("save_counter"):
            continue
        fp = fingerprint(reader.get_tensor(key))
        stored[fp] = stored.get(fp, 0) + 1

    def verify(variable, what: str) -> None:
        fp = fingerprint(local_value(variable))
        if not stored.get(fp):
            raise RestoreError(f"checkpoint {path}: {what} {variable.name} {tuple(variable.shape)} differs from "
                               "every value stored in the checkpoint")
        stored[fp] -= 1

    # Metric accumulators (the input counters of count_inputs, reset every
    # epoch) are not training state: a sync-on-read SUM is restored as the
    # stored total split over the replicas, so no replica holds the stored value.
    counters = {id(v) for m in getattr(model, "_input_counters", []) + list(model.metrics) for v in m.variables}
    weights = [v for v in model.variables if id(v) not in counters]
    for variable in weights:
        verify(variable, "variable")
    counts = {"variables": len(weights), "trainable": len(model.trainable_variables)}
    if with_optimizer:
        optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
        verify(optimizer.iterations, "optimizer step count")
        counts["iterations"] = 1
        slots = optimizer_slots(optimizer)
        trainable = {v.name.split(":")[0] for v in model.trainable_variables}
        for name in required_slots(optimizer):
            have = {v.name.split("/", 1)[1].split(":")[0] for v in slots.get(name, [])}
            missing = sorted(trainable - have)
            if missing:
                raise RestoreError(f"checkpoint {path}: the {type(optimizer).__name__} optimizer has no '{name}' "
                                   f"slot for {len(missing)} trainable variables, e.g. {missing[0]}")
        for name, variables in slots.items():
            for variable in variables:
                verify(variable, f"optimizer slot '{name}'")
            counts[name] = len(variables)
    return counts


def save_model(model: keras.Model, path: str) -> None:
    """Save as ``.keras`` to a local path, atomically."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)
