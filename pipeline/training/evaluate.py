"""Judge a model in inference mode on a split of prepared shards. Used by the
training job's final evaluation and by the registry's promotion gate, so both
compute the same numbers the same way."""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.config import Config
from pipeline.data.shard_stream import shard_refs


def split_stream(cfg: Config, manifest: dict, data: str, split: str, *, training: bool = False):
    """A split's shards streamed through this process's bounded, verified cache:
    one pass in order, or (``training``) endless shuffled passes."""
    from pipeline.training.worker import shard_stream, worker_cache

    refs = shard_refs(manifest, data, split)
    return shard_stream(worker_cache(cfg, "evaluation"), refs, cfg, training=training, seed=cfg.data.seed)


def eval_split(manifest: dict) -> str:
    return "validation" if manifest["splits"]["validation"]["num_examples"] else "train"


def predict_split(model, files, image_size: int, batch_size: int = 32, recipe=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over every decodable record of ``files`` (local
    paths or a ShardStream), once, in order, decoded and resized as ``recipe``
    (a ``pipeline.data.preprocess.Recipe``; default today's) says."""
    from pipeline.data import input as inp

    ds = inp.make_dataset(files, image_size=image_size, batch_size=batch_size, training=False, repeat=False,
                          recipe=recipe)
    labels, probs = [], []
    for images, y in ds:
        probs.append(model(images, training=False).numpy())
        labels.append(y.numpy())
    n_out = int(model.output_shape[-1])
    if not probs:
        return np.zeros(0, int), np.zeros((0, n_out), np.float32)
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model, cfg: Config, manifest: dict, data: str, *, labels: Optional[list[str]] = None,
             split: Optional[str] = None, recipe=None) -> dict:
    """Metrics of ``model`` on the manifest's evaluation split. ``labels`` are the
    model's own class names when they may differ from the manifest's (a
    production model trained on another class set): predictions are mapped by
    name, and images of classes the model does not know count as errors.
    ``recipe`` is the model's own ``preprocessing.json`` recipe: the records
    are decoded and resized the way that model was trained (an older model
    may use another JPEG IDCT or resize)."""
    from pipeline.training.reports import classification_metrics

    split = split or eval_split(manifest)
    size = int(model.input_shape[1])
    stream = split_stream(cfg, manifest, data, split)
    try:
        y, probs = predict_split(model, stream, size, max(cfg.data.batch_size, 32), recipe)
        stream.check()  # a shard that could not be read is an error, never a short split
    finally:
        stream.cache.close()
    classes = manifest["classes"]
    if labels is not None and list(labels) != list(classes):
        index = {name: i for i, name in enumerate(classes)}
        mapped = np.zeros((len(probs), len(classes)), np.float32)
        for j, name in enumerate(labels):
            if name in index:
                mapped[:, index[name]] = probs[:, j]
        probs = mapped
    metrics = classification_metrics(y, probs, classes, cfg.train.top_k)
    metrics["split"] = split
    # Undecodable records are skipped by the input pipeline, and counted here.
    metrics["skipped_records"] = manifest["splits"][split]["num_examples"] - len(y)
    return metrics
