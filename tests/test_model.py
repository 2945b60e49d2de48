"""The model alone, no Ray: phases, warm start, no-top weights from S3, GPU
switches on CPU, BatchNorm statistics re-estimation."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras

from pipeline import model as mdl
from pipeline.config import ModelConfig, PhaseConfig
from pipeline.train_loop import fetch_to_local

SIZE = 75
TINY = ModelConfig(weights="none", head_units=16)


def images(n=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def test_phases_freeze_what_the_recipe_says():
    model = mdl.build_model(3, SIZE, TINY)
    base = mdl.base_of(model)
    assert mdl.set_phase(model, "transfer") == 0
    assert not base.trainable
    assert {w.name for w in model.trainable_weights} <= {w.name for l in model.layers if l.name.startswith(("head", "pred")) for w in l.weights}
    trainable = mdl.set_phase(model, "finetune", "mixed8")
    names = [layer.name for layer in base.layers]
    cut = names.index("mixed8") + 1
    assert cut == 249  # the classic tutorial's "first 249 layers frozen"
    assert trainable == len(names) - 249
    assert all(not layer.trainable for layer in base.layers[:cut])
    assert all(layer.trainable for layer in base.layers[cut:])
    assert mdl.set_phase(model, "finetune", 172) == len(names) - 172
    with pytest.raises(ValueError, match="not a layer of InceptionV3"):
        mdl.set_phase(model, "finetune", "mixed99")


def test_warm_start_keeps_base_and_replaces_head_of_a_different_class_count(tmp_path):
    donor = mdl.build_model(5, SIZE, TINY)
    path = str(tmp_path / "donor.keras")
    donor.save(path)
    model = mdl.build_model(3, SIZE, TINY)
    before_head = model.get_layer("predictions").get_weights()[0].copy()
    report = mdl.warm_start(model, path)
    assert report["skipped"] == ["predictions"]
    for a, b in zip(mdl.base_of(model).get_weights(), mdl.base_of(donor).get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.get_layer("head_dense").get_weights()[0],
                                  donor.get_layer("head_dense").get_weights()[0])
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], before_head)


@pytest.mark.s3
def test_no_top_weights_from_s3_load_into_the_base(s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    source = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    local = str(tmp_path / "notop.h5")
    source.save_weights(local)
    fs.put_file(local, f"{bucket}/weights/notop.h5")
    from pipeline.config import StorageConfig

    fetched = fetch_to_local(f"s3://{bucket}/weights/notop.h5", StorageConfig())
    model = mdl.build_model(3, SIZE, ModelConfig(weights=f"s3://{bucket}/weights/notop.h5", head_units=16),
                            weights_file=fetched)
    for a, b in zip(mdl.base_of(model).get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_wrong_weights_file_is_a_clear_error(tmp_path):
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = str(tmp_path / "other.h5")
    other.save_weights(path)
    with pytest.raises(ValueError, match="does not fit InceptionV3 without top"):
        mdl.build_model(3, SIZE, ModelConfig(weights=path), weights_file=path)


def test_mixed_precision_and_xla_build_and_train_a_step_on_cpu():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mdl.build_model(3, SIZE, TINY)
        mdl.set_phase(model, "finetune", "mixed9")
        mdl.compile_for(model, PhaseConfig(optimizer="sgd", learning_rate=0.01), top_k=2, jit_compile=True)
        assert model.get_layer("head_dense").compute_dtype == "float16"
        assert model.get_layer("predictions").dtype == "float32"
        logs = model.train_on_batch(images(), np.array([0, 1, 2, 0]), return_dict=True)
        assert np.isfinite(logs["loss"])
        out = model.predict(images(2), verbose=0)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bn_statistics_are_re_estimated_from_batches():
    model = mdl.build_model(3, SIZE, TINY)
    mdl.set_phase(model, "transfer")
    bn = next(l for l in mdl.base_of(model).layers if isinstance(l, keras.layers.BatchNormalization))
    assert np.allclose(bn.moving_mean.numpy(), 0.0)
    batches = [images(4, seed) for seed in range(3)]
    used = mdl.recompute_bn_statistics(model, iter(batches))
    assert used == 3
    # the first BN follows the first conv: its moving mean is now the average of
    # that conv's batch means (no longer the initial zeros)
    base = mdl.base_of(model)
    first_conv = next(l for l in base.layers if isinstance(l, keras.layers.Conv2D))
    feats = keras.Model(base.input, first_conv.output)
    expected = np.mean([feats(b / 127.5 - 1.0).numpy().mean(axis=(0, 1, 2)) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-3, atol=1e-4)
    # flags and momentum are restored
    assert not mdl.base_of(model).trainable and bn.momentum == 0.99
