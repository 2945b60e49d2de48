"""The output: the Parquet schema, building a part's rows, and publishing a
part so that a visible part is always complete and matches its plan.

A part is sorted by URI, checked against its plan (exactly its URIs, each
once), written to a local file and published atomically under its fixed name
``part-<index>-<hash of its URIs>.parquet``: a part written twice (a retried
task, a re-run) is the same file, and a killed writer leaves nothing that looks
complete. ``_summary.json`` and ``_plan/`` start with an underscore, which
Parquet readers (pyarrow, pandas, DuckDB globs of ``*.parquet``, Spark) skip.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.scoring.decode import NO_ERROR

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("top_k_labels", pa.list_(pa.string())),
        ("top_k_scores", pa.list_(pa.float32())),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
SUMMARY_NAME = "_summary.json"


def reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def to_table(batch: dict, labels: list[str], model: str) -> pa.Table:
    """Scored rows {uri, top_k_index, top_k_scores, error} -> rows of the
    output schema (error rows: no label, empty top-k lists)."""
    errors = np.asarray(batch["error"], dtype=object)
    ok = errors == NO_ERROR
    index = np.asarray(batch["top_k_index"])
    scores = np.asarray(batch["top_k_scores"], dtype=np.float32)
    names = np.asarray(labels, dtype=object)
    k = index.shape[1]
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32))
    top_labels = pa.ListArray.from_arrays(offsets, pa.array(names[index[ok]].ravel(), pa.string()))
    top_scores = pa.ListArray.from_arrays(offsets, pa.array(scores[ok].ravel(), pa.float32()))
    first = np.where(ok, index[:, 0], 0)
    columns = [
        pa.array([str(u) for u in batch["uri"]], pa.string()),
        pa.array(names[first], pa.string(), mask=~ok),
        pa.array(scores[:, 0], pa.float32(), mask=~ok),
        top_labels,
        top_scores,
        pa.array(errors, pa.string(), mask=ok),
        pa.array([model] * len(errors), pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def publish_part(table: pa.Table, uris: pa.Array, uri: str, storage: StorageConfig, tmp_tag: str) -> pa.Table:
    """Sort ``table`` by URI, check it holds exactly ``uris`` (the plan's,
    sorted) and publish it at ``uri`` atomically. Returns the sorted table."""
    table = table.take(pc.sort_indices(table, [("uri", "ascending")]))
    if not table.column("uri").equals(pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris):
        # A bug, never silent loss: the part is not published.
        raise RuntimeError(f"{posixpath.basename(uri)}: {table.num_rows} rows do not match its {len(uris)} inputs")
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, posixpath.basename(uri))
        pq.write_table(table, local)
        st.publish_file(local, uri, storage, tmp_tag=tmp_tag)
    return table


def error_counts(table: pa.Table) -> Counter:
    return Counter(reason_kind(e) for e in table.column("error").drop_null().to_pylist())


def committed_errors(uri: str, storage: StorageConfig, rows: int) -> Optional[Counter]:
    """Error reasons of a committed part, or None when it must be written again."""
    try:
        fs, path = st.get_fs(uri, storage)
        with fs.open(path, "rb") as f:
            errors = pq.read_table(f, columns=["error"]).column("error")
    except Exception as exc:  # noqa: BLE001 - an unreadable part is simply scored again
        log.warning("%s is unreadable (%s); scoring its images again", uri, st.describe_error(exc))
        return None
    if len(errors) != rows:
        log.warning("%s has %d rows, expected %d; scoring its images again", uri, len(errors), rows)
        return None
    return Counter(reason_kind(e) for e in errors.to_pylist() if e is not None)


def listdir(uri: str, storage: StorageConfig) -> list[str]:
    try:
        fs, path = st.get_fs(uri, storage)
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list {uri}: {st.describe_error(exc)}") from None


def remove_temp_files(folder: str, storage: StorageConfig, tags: list[str]) -> int:
    """Leftovers of the jobs ``tags`` (killed while publishing on a local disk)."""
    prefixes = tuple(f"{st.TMP_MARK}{t}-" for t in tags if t)
    removed = 0
    for name in listdir(folder, storage):
        if prefixes and name.startswith(prefixes):
            st.remove(st.join(folder, name), storage)
            removed += 1
    return removed
