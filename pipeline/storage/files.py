"""Reading, writing and publishing files at any URI.

Publishing is atomic: a local file is written under a temporary name in the same
folder and renamed; an object store makes an object visible only when its upload
completes, so a killed writer never leaves a complete-looking partial file.
A dry run (``read_only``) refuses every write made through this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

import fsspec

from pipeline.errors import UsageError
from pipeline.storage.fs import TMP_MARK, describe_error, get_fs, get_fs_exact, is_local, s3_bucket_key
from pipeline.storage.settings import StorageConfig


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def full_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """The URI of ``path`` written in the style of ``like``: a plain local path stays
    a plain path, anything with a scheme keeps its scheme. The path is kept as
    it is (an S3 ``bucket/key`` becomes ``s3://bucket/key``, the key verbatim)."""
    if "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = get_fs(uri, storage)
    return fs.exists(path)


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    """The bytes of the file or object ``uri`` names; an S3 key exactly as the
    URI writes it (``imgs//a.jpg``, ``x/``, ``a?versionId=1.jpg``, ``a::b``)."""
    fs, path = get_fs_exact(uri, storage)
    exact = s3_bucket_key(uri)
    if exact is None:
        return fs.cat_file(path)
    return _s3_get(fs, *exact)


def size_of(uri: str, storage: StorageConfig) -> int:
    """The size in bytes of the file or object ``uri`` names (an S3 key as written)."""
    fs, path = get_fs_exact(uri, storage)
    exact = s3_bucket_key(uri)
    if exact is None:
        return int(fs.size(path))
    return int(fs.call_s3("head_object", Bucket=exact[0], Key=exact[1])["ContentLength"])


def _s3_get(fs, bucket: str, key: str) -> bytes:
    """GetObject by bucket and key through the s3fs client (its retries, and
    its errors: FileNotFoundError for a missing key, PermissionError, ...)."""
    from fsspec.asyn import sync

    async def get() -> bytes:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def read_text(uri: str, storage: StorageConfig) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def read_json(uri: str, storage: StorageConfig):
    return json.loads(read_text(uri, storage))


# ---------------------------------------------------------------- dry runs
#
# ``--dry-run`` plans exactly as a real run does, inside ``read_only()``: every
# write through this module is refused (a bug, never a silent write), and
# ``check_writable`` checks what it can without writing.

_read_only = False


class ReadOnlyViolation(RuntimeError):
    """A write attempted during a dry run."""


@contextmanager
def read_only() -> Iterator[None]:
    global _read_only
    previous, _read_only = _read_only, True
    try:
        yield
    finally:
        _read_only = previous


def _refuse_in_dry_run(uri: str) -> None:
    if _read_only:
        raise ReadOnlyViolation(f"dry run: refusing to write {uri}")


def _local_tmp_name(path: str, tag: str = "") -> str:
    """A temporary name beside ``path``; ``tag`` (a job's id) lets that job
    find and remove its own leftovers, and only those. It ends in ``.tmp``, so
    that a reader's glob of ``*.parquet`` never picks up a file being written."""
    head, tail = os.path.split(path)
    tag = f"{tag}-" if tag else ""
    return os.path.join(head, f"{TMP_MARK}{tag}{uuid.uuid4().hex[:12]}-{tail}.tmp")


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Publish ``data`` at ``uri`` atomically."""
    _refuse_in_dry_run(uri)
    fs, path = get_fs(uri, storage)
    if is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _local_tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def write_text(uri: str, text: str, storage: StorageConfig) -> None:
    write_bytes(uri, text.encode("utf-8"), storage)


def write_json(uri: str, obj, storage: StorageConfig) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False) + "\n", storage)


def publish_file(local_path: str, uri: str, storage: StorageConfig, tmp_tag: str = "") -> None:
    """Move a finished local file to ``uri`` atomically (the local file is
    consumed); on a local disk through a temporary name tagged ``tmp_tag``."""
    _refuse_in_dry_run(uri)
    fs, path = get_fs(uri, storage)
    if is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _local_tmp_name(path, tmp_tag)
        try:
            shutil.move(local_path, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        fs.put_file(local_path, path)
        os.unlink(local_path)


def copy_file(src: str, dst: str, storage: StorageConfig) -> None:
    """Copy one file between any two URIs (through a local temporary file), publishing atomically."""
    _refuse_in_dry_run(dst)
    with local_scratch() as scratch:
        local = os.path.join(scratch, "copy")
        fs, path = get_fs(src, storage)
        fs.get_file(path, local)
        publish_file(local, dst, storage)


def remove(uri: str, storage: StorageConfig) -> None:
    _refuse_in_dry_run(uri)
    fs, path = get_fs(uri, storage)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


@contextmanager
def local_scratch(prefix: str = "inception-ray-") -> Iterator[str]:
    """A private local folder, removed afterwards."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_source(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of an input folder/prefix that must exist and be
    readable; anything else is a UsageError with one clear line."""
    try:
        fs, path = get_fs(uri, storage)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot open {uri}: {describe_error(exc)}") from None
    try:
        kind = _source_kind(fs, path, uri)
    except Exception as exc:  # noqa: BLE001 - any storage failure is a usage problem here
        raise UsageError(f"cannot read {uri}: {describe_error(exc)}") from None
    if kind is None:
        raise UsageError(f"source not found: {uri}")
    if kind != "directory":
        raise UsageError(f"source is not a folder or prefix: {uri}")
    return fs, path


def _source_kind(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> Optional[str]:
    """"directory", "file" or None (nothing there), in a few requests however
    many keys the prefix holds. On S3: one ``ListObjectsV2`` of at most one
    key under ``key/`` (the level a listing of ``uri`` starts at: trailing
    slashes mean the folder), and only when nothing is there a HEAD of the
    object itself; a bucket is a folder. Not s3fs's ``isdir``, which lists the
    whole level, every page, into its cache before it answers (about 200
    sequential requests for a flat prefix of 200,000 keys, 21 s at 30 ms a
    request, and the driver's memory growing with the keys) before the job
    could start anything."""
    exact = s3_bucket_key(uri)
    if exact is None:
        if not fs.exists(path):
            return None
        return "directory" if fs.isdir(path) else "file"
    bucket, key = exact[0], exact[1].rstrip("/")
    try:
        if not key:
            return "directory" if fs.exists(bucket) else None
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key + "/", MaxKeys=1)
    except FileNotFoundError:  # no such bucket
        return None
    if page.get("KeyCount") or page.get("Contents") or page.get("CommonPrefixes"):
        return "directory"
    return "file" if fs.exists(path) else None


def check_writable(uri: str, storage: StorageConfig) -> None:
    """Fail early, with one line, when an output location cannot be written.
    In a dry run (``read_only``) nothing is written: a local location must be a
    folder (or not exist yet) under a writable folder, a remote one must be
    reachable; permission to write there is then not proven."""
    if _read_only:
        _check_writable_without_writing(uri, storage)
        return
    probe = join(uri, f"{TMP_MARK}probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"", storage)
        remove(probe, storage)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot write to {uri}: {describe_error(exc)}") from None


def _check_writable_without_writing(uri: str, storage: StorageConfig) -> None:
    fs, path = get_fs(uri, storage)  # an object store's first use probes it (StorageCheckFailed)
    if not is_local(uri):
        bucket = path.split("/", 1)[0]
        try:
            found = fs.exists(bucket)
        except Exception:  # noqa: BLE001 - not visible to these credentials: the real run's probe write decides
            found = True
        if not found:
            raise UsageError(f"cannot write to {uri}: bucket {bucket} does not exist")
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"cannot write to {uri}: it is a file, not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip("/")) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write to {uri}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {uri}: {parent} is not writable")


def list_files(
    fs: fsspec.AbstractFileSystem, path: str
) -> list[tuple[str, int]]:
    """Every file under ``path`` (recursive) with its size, sorted by path.
    Symlink loops and unreadable entries on local disks are skipped by the
    walker; our own temporary files are never listed."""
    found = fs.find(path, detail=True, withdirs=False)
    out = []
    for name, info in found.items():
        if os.path.basename(name).startswith(TMP_MARK):
            continue
        out.append((name, int(info.get("size") or 0)))
    out.sort()
    return out


def relative(path: str, root: str) -> Optional[str]:
    root = root.rstrip("/")
    if path == root or not path.startswith(root + "/"):
        return None
    return path[len(root) + 1 :]
