"""Each training worker streams its own shards: a bounded local cache that
fetches only the shards it is asked for, several at once, ahead of the reader,
and verifies every shard against the manifest before tf.data opens it.

- ``ShardRef``: one manifest entry (URI, size, SHA-256, examples).
- ``ShardCache``: where verified local copies live, at most ``max_bytes`` of
  them (least recently used go first, never a shard the reader still needs).
  Remote shards are downloaded with their SHA-256 computed on the way; local
  shards are read in place and hashed once per process. A shard whose bytes do
  not match its manifest entry (stale, truncated, corrupted) is fetched again
  once, then refused with an error naming it: training never reads it.
- ``ShardStream``: the ordered, endless (or one-pass) sequence of one worker's
  shards, shuffled per pass when training, that asks the cache for the next
  shards while the current ones are read. ``paths()`` is what tf.data's
  ``from_generator`` iterates: it yields a shard's local path as soon as that
  one shard is ready, so the first step never waits for the whole dataset.

No Ray and no TensorFlow imports: testable in plain pytest.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from pipeline import storage as st
from pipeline.config import StorageConfig

log = logging.getLogger(__name__)

CHUNK = 4 << 20


class ShardError(RuntimeError):
    """A shard that cannot be used: missing, or its bytes differ from the manifest."""


@dataclass(frozen=True)
class ShardRef:
    uri: str
    bytes: int
    sha256: Optional[str]  # None for manifests written before content identity
    examples: int

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def cache_key(self) -> str:
        """The cached file's name: the content hash when the manifest has one,
        else the URI and size (older manifests)."""
        if self.sha256:
            return f"{self.sha256}.tfrecord"
        digest = hashlib.sha1(f"{self.uri}\0{self.bytes}".encode()).hexdigest()
        return f"uri-{digest}.tfrecord"


def shard_refs(manifest: dict, data: str, split: str) -> list[ShardRef]:
    return [
        ShardRef(st.join(data, s["file"]), int(s["bytes"]), s.get("sha256"), int(s["examples"]))
        for s in manifest["splits"][split]["shards"]
    ]


def stream_window(download_concurrency: int, read_parallelism: int) -> tuple[int, int]:
    """(shards fetched ahead, shards kept after they were handed to tf.data): the
    interleave may open a shard a little after it is handed over, and keeps
    ``read_parallelism`` open at once (plus as many it prepares ahead). Their sum
    (plus one being fetched) is what a worker's cache must be able to hold."""
    return download_concurrency, 2 * read_parallelism + 2


class ShardCache:
    """Verified local copies of shards, within ``max_bytes`` (None: unbounded).

    Room for a download is granted in the order the shards were asked for, so a
    shard the reader needs next never waits behind one it needs later."""

    def __init__(self, root: str, storage: StorageConfig, *, max_bytes: Optional[int] = None,
                 concurrency: int = 4):
        self.storage = storage
        self.max_bytes = max_bytes
        self.root, self._lock_file, self._private = _claim_folder(root)
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="shard-fetch")
        self._cond = threading.Condition()
        self._futures: dict[str, Future] = {}
        self._resident: "OrderedDict[str, int]" = OrderedDict()  # cached file -> bytes, LRU first
        self._reserved = 0  # bytes of downloads under way
        self._pinned: dict[str, int] = {}  # cached file -> pin count
        self._waiting: list[int] = []  # tickets of downloads waiting for room
        self._tickets = 0
        self._verified_local: set[tuple] = set()
        # Bytes of this cache's files on disk (verified copies and downloads in
        # progress), updated at every write, replace and removal;
        # ``peak_bytes`` is its high-water mark.
        self._disk = 0
        self.stats = {"fetched_bytes": 0, "fetches": 0, "hits": 0, "refetches": 0, "evictions": 0,
                      "peak_bytes": 0}
        for name in sorted(os.listdir(root), key=lambda n: os.path.getmtime(os.path.join(root, n))):
            path = os.path.join(root, name)
            if ".tmp-" in name:
                _unlink(path)  # a download cut short by a killed worker
            elif name.endswith(".tfrecord") and os.path.isfile(path):
                self._resident[name] = os.path.getsize(path)
                self._on_disk(self._resident[name])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
            if self._private:
                shutil.rmtree(self.root, ignore_errors=True)

    # -- public -------------------------------------------------------------

    def prefetch(self, ref: ShardRef) -> Future:
        """Start making ``ref`` available (no-op when it already is or is under way)."""
        key = self._key(ref)
        with self._cond:
            future = self._futures.get(key)
            if future is None or (future.done() and future.exception() is not None):
                self._tickets += 1
                future = self._futures[key] = self._pool.submit(self._ensure, ref, self._tickets)
            return future

    def local_path(self, ref: ShardRef, timeout: Optional[float] = None) -> str:
        """The verified local path of ``ref``, fetching it if needed (blocks)."""
        return self.prefetch(ref).result(timeout)

    def pin(self, ref: ShardRef) -> None:
        """Keep ``ref`` from eviction until the matching ``unpin``."""
        with self._cond:
            self._pinned[ref.cache_key] = self._pinned.get(ref.cache_key, 0) + 1

    def unpin(self, ref: ShardRef) -> None:
        with self._cond:
            left = self._pinned.get(ref.cache_key, 0) - 1
            if left > 0:
                self._pinned[ref.cache_key] = left
            else:
                self._pinned.pop(ref.cache_key, None)
                self._cond.notify_all()

    def resident_bytes(self) -> int:
        with self._cond:
            return sum(self._resident.values())

    def disk_bytes(self) -> int:
        """Bytes of this cache's files on disk now, downloads in progress included
        (``stats["peak_bytes"]``: the most there ever were)."""
        with self._cond:
            return self._disk

    # -- internals ----------------------------------------------------------

    def _on_disk(self, delta: int) -> None:
        """Account a change of the bytes on disk (caller holds ``_cond``, or is the constructor)."""
        self._disk += delta
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], self._disk)

    def _remove(self, name: str) -> None:
        """Delete a cached file and account for it (caller holds ``_cond``)."""
        path = os.path.join(self.root, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return
        _unlink(path)
        self._on_disk(-size)

    def _key(self, ref: ShardRef) -> str:
        return ref.uri if st.is_local(ref.uri) else ref.cache_key

    def _ensure(self, ref: ShardRef, ticket: int) -> str:
        if st.is_local(ref.uri):
            return self._verify_local(ref)
        name = ref.cache_key
        path = os.path.join(self.root, name)
        if os.path.exists(path):
            problem = _mismatch(path, ref)
            if problem is None:
                with self._cond:
                    self._resident[name] = ref.bytes
                    self._resident.move_to_end(name)
                    self.stats["hits"] += 1
                return path
            log.warning("cached copy of %s is unusable (%s); fetching it again", ref.uri, problem)
            self._drop(name)
        problem = None
        for _ in range(2):
            self._make_room(ref.bytes, ticket)
            size, digest = self._download(ref, path)
            problem = _compare(size, digest, ref)
            if problem is None:
                return path
            self._drop(name)
            with self._cond:
                self.stats["refetches"] += 1
        raise ShardError(f"shard {ref.uri} does not match manifest.json ({problem}); "
                         "the shards folder changed under the manifest: run jobs.prepare again")

    def _verify_local(self, ref: ShardRef) -> str:
        path = ref.uri.replace("file://", "")
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise ShardError(f"shard {ref.uri} named by manifest.json is missing") from None
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._verified_local:
            problem = _mismatch(path, ref)
            if problem is not None:
                raise ShardError(f"shard {ref.uri} does not match manifest.json ({problem}); run jobs.prepare again")
            self._verified_local.add(key)
        return path

    def _download(self, ref: ShardRef, path: str) -> tuple[int, str]:
        """Fetch ``ref`` to ``path`` (atomically); returns (bytes, SHA-256)."""
        fs, remote = st.get_fs(ref.uri, self.storage)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        digest = hashlib.sha256()
        got = 0
        written = 0  # bytes of ``tmp`` on disk
        try:
            with fs.open(remote, "rb", block_size=CHUNK) as src, open(tmp, "wb") as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
                    digest.update(block)
                    got += len(block)
                    with self._cond:
                        self._on_disk(len(block))
                        written += len(block)
            with self._cond:
                self._remove(os.path.basename(path))  # a copy replaced (none is expected)
                os.replace(tmp, path)
                written = 0  # now the cached file's bytes
        except FileNotFoundError:
            raise ShardError(f"shard {ref.uri} named by manifest.json is missing") from None
        finally:
            _unlink(tmp)
            with self._cond:
                self._on_disk(-written)
                self._reserved -= ref.bytes
                self.stats["fetched_bytes"] += got
                self.stats["fetches"] += 1
                if os.path.exists(path):
                    self._resident[ref.cache_key] = got
                    self._resident.move_to_end(ref.cache_key)
                self._cond.notify_all()
        return got, digest.hexdigest()

    def _make_room(self, incoming: int, ticket: int) -> None:
        """Reserve ``incoming`` bytes, evicting least recently used unpinned
        shards; waits, in ticket order, while everything resident is pinned."""
        with self._cond:
            if self.max_bytes is None:
                self._reserved += incoming
                return
            if incoming > self.max_bytes:
                raise ShardError(f"a shard of {incoming / 1e9:.3f} GB does not fit in data.cache_max_gb "
                                 f"({self.max_bytes / 1e9:.3f} GB)")
            self._waiting.append(ticket)
            try:
                while True:
                    if min(self._waiting) == ticket:
                        used = sum(self._resident.values()) + self._reserved
                        while used + incoming > self.max_bytes:
                            victim = next((n for n in self._resident if n not in self._pinned), None)
                            if victim is None:
                                break
                            used -= self._resident.pop(victim)
                            self._futures.pop(victim, None)
                            self.stats["evictions"] += 1
                            self._remove(victim)
                        if used + incoming <= self.max_bytes:
                            self._reserved += incoming
                            return
                    if not self._cond.wait(timeout=600):
                        raise ShardError(f"data.cache_max_gb ({self.max_bytes / 1e9:.3f} GB) cannot hold "
                                         "the shards being read at once; raise it")
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def _drop(self, name: str) -> None:
        with self._cond:
            self._resident.pop(name, None)
            self._remove(name)
            self._cond.notify_all()


class ShardStream:
    """One worker's shards in reading order, fetched ``lookahead`` ahead.

    ``paths()`` yields local paths: endlessly, one shuffled pass after another,
    when ``repeat``; otherwise one pass in manifest order. A yielded shard stays
    pinned in the cache for the next ``keep_open`` yields (tf.data's interleave
    may open it a little after it is yielded).

    A shard that cannot be had (missing, changed, unreadable) ends the stream
    and is kept in ``error``: the input pipeline skips undecodable records, and
    would otherwise drop the error with them. ``check()`` raises it; readers
    call it after each step and when the data runs out."""

    def __init__(self, cache: ShardCache, refs: Sequence[ShardRef], *, shuffle: bool, repeat: bool,
                 seed: Optional[int] = None, lookahead: int = 4, keep_open: int = 8,
                 passes: Optional[Callable[[int], Sequence[int]]] = None):
        self.cache, self.refs = cache, list(refs)
        self.error: Optional[BaseException] = None
        self.shuffle, self.repeat, self.seed = shuffle, repeat, seed
        self.lookahead, self.keep_open = max(1, lookahead), max(1, keep_open)
        self._passes = passes  # pass index -> indices into refs, in reading order
        self._items: Optional[Iterator[tuple[int, int, str]]] = None
        self._next_pass: Optional[int] = None

    def plan(self, pass_index: int) -> list[int]:
        """Indices into ``refs`` that pass ``pass_index`` reads, in order: the
        ``passes`` callable's answer, else every shard (shuffled per pass when
        ``shuffle``)."""
        if self._passes is not None:
            return list(self._passes(pass_index))
        order = list(range(len(self.refs)))
        if self.shuffle:
            seed = None if self.seed is None else self.seed * 100_003 + pass_index
            random.Random(seed).shuffle(order)
        return order

    def _sequence(self, first_pass: int = 0) -> Iterator[tuple[int, int, ShardRef]]:
        pass_index = first_pass
        while True:
            for i in self.plan(pass_index):
                yield pass_index, i, self.refs[i]
            pass_index += 1
            if not self.repeat:
                return

    def check(self) -> None:
        """Raise the error that ended the stream, if one did."""
        if self.error is not None:
            raise self.error

    def paths(self) -> Iterator[str]:
        for _, _, path in self._stream(0):
            yield path

    def pass_items(self, pass_index: int) -> Iterator[tuple[int, str]]:
        """(index into ``refs``, local path) of pass ``pass_index`` only: the
        items of ``plan(pass_index)``, in order. Asked for pass after pass, the
        passes come from one stream, so the next pass's first shards are
        fetched while this one is read; asking for any other pass (a new
        iteration, a validation pass again) starts a new stream there. Raises
        the stream's error when a shard cannot be had: a pass is never cut
        short in silence."""
        if self._items is None or self._next_pass != pass_index:
            if self._items is not None:
                self._items.close()
            self._items = self._stream(pass_index)
        self._next_pass = pass_index + 1
        for _ in range(len(self.plan(pass_index))):
            item = next(self._items, None)
            if item is None:
                break
            yield item[1], item[2]
        self.check()

    def _stream(self, first_pass: int) -> Iterator[tuple[int, int, str]]:
        """(pass, index, local path) from ``first_pass`` on, fetched
        ``lookahead`` ahead, each kept pinned for ``keep_open`` yields."""
        if not self.refs:
            return
        upcoming = self._sequence(first_pass)
        ahead: list[tuple[int, int, ShardRef]] = []
        opened: list[ShardRef] = []
        try:
            while True:
                while len(ahead) < self.lookahead:
                    item = next(upcoming, None)
                    if item is None:
                        break
                    self.cache.pin(item[2])
                    self.cache.prefetch(item[2])
                    ahead.append(item)
                if not ahead:
                    return
                pass_index, i, ref = ahead.pop(0)
                try:
                    path = self.cache.local_path(ref)
                except Exception as exc:  # noqa: BLE001 - kept for check(), see the class docstring
                    log.error("%s", exc)
                    self.error = exc
                    self.cache.unpin(ref)
                    return
                yield pass_index, i, path
                opened.append(ref)
                if len(opened) > self.keep_open:
                    self.cache.unpin(opened.pop(0))
        finally:
            for _, _, ref in ahead:
                self.cache.unpin(ref)
            for ref in opened:
                self.cache.unpin(ref)


def _mismatch(path: str, ref: ShardRef) -> Optional[str]:
    size = os.path.getsize(path)
    if size != ref.bytes or not ref.sha256:
        return _compare(size, None, ref)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return _compare(size, digest.hexdigest(), ref)


def _compare(size: int, sha256: Optional[str], ref: ShardRef) -> Optional[str]:
    if size != ref.bytes:
        return f"{size} bytes, expected {ref.bytes}"
    if ref.sha256 and sha256 is not None and sha256 != ref.sha256:
        return "SHA-256 differs"
    return None


def _claim_folder(root: str):
    """(folder, lock, private): ``root`` when no other live process uses it (an
    advisory lock held until close), else a private folder beside it, removed
    on close: two processes never evict each other's shards."""
    for folder, private in ((root, False), (f"{root}-{os.getpid()}", True)):
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return folder, lock, private
        except OSError:
            lock.close()
    raise ShardError(f"cannot lock a cache folder under {root}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
