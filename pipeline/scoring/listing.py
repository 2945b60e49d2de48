"""Finding the inputs: a prefix listed by Ray tasks in parallel, or URI lists
(and S3 Inventory manifests) read as a Ray Dataset; either way the URIs go
into plan files (``pipeline.scoring.parts``) written by the tasks.

Prefix: one task per folder level lists that level with the ``/`` delimiter
(S3: ``ListObjectsV2`` pages, in key order; local disks: one ``scandir``),
writes the image files it finds as plan files of ``rows_per_file`` sorted
URIs, and returns the sub-prefixes, which the driver hands to new tasks, at
most ``score.list_concurrency`` at a time. On S3 a task that finds more than
a page sizes the rest of its level (``split_points``: ``StartAfter`` probes)
and hands it back as key ranges, each listed by a task of its own, which may
split again. The last files of a folder or range, fewer than
``rows_per_file``, are packed by the driver with other folders' into parts of
``rows_per_file``. Parts are yielded as they are made (``iter_prefix``). S3
keys and CommonPrefixes are used exactly as S3 returns them (``imgs//`` is a
level of its own below ``imgs/``; nothing is stripped, collapsed, encoded or
decoded), and a URI is ``s3://bucket/`` followed by the key.

Lists: ``.txt`` (one entry per line, ``#`` comments), ``.csv`` with a ``uri``
column, ``.parquet`` with a ``uri`` column or ``bucket`` and ``key`` columns
(an S3 Inventory data file; its ``size`` column is used when present), an S3
Inventory ``manifest.json`` (its CSV or Parquet data files read by one task
each). Every entry is checked (``pipeline.scoring.entries``) and hashed to one
of ``ceil(entries / rows_per_file)`` parts, so a URI listed twice, anywhere,
is scored once.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.data.images import has_image_extension
from pipeline.scoring.entries import EntryRejected, check_entry
from pipeline.scoring.parts import write_plan_chunk
from pipeline.storage.s3parse import cycle_collection_paused, fast_listing

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv", ".parquet", "manifest.json")
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
    ends. Page by page (a page's files, then its sub-prefixes): a caller
    that stops early has made only the requests it needed."""
    bucket, _, key = path.partition("/")
    prefix = key if not key or key.endswith("/") else key + "/"
    token: Optional[str] = None
    fast_listing(fs)
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            if obj["Key"] != prefix:  # the folder marker of this level is not a file in it
                yield "file", f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0)
        for p in page.get("CommonPrefixes", []):
            if len(p["Prefix"]) > len(prefix) and p["Prefix"].startswith(prefix):
                yield "dir", f"{bucket}/{p['Prefix']}", 0
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break


PAGE_KEYS = 1000  # keys per ListObjectsV2 request
SPLIT_PIECES = 8  # key ranges a listing task hands out when it splits
SPLIT_MIN_PAGES = 4  # a task splits when at least this many pages seem to remain; no piece is smaller
SPLIT_PROBES = 24  # StartAfter probes a task spends sizing what remains
PROBE_ROUND = 8  # probes a task sends at once
NARROW_ROUNDS = 2  # rounds that narrow the end down, after the rounds that find it
_DIGITS = 24  # characters of a key that split points look at


class _KeySpace:
    """Keys (after their level's prefix) as numbers, in key order: a mixed
    radix in which each of the first ``_DIGITS`` positions has its own
    alphabet, the classes of the characters seen there in the sample (a digit
    brings all ten digits, a lower-case letter all 26, an upper-case one all
    26, any other character itself; a space stands for "ended") and a
    character not in it counts as the nearest lower one. So keys such as
    ``img-000123.jpg`` spread over a range as evenly as their digits do, their
    fixed characters costing nothing. Monotone, not one-to-one: split points
    are checked against the keys."""

    def __init__(self, sample: list[str]):
        import string

        classes = (string.digits, string.ascii_lowercase, string.ascii_uppercase)
        seen: list[set] = [{" "} for _ in range(_DIGITS)]
        for k in sample:
            for i, c in enumerate(k[:_DIGITS]):
                seen[i].update(next((cls for cls in classes if c in cls), c))
        self.alphabets = [sorted(chars) for chars in seen]
        self.top = 1
        for alphabet in self.alphabets:
            self.top *= len(alphabet)
        self.top -= 1

    def number(self, suffix: str) -> int:
        import bisect

        n = 0
        for i, alphabet in enumerate(self.alphabets):
            rank = max(bisect.bisect_right(alphabet, suffix[i]) - 1, 0) if i < len(suffix) else 0
            n = n * len(alphabet) + rank
        return n

    def key(self, n: int) -> str:
        chars = []
        for alphabet in reversed(self.alphabets):
            n, d = divmod(n, len(alphabet))
            chars.append(alphabet[d])
        return "".join(reversed(chars)).rstrip(" ")


def split_points(probe, prefix: str, first: str, last: str, end: Optional[str], *, pieces: int = SPLIT_PIECES,
                 min_pages: int = SPLIT_MIN_PAGES, probes: int = SPLIT_PROBES, sample: tuple = ()) -> list[str]:
    """Where to split the keys after ``last`` (up to ``end``, inclusive; None:
    the end of the level) into key ranges of about equal numbers of keys,
    judged from a page that went from ``first`` to ``last``. ``probe(afters)``
    answers a round of points at once (for each, the first key after it, or
    None): the key span of that page extended 4x, 16x, ... (``PROBE_ROUND``
    points a round) tells whether keys remain beyond each, until a point has
    none; then ``NARROW_ROUNDS`` rounds of points evenly between the last point
    with keys and the first without narrow the end down, ``probes`` points in
    all; that
    stretch is cut into at most ``pieces`` equal spans of at least
    ``min_pages`` pages each (a task for less costs more than it saves), and
    its end is a point too (the range past it is empty: one request). A range
    with an ``end`` is cut without probes. [] when fewer than ``min_pages``
    pages seem to remain, or (a range with an ``end``) too few for two spans. The points are strictly increasing and
    strictly between ``last`` and ``end``; correctness never depends on them
    (ranges always cover everything), only balance does."""
    space = _KeySpace([k[len(prefix):] for k in (first, last, *sample, *([end] if end else []))])
    x0, x1 = space.number(first[len(prefix):]), space.number(last[len(prefix):])
    top = space.number(end[len(prefix):]) if end is not None else space.top
    span = max(x1 - x0, 1)
    budget = probes if end is None else 0  # a known end needs no probes

    def beyond(ns: list[int]) -> list[Optional[bool]]:
        """For each point: keys of the range after it (None: not a point after ``last``)."""
        nonlocal budget
        afters = [prefix + space.key(n) for n in ns]
        asked = [a for a in afters if a > last]
        budget -= len(asked)
        got = dict(zip(asked, probe(asked))) if asked else {}
        return [None if a <= last else (got[a] is not None and (end is None or got[a] <= end)) for a in afters]

    def narrow(ns: list[int], known: int, reach: int) -> tuple[int, int]:
        """Keys lie before a point and none after it, in key order: the last
        point with keys beyond it and the first without."""
        for n, more in zip(ns, beyond(ns)):
            if more and reach > n:
                known = max(known, n)
            elif more is False:
                reach = min(reach, n)
        return known, reach

    reach, known, mult = top, x1, 4
    while budget > 0 and reach == top:  # rounds of the 4x ladder until a point has no keys after it
        ladder = []
        while len(ladder) < min(PROBE_ROUND, budget) and x1 + span * mult < top:
            ladder.append(x1 + span * mult)
            mult *= 4
        if not ladder:
            break
        known, reach = narrow(ladder, known, reach)
    for _ in range(NARROW_ROUNDS):  # the end to within 1/81 of the stretch
        k = min(PROBE_ROUND, budget, reach - known - 1)
        if k < 1 or reach == top:
            break
        known, reach = narrow(sorted({known + (reach - known) * i // (k + 1) for i in range(1, k + 1)}), known, reach)
    pages = (reach - x1) // span
    n = int(min(pieces, pages // max(min_pages, 1)))
    if n < 2 and not (end is None and reach < top and pages >= min_pages):
        return []
    n = max(n, 1)
    points: list[str] = []
    cuts = [x1 + (reach - x1) * i // n for i in range(1, n)]
    if end is None and reach < top:
        cuts.append(reach)  # the probes found no key after it: the open range past it is empty
    for cut in cuts:
        point = prefix + space.key(cut)
        if point > (points[-1] if points else last) and (end is None or point < end):
            points.append(point)
    return points


def _iter_s3_range(fs, path: str, start_after: Optional[str], end: Optional[str], split: Optional[dict],
                   handed: list) -> Iterator[tuple[str, str, int]]:
    """Like ``_iter_s3_level`` for the keys of the level in (``start_after``,
    ``end``] (None: from the start, to the end). With ``split`` (keyword
    arguments of ``split_points``), after its first full page the task sizes
    what remains and, when it is large, appends the ranges of the rest to
    ``handed`` and stops: other tasks list them. A CommonPrefix belongs to the
    range that holds its own string (S3 repeats one whose keys span ranges)."""
    bucket, _, key = path.partition("/")
    prefix = key if not key or key.endswith("/") else key + "/"
    page_keys = (split or {}).get("page_keys", PAGE_KEYS)
    token: Optional[str] = None
    dirs: list[str] = []
    first_page = True
    fast_listing(fs)
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": page_keys}
        if token:
            kwargs["ContinuationToken"] = token
        elif start_after is not None:
            kwargs["StartAfter"] = start_after
        page = fs.call_s3("list_objects_v2", **kwargs)
        contents = page.get("Contents", [])
        common = [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        past_end = False
        for obj in contents:
            if end is not None and obj["Key"] > end:
                past_end = True
                break
            if obj["Key"] != prefix:  # the folder marker of this level is not a file in it
                yield "file", f"{bucket}/{obj['Key']}", int(obj.get("Size") or 0)
        for p in common:
            if end is not None and p > end:
                past_end = True
            elif (len(p) > len(prefix) and p.startswith(prefix)
                  and (start_after is None or p > start_after)):
                dirs.append(f"{bucket}/{p}")
        token = page.get("NextContinuationToken")
        if past_end or not page.get("IsTruncated") or not token:
            break
        seen = [o["Key"] for o in contents] + common
        if first_page and split and seen:
            def probe(afters: list[str]) -> list[Optional[str]]:
                """The first key after each point, the requests at once."""
                def first_after(after: str) -> Optional[str]:
                    got = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, StartAfter=after, MaxKeys=1)
                    return next((o["Key"] for o in got.get("Contents", [])), None)

                with ThreadPoolExecutor(len(afters)) as pool:
                    return list(pool.map(first_after, afters))

            last = max(seen)
            opts = {k: v for k, v in split.items() if k in ("pieces", "min_pages", "probes")}
            points = split_points(probe, prefix, min(seen), last, end, sample=tuple(seen[::16]), **opts)
            if points:
                bounds = [last, *points, end]
                handed.extend((bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
                break
        first_page = False
    for d in dirs:
        yield "dir", d, 0


def list_level(prefix: str, like: str, storage: StorageConfig, plan_dir: str, rows_per_file: int,
               start_after: Optional[str] = None, end: Optional[str] = None, split: Optional[dict] = None,
               loose_below: int = 0) -> dict:
    """One listing task: the image files directly under ``prefix`` (on S3: in
    the key range (``start_after``, ``end``]) into plan files of
    ``rows_per_file`` sorted URIs; returns {"prefixes": sub-prefixes,
    "ranges": [(start_after, end)] of this level for other tasks (``split``),
    "parts": descriptors, "loose": [(uri, size)] of the last few files when
    fewer than ``loose_below`` (the driver packs them with other folders'),
    "files": images found, "ignored": other files, "range": (prefix, after,
    end) this task listed, "took": (start, end) times}. An S3 ``prefix`` is taken exactly as written: one that ends in
    ``/`` is that level (see ``_iter_s3_level``)."""
    with cycle_collection_paused():
        return _list_level(prefix, like, storage, plan_dir, rows_per_file, start_after, end, split, loose_below)


def _list_level(prefix: str, like: str, storage: StorageConfig, plan_dir: str, rows_per_file: int,
                start_after: Optional[str], end: Optional[str], split: Optional[dict], loose_below: int) -> dict:
    started = time.time()
    fs, path = st.get_fs_exact(prefix, storage)
    prefixes, parts, handed = [], [], []
    uris: list[str] = []
    sizes: list[int] = []
    images = ignored = 0
    if st.protocol(fs.unstrip_protocol(path)) in ("s3", "s3a"):
        entries = _iter_s3_range(fs, path, start_after, end, split, handed)
    else:
        entries = iter_level(fs, path)
    for kind, name, size in entries:
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
    loose: list = []
    if uris and len(uris) < loose_below:
        loose = list(zip(uris, sizes))
    elif uris:
        parts.append(write_plan_chunk(plan_dir, uris, sizes, storage))
    return {"prefixes": prefixes, "ranges": handed, "parts": parts, "loose": loose, "files": images,
            "ignored": ignored, "range": (prefix, start_after, handed[0][0] if handed else end),
            "took": (started, time.time())}


def iter_prefix(root: str, storage: StorageConfig, plan_dir: str, rows_per_file: int, concurrency: int,
                stats: dict, *, split: bool = True, pack: bool = True, stop=None) -> Iterator[dict]:
    """List ``root`` recursively with Ray tasks, at most ``concurrency`` at a
    time, yielding part descriptors (index -1) as the tasks produce them. A
    task hands back the sub-prefixes of its level and, on S3, the key ranges
    of a large level it split (``split``); each becomes a task. The last files
    of a folder, fewer than ``rows_per_file``, are packed with those of other
    folders into parts of ``rows_per_file`` (``pack``; the driver holds at
    most one part's URIs). ``stats`` gets "ignored", "tasks" and "files";
    "record" (a list), if present, one entry per task (range, start, end).
    ``stop()`` true: cancel and return."""
    import ray

    # No CPU of Ray's: a decode task (one CPU) of a part scored while the
    # listing goes on would otherwise wait until no listing task holds a
    # share of a CPU, i.e. for the whole listing on a small cluster. As many
    # at once as when each held a third of a CPU: a page costs a task about
    # 10-15 ms of CPU (s3parse) and S3 some 30 ms or more to answer, so three
    # keep a CPU busy; more only start more worker processes.
    task = ray.remote(num_cpus=0, max_retries=3)(list_level)
    concurrency = max(1, min(concurrency, int(3 * ray.cluster_resources().get("CPU", 1))))
    split_opts = {"page_keys": PAGE_KEYS, "pieces": SPLIT_PIECES, "min_pages": SPLIT_MIN_PAGES,
                  "probes": SPLIT_PROBES} if split else None
    todo: deque[tuple] = deque([(root_level(root), None, None)])
    running: dict = {}
    packed: list = []
    stats.setdefault("ignored", 0)
    stats.setdefault("tasks", 0)
    stats.setdefault("files", 0)
    loose_below = rows_per_file if pack else 0
    try:
        while todo or running:
            while todo and len(running) < concurrency:
                prefix, after, end = todo.popleft()
                running[task.remote(prefix, root, storage, plan_dir, rows_per_file, after, end, split_opts,
                                    loose_below)] = prefix
                stats["tasks"] += 1
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            if stop is not None and stop():
                return
            for ref in done:
                prefix = running.pop(ref)
                result = ray.get(ref)
                todo.extend((prefix, a, b) for a, b in result["ranges"])
                todo.extend((p, None, None) for p in result["prefixes"])
                stats["ignored"] += result["ignored"]
                stats["files"] += result["files"]
                if "record" in stats:
                    stats["record"].append({"range": result["range"], "took": result["took"],
                                            "handed": len(result["ranges"])})
                yield from result["parts"]
                packed.extend(result["loose"])
                while len(packed) >= rows_per_file:
                    yield _pack(packed[:rows_per_file], plan_dir, storage)
                    del packed[:rows_per_file]
        if packed:
            yield _pack(packed, plan_dir, storage)
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _pack(entries: list, plan_dir: str, storage: StorageConfig) -> dict:
    entries = sorted(entries)
    return write_plan_chunk(plan_dir, [u for u, _ in entries], [s for _, s in entries], storage)


def list_prefix(root: str, storage: StorageConfig, plan_dir: str, rows_per_file: int,
                concurrency: int, **kwargs) -> tuple[list[dict], int, int]:
    """All of ``iter_prefix`` at once: (part descriptors, files ignored,
    listing tasks run)."""
    stats: dict = {}
    parts = list(iter_prefix(root, storage, plan_dir, rows_per_file, concurrency, stats, **kwargs))
    return parts, stats["ignored"], stats["tasks"]


def root_level(root: str) -> str:
    """The level ``--images`` names: an S3 root's trailing slashes mean the
    folder, as they do in the plan's record of the source (``s3://b/imgs``,
    ``s3://b/imgs/`` and ``s3://b/imgs//`` all list ``imgs/``); the levels
    below are the CommonPrefixes as S3 returns them."""
    if st.s3_bucket_key(root) is None:
        return root
    return root.rstrip("/") + "/"


def first_level(root: str, storage: StorageConfig) -> bool:
    """Whether ``root`` holds an image file or a sub-prefix directly: the
    driver's one look at a prefix before Ray starts, a few requests whatever
    its size (it stops at the first of either: on S3, for a level of images
    or of folders, its first page); the listing is the listing tasks' work."""
    fs, _ = st.check_source(root, storage)
    _, path = st.get_fs_exact(root_level(root), storage)
    for kind, name, _ in iter_level(fs, path):
        if kind == "dir" or has_image_extension(name.rsplit("/", 1)[-1]):
            return True
    return False


SAMPLE_URIS = 1000  # image URIs the driver reads to size parts (score.part_mb)
SAMPLE_LEVELS = 32  # folders it looks into for them, at most (not on S3: one request)


def sample_uris(root: str, storage: StorageConfig, n: int = SAMPLE_URIS) -> list[str]:
    """Up to ``n`` image URIs under ``root``, the first in name order at any
    depth, as listing writes them: what a part's size in bytes is estimated
    from. On S3 one ``ListObjectsV2`` request without a delimiter; elsewhere
    the first folders, depth first. ``root`` is a folder or prefix
    (``first_level`` checked it)."""
    fs, path = st.get_fs_exact(root_level(root), storage)
    names: list[str] = []
    if st.protocol(fs.unstrip_protocol(path)) in ("s3", "s3a"):
        bucket, _, key = path.partition("/")
        fast_listing(fs)
        # Failing here (the first level was just listed) is a failure of the
        # moment: the job's error, exit 1, like first_level's.
        page = fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=PAGE_KEYS,
                          Prefix=key if not key or key.endswith("/") else key + "/")
        names = [f"{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
    else:
        stack, looked = [path], 0
        while stack and len(names) < n and looked < SAMPLE_LEVELS:
            dirs = []
            looked += 1
            for kind, name, _ in iter_level(fs, stack.pop()):
                if kind == "dir":
                    dirs.append(name)
                elif has_image_extension(name.rsplit("/", 1)[-1]):
                    names.append(name)
                    if len(names) >= n:
                        break
            stack.extend(reversed(dirs))
    return [st.full_uri(fs, name, like=root) for name in names if has_image_extension(name.rsplit("/", 1)[-1])][:n]


# ---------------------------------------------------------------- URI lists


def list_kind(uri: str) -> str:
    if uri.lower().endswith("manifest.json"):
        return "manifest"
    return uri.lower().rsplit(".", 1)[-1]


# ---------------------------------------------------------------- S3 Inventory


def read_manifest(uri: str, storage: StorageConfig) -> dict:
    """An S3 Inventory ``manifest.json``, checked: {"bucket": sourceBucket,
    "format": "CSV" | "Parquet", "schema": [column names], "files": [URIs of
    its data files, in the manifest's own bucket]}. UsageError otherwise."""
    import json

    bucket_key = st.s3_bucket_key(uri)
    try:
        manifest = json.loads(st.read_bytes(uri, storage))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read the S3 Inventory manifest {uri}: {st.describe_error(exc)}") from None
    if bucket_key is None:
        raise UsageError(f"{uri}: an S3 Inventory manifest is read from its S3 bucket (s3://...)")
    fmt = str(manifest.get("fileFormat", "")) if isinstance(manifest, dict) else ""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    schema = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",") if c.strip()] \
        if isinstance(manifest, dict) else []
    if fmt.lower() not in ("csv", "parquet") or not isinstance(files, list) or not files \
            or not all(isinstance(f, dict) and f.get("key") for f in files) or not manifest.get("sourceBucket"):
        raise UsageError(f"{uri} is not an S3 Inventory manifest of CSV or Parquet files (it needs sourceBucket, "
                         "fileFormat CSV or Parquet, fileSchema and files with keys)")
    if fmt.lower() == "csv" and "Key" not in schema:
        raise UsageError(f"{uri}: fileSchema {manifest.get('fileSchema')!r} has no Key column")
    home = bucket_key[0]
    return {"bucket": str(manifest["sourceBucket"]), "format": fmt.lower(), "schema": schema,
            "files": [f"s3://{home}/{f['key']}" for f in files]}


def read_inventory_file(uri: str, fmt: str, schema: list, source_bucket: str, storage: StorageConfig) -> pa.Table:
    """One data file of an S3 Inventory: {bucket, key, size} of its image
    keys. CSV files are gzip-compressed, without a header, their columns those
    of ``schema`` and their keys URL-encoded (decoded here); Parquet files
    have lower-case columns and plain keys."""
    import gzip
    import io
    from urllib.parse import unquote_plus

    from pyarrow import csv

    data = st.read_bytes(uri, storage)
    if fmt == "csv":
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        names = [c for c in schema]
        table = csv.read_csv(io.BytesIO(data), read_options=csv.ReadOptions(column_names=names),
                             convert_options=csv.ConvertOptions(column_types={n: pa.string() for n in names}))
        keys = [unquote_plus(k) if k else "" for k in table.column("Key").to_pylist()]
        buckets = table.column("Bucket").to_pylist() if "Bucket" in names else [source_bucket] * len(keys)
        sizes = table.column("Size").to_pylist() if "Size" in names else [None] * len(keys)
    else:
        table = pq.read_table(io.BytesIO(data))
        names = table.column_names
        keys = table.column("key").to_pylist()
        buckets = table.column("bucket").to_pylist() if "bucket" in names else [source_bucket] * len(keys)
        sizes = table.column("size").to_pylist() if "size" in names else [None] * len(keys)
    rows = [(b or source_bucket, k, -1 if s in (None, "") else int(s)) for b, k, s in zip(buckets, keys, sizes)
            if k and not k.endswith("/") and has_image_extension(k.rsplit("/", 1)[-1])]
    return pa.table({"bucket": pa.array([r[0] for r in rows], pa.string()),
                     "key": pa.array([r[1] for r in rows], pa.string()),
                     "size": pa.array([r[2] for r in rows], pa.int64())})


def _read_inventory_batch(batch: pa.Table, *, fmt: str, schema: list, source_bucket: str,
                          storage: StorageConfig) -> pa.Table:
    tables = [read_inventory_file(u, fmt, schema, source_bucket, storage) for u in batch.column("file").to_pylist()]
    return pa.concat_tables(tables)


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


def check_list_head(uri: str, storage: StorageConfig, allowed: frozenset[str]) -> list[str]:
    """Before Ray starts: the list is readable, has the columns it needs, names
    at least one image in its first entries, and those entries are allowed.
    Returns the image URIs of those entries (none for an S3 Inventory)."""
    kind = list_kind(uri)
    if kind == "manifest":
        read_manifest(uri, storage)
        if "s3" not in allowed:
            raise UsageError(f"{uri}: an S3 Inventory names s3:// objects, which are not allowed here")
        return []
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
    return found


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
                                      "first": "", "uris_hash": "", "rejected": min(reasons)}])
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

    kind = list_kind(uri)
    rows = None
    if kind == "manifest":
        manifest = read_manifest(uri, storage)
        # One task per data file, reading it whole; the entries are counted to size the parts.
        ds = ray.data.from_items([{"file": f} for f in manifest["files"]], override_num_blocks=len(manifest["files"]))
        ds = ds.map_batches(_read_inventory_batch, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"fmt": manifest["format"], "schema": manifest["schema"],
                                       "source_bucket": manifest["bucket"], "storage": storage}).materialize()
        rows = ds.count()
        return _hash_into_parts(ds, rows, uri, storage, allowed, plan_dir, rows_per_file)
    fs, path = st.get_fs(uri, storage)
    filesystem = PyFileSystem(FSSpecHandler(fs))
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
    return _hash_into_parts(ds, rows, uri, storage, allowed, plan_dir, rows_per_file)


def _hash_into_parts(ds, rows: int, uri: str, storage: StorageConfig, allowed: frozenset[str], plan_dir: str,
                     rows_per_file: int) -> list[dict]:
    """Entries of a list's rows, checked and hashed into about ``rows /
    rows_per_file`` parts by Ray Data tasks, each part's sorted URIs written
    as its plan file."""
    import ray

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
                         "(.txt, .csv with a 'uri' column, .parquet with 'uri' or 'bucket' and 'key' columns, "
                         "or an S3 Inventory manifest.json)")
    return is_file
