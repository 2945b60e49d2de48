"""Output leases: one job at a time writes an output folder.

``OUTPUT/_lease.json`` names the holder (job id; host, pid, the process's start
time, the machine's boot id and the pid namespace), the arguments that decide
what the job writes (for scoring: model, images, top-k, rows per file), its
timeout, and is rewritten as a heartbeat every timeout / 4. Every write is a
compare-and-swap (``storage.write_if_unchanged``): created only if absent, then
replaced only if unchanged since it was read (S3: a conditional ``PutObject``,
``If-None-Match: *`` then ``If-Match``; local disk: under an exclusive lock of
the folder; a store that ignores the conditions: the storage module's
settle-checked lease), so that only one job can win it.

Who may take it. A lease is *stale* when its age as last written (by the
store's clock on S3) is over the timeout (``score.lease_timeout_s`` /
``train.lease_timeout_s``, the larger of the holder's and ours). Its holder is
*known dead* or *known alive* only when it ran on this machine (same boot id)
in this pid namespace: then its pid and that process's start time decide. A
holder elsewhere (another node, another pod: containers share host names and
pid numbers, pid 1 above all) is judged by its heartbeat alone. A job that
finds the lease

- stale, or held by a process known dead: takes it over at once;
- held by a job with other arguments: stops at once with exit 2 (UsageError);
- held by a job with the same arguments (a retried RayJob finds the lease of
  the attempt that failed): if the holder is known alive, a duplicate still
  running, exit 2 at once; otherwise it waits, logging whom it waits for and
  for how long, polling, and takes the lease over once the heartbeat is stale.
  It waits at most ``lease_wait_s`` (config; default: the timeout less the
  heartbeat's age when first seen, plus a quarter of the timeout and 1 s): a
  holder whose heartbeat stays fresh that long is a duplicate submission
  still running, and the job stops with exit 2. A lease released meanwhile is
  simply created.

The fence. A part (or any output) is published only after ``check_holder``:
it reads the lease, requires that it names this job, that it was written less
than half the timeout ago (store's clock) and that the holder's own heartbeat
in it is less than half the timeout old, and then rewrites it, with a new
fence mark, by a conditional write on the token it read. Why nobody can take the
lease over between the fence and the publish: a takeover is a conditional write
on the version the taker read, and the taker must have found that version
older than the timeout. A version read before the fence's write no longer
matches (the fence replaced it: S3 and the local lock apply a condition and
its write as one step), and a version read after it is aged from the fence's
write. So the lease stays ours for a full timeout after a fence that
succeeded, and a publish that takes less than that (seconds, against 300 s by
default) cannot overlap another job's. (The mark matters: rewriting the bytes
read would leave S3's ETag, and the local digest, as they were, and a taker
holding that token would still win.) The driver's next heartbeat then finds
its token outdated, re-reads the lease, sees itself the holder and renews. A
fence whose write is refused reads again: while the lease still names this
job (another part's fence or the heartbeat came first) it tries again; one
that finds the lease not ours, or too old, raises LeaseLost (the driver's
JobFailed, exit 1).

Heartbeats that fail. A heartbeat that raises is retried every timeout / 20;
once no renewal has succeeded for half the timeout while renewals failed or
hung (or for 90 % of it whatever the cause), the lease is marked unsafe:
``check()`` raises JobFailed, and the job's fences refuse as soon as the
heartbeat written in the lease is half a timeout old. Half a timeout is
therefore the margin a job has to stop its own writes before another job could
take the lease.

Temporary files carry the job id, so a job removes only its own and those of
the holder it took over from.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from pipeline.errors import JobFailed, UsageError
from pipeline.storage.conditional import age_s, read_for_update, write_if_unchanged
from pipeline.storage.settings import StorageConfig
from pipeline.storage.files import join, remove

LEASE_NAME = "_lease.json"
SAFE_FRACTION = 0.5  # of the timeout: a lease not renewed this long is not published under
HARD_FRACTION = 0.9  # of the timeout: not renewed this long, for whatever reason: unsafe
AGE_RESOLUTION_S = 1.0  # S3 times are whole seconds; hosts' clocks differ a little
WAIT_MARGIN = 0.25  # of the timeout (plus 1 s), waited beyond a same-arguments holder's staleness

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another job holds the output lease now, or ours can no longer be trusted."""


def check_holder(output: str, job_id: str, storage: StorageConfig, patience_s: float = 30.0) -> None:
    """The fence before a publish: raise LeaseLost unless ``job_id`` holds the
    lease on ``output`` with a fresh heartbeat, proved by a conditional rewrite
    of the lease as read (see the module docstring). A part task calls it just
    before it publishes its part. The job's other fences and its heartbeat
    change the lease too: a rewrite refused for them is tried again (reading
    afresh) for up to ``patience_s``."""
    import random

    uri = join(output, LEASE_NAME)
    deadline = time.monotonic() + patience_s
    while True:
        raw, token = read_for_update(uri, storage)
        age = age_s(uri, storage) if raw is not None else None
        if raw is None or age is None:
            raise LeaseLost(f"lost the output lease on {output} to nobody (removed); "
                            "stopped before committing more parts")
        data = _parse(raw)
        if data.get("holder") != job_id:
            raise LeaseLost(f"lost the output lease on {output} to job {data.get('holder')} on {data.get('host')}; "
                            "stopped before committing more parts")
        timeout = _timeout(data, None)
        beat = data.get("heartbeat")
        beat_age = time.time() - float(beat) if isinstance(beat, (int, float)) else age
        if max(age, beat_age) > SAFE_FRACTION * timeout + AGE_RESOLUTION_S:
            raise LeaseLost(f"the output lease on {output} was last renewed {max(age, beat_age):.0f} s ago, over "
                            f"half its timeout ({timeout:g} s): its heartbeat is failing; stopped before committing "
                            "more parts")
        # A new fence mark: a takeover that read the lease before this write
        # must find it changed (rewriting the same bytes would keep S3's ETag).
        fenced = json.dumps({**data, "fence": uuid.uuid4().hex[:12]}, indent=2).encode("utf-8") + b"\n"
        if write_if_unchanged(uri, fenced, token, storage) is not None:
            return
        if time.monotonic() > deadline:
            raise LeaseLost(f"the output lease on {output} kept changing for {patience_s:g} s while this part "
                            "tried to fence it; stopped before committing more parts")
        time.sleep(random.uniform(0.02, 0.2))  # another fence of this job, or its heartbeat, came first


@dataclass
class Held:
    data: dict
    token: Optional[str]  # for storage.write_if_unchanged
    age_s: float  # since the last write, by the store's clock


# ---------------------------------------------------------------- which process

def _process_start(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns(pid: object = "self") -> Optional[str]:
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def identity(pid: Optional[int] = None) -> dict:
    """What names a process in a lease: host (for people), pid, the process's
    start time, the machine's boot id and the pid namespace (where pids mean
    something)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "boot_id": _boot_id(),
            "pid_ns": _pid_ns(pid)}


def _alive_here(data: dict) -> Optional[bool]:
    """Whether the holder still runs, when it ran in this pid namespace on this
    boot of this machine; None when that cannot be told (its heartbeat decides)."""
    boot, ns = _boot_id(), _pid_ns()
    if boot is None or ns is None or data.get("boot_id") != boot or data.get("pid_ns") != ns:
        return None
    pid = data.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = data.get("pid_start")
    if started is None:
        return None  # a live pid, but maybe a later process with the same number
    return _process_start(pid) == started


def _timeout(data: dict, ours: Optional[float]) -> float:
    theirs = data.get("timeout_s")
    theirs = float(theirs) if isinstance(theirs, (int, float)) and theirs > 0 else None
    if theirs is None:
        return float(ours) if ours is not None else 300.0
    return max(theirs, ours) if ours is not None else theirs


class OutputLease:
    """Take with ``acquire()``; ``check()`` raises once the lease is lost or
    unsafe; ``release()`` at the end. ``wait_s``: the most ``acquire`` waits
    for a same-arguments holder's heartbeat to go stale (None: its timeout
    plus a margin, see the module docstring; 0: refuse at once)."""

    def __init__(self, output: str, args: dict, storage: StorageConfig, timeout_s: float, job: str = "score",
                 wait_s: Optional[float] = None):
        self.output, self.args, self.storage, self.timeout_s = output, args, storage, timeout_s
        self.job = job  # the kind of job, in messages: "score", "training"
        self.job_key = "train" if job == "training" else job  # its config section
        self.wait_s = wait_s
        self.job_id = uuid.uuid4().hex[:12]
        self.identity = identity()
        self.uri = join(output, LEASE_NAME)
        self.token: Optional[str] = None
        self.previous: Optional[dict] = None  # the stale holder taken over from
        self._lost: Optional[str] = None
        self._unsafe = False  # lost because not renewed in time, not to another job
        self._renewed: Optional[float] = None  # monotonic start of the last write that succeeded
        self._trying: Optional[float] = None  # monotonic start of a write under way
        self._failure: Optional[BaseException] = None  # the last renewal's error, until one succeeds
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public

    def acquire(self) -> "OutputLease":
        """Create the lease or take over a stale one; wait for a same-arguments
        holder to go stale; UsageError when a live job holds it."""
        deadline: Optional[float] = None
        vanished = 0
        for _ in range(100_000):
            if self._replace(None):
                return self._started()
            held = self._read()
            if held is None:  # released between our two requests: create it again
                vanished += 1
                if vanished > 10:
                    break
                continue
            if held.data.get("holder") == self.job_id:
                # Our own create, answered late or retried after it succeeded.
                self.token = held.token
                return self._started()
            state = self._judge(held)
            if state in ("stale", "dead"):
                if self._replace(held.token):
                    self.previous = held.data
                    return self._started()
                continue  # another writer came first: look again
            if (held.data.get("args") or {}) != self.args or state == "alive":
                raise UsageError(self._held_message(held, state))
            timeout = _timeout(held.data, self.timeout_s)
            now = time.monotonic()
            if deadline is None:
                budget = (self.wait_s if self.wait_s is not None
                          else max(0.0, timeout - held.age_s) + WAIT_MARGIN * timeout + 1.0)
                deadline = now + budget
                if budget > 0:
                    log.warning("%s is held by %s with the same arguments, last heartbeat %.0f s ago: waiting up "
                                "to %.0f s for it to go stale (timeout %g s), then taking it over",
                                self.output, self._who(held), held.age_s, budget, timeout)
            if now >= deadline:
                raise UsageError(self._held_message(held, state, waited=budget))
            time.sleep(min(deadline - now, max(0.2, min(10.0, timeout / 10))))
        raise UsageError(f"{self.output}: the output lease kept changing; try again later")

    def check(self) -> None:
        """Raise JobFailed once the lease is lost, or unsafe: not renewed for half
        its timeout while renewals failed or hung (90 % of it for any reason)."""
        if not self._lost and self._renewed is not None:
            now = time.monotonic()
            silent = now - self._renewed
            troubled = self._failure is not None or (self._trying is not None and self._trying > self._renewed)
            if (troubled and silent > SAFE_FRACTION * self.timeout_s) or silent > HARD_FRACTION * self.timeout_s:
                cause = f": {self._failure}" if self._failure is not None else ""
                self._unsafe = True
                self._lost = (f"could not renew the output lease on {self.output} for {silent:.0f} s (timeout "
                              f"{self.timeout_s:g} s){cause}; another job may take it over: stopped before "
                              "committing more")
        if self._lost:
            raise JobFailed(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it still names this job
        (also after it became unsafe: then as far as the store lets us)."""
        self._stop.set()
        if self._thread is not None:
            # A heartbeat hung in a request may go on: its conditional write
            # cannot bring back a lease removed here.
            self._thread.join(timeout=max(5.0, self.timeout_s / 4))
        if self._lost and not self._unsafe:
            return  # another job holds it
        try:
            held = self._read()
            if held is not None and held.data.get("holder") == self.job_id:
                remove(self.uri, self.storage)
        except Exception as exc:  # noqa: BLE001 - when unsafe, the job's own error is the one to report
            if not self._unsafe:
                raise
            log.warning("could not remove the output lease on %s: %s", self.output, exc)

    def heartbeat(self) -> None:
        """Rewrite the lease if it is still ours; marks it lost otherwise."""
        for _ in range(3):
            if self._replace(self.token):
                return
            held = self._read()
            if held is None or held.data.get("holder") != self.job_id:
                self._lost = self._lost_message(held)
                return
            # Still ours: our own write retried after it succeeded, or a fence's
            # rewrite under a new token (stores whose ETag is not the MD5).
            self.token = held.token

    # ------------------------------------------------------------ storage

    def _body(self) -> bytes:
        return (json.dumps({
            "holder": self.job_id, **self.identity, "args": self.args,
            "heartbeat": time.time(), "timeout_s": self.timeout_s,
        }, indent=2) + "\n").encode("utf-8")

    def _replace(self, token: Optional[str]) -> bool:
        """Write the lease if it is still what ``token`` describes (None: absent)."""
        started = time.monotonic()
        self._trying = started
        written = write_if_unchanged(self.uri, self._body(), token, self.storage)
        if written is None:
            return False
        self.token = written
        self._renewed, self._failure = started, None
        return True

    def _read(self) -> Optional[Held]:
        raw, token = read_for_update(self.uri, self.storage)
        age = age_s(self.uri, self.storage) if raw is not None else None
        if raw is None or age is None:
            return None
        return Held(_parse(raw), token, age)

    # ------------------------------------------------------------ decisions

    def _judge(self, held: Held) -> str:
        """"dead", "alive" (known by its pid), "stale" or "fresh" (by its heartbeat)."""
        if not held.data.get("holder"):
            return "stale"
        alive = _alive_here(held.data)
        if alive is not None:
            return "alive" if alive else "dead"
        return "stale" if held.age_s > _timeout(held.data, self.timeout_s) else "fresh"

    def _who(self, held: Held) -> str:
        d = held.data
        return f"job {d.get('holder')} on {d.get('host')} (pid {d.get('pid')})"

    def _held_message(self, held: Held, state: str, waited: Optional[float] = None) -> str:
        who = f"{self._who(held)}, heartbeat {held.age_s:.0f} s ago"
        theirs = held.data.get("args") or {}
        if theirs == self.args:
            if state == "alive":
                return (f"{self.output} is being written by another {self.job} job with the same arguments, "
                        f"running on this machine: {who}")
            if not waited:
                return (f"{self.output} is being written by another {self.job} job with the same arguments: {who}; "
                        f"not waiting for it ({self.job_key}.lease_wait_s is 0)")
            return (f"{self.output} is being written by another {self.job} job with the same arguments: {who}; "
                    f"it kept renewing its lease while this job waited {waited:.0f} s "
                    f"(see {self.job_key}.lease_wait_s), so it is still running (a duplicate submission?)")
        diff = ", ".join(f"{k} {theirs.get(k)!r}" for k in self.args if theirs.get(k) != self.args[k])
        return (f"{self.output} is being written by another {self.job} job with other arguments ({diff}): {who}; "
                f"choose another --output")

    def _lost_message(self, held: Optional[Held]) -> str:
        who = f"job {held.data.get('holder')} on {held.data.get('host')}" if held else "nobody (removed)"
        return f"lost the output lease on {self.output} to {who}; stopped before committing more parts"

    def _started(self) -> "OutputLease":
        interval = max(0.5, self.timeout_s / 4)
        retry = max(0.2, self.timeout_s / 20)

        def beat() -> None:
            wait, reported = interval, False
            while not self._stop.wait(wait) and not self._lost:
                try:
                    self.heartbeat()
                    wait, reported = interval, False
                except Exception as exc:  # noqa: BLE001 - retried; check() says when it is too late
                    self._failure, wait = exc, retry
                    if not reported:
                        log.warning("could not renew the output lease on %s (retrying every %g s): %s",
                                    self.output, retry, exc)
                        reported = True
                try:
                    self.check()
                except JobFailed:
                    return

        self._thread = threading.Thread(target=beat, name=f"{self.job}-lease", daemon=True)
        self._thread.start()
        return self


def _parse(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
