"""TFRecord shards and their manifest.

A shard is ``<split>-<index:05d>-of-<count:05d>-<sha256[:16]>.tfrecord`` holding
``tf.train.Example`` records (``image/encoded``, ``image/class/label``,
``image/class/text``, ``image/source``, ...). The name carries the shard's
content identity: a new prepare never rewrites a file that a live manifest
names, and a cache keyed by name can never serve stale bytes. ``manifest.json``
is written last and is the only thing a reader needs: classes in label order,
per split the shard files with their example counts, sizes and SHA-256, counts
per class, and every rejected input with its reason.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")

# Feature keys of every record.
ENCODED = "image/encoded"
FORMAT = "image/format"
LABEL = "image/class/label"
TEXT = "image/class/text"
SOURCE = "image/source"
HEIGHT = "image/height"
WIDTH = "image/width"


def shard_name(split: str, index: int, count: int, sha256: str) -> str:
    return f"{split}-{index:05d}-of-{count:05d}-{sha256[:16]}.tfrecord"


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_example(data: bytes, label: int, text: str, source: str, height: int, width: int,
                 image_format: str = "jpeg") -> bytes:
    """One record; ``image_format`` is what ``data`` is, "jpeg" or "png"."""
    import tensorflow as tf  # heavy import kept out of module import time

    def _bytes(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    feature = {
        ENCODED: _bytes(data),
        FORMAT: _bytes(image_format.encode("ascii")),
        LABEL: _int(label),
        TEXT: _bytes(text.encode("utf-8")),
        SOURCE: _bytes(source.encode("utf-8")),
        HEIGHT: _int(height),
        WIDTH: _int(width),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized: bytes) -> dict[str, Any]:
    """Decode one record into plain Python values (for tests and tools)."""
    import tensorflow as tf

    ex = tf.train.Example.FromString(serialized)
    f = ex.features.feature
    return {
        "encoded": f[ENCODED].bytes_list.value[0],
        "format": f[FORMAT].bytes_list.value[0].decode("ascii"),
        "label": int(f[LABEL].int64_list.value[0]),
        "text": f[TEXT].bytes_list.value[0].decode("utf-8"),
        "source": f[SOURCE].bytes_list.value[0].decode("utf-8"),
        "height": int(f[HEIGHT].int64_list.value[0]),
        "width": int(f[WIDTH].int64_list.value[0]),
    }


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_manifest(
    *,
    source: str,
    classes: list[str],
    shards: dict[str, list[dict]],
    rejected: list[dict],
    files_seen: int,
    layout: str,
    settings: dict,
) -> dict:
    """``shards[split]`` is a list of ``{"file", "examples", "bytes", "sha256", "class_counts"}``."""
    splits = {}
    for split in SPLITS:
        entries = sorted(shards.get(split, []), key=lambda s: s["file"])
        class_counts = {name: 0 for name in classes}
        for entry in entries:
            for name, n in entry["class_counts"].items():
                class_counts[name] += n
        splits[split] = {
            "num_examples": sum(e["examples"] for e in entries),
            "class_counts": class_counts,
            "shards": [
                {"file": e["file"], "examples": e["examples"], "bytes": e["bytes"], "sha256": e["sha256"]}
                for e in entries
            ],
        }
    accepted = sum(s["num_examples"] for s in splits.values())
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "created": now_utc(),
        "layout": layout,
        "classes": list(classes),
        "splits": splits,
        "files_seen": files_seen,
        "accepted": accepted,
        "rejected": sorted(rejected, key=lambda r: r["uri"]),
        "settings": settings,
    }


def read_manifest(uri: str, storage: StorageConfig) -> dict:
    """Load ``manifest.json`` from a shards folder (or the file itself)."""
    path = uri if uri.rstrip("/").endswith(".json") else st.join(uri, MANIFEST_NAME)
    try:
        manifest = st.read_json(path, storage)
    except FileNotFoundError:
        raise UsageError(f"no {MANIFEST_NAME} at {uri} (run jobs.prepare first)") from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {path}: {st.describe_error(exc)}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UsageError(f"{path}: unsupported manifest format_version {version!r}")
    try:
        for split in SPLITS:
            for shard in manifest["splits"][split]["shards"]:
                check_shard_name(shard["file"])
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path}: malformed manifest ({st.describe_error(exc)})") from None
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return manifest


def check_shard_name(name: str) -> str:
    """Shard entries are plain file names inside the manifest's folder: a
    manifest can never make a reader open a file elsewhere."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or ":" in name or not name.endswith(".tfrecord"):
        raise ValueError(f"shard entry {name!r} is not a plain .tfrecord file name")
    return name
