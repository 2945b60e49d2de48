"""Write the serving export of a model: a SavedModel folder (``saved_model.pb``,
``variables/``, ``assets/`` with ``labels.txt``, ``labels.json`` and
``preprocessing.json``), optionally ``model.tflite`` and
``model-dynamic-range.tflite`` beside it, and ``export.json``, written last:
an export folder without it is incomplete (being written, or interrupted).

``export_run`` takes what ``jobs.score`` takes as a model (a completed run
directory, a model file in one, a registry version or ``REGISTRY#name``) and
writes to ``RUN/export/`` (``VERSION/export/`` for a registry version) unless
told otherwise; any storage, through a local scratch folder. Nothing from the
config goes into the export (no endpoints, no credentials), and a URI's
user-info part is dropped from what ``export.json`` records.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Optional

from pipeline import storage as st
from pipeline.artifact import (LABELS_FILE, PREPROCESSING_FILE, ModelArtifact, check_model_reference, load_artifact,
                               model_file_uri)
from pipeline.config import StorageConfig
from pipeline.export import tflite as tfl
from pipeline.export.graph import (BYTES_INPUT, BYTES_SIGNATURE, PIXELS_INPUT, PIXELS_SIGNATURE, serving_module)

EXPORT_DIR = "export"
EXPORT_MARKER = "export.json"
EXPORT_FORMAT_VERSION = 1
DEFAULT_MAX_PIXELS = 89_478_485  # prepare.max_pixels's default


def redact(uri: str) -> str:
    """``uri`` without a user-info part (``s3://key:secret@bucket`` -> ``s3://bucket``)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


def export_model(artifact: ModelArtifact, out_dir: str, *, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
                 tflite: bool = False, quantize: bool = False) -> dict:
    """Write the export of a loaded model into the local folder ``out_dir``
    (created; files there are replaced) and return what ``export.json``
    holds, without writing it."""
    import tensorflow as tf

    os.makedirs(out_dir, exist_ok=True)
    labels = list(artifact.labels)
    with st.local_scratch() as scratch:
        assets = []
        for name, text in (("labels.txt", "".join(f"{label}\n" for label in labels)),
                           (LABELS_FILE, json.dumps(labels)),
                           (PREPROCESSING_FILE, json.dumps(artifact.recipe.to_dict(), indent=2))):
            path = os.path.join(scratch, name)
            with open(path, "w") as f:
                f.write(text)
            assets.append(path)
        module = serving_module(artifact.model, labels, artifact.recipe, top_k=top_k, max_pixels=max_pixels)
        module.assets = [tf.saved_model.Asset(path) for path in assets]
        signatures = {
            "serving_default": module.serving_bytes,
            BYTES_SIGNATURE: module.serving_bytes,
            PIXELS_SIGNATURE: module.serving_pixels,
        }
        tf.saved_model.save(module, out_dir, signatures=signatures)
    written = []
    if tflite or quantize:
        written.append(tfl.convert(out_dir, os.path.join(out_dir, tfl.FLOAT_FILE)))
    if quantize:
        written.append(tfl.convert(out_dir, os.path.join(out_dir, tfl.QUANTIZED_FILE), quantize=True))
    with open(os.path.join(out_dir, "labels.txt"), "w") as f:  # for TFLite users, beside the .tflite files
        f.write("".join(f"{label}\n" for label in labels))
    size = artifact.image_size
    k = min(int(top_k), len(labels))
    files = sorted(os.path.relpath(os.path.join(root, name), out_dir)
                   for root, _, names in os.walk(out_dir) for name in names)
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": redact(artifact.uri),
        "labels": labels,
        "image_size": size,
        "top_k": k,
        "signatures": {
            "serving_default": f"same as {BYTES_SIGNATURE}",
            BYTES_SIGNATURE: {"inputs": {BYTES_INPUT: "string [N]: encoded JPEG, PNG, GIF, WebP or BMP files"},
                              "outputs": {"labels": f"string [N, {k}]", "probabilities": f"float32 [N, {k}]",
                                          "class_ids": f"int32 [N, {k}]"}},
            PIXELS_SIGNATURE: {"inputs": {PIXELS_INPUT: f"uint8 [N, {size}, {size}, 3]: RGB, already resized"},
                               "outputs": {"probabilities": f"float32 [N, {len(labels)}]"}},
        },
        "tflite": {name: os.path.basename(path) for name, path in
                   zip(("float32", "dynamic_range"), written)},
        "recipe": artifact.recipe.to_dict(),
        "max_pixels": int(max_pixels),
        "tensorflow": tf.__version__,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_run(model: str, storage: StorageConfig, *, output: Optional[str] = None, tflite: bool = False,
               quantize: bool = False, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_unsafe: bool = False, check: bool = True) -> dict:
    """Export ``model`` (a model reference as ``jobs.score`` takes it) to
    ``output`` (default: ``export/`` in the model's folder): the files, then
    ``export.json`` last, which an earlier export there loses first. ``check``
    False skips the completed-run check (the training driver, which exports a
    run it has just published). Returns ``export.json``'s content and
    ``output``. UsageError (exit 2) for a bad model reference."""
    if check:
        location, shown = check_model_reference(model, storage, allow_unsafe=allow_unsafe)
    else:
        location, shown = model, model
    folder = model_file_uri(location).rsplit("/", 1)[0]
    output = output or st.join(folder, EXPORT_DIR)
    artifact = load_artifact(location, storage, allow_unsafe=allow_unsafe, display_uri=shown)
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, EXPORT_DIR)
        record = export_model(artifact, local, top_k=top_k, max_pixels=max_pixels, tflite=tflite, quantize=quantize)
        marker = st.join(output, EXPORT_MARKER)
        if st.exists(marker, storage):
            st.remove(marker, storage)
        for rel in record["files"]:
            st.publish_file(os.path.join(local, rel), st.join(output, *rel.split(os.sep)), storage)
        st.write_json(marker, record, storage)
    return {**record, "output": output}
