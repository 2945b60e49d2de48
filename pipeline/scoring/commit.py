"""The output: the Parquet schema, building a part's rows, and publishing a
part so that a visible part is always complete and matches its plan.

A part is sorted by URI, checked against its plan (exactly its URIs, each
once), written to a local file and published atomically under its fixed name
``part-<index>-<hash of its URIs>.parquet``: a part written twice (a retried
task, a re-run) is the same file, and a killed writer leaves nothing that looks
complete. ``_summary.json`` and ``_plan/`` start with an underscore, which
Parquet readers (pyarrow, pandas, DuckDB globs of ``*.parquet``, Spark) skip.

Each part's footer (Parquet key-value metadata, key ``inception_ray.writer``)
records who wrote it: the model as shown, a fingerprint of its weights, its
labels, top-k, the preprocessing recipe and the digest of the part's URIs, and
the part's error counts. A later run keeps a part only when all of these match
its own (``committed_errors`` reads the footer, nothing else).

``_SUCCESS`` (the Hadoop/Spark convention, here holding JSON) is written last
by a run that completed the output, and removed before a run changes anything:
a reader that finds it reads a complete output of one model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
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
# Columns written with a dictionary: the few distinct labels, errors and the
# model. URIs and scores are (nearly) all distinct: a dictionary would only
# cost bytes until Parquet gives it up, which makes a file's size per row
# depend on its rows (and ``part_bytes`` wrong for small parts).
DICTIONARY_COLUMNS = ["label", "top_k_labels.list.element", "error", "model"]
SUMMARY_NAME = "_summary.json"
SUCCESS_NAME = "_SUCCESS"  # written last by a run that completed the output
WRITER_KEY = b"inception_ray.writer"  # a part's footer: who wrote it (JSON)
WRITER_FORMAT = 1
# What must match for a part to be kept: the rows would be the same.
IDENTITY_FIELDS = ("model", "model_fingerprint", "labels", "top_k", "recipe")


def short_digest(obj) -> str:
    """A digest of a JSON-able value (labels, a recipe)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


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
    uri = batch["uri"]
    columns = [
        uri if isinstance(uri, pa.Array) else pa.array([str(u) for u in uri], pa.string()),
        pa.array(names[first], pa.string(), mask=~ok),
        pa.array(scores[:, 0], pa.float32(), mask=~ok),
        top_labels,
        top_scores,
        pa.array(errors, pa.string(), mask=ok),
        pa.array([model] * len(errors), pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def part_bytes(uris: list[str], labels: list[str], top_k: int, model: str) -> tuple[float, int]:
    """(bytes a scored row of these URIs takes in a part file, bytes the file
    takes once), as ``write_part_file`` writes it: the growth from half of
    the URIs (every other one, sorted as in a part) to all of them, plus the
    growth of the other columns from 10,000 to 20,000 rows of random labels
    and scores; what is left of the larger file (footer, the labels'
    dictionary) is the file's own. Random scores do not compress, so the
    rows err on the large side."""
    def size(t: pa.Table) -> int:
        sink = pa.BufferOutputStream()
        write_part_file(t, sink)
        return sink.getvalue().size

    def growth(t: pa.Table) -> tuple[float, int]:
        half = t.take(np.arange(0, t.num_rows, 2))
        full = size(t)
        per_row = (full - size(half)) / max(t.num_rows - half.num_rows, 1)
        return per_row, max(0, int(full - per_row * t.num_rows))

    rng = np.random.default_rng(0)
    n = 20_000
    scores = -np.sort(-rng.random((n, top_k), dtype=np.float32), axis=1)
    rest = to_table({"uri": [""] * n, "top_k_index": rng.integers(0, len(labels), (n, top_k)),
                     "top_k_scores": scores, "error": [NO_ERROR] * n}, labels, model).drop_columns(["uri"])
    per_row, fixed = growth(rest)
    if uris:
        names, _ = growth(pa.table({"uri": pa.array(sorted(uris), pa.string())}))
        per_row += names
    return max(1.0, per_row), fixed


def write_part_file(table: pa.Table, where) -> None:
    """A part's Parquet file (a path or a pyarrow sink)."""
    present = [c for c in DICTIONARY_COLUMNS if c.split(".")[0] in table.column_names]
    pq.write_table(table, where, use_dictionary=present)


def publish_part(table: pa.Table, uris: pa.Array, uri: str, storage: StorageConfig, tmp_tag: str,
                 writer: Optional[dict] = None, part_digest: str = "") -> pa.Table:
    """Sort ``table`` by URI, check it holds exactly ``uris`` (the plan's,
    sorted) and publish it at ``uri`` atomically, ``writer`` (the run's
    identity, ``IDENTITY_FIELDS``) and ``part_digest`` (of its URIs) in its
    footer. Returns the sorted table."""
    table = table.take(pc.sort_indices(table, [("uri", "ascending")]))
    if not table.column("uri").equals(pa.chunked_array([uris]) if isinstance(uris, pa.Array) else uris):
        # A bug, never silent loss: the part is not published.
        raise RuntimeError(f"{posixpath.basename(uri)}: {table.num_rows} rows do not match its {len(uris)} inputs")
    if writer is not None:
        footer = {"format": WRITER_FORMAT, **{k: writer[k] for k in IDENTITY_FIELDS}, "part": part_digest,
                  "rows": table.num_rows, "errors": dict(error_counts(table))}
        table = table.replace_schema_metadata({WRITER_KEY: json.dumps(footer, sort_keys=True).encode("utf-8")})
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, posixpath.basename(uri))
        write_part_file(table, local)
        st.publish_file(local, uri, storage, tmp_tag=tmp_tag)
    return table


def error_counts(table: pa.Table) -> Counter:
    return Counter(reason_kind(e) for e in table.column("error").drop_null().to_pylist())


class NotKept(Exception):
    """Why a committed part is scored again: ``kind`` is ``other model``,
    ``unrecorded`` (written before parts recorded their writer), ``unreadable``
    or ``wrong rows``; the message says which field differs."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_writer(uri: str, storage: StorageConfig) -> tuple[int, Optional[dict]]:
    """(rows, the writer recorded in its footer or None) of a part; reads the
    footer only."""
    fs, path = st.get_fs(uri, storage)
    options = {} if st.is_local(uri) else {"block_size": 2**16, "cache_type": "readahead"}
    with fs.open(path, "rb", **options) as f:
        meta = pq.read_metadata(f)
    raw = (meta.metadata or {}).get(WRITER_KEY)
    return meta.num_rows, (json.loads(raw) if raw else None)


def committed_errors(uri: str, storage: StorageConfig, rows: int, writer: Optional[dict] = None,
                     part_digest: str = "") -> Counter:
    """Error reasons of a committed part written by ``writer`` (the same
    ``IDENTITY_FIELDS``) for the part whose URIs have ``part_digest``; NotKept
    when it must be written again. Reads the part's footer only."""
    try:
        found_rows, found = read_writer(uri, storage)
    except Exception as exc:  # noqa: BLE001 - an unreadable part is simply scored again
        raise NotKept("unreadable", f"unreadable ({st.describe_error(exc)})") from None
    if found_rows != rows:
        raise NotKept("wrong rows", f"{found_rows} rows, the plan says {rows}")
    if writer is None:
        return Counter()
    if not isinstance(found, dict) or "errors" not in found:
        raise NotKept("unrecorded", "no writer in its footer (written before parts recorded their writer)")
    differ = [k for k in IDENTITY_FIELDS if found.get(k) != writer.get(k)]
    if differ:
        what = "; ".join(f"{k} {found.get(k)!r}, now {writer.get(k)!r}" for k in differ)
        raise NotKept("other model", f"written by another model or settings ({what})")
    if found.get("part") != part_digest or found.get("rows") != rows:
        raise NotKept("wrong rows", "its footer names other URIs than the plan's part")
    return Counter({str(k): int(v) for k, v in found["errors"].items()})


def listdir(uri: str, storage: StorageConfig) -> list[str]:
    try:
        fs, path = st.get_fs(uri, storage)
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list {uri}: {st.describe_error(exc)}") from None


# The temporary name of a small file the lease holder writes (the lease, the
# summary, the completion marker), left by a writer killed mid-write.
CONTROL_TEMP = re.compile(r"^\.tmp-[0-9a-f]{12}-(_lease\.json|_summary\.json|_SUCCESS)\.tmp$")


def remove_temp_files(folder: str, storage: StorageConfig, tags: list[str], control: bool = False) -> int:
    """Leftovers of the jobs ``tags`` (killed while publishing on a local
    disk); with ``control``, also those of the lease, summary and marker writes
    (only the lease holder writes them: call it once the lease is ours, before
    our own writers start)."""
    prefixes = tuple(f"{st.TMP_MARK}{t}-" for t in tags if t)
    removed = 0
    for name in listdir(folder, storage):
        if (prefixes and name.startswith(prefixes)) or (control and CONTROL_TEMP.match(name)):
            st.remove(st.join(folder, name), storage)
            removed += 1
    return removed
