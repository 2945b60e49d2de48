"""Progress of an hours-long score run: parts done of total, rows/s, errors by
reason and an ETA, for the log and ``_summary.json``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Optional


class Progress:
    def __init__(self, parts_total: int, rows_total: int, parts_done: int, rows_done: int, errors: Counter):
        self.parts_total, self.rows_total = parts_total, rows_total
        self.parts_done, self.rows_done = parts_done, rows_done  # kept from earlier runs count as done
        self.errors = Counter(errors)
        self.started = time.time()
        self.rows_now = 0  # scored by this run

    def part_done(self, rows: int, errors: dict) -> None:
        self.parts_done += 1
        self.rows_done += rows
        self.rows_now += rows
        self.errors.update(errors)

    @property
    def rows_per_s(self) -> Optional[float]:
        elapsed = time.time() - self.started
        return round(self.rows_now / elapsed, 1) if self.rows_now and elapsed > 0 else None

    @property
    def eta_s(self) -> Optional[float]:
        rate = self.rows_per_s
        left = self.rows_total - self.rows_done
        return round(left / rate, 1) if rate else (0.0 if left == 0 else None)

    def to_dict(self) -> dict:
        return {"parts_done": self.parts_done, "parts_total": self.parts_total, "rows_done": self.rows_done,
                "rows_total": self.rows_total, "rows_per_s": self.rows_per_s, "eta_s": self.eta_s,
                "errors_by_reason": dict(self.errors.most_common()), "updated": time.time()}

    def line(self) -> str:
        eta = self.eta_s
        eta_text = "unknown" if eta is None else _duration(eta)
        errors = ", ".join(f"{n} {r}" for r, n in self.errors.most_common(3)) or "none"
        return (f"score: parts {self.parts_done}/{self.parts_total}, rows {self.rows_done}/{self.rows_total}, "
                f"{self.rows_per_s or 0:g} rows/s, ETA {eta_text}, errors: {errors}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
