"""The model side of scoring: ``ScoringPredictor`` loads the model once and
turns decoded batches into top-k label indices and probabilities."""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.config import StorageConfig
from pipeline.data.preprocess import Recipe
from pipeline.scoring.decode import NO_ERROR


class ScoringPredictor:
    """``__call__`` scores one batch dict (the output of ``read_and_decode``),
    best first; ``score`` takes uint8 images (one or more arrays, as they come
    from several decode tasks) and the rows to score. A plain class: try it on
    a batch without Ray; the score job runs it as Ray actors."""

    def __init__(self, model_uri: str, storage: StorageConfig, top_k: int,
                 recipe: Optional[Recipe] = None, allow_unsafe: bool = False):
        from pipeline.artifact import load_artifact

        self.artifact = load_artifact(model_uri, storage, allow_unsafe=allow_unsafe)
        if recipe is not None and recipe != self.artifact.recipe:
            raise ValueError(f"{model_uri}: its preprocessing.json changed after the images were decoded "
                             f"with {recipe.to_dict()}")
        self.k = min(top_k, len(self.artifact.labels))

    def score(self, ok: np.ndarray, *images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices int32 [N, k], probabilities float32 [N, k]) of a batch
        of N rows: ``images`` (uint8, one array per decode task, concatenated in
        order) hold the rows where ``ok``, one image each; -1 and 0 elsewhere."""
        ok = np.asarray(ok, bool)
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        if len(batch) != int(ok.sum()):
            raise ValueError(f"{len(batch)} images for {int(ok.sum())} decoded rows")
        index = np.full((len(ok), self.k), -1, np.int32)
        scores = np.zeros((len(ok), self.k), np.float32)
        if ok.any():
            probs = self.artifact.predict_batch(np.asarray(batch, np.float32))
            top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
            index[ok] = top
            scores[ok] = np.take_along_axis(probs, top, axis=1)
        return index, scores

    def __call__(self, batch: dict) -> dict:
        errors = np.asarray(batch["error"], dtype=object)
        ok = errors == NO_ERROR
        index, scores = self.score(ok, np.asarray(batch["image"])[ok])
        return {"uri": batch["uri"], "top_k_index": index, "top_k_scores": scores, "error": errors}

    def ready(self) -> bool:
        return True
