"""InceptionV3 + new head, the two training phases, warm start. tf_keras (Keras 2)
only, no Ray imports.

The model takes RGB float images in [0, 255] at ``image_size`` and scales them to
[-1, 1] itself (InceptionV3's preprocessing), so the saved artifact carries its
own preprocessing: scoring only decodes and resizes.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

import tf_keras as keras

from pipeline.config import ModelConfig, PhaseConfig

log = logging.getLogger(__name__)

BASE_NAME = "inception_v3"
HEAD_LAYERS = ("head_pool", "head_dense", "head_dropout", "predictions")


def build_model(
    num_classes: int,
    image_size: int,
    cfg: ModelConfig,
    *,
    weights_file: Optional[str] = None,
) -> keras.Model:
    """``weights_file`` is a local copy of no-top weights when ``cfg.weights`` is a
    file or URI (the caller fetches it); "imagenet" downloads through Keras."""
    weights: Optional[str]
    if cfg.weights == "none":
        weights = None
    elif cfg.weights == "imagenet":
        weights = "imagenet"
    else:
        weights = None  # loaded below, with a clear error on mismatch
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="inception_preprocess")(inputs)
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
    # float32 softmax even under mixed_float16, for stable probabilities.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="inception_ray")


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def freeze_index(base: keras.Model, unfreeze_after: Union[int, str]) -> int:
    """How many base layers stay frozen in fine-tuning: all layers up to and
    including the named one, or the first N."""
    if isinstance(unfreeze_after, int):
        if not 0 <= unfreeze_after <= len(base.layers):
            raise ValueError(f"train.finetune.unfreeze_after={unfreeze_after}: the base has {len(base.layers)} layers")
        return unfreeze_after
    names = [layer.name for layer in base.layers]
    if unfreeze_after not in names:
        blocks = ", ".join(n for n in names if n.startswith("mixed"))
        raise ValueError(f"train.finetune.unfreeze_after='{unfreeze_after}' is not a layer of InceptionV3 (blocks: {blocks})")
    return names.index(unfreeze_after) + 1


def set_phase(model: keras.Model, phase: str, unfreeze_after: Union[int, str] = "mixed8") -> int:
    """Set trainable flags for a phase; returns the number of trainable base layers.
    A frozen BatchNormalization layer runs in inference mode (Keras 2 semantics),
    so frozen statistics are never updated."""
    base = base_of(model)
    if phase == "transfer":
        base.trainable = False
        return 0
    if phase != "finetune":
        raise ValueError(f"unknown phase {phase!r}")
    base.trainable = True
    cut = freeze_index(base, unfreeze_after)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= cut
    return len(base.layers) - cut


def make_optimizer(phase: PhaseConfig) -> keras.optimizers.Optimizer:
    if phase.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=phase.learning_rate, momentum=phase.momentum)
    if phase.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=phase.learning_rate)
    return keras.optimizers.RMSprop(learning_rate=phase.learning_rate, momentum=phase.momentum)


def compile_for(model: keras.Model, phase: PhaseConfig, *, top_k: int, jit_compile: bool = False) -> None:
    model.compile(
        optimizer=make_optimizer(phase),
        loss="sparse_categorical_crossentropy",
        metrics=[
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
    donor = keras.models.load_model(source_file, compile=False, safe_mode=True)
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


def save_model(model: keras.Model, path: str) -> None:
    """Save as ``.keras`` to a local path, atomically."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)
