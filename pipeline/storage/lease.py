"""Output leases: one job at a time writes an output folder.

``OUTPUT/_lease.json`` names the holder (job id, host, process), the arguments
that decide what the job writes (for scoring: model, images, top-k, rows per
file) and is rewritten as a heartbeat. Every write is a compare-and-swap (``storage.write_if_unchanged``):
created only if absent, then replaced only if unchanged since the holder's last
write (S3: a conditional ``PutObject``, ``If-None-Match: *`` then ``If-Match``;
local disk: under an exclusive lock; a store that ignores the conditions: the
storage module's settle-checked lease), so that only one job can win it.

A job that finds a lease held by a live job stops at once with exit 2, naming
the holder and, if they differ, its arguments. A lease is stale, and taken
over, when its heartbeat is older than the timeout (``score.lease_timeout_s``; measured by
the store's clock on S3) or when its holder was a process on this host that no
longer runs. A job that finds its own lease changed by another stops before
it commits anything more. Temporary files carry the job id, so a job removes
only its own and those of the holder it took over from.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from pipeline.errors import JobFailed, UsageError
from pipeline.storage.conditional import age_s, read_for_update, write_if_unchanged
from pipeline.storage.files import join, read_bytes, remove
from pipeline.storage.settings import StorageConfig

LEASE_NAME = "_lease.json"


class LeaseLost(RuntimeError):
    """Another job holds the output lease now."""


def check_holder(output: str, job_id: str, storage: StorageConfig) -> None:
    """Raise LeaseLost unless ``job_id`` still holds the lease on ``output``
    (a part task asks this just before it publishes)."""
    try:
        data = _parse(read_bytes(join(output, LEASE_NAME), storage))
    except FileNotFoundError:
        data = {}
    if data.get("holder") != job_id:
        who = f"job {data.get('holder')} on {data.get('host')}" if data else "nobody (removed)"
        raise LeaseLost(f"lost the output lease on {output} to {who}; stopped before committing more parts")


@dataclass
class Held:
    data: dict
    token: Optional[str]  # for storage.write_if_unchanged
    age_s: float  # since the last heartbeat, by the store's clock


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

    def __init__(self, output: str, args: dict, storage: StorageConfig, timeout_s: float, job: str = "score"):
        self.output, self.args, self.storage, self.timeout_s = output, args, storage, timeout_s
        self.job = job  # the kind of job, in messages: "score", "training"
        self.job_id = uuid.uuid4().hex[:12]
        self.uri = join(output, LEASE_NAME)
        self.token: Optional[str] = None
        self.previous: Optional[dict] = None  # the stale holder taken over from
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public

    def acquire(self) -> "OutputLease":
        """Create the lease or take over a stale one; UsageError when a live job holds it."""
        if self._replace(None):
            return self._started()
        held = self._read()
        if held is None:  # released between our two requests
            if self._replace(None):
                return self._started()
            held = self._read()
        if held is not None and held.data.get("holder") == self.job_id:
            # Our own create, answered late or retried after it succeeded.
            self.token = held.token
            return self._started()
        if held is not None and not self._is_stale(held):
            raise UsageError(self._held_message(held))
        if not self._replace(held.token if held else None):
            raise UsageError(f"{self.output}: another {self.job} job took the output lease just now; try again later")
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
        held = self._read()
        if held is not None and held.data.get("holder") == self.job_id:
            remove(self.uri, self.storage)

    def heartbeat(self) -> None:
        """Rewrite the lease if it is still ours; marks it lost otherwise."""
        if self._replace(self.token):
            return
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

    def _replace(self, token: Optional[str]) -> bool:
        """Write the lease if it is still what ``token`` describes (None: absent)."""
        written = write_if_unchanged(self.uri, self._body(), token, self.storage)
        if written is None:
            return False
        self.token = written
        return True

    def _read(self) -> Optional[Held]:
        raw, token = read_for_update(self.uri, self.storage)
        age = age_s(self.uri, self.storage) if raw is not None else None
        if raw is None or age is None:
            return None
        return Held(_parse(raw), token, age)

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
            return f"{self.output} is being written by another {self.job} job with the same arguments: {who}"
        diff = ", ".join(f"{k} {theirs.get(k)!r}" for k in self.args if theirs.get(k) != self.args[k])
        return (f"{self.output} is being written by another {self.job} job with other arguments ({diff}): {who}; "
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

        self._thread = threading.Thread(target=beat, name=f"{self.job}-lease", daemon=True)
        self._thread.start()
        return self


def _parse(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
