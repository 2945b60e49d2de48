"""Distributed training input: each worker streams only its own shards, and an
epoch is the training split once, counted.

(1) Time to the first batch of the training input (what the first step waits
    for) from S3 on moto, through a byte-counting proxy on 127.0.0.1, for a
    dataset of S shards and one of 10 x S shards, default data settings: ratio
    10x / 1x (target at most 1.2: the start does not grow with the dataset).
(2) Bytes each of 2 workers fetched for one epoch over its shards, against
    dataset bytes / 2 (target at most 1.1).
(3) Real ``jobs.train`` runs (TensorflowTrainer, CPU, 75x75, head-only) with 1,
    2 and 3 workers: examples the train step received per epoch, summed over
    replicas, against the training split (target 1.00; the split is a multiple
    of every global batch here), and images/s (reported, not targeted: the 2
    cores are shared by every worker).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np

from tests.benchmarks.bench_prepare import environment, moto_server
from tests.benchmarks.bench_train import _bench_env

BUCKET = "bench-stream"
SHARDS = 8  # the 1x dataset; 10x has 80
RECORDS = 300  # per shard
SIDE = 64
TRAIN_IMAGES = 48  # jobs.train runs: a multiple of 8, 16 and 24


def run() -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp, environment(_bench_env()):
        with moto_server() as (endpoint, _):
            first = {n: time_to_first_batch(endpoint, tmp, n) for n in (SHARDS, 10 * SHARDS)}
            fetched = bytes_per_worker(endpoint, tmp)
        training = {w: train_run(tmp, w) for w in (1, 2, 3)}
    return {"first_batch": first, "fetched": fetched, "training": training,
            "seconds": round(time.perf_counter() - started, 1)}


def _records(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    from pipeline.data.shards import make_example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(make_example(buf.getvalue(), i % 2, "c", f"id{i}", SIDE, SIDE))
    return out


def put_dataset(endpoint: str, tmp: str, shards: int) -> list:
    """``shards`` TFRecord shards on S3 (the same records, plus one naming the
    shard so that every shard has its own content); their refs."""
    import tensorflow as tf

    from pipeline import storage as st
    from pipeline.config import StorageConfig
    from pipeline.data.shard_stream import ShardRef

    records = _records(RECORDS, 0)
    fs, _ = st.get_fs(f"s3://{BUCKET}", StorageConfig(endpoint_url=endpoint))
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    refs = []
    for i in range(shards):
        local = os.path.join(tmp, "shard.tfrecord")
        with tf.io.TFRecordWriter(local) as w:
            for record in records + _records(1, 1000 + i):
                w.write(record)
        body = open(local, "rb").read()
        uri = f"s3://{BUCKET}/{shards}/train-{i:05d}.tfrecord"
        fs.pipe_file(uri.removeprefix("s3://"), body)
        refs.append(ShardRef(uri, len(body), hashlib.sha256(body).hexdigest(), RECORDS + 1))
    return refs


def _dataset(stream):
    from pipeline.data import input as inp
    from pipeline.config import Config

    d = Config().data
    return inp.make_dataset(stream, image_size=75, batch_size=d.batch_size, training=True,
                            aug={"enabled": False}, shuffle_buffer=d.shuffle_buffer, seed=0,
                            read_parallelism=d.read_parallelism, counted=True)


def time_to_first_batch(endpoint: str, tmp: str, shards: int) -> dict:
    from pipeline.config import Config, StorageConfig
    from pipeline.data.shard_stream import ShardCache, ShardStream
    from tests.faultproxy import FaultProxy

    refs = put_dataset(endpoint, tmp, shards)
    d = Config().data
    rounds = []
    for r in range(3):
        with FaultProxy(endpoint, p=0) as proxy:
            cache = ShardCache(os.path.join(tmp, f"first-{shards}-{r}"), StorageConfig(endpoint_url=proxy.url),
                               concurrency=d.download_concurrency)
            stream = ShardStream(cache, refs, shuffle=True, repeat=True, seed=r, lookahead=d.download_concurrency,
                                 keep_open=2 * d.read_parallelism + 2)
            started = time.perf_counter()
            next(iter(_dataset(stream)))
            rounds.append({"s": time.perf_counter() - started, "shards_fetched": cache.stats["fetches"],
                           "bytes": proxy.stats()["body_bytes"]})
            cache.close()
    best = min(rounds, key=lambda x: x["s"])
    return {"shards": shards, "dataset_bytes": sum(r.bytes for r in refs), **best}


def bytes_per_worker(endpoint: str, tmp: str) -> dict:
    from pipeline.data import input as inp
    from pipeline.config import StorageConfig
    from pipeline.data.shard_stream import ShardCache, ShardStream
    from tests.faultproxy import FaultProxy

    refs = put_dataset(endpoint, tmp, 2 * SHARDS)
    counts = [r.examples for r in refs]
    out = []
    for rank in range(2):
        segments = inp.assign_records(counts, rank, 2)
        with FaultProxy(endpoint, p=0) as proxy:
            cache = ShardCache(os.path.join(tmp, f"fetch-{rank}"), StorageConfig(endpoint_url=proxy.url))
            stream = ShardStream(cache, [refs[seg.shard] for seg in segments], shuffle=True, repeat=True, seed=rank)
            want = sum(seg.count for seg in segments)
            seen = 0
            for _, labels, _, _ in _dataset(stream):
                seen += int(labels.shape[0])
                if seen >= want:
                    break
            out.append(proxy.stats()["body_bytes"])
            cache.close()
    total = sum(r.bytes for r in refs)
    return {"dataset_bytes": total, "per_worker": out, "ratio": [round(b / (total / 2), 3) for b in out]}


def train_run(tmp: str, workers: int) -> dict:
    """jobs.train on TRAIN_IMAGES images (4 classes), head only, per-replica batch 8."""
    from jobs import prepare as prepare_job
    from jobs import train as train_job
    from jobs._cli import run as run_job
    from pipeline.data import demo_data

    images = os.path.join(tmp, "images")
    shards = os.path.join(tmp, "shards")
    if not os.path.exists(shards):
        classes = ["circle", "square", "stripes", "triangle"]
        demo_data.generate(os.path.join(images, "train"), per_class=TRAIN_IMAGES // 4, size=80, classes=classes)
        demo_data.generate(os.path.join(images, "validation"), per_class=2, size=80, seed=1, classes=classes)
        assert run_job(prepare_job.main, ["--src", images, "--dst", shards,
                                          "--set", "prepare.min_examples_per_shard=4",
                                          "--set", "prepare.min_shards=6"]) == 0
    out = os.path.join(tmp, f"run-{workers}")
    code = run_job(train_job.main, [
        "--data", shards, "--output", out, "--set", "data.image_size=75", "--set", "data.batch_size=8",
        "--set", "model.weights=none", "--set", "model.head_units=16", "--set", "train.transfer.epochs=3",
        "--set", "train.finetune.epochs=0", "--set", "train.early_stopping_patience=null",
        "--set", "train.bn_stats_batches=1", "--set", f"scaling.num_workers={workers}",
        "--set", "scaling.cpus_per_worker=0.5", "--set", "train.top_k=2"])
    if code != 0:
        raise RuntimeError(f"jobs.train with {workers} workers exited {code}")
    summary = json.load(open(os.path.join(out, "summary.json")))
    history = summary["history"]
    return {"workers": workers, "global_batch": summary["scaling"]["global_batch"],
            "examples": [h["examples"] for h in history], "replica_batch": [h["replica_batch"] for h in history],
            "images_per_s": [h["images_per_s"] for h in history[1:]],  # the first epoch includes tracing
            "train_images": TRAIN_IMAGES}


def markdown(results: dict) -> str:
    from pipeline.config import DataConfig

    d = DataConfig()
    first = {int(k): v for k, v in results["first_batch"].items()}  # keys are strings once saved as JSON
    small, large = first[SHARDS], first[10 * SHARDS]
    ratio = large["s"] / small["s"]
    fetched = results["fetched"]
    rows = []
    for w, t in sorted(results["training"].items(), key=lambda kv: int(kv[0])):
        per_epoch = [e / t["train_images"] for e in t["examples"]]
        rows.append(f"| {w} | {t['global_batch']} | {', '.join(str(b) for b in t['replica_batch'])} | "
                    f"{', '.join(f'{x:.2f}' for x in per_epoch)} | {_mark(all(x == 1.0 for x in per_epoch))} | "
                    f"{np.median(t['images_per_s']):.1f} |")
    return f"""## Distributed training input

`python -m tests.benchmarks.run stream` ({results['seconds']:.0f} s). Shards on S3 (moto on
127.0.0.1) read through a byte-counting proxy; default `data` settings (shuffle buffer
{d.shuffle_buffer}, {d.read_parallelism} shards read and {d.download_concurrency} downloaded at once).

| measure | value | target | |
|---|---:|---:|---|
| time to first batch, {10 * SHARDS} shards vs {SHARDS} ({large['s']:.2f} s vs {small['s']:.2f} s; shards fetched by then: {large['shards_fetched']} vs {small['shards_fetched']}) | {ratio:.2f} | <= 1.2 | {_mark(ratio <= 1.2)} |
| bytes fetched per worker per epoch / (dataset bytes / 2), 2 workers | {', '.join(f'{r:.3f}' for r in fetched['ratio'])} | <= 1.1 | {_mark(max(fetched['ratio']) <= 1.1)} |

`jobs.train` with 1, 2 and 3 workers (TensorflowTrainer on CPU, 75x75, head only,
{results['training'][next(iter(results['training']))]['train_images']} training images, `data.batch_size=8`), counted in the train step:

| workers | global batch | images per replica per step | examples per epoch / split | target 1.00 | images/s (reported only) |
|---:|---:|---|---|---|---:|
""" + "\n".join(rows) + "\n"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"
