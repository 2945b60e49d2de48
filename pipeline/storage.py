"""Every input and output is an fsspec URI: a local path, ``file://`` or ``s3://``
(and anything else fsspec reaches) go through the same functions.

Publishing is atomic: a local file is written under a temporary name in the same
folder and renamed; an object store makes an object visible only when its upload
completes, so a killed writer never leaves a complete-looking partial file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

import fsspec
from fsspec.core import url_to_fs

from pipeline.config import StorageConfig
from pipeline.errors import UsageError

TMP_MARK = ".tmp-"


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol(uri) in ("file", "local")


def storage_options(uri: str, storage: StorageConfig) -> dict:
    """fsspec keyword arguments for ``uri`` built from the config, falling back to
    the standard AWS environment for the endpoint (credentials are left to
    botocore's own chain unless the config sets them)."""
    if protocol(uri) not in ("s3", "s3a"):
        return {}
    opts: dict = {"anon": storage.anon}
    if storage.access_key_id is not None:
        opts["key"] = storage.access_key_id.get_secret_value()
    if storage.secret_access_key is not None:
        opts["secret"] = storage.secret_access_key.get_secret_value()
    if storage.session_token is not None:
        opts["token"] = storage.session_token.get_secret_value()
    client: dict = {}
    endpoint = (
        storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        client["endpoint_url"] = endpoint
    if storage.region:
        client["region_name"] = storage.region
    if client:
        opts["client_kwargs"] = client
    opts["config_kwargs"] = {
        "retries": {"total_max_attempts": storage.max_attempts, "mode": "adaptive"},
        "connect_timeout": storage.connect_timeout_s,
        "read_timeout": storage.read_timeout_s,
    }
    # Listings must reflect what other processes just wrote.
    opts["use_listings_cache"] = False
    return opts


def get_fs(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    opts = storage_options(uri, storage)
    fs, path = url_to_fs(uri, **opts)
    if _probe_enabled and opts:
        _probe_once(path, opts, storage)
    return fs, path


# ---------------------------------------------------------------- first contact
#
# The retries that carry a job through a flaky object store (``max_attempts``
# attempts per request, each waiting up to ``read_timeout_s``, under s3fs's own
# retries) would keep a job that names a dead endpoint busy for minutes before
# it could say so. Entry points therefore turn on a quick probe: the first time
# this process reaches an S3 endpoint (per endpoint and credentials), one small
# LIST request with short timeouts and few attempts, under a hard deadline,
# tells "no answer" and "credentials rejected" apart from everything else.
# Any HTTP answer otherwise (even 403 AccessDenied, 404 NoSuchBucket, 503
# SlowDown) passes: the real requests that follow report those, quickly, since
# they are not retried or are answered. Ray workers never probe.

PROBE_TIMEOUT_S = 3.0  # connect and read timeout per probe attempt (at most)
PROBE_ATTEMPTS = 3  # in all, the first included
PROBE_DEADLINE_S = 15.0  # the whole probe, retries and backoff included
CREDENTIAL_ERRORS = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure",
}

_probe_enabled = False
_probe_lock = threading.Lock()
_reached: set = set()


class StorageCheckFailed(OSError):
    """An object store that does not answer, or rejects the credentials outright."""


def probe_on_first_use(enabled: bool = True) -> None:
    """Check each S3 endpoint quickly the first time this process uses it (see above)."""
    global _probe_enabled
    _probe_enabled = enabled


def _probe_once(path: str, opts: dict, storage: StorageConfig) -> None:
    client = opts.get("client_kwargs", {})
    endpoint = client.get("endpoint_url")
    identity = (
        endpoint, client.get("region_name"), opts.get("anon"),
        opts.get("key") or os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"),
    )
    bucket = path.split("/", 1)[0]
    with _probe_lock:
        if identity in _reached or not bucket:
            return
    probe_endpoint(bucket, opts, storage)
    with _probe_lock:
        _reached.add(identity)


def probe_endpoint(bucket: str, opts: dict, storage: StorageConfig) -> None:
    """One ``ListObjectsV2(MaxKeys=1)`` on ``bucket``; raises StorageCheckFailed
    when the endpoint does not answer or rejects the credentials."""
    import asyncio

    import s3fs
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                     HTTPClientError, NoCredentialsError, PartialCredentialsError)
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    timeout = min(storage.connect_timeout_s, PROBE_TIMEOUT_S), min(storage.read_timeout_s, PROBE_TIMEOUT_S)
    quick = dict(opts)
    quick["config_kwargs"] = {
        **opts.get("config_kwargs", {}),
        "connect_timeout": timeout[0],
        "read_timeout": timeout[1],
        "retries": {"total_max_attempts": PROBE_ATTEMPTS, "mode": "standard"},
    }
    where = opts.get("client_kwargs", {}).get("endpoint_url") or "S3"
    fs = s3fs.S3FileSystem(**quick)

    async def list_one():
        s3 = await fs.set_session()
        await s3.list_objects_v2(Bucket=bucket, MaxKeys=1)

    try:
        sync(fs.loop, list_one, timeout=PROBE_DEADLINE_S)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if error.get("Code") in CREDENTIAL_ERRORS:
            message = error.get("Message") or ""
            raise StorageCheckFailed(f"{where} rejected the credentials: {error['Code']}: {message}".rstrip(": "))
        return  # an answer: the endpoint is there and takes these credentials
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StorageCheckFailed(f"no usable AWS credentials for {where}: {exc}") from None
    except (FSTimeoutError, asyncio.TimeoutError):
        raise StorageCheckFailed(f"{where} did not answer within {PROBE_DEADLINE_S:g} s") from None
    except (BotoConnectionError, HTTPClientError) as exc:
        raise StorageCheckFailed(
            f"{where} did not answer ({_network_reason(exc)}; {PROBE_ATTEMPTS} attempts, "
            f"{max(timeout):g} s timeout each)"
        ) from None
    except (BotoCoreError, OSError, ValueError, RuntimeError):
        return  # not a reachability problem (or no probing here): the real request will say what it is


def _network_reason(exc: BaseException) -> str:
    from botocore.exceptions import (ConnectionClosedError, ConnectTimeoutError, EndpointConnectionError,
                                     ReadTimeoutError)

    if isinstance(exc, ConnectTimeoutError):
        return "connect timeout"
    if isinstance(exc, EndpointConnectionError):
        return "cannot connect: connection refused or host unreachable"
    if isinstance(exc, ReadTimeoutError):
        return "read timeout: connected, but no response"
    if isinstance(exc, ConnectionClosedError):
        return "connection closed without a response"
    return describe_error(exc)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def full_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """The URI of ``path`` written in the style of ``like``: a plain local path stays
    a plain path, anything with a scheme keeps its scheme."""
    if "://" not in like:
        return path
    return fs.unstrip_protocol(path)


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = get_fs(uri, storage)
    return fs.exists(path)


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    fs, path = get_fs(uri, storage)
    return fs.cat_file(path)


def read_text(uri: str, storage: StorageConfig) -> str:
    return read_bytes(uri, storage).decode("utf-8")


def read_json(uri: str, storage: StorageConfig):
    return json.loads(read_text(uri, storage))


def _local_tmp_name(path: str, tag: str = "") -> str:
    """A temporary name beside ``path``; ``tag`` (a job's id) lets that job
    find and remove its own leftovers, and only those."""
    head, tail = os.path.split(path)
    tag = f"{tag}-" if tag else ""
    return os.path.join(head, f"{TMP_MARK}{tag}{uuid.uuid4().hex[:12]}-{tail}")


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Publish ``data`` at ``uri`` atomically."""
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
    with local_scratch() as scratch:
        local = os.path.join(scratch, "copy")
        fs, path = get_fs(src, storage)
        fs.get_file(path, local)
        publish_file(local, dst, storage)


def remove(uri: str, storage: StorageConfig) -> None:
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


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a storage failure, without a stack trace."""
    if isinstance(exc, StorageCheckFailed):
        return str(exc)  # already says what happened, in words
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {text}" if text else name


def check_source(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of an input folder/prefix that must exist and be
    readable; anything else is a UsageError with one clear line."""
    try:
        fs, path = get_fs(uri, storage)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot open {uri}: {describe_error(exc)}") from None
    try:
        if not fs.exists(path):
            raise UsageError(f"source not found: {uri}")
        if not fs.isdir(path):
            raise UsageError(f"source is not a folder or prefix: {uri}")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any storage failure is a usage problem here
        raise UsageError(f"cannot read {uri}: {describe_error(exc)}") from None
    return fs, path


def check_writable(uri: str, storage: StorageConfig) -> None:
    """Fail early, with one line, when an output location cannot be written."""
    probe = join(uri, f"{TMP_MARK}probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"", storage)
        remove(probe, storage)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot write to {uri}: {describe_error(exc)}") from None


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
