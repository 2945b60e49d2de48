"""TFLite files from an exported SavedModel's pixels signature: float32, and
dynamic-range quantised (weights stored as int8, activations float) as an
option. Input uint8 [1, S, S, 3] (resizable to N), output the probabilities;
labels are in ``labels.txt`` beside them."""

from __future__ import annotations

import os

from pipeline.export.graph import PIXELS_SIGNATURE

FLOAT_FILE = "model.tflite"
QUANTIZED_FILE = "model-dynamic-range.tflite"


def convert(saved_model_dir: str, out_path: str, *, quantize: bool = False) -> str:
    """Write the TFLite conversion of ``saved_model_dir``'s pixels signature to
    ``out_path``; returns ``out_path``."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[PIXELS_SIGNATURE])
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    data = converter.convert()
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)
    return out_path
