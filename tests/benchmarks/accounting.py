"""CPU and memory figures read from /proc, for the benchmarks' accounting of
their own process trees and of what other processes took meanwhile, and the
rotating rounds in which every benchmark measures its runs side by side."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    parent: int
    cpu_ticks: int  # user + system
    rss_pages: int


def processes() -> dict[int, Proc]:
    """Every process now running."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        out[int(entry)] = Proc(int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]))
    return out


def descendants(root: int, procs: dict[int, Proc]) -> set[int]:
    """``root`` and every process below it."""
    children = defaultdict(list)
    for pid, proc in procs.items():
        children[proc.parent].append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children[pid])
    return found & procs.keys()


def tree(root: int) -> dict[int, Proc]:
    """``root`` and its descendants."""
    procs = processes()
    return {pid: procs[pid] for pid in descendants(root, procs)}


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine has spent busy since boot."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def machine_busy_s() -> float:
    return machine_busy_ticks() / TICKS


def cpu_meter(moto_pid: int) -> Callable[[], dict]:
    """A function giving CPU seconds used so far: by the whole machine, by this
    process and its descendants (Ray, moto), and by moto alone."""
    me = os.getpid()

    def read() -> dict:
        procs = processes()
        ours = descendants(me, procs)
        moto = procs.get(moto_pid)
        return {
            "machine": machine_busy_s(),
            "ours": sum(procs[pid].cpu_ticks for pid in ours) / TICKS,
            "moto": (moto.cpu_ticks if moto else 0) / TICKS,
        }

    return read


def rounds_of(runs: dict[str, Callable[[int], dict]], order: tuple[str, ...], count: int,
              meter: Callable[[], dict], label: str) -> list[dict]:
    """``count`` rounds of every run, the order rotating each round; with each
    result the CPU seconds used meanwhile by this benchmark's processes (``cpu_s``),
    by moto (``moto_cpu_s``) and by every other process (``others_cpu_s``), and
    the wall time of the whole run (``wall_s``)."""
    rounds = []
    for r in range(count):
        results = {}
        for name in order[r % len(order):] + order[: r % len(order)]:
            before, started = meter(), time.perf_counter()
            result = runs[name](r)
            wall = time.perf_counter() - started
            used = {key: value - before[key] for key, value in meter().items()}
            results[name] = {
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()},
                "wall_s": round(wall, 3),
                "cpu_s": round(used["ours"], 2),
                "moto_cpu_s": round(used["moto"], 2),
                "others_cpu_s": round(max(0.0, used["machine"] - used["ours"]), 2),
            }
        print(f"{label} round {r + 1}/{count}: {results}", file=sys.stderr, flush=True)
        rounds.append({name: results[name] for name in order})
    return rounds
