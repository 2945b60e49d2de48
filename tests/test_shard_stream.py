"""Each worker streams only its own shards from object storage, through a
bounded cache that verifies every shard against the manifest: bytes counted at
a proxy in front of the moto S3 server, downloads held back until the first
batch is out, disk use accounted at every change, stale and truncated shards."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import tensorflow as tf

from pipeline.data import input as inp
from pipeline.config import StorageConfig
from pipeline.data.shard_stream import ShardCache, ShardError, ShardRef, ShardStream
from tests.faultproxy import FaultProxy
from tests.test_input import jpeg
from pipeline.data.shards import make_example

pytestmark = pytest.mark.s3
SIZE = 32


def put_shards(fs, prefix: str, tmp_path, counts: list[int], label_of=lambda rid: rid) -> list[dict]:
    """TFRecord shards on S3 whose records carry a unique id; manifest-style entries."""
    entries, rid = [], 0
    for i, n in enumerate(counts):
        local = str(tmp_path / f"s{i}.tfrecord")
        with tf.io.TFRecordWriter(local) as w:
            for _ in range(n):
                w.write(make_example(jpeg(rid), label_of(rid), "c", f"id{rid}", SIZE, SIZE))
                rid += 1
        data = open(local, "rb").read()
        name = f"train-{i:05d}-of-{len(counts):05d}-{hashlib.sha256(data).hexdigest()[:16]}.tfrecord"
        fs.pipe_file(f"{prefix}/{name}", data)
        entries.append({"file": name, "examples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return entries


def refs_for(entries, base: str) -> list[ShardRef]:
    return [ShardRef(f"{base}/{e['file']}", e["bytes"], e["sha256"], e["examples"]) for e in entries]


def storage_at(endpoint: str) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, max_attempts=2)


def labels_read(stream: ShardStream, examples: int) -> list[int]:
    """The first ``examples`` labels of the training input over ``stream``, read
    one shard at a time without record shuffling, so passes do not overlap."""
    ds = inp.make_dataset(stream, image_size=SIZE, batch_size=1, training=True,
                          shuffle_buffer=1, seed=0, read_parallelism=1)
    return [int(y[0]) for _, y in ds.take(examples)]


# tf.data takes up to three paths from the stream before its first element
# comes out (its own read-ahead: the interleave's next input, from_generator's
# next item): the first batch may need that many shards, never more.
FIRST_BATCH_SHARDS = 3


def hold_downloads(cache: ShardCache, allowed: int, timeout: float = 30.0):
    """Let only the downloads of the first ``allowed`` shards the stream asks
    for run; every other download waits until the returned event is set (so
    read-ahead may ask for more shards, but none of them arrives meanwhile).
    Returns (event, held): ``held`` lists the downloads that waited in vain
    (``timeout`` s each): what the reader needed before the event."""
    released, held, asked = threading.Event(), [], []
    prefetch, download = cache.prefetch, cache._download

    def note_order(ref):
        if ref not in asked:
            asked.append(ref)
        return prefetch(ref)

    def gated(ref, path):
        if ref not in asked[:allowed] and not released.wait(timeout):
            held.append(ref.name)
        return download(ref, path)

    cache.prefetch, cache._download = note_order, gated
    return released, held


def test_each_worker_fetches_only_its_own_shards_and_starts_before_the_rest(s3_endpoint, s3_bucket, tmp_path):
    """The first batch needs only the first few of a worker's 6 shards: every
    download after the first FIRST_BATCH_SHARDS is held back until that batch
    is out, so the count of shards fetched by then cannot grow with tf.data's
    read-ahead, and a stream that fetched more before starting would wait for
    them in vain."""
    fs, bucket = s3_bucket
    counts = [3] * 12
    entries = put_shards(fs, f"{bucket}/shards", tmp_path, counts)
    total_bytes = sum(e["bytes"] for e in entries)
    with FaultProxy(s3_endpoint, p=0) as proxy:
        storage = storage_at(proxy.url)
        refs = refs_for(entries, f"s3://{bucket}/shards")
        fetched, seen = [], []
        for rank in range(2):
            segments = inp.assign_records(counts, rank, 2)  # 6 whole shards each
            mine = [refs[seg.shard] for seg in segments]
            cache = ShardCache(str(tmp_path / f"cache-{rank}"), storage, concurrency=2)
            stream = ShardStream(cache, mine, shuffle=True, repeat=True, seed=rank, lookahead=2, keep_open=6)
            ds = iter(inp.make_dataset(stream, image_size=SIZE, batch_size=1,
                                       training=True, shuffle_buffer=1, seed=0, read_parallelism=1))
            before = proxy.stats()["body_bytes"]
            released, held = hold_downloads(cache, FIRST_BATCH_SHARDS)
            try:
                first = next(ds)
                # The first image came when at most 3 of this worker's 6 shards were fetched.
                fetched_first = cache.stats["fetches"]
            finally:
                released.set()
            assert not held and 1 <= fetched_first <= FIRST_BATCH_SHARDS < len(mine), \
                (held, cache.stats)
            ids = [int(first[1][0])] + [int(next(ds)[1][0]) for _ in range(sum(seg.count for seg in segments) - 1)]
            fetched.append(proxy.stats()["body_bytes"] - before)
            seen.append(ids)
            cache.close()
    # Disjoint and complete: the two workers' passes are the whole split, once.
    assert sorted(seen[0] + seen[1]) == list(range(sum(counts)))
    for got in fetched:
        # Each worker downloaded about half the bytes (object bodies only).
        assert 0.45 * total_bytes <= got <= 0.55 * total_bytes, (got, total_bytes)


def test_cache_stays_within_its_bound_while_reading(s3_endpoint, s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    counts = [4] * 10
    entries = put_shards(fs, f"{bucket}/shards", tmp_path, counts)
    largest = max(e["bytes"] for e in entries)
    bound = 6 * largest
    root = tmp_path / "cache"
    cache = ShardCache(str(root), storage_at(s3_endpoint), max_bytes=bound, concurrency=2)
    stream = ShardStream(cache, refs_for(entries, f"s3://{bucket}/shards"), shuffle=True, repeat=True, seed=1,
                         lookahead=2, keep_open=3)
    try:
        labels = labels_read(stream, 3 * sum(counts))
        # The cache accounts each block written, each file replaced or removed:
        # its count is what is on disk (and its high-water mark is exact, where
        # sampling the folder could miss a short overshoot).
        on_disk = sum(e.stat().st_size for e in os.scandir(root) if e.is_file() and e.name != ".lock")
        assert cache.disk_bytes() == on_disk
    finally:
        cache.close()
    assert sorted(labels) == sorted(list(range(sum(counts))) * 3)  # three full passes
    assert cache.stats["evictions"] > 0  # the bound was really in play
    assert bound - largest < cache.stats["peak_bytes"] <= bound, (cache.stats, bound)


def test_truncated_cached_shard_is_fetched_again_and_a_changed_one_is_refused(s3_endpoint, s3_bucket, tmp_path):
    fs, bucket = s3_bucket
    entries = put_shards(fs, f"{bucket}/shards", tmp_path, [3, 3])
    refs = refs_for(entries, f"s3://{bucket}/shards")
    storage = storage_at(s3_endpoint)
    cache = ShardCache(str(tmp_path / "cache"), storage)
    path = cache.local_path(refs[0])
    cache.close()
    with open(path, "r+b") as f:  # a node that died mid-write, or a disk that lost the tail
        f.truncate(refs[0].bytes // 2)
    cache = ShardCache(str(tmp_path / "cache"), storage)
    assert cache.local_path(refs[0]) == path
    assert cache.stats["fetches"] == 1 and os.path.getsize(path) == refs[0].bytes
    # The object changed under the manifest (same size, other bytes): refused, never read.
    data = bytearray(fs.cat_file(f"{bucket}/shards/{entries[1]['file']}"))
    data[-1] ^= 0xFF
    fs.pipe_file(f"{bucket}/shards/{entries[1]['file']}", bytes(data))
    with pytest.raises(ShardError, match="does not match manifest.json"):
        cache.local_path(refs[1])
    assert not [n for n in os.listdir(cache.root) if n.startswith(entries[1]["sha256"])]
    cache.close()


def test_local_shard_that_differs_from_the_manifest_is_refused(tmp_path):
    path = tmp_path / "train-00000-of-00001-0000000000000000.tfrecord"
    path.write_bytes(b"x" * 10)
    cache = ShardCache(str(tmp_path / "cache"), StorageConfig())
    with pytest.raises(ShardError, match="10 bytes, expected 11"):
        cache.local_path(ShardRef(str(path), 11, None, 1))
    with pytest.raises(ShardError, match="SHA-256 differs"):
        cache.local_path(ShardRef(str(path), 10, "0" * 64, 1))
    assert cache.local_path(ShardRef(str(path), 10, hashlib.sha256(b"x" * 10).hexdigest(), 1)) == str(path)
    cache.close()


def local_shards(tmp_path, counts: list[int]) -> list[ShardRef]:
    refs, rid = [], 0
    for i, n in enumerate(counts):
        path = tmp_path / f"train-{i:05d}-of-{len(counts):05d}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as w:
            for _ in range(n):
                w.write(make_example(jpeg(rid), rid % 2, "c", f"id{rid}", SIZE, SIZE))
                rid += 1
        data = path.read_bytes()
        refs.append(ShardRef(str(path), len(data), hashlib.sha256(data).hexdigest(), n))
    return refs


def test_a_shard_gone_during_training_fails_the_step_instead_of_shortening_the_epoch(tmp_path):
    """The input skips undecodable records; a shard that cannot be had must not
    be skipped with them: the stream keeps the error and the train step raises it."""
    import numpy as np
    import tf_keras as keras

    from pipeline.training.worker import StreamCheck

    refs = local_shards(tmp_path, [4, 4, 4])
    os.remove(refs[1].uri)
    cache = ShardCache(str(tmp_path / "cache"), StorageConfig())
    stream = ShardStream(cache, refs, shuffle=False, repeat=False)
    ds = inp.make_dataset(stream, image_size=SIZE, batch_size=2, training=False, repeat=False, counted=True)
    assert sum(int(b[0].shape[0]) for b in ds) == 4  # the first shard, then the stream ended
    with pytest.raises(ShardError, match="named by manifest.json is missing"):
        stream.check()

    stream = ShardStream(cache, refs, shuffle=False, repeat=True)
    ds = inp.make_dataset(stream, image_size=SIZE, batch_size=2, training=True, shuffle_buffer=1, counted=True)
    model = keras.Sequential([keras.layers.GlobalAveragePooling2D(input_shape=(SIZE, SIZE, 3)),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ShardError, match="missing"):
        model.fit(ds.map(lambda x, y, w, skipped: (x, y)), epochs=3, steps_per_epoch=4, verbose=0,
                  callbacks=[StreamCheck([stream])])
    cache.close()
    assert np.isfinite(model.get_weights()[0]).all()


def test_second_process_on_the_same_cache_folder_gets_its_own(tmp_path):
    first = ShardCache(str(tmp_path / "rank-0"), StorageConfig())
    second = ShardCache(str(tmp_path / "rank-0"), StorageConfig())
    assert first.root != second.root
    second.close()
    assert not os.path.exists(second.root)  # its private folder goes with it
    first.close()


def test_a_cache_too_small_for_the_shards_read_at_once_is_refused_before_any_work(s3_bucket, tmp_path, capsys):
    import json

    from jobs import train as train_job
    from jobs._cli import run

    fs, bucket = s3_bucket
    shard = {"file": "train-00000-of-00001-0123456789abcdef.tfrecord", "examples": 10, "bytes": 2 * 10**9,
             "sha256": "0" * 64}
    manifest = {"format_version": 1, "classes": ["a", "b"], "splits": {
        "train": {"num_examples": 10, "class_counts": {"a": 5, "b": 5}, "shards": [shard]},
        "validation": {"num_examples": 0, "class_counts": {"a": 0, "b": 0}, "shards": []}}}
    fs.pipe_file(f"{bucket}/shards/manifest.json", json.dumps(manifest).encode())
    code = run(train_job.main, ["--data", f"s3://{bucket}/shards", "--output", str(tmp_path / "run"),
                                "--set", "data.cache_max_gb=10"])
    assert code == 2
    assert "data.cache_max_gb=10.0 is too small" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_prepare_overwrite_with_new_labels_is_what_the_next_run_reads_on_the_same_node(
        ray_session, s3_endpoint, s3_bucket, tmp_path):
    """prepare, read as a worker does, prepare --overwrite with other labels,
    read again with the same cache folder: the new labels, never the old."""
    from jobs import prepare as prepare_job
    from jobs._cli import run
    from pipeline.data import demo_data
    from pipeline.config import load_config
    from pipeline.data.shard_stream import shard_refs
    from pipeline.data.shards import read_manifest
    from pipeline.training.worker import shard_stream, worker_cache

    fs, bucket = s3_bucket
    src, dst = f"s3://{bucket}/raw", f"s3://{bucket}/shards"
    demo_data.generate(str(tmp_path / "raw"), per_class=6, size=40, classes=["circle", "square"])
    fs.put(str(tmp_path / "raw") + "/", f"{bucket}/raw/", recursive=True)
    cfg = load_config(overrides=[f"data.cache_dir={tmp_path / 'cache'}", "data.download_concurrency=2"])

    def labels_read() -> dict:
        manifest = read_manifest(dst, cfg.storage)
        refs = shard_refs(manifest, dst, "train")
        cache = worker_cache(cfg, "rank-0")
        try:
            stream = shard_stream(cache, refs, cfg, training=False, seed=None)
            ds = inp.make_dataset(stream, image_size=SIZE, batch_size=64, training=False, repeat=False)
            seen = [manifest["classes"][int(y)] for _, labels in ds for y in labels]
        finally:
            cache.close()
        return {c: seen.count(c) for c in manifest["classes"]}, manifest["splits"]["train"]["class_counts"]

    args = ["--src", src, "--dst", dst, "--set", "prepare.min_examples_per_shard=2"]
    assert run(prepare_job.main, args) == 0
    first, expected = labels_read()
    assert first == expected
    # Half the circles become squares: same shard names by position, other contents.
    for i in range(3):
        fs.mv(f"{bucket}/raw/circle/circle_{i:04d}.jpg", f"{bucket}/raw/square/moved_{i:04d}.jpg")
    assert run(prepare_job.main, args + ["--overwrite"]) == 0
    second, expected = labels_read()
    assert second == expected and second != first
