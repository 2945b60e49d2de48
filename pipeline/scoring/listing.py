"""Finding the inputs: a prefix listed by Ray tasks in parallel, or URI lists
read as a Ray Dataset; either way the URIs go straight into plan files
(``pipeline.scoring.parts``), never through the driver.

Prefix: one task per folder level lists that level with the ``/`` delimiter
(S3: ``ListObjectsV2`` pages, in key order; local disks: one ``scandir``),
writes the image files it finds as plan files of at most ``rows_per_file``
sorted URIs, and returns the sub-prefixes, which the driver hands to new tasks,
at most ``score.list_concurrency`` at a time. A part therefore never spans two
folders, and the same tree always gives the same parts. S3 keys and
CommonPrefixes are used exactly as S3 returns them (``imgs//`` is a level of
its own below ``imgs/``; nothing is stripped, collapsed, encoded or decoded),
and a URI is ``s3://bucket/`` followed by the key.

Lists: ``.txt`` (one entry per line, ``#`` comments), ``.csv`` with a ``uri``
column, ``.parquet`` with a ``uri`` column or ``bucket`` and ``key`` columns
(an S3 Inventory data file; its ``size`` column is used when present). Every
entry is checked (``pipeline.scoring.entries``) and hashed to one of
``ceil(entries / rows_per_file)`` parts, so a URI listed twice, anywhere, is
scored once.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections import deque
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.data.images import has_image_extension
from pipeline.scoring.entries import EntryRejected, check_entry
from pipeline.scoring.parts import write_plan_chunk

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv", ".parquet")
HEAD_ENTRIES = 10_000  # entries of each list the driver checks before Ray starts


# ---------------------------------------------------------------- prefixes


def iter_level(fs, path: str) -> Iterator[tuple[str, str, int]]:
    """("dir", path, 0) and ("file", path, size) directly under ``path``. Files
    come in name order. Symlinked folders are not followed (no loops)."""
    if st.protocol(fs.unstrip_protocol(path)) in ("s3", "s3a"):
        yield from _iter_s3_level(fs, path)
        return
    if getattr(fs, "local_file", False) or type(fs).__name__ == "LocalFileSystem":
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    yield "dir", e.path, 0
                elif e.is_file():
                    yield "file", e.path, e.stat().st_size
            except OSError:  # vanished or unreadable: not an input
                continue
        return
    for info in sorted(fs.ls(path, detail=True), key=lambda i: i["name"]):
        yield ("dir", info["name"], 0) if info["type"] == "directory" else ("file", info["name"], int(info.get("size") or 0))


def _iter_s3_level(fs, path: str) -> Iterator[tuple[str, str, int]]:
    """One ``ListObjectsV2`` level of ``bucket/prefix``. Keys are used exactly
    as S3 returns them: a prefix that ends in ``/`` is listed as it is (the
    common prefix ``imgs//`` is a level of its own, below ``imgs/``), others
    get one ``/``; the sub-prefixes yielded are the CommonPrefixes verbatim,
    trailing slash included, so each is longer than ``prefix`` and the walk
    ends."""
    bucket, _, key = path.partition("/")
    prefix = key if not key or key.endswith("/") else key + "/"
    token: Optional[str] = None
    dirs: list[str] = []
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            if obj["Key"] != prefix:  # the folder marker of this level is not a file in it
                yield "file", f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0)
        dirs.extend(f"{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", [])
                    if len(p["Prefix"]) > len(prefix) and p["Prefix"].startswith(prefix))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
    for d in dirs:
        yield "dir", d, 0


def list_level(prefix: str, like: str, storage: StorageConfig, plan_dir: str, rows_per_file: int) -> dict:
    """One listing task: the image files directly under ``prefix`` into plan
    files; returns {"prefixes": sub-prefixes, "parts": descriptors, "files":
    images found, "ignored": other files}. An S3 ``prefix`` is taken exactly
    as written: one that ends in ``/`` is that level (see ``_iter_s3_level``)."""
    fs, path = st.get_fs_exact(prefix, storage)
    prefixes, parts = [], []
    uris: list[str] = []
    sizes: list[int] = []
    images = ignored = 0
    for kind, name, size in iter_level(fs, path):
        if kind == "dir":
            prefixes.append(st.full_uri(fs, name, like=like))
            continue
        base = name.rsplit("/", 1)[-1]
        if base.startswith(st.TMP_MARK):
            continue
        if not has_image_extension(base):
            ignored += 1
            continue
        uris.append(st.full_uri(fs, name, like=like))
        sizes.append(size)
        images += 1
        if len(uris) == rows_per_file:
            parts.append(write_plan_chunk(plan_dir, uris, sizes, storage))
            uris, sizes = [], []
    if uris:
        parts.append(write_plan_chunk(plan_dir, uris, sizes, storage))
    return {"prefixes": prefixes, "parts": parts, "files": images, "ignored": ignored}


def list_prefix(root: str, storage: StorageConfig, plan_dir: str, rows_per_file: int,
                concurrency: int) -> tuple[list[dict], int, int]:
    """List ``root`` recursively with Ray tasks, at most ``concurrency`` at a
    time. Returns (part descriptors, files ignored, listing tasks run)."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3)(list_level)
    todo: deque[str] = deque([root_level(root)])
    running: dict = {}
    parts: list[dict] = []
    ignored = tasks = 0
    while todo or running:
        while todo and len(running) < concurrency:
            prefix = todo.popleft()
            running[task.remote(prefix, root, storage, plan_dir, rows_per_file)] = prefix
            tasks += 1
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            del running[ref]
            result = ray.get(ref)
            todo.extend(result["prefixes"])
            parts.extend(result["parts"])
            ignored += result["ignored"]
    return parts, ignored, tasks


def root_level(root: str) -> str:
    """The level ``--images`` names: an S3 root's trailing slashes mean the
    folder, as they do in the plan's record of the source (``s3://b/imgs``,
    ``s3://b/imgs/`` and ``s3://b/imgs//`` all list ``imgs/``); the levels
    below are the CommonPrefixes as S3 returns them."""
    if st.s3_bucket_key(root) is None:
        return root
    return root.rstrip("/") + "/"


def first_level(root: str, storage: StorageConfig) -> tuple[bool, bool]:
    """(an image file directly under ``root``, any sub-prefix): the driver's
    one look at a prefix before Ray starts."""
    fs, _ = st.check_source(root, storage)
    _, path = st.get_fs_exact(root_level(root), storage)
    has_image = has_dir = False
    for kind, name, _ in iter_level(fs, path):
        if kind == "dir":
            has_dir = True
        elif has_image_extension(name.rsplit("/", 1)[-1]):
            has_image = True
        if has_image:
            break
    return has_image, has_dir


# ---------------------------------------------------------------- URI lists


def list_kind(uri: str) -> str:
    return uri.lower().rsplit(".", 1)[-1]


def _columns(names: list[str]) -> Optional[list[str]]:
    if "uri" in names:
        return ["uri"] + (["size"] if "size" in names else [])
    if {"bucket", "key"} <= set(names):
        return ["bucket", "key"] + (["size"] if "size" in names else [])
    return None


def entries_of(table: pa.Table) -> tuple[list[str], list[int]]:
    """Raw entries and sizes (-1: unknown) of a batch of a list's rows."""
    names = table.column_names
    if "text" in names:  # read_text
        entries = table.column("text").to_pylist()
    elif "uri" in names:
        entries = table.column("uri").to_pylist()
    else:
        entries = [f"s3://{b}/{k}" if b and k else "" for b, k in
                   zip(table.column("bucket").to_pylist(), table.column("key").to_pylist())]
    sizes = table.column("size").to_pylist() if "size" in names else [None] * len(entries)
    return ["" if e is None else str(e) for e in entries], [-1 if s is None else int(s) for s in sizes]


def check_list_head(uri: str, storage: StorageConfig, allowed: frozenset[str]) -> None:
    """Before Ray starts: the list is readable, has the columns it needs, names
    at least one image in its first entries, and those entries are allowed."""
    kind = list_kind(uri)
    try:
        fs, path = st.get_fs(uri, storage)
        if kind == "parquet":
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                columns = _columns(pf.schema_arrow.names)
                if columns is None:
                    raise UsageError(f"{uri} has no 'uri' column, nor 'bucket' and 'key' columns "
                                     f"(columns: {', '.join(pf.schema_arrow.names)})")
                head = next(pf.iter_batches(batch_size=HEAD_ENTRIES, columns=columns), None)
                table = pa.Table.from_batches([head]) if head is not None else pa.table({"uri": pa.array([], pa.string())})
        else:
            with fs.open(path, "rb") as f:
                lines = []
                for _ in range(HEAD_ENTRIES + 1):
                    line = f.readline()
                    if not line:
                        break
                    lines.append(line.decode("utf-8-sig" if not lines else "utf-8").rstrip("\r\n"))
            if kind == "csv":
                import csv

                rows = list(csv.reader(lines))
                header = rows[0] if rows else []
                if "uri" not in header:
                    raise UsageError(f"{uri} has no 'uri' column (columns: {', '.join(header)})")
                table = pa.table({"uri": [r[header.index("uri")] if len(r) > header.index("uri") else ""
                                          for r in rows[1:]]})
            else:
                table = pa.table({"text": pa.array(lines, pa.string())})
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read the list {uri}: {st.describe_error(exc)}") from None
    base = _list_base(uri, storage)
    entries, _ = entries_of(table)
    try:
        found = [u for u in (check_entry(e, base, allowed, uri) for e in entries) if u is not None]
    except EntryRejected as exc:
        raise UsageError(str(exc)) from None
    if not found and len(entries) < HEAD_ENTRIES:
        raise UsageError(f"{uri} lists no images")


def _list_base(uri: str, storage: StorageConfig) -> str:
    """The list's folder, in the list's own style (a local path stays a path).
    On S3, the list's key up to its last ``/``, exactly (the folder of
    ``lists//l.txt`` is ``lists//``: ``s3://b/lists/`` joined with ``/``)."""
    fs, path = st.get_fs_exact(uri, storage)
    return st.full_uri(fs, path.rsplit("/", 1)[0], like=uri)


REJECTED = -1  # the bucket of entries that are not allowed


def _normalize(table: pa.Table, *, base: str, allowed: frozenset[str], where: str, buckets: int) -> pa.Table:
    """Raw list rows -> {uri, size, bucket, rejected}: an entry that is not
    allowed becomes a row of bucket REJECTED carrying the reason (an exception
    would reach the driver as Ray Data's generic error, without the reason)."""
    entries, sizes = entries_of(table)
    uris, kept, bucket, rejected = [], [], [], []
    for entry, size in zip(entries, sizes):
        try:
            uri = check_entry(entry, base, allowed, where)
        except EntryRejected as exc:
            uris.append("")
            kept.append(-1)
            bucket.append(REJECTED)
            rejected.append(str(exc))
            continue
        if uri is None:
            continue
        uris.append(uri)
        kept.append(size)
        bucket.append(zlib.crc32(uri.encode("utf-8")) % buckets)
        rejected.append("")
    return pa.table({"uri": pa.array(uris, pa.string()), "size": pa.array(kept, pa.int64()),
                     "bucket": pa.array(bucket, pa.int64()), "rejected": pa.array(rejected, pa.string())})


def _write_bucket(table: pa.Table, *, plan_dir: str, storage: StorageConfig) -> pa.Table:
    bucket = int(table.column("bucket")[0].as_py())
    if bucket == REJECTED:
        reasons = table.column("rejected").to_pylist()
        return pa.Table.from_pylist([{"index": REJECTED, "rows": len(reasons), "digest": "", "plan_file": "",
                                      "first": "", "rejected": min(reasons)}])
    sizes: dict[str, int] = {}
    for uri, size in zip(table.column("uri").to_pylist(), table.column("size").to_pylist()):
        sizes[uri] = max(size, sizes.get(uri, -1))
    uris = sorted(sizes)
    desc = write_plan_chunk(plan_dir, uris, [sizes[u] for u in uris], storage, index=bucket)
    return pa.Table.from_pylist([{**desc, "rejected": ""}])


def read_list(uri: str, storage: StorageConfig, allowed: frozenset[str], plan_dir: str,
              rows_per_file: int) -> list[dict]:
    """Part descriptors of a URI list, read and checked by Ray Data tasks.
    Raises EntryRejected for an entry that is not allowed (no plan is then
    recorded; the plan files already written are never used)."""
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = st.get_fs(uri, storage)
    filesystem = PyFileSystem(FSSpecHandler(fs))
    kind = list_kind(uri)
    rows = None
    if kind == "parquet":
        with fs.open(path, "rb") as f:  # the footer only
            meta = pq.ParquetFile(f)
            columns, rows = _columns(meta.schema_arrow.names), meta.metadata.num_rows
        ds = ray.data.read_parquet(path, filesystem=filesystem, columns=columns)
    elif kind == "csv":
        from pyarrow import csv

        ds = ray.data.read_csv(path, filesystem=filesystem,
                               convert_options=csv.ConvertOptions(include_columns=["uri"],
                                                                  column_types={"uri": pa.string()}))
    else:
        ds = ray.data.read_text(path, filesystem=filesystem, encoding="utf-8", drop_empty_lines=True)
    if rows is None:
        rows = count_lines(fs, path) - (1 if kind == "csv" else 0)
    buckets = max(1, math.ceil(rows / rows_per_file))
    ds = ds.map_batches(_normalize, batch_format="pyarrow", zero_copy_batch=True,
                        fn_kwargs={"base": _list_base(uri, storage), "allowed": allowed, "where": uri, "buckets": buckets})
    # Each reduce task writes the parts of several buckets, one after another.
    partitions = max(1, min(buckets + 1, 2 * int(ray.cluster_resources().get("CPU", 1))))
    ds = ds.groupby("bucket", num_partitions=partitions).map_groups(
        _write_bucket, batch_format="pyarrow", fn_kwargs={"plan_dir": plan_dir, "storage": storage})
    found = [dict(row) for row in ds.iter_rows()]
    rejected = sorted(d["rejected"] for d in found if d["index"] == REJECTED)
    if rejected:
        count = sum(d["rows"] for d in found if d["index"] == REJECTED)
        more = f" (and {count - 1} more entries refused)" if count > 1 else ""
        raise EntryRejected(rejected[0] + more)
    for d in found:
        del d["rejected"]
    return found


def count_lines(fs, path: str, chunk: int = 8 << 20) -> int:
    """Lines of a text file, streamed in chunks (memory: one chunk). Sizes the
    hash parts of a list (blank lines and comments count too: parts come out
    slightly smaller than ``rows_per_file``, never larger on average)."""
    lines, last = 0, b"\n"
    with fs.open(path, "rb", block_size=chunk) as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            lines += data.count(b"\n")
            last = data[-1:]
    return lines + (0 if last == b"\n" else 1)


def is_list(uri: str, storage: StorageConfig) -> bool:
    """Whether ``--images`` names a file (a list) rather than a folder/prefix."""
    try:
        fs, path = st.get_fs(uri, storage)
        is_file = fs.isfile(path)
    except Exception as exc:  # noqa: BLE001 - any storage failure is a usage problem here
        raise UsageError(f"cannot read {uri}: {st.describe_error(exc)}") from None
    if is_file and not uri.lower().endswith(LIST_SUFFIXES):
        raise UsageError(f"--images {uri} is a file: give a folder/prefix of images or a list of URIs "
                         "(.txt, .csv with a 'uri' column, or .parquet with 'uri' or 'bucket' and 'key' columns)")
    return is_file
