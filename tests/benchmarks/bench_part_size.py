"""Part files sized for readers: at the default ``score.part_mb`` (128 MiB),
how large a full part's Parquet file comes out.

For each kind of image name (numbered keys in dated folders; 32-hex-digit
hashed names) the job's own sizing (``plan.rows_per_part``: the first 1,000
URIs encoded as a part would hold them, random scores) gives the rows per
part; a part of that many rows is then built as a model would score it (top 5
of 1,000 classes, sorted scores of a Dirichlet draw) and published by
``commit.publish_part`` to local disk. Reported: rows, the file's MiB and its share of the target.

    python -m tests.benchmarks.run part_size
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

CLASSES = 1000
TOP_K = 5
MODEL = "s3://models/inceptionv3/registry#flowers@12"
TARGET_SHARE = (0.5, 1.0)  # a full part between half the target and the target


def _numbered(i: int) -> str:
    return f"s3://photos/2026/11/{1 + i // 1_000_000:02d}/camera-07/img-{i:09d}.jpg"


def _hashed(i: int) -> str:
    return f"s3://photos/by-hash/{np.random.default_rng(i).bytes(16).hex()}.jpg"


NAMES = {"numbered keys in dated folders": _numbered, "hashed names (32 hex digits)": _hashed}


def _top_k(rows: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A model's top k: distinct-enough class indices, and scores that sum to
    less than 1, sorted (the top k of a Dirichlet draw over k + 1 parts)."""
    scores = rng.dirichlet(np.full(TOP_K + 1, 0.3), size=rows).astype(np.float32)[:, :TOP_K]
    return rng.integers(0, CLASSES, (rows, TOP_K)).astype(np.int32), -np.sort(-scores, axis=1)


def run() -> dict:
    import pyarrow as pa

    from pipeline.config import load_config
    from pipeline.scoring.commit import publish_part, to_table
    from pipeline.scoring.decode import NO_ERROR
    from pipeline.scoring.plan import ScorePlan, rows_per_part

    started = time.time()
    cfg = load_config(None, [])
    labels = [f"n{i:08d}" for i in range(CLASSES)]
    results: dict = {"part_mb": cfg.score.part_mb, "classes": CLASSES, "top_k": TOP_K, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in NAMES.items():
            plan = ScorePlan(model=MODEL, model_uri=MODEL, source="s3://photos/", output=tmp, labels=labels,
                             top_k=TOP_K, image_size=299, rows_per_file=0)
            rows = rows_per_part(cfg, plan, [make(i) for i in range(1000)])
            uris = pa.array(sorted(make(i) for i in range(rows)), pa.string())
            index, scores = _top_k(rows, np.random.default_rng(0))
            table = to_table({"uri": uris, "top_k_index": index, "top_k_scores": scores,
                              "error": np.full(rows, NO_ERROR, dtype=object)}, labels, MODEL)
            path = os.path.join(tmp, "part.parquet")
            publish_part(table, uris, path, cfg.storage, tmp_tag="bench")
            size = os.path.getsize(path)
            results["cases"].append({"names": name, "rows": rows, "bytes": size,
                                     "share": round(size / (cfg.score.part_mb * 2**20), 3)})
            os.remove(path)
    results["seconds"] = round(time.time() - started, 1)
    return results


def markdown(results: dict) -> str:
    low, high = TARGET_SHARE
    lines = [f"| {c['names']} | {c['rows']:,} | {c['bytes'] / 2**20:.1f} | {c['share']:.2f} | "
             f"{'PASS' if low < c['share'] <= high else 'MISS'} |" for c in results["cases"]]
    return f"""## Part file size (`score.part_mb`)

`python -m tests.benchmarks.run part_size` ({results['seconds']:.0f} s). At the default `score.part_mb`
({results['part_mb']:g} MiB), the rows per part the job picks from the first 1,000 names
(`plan.rows_per_part`), and the Parquet file of a full part of that many rows as `commit.publish_part`
writes it (top {results['top_k']} of {results['classes']:,} classes; sorted top scores drawn from a
Dirichlet distribution). Target: more than {low:.0%} of `part_mb` and at most all of it.

| names | rows per part | file MiB | share of target | |
|---|---:|---:|---:|---|
""" + "\n".join(lines) + """

The job sizes parts for 5% more bytes a row than the first 1,000 names take (`plan.PART_SIZE_MARGIN`:
later names may compress a little worse), less what the file holds once (footer, the labels'
dictionary); scores, like URIs, are written without a dictionary (`commit.DICTIONARY_COLUMNS`), so a
file's bytes grow with its rows in proportion at any size.
"""
