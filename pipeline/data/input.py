"""The tf.data input pipeline over prepared shards, in small steps:
``assign_records`` and ``epoch_plan`` (which records a worker reads, and in
which epoch), ``decode_example`` (record to uint8 image + label) and
``augment`` / ``resize`` (one resample per image). ``train_input`` and
``validation_input`` build a Ray Train worker's datasets; ``make_dataset``
reads every record of local files or a ``ShardStream`` in one process
(evaluation, the promotion gate, tools). Records that do not decode are
skipped and counted. No Ray imports: testable in plain pytest.

Images leave this module as float32 RGB in [0, 255] at the model's size; the
model itself scales them to [-1, 1] (see pipeline.training.model), so training and
scoring share one preprocessing definition that travels with the model. The
augmented training input is the exception: uint8 records and their random
transforms, resampled inside the training step on the device (``augment_batch``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import tensorflow as tf

from pipeline.data import preprocess
from pipeline.data.shards import ENCODED, LABEL

AUTOTUNE = tf.data.AUTOTUNE


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Global steps in an epoch: every example once, the remainder of less
    than one global batch left out (a different remainder each epoch, see
    ``epoch_plan``); at least one step. Every worker runs the same number of
    steps (collectives must line up)."""
    return max(1, num_examples // global_batch)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive records of one shard: ``count`` records from the
    ``start``-th on, whose split-wide ids (records numbered in manifest order)
    start at ``first_id``."""

    shard: int
    start: int
    count: int
    first_id: int


def assign_records(shard_examples: Sequence[int], rank: int, world: int) -> tuple[Segment, ...]:
    """This rank's records of a split: the split's records numbered in manifest
    order, cut into ``world`` contiguous ranges whose sizes differ by at most
    one (lower ranks take the extra). Disjoint and complete whatever the shard
    count and sizes; a worker reads only the shards its range touches (whole
    ones, plus at most two partly)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    total = sum(shard_examples)
    base, extra = divmod(total, world)
    begin = rank * base + min(rank, extra)
    end = begin + base + (1 if rank < extra else 0)
    out, offset = [], 0
    for shard, n in enumerate(shard_examples):
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            out.append(Segment(shard, lo - offset, hi - lo, lo))
        offset += n
    return tuple(out)


def epoch_plan(segments: Sequence[Segment], records: int, epoch: int, seed: int,
               rank: int) -> list[tuple[int, int, int]]:
    """(segment index, first record, records) read by this rank in ``epoch``,
    the first record counted from the segment's start: its segments in an
    order shuffled per (seed, rank, epoch), until ``records`` are planned. The
    few records a rank holds beyond its share of whole global batches are left
    out of the last segment planned, at a random place: a different set each
    epoch. A rank holding fewer records than ``records`` (a split smaller than
    one global batch) reads some twice."""
    rng = random.Random(f"{seed}:{rank}:{epoch}")
    order = list(range(len(segments)))
    rng.shuffle(order)
    out: list[tuple[int, int, int]] = []
    left = records
    while left > 0 and order:
        for i in order:
            count = segments[i].count
            take = min(count, left)
            if take <= 0:
                break
            out.append((i, rng.randrange(count - take + 1), take))
            left -= take
    return out


def epoch_passes(segments: Sequence[Segment], records: int, seed: int, rank: int):
    """The ``passes`` of this rank's ``ShardStream``: epoch -> segment indices, as ``epoch_plan``."""
    return lambda epoch: [i for i, _, _ in epoch_plan(segments, records, epoch, seed, rank)]


def record_key(seed: int, rank, epoch, record) -> tf.Tensor:
    """The stateless random key of one record's augmentation: a function of
    (seed, rank, epoch, record id) only, so two runs with the same seed and
    workers train on the same pixels, whichever thread decoded what."""
    key = tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)
    for part in (rank, epoch, record):
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(part, tf.int64))
    return key


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


def augment(image: tf.Tensor, size: int, aug: dict, key: tf.Tensor) -> tf.Tensor:
    """Random rotation, shift, shear, zoom and flip, and the resize to ``size``,
    as one projective resample of the decoded image (ImageDataGenerator's
    semantics: rotation and shear in degrees, shifts and zoom as fractions).

    Bilinear sampling only looks at the 4 nearest pixels, so shrinking by much
    more than 2x would alias. A side over ``AUGMENT_MAX_SHRINK`` x ``size`` is
    therefore first brought down to that by the area average of
    ``pipeline.data.preprocess.resize_images`` (same centre-aligned geometry, so the
    random transform means the same thing); smaller images are resampled
    directly, as before.

    The random draws are stateless, from ``key`` (``record_key``): the same
    record, epoch and seed give the same pixels. The training input runs the
    same transform on the device instead (``device_record`` + ``augment_batch``)."""
    limit = AUGMENT_MAX_SHRINK * size
    shape = tf.shape(image)
    image = tf.cond(
        tf.reduce_max(shape[:2]) > limit,
        lambda: preprocess.resize_images(image[tf.newaxis], tf.minimum(shape[0], limit),
                                         tf.minimum(shape[1], limit))[0],
        lambda: tf.cast(image, tf.float32),
    )
    shape = tf.shape(image)
    transform = augment_transform(key, shape[0], shape[1], size, aug)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform[tf.newaxis],
        output_shape=tf.stack([size, size]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    return tf.clip_by_value(tf.ensure_shape(out, [size, size, 3]), 0.0, 255.0)


def augment_transform(key: tf.Tensor, height, width, size: int, aug: dict) -> tf.Tensor:
    """The 8 projective parameters (ImageProjectiveTransform's layout) of one
    record's random transform, drawn statelessly from ``key``, for a source of
    ``height`` x ``width`` resampled to ``size`` x ``size``."""
    in_h, in_w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    s = tf.cast(size, tf.float32)

    keys = tf.random.experimental.stateless_split(key, num=7)

    def draw(n: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([], keys[n], low, high)

    def uniform(n: int, limit: float) -> tf.Tensor:
        return draw(n, -limit, limit) if limit else tf.constant(0.0)

    theta = uniform(0, aug["rotation"]) * (math.pi / 180.0)
    shear = uniform(1, aug["shear"]) * (math.pi / 180.0)
    zoom = aug["zoom"]
    zx = draw(2, 1.0 - zoom, 1.0 + zoom) if zoom else tf.constant(1.0)
    zy = draw(3, 1.0 - zoom, 1.0 + zoom) if zoom else tf.constant(1.0)
    flip = tf.where(draw(4, 0.0, 1.0) < 0.5, -1.0, 1.0) if aug["horizontal_flip"] else tf.constant(1.0)
    tx = uniform(5, aug["width_shift"]) * in_w
    ty = uniform(6, aug["height_shift"]) * in_h

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
    return tf.stack([a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1], 0.0, 0.0])


# ---------------------------------------------------------------- augmentation on the device
#
# The training input leaves tf.data as uint8: each decoded record on a fixed
# canvas of AUGMENT_MAX_SHRINK x size squared (zero padded), with its height
# and width and the 8 parameters of its random transform (``augment_transform``,
# a few scalar ops drawn from its key on the host: XLA's stateless random
# numbers differ from the kernels', and the draws must not depend on where
# they run). ``augment_batch`` then does the resample, the costly part,
# inside the training step on the accelerator: augment's bilinear resample with
# edge (NEAREST) fill, written with gathers so that XLA compiles it
# (ImageProjectiveTransformV3 has no XLA kernel).


def canvas_side(size: int) -> int:
    """The side of the square uint8 canvas a training record travels on."""
    return AUGMENT_MAX_SHRINK * size


def device_record(image: tf.Tensor, size: int, aug: dict, key: tf.Tensor) -> dict:
    """A decoded uint8 image -> what the host sends for ``augment_batch``:
    ``pixels`` (uint8, at most ``canvas_side`` per side: a source larger than
    that is shrunk by augment's area average, rounded to uint8), ``shape``
    (its height and width) and ``transform`` (drawn from ``key``). Padded to
    the canvas when batched (``device_padding``)."""
    limit = canvas_side(size)
    shape = tf.shape(image)
    image = tf.cond(
        tf.reduce_max(shape[:2]) > limit,
        lambda: tf.cast(tf.round(preprocess.resize_images(image[tf.newaxis], tf.minimum(shape[0], limit),
                                                          tf.minimum(shape[1], limit))[0]), tf.uint8),
        lambda: image,
    )
    shape = tf.shape(image)[:2]
    return {"pixels": image, "shape": shape, "transform": augment_transform(key, shape[0], shape[1], size, aug)}


def device_padding(size: int) -> dict:
    side = canvas_side(size)
    return {"pixels": [side, side, 3], "shape": [2], "transform": [8]}


def is_device_batch(images) -> bool:
    return isinstance(images, dict) and "transform" in images


def augment_batch(batch: dict, size: int) -> tf.Tensor:
    """``device_record`` batches -> float32 [N, size, size, 3] in [0, 255]:
    ``augment`` of every image, run where the training step runs (on CPU
    bit-identical to ``augment`` for sources up to ``canvas_side``). Static
    shapes and plain gathers: compiles with XLA."""
    return _resample(batch["pixels"], tf.cast(batch["shape"], tf.int32), batch["transform"], size)


def _resample(pixels: tf.Tensor, shapes: tf.Tensor, transforms: tf.Tensor, size: int) -> tf.Tensor:
    """ImageProjectiveTransformV3 (affine, BILINEAR, fill_mode NEAREST) of each
    image ``pixels[i, :h, :w]``, in the kernel's order of operations:
    coordinates clamped into the image, then bilinear weights against the 4
    neighbours (a neighbour past the edge weighs 0)."""
    side = tf.shape(pixels)[1:3]
    o = tf.range(size, dtype=tf.float32)
    ox, oy = o[tf.newaxis, tf.newaxis, :], o[tf.newaxis, :, tf.newaxis]
    t = transforms[:, :, tf.newaxis, tf.newaxis]
    in_x = t[:, 0] * ox + t[:, 1] * oy + t[:, 2]
    in_y = t[:, 3] * ox + t[:, 4] * oy + t[:, 5]
    h = tf.cast(shapes[:, 0], tf.float32)[:, tf.newaxis, tf.newaxis]
    w = tf.cast(shapes[:, 1], tf.float32)[:, tf.newaxis, tf.newaxis]
    x = tf.minimum(tf.maximum(in_x, 0.0), w - 1.0)
    y = tf.minimum(tf.maximum(in_y, 0.0), h - 1.0)
    x0, y0 = tf.floor(x), tf.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0

    # One gather of pixel rows from the flattened batch (about twice as fast
    # as gather_nd with batch_dims where XLA does not fuse it), as int32:
    # TensorFlow's GPU gather kernels take no uint8 (without XLA the op would
    # fall back to the host).
    rows = tf.reshape(tf.cast(pixels, tf.int32), [-1, 3])
    first = (tf.range(tf.shape(pixels)[0]) * side[0] * side[1])[:, tf.newaxis, tf.newaxis]

    def read(yy, xx):
        # Coordinates are >= 0. Past the image lies zero padding, or (at the
        # canvas edge) a clamped read: either way weighted by 0, as the
        # kernel's fill value.
        iy = tf.minimum(tf.cast(yy, tf.int32), side[0] - 1)
        ix = tf.minimum(tf.cast(xx, tf.int32), side[1] - 1)
        return tf.cast(tf.gather(rows, first + iy * side[1] + ix), tf.float32)

    def e(v):
        return v[..., tf.newaxis]

    top = e(x1 - x) * read(y0, x0) + e(x - x0) * read(y0, x1)
    bottom = e(x1 - x) * read(y1, x0) + e(x - x0) * read(y1, x1)
    out = e(y1 - y) * top + e(y - y0) * bottom
    return tf.clip_by_value(tf.ensure_shape(out, [None, size, size, 3]), 0.0, 255.0)


def make_dataset(
    files,
    *,
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
    """Batches of float32 images in [0, 255] and int32 labels over every record
    of ``files``, in one process.

    ``files`` is a list of local TFRecord paths, or a
    ``pipeline.data.shard_stream.ShardStream`` that fetches its shards as they
    are needed (it then decides the order and repetition). Validation
    (``training=False``) is never augmented nor shuffled.

    A record that fails to decode is skipped, never an error. With ``counted``
    each element is ``(images, labels, weights, skipped)``: ``weights`` from
    ``class_weights`` (indexed by label; 1 when None) and ``skipped`` the number
    of undecodable records dropped just before each image, so a train step can
    count both. Without it, ``(images, labels)``.

    ``recipe`` (validation only) decodes and resizes as that recipe says: the
    promotion gate judges an older production model with the IDCT and resize
    it was trained with. Default: today's recipe."""
    from pipeline.data.shard_stream import ShardStream

    if isinstance(files, ShardStream):
        paths = tf.data.Dataset.from_generator(files.paths, output_signature=tf.TensorSpec([], tf.string))
        num_paths = len(files.refs)
    else:
        num_paths = len(files)
        paths = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string)) if files else \
            tf.data.Dataset.from_tensor_slices(tf.constant([], tf.string))
        if training and num_paths > 1:
            paths = paths.shuffle(num_paths, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            paths = paths.repeat()
    # Validation reads in order; training too when seeded (data.seed: the same
    # batches in every run, whichever reader thread is faster). Unseeded
    # training takes records as they come.
    ordered = not training or seed is not None
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

    aug_seed = seed if seed is not None else random.getrandbits(62)

    def _load(serialized, index):
        image, label = decode_example(serialized, dct_method)
        if use_aug:
            image = augment(image, image_size, aug, record_key(aug_seed, 0, 0, index))
        else:
            image = resize(image, image_size, resize_method)
        return image, label

    if counted:
        table = tf.constant(list(class_weights) if class_weights else [1.0], tf.float32)

        def _load_numbered(index, serialized):
            image, label = _load(serialized, index)
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
        ds = records.enumerate().map(lambda index, serialized: _load(serialized, index),
                                     num_parallel_calls=AUTOTUNE, deterministic=ordered).ignore_errors()
    ds = ds.batch(batch_size, drop_remainder=training)
    return _for_workers(ds)


# ---------------------------------------------------------------- distributed training input
#
# What a Ray Train worker reads (``pipeline.training.worker``): its own
# contiguous range of each split (``assign_records``), streamed shard by shard.


def _read_segment(path, start, count, first_id) -> tf.data.Dataset:
    """(record id, serialized record) of one planned segment."""
    records = read_records(path).skip(start).take(count)
    return tf.data.Dataset.zip((tf.data.Dataset.range(first_id, first_id + count), records))


def _permuted(batch, key):
    ids, records = batch
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(ids)[0]), seed=key)
    return tf.gather(ids, order), tf.gather(records, order)


_ITEM = (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64),
         tf.TensorSpec([], tf.int64))


def train_input(stream, segments: Sequence[Segment], *, records_per_epoch: int, first_epoch: int, seed: int,
                rank: int, image_size: int, batch_size: int, aug: Optional[dict], shuffle_buffer: int,
                read_parallelism: int, class_weights: Optional[Sequence[float]] = None,
                device_augment: bool = True, cpu_threads: Optional[int] = None) -> tf.data.Dataset:
    """This rank's endless training input, one epoch after another from
    ``first_epoch``: in each, exactly ``records_per_epoch`` of its records
    (``epoch_plan``: every global step then takes every example of the split
    at most once per epoch), shuffled within the epoch, augmented with a key of
    (seed, rank, epoch, record id), batched at ``batch_size`` (per replica).
    Shuffling permutes blocks of ``shuffle_buffer`` records, statelessly.

    ``stream`` is a ``ShardStream`` over ``segments``' shards whose ``passes``
    follow ``epoch_plan``. Elements are ``(images, labels, weights, skipped,
    real)``: ``skipped`` counts the undecodable records dropped before each
    image (counted, never derived), ``real`` is 1 (see ``validation_input``).
    Epochs never mix: shuffling and interleaving stay inside one epoch.

    With augmentation and ``device_augment`` (a GPU worker's input), ``images``
    is a ``device_record`` batch (uint8 canvas, shape, transform) that the
    training step augments on the device (``augment_batch``, wired by
    ``pipeline.training.model.count_inputs``); otherwise float32 images
    augmented or resized here. The dataset is infinite by declaration
    (``assert_cardinality``), so tf.distribute does not agree every step on
    whether data remains. ``cpu_threads``: its private thread pool."""
    use_aug = aug is not None and aug.get("enabled", False)
    table = tf.constant(list(class_weights) if class_weights else [1.0], tf.float32)

    def items(epoch):
        epoch = int(epoch)
        plan = epoch_plan(segments, records_per_epoch, epoch, seed, rank)
        for (i, path), (planned, offset, take) in zip(stream.pass_items(epoch), plan):
            assert i == planned, "the stream's passes must follow epoch_plan"
            s = segments[i]
            yield path, s.start + offset, take, s.first_id + offset

    def one_epoch(epoch):
        listed = tf.data.Dataset.from_generator(items, args=(epoch,), output_signature=_ITEM)
        records = listed.interleave(_read_segment, cycle_length=max(1, min(len(segments), read_parallelism)),
                                    num_parallel_calls=AUTOTUNE, deterministic=True)
        # Shuffled in blocks of shuffle_buffer records by a stateless
        # permutation keyed on (seed, rank, epoch, block): reproducible, and
        # independent of TensorFlow's global seed.
        blocks = records.batch(max(1, shuffle_buffer)).enumerate()
        records = blocks.map(lambda block, batch: _permuted(batch, record_key(seed, rank, epoch, -1 - block)))
        return records.unbatch().map(lambda rid, rec: (epoch, rid, rec))

    on_device = use_aug and device_augment

    def load(index, element):
        epoch, rid, serialized = element
        image, label = decode_example(serialized)
        if on_device:
            image = device_record(image, image_size, aug, record_key(seed, rank, epoch, rid))
        elif use_aug:
            image = augment(image, image_size, aug, record_key(seed, rank, epoch, rid))
        else:
            image = resize(image, image_size)
        return image, label, index

    def count_skipped(last, element):
        image, label, index = element
        weight = tf.gather(table, label) if class_weights else tf.constant(1.0)
        return index, (image, label, weight, index - last - 1, tf.constant(1.0))

    # Numbered before decoding and decoded in order: a gap in the numbers after
    # ignore_errors is exactly the records that failed.
    ds = tf.data.Dataset.range(first_epoch, 1 << 62).flat_map(one_epoch).enumerate()
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.scan(tf.constant(-1, tf.int64), count_skipped)
    if on_device:
        ds = ds.padded_batch(batch_size, padded_shapes=(device_padding(image_size), [], [], [], []),
                             drop_remainder=True)
    else:
        ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return _for_workers(ds, cpu_threads)


def validation_input(stream, segments: Sequence[Segment], *, image_size: int, batch_size: int, batches: int,
                     weight: float, read_parallelism: int, cpu_threads: Optional[int] = None) -> tf.data.Dataset:
    """One pass over this rank's validation records, in order, as exactly
    ``batches`` batches of ``batch_size``: every rank runs the same number of
    validation steps whatever its share (collectives line up), the last ones
    filled with padding whose ``real`` is 0 and weight 0. Real records weigh
    ``weight`` (padded size / real size of the whole split), which makes the
    weighted loss and accuracy Keras reports the means over the real records
    alone. Elements as in ``train_input``; a trailing undecodable record is
    counted too (a marker after the last record shows the gap)."""
    total = sum(s.count for s in segments)

    def items():
        for i, path in stream.pass_items(0):
            s = segments[i]
            yield path, s.start, s.count, s.first_id

    listed = tf.data.Dataset.from_generator(items, output_signature=_ITEM)
    records = listed.interleave(_read_segment, cycle_length=max(1, min(len(segments), read_parallelism)),
                                num_parallel_calls=AUTOTUNE, deterministic=True)

    def load(index, element):
        _, serialized = element
        image, label = decode_example(serialized)
        return resize(image, image_size), label, index

    blank = tf.zeros([image_size, image_size, 3], tf.float32)
    marker = tf.data.Dataset.from_tensors((blank, tf.constant(0, tf.int32), tf.constant(total, tf.int64)))
    ds = records.enumerate().map(load, num_parallel_calls=AUTOTUNE, deterministic=True).ignore_errors()

    def count_skipped(last, element):
        image, label, index = element
        real = tf.cast(index < total, tf.float32)
        return index, (image, label, real * weight, index - last - 1, real)

    ds = ds.concatenate(marker).scan(tf.constant(-1, tf.int64), count_skipped)
    padding = tf.data.Dataset.from_tensors((blank, tf.constant(0, tf.int32), tf.constant(0.0),
                                            tf.constant(0, tf.int64), tf.constant(0.0))).repeat()
    ds = ds.concatenate(padding).take(batches * batch_size).batch(batch_size, drop_remainder=True)
    return _for_workers(ds, cpu_threads)


def _for_workers(ds: tf.data.Dataset, cpu_threads: Optional[int] = None) -> tf.data.Dataset:
    options = tf.data.Options()
    if cpu_threads:
        # The worker's host CPU budget for its input (data.cpu_threads).
        options.threading.private_threadpool_size = cpu_threads
    # Each worker reads its own records (assign_records); tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)
