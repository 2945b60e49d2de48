"""A fault-injecting HTTP reverse proxy for S3 tests, on 127.0.0.1 only.

``FaultProxy(upstream)`` listens on a free loopback port and forwards every
request to ``upstream`` (the moto server) byte for byte: method, path and query,
every header in its original order, Host included and unchanged (SigV4 signs
it, so a server that checks signatures sees exactly what the client signed;
moto routes path-style requests by path, whatever the Host), and the body as
sent (``Content-Length`` or ``Transfer-Encoding: chunked``; an ``aws-chunked``
body is just bytes to the proxy). ``Expect: 100-continue`` is answered by the
proxy and still forwarded. Responses stream back as they arrive, in their own
framing (length, chunked, or until close). Hop-by-hop headers (``Connection``,
``Keep-Alive``, ...) belong to each connection and are not forwarded.

With probability ``p`` per request (a seeded RNG) the proxy instead injects a
fault, picked among ``kinds``:

- ``"slowdown"``: ``503 Slow Down`` with S3's XML error body ``<Code>SlowDown</Code>``;
- ``"drop"``: the request is read and the connection closed without any answer;
- ``"lost"`` (only when asked for): the request IS forwarded and carried out
  upstream, then the connection is closed without relaying the answer, as when
  a response is lost on the way back; a retry then repeats a request that
  already took effect.

``"slowdown"`` and ``"drop"`` never reach upstream.

``fail_object_reads(kind, seconds, match)`` answers every object GET (not a
listing) whose path contains ``match`` with one fault for ``seconds`` from the
first such GET on,
as a store does while credentials are lapsing or a prefix is throttled:
``"expired"`` (403 ``ExpiredToken``), ``"slowdown"`` (503 ``SlowDown``),
``"drop"`` (connection closed, no answer) or ``"stall"`` (no answer until the
client gives up, bounded by the window). ``stats()`` counts requests,
faults by kind, requests forwarded (answer relayed), ``aborted`` ones
(upstream failed, or the client left mid-answer) and the response body bytes
relayed (``body_bytes``), so tests can prove faults really happened and count
what a client downloaded. The proxy only serves what clients ask (no loops of its own
besides the accept loop); ``close()`` (or leaving the ``with`` block) stops it
and closes every client connection still open.

``Blackhole()`` is the other kind of bad endpoint: a listening socket that
accepts connections (the kernel completes the handshake) and never answers.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence
from urllib.parse import urlsplit

EXPIRED_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message>"
    "<RequestId>{rid}</RequestId><HostId>faultproxy</HostId></Error>"
)
SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>faultproxy</HostId></Error>"
)
# Hop-by-hop: they describe one connection, not the message (RFC 9110 7.6.1).
# Transfer-Encoding is handled separately: the body keeps its framing.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}
CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    timeout = 30  # an idle keep-alive connection ends its thread after this
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002 - http.server API
        pass

    # Every method S3 clients use goes through one path.
    def do_GET(self):
        self._serve()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def _serve(self) -> None:
        proxy = self.server.proxy
        body, chunked = self._read_body()
        fault = proxy._window_fault(self.command, self.path) or proxy._decide(self.command, self.path)
        if fault == "slowdown":
            self._slowdown()
            return
        if fault == "expired":
            self._error(403, "Forbidden", EXPIRED_BODY)
            return
        if fault == "stall":
            time.sleep(max(0.0, proxy._window_end - time.monotonic()))
            self._hang_up()
            return
        try:
            if fault != "drop":
                self._forward(body, chunked, relay=fault != "lost")
        except (ConnectionError, socket.timeout, http.client.HTTPException, OSError):
            # Upstream failed or the client went away: nothing sensible to answer.
            proxy._count("aborted")
            self.close_connection = True
            return
        if fault in ("drop", "lost"):
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> tuple[bytes, bool]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until the empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts), True
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length else b""), False

    def _slowdown(self) -> None:
        self._error(503, "Slow Down", SLOWDOWN_BODY)

    def _error(self, status: int, reason: str, template: str) -> None:
        body = template.format(rid=uuid.uuid4().hex[:16].upper()).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "faultproxy")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self, body: bytes, chunked: bool, relay: bool = True) -> None:
        proxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # Host and all, in order
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders()
            if chunked:
                if body:
                    conn.send(b"%x\r\n%s\r\n" % (len(body), body))
                conn.send(b"0\r\n\r\n")
            elif body:
                conn.send(body)
            resp = conn.getresponse()
            if not relay:
                resp.read()  # upstream finishes its work; the answer goes nowhere
                return
            self.send_response_only(resp.status, resp.reason)
            upstream_chunked = False
            for name, value in resp.getheaders():
                low = name.lower()
                if low in HOP_BY_HOP:
                    continue
                if low == "transfer-encoding":
                    upstream_chunked = "chunked" in value.lower()
                self.send_header(name, value)
            no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            if not no_body and not upstream_chunked and resp.getheader("Content-Length") is None:
                # Body delimited by upstream closing: do the same to our client.
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if not no_body:
                while True:
                    data = resp.read1(CHUNK)
                    if not data:
                        break
                    if upstream_chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    else:
                        self.wfile.write(data)
                    proxy._count("body_bytes", len(data))
                if upstream_chunked:
                    self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            proxy._count("forwarded")
        finally:
            conn.close()

    def setup(self):
        super().setup()
        self.server.proxy._opened(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.proxy._closed(self.connection)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: "FaultProxy"


class FaultProxy:
    """See the module docstring. ``p`` is the fault probability per request."""

    def __init__(self, upstream: str, p: float = 0.1, seed: int = 0,
                 kinds: Sequence[str] = ("slowdown", "drop"), upstream_timeout: float = 60.0):
        if not 0 <= p <= 1:
            raise ValueError("p must be within [0, 1]")
        unknown = set(kinds) - {"slowdown", "drop", "lost"}
        if unknown or not kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the upstream must be a plain-HTTP loopback URL")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.p, self.kinds = p, tuple(kinds)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "forwarded": 0, "aborted": 0, "slowdown": 0, "drop": 0, "lost": 0,
                        "body_bytes": 0}
        self._by_method: dict[str, int] = {}
        self._window_kind, self._window_match, self._window_end, self._window_seconds = "", "", 0.0, 0.0
        self._connections: set = set()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    # -- decisions and counters (any handler thread)

    def _decide(self, method: str, path: str) -> Optional[str]:
        with self._lock:
            self._counts["requests"] += 1
            self._by_method[method] = self._by_method.get(method, 0) + 1
            if self.p and self._rng.random() < self.p:
                kind = self.kinds[self._rng.randrange(len(self.kinds))]
                self._counts[kind] += 1
                return kind
            return None

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _opened(self, sock) -> None:
        with self._lock:
            self._connections.add(sock)

    def _closed(self, sock) -> None:
        with self._lock:
            self._connections.discard(sock)

    def fail_object_reads(self, kind: str, seconds: float, match: str = "") -> None:
        """Every object GET whose path contains ``match`` gets fault ``kind``
        for ``seconds`` from the first such GET on (listings pass)."""
        if kind not in ("expired", "slowdown", "drop", "stall"):
            raise ValueError(f"unknown window fault {kind!r}")
        with self._lock:
            self._window_kind, self._window_match = kind, match
            self._window_seconds, self._window_end = seconds, float("inf")  # from the first such read on

    def _window_fault(self, method: str, path: str) -> Optional[str]:
        if method != "GET" or "list-type=" in path or time.monotonic() >= self._window_end:
            return None
        if self._window_match not in path or path.rstrip("/").count("/") < 2:  # a bucket, not an object
            return None
        with self._lock:
            if self._window_end == float("inf"):
                self._window_end = time.monotonic() + self._window_seconds
            self._counts["requests"] += 1
            self._counts[f"window_{self._window_kind}"] = self._counts.get(f"window_{self._window_kind}", 0) + 1
            return self._window_kind

    def set_fault_rate(self, p: float) -> None:
        with self._lock:
            self.p = p

    def stats(self) -> dict:
        """{"requests", "forwarded", "aborted", "slowdown", "drop", "lost", "faults", "by_method"}."""
        with self._lock:
            out = dict(self._counts)
            out["faults"] = out["slowdown"] + out["drop"] + out["lost"] + sum(
                v for k, v in out.items() if k.startswith("window_"))
            out["by_method"] = dict(self._by_method)
            return out

    def settled_stats(self, timeout: float = 10.0) -> dict:
        """``stats()`` once every request received has been accounted for
        (forwarded, aborted or faulted): a handler counts a forwarded answer
        just after its last byte, which the client may read first."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.stats()
            if out["forwarded"] + out["aborted"] + out["faults"] >= out["requests"] or time.monotonic() > deadline:
                return out
            time.sleep(0.01)

    # -- life cycle

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()
        with self._lock:
            open_now = list(self._connections)
        for sock in open_now:  # idle keep-alive connections of clients still alive
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class Blackhole:
    """A loopback port that accepts TCP connections and never answers a byte."""

    def __init__(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)  # the kernel completes handshakes; nobody ever reads
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Blackhole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
