"""Work units of a score run: a part is a fixed, sorted set of input URIs,
stored as a small Parquet file under ``OUTPUT/_plan/`` and scored into one
output file ``part-<index>-<hash of its URIs>.parquet``.

Plan files are written by the tasks that list a prefix or read a URI list,
never gathered on the driver: the driver holds one ``PartSpec`` per part.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import StorageConfig

PLAN_DIR = "_plan"
PLAN_FILE = "plan.json"
PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64())])
# Plan chunks are Parquet files too, under another suffix: a recursive
# ``**/*.parquet`` over an output reads the scores and nothing else.
PLAN_CHUNK_SUFFIX = ".plan"
PART_NAME = re.compile(r"^part-\d{5,}-[0-9a-f]{8}\.parquet$")


def digest(uris: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(uris).encode("utf-8")).hexdigest()


SET_MOD = 2**64


def set_hash(uris: Sequence[str]) -> int:
    """Of a set of distinct URIs, whatever their order or grouping into parts:
    the sum of the parts' ``set_hash`` is that of all their URIs."""
    return sum(int.from_bytes(hashlib.sha1(u.encode("utf-8")).digest()[:8], "big") for u in uris) % SET_MOD


@dataclass(frozen=True)
class PartSpec:
    """One part: ``rows`` sorted URIs in the plan file ``plan_file``."""

    index: int
    rows: int
    digest: str  # of the part's sorted URIs
    plan_file: str  # name under _plan/
    first: str = ""  # its first URI
    uris_hash: str = ""  # set_hash of its URIs (hex): compares listings whose part boundaries differ

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-{self.digest[:8]}.parquet"

    def to_dict(self) -> dict:
        return asdict(self)


def part_name(index: int, uris: Sequence[str]) -> str:
    return f"part-{index:05d}-{digest(uris)[:8]}.parquet"


def write_plan_chunk(plan_dir: str, uris: Sequence[str], sizes: Sequence[int], storage: StorageConfig,
                     index: int = -1) -> dict:
    """Publish one part's sorted URIs under ``plan_dir``; returns its descriptor
    (``index`` -1: assigned by the driver once every part is known). The file
    name is the hash of the URIs, so a repeated task writes the same file."""
    d = digest(uris)
    table = pa.Table.from_arrays([pa.array(list(uris), pa.string()), pa.array(list(sizes), pa.int64())],
                                 schema=PLAN_SCHEMA)
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, "plan.parquet")
        pq.write_table(table, local)
        st.publish_file(local, st.join(plan_dir, f"{d[:16]}{PLAN_CHUNK_SUFFIX}"), storage)
    return {"index": index, "rows": len(uris), "digest": d, "plan_file": f"{d[:16]}{PLAN_CHUNK_SUFFIX}",
            "first": uris[0] if uris else "", "uris_hash": f"{set_hash(uris):016x}"}


def read_plan_chunk(plan_dir: str, spec: PartSpec, storage: StorageConfig) -> pa.Table:
    table = pq.read_table(io.BytesIO(st.read_bytes(st.join(plan_dir, spec.plan_file), storage)))
    if table.num_rows != spec.rows:
        raise RuntimeError(f"{spec.plan_file} has {table.num_rows} rows, the plan says {spec.rows}")
    return table
