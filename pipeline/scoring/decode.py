"""CPU side of scoring: files -> the model's input, as uint8 at model size.

``read_and_decode`` reads a batch of files (concurrently), decodes them with
the model's recipe (``pipeline.data.preprocess``: the pixels and resize training
and evaluation used) and rounds the resized images to uint8, a quarter of the
float32 bytes, which is what travels through Ray's object store to the
predictor and on to its device, where they become float32. Files are read
concurrently and each is decoded as soon as it has arrived (order kept). The
resize is TensorFlow's (``ResizeArea``, then ``ResizeBilinear``), which is what
training used: TensorFlow stays in the decode path, since no other library
gives those very pixels. A file that cannot be
scored gets a one-line reason instead (its image stays zeros): the reason is
always a property of the file (not found, too large, undecodable, rejected).
A read that fails for a reason of the moment (throttling, timeouts, 5xx,
connection or credential errors) is retried with backoff and jitter for
``score.read_retry_s``, then raises ``TransientReadError``: the part fails,
never a stored error row.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.data.images import ImageRejected
from pipeline.data.preprocess import Recipe, file_pixels, model_inputs

# Inside the pipeline "no error" is "" rather than null; the Parquet output has null there.
NO_ERROR = ""


class TransientReadError(RuntimeError):
    """A file that kept failing to read for a reason of the moment."""


# Failures that say something about the file itself: an error row.
PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 model inputs in [0, 255] -> the nearest uint8 values."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def read_and_decode(batch: dict, *, storage: StorageConfig, recipe: Recipe, max_bytes: int, max_pixels: int,
                    resize_bytes: int = 64 << 20, retry_s: float = 120.0) -> dict:
    """{uri, size} -> {uri, image: uint8 [N, size, size, 3], error}. Decoded
    images wait for their resize, which runs per group of one shape, up to
    ``resize_bytes`` of them at a time."""
    size = recipe.image_size
    uris = [str(u) for u in batch["uri"]]
    images = np.zeros((len(uris), size, size, 3), np.uint8)
    errors = np.full(len(uris), NO_ERROR, dtype=object)
    pending: list[tuple[int, np.ndarray]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        for (i, _), resized in zip(pending, model_inputs([a for _, a in pending], recipe)):
            images[i] = to_uint8(resized)
        pending.clear()
        pending_bytes = 0

    # Each file is decoded as soon as it and those before it have arrived,
    # while the later ones are still being read.
    for i, raw in enumerate(iter_files(uris, batch["size"], storage, max_bytes, retry_s)):
        if isinstance(raw, str):
            errors[i] = raw
            continue
        try:
            decoded = file_pixels(raw, recipe, max_pixels)
            pending.append((i, decoded))
            pending_bytes += decoded.nbytes
        except ImageRejected as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the job
            errors[i] = f"cannot decode: {st.describe_error(exc)}"
        if pending_bytes >= resize_bytes:
            flush()
    flush()
    return {"uri": np.array(uris, dtype=object), "image": images, "error": errors}


def iter_files(uris: list[str], sizes, storage: StorageConfig, max_bytes: int, retry_s: float = 120.0):
    """Bytes per URI, or a one-line reason that is a property of the file:
    every read starts at once (in the process's fetch threads) and each is
    yielded, in order, as soon as it has arrived, so the caller decodes while
    the rest are read. Raises TransientReadError when a file could not be read
    for ``retry_s`` seconds for any other reason (the reads not yet started
    are then cancelled). A local file's size is looked at in the calling
    thread first: a missing, unreadable or too large one gets its reason
    without a read (the same reasons ``fetch`` gives)."""

    def too_large(size: int) -> Optional[str]:
        if size <= max_bytes:
            return None
        return f"file too large: {size / 2**20:.1f} MiB is over score.max_file_mb ({max_bytes / 2**20:g} MiB)"

    def file_reason(uri: str, exc: Exception) -> Optional[str]:
        """The row's reason when ``exc`` says something about the file; None
        for a failure of the moment (retried)."""
        if isinstance(exc, FileNotFoundError):
            return "cannot read: file not found"
        # A local disk's answer is about the file (permissions, a broken link).
        if isinstance(exc, PERMANENT) or (isinstance(exc, OSError) and st.is_local(uri)):
            return f"cannot read: {st.describe_error(exc)}"
        return None

    def attempt(uri: str, size: int):
        # By the URI's exact key (st.read_bytes): fsspec's path handling would
        # drop a trailing "/" or read "?versionId=" as a version.
        if size < 0:
            size = st.size_of(uri, storage)
        return too_large(size) or st.read_bytes(uri, storage)

    def fetch(item: tuple[str, int]):
        uri, size = item
        deadline = time.monotonic() + retry_s
        backoff = 0.2
        while True:
            try:
                return attempt(uri, size)
            except Exception as exc:  # noqa: BLE001 - a file's own fault is its row, the rest is retried
                reason = file_reason(uri, exc)
                if reason is not None:
                    return reason
                transient = exc
            wait = random.uniform(0, backoff)  # full jitter
            if time.monotonic() + wait > deadline:
                raise TransientReadError(f"cannot read {uri} for {retry_s:g} s (score.read_retry_s): "
                                         f"{st.describe_error(transient)}") from None
            time.sleep(wait)
            backoff = min(backoff * 2, 10.0)

    def local_size(uri: str, size: int):
        """A local file's size (``size`` when known), or its row's reason when
        it is missing, unreadable or too large: answered here, in the calling
        thread (a stat costs a fraction of a hand-off to a fetch thread);
        None: leave it to ``fetch``."""
        if size < 0:
            try:
                size = st.size_of(uri, storage)
            except Exception as exc:  # noqa: BLE001 - None: fetch retries it as it would any read
                return file_reason(uri, exc)
        return too_large(size) or size

    items = list(zip(uris, (int(s) for s in sizes)))
    if len(items) <= 1:
        for item in items:
            yield fetch(item)
        return
    futures = []
    for uri, size in items:
        known = local_size(uri, size) if st.is_local(uri) else None
        if isinstance(known, str):  # the row's reason: no read
            futures.append(known)
        else:
            futures.append(_fetch_pool().submit(fetch, (uri, size if known is None else known)))
    try:
        for future in futures:
            yield future if isinstance(future, str) else future.result()
    finally:
        for future in futures:
            if not isinstance(future, str):
                future.cancel()


_pool: Optional[ThreadPoolExecutor] = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """One pool of fetch threads per process (a Ray worker runs many tasks);
    starting threads anew for each call cost most of a call on missing files."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="score-fetch")
        return _pool
