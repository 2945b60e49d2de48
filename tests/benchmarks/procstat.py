"""CPU and memory figures read from /proc, for the benchmarks' accounting of
their own process trees and of what other processes took meanwhile."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

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
