"""The output lease: one score job at a time writes an output folder.

``OUTPUT/_lease.json`` names the holder (job id, host, process), the arguments
that decide the rows (model, images, top-k, rows per file) and is rewritten as
a heartbeat. It is created with a conditional write that only one job can win:
on S3 a ``PutObject`` with ``If-None-Match: *``, on a local disk a hard link
of a complete temporary file (which fails if the name exists); every later
change is a compare-and-swap (S3: ``If-Match`` on the ETag read; local disk:
under an exclusive ``flock`` of ``_lease.lock``).

A job that finds a lease held by a live job stops at once with exit 2, naming
the holder and, if they differ, its arguments. A lease is stale, and taken
over, when its heartbeat is older than ``score.lease_timeout_s`` (measured by
the store's clock on S3) or when its holder was a process on this host that no
longer runs. A job that finds its own lease changed by another stops before
it commits anything more. Temporary files carry the job id, so a job removes
only its own and those of the holder it took over from.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Optional

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import JobFailed, UsageError

LEASE_NAME = "_lease.json"
LOCK_NAME = "_lease.lock"


class LeaseLost(RuntimeError):
    """Another job holds the output lease now."""


def check_holder(output: str, job_id: str, storage: StorageConfig) -> None:
    """Raise LeaseLost unless ``job_id`` still holds the lease on ``output``
    (a part task asks this just before it publishes)."""
    try:
        data = _parse(st.read_bytes(st.join(output, LEASE_NAME), storage))
    except FileNotFoundError:
        data = {}
    if data.get("holder") != job_id:
        who = f"job {data.get('holder')} on {data.get('host')}" if data else "nobody (removed)"
        raise LeaseLost(f"lost the output lease on {output} to {who}; stopped before committing more parts")


@dataclass
class Held:
    data: dict
    token: Optional[str]  # S3 ETag; None on a local disk
    age_s: float  # since the last heartbeat


def _process_start(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(data: dict) -> Optional[bool]:
    """Whether the holder still runs, when it ran on this host; None otherwise."""
    if data.get("host") != socket.gethostname():
        return None
    pid = data.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = data.get("pid_start")
    return started is None or _process_start(pid) == started


class OutputLease:
    """Take with ``acquire()``; ``check()`` raises once the lease is lost;
    ``release()`` at the end."""

    def __init__(self, output: str, args: dict, storage: StorageConfig, timeout_s: float):
        self.output, self.args, self.storage, self.timeout_s = output, args, storage, timeout_s
        self.job_id = uuid.uuid4().hex[:12]
        self.uri = st.join(output, LEASE_NAME)
        self.fs, self.path = st.get_fs(self.uri, storage)
        self.local = st.is_local(output)
        self.token: Optional[str] = None
        self.previous: Optional[dict] = None  # the stale holder taken over from
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public

    def acquire(self) -> "OutputLease":
        """Create the lease or take over a stale one; UsageError when a live job holds it."""
        with self._locked():
            if self._create():
                return self._started()
            held = self._read()
            if held is None:  # released between our two requests
                if self._create():
                    return self._started()
                held = self._read()
            if held is not None and held.data.get("holder") == self.job_id:
                # Our own create, answered late or retried after it succeeded.
                self.token = held.token
                return self._started()
            if held is not None and not self._is_stale(held):
                raise UsageError(self._held_message(held))
            if not self._replace(held.token if held else None):
                raise UsageError(f"{self.output}: another score job took the output lease just now; try again later")
            self.previous = held.data if held else None
            return self._started()

    def check(self) -> None:
        if self._lost:
            raise JobFailed(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        with self._locked():
            held = self._read()
            if held is not None and held.data.get("holder") == self.job_id:
                st.remove(self.uri, self.storage)

    def heartbeat(self) -> None:
        """Rewrite the lease if it is still ours; marks it lost otherwise."""
        with self._locked():
            if self.local:
                held = self._read()
                if held is None or held.data.get("holder") != self.job_id:
                    self._lost = self._lost_message(held)
                    return
            if not self._replace(self.token):
                held = self._read()
                if held is not None and held.data.get("holder") == self.job_id:
                    self.token = held.token  # our own write, retried after it succeeded
                else:
                    self._lost = self._lost_message(held)

    # ------------------------------------------------------------ storage

    def _body(self) -> bytes:
        now = time.time()
        return (json.dumps({
            "holder": self.job_id, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "args": self.args,
            "heartbeat": now, "timeout_s": self.timeout_s,
        }, indent=2) + "\n").encode("utf-8")

    def _create(self) -> bool:
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{self.job_id}.new"
            with open(tmp, "wb") as f:
                f.write(self._body())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return self._put(IfNoneMatch="*")

    def _replace(self, token: Optional[str]) -> bool:
        if self.local:  # under the flock
            st.write_bytes(self.uri, self._body(), self.storage)
            return True
        return self._put(IfMatch=token) if token else self._put(IfNoneMatch="*")

    def _put(self, **condition) -> bool:
        bucket, _, key = self.path.partition("/")
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **condition)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as exc:
            if "Precondition" in str(exc) or "412" in str(exc) or "ConditionalRequestConflict" in str(exc):
                return False
            raise
        self.token = out.get("ETag")
        return True

    def _read(self) -> Optional[Held]:
        if self.local:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
                    age = time.time() - os.fstat(f.fileno()).st_mtime
            except FileNotFoundError:
                return None
            return Held(_parse(raw), None, age)
        bucket, _, key = self.path.partition("/")
        try:
            out = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = out["Body"]
        raw = _read_body(self.fs, body)
        date = out.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        modified = out.get("LastModified")
        age = now - (calendar.timegm(modified.utctimetuple()) if modified else now)
        return Held(_parse(raw), out.get("ETag"), max(0.0, age))

    @contextlib.contextmanager
    def _locked(self):
        if not self.local:
            yield
            return
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(os.path.join(os.path.dirname(self.path), LOCK_NAME), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------ decisions

    def _is_stale(self, held: Held) -> bool:
        alive = _alive_here(held.data)
        if alive is not None:
            return not alive
        timeout = held.data.get("timeout_s")
        timeout = float(timeout) if isinstance(timeout, (int, float)) else self.timeout_s
        return held.age_s > max(timeout, self.timeout_s) or not held.data.get("holder")

    def _held_message(self, held: Held) -> str:
        d = held.data
        who = f"job {d.get('holder')} on {d.get('host')} (pid {d.get('pid')}), heartbeat {held.age_s:.0f} s ago"
        theirs = d.get("args") or {}
        if theirs == self.args:
            return f"{self.output} is being written by another score job with the same arguments: {who}"
        diff = ", ".join(f"{k} {theirs.get(k)!r}" for k in self.args if theirs.get(k) != self.args[k])
        return (f"{self.output} is being written by another score job with other arguments ({diff}): {who}; "
                f"choose another --output")

    def _lost_message(self, held: Optional[Held]) -> str:
        who = f"job {held.data.get('holder')} on {held.data.get('host')}" if held else "nobody (removed)"
        return f"lost the output lease on {self.output} to {who}; stopped before committing more parts"

    def _started(self) -> "OutputLease":
        interval = max(0.5, self.timeout_s / 4)

        def beat() -> None:
            while not self._stop.wait(interval) and not self._lost:
                try:
                    self.heartbeat()
                except Exception:  # noqa: BLE001 - a missed beat is retried; staleness takes a timeout
                    continue

        self._thread = threading.Thread(target=beat, name="score-lease", daemon=True)
        self._thread.start()
        return self


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def _parse(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
