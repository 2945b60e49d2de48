"""The tf.data pipeline alone, no Ray: exact pixels without augmentation,
unaugmented validation, the one-resample augmentation (which records each
worker reads, and when: tests/test_epochs.py)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.data import input as inp
from pipeline.data import preprocess
from pipeline.data.shards import make_example

SIZE = 32
AUG_ON = {"enabled": True, "rotation": 30, "width_shift": 0.2, "height_shift": 0.2, "shear": 10,
          "zoom": 0.2, "horizontal_flip": True}


def jpeg(seed: int, size=(SIZE, SIZE)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(tmp_path, counts: list[int], size=(SIZE, SIZE)) -> list[str]:
    """Shards whose records carry a unique id as their label."""
    files, rid = [], 0
    for i, n in enumerate(counts):
        path = str(tmp_path / f"train-{i:05d}-of-{len(counts):05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for _ in range(n):
                w.write(make_example(jpeg(rid, size), rid, "c", f"id{rid}", size[1], size[0]))
                rid += 1
        files.append(path)
    return files


def test_steps_per_epoch_leaves_out_less_than_one_global_batch_and_is_never_zero():
    assert inp.steps_per_epoch(10, 4) == 2
    assert inp.steps_per_epoch(12, 4) == 3
    assert inp.steps_per_epoch(1, 64) == 1


def decoded(data: bytes) -> np.ndarray:
    """The recipe's decoder: JPEG with the accurate IDCT (what Pillow decodes)."""
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy().astype(np.float32)


def test_augmentation_off_gives_exact_pixels(tmp_path):
    files = write_shards(tmp_path, [6])
    ds = inp.make_dataset(files, image_size=SIZE, batch_size=6,
                          training=True, aug={**AUG_ON, "enabled": False}, shuffle_buffer=1, repeat=False)
    images, labels = next(iter(ds))
    for image, rid in zip(images.numpy(), labels.numpy()):
        np.testing.assert_array_equal(image, decoded(jpeg(int(rid))))


def test_validation_is_never_augmented(tmp_path):
    files = write_shards(tmp_path, [5])
    runs = []
    for _ in range(2):
        ds = inp.make_dataset(files, image_size=SIZE, batch_size=5,
                              training=False, aug=AUG_ON, repeat=False)
        images, labels = next(iter(ds))
        runs.append(images.numpy())
        assert labels.numpy().tolist() == [0, 1, 2, 3, 4]  # not shuffled either
        for image, rid in zip(images.numpy(), labels.numpy()):
            np.testing.assert_array_equal(image, decoded(jpeg(int(rid))))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_flip_only_is_an_exact_mirror_and_happens_both_ways():
    image = tf.constant(decoded(jpeg(7)).astype(np.uint8))
    aug = {**AUG_ON, "rotation": 0, "width_shift": 0, "height_shift": 0, "shear": 0, "zoom": 0}
    original, mirrored = image.numpy().astype(np.float32), image.numpy()[:, ::-1].astype(np.float32)
    kinds = set()
    for i in range(24):
        out = inp.augment(image, SIZE, aug, inp.record_key(0, 0, 0, i)).numpy()
        if np.array_equal(out, original):
            kinds.add("same")
        elif np.allclose(out, mirrored, atol=1e-3):
            kinds.add("mirror")
        else:
            pytest.fail("flip-only augmentation resampled the image")
    assert kinds == {"same", "mirror"}


def test_augment_is_one_resample_to_the_model_size():
    big = tf.constant(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    outs = [inp.augment(big, 75, AUG_ON, inp.record_key(0, 0, 0, i)).numpy() for i in range(4)]
    for out in outs:
        assert out.shape == (75, 75, 3) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 255.0
    assert not np.allclose(outs[0], outs[1])  # random per image
    # with every range at zero it is exactly the plain resize's geometry (centre-aligned)
    still = {**AUG_ON, "rotation": 0, "width_shift": 0, "height_shift": 0, "shear": 0, "zoom": 0,
             "horizontal_flip": False}
    same = inp.augment(tf.constant(decoded(jpeg(3)).astype(np.uint8)), SIZE, still, inp.record_key(0, 0, 0, 0)).numpy()
    np.testing.assert_allclose(same, decoded(jpeg(3)), atol=1e-3)


def test_augment_runs_inside_tf_data_graph(tmp_path):
    files = write_shards(tmp_path, [4], size=(48, 40))
    ds = inp.make_dataset(files, image_size=SIZE, batch_size=2,
                          training=True, aug=AUG_ON, shuffle_buffer=4)
    images, labels = next(iter(ds))
    assert images.shape == (2, SIZE, SIZE, 3) and labels.dtype == tf.int32


@pytest.mark.parametrize("shape", [(128, 96), (75, 75), (40, 200), (31, 17), (1, 1), (1000, 750)])
def test_scoring_resize_gives_the_pixels_of_the_pipeline_resize(shape):
    """Scoring and predict resize decoded images outside tf.data (scoring in
    groups of one shape); the model must see exactly what validation fed it,
    in tf.data's graph."""
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    others = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(*shape, 3), (20, 30, 3), (*shape, 3)]]
    for size in (75, 150):
        in_graph = tf.data.Dataset.from_tensors(image).map(lambda x: inp.resize(x, size))
        expected = next(iter(in_graph)).numpy()
        np.testing.assert_array_equal(inp.resize(tf.constant(image), size).numpy(), expected)
        batch = [image, *others]
        grouped = preprocess.resize_arrays(batch, size)
        assert grouped[0].dtype == np.float32 and grouped[0].shape == (size, size, 3)
        np.testing.assert_array_equal(grouped[0], expected)
        for one, out in zip(batch, grouped, strict=True):
            np.testing.assert_array_equal(out, inp.resize(tf.constant(one), size).numpy())


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_resize_does_not_alias_when_shrinking():
    """Pixel noise shrunk 13x: the area average makes it nearly flat grey;
    sampling 4 pixels per output pixel (bilinear, the old resize) keeps most of
    the noise, i.e. aliases it."""
    image = tf.constant(noise((1000, 975)))
    smooth = inp.resize(image, 75).numpy()
    aliased = preprocess.resize_image(image, 75, preprocess.BILINEAR).numpy()
    assert smooth.std() < 12 < 35 < aliased.std()
    assert abs(smooth.mean() - 127.5) < 2


def test_augment_does_not_alias_a_much_larger_image():
    """augment with every range at zero is the plain resize's geometry; on a
    source much larger than the model size it shrinks antialiased first, so it
    does not alias either (a bare bilinear resample would)."""
    still = {**AUG_ON, "rotation": 0, "width_shift": 0, "height_shift": 0, "shear": 0, "zoom": 0,
             "horizontal_flip": False}
    image = tf.constant(noise((1000, 975), seed=1))
    out = inp.augment(image, 75, still, inp.record_key(0, 0, 0, 0)).numpy()
    assert out.shape == (75, 75, 3) and out.std() < 12
    plain = inp.resize(image, 75).numpy()
    assert np.abs(out - plain).mean() < 3  # the same picture, nearly the same pixels
    wide = inp.augment(tf.constant(noise((40, 700), seed=2)), 75, still, inp.record_key(0, 0, 0, 0)).numpy()  # only the long side is over
    assert wide.shape == (75, 75, 3)
    np.testing.assert_allclose(wide.mean(axis=(0, 1)), inp.resize(tf.constant(noise((40, 700), seed=2)), 75)
                               .numpy().mean(axis=(0, 1)), atol=3)


def device_batch(images, size, aug, seed=1):
    """``device_record`` batches as train_input builds them (padded to the canvas)."""
    def gen():
        yield from ((im, i) for i, im in enumerate(images))

    ds = tf.data.Dataset.from_generator(gen, output_signature=(tf.TensorSpec([None, None, 3], tf.uint8),
                                                               tf.TensorSpec([], tf.int64)))
    ds = ds.map(lambda im, i: inp.device_record(im, size, aug, inp.record_key(seed, 0, 0, i)))
    return next(iter(ds.padded_batch(len(images), padded_shapes=inp.device_padding(size))))


def test_the_device_augmentation_gives_the_pixels_of_augment():
    """The training input ships uint8 and the train step resamples: on the
    same device the very pixels of ``augment``; under XLA (which compiles it)
    within float rounding. A source over the canvas is shrunk on the host and
    rounded to uint8 first: within half a grey level."""
    rng = np.random.default_rng(0)
    shapes = [(40, 50), (64, 64), (20, 31), (64, 10), (1, 1), (100, 70)]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    batch = device_batch(images, SIZE, AUG_ON)
    assert batch["pixels"].dtype == tf.uint8 and batch["pixels"].shape[1:] == (2 * SIZE, 2 * SIZE, 3)
    here = inp.augment_batch(batch, SIZE).numpy()
    xla = tf.function(lambda b: inp.augment_batch(b, SIZE), jit_compile=True)(batch).numpy()
    for i, image in enumerate(images):
        expected = inp.augment(tf.constant(image), SIZE, AUG_ON, inp.record_key(1, 0, 0, i)).numpy()
        if max(shapes[i]) <= 2 * SIZE:
            np.testing.assert_array_equal(here[i], expected)
        else:
            np.testing.assert_allclose(here[i], expected, atol=0.5)
        np.testing.assert_allclose(xla[i], here[i], atol=2e-3)


def test_the_training_input_is_uint8_and_infinite(tmp_path):
    """uint8 records out of tf.data (a quarter of float32's bytes per pixel),
    and a declared infinite length: tf.distribute then adds no per-step
    agreement on whether data remains (get_next_as_optional)."""
    from pipeline.config import StorageConfig
    from pipeline.data.shard_stream import ShardCache, ShardRef, ShardStream

    files = write_shards(tmp_path, [6], size=(48, 40))
    refs = [ShardRef(files[0], os.path.getsize(files[0]), None, 6)]
    segments = inp.assign_records([6], 0, 1)
    for device_augment, aug in ((True, AUG_ON), (False, AUG_ON), (True, None)):
        cache = ShardCache(str(tmp_path / f"cache-{device_augment}-{aug is None}"), StorageConfig())
        stream = ShardStream(cache, refs, shuffle=False, repeat=True, passes=inp.epoch_passes(segments, 6, 0, 0))
        ds = inp.train_input(stream, segments, records_per_epoch=6, first_epoch=0, seed=0, rank=0, image_size=SIZE,
                             batch_size=3, aug=aug, shuffle_buffer=4, read_parallelism=1,
                             device_augment=device_augment, cpu_threads=2)
        assert ds.cardinality() == tf.data.INFINITE_CARDINALITY
        assert ds.options().threading.private_threadpool_size == 2
        images = next(iter(ds))[0]
        if device_augment and aug:
            assert set(images) == {"pixels", "shape", "transform"} and images["pixels"].dtype == tf.uint8
        else:
            assert images.dtype == tf.float32 and images.shape == (3, SIZE, SIZE, 3)
        cache.close()
