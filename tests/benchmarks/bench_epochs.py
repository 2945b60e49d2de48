"""What an epoch trains on, counted by example identity inside the train step:
the training input of today's workers (``pipeline.data.input``:
``assign_records`` + ``epoch_plan`` / ``epoch_passes`` + ``train_input``)
against the previous one (commit b7c31a7: ``assign_shards`` + each worker's
endless shuffled ``ShardStream`` of its own shards through ``make_dataset``,
``ceil(N / global batch)`` steps per epoch), side by side in one run.

    python -m tests.benchmarks.run epochs
    BENCH_EPOCHS_QUICK=1 python -m tests.benchmarks.run epochs   # 2 workers, 1 epoch

Two training splits of uneven shards, local TFRecord files of 16x16 JPEGs whose
label is the record's split-wide id (records numbered in manifest order): 5
shards of 359/360/359/360/359 (the split on which the previous input was seen
to train 1,543 distinct of 1,797 in an epoch, settings not recorded) and 7 shards of 412/97/305/188/
356/41/263. For 1, 2 and 3 workers, one real Ray Train ``TensorflowTrainer``
(local Ray on 127.0.0.1, 0.5 CPU per worker, ``MultiWorkerMirroredStrategy`` as
in ``pipeline.training.worker``) runs, on every worker, for each split and each
input (previous, then today's), ``model.fit`` for ``EPOCHS`` epochs on a new
counting model. Per-replica batch 8 (``data.batch_size=8``), default ``data``
settings otherwise (shuffle buffer, read parallelism, augmentation on), seed 7.

Today's input is built as ``train_loop_per_worker`` builds it (the same calls:
``assign_records``, ``steps_per_epoch``, ``segment_stream`` with
``epoch_passes``, ``train_input`` through ``distribute_datasets_from_function``,
``records_per_epoch = steps x worker batch``). The previous one is copied here
from b7c31a7 (``assign_shards``, the training + ``counted`` path of
``make_dataset`` over ``ShardStream(shuffle=True, repeat=True, seed=seed +
rank)``); its only change is that augmentation takes today's stateless key,
which moves pixels, never identities.

Counting: the model (GlobalAveragePooling + Dense, trained on id % 4) has
sync-on-read, SUM-aggregated int32 variables: ``seen`` [N] (the train step adds
1 at every id of its replica's batch, ``tensor_scatter_nd_add`` on its local
copy), ``sizes`` [batch + 1] (1 at the size of the replica's batch, so the sum
over replicas and steps is a histogram of images per replica per step) and
``skipped``. A callback reads them at every epoch's end on every worker:
reading a sync-on-read variable across replicas all-reduces it over every
replica of every worker, so each worker gets the global counts; the epoch's
counts are the difference from the previous read. Per epoch: distinct ids
trained / split, repeats (trained - distinct), examples trained / split, and
images per replica per step. Today's input must train, every epoch, steps x
global batch examples, each once: all of the split but N mod global batch
(which is under 0.01 of the split only where N / global batch is over ~100);
the table also says where distinct / split is >= 0.99.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tests.benchmarks.bench_prepare import environment

SIZE = 16  # image side, source and model
PER_REPLICA = 8  # data.batch_size
EPOCHS = 2
SEED = 7  # data.seed
CLASSES = 4
SPLITS = {
    "5 shards": [359, 360, 359, 360, 359],
    "7 shards": [412, 97, 305, 188, 356, 41, 263],
}
WORKERS = (1, 2, 3)
CPUS_PER_WORKER = 0.5
SAMPLERS = ("before", "now")
QUICK_ENV = "BENCH_EPOCHS_QUICK"


def run() -> dict:
    quick = os.environ.get(QUICK_ENV, "") not in ("", "0")
    workers, epochs = ((2,), 1) if quick else (WORKERS, EPOCHS)
    started = time.perf_counter()
    env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="bench-epochs-") as tmp, environment(env):
        splits = {name: write_split(os.path.join(tmp, f"split-{len(counts)}"), counts)
                  for name, counts in SPLITS.items()}
        from tests.benchmarks.bench_train import loopback_ray

        with loopback_ray():
            runs = {str(w): train_run(tmp, splits, w, epochs) for w in workers}
    return {"quick": quick, "epochs": epochs, "per_replica_batch": PER_REPLICA, "seed": SEED,
            "cpus_per_worker": CPUS_PER_WORKER, "splits": SPLITS, "runs": runs,
            "seconds": round(time.perf_counter() - started, 1)}


# --- data -----------------------------------------------------------------------


def write_split(folder: str, counts: Sequence[int]) -> list[dict]:
    """Shards of 16x16 JPEGs whose label is the record's split-wide id; their
    ShardRefs as dicts (local paths, read in place by ShardCache)."""
    import tensorflow as tf

    from pipeline.data.shards import make_example

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(len(counts))
    jpegs = [tf.io.encode_jpeg(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).numpy() for _ in range(32)]
    refs, rid = [], 0
    for i, n in enumerate(counts):
        path = os.path.join(folder, f"train-{i:05d}-of-{len(counts):05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for _ in range(n):
                w.write(make_example(jpegs[rid % len(jpegs)], rid, "c", f"id{rid}", SIZE, SIZE))
                rid += 1
        refs.append({"uri": path, "bytes": os.path.getsize(path), "sha256": None, "examples": n})
    return refs


# --- the previous input (commit b7c31a7), copied -----------------------------------


@dataclass(frozen=True)
class Assignment:
    shards: tuple[int, ...]
    record_stride: int = 1
    record_offset: int = 0


def assign_shards_before(shard_examples: Sequence[int], rank: int, world: int) -> Assignment:
    """b7c31a7 ``pipeline.input.assign_shards``: shards, largest first, to the
    rank with the fewest examples so far; fewer shards than workers: stripes."""
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


def steps_before(num_examples: int, global_batch: int) -> int:
    """b7c31a7 ``steps_per_epoch``: ceil; the datasets repeat."""
    return max(1, math.ceil(num_examples / global_batch))


def dataset_before(stream, assignment: Assignment, *, image_size: int, batch_size: int, aug: dict,
                   shuffle_buffer: int, seed, read_parallelism: int):
    """b7c31a7 ``make_dataset(stream, training=True, counted=True)``: the
    stream's endless shuffled passes, interleaved, shuffled in a buffer,
    decoded, skipped records counted, batched. Augmentation takes today's
    stateless key (``record_key(seed, 0, 0, index)``, as ``make_dataset`` does
    now) instead of b7c31a7's stateful draws: pixels only."""
    import tensorflow as tf

    from pipeline.data import input as inp

    autotune = tf.data.AUTOTUNE
    paths = tf.data.Dataset.from_generator(stream.paths, output_signature=tf.TensorSpec([], tf.string))
    num_paths = len(stream.refs)
    ordered = seed is not None
    if assignment.record_stride > 1:
        records = paths.flat_map(inp.read_records).shard(assignment.record_stride, assignment.record_offset)
    else:
        records = paths.interleave(inp.read_records, cycle_length=max(1, min(num_paths, read_parallelism)),
                                   num_parallel_calls=autotune, deterministic=ordered)
    records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    use_aug = aug is not None and aug.get("enabled", False)

    def load_numbered(index, serialized):
        image, label = inp.decode_example(serialized)
        if use_aug:
            image = inp.augment(image, image_size, aug, inp.record_key(seed, 0, 0, index))
        else:
            image = inp.resize(image, image_size)
        return image, label, index

    def count_skipped(last_index, element):
        image, label, index = element
        return index, (image, label, tf.constant(1.0), index - last_index - 1)

    ds = records.enumerate().map(load_numbered, num_parallel_calls=autotune, deterministic=True)
    ds = ds.ignore_errors().scan(tf.constant(-1, tf.int64), count_skipped)
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(autotune)


# --- the Ray Train worker --------------------------------------------------------


def count_epochs(config: dict) -> None:
    """Every worker: for each split and each input, a new counting model
    trained ``epochs`` epochs; rank 0 writes the per-epoch counts to
    ``<tmp>/counts-<workers>.json`` (one machine: the driver reads it there)."""
    import ray.train
    import tensorflow as tf
    import tf_keras as keras

    from pipeline.config import Config, StorageConfig
    from pipeline.data import input as inp
    from pipeline.data.shard_stream import ShardCache, ShardRef, ShardStream, stream_window
    from pipeline.training.worker import segment_stream

    tf.get_logger().setLevel("ERROR")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    cfg = Config()
    d = cfg.data
    aug = cfg.augment.model_dump()
    replicas = strategy.num_replicas_in_sync
    global_batch = PER_REPLICA * replicas
    local_replicas = max(1, replicas // world)
    worker_batch = PER_REPLICA * local_replicas
    epochs = config["epochs"]

    class Counting(keras.Model):
        """GlobalAveragePooling + Dense; the train step counts ids and batch sizes."""

        def __init__(self, n: int):
            super().__init__()
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(CLASSES)
            self.loss_fn = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=keras.losses.Reduction.NONE)
            counter = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.SUM)
            self.seen = tf.Variable(tf.zeros([n], tf.int32), name="seen", **counter)
            self.sizes = tf.Variable(tf.zeros([PER_REPLICA + 1], tf.int32), name="sizes", **counter)
            self.skipped = tf.Variable(tf.zeros([], tf.int32), name="skipped", **counter)

        def call(self, images, training=False):
            return self.head(self.pool(images / 255.0))

        def train_step(self, data):
            images, ids, skipped = data[0], tf.cast(data[1], tf.int32), data[3]
            if inp.is_device_batch(images):  # uint8 records, augmented in the step as the worker's model does
                images = inp.augment_batch(images, SIZE)
            with tf.GradientTape() as tape:
                per_image = self.loss_fn(ids % CLASSES, self(images, training=True))
                loss = tf.reduce_mean(per_image) / tf.distribute.get_strategy().num_replicas_in_sync
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            # In replica context: this replica's local copies.
            self.seen.assign(tf.tensor_scatter_nd_add(self.seen, ids[:, tf.newaxis], tf.ones_like(ids)))
            size = tf.minimum(tf.shape(ids)[0], PER_REPLICA)
            self.sizes.assign(tf.tensor_scatter_nd_add(self.sizes, [[size]], [1]))
            self.skipped.assign_add(tf.cast(tf.reduce_sum(skipped), tf.int32))
            return {"loss": loss}

    class EpochCounts(keras.callbacks.Callback):
        """Reads the counters at every epoch's end (on every worker: an all-reduce)."""

        def __init__(self, n: int):
            super().__init__()
            self.n, self.epochs = n, []
            self.last = (np.zeros(n, np.int64), np.zeros(PER_REPLICA + 1, np.int64), 0)

        def on_epoch_end(self, epoch, logs=None):
            seen = self.model.seen.read_value().numpy().astype(np.int64)
            sizes = self.model.sizes.read_value().numpy().astype(np.int64)
            skipped = int(self.model.skipped.read_value().numpy())
            counts, size_hist = seen - self.last[0], sizes - self.last[1]
            skipped_now = skipped - self.last[2]
            self.last = (seen, sizes, skipped)
            trained, distinct = int(counts.sum()), int(np.count_nonzero(counts))
            left_out = np.flatnonzero(counts == 0)
            self.epochs.append({
                "trained": trained, "distinct": distinct, "repeats": trained - distinct,
                "most_per_example": int(counts.max()),
                "never": int(left_out.size), "left_out": left_out.tolist() if left_out.size <= 64 else None,
                "replica_steps_by_size": {str(k): int(v) for k, v in enumerate(size_hist) if v},
                "skipped": int(skipped_now),
            })

    out: dict = {}
    for name, spec in config["splits"].items():
        refs = [ShardRef(**r) for r in spec]
        counts = [r.examples for r in refs]
        n = sum(counts)
        out[name] = {}
        for sampler in SAMPLERS:
            started = time.perf_counter()
            cache = ShardCache(os.path.join(config["tmp"], f"cache-w{world}-{len(counts)}-{sampler}-rank{rank}"),
                               StorageConfig(), concurrency=d.download_concurrency)
            if sampler == "now":
                # As pipeline.training.worker.train_loop_per_worker builds it.
                steps = inp.steps_per_epoch(n, global_batch)
                segments = inp.assign_records(counts, rank, world)
                records_per_epoch = steps * worker_batch

                def make(context, segments=segments, records_per_epoch=records_per_epoch, cache=cache):
                    stream = segment_stream(cache, refs, segments, cfg, repeat=True,
                                            passes=inp.epoch_passes(segments, records_per_epoch, SEED, rank))
                    return inp.train_input(
                        stream, segments, records_per_epoch=records_per_epoch, first_epoch=0, seed=SEED,
                        rank=rank, image_size=SIZE, batch_size=context.get_per_replica_batch_size(global_batch),
                        aug=aug, shuffle_buffer=d.shuffle_buffer, read_parallelism=d.read_parallelism)
                mine = {"records": [s.count for s in segments], "shards": [s.shard for s in segments]}
            else:
                # As b7c31a7's pipeline.train_loop built it (data.seed + rank).
                steps = steps_before(n, global_batch)
                assignment = assign_shards_before(counts, rank, world)

                def make(context, assignment=assignment, cache=cache):
                    lookahead, keep_open = stream_window(d.download_concurrency, d.read_parallelism)
                    striped = assignment.record_stride > 1
                    stream = ShardStream(cache, [refs[i] for i in assignment.shards], shuffle=not striped,
                                         repeat=True, seed=SEED + rank, lookahead=lookahead, keep_open=keep_open)
                    return dataset_before(stream, assignment, image_size=SIZE,
                                          batch_size=context.get_per_replica_batch_size(global_batch), aug=aug,
                                          shuffle_buffer=d.shuffle_buffer, seed=SEED + rank,
                                          read_parallelism=d.read_parallelism)
                mine = {"records": [counts[i] for i in assignment.shards], "shards": list(assignment.shards)}
            data = strategy.distribute_datasets_from_function(make)
            with strategy.scope():
                model = Counting(n)
                model.compile(optimizer=keras.optimizers.SGD(0.01))
            reader = EpochCounts(n)
            model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=[reader], verbose=0)
            cache.close()
            out[name][sampler] = {"split": n, "steps": steps, "global_batch": global_batch, "rank0": mine,
                                  "epochs": reader.epochs, "seconds": round(time.perf_counter() - started, 2)}
    if rank == 0:  # every rank holds the same all-reduced counts
        path = os.path.join(config["tmp"], f"counts-{world}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(path + ".tmp", path)


def train_run(tmp: str, splits: dict, workers: int, epochs: int) -> dict:
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from pipeline.config import Config
    from pipeline.training.driver import worker_env

    started = time.perf_counter()
    trainer = TensorflowTrainer(
        count_epochs,
        train_loop_config={"splits": splits, "tmp": tmp, "epochs": epochs},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": CPUS_PER_WORKER}),
        # The job's worker environment (pipeline.training.driver.worker_env, default config).
        run_config=ray.train.RunConfig(name=f"bench-epochs-{workers}", storage_path=os.path.join(tmp, "ray-results"),
                                       worker_runtime_env={"env_vars": worker_env(Config())}),
    )
    trainer.fit()
    with open(os.path.join(tmp, f"counts-{workers}.json")) as f:
        splits_counted = json.load(f)
    return {"workers": workers, "splits": splits_counted,
            "seconds": round(time.perf_counter() - started, 1)}


# --- results --------------------------------------------------------------------


def markdown(results: dict) -> str:
    epochs = results["epochs"]
    rows = []
    contract_all, fraction_all, short = True, True, []
    for w, r in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for name, counts in SPLITS.items():
            part = r["splits"][name]
            before, now = part["before"], part["now"]
            n, global_batch = now["split"], now["global_batch"]

            def fractions(s, key):
                return ", ".join(f"{e[key] / n:.3f}" for e in s["epochs"])

            def repeats(s):
                return ", ".join(str(e["repeats"]) for e in s["epochs"])

            sizes = sorted({k for e in now["epochs"] for k in e["replica_steps_by_size"]}, key=int)
            per_step = ", ".join("/".join(f"{k} (x{v})" for k, v in sorted(e["replica_steps_by_size"].items()))
                                 for e in now["epochs"])
            # The contract: every epoch steps x global batch examples, each once,
            # so all but the remainder (N mod global batch < one global batch).
            contract = sizes == [str(PER_REPLICA)] and all(
                e["repeats"] == 0 and e["skipped"] == 0 and e["trained"] == now["steps"] * global_batch
                and n - e["distinct"] == n % global_batch for e in now["epochs"])
            fraction = all(e["distinct"] / n >= 0.99 for e in now["epochs"])
            contract_all, fraction_all = contract_all and contract, fraction_all and fraction
            if not fraction:
                short.append(f"{w} workers on the {n}-example split: {n % global_batch} left out "
                             f"({n} mod {global_batch}), {min(e['distinct'] for e in now['epochs'])} of {n}")
            rows.append(
                f"| {w} | {len(counts)}: {'/'.join(map(str, counts))} ({n}) | {global_batch} | "
                f"{before['steps']} → {now['steps']} | {fractions(before, 'distinct')} | {repeats(before)} | "
                f"{fractions(before, 'trained')} | **{fractions(now, 'distinct')}** | **{repeats(now)}** | "
                f"{fractions(now, 'trained')} | {per_step} | {_mark(contract)} | {_mark(fraction)} |")
    left_out = _left_out_note(results)
    seconds = ", ".join(f"{w} worker{'s' if int(w) > 1 else ''} {r['seconds']:.0f} s"
                        for w, r in sorted(results["runs"].items(), key=lambda kv: int(kv[0])))
    quick = "; a quick run: 2 workers, 1 epoch" if results.get("quick") else ""
    below = (f"\nBelow 0.99: {'; '.join(short)}: the remainder under one global batch that "
             f"an epoch leaves out by design (floor steps), not a repeat or a loss." if short else "")
    return f"""## What an epoch trains on

`python -m tests.benchmarks.run epochs` ({results['seconds']:.0f} s{quick}; `BENCH_EPOCHS_QUICK=1`
runs 2 workers for 1 epoch) on 2 CPU cores, no GPU. A real `TensorflowTrainer` per
worker count (local Ray, {results['cpus_per_worker']} CPU per worker, `MultiWorkerMirroredStrategy`;
{seconds}), {epochs} epoch{'s' if epochs > 1 else ''} per split and input, per-replica batch {results['per_replica_batch']},
default `data` settings (augmentation on), seed {results['seed']}. Records carry their
split-wide id as label; a tiny counting model's train step adds its replica's ids
into a sync-on-read SUM histogram, read (all-reduced over every replica) at each
epoch's end. **before**: commit b7c31a7's input (`assign_shards`, each worker's endless
shuffled stream of its own shards, ceil(N / global batch) steps); **now**:
`assign_records` + `epoch_passes` + `train_input` as `pipeline.training.worker` builds them
(floor steps). One value per epoch; repeats = examples trained - distinct examples.

| workers | training shards (examples) | global batch | steps per epoch before → now | before: distinct / split | before: repeats | before: examples / split | **now: distinct / split** | **now: repeats** | now: examples / split | now: images per replica per step | now: all but N mod global batch, each once | now: distinct ≥ 0.99 |
|---|---|---:|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

"now: all but N mod global batch, each once": in every epoch, steps x global batch
examples trained, no repeat, distinct = N - (N mod global batch), {results['per_replica_batch']} images on every
replica at every step ("8 (xK)": K replica-steps of 8 in the epoch), no record skipped:
{"PASS in every row" if contract_all else "MISS (see the rows)"}. Distinct ≥ 0.99 of the split: {_mark(fraction_all)}.{below}
{left_out}
"""


def _left_out_note(results: dict) -> str:
    """Whether today's left-out remainder changed from one epoch to the next."""
    differ, same = 0, 0
    for r in results["runs"].values():
        for part in r["splits"].values():
            sets = [tuple(e["left_out"] or ()) for e in part["now"]["epochs"]]
            for a, b in zip(sets, sets[1:]):
                if len(a) >= 2:
                    differ += a != b
                    same += a == b
    if differ + same == 0:
        return ""
    return (f"Today's remainder left out (< one global batch) differed between consecutive epochs "
            f"in {differ} of {differ + same} cases.")


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"
