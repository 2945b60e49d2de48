"""What an epoch is, counted by example identity: with any number of workers
and any split of shards (uneven shards, fewer shards than workers, a split
that no global batch divides), the ranks' training inputs of one epoch hold
every example at most once, together all of them but less than one global
batch, and the validation inputs hold every validation example exactly once
in the same number of batches on every rank. Augmentation is keyed on
(seed, rank, epoch, record): the same run twice gives the same pixels.

Each rank's input is built exactly as a Ray Train worker builds it
(``ShardStream`` over its segments, ``train_input`` / ``validation_input``),
here in one process, one rank after another; the records carry their id as
their label, so what a rank reads is read back from the batches."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import StorageConfig
from pipeline.data import input as inp
from pipeline.data.shard_stream import ShardCache, ShardRef, ShardStream
from pipeline.data.shards import make_example
from tests.test_input import jpeg

SIZE = 16
AUG = {"enabled": True, "rotation": 20.0, "width_shift": 0.1, "height_shift": 0.1, "shear": 5.0, "zoom": 0.1,
       "horizontal_flip": True}


def write_shards(tmp_path, counts: list[int], bad: frozenset = frozenset()) -> list[ShardRef]:
    """Shards whose records carry their split-wide id as label; ids in ``bad`` are undecodable."""
    refs, rid = [], 0
    for i, n in enumerate(counts):
        path = str(tmp_path / f"shard-{i}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for _ in range(n):
                data = b"not an image" if rid in bad else jpeg(rid % 250)
                w.write(make_example(data, rid, "c", f"id{rid}", SIZE, SIZE))
                rid += 1
        refs.append(ShardRef(path, __import__("os").path.getsize(path), None, n))
    return refs


def rank_train(tmp_path, refs, rank, world, *, per_replica, epochs, seed=7, first_epoch=0, aug=None):
    """The ids each epoch's batches of one rank hold (one replica per rank), and the images."""
    counts = [r.examples for r in refs]
    steps = inp.steps_per_epoch(sum(counts), per_replica * world)
    records = steps * per_replica
    segments = inp.assign_records(counts, rank, world)
    cache = ShardCache(str(tmp_path / f"cache-{rank}-{seed}-{first_epoch}"), StorageConfig())
    stream = ShardStream(cache, [refs[s.shard] for s in segments], shuffle=False, repeat=True,
                         passes=inp.epoch_passes(segments, records, seed, rank))
    ds = inp.train_input(stream, segments, records_per_epoch=records, first_epoch=first_epoch, seed=seed,
                         rank=rank, image_size=SIZE, batch_size=per_replica, aug=aug, shuffle_buffer=8,
                         read_parallelism=2)
    out = []
    batches = iter(ds)
    for _ in range(epochs):
        ids, images, skipped = [], [], 0
        for _ in range(steps):
            x, y, w, skip, real = next(batches)
            if inp.is_device_batch(x):  # uint8 records: the train step's augmentation
                assert x["pixels"].dtype == tf.uint8
                x = inp.augment_batch(x, SIZE)
            ids += [int(v) for v in y]
            images.append(x.numpy())
            skipped += int(tf.reduce_sum(skip))
            assert float(tf.reduce_min(real)) == 1.0
        out.append((ids, np.concatenate(images), skipped))
    cache.close()
    return out, steps


@pytest.mark.parametrize("counts,world,per_replica", [
    ([359, 360, 359, 360, 359], 2, 8),   # 5 shards over 2 workers (3 vs 2 shards)
    ([40, 7, 33, 21, 12, 5, 30], 3, 4),  # 7 uneven shards, 3 workers, 148 examples: 12 per global batch
    ([10, 11], 3, 2),                    # fewer shards than workers
    ([6, 6, 6, 6, 6], 5, 3),             # 5 workers
    ([9, 4, 17, 3, 8, 11, 5], 7, 1),     # 7 workers
])
def test_an_epoch_is_every_training_example_at_most_once(tmp_path, counts, world, per_replica):
    total = sum(counts)
    refs = write_shards(tmp_path, counts)
    per_rank = [rank_train(tmp_path, refs, r, world, per_replica=per_replica, epochs=2)[0] for r in range(world)]
    global_batch = per_replica * world
    dropped_sets = []
    for epoch in range(2):
        ids = list(itertools.chain.from_iterable(per_rank[r][epoch][0] for r in range(world)))
        assert len(ids) == len(set(ids)), f"epoch {epoch}: an example trained twice"
        assert total - global_batch < len(ids) <= total, (len(ids), total)
        assert set(ids) <= set(range(total))
        dropped_sets.append(set(range(total)) - set(ids))
    if total % global_batch >= 2:
        # The remainder left out is not the same records every epoch.
        assert dropped_sets[0] != dropped_sets[1]


def test_the_epoch_distinct_fraction_on_the_split_that_used_to_repeat_fourteen_percent(tmp_path):
    """5 shards of 359-360 over 2 workers: before, 1,543 distinct of 1,797 (0.859)."""
    counts = [359, 360, 359, 360, 359]
    refs = write_shards(tmp_path, counts)
    ids = []
    for rank in range(2):
        ids += rank_train(tmp_path, refs, rank, 2, per_replica=16, epochs=1)[0][0][0]
    assert len(set(ids)) == len(ids) and len(set(ids)) / sum(counts) >= 0.99


def test_a_bad_training_record_is_counted_where_it_is_dropped(tmp_path):
    counts, bad = [8, 8], frozenset({3, 12})
    refs = write_shards(tmp_path, counts, bad)
    epochs = [rank_train(tmp_path, refs, r, 2, per_replica=4, epochs=1)[0][0] for r in range(2)]
    skipped = sum(e[2] for e in epochs)
    ids = [i for e in epochs for i in e[0]]
    assert not set(ids) & bad
    # 16 records, 2 steps of 8: the bad ones are counted by the steps that skip them.
    assert skipped == 2


def test_augmentation_is_reproducible_and_differs_by_epoch(tmp_path):
    refs = write_shards(tmp_path, [12, 12])
    one, _ = rank_train(tmp_path, refs, 0, 1, per_replica=4, epochs=2, aug=AUG)
    two, _ = rank_train(tmp_path, refs, 0, 1, per_replica=4, epochs=2, aug=AUG)
    for (ids_a, img_a, _), (ids_b, img_b, _) in zip(one, two):
        assert ids_a == ids_b
        np.testing.assert_array_equal(img_a, img_b)
    # The same record in another epoch gets another transform.
    first = dict(zip(one[0][0], one[0][1]))
    second = dict(zip(one[1][0], one[1][1]))
    common = set(first) & set(second)
    assert common and any(not np.array_equal(first[i], second[i]) for i in common)


def test_a_resumed_epoch_reads_what_the_first_attempt_read(tmp_path):
    refs = write_shards(tmp_path, [10, 14, 9])
    whole, _ = rank_train(tmp_path, refs, 1, 2, per_replica=3, epochs=3, aug=AUG)
    resumed, _ = rank_train(tmp_path, refs, 1, 2, per_replica=3, epochs=1, first_epoch=2, aug=AUG)
    assert whole[2][0] == resumed[0][0]
    np.testing.assert_array_equal(whole[2][1], resumed[0][1])


def test_record_keys_differ_by_rank_epoch_record_and_seed():
    keys = {tuple(inp.record_key(s, r, e, i).numpy()) for s in (0, 1) for r in (0, 1) for e in (0, 1)
            for i in (0, 1)}
    assert len(keys) == 16


@pytest.mark.parametrize("counts,world,per_replica,bad", [
    ([2, 2, 2], 2, 2, frozenset()),          # 3 shards over 2 workers
    ([120, 100, 106], 3, 8, frozenset({5})),  # 326 over 3: the split that failed in validation
    ([4], 3, 4, frozenset({3})),              # fewer shards than workers, the last record bad
    ([5, 6, 7, 1, 2], 5, 1, frozenset()),
])
def test_validation_reads_every_example_once_in_equal_steps_on_every_rank(tmp_path, counts, world, per_replica,
                                                                          bad):
    total = sum(counts)
    refs = write_shards(tmp_path, counts, bad)
    steps = max(1, math.ceil(math.ceil(total / world) / per_replica))
    weight = steps * per_replica * world / total
    ids, skipped, batches, weights = [], 0, [], []
    for rank in range(world):
        segments = inp.assign_records(counts, rank, world)
        cache = ShardCache(str(tmp_path / f"vcache-{rank}"), StorageConfig())
        stream = ShardStream(cache, [refs[s.shard] for s in segments], shuffle=False, repeat=False)
        ds = inp.validation_input(stream, segments, image_size=SIZE, batch_size=per_replica, batches=steps,
                                  weight=weight, read_parallelism=2)
        for _ in range(2):  # one pass per epoch, twice
            got = list(ds)
        batches.append(len(got))
        for x, y, w, skip, real in got:
            assert x.shape == (per_replica, SIZE, SIZE, 3)
            ids += [int(v) for v, r in zip(y, real) if r > 0]
            weights += [float(v) for v in w]
            skipped += int(tf.reduce_sum(skip))
        cache.close()
    assert batches == [steps] * world
    assert sorted(ids) == sorted(set(range(total)) - bad)
    assert skipped == len(bad)
    # Real images weigh what makes the weighted mean the mean over real images.
    assert sum(weights) == pytest.approx(weight * (total - len(bad)))


def test_seed_zero_with_the_global_seed_set_as_the_worker_sets_it(tmp_path):
    """The worker seeds TensorFlow (keras.utils.set_random_seed(data.seed))
    before it builds its input: seed 0 must work there too."""
    tf.random.set_seed(0)
    try:
        refs = write_shards(tmp_path, [5, 7])
        epochs, _ = rank_train(tmp_path, refs, 0, 1, per_replica=4, epochs=1, seed=0, aug=AUG)
        assert len(set(epochs[0][0])) == 12
    finally:
        tf.random.set_seed(None)


def test_class_weights_reach_the_loss_the_train_step_computes(tmp_path):
    """``train.class_weights`` as the worker passes them (a table by label):
    the loss a train step reports is the class-weighted mean, not the plain one."""
    import tf_keras as keras

    from pipeline.config import PhaseConfig
    from pipeline.training import model as mdl

    refs = write_shards(tmp_path, [4, 4])  # labels are the record ids 0..7
    table = [3.0 if i % 2 == 0 else 0.5 for i in range(8)]

    def first_step_loss(class_weights):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
                                  keras.layers.Flatten(), keras.layers.Dense(8, activation="softmax")])
        mdl.compile_for(model, PhaseConfig(optimizer="sgd", learning_rate=0.0, momentum=0.0), top_k=1)
        mdl.count_inputs(model)
        segments = inp.assign_records([4, 4], 0, 1)
        cache = ShardCache(str(tmp_path / f"cw-{class_weights is None}"), StorageConfig())
        stream = ShardStream(cache, [refs[s.shard] for s in segments], shuffle=False, repeat=True,
                             passes=inp.epoch_passes(segments, 8, 1, 0))
        ds = inp.train_input(stream, segments, records_per_epoch=8, first_epoch=0, seed=1, rank=0, image_size=SIZE,
                             batch_size=8, aug=None, shuffle_buffer=1, read_parallelism=1,
                             class_weights=class_weights)
        x, y, w, _, _ = next(iter(ds))
        logged = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history["loss"][0]
        per_example = keras.losses.sparse_categorical_crossentropy(y, model(x)).numpy()
        cache.close()
        return logged, per_example, w.numpy(), y.numpy()

    plain, per_example, ones, _ = first_step_loss(None)
    weighted, per_example_w, w, y = first_step_loss(table)
    np.testing.assert_allclose(per_example, per_example_w, rtol=1e-6)  # the same model, the same batch
    assert list(ones) == [1.0] * 8 and list(w) == [table[i] for i in y]
    assert plain == pytest.approx(float(np.mean(per_example)), rel=1e-5)
    assert weighted == pytest.approx(float(np.sum(w * per_example) / len(w)), rel=1e-5)
    assert weighted != pytest.approx(plain, rel=1e-3)
