"""Conditional writes: read, change, write-if-unchanged, on any store.

The one compare-and-swap mechanism of the project: the registry's pointers and
every output lease (``pipeline.storage.lease``) are written through it, so the
detection of stores that ignore conditional headers lives here once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from pipeline.storage.files import write_bytes
from pipeline.storage.fs import TMP_MARK, get_fs, is_local, protocol, storage_options
from pipeline.storage.settings import StorageConfig

# Small pointer files (the registry's production.json and index.json) are
# updated as read, change, write-if-unchanged. ``read_for_update`` returns the
# content with a token; ``write_if_unchanged`` publishes new content only if the
# object still is what that token describes (token None: only if it does not
# exist yet), and says False otherwise: the caller re-reads and tries again.
#   - S3: a conditional PutObject (``If-Match: <ETag>``, or ``If-None-Match: *``
#     to create), which S3 applies atomically.
#   - local disk: an exclusive ``flock`` of the object's folder (its directory
#     opened read-only), held while the current content is compared and the new
#     one renamed in; no lock file is created, so none is left behind. A file
#     system that cannot lock a directory (some network file systems) gets the
#     lease below instead.
#   - any other store (and an S3-compatible one that ignores the conditions,
#     see ``conditional_writes``): a lease (see ``_lease``), safe only where the store shows
#     a write to every reader within ``LEASE_SETTLE_S`` and holders finish within
#     ``LEASE_TERM_S``.

LEASE_TERM_S = 30.0  # a lease older than this is abandoned and may be taken over
LEASE_SETTLE_S = 1.0  # wait after writing a lease before trusting that it is ours
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _digest(data: Optional[bytes]) -> Optional[str]:
    import hashlib

    return None if data is None else hashlib.sha256(data).hexdigest()


def _is_s3(uri: str) -> bool:
    return protocol(uri) in ("s3", "s3a")


_conditional: dict = {}  # (endpoint, bucket) -> whether the store honours If-Match / If-None-Match
_conditional_lock = threading.Lock()


def conditional_writes(uri: str, storage: StorageConfig) -> bool:
    """Whether ``uri``'s S3 store honours conditional PutObject. Some
    S3-compatible stores ignore the headers and write anyway; found out once per
    process and bucket (a probe object written twice with ``If-None-Match: *``
    beside ``uri``, then removed). Such stores get the lease instead."""
    fs, path = get_fs(uri, storage)
    bucket, key, _ = fs.split_path(path)
    where = (storage_options(uri, storage).get("client_kwargs", {}).get("endpoint_url"), bucket)
    with _conditional_lock:
        if where in _conditional:
            return _conditional[where]
    probe = f"{bucket}/{key.rsplit('/', 1)[0] + '/' if '/' in key else ''}{TMP_MARK}cas-probe-{uuid.uuid4().hex[:12]}"
    _, probe_key, _ = fs.split_path(probe)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=probe_key, Body=b"1", IfNoneMatch="*")
        fs.call_s3("put_object", Bucket=bucket, Key=probe_key, Body=b"2", IfNoneMatch="*")
        honoured = False  # the second write went through: the header was ignored
    except Exception as exc:  # noqa: BLE001
        # A refusal of either write (the first one's too, when a retried request
        # finds its own object) is an answer only a store honouring the header gives.
        if _is_conflict(exc):
            honoured = True
        elif _refused_header(exc):
            honoured = False
        else:
            raise
    finally:
        try:
            fs.rm_file(probe)
        except Exception:  # noqa: BLE001 - a probe left behind is a temporary file, ignored by every reader
            pass
    if not honoured:
        logging.getLogger(__name__).warning(
            "%s does not honour conditional writes (If-None-Match); pointer updates there use a lease",
            where[0] or "S3")
    with _conditional_lock:
        _conditional[where] = honoured
    return honoured


def _refused_header(exc: BaseException) -> bool:
    """A store that answers a conditional PutObject with "not implemented"."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NotImplemented", "InvalidArgument") or status == 501:
                return True
        exc = exc.__cause__
    return False


def read_for_update(uri: str, storage: StorageConfig) -> tuple[Optional[bytes], Optional[str]]:
    """(content, token) of ``uri``; (None, None) when it does not exist."""
    fs, path = get_fs(uri, storage)
    if _is_s3(uri) and conditional_writes(uri, storage):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)

        async def get():
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"]

        try:
            return sync(fs.loop, get)
        except FileNotFoundError:
            return None, None
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return data, _digest(data)


def write_if_unchanged(uri: str, data: bytes, token: Optional[str], storage: StorageConfig) -> Optional[str]:
    """Publish ``data`` at ``uri`` if it still holds what ``token`` (from
    ``read_for_update``) describes, or does not exist when ``token`` is None.
    Returns the token of what was written (for the next update without reading
    it back), or None when another writer came first; nothing is written then."""
    fs, path = get_fs(uri, storage)
    if _is_s3(uri) and conditional_writes(uri, storage):
        bucket, key, _ = fs.split_path(path)
        condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as exc:  # noqa: BLE001 - conflicts are answers, the rest is raised
            if _is_conflict(exc):
                return None
            raise
        return out["ETag"]
    if is_local(uri):
        with _local_lock(path) as locked:
            if locked:
                return _replace_if(uri, fs, path, data, token, storage)
    with _lease(uri, fs, path):
        return _replace_if(uri, fs, path, data, token, storage)


def _replace_if(uri, fs, path, data: bytes, token: Optional[str], storage: StorageConfig) -> Optional[str]:
    try:
        current = fs.cat_file(path)
    except FileNotFoundError:
        current = None
    if _digest(current) != token:
        return None
    write_bytes(uri, data, storage)
    return _digest(data)


def age_s(uri: str, storage: StorageConfig) -> Optional[float]:
    """Seconds since ``uri`` was last written, by the store's own clock where it
    tells it (S3: its ``Date`` header against ``LastModified``), so that hosts
    with skewed clocks agree; None when it does not exist. Asked after reading
    the content, a newer write can only make the content look younger."""
    import calendar
    import time
    from datetime import timezone
    from email.utils import parsedate_to_datetime

    fs, path = get_fs(uri, storage)
    if _is_s3(uri):
        bucket, key, _ = fs.split_path(path)
        try:
            out = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        date = out.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        modified = out.get("LastModified")
        return max(0.0, now - calendar.timegm(modified.utctimetuple())) if modified else 0.0
    try:
        modified = fs.modified(path)
    except FileNotFoundError:
        return None
    if modified.tzinfo is None:  # fsspec's convention for naive times: UTC
        modified = modified.replace(tzinfo=timezone.utc)
    return max(0.0, time.time() - modified.timestamp())


def _is_conflict(exc: BaseException) -> bool:
    """A refused condition (412), a concurrent conditional write (409), or the
    object deleted under an If-Match (NoSuchKey), in botocore's words (found
    under s3fs's translation); not a missing bucket or any other error."""
    first, seen = exc, 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return code in CONFLICT_CODES or code == "NoSuchKey" or status in ("412", "409")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return isinstance(first, FileExistsError)  # s3fs's word for a refused If-None-Match


@contextmanager
def _local_lock(path: str) -> Iterator[bool]:
    """Exclusive use of the folder of ``path`` among processes and threads (an
    ``flock`` of the directory itself: each open of it is its own lock owner);
    yields False, holding nothing, where the file system cannot lock it."""
    import errno
    import fcntl

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


class LeaseBusy(OSError):
    """Another writer held the lease for longer than ``LEASE_TERM_S``."""


@contextmanager
def _lease(uri: str, fs, path: str) -> Iterator[None]:
    """Exclusive use of ``path`` on a store without conditional writes or
    locks: ``<path>.lease`` names its holder and when it was taken. A lease is
    taken when absent or older than ``LEASE_TERM_S``, and trusted only if it
    still names us ``LEASE_SETTLE_S`` later; it is removed afterwards."""
    import random
    import time

    lease = f"{path}.lease"
    holder = uuid.uuid4().hex
    deadline = time.time() + 2 * LEASE_TERM_S
    while True:
        try:
            held = json.loads(fs.cat_file(lease))
        except (FileNotFoundError, ValueError):
            held = None
        if held is None or time.time() - float(held.get("taken", 0)) > LEASE_TERM_S:
            fs.pipe_file(lease, json.dumps({"holder": holder, "taken": time.time()}).encode())
            time.sleep(LEASE_SETTLE_S)
            try:
                if json.loads(fs.cat_file(lease)).get("holder") == holder:
                    break
            except (FileNotFoundError, ValueError):
                pass
        if time.time() > deadline:
            raise LeaseBusy(f"{uri} stayed leased by another writer for {2 * LEASE_TERM_S:g} s")
        time.sleep(random.uniform(0.05, 0.3))
    try:
        yield
    finally:
        try:
            if json.loads(fs.cat_file(lease)).get("holder") == holder:
                fs.rm_file(lease)
        except (FileNotFoundError, ValueError):
            pass
