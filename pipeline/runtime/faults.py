"""Fault injection at named points, for the tests that prove recovery.

``INCEPTION_RAY_FAULT="<point>:<action>:<marker file>"`` makes the process that
reaches ``<point>`` either raise (``raise``) or kill itself with SIGKILL
(``sigkill``), once: the marker file records that it happened. Unset (always,
outside tests) it does nothing. Points: ``epoch-<n>`` (a training worker after
its n-th epoch's checkpoint, counted over both phases), ``published`` (the
training driver after the run's artifacts are published, before summary.json)
``score-part-ready`` (a scoring task with a part's rows in hand, before it
publishes the part) and ``score-parts-committed`` (the scoring driver after
its last Parquet part, before the final summary).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "INCEPTION_RAY_FAULT"


def maybe_fault(point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    where, action, marker = spec.split(":", 2)
    if where != point or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"{point} {action} pid {os.getpid()}\n")
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at {point} ({FAULT_ENV})")
