"""The tf.data input pipeline over prepared shards, in three small steps:
``assign_shards`` (which records a worker reads), ``decode_example`` (record to
uint8 image + label) and ``augment`` / ``resize`` (one resample per image), then
``make_dataset`` (over local files or a worker's ``ShardStream``) skips and
counts records that do not decode, batches and prefetches. No Ray imports:
testable in plain pytest.

Images leave this module as float32 RGB in [0, 255] at the model's size; the
model itself scales them to [-1, 1] (see pipeline.training.model), so training and
scoring share one preprocessing definition that travels with the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import tensorflow as tf

from pipeline.data import preprocess
from pipeline.data.shards import ENCODED, LABEL

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class Assignment:
    """What one worker reads: whole shard files, and (when there are fewer shards
    than workers) every ``record_stride``-th record starting at ``record_offset``."""

    shards: tuple[int, ...]
    record_stride: int = 1
    record_offset: int = 0


def assign_shards(shard_examples: Sequence[int], rank: int, world: int) -> Assignment:
    """Disjoint and complete across ranks, balanced by examples: shards go,
    largest first, to the rank with the fewest examples so far (ties to the
    lower rank), so that every worker's pass is about N / world records. With
    fewer shards than workers every worker reads all shards and keeps its own
    stripe of records, so no worker is ever left without data."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    num_shards = len(shard_examples)
    if num_shards >= world:
        load = [0] * world
        owned: list[list[int]] = [[] for _ in range(world)]
        for i in sorted(range(num_shards), key=lambda i: (-shard_examples[i], i)):
            r = min(range(world), key=lambda r: (load[r], r))
            load[r] += shard_examples[i]
            owned[r].append(i)
        return Assignment(tuple(sorted(owned[rank])))
    return Assignment(tuple(range(num_shards)), record_stride=world, record_offset=rank)


def examples_for(assignment: Assignment, shard_examples: Sequence[int]) -> int:
    """How many records a worker sees per pass, from manifest counts alone."""
    if assignment.record_stride == 1:
        return sum(shard_examples[i] for i in assignment.shards)
    # Records are striped over the concatenation of all shards, in order.
    total = sum(shard_examples[i] for i in assignment.shards)
    return len(range(assignment.record_offset, total, assignment.record_stride))


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Every worker runs the same number of steps (collectives must line up);
    datasets repeat, so uneven shards never make a worker run dry."""
    return max(1, math.ceil(num_examples / global_batch))


# TFRecordDataset's own default (256 KiB), said explicitly: left unset, it logs
# a notice per file opened.
READ_BUFFER_BYTES = 256 * 1024


def read_records(path) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES)


def decode_example(serialized: tf.Tensor, dct_method: str = preprocess.ACCURATE) -> tuple[tf.Tensor, tf.Tensor]:
    """A shard record -> (uint8 HxWx3 image, int32 label), with the recipe's
    decoder (``pipeline.data.preprocess.decode_image``: JPEG with the accurate IDCT,
    else PNG): the pixels scoring gets from the original file. An older
    model's recipe may name another IDCT (``dct_method``)."""
    features = tf.io.parse_single_example(
        serialized,
        {ENCODED: tf.io.FixedLenFeature([], tf.string), LABEL: tf.io.FixedLenFeature([], tf.int64)},
    )
    image = preprocess.decode_image(features[ENCODED], dct_method)
    return image, tf.cast(features[LABEL], tf.int32)


def resize(image: tf.Tensor, size: int, method: str = preprocess.AREA_THEN_BILINEAR) -> tf.Tensor:
    """uint8 HxWx3 -> float32 size x size x 3 in [0, 255]: the one resize
    (``pipeline.data.preprocess.resize_image``: area average where it shrinks,
    bilinear where it enlarges), used for validation, evaluation and, through
    ``preprocess.resize_arrays``, bit for bit by scoring and predict."""
    return preprocess.resize_image(image, size, method)


# A source side more than this many times the model size is first shrunk to
# that many times (area average) before augment's bilinear resample.
AUGMENT_MAX_SHRINK = 2


def augment(image: tf.Tensor, size: int, aug: dict) -> tf.Tensor:
    """Random rotation, shift, shear, zoom and flip, and the resize to ``size``,
    as one projective resample of the decoded image (ImageDataGenerator's
    semantics: rotation and shear in degrees, shifts and zoom as fractions).

    Bilinear sampling only looks at the 4 nearest pixels, so shrinking by much
    more than 2x would alias. A side over ``AUGMENT_MAX_SHRINK`` x ``size`` is
    therefore first brought down to that by the area average of
    ``pipeline.data.preprocess.resize_images`` (same centre-aligned geometry, so the
    random transform means the same thing); smaller images are resampled
    directly, as before."""
    limit = AUGMENT_MAX_SHRINK * size
    shape = tf.shape(image)
    image = tf.cond(
        tf.reduce_max(shape[:2]) > limit,
        lambda: preprocess.resize_images(image[tf.newaxis], tf.minimum(shape[0], limit),
                                         tf.minimum(shape[1], limit))[0],
        lambda: tf.cast(image, tf.float32),
    )
    shape = tf.shape(image)
    in_h, in_w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    s = tf.cast(size, tf.float32)

    def uniform(limit: float) -> tf.Tensor:
        return tf.random.uniform([], -limit, limit) if limit else tf.constant(0.0)

    theta = uniform(aug["rotation"]) * (math.pi / 180.0)
    shear = uniform(aug["shear"]) * (math.pi / 180.0)
    zoom = aug["zoom"]
    zx = tf.random.uniform([], 1.0 - zoom, 1.0 + zoom) if zoom else tf.constant(1.0)
    zy = tf.random.uniform([], 1.0 - zoom, 1.0 + zoom) if zoom else tf.constant(1.0)
    flip = (
        tf.where(tf.random.uniform([]) < 0.5, -1.0, 1.0) if aug["horizontal_flip"] else tf.constant(1.0)
    )
    tx = uniform(aug["width_shift"]) * in_w
    ty = uniform(aug["height_shift"]) * in_h

    # Output pixel o (size x size) maps to input pixel c_in + A (o - c_out) + t,
    # A = scale_to_input @ rotation @ shear @ zoom @ flip.
    cos, sin = tf.cos(theta), tf.sin(theta)
    rot = tf.reshape(tf.stack([cos, -sin, sin, cos]), [2, 2])
    shr = tf.reshape(tf.stack([1.0, -tf.sin(shear), 0.0, tf.cos(shear)]), [2, 2])
    zf = tf.reshape(tf.stack([zx * flip, 0.0, 0.0, zy]), [2, 2])
    scale = tf.reshape(tf.stack([in_w / s, 0.0, 0.0, in_h / s]), [2, 2])
    a = scale @ rot @ shr @ zf
    c_out = (s - 1.0) / 2.0
    c_in = tf.stack([(in_w - 1.0) / 2.0, (in_h - 1.0) / 2.0])
    offset = c_in - tf.linalg.matvec(a, tf.stack([c_out, c_out])) + tf.stack([tx, ty])
    transform = tf.stack([a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1], 0.0, 0.0])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform[tf.newaxis],
        output_shape=tf.stack([size, size]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    return tf.clip_by_value(tf.ensure_shape(out, [size, size, 3]), 0.0, 255.0)


def make_dataset(
    files,
    *,
    assignment: Optional[Assignment] = None,
    image_size: int,
    batch_size: int,
    training: bool,
    aug: Optional[dict] = None,
    shuffle_buffer: int = 1000,
    repeat: bool = True,
    seed: Optional[int] = None,
    read_parallelism: int = 8,
    counted: bool = False,
    class_weights: Optional[Sequence[float]] = None,
    recipe: Optional[preprocess.Recipe] = None,
) -> tf.data.Dataset:
    """Batches of float32 images in [0, 255] and int32 labels for one worker.

    ``files`` is a list of local TFRecord paths indexed like the manifest's
    shards (``assignment`` picks this worker's; default all), or a
    ``pipeline.data.shard_stream.ShardStream`` that fetches this worker's shards as
    they are needed (it then decides the order and repetition; ``assignment``
    only contributes a record stripe). Validation (``training=False``) is never
    augmented nor shuffled.

    A record that fails to decode is skipped, never an error. With ``counted``
    each element is ``(images, labels, weights, skipped)``: ``weights`` from
    ``class_weights`` (indexed by label; 1 when None) and ``skipped`` the number
    of undecodable records dropped just before each image, so a train step can
    count both. Without it, ``(images, labels)``.

    ``recipe`` (validation only) decodes and resizes as that recipe says: the
    promotion gate judges an older production model with the IDCT and resize
    it was trained with. Default: today's recipe."""
    from pipeline.data.shard_stream import ShardStream

    assignment = assignment or Assignment(tuple(range(0 if isinstance(files, ShardStream) else len(files))))
    if isinstance(files, ShardStream):
        paths = tf.data.Dataset.from_generator(files.paths, output_signature=tf.TensorSpec([], tf.string))
        num_paths = len(files.refs)
    else:
        chosen = [files[i] for i in assignment.shards]
        num_paths = len(chosen)
        paths = tf.data.Dataset.from_tensor_slices(tf.constant(chosen, tf.string)) if chosen else \
            tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))
        if training and assignment.record_stride == 1 and num_paths > 1:
            paths = paths.shuffle(num_paths, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            paths = paths.repeat()
    # Validation reads in order; training too when seeded (data.seed: the same
    # batches in every run, whichever reader thread is faster). Unseeded
    # training takes records as they come.
    ordered = not training or seed is not None
    if assignment.record_stride > 1:
        # A fixed order, so that the workers' stripes stay disjoint.
        records = paths.flat_map(read_records).shard(assignment.record_stride, assignment.record_offset)
    else:
        records = paths.interleave(
            read_records,
            cycle_length=max(1, min(num_paths, read_parallelism)),
            num_parallel_calls=AUTOTUNE,
            deterministic=ordered,
        )
    if training:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    use_aug = training and aug is not None and aug.get("enabled", False)
    if recipe is not None and training:
        raise ValueError("a recipe other than today's is for evaluation only")
    dct_method = recipe.jpeg_dct_method if recipe else preprocess.ACCURATE
    resize_method = recipe.resize_method if recipe else preprocess.AREA_THEN_BILINEAR

    def _load(serialized):
        image, label = decode_example(serialized, dct_method)
        image = augment(image, image_size, aug) if use_aug else resize(image, image_size, resize_method)
        return image, label

    if counted:
        table = tf.constant(list(class_weights) if class_weights else [1.0], tf.float32)

        def _load_numbered(index, serialized):
            image, label = _load(serialized)
            return image, label, index

        def _count_skipped(last_index, element):
            image, label, index = element
            weight = tf.gather(table, label) if class_weights else tf.constant(1.0)
            return index, (image, label, weight, index - last_index - 1)

        # Records are numbered before decoding and decoded in order, so a gap in
        # the numbers after ignore_errors is exactly the records that failed.
        ds = records.enumerate().map(_load_numbered, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().scan(tf.constant(-1, tf.int64), _count_skipped)
    else:
        # Callers that need the number of skipped records take it from the
        # split's size (evaluation reads a split once).
        ds = records.map(_load, num_parallel_calls=AUTOTUNE, deterministic=ordered).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    # Each worker reads its own shards (assign_shards); tf.distribute must not
    # shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)
