"""The model side of scoring: ``ScoringPredictor`` loads the model once and
turns decoded batches into top-k label indices and probabilities.

The uint8 images go to the device as they are; the cast to float32, the model
(which scales to [-1, 1] itself) and the top-k run there in one compiled call
(``ModelArtifact.top_k_call``), and only the top-k comes back. The score job
runs it as Ray actors that take two calls at once (``max_concurrency=2``): while
one batch runs on the device, the next one's images are fetched from the object
store and copied to the device; the device work itself is one call at a time.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from pipeline.config import StorageConfig
from pipeline.data.preprocess import Recipe
from pipeline.scoring.decode import NO_ERROR

CPU_BATCH = 64  # images per device call without a GPU (score.batch_size unset)
GPU_BATCH = 256  # images per device call on a GPU (score.batch_size unset)


class ScoringPredictor:
    """``__call__`` scores one batch dict (the output of ``read_and_decode``),
    best first; ``score`` takes uint8 images (one or more arrays, as they come
    from several decode tasks) and the rows to score. A plain class: try it on
    a batch without Ray; the score job runs it as Ray actors.

    ``device_batch``: the most images per device call (a larger batch is split);
    None: 256 on a GPU, 64 on a CPU. ``defer_errors``: a model that fails to
    load does not raise here but makes ``ready()`` report why (an actor whose
    constructor raises would be restarted and die again mid-run)."""

    def __init__(self, model_uri: str, storage: StorageConfig, top_k: int,
                 recipe: Optional[Recipe] = None, allow_unsafe: bool = False, *,
                 device_batch: Optional[int] = None, defer_errors: bool = False):
        self.load_error: Optional[dict] = None
        self._lock = threading.Lock()  # one device call at a time
        try:
            self._load(model_uri, storage, top_k, recipe, allow_unsafe, device_batch)
        except Exception as exc:  # noqa: BLE001 - reported by ready(), once, before any scoring
            if not defer_errors:
                raise
            from pipeline import storage as st
            from pipeline.errors import UsageError

            self.load_error = {"usage": isinstance(exc, UsageError),
                               "message": f"cannot load model {model_uri}: {st.describe_error(exc)}"}

    def _load(self, model_uri, storage, top_k, recipe, allow_unsafe, device_batch) -> None:
        import tensorflow as tf

        from pipeline.artifact import load_artifact

        self.artifact = load_artifact(model_uri, storage, allow_unsafe=allow_unsafe)
        if recipe is not None and recipe != self.artifact.recipe:
            raise ValueError(f"{model_uri}: its preprocessing.json changed after the images were decoded "
                             f"with {recipe.to_dict()}")
        self.k = min(top_k, len(self.artifact.labels))
        gpus = tf.config.list_logical_devices("GPU")
        self.device = gpus[0].name if gpus else None
        self.device_batch = int(device_batch or (GPU_BATCH if gpus else CPU_BATCH))
        self._call = self.artifact.top_k_call(self.k)
        # Traced now (one image), so that ready() means ready to score.
        size = self.artifact.image_size
        self._call(np.zeros((1, size, size, 3), np.uint8))

    def ready(self) -> dict:
        """{"ok": True} once the model is loaded and compiled, else {"ok":
        False, "message": why, "usage": whether it is the model's fault}."""
        return {"ok": True} if self.load_error is None else {"ok": False, **self.load_error}

    def _check(self) -> None:
        if self.load_error is not None:
            raise RuntimeError(self.load_error["message"])

    def _stage(self, images: np.ndarray):
        """The uint8 images on the device: the copy runs while the device may
        still be busy with the other call's batch."""
        import tensorflow as tf

        if self.device is None:
            return tf.convert_to_tensor(images)
        with tf.device(self.device):
            return tf.identity(tf.convert_to_tensor(images))

    def top_k(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, size, size, 3] -> (indices int32 [N, k], probabilities
        float32 [N, k]), in device calls of at most ``device_batch`` images."""
        self._check()
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"uint8 images expected, got {images.dtype}")
        index = np.empty((len(images), self.k), np.int32)
        scores = np.empty((len(images), self.k), np.float32)
        for start in range(0, len(images), self.device_batch):
            staged = self._stage(images[start : start + self.device_batch])
            with self._lock:
                top, probs = self._call(staged)
                top, probs = top.numpy(), probs.numpy()
            index[start : start + len(top)] = top
            scores[start : start + len(top)] = probs
        return index, scores

    def score(self, ok: np.ndarray, *images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices int32 [N, k], probabilities float32 [N, k]) of a batch
        of N rows: ``images`` (uint8, one array per decode task, concatenated in
        order) hold the rows where ``ok``, one image each; -1 and 0 elsewhere."""
        self._check()
        ok = np.asarray(ok, bool)
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        if len(batch) != int(ok.sum()):
            raise ValueError(f"{len(batch)} images for {int(ok.sum())} decoded rows")
        index = np.full((len(ok), self.k), -1, np.int32)
        scores = np.zeros((len(ok), self.k), np.float32)
        if ok.any():
            index[ok], scores[ok] = self.top_k(batch)
        return index, scores

    def __call__(self, batch: dict) -> dict:
        errors = np.asarray(batch["error"], dtype=object)
        ok = errors == NO_ERROR
        index, scores = self.score(ok, np.asarray(batch["image"])[ok])
        return {"uri": batch["uri"], "top_k_index": index, "top_k_scores": scores, "error": errors}
