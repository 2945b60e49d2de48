"""Which filesystem a URI names, with what options, and the first-contact probe.

Every input and output is an fsspec URI: a local path, ``file://`` or ``s3://``
(and anything else fsspec reaches) resolve here to one filesystem and path,
with the S3 client options (endpoint, retries, timeouts) built from the
``storage`` config section.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import fsspec
from fsspec.core import url_to_fs

from pipeline.storage.settings import StorageConfig

TMP_MARK = ".tmp-"  # our temporary files start with this; every lister skips them



def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol(uri) in ("file", "local")


def absolute(uri: Optional[str]) -> Optional[str]:
    """``uri`` as every process of a job reads it: a local path made absolute
    (Ray workers do not run in the driver's folder), URIs unchanged."""
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


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


# ---------------------------------------------------------------- keys as written
#
# An S3 key is any string S3 accepts: ``imgs//a.jpg``, ``imgs/x//``, ``a?b.jpg``,
# ``a#b.jpg``, ``a::b.jpg``, ``100%.jpg`` are keys of their own. fsspec's path
# handling normalises some of them (``url_to_fs`` strips trailing slashes and
# splits ``::`` chains; s3fs reads ``?versionId=`` as a version), so code that
# must reach exactly the object a URI names takes the bucket and key from the
# URI's text and calls S3 with them (``pipeline.storage.files.read_exact``).


def s3_bucket_key(uri: str) -> Optional[tuple[str, str]]:
    """(bucket, key) of an ``s3://`` or ``s3a://`` URI, the key exactly as
    written (after the first ``/`` following the bucket; nothing decoded or
    collapsed); None for any other URI or a local path."""
    if "://" not in uri or protocol(uri).lower() not in ("s3", "s3a"):
        return None
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def get_fs_exact(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """``get_fs``, but the path is the one ``uri`` writes: for S3 ``bucket/key``
    with the key exactly as written (trailing and repeated slashes kept; ``::``
    is not an fsspec chain, ``?versionId=`` not a version); a local file name
    with ``::`` in it likewise."""
    exact = s3_bucket_key(uri)
    if exact is None:
        fs, path = get_fs(uri, storage)
        if is_local(uri) and "::" in uri:
            path = type(fs)._strip_protocol(uri)
        return fs, path
    opts = storage_options(uri, storage)
    fs = fsspec.filesystem(protocol(uri).lower(), **opts)
    path = f"{exact[0]}/{exact[1]}"
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


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a storage failure, without a stack trace."""
    if isinstance(exc, StorageCheckFailed):
        return str(exc)  # already says what happened, in words
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {text}" if text else name
