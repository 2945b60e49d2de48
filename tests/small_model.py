"""A small, untrained Keras classifier saved as a completed run directory, for
the tests of scoring and of storage faults, which exercise the job around the
model rather than InceptionV3 itself. It takes what a trained run's model
takes (float32 [N, size, size, 3] in [0, 255], scaled inside the model) and
loads, traces and predicts in a fraction of InceptionV3's time, in every
predictor actor a test starts."""

from __future__ import annotations

import json
from pathlib import Path


def small_classifier(num_classes: int, image_size: int, seed: int = 0):
    """Rescaling to [-1, 1] (as the trained model does), two strided
    convolutions and a softmax head. Its weights are scaled up so that images
    get clearly different probabilities: comparing scores between jobs then
    means something."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 5, strides=3, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="relu", name="head_dense")(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x))
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel * 2, bias])
    return model


def write_run(folder: Path, classes: list[str], image_size: int = 75) -> str:
    """``folder`` as a completed training run holding the small classifier:
    model.keras, labels.json, preprocessing.json and summary.json."""
    from pipeline.artifact import preprocessing_spec

    folder.mkdir(parents=True, exist_ok=True)
    small_classifier(len(classes), image_size).save(str(folder / "model.keras"))
    (folder / "labels.json").write_text(json.dumps(classes))
    (folder / "preprocessing.json").write_text(json.dumps(preprocessing_spec(image_size)))
    (folder / "summary.json").write_text(json.dumps({"job": "train"}))  # a completed run
    return str(folder)
