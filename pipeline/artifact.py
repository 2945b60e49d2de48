"""A trained model as users and jobs load it: ``model.keras`` (which contains the
[-1, 1] scaling and the input size) with ``labels.json`` beside it, plus
``preprocessing.json``: the full recipe (``pipeline.data.preprocess.Recipe``) of the
decode, normalisation and resize that happen outside the model, which score and
predict apply as written. Loading is in Keras safe mode unless the caller allows
unsafe code.

What score, predict and a warm start accept as a model is checked before any
cluster work (``check_model_reference``): a completed training run (its
``summary.json`` is written last), a registry version (``version.json``), or
``REGISTRY#name``; only the ``.keras`` format, and no Lambda layer, unless the
caller allows unsafe models (the legacy ``.h5`` loader runs code whatever the
safe mode says)."""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.data.preprocess import Recipe, current_recipe

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
RUN_COMPLETE_FILE = "summary.json"  # a training run writes it last
VERSION_COMPLETE_FILE = "version.json"  # a registry version writes it last
UNSAFE_HINT = "pass --allow-unsafe only if you trust its author"


def preprocessing_spec(image_size: int, max_side: Optional[int] = None, jpeg_scale_to: Optional[int] = None) -> dict:
    """``preprocessing.json`` of a model trained today at ``image_size`` on
    shards prepared with ``max_side`` and ``jpeg_scale_to``: the full recipe."""
    return current_recipe(image_size, max_side, jpeg_scale_to).to_dict()


def manifest_preprocessing_spec(image_size: int, manifest: dict) -> dict:
    """``preprocessing_spec`` for shards described by ``manifest`` (its
    ``settings`` are the ``prepare`` section they were made with)."""
    settings = manifest.get("settings", {})
    return preprocessing_spec(image_size, settings.get("max_side"), settings.get("jpeg_scale_to"))


def model_file_uri(uri: str) -> str:
    """A run directory (or any folder) means its model.keras."""
    return uri if uri.endswith((".keras", ".h5")) else st.join(uri, MODEL_FILE)


@dataclass
class ModelArtifact:
    uri: str  # what the user named (run dir, file, registry version)
    model: object  # tf_keras.Model
    labels: list[str]
    image_size: int
    recipe: Recipe  # from preprocessing.json: how files become this model's input
    _call: Optional[object] = field(default=None, repr=False, compare=False)
    _top_k_calls: dict = field(default_factory=dict, repr=False, compare=False)

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """float32 [N, size, size, 3] in [0, 255] -> probabilities [N, classes]."""
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.asarray(self.model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Like ``predict`` for one batch, through a compiled inference call:
        the same model without ``Model.predict``'s per-call set-up, which costs
        more than a third of the time of a 64-image batch at 75x75 on a CPU."""
        if self._call is None:
            import tensorflow as tf

            spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)
            self._call = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        if len(images) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.asarray(self._call(np.asarray(images, np.float32)), dtype=np.float32)

    def top_k_call(self, k: int):
        """The compiled device path of scoring: uint8 [N, size, size, 3] ->
        (indices int32 [N, k], probabilities float32 [N, k]), best first. The
        uint8 batch is what travels to the device (a quarter of float32's
        bytes); the cast to float32 (exact for uint8), the model (whose first
        layer scales to [-1, 1], as in training) and ``tf.math.top_k`` run in
        one graph there, so only N x k values come back. Equal to
        ``predict_batch`` on the same images as float32, then a stable
        descending sort, bit for bit on a CPU: ``top_k`` puts the lower class
        index first among equal probabilities, as the stable sort does."""
        call = self._top_k_calls.get(k)
        if call is None:
            import tensorflow as tf

            spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)

            def scored(images):
                probs = self.model(tf.cast(images, tf.float32), training=False)
                return top_k(probs, k)

            call = self._top_k_calls[k] = tf.function(scored, input_signature=[spec])
        return call

    def predict_top_k(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``top_k_call`` on a uint8 batch, as numpy arrays."""
        if len(images) == 0:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
        index, scores = self.top_k_call(k)(np.asarray(images, np.uint8))
        return np.asarray(index, np.int32), np.asarray(scores, np.float32)


def top_k(probs, k: int):
    """(indices int32, values) of the k largest values per row, best first;
    among equal values the lower index first (``tf.math.top_k``'s documented
    order, the order of numpy's stable argsort of ``-probs``). A NaN, which a
    softmax does not give, would be ranked differently by the two."""
    import tensorflow as tf

    values, indices = tf.math.top_k(probs, k=k, sorted=True)
    return tf.cast(indices, tf.int32), values


def check_model_reference(model: str, storage: StorageConfig, *, allow_unsafe: bool = False,
                          hint: str = UNSAFE_HINT) -> tuple[str, str]:
    """(where to load it from, what outputs record) for a model named by a
    user, or a UsageError with one line: the model must be a completed run or
    a registry version, and, unless ``allow_unsafe``, a ``.keras`` archive
    without Lambda layers. Reads the archive's config only (no TensorFlow)."""
    from pipeline.registry import resolve_model

    location, shown = resolve_model(model, storage)
    model_uri = model_file_uri(location)
    if not allow_unsafe and not model_uri.endswith(".keras"):
        raise UsageError(f"{model_uri}: only .keras models are loaded in safe mode (the legacy .h5 loader can run "
                         f"code); {hint}")
    check_model_uri(location, storage)
    folder = model_uri.rsplit("/", 1)[0]
    try:
        complete = (st.exists(st.join(folder, RUN_COMPLETE_FILE), storage)
                    or st.exists(st.join(folder, VERSION_COMPLETE_FILE), storage))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read model {model}: {st.describe_error(exc)}") from None
    if not complete:
        raise UsageError(f"{folder} is not a completed training run (no {RUN_COMPLETE_FILE}) or a registry "
                         f"version (no {VERSION_COMPLETE_FILE}); a run still training or publishing is not a model yet")
    if not allow_unsafe:
        code = code_in_model(model_uri, storage)
        if code:
            raise UsageError(f"{model_uri} contains code ({code}) and is refused in safe mode; {hint}")
    return location, shown


def code_in_model(model_uri: str, storage: StorageConfig) -> Optional[str]:
    """What in a ``.keras`` archive's config would run code when loaded (a
    Lambda layer, a serialized Python lambda), or None. Reads only the
    archive's directory and ``config.json``."""
    try:
        fs, path = st.get_fs(model_uri, storage)
        # Small blocks: the archive's directory is at its end and config.json near
        # its start; the weights in between are never fetched.
        options = {} if st.is_local(model_uri) else {"block_size": 2**20, "cache_type": "readahead"}
        with fs.open(path, "rb", **options) as f:
            if not zipfile.is_zipfile(f):
                raise UsageError(f"{model_uri} is not a Keras archive (.keras is a zip file)")
            with zipfile.ZipFile(f) as zf:
                config = json.loads(zf.read("config.json"))
    except UsageError:
        raise
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{model_uri} is not a readable Keras archive: {st.describe_error(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read model {model_uri}: {st.describe_error(exc)}") from None
    return _find_code(config)


def _find_code(node) -> Optional[str]:
    if isinstance(node, dict):
        kind = node.get("class_name")
        if kind == "Lambda" or kind == "__lambda__":
            name = (node.get("config") or {}).get("name") if isinstance(node.get("config"), dict) else None
            return f"a Lambda layer '{name}'" if name else "a Python lambda"
        if node.get("function_type") == "lambda":
            return "a Python lambda"
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_code(child)
        if found:
            return found
    return None


def check_model_uri(uri: str, storage: StorageConfig) -> str:
    """The model file URI, or a UsageError naming what is missing."""
    model_uri = model_file_uri(uri)
    folder = model_uri.rsplit("/", 1)[0]
    try:
        if not st.exists(model_uri, storage):
            raise UsageError(f"model not found: {model_uri}")
        if not st.exists(st.join(folder, LABELS_FILE), storage):
            raise UsageError(f"no {LABELS_FILE} beside {model_uri}")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read model {uri}: {st.describe_error(exc)}") from None
    return model_uri


def read_recipe(uri: str, storage: StorageConfig) -> Optional[Recipe]:
    """The recipe in ``preprocessing.json`` beside the model (no TensorFlow
    needed), None when there is no such file; UsageError when it is invalid
    or asks for what this code cannot do."""
    folder = model_file_uri(uri).rsplit("/", 1)[0]
    spec_uri = st.join(folder, PREPROCESSING_FILE)
    if not st.exists(spec_uri, storage):
        return None
    try:
        return Recipe.from_dict(st.read_json(spec_uri, storage))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{spec_uri} is not a valid preprocessing spec: {st.describe_error(exc)}") from None


def model_recipe(uri: str, storage: StorageConfig, *, allow_unsafe: bool = False) -> Recipe:
    """How files become the model's input, from ``preprocessing.json``; a
    model saved without one is loaded to find its input size (and gets the
    recipe of models recorded before the full recipe)."""
    recipe = read_recipe(uri, storage)
    return recipe if recipe is not None else load_artifact(uri, storage, allow_unsafe=allow_unsafe).recipe


def load_artifact(uri: str, storage: StorageConfig, *, allow_unsafe: bool = False,
                  display_uri: Optional[str] = None) -> ModelArtifact:
    model_uri = check_model_uri(uri, storage)
    if not allow_unsafe and not model_uri.endswith(".keras"):
        raise UsageError(f"{model_uri}: only .keras models are loaded in safe mode; {UNSAFE_HINT}")
    folder = model_uri.rsplit("/", 1)[0]
    labels = json.loads(st.read_text(st.join(folder, LABELS_FILE), storage))
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, os.path.basename(model_uri))
        fs, path = st.get_fs(model_uri, storage)
        fs.get_file(path, local)
        try:
            model = load_keras_file(local, safe_mode=not allow_unsafe)
        except ValueError as exc:
            if "safe_mode" in str(exc) or "unsafe" in str(exc).lower() or "lambda" in str(exc).lower():
                raise UsageError(
                    f"{model_uri} contains code (e.g. a Lambda layer) and is refused in safe mode; "
                    f"{UNSAFE_HINT}"
                ) from None
            raise
    size = int(model.input_shape[1])
    if model.output_shape[-1] != len(labels):
        raise UsageError(f"{model_uri} predicts {model.output_shape[-1]} classes but {LABELS_FILE} lists {len(labels)}")
    recipe = read_recipe(model_uri, storage) or Recipe.from_dict({"image_size": size})
    if recipe.image_size != size:
        raise UsageError(f"{model_uri} takes {size} px images but {PREPROCESSING_FILE} says {recipe.image_size}")
    return ModelArtifact(display_uri or uri, model, labels, size, recipe)


def load_keras_file(path: str, *, safe_mode: bool = True):
    """``keras.models.load_model(path, compile=False)``, fast for plain archives.

    tf_keras reads the weights through the archive's zip member, and each backward
    seek there re-reads the member from its start (Python 3.11 zipfile): about 20 s
    for InceptionV3 on 2 cores. An archive holding only the config and the weights
    is loaded as the same two steps instead: the model from its config (same safe
    mode), then the weights from the extracted ``model.weights.h5``."""
    import tf_keras as keras

    if path.endswith(".keras") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if set(zf.namelist()) <= {"metadata.json", "config.json", "model.weights.h5"}:
                config = json.loads(zf.read("config.json"))
                config["compile_config"] = None
                model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
                with st.local_scratch() as scratch:
                    model.load_weights(zf.extract("model.weights.h5", scratch))
                return model
    return keras.models.load_model(path, compile=False, safe_mode=safe_mode)

