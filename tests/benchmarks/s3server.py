"""A small, purpose-built S3-protocol server for benchmarks that list and
read many keys: ``ListObjectsV2`` answered by bisection over keys held
sorted, so a page costs about the same whatever the bucket's size, served by
threads of its own process (``ThreadingHTTPServer`` on 127.0.0.1, started
with ``multiprocessing``), so requests in parallel are served in parallel and
never share an interpreter lock with the client.

    with S3Server({"bench": keys}, latency_s=0.03) as server:
        ... StorageConfig(endpoint_url=server.endpoint) ...

What it models: a read-only bucket of objects (empty bodies unless a size is
given, then that many ``x`` bytes), path-style requests as s3fs/aiobotocore
send them with an endpoint URL, and the answers botocore parses unchanged:
``ListObjectsV2`` (prefix, delimiter, start-after, continuation-token,
max-keys up to 1,000, ``encoding-type=url``) with S3's XML; HEAD and GET of an
object (404 ``NoSuchKey`` for a missing one); HEAD bucket and its location.
``latency_s`` is a fixed delay added to every request, slept in the
request's own thread (parallel requests overlap, as on S3), standing for the
time S3 itself takes to answer a request (list pages take tens of ms there).

What it does not model: writes, signatures (any credentials pass),
throttling, errors of the moment, S3's variance in latency, bandwidth, and
the cost of a page growing with its size beyond this server's own work.
``stats()`` counts the requests it answered, by kind.
"""

from __future__ import annotations

import base64
import bisect
import multiprocessing
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

ETAG_EMPTY = '"d41d8cd98f00b204e9800998ecf8427e"'
MODIFIED = "2026-01-01T00:00:00.000Z"
MODIFIED_HTTP = formatdate(1767225600, usegmt=True)
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _after(s: str) -> str:
    """The smallest string greater than every string that starts with ``s``."""
    return s[:-1] + chr(ord(s[-1]) + 1)


def list_page(keys: list[str], prefix: str = "", delimiter: str = "", start_after: str = "",
              token: str = "", max_keys: int = 1000) -> tuple[list[str], list[str], Optional[str]]:
    """(keys, common prefixes, next token or None) of one ListObjectsV2 page
    over ``keys`` (sorted). The token is where the next page starts (a key or
    a point past a common prefix), base64-encoded."""
    if token:
        i = bisect.bisect_left(keys, base64.urlsafe_b64decode(token.encode()).decode())
    else:
        i = bisect.bisect_right(keys, start_after) if start_after else 0
    i = max(i, bisect.bisect_left(keys, prefix))
    contents: list[str] = []
    common: list[str] = []
    n = len(keys)
    while i < n and len(contents) + len(common) < max_keys:
        key = keys[i]
        if not key.startswith(prefix):
            break
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
            cp = key[: cut + len(delimiter)]
            if token or cp > start_after:  # as moto: StartAfter naming the prefix itself leaves it out
                common.append(cp)
            i = bisect.bisect_left(keys, _after(cp), i)
        else:
            contents.append(key)
            i += 1
    more = i < n and keys[i].startswith(prefix) and max_keys > 0
    nxt = base64.urlsafe_b64encode(keys[i].encode()).decode() if more else None
    return contents, common, nxt


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3
    # Headers and body are two writes: with Nagle's algorithm the body waited
    # for the client's delayed ACK of the headers (about 40 ms a small
    # answer, which S3 does not add).
    disable_nagle_algorithm = True
    server_version = "AmazonS3"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", content_type: str = "application/xml", headers: dict = {},
              head: bool = False, length: Optional[int] = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("x-amz-request-id", "bench")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, code: int, s3code: str, message: str, head: bool = False) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{s3code}</Code><Message>{escape(message)}'
                f"</Message><RequestId>bench</RequestId></Error>").encode()
        self._send(code, body, head=head)

    def _route(self, head: bool) -> None:
        srv = self.server
        if srv.latency_s:
            time.sleep(srv.latency_s)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        store = srv.buckets.get(bucket)
        if store is None:
            srv.count("no-bucket")
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist", head)
        if not key:
            if "location" in query:
                srv.count("location")
                return self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint xmlns="{NS}"/>'
                                  .encode())
            if head:
                srv.count("head-bucket")
                return self._send(200, head=True)
            if query.get("list-type") == "2":
                srv.count("list")
                return self._list(bucket, store[0], query)
            srv.count("unsupported")
            return self._error(501, "NotImplemented", f"not modelled: {self.command} {self.path}")
        size = store[1].get(key)
        if size is None:
            srv.count("head-missing" if head else "get-missing")
            return self._error(404, "NoSuchKey", "The specified key does not exist.", head)
        srv.count("head" if head else "get")
        headers = {"ETag": ETAG_EMPTY, "Last-Modified": MODIFIED_HTTP, "Accept-Ranges": "bytes"}
        self._send(200, b"x" * size, "binary/octet-stream", headers, head=head, length=size)

    def _list(self, bucket: str, keys: list[str], q: dict) -> None:
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        max_keys = min(int(q.get("max-keys", "1000")), 1000)
        contents, common, nxt = list_page(keys, prefix, delimiter, q.get("start-after", ""),
                                          q.get("continuation-token", ""), max_keys)
        url = q.get("encoding-type") == "url"

        def enc(s: str) -> str:
            return escape(quote(s, safe="/") if url else s)

        sizes = self.server.buckets[bucket][1]
        out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<ListBucketResult xmlns="{NS}">',
               f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>"]
        if "start-after" in q:
            out.append(f"<StartAfter>{enc(q['start-after'])}</StartAfter>")
        if "continuation-token" in q:
            out.append(f"<ContinuationToken>{escape(q['continuation-token'])}</ContinuationToken>")
        if nxt:
            out.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        out.append(f"<KeyCount>{len(contents) + len(common)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>")
        if delimiter:
            out.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if url:
            out.append("<EncodingType>url</EncodingType>")
        out.append(f"<IsTruncated>{'true' if nxt else 'false'}</IsTruncated>")
        entries = self.server.entries.setdefault((bucket, url), {})
        for k in contents:
            entry = entries.get(k)
            if entry is None:  # each key's XML once: the server's CPU is not the client's (S3's is elsewhere)
                entry = entries[k] = (f"<Contents><Key>{enc(k)}</Key><LastModified>{MODIFIED}</LastModified><ETag>"
                                      f"&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>{sizes[k]}</Size>"
                                      "<StorageClass>STANDARD</StorageClass></Contents>")
            out.append(entry)
        for p in common:
            out.append(f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>")
        out.append("</ListBucketResult>")
        self._send(200, "".join(out).encode())

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_PUT(self) -> None:
        self.server.count("unsupported")
        self._error(501, "NotImplemented", "this benchmark server is read-only")

    do_POST = do_DELETE = do_PUT


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, buckets: dict, latency_s: float, counts):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.buckets = buckets
        self.entries: dict = {}  # (bucket, url-encoded?) -> {key: its <Contents> element}
        self.latency_s = latency_s
        self.counts = counts
        self._lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # a client that hung up: nothing to report
        pass

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1


def _serve(spec: dict, latency_s: float, ready, conn) -> None:
    buckets = {}
    for bucket, objects in spec.items():
        sizes = dict(objects) if isinstance(objects, dict) else {k: 0 for k in objects}
        buckets[bucket] = (sorted(sizes), sizes)
    counts: dict = {}
    server = _Server(buckets, latency_s, counts)
    ready.put(server.server_address[1])

    def answer() -> None:  # stats requests from the parent
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg == "stats":
                conn.send(dict(counts))
            elif msg == "reset":
                counts.clear()
                conn.send(True)

    threading.Thread(target=answer, daemon=True).start()
    server.serve_forever(poll_interval=0.2)


class S3Server:
    """The server in a process of its own. ``buckets``: {name: keys (empty
    objects) or {key: size}}. ``endpoint`` once started."""

    def __init__(self, buckets: dict, latency_s: float = 0.0):
        self.buckets, self.latency_s = buckets, latency_s
        self.endpoint = ""
        self._proc: Optional[multiprocessing.Process] = None

    def __enter__(self) -> "S3Server":
        ctx = multiprocessing.get_context("fork")
        ready = ctx.Queue()
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.buckets, self.latency_s, ready, child), daemon=True)
        self._proc.start()
        self.endpoint = f"http://127.0.0.1:{ready.get(timeout=120)}"
        return self

    def stats(self) -> dict:
        self._conn.send("stats")
        return self._conn.recv()

    def reset(self) -> None:
        self._conn.send("reset")
        self._conn.recv()

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(10)
