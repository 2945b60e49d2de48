"""The predictor that keeps an accelerator busy: uint8 batches cast and
scaled on the device with the same results as the float path, top-k there
with the stable sort's tie order, least-loaded dispatch between actors, one
clear error for a model that does not load, ``--concurrency`` the cluster
cannot place refused, and decode that overlaps reading with decoding."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.data.preprocess import current_recipe
from pipeline.scoring.predictor import ScoringPredictor
from tests import imagefactory as fx

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tests.small_model import write_run

    return write_run(tmp_path_factory.mktemp("run") / "run", CLASSES)


def float_path(artifact, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """How the predictor scored before: float32 on the host, the model, a
    stable descending sort."""
    probs = artifact.predict_batch(np.asarray(images, np.float32))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top.astype(np.int32), np.take_along_axis(probs, top, axis=1)


def test_uint8_on_the_device_equals_the_float_path_bit_for_bit(tiny_model, monkeypatch):
    predictor = ScoringPredictor(tiny_model, StorageConfig(), top_k=2, recipe=current_recipe(75), device_batch=16)
    artifact = predictor.artifact
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 75, 75, 3), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    expected_index, expected_scores = float_path(artifact, images, 2)

    # The host sends uint8, never the float32 batch (4x the bytes).
    monkeypatch.setattr(type(artifact), "predict_batch", lambda *a: pytest.fail("float32 path used"))
    spec = predictor._call.input_signature[0]
    assert spec.dtype.name == "uint8" and spec.shape.as_list() == [None, 75, 75, 3]

    index, scores = predictor.top_k(images)  # 40 images: device calls of 16, 16, 8
    assert index.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_array_equal(index, expected_index)
    assert scores.tobytes() == expected_scores.tobytes()  # bit for bit

    ok = np.ones(42, bool)
    ok[[3, 20]] = False
    index, scores = predictor.score(ok, images[:20], images[20:])
    np.testing.assert_array_equal(index[ok], expected_index)
    assert scores[ok].tobytes() == expected_scores.tobytes()
    assert (index[~ok] == -1).all() and (scores[~ok] == 0).all()
    with pytest.raises(TypeError, match="uint8"):
        predictor.top_k(images.astype(np.float32))


def test_top_k_on_the_device_orders_ties_as_the_stable_sort():
    from pipeline.artifact import top_k

    probs = np.array([[0.25, 0.25, 0.5, 0.0, 0.0],
                      [0.2, 0.2, 0.2, 0.2, 0.2],
                      [0.0, 0.1, 0.1, 0.4, 0.4],
                      [0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    for k in (1, 3, 5):
        index, values = top_k(probs, k)
        expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(index.numpy(), expected)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(probs, expected, axis=1))
