"""Turn a class-per-folder image tree into TFRecord shards plus a manifest.

1. ``discover``: list every file under the source once, find classes and the
   split (an existing ``train/`` + ``validation/`` layout, or a deterministic
   split by a hash of the path), and reject files outside any class folder.
2. ``plan_shards``: assign files to shards of about ``shard_size_mb`` (by listed
   size), interleaved in hash order so every shard mixes classes.
3. ``run_prepare``: one Ray Data task per shard reads its files (concurrently on
   object stores), validates and normalises each image, writes the shard locally
   and publishes it atomically; the driver then writes ``manifest.json`` last.

Every file seen is either in a shard or in ``manifest["rejected"]`` with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

from pipeline import storage as st
from pipeline.config import Config, DataConfig, PrepareConfig, StorageConfig
from pipeline.errors import UsageError
from pipeline.data.images import ImageRejected, jpeg_scale_refusal
from pipeline.data.preprocess import prepare_image
from pipeline.data.shards import MANIFEST_NAME, SPLITS, build_manifest, file_sha256, make_example, shard_name

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "validation": "validation"}


@dataclass
class SourceFile:
    uri: str  # full URI, as recorded in image/source and rejections
    path: str  # filesystem path for fsspec calls
    size: int
    split: str = ""
    cls: str = ""
    label: int = -1


@dataclass
class Discovery:
    source: str
    layout: str  # "split" (train/ + validation/ given) or "flat"
    classes: list[str]
    files: list[SourceFile]  # usable candidates, labelled and split
    rejected: list[dict] = field(default_factory=list)
    files_seen: int = 0


def split_by_hash(key: str, val_fraction: float) -> str:
    """Deterministic: the same relative path always lands in the same split."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _order_key(key: str) -> str:
    return hashlib.md5(key.encode("utf-8")).hexdigest()


def discover(src: str, storage: StorageConfig, val_fraction: float) -> Discovery:
    fs, root = st.check_source(src, storage)
    try:
        listed = st.list_files(fs, root)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list {src}: {st.describe_error(exc)}") from None
    if not listed:
        raise UsageError(f"no files under {src}")

    rels = [(path, size, st.relative(path, root)) for path, size in listed]
    top = {rel.split("/", 1)[0] for _, _, rel in rels if rel and "/" in rel}
    layout = "split" if {"train", "validation"} <= top else "flat"

    files: list[SourceFile] = []
    rejected: list[dict] = []
    for path, size, rel in rels:
        uri = st.full_uri(fs, path, like=src)
        parts = (rel or "").split("/")
        split: Optional[str] = None
        if layout == "split":
            if parts[0] not in SPLIT_DIRS.values():
                rejected.append({"uri": uri, "reason": "outside train/ and validation/"})
                continue
            split, parts = parts[0], parts[1:]
        if len(parts) < 2:
            rejected.append({"uri": uri, "reason": "not inside a class folder"})
            continue
        if any(p.startswith(".") for p in parts[:-1]):
            rejected.append({"uri": uri, "reason": "inside a hidden folder"})
            continue
        cls = parts[0]
        if split is None:
            split = split_by_hash("/".join(parts), val_fraction)
        files.append(SourceFile(uri=uri, path=path, size=size, split=split, cls=cls))

    classes = sorted({f.cls for f in files})
    if not classes:
        raise UsageError(f"no class folders under {src} (expected {src}/<class>/<image files>)")
    if len(classes) < 2:
        raise UsageError(
            f"found a single class folder ('{classes[0]}') under {src}; a classifier needs at least 2"
        )
    index = {name: i for i, name in enumerate(classes)}
    for f in files:
        f.label = index[f.cls]
    return Discovery(src, layout, classes, files, rejected, files_seen=len(listed))


def plan_shards(files: list[SourceFile], cfg: PrepareConfig) -> list[dict]:
    """Shard specs ``{"split", "index", "count", "files"}``; every file is in
    exactly one. The shard's name is known once it is written (it carries the
    content's SHA-256)."""
    specs = []
    target = cfg.shard_size_mb * 1024 * 1024
    for split in SPLITS:
        members = sorted((f for f in files if f.split == split), key=lambda f: _order_key(f.uri))
        if not members:
            continue
        total = sum(f.size for f in members)
        by_size = math.ceil(total / target)
        by_count = min(cfg.min_shards, math.ceil(len(members) / cfg.min_examples_per_shard))
        count = max(1, min(len(members), max(by_size, by_count)))
        for i in range(count):
            specs.append(
                {
                    "split": split,
                    "index": i,
                    "count": count,
                    "files": [asdict(f) for f in members[i::count]],
                }
            )
    return specs


def write_shard(
    spec: dict,
    *,
    dst: str,
    source: str,
    storage: StorageConfig,
    cfg: PrepareConfig,
) -> dict:
    """Read, validate and encode the files of one shard, write it, publish it.
    Never raises for a bad file: those come back as rejections."""
    import tensorflow as tf

    files = spec["files"]
    fs, _ = st.get_fs(source, storage)
    rejected: list[dict] = []
    class_counts: Counter = Counter()
    reencoded = 0
    examples = 0
    with st.local_scratch() as scratch:
        local = os.path.join(scratch, f"{spec['split']}-{spec['index']:05d}.tfrecord")
        with tf.io.TFRecordWriter(local) as writer:
            for start in range(0, len(files), cfg.read_batch):
                batch = files[start : start + cfg.read_batch]
                blobs = _read_many(fs, [f["path"] for f in batch])
                for f in batch:
                    raw = blobs.get(f["path"])
                    if isinstance(raw, BaseException):
                        rejected.append({"uri": f["uri"], "reason": f"cannot read: {st.describe_error(raw)}"})
                        continue
                    try:
                        img = prepare_image(
                            raw,
                            max_pixels=cfg.max_pixels,
                            max_side=cfg.max_side,
                            jpeg_scale_to=cfg.jpeg_scale_to,
                            png_compress_level=cfg.png_compress_level,
                        )
                    except ImageRejected as exc:
                        rejected.append({"uri": f["uri"], "reason": str(exc)})
                        continue
                    writer.write(make_example(img.data, f["label"], f["cls"], f["uri"], img.height, img.width,
                                              image_format=img.format))
                    class_counts[f["cls"]] += 1
                    reencoded += img.reencoded
                    examples += 1
        size = os.path.getsize(local)
        sha256 = file_sha256(local)
        name = shard_name(spec["split"], spec["index"], spec["count"], sha256)
        if examples:
            _publish_shard(local, st.join(dst, name), size, storage)
    result = {
        "file": name,
        "examples": examples,
        "bytes": size if examples else 0,
        "sha256": sha256,
        "class_counts": dict(class_counts),
        "rejected": rejected,
        "reencoded": reencoded,
        "seen": len(files),
    }
    # Arrow needs one schema for every row: nested, variable parts travel as JSON.
    return {"split": spec["split"], "result": json.dumps(result)}


def _publish_shard(local: str, uri: str, size: int, storage: StorageConfig) -> None:
    """Shard names carry their content's hash: a file already there under this
    name holds these bytes (a re-run, or a prepare --overwrite that produced an
    identical shard), and is never rewritten while a live manifest may name it."""
    try:
        fs, path = st.get_fs(uri, storage)
        if fs.size(path) == size:
            return
    except FileNotFoundError:
        pass
    st.publish_file(local, uri, storage)


def _read_many(fs, paths: list[str]) -> dict:
    """Bytes (or the exception) per path; object stores fetch them concurrently."""
    options = _read_options(fs)
    try:
        out = fs.cat(paths, on_error="return", **options)
    except Exception:  # noqa: BLE001 - fall back to one by one to attribute errors
        out = {}
        for p in paths:
            try:
                out[p] = fs.cat_file(p, **options)
            except Exception as exc:  # noqa: BLE001
                out[p] = exc
    if len(paths) == 1 and not isinstance(out, dict):
        out = {paths[0]: out}
    return {p: out.get(p, FileNotFoundError(p)) for p in paths}


def _read_options(fs) -> dict:
    """s3fs sends a HEAD before every GET to decide whether to split the object
    into ranged reads; for image-sized files that doubles the requests for nothing
    (the files of a batch are fetched concurrently already)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return {"max_concurrency": 1} if "s3" in protocols else {}


@dataclass
class PreparePlan:
    src: str
    dst: str
    discovery: Discovery
    specs: list[dict]
    old_manifest: Optional[dict]


def plan_prepare(cfg: Config, src: str, dst: str, *, overwrite: bool = False) -> PreparePlan:
    """Everything that can fail on user input, checked before any cluster work."""
    # A model input the config sets that training on these shards would refuse:
    # said before the images are read, not after. (The default input size says
    # nothing about the model to come: a smaller jpeg_scale_to alone is a
    # choice made for a smaller model.)
    if cfg.data.image_size != DataConfig.model_fields["image_size"].default:
        refusal = jpeg_scale_refusal(cfg.data.image_size, cfg.prepare.jpeg_scale_to)
        if refusal:
            raise UsageError(f"the config's model input: {refusal}")
    src, dst = st.absolute(src), st.absolute(dst)  # Ray tasks do not run in this folder
    manifest_uri = st.join(dst, MANIFEST_NAME)
    old_manifest = None
    try:
        has_manifest = st.exists(manifest_uri, cfg.storage)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {dst}: {st.describe_error(exc)}") from None
    if has_manifest:
        if not overwrite:
            raise UsageError(f"{dst} already holds prepared shards ({MANIFEST_NAME}); pass --overwrite to replace them")
        old_manifest = st.read_json(manifest_uri, cfg.storage)
    found = discover(src, cfg.storage, cfg.prepare.val_fraction)
    st.check_writable(dst, cfg.storage)
    return PreparePlan(src, dst, found, plan_shards(found.files, cfg.prepare), old_manifest)


def run_prepare(cfg: Config, plan: PreparePlan) -> dict:
    """Write the shards on Ray Data, then the manifest; returns the summary (also
    written as ``summary.json``)."""
    import ray

    started = time.time()
    src, dst, found, specs = plan.src, plan.dst, plan.discovery, plan.specs
    manifest_uri = st.join(dst, MANIFEST_NAME)
    log.info(
        "prepare: %d files under %s, %d classes (%s layout), %d shards to write",
        found.files_seen, src, len(found.classes), found.layout, len(specs),
    )

    ds = ray.data.from_items(specs, override_num_blocks=len(specs)).map(
        write_shard,
        fn_kwargs={"dst": dst, "source": src, "storage": cfg.storage, "cfg": cfg.prepare},
        num_cpus=1,
    )
    # A single map of whole-shard tasks: Ray's CPU accounting already bounds how
    # many run at once. Ray Data's per-operator budgets start each execution at
    # zero until the cluster size is first polled (about a second), and until
    # then run one shard at a time: on a small machine, much of a short job.
    ds.context.op_resource_reservation_enabled = False
    shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rejected = list(found.rejected)
    reencoded = 0
    for done, row in enumerate(ds.iter_rows(), start=1):
        result = json.loads(row["result"])
        rejected.extend(result["rejected"])
        reencoded += result["reencoded"]
        if result["examples"]:
            shards[row["split"]].append(result)
        log.info(
            "[%d/%d] %s: %d images, %d rejected",
            done, len(specs), result["file"], result["examples"], len(result["rejected"]),
        )

    settings = cfg.prepare.model_dump()
    manifest = build_manifest(
        source=src,
        classes=found.classes,
        shards=shards,
        rejected=rejected,
        files_seen=found.files_seen,
        layout=found.layout,
        settings=settings,
    )
    accounted = manifest["accepted"] + len(manifest["rejected"])
    if accounted != found.files_seen:  # a broken invariant is a bug, never silent loss
        raise RuntimeError(f"prepare accounted for {accounted} of {found.files_seen} files")
    st.write_text(st.join(dst, "config.yaml"), cfg.to_yaml(), cfg.storage)
    st.write_json(manifest_uri, manifest, cfg.storage)
    if plan.old_manifest:
        _remove_stale_shards(plan.old_manifest, manifest, dst, cfg.storage)

    elapsed = time.time() - started
    reasons = Counter(r["reason"].split(":", 1)[0] for r in manifest["rejected"])
    summary = {
        "job": "prepare",
        "source": src,
        "destination": dst,
        "manifest": manifest_uri,
        "classes": found.classes,
        "files_seen": found.files_seen,
        "accepted": manifest["accepted"],
        "rejected": len(manifest["rejected"]),
        "rejected_by_reason": dict(reasons.most_common()),
        "reencoded": reencoded,
        "splits": {
            s: {
                "examples": manifest["splits"][s]["num_examples"],
                "shards": len(manifest["splits"][s]["shards"]),
                "class_counts": manifest["splits"][s]["class_counts"],
            }
            for s in SPLITS
        },
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(found.files_seen / elapsed, 1) if elapsed > 0 else None,
    }
    st.write_json(st.join(dst, "summary.json"), summary, cfg.storage)
    return summary


def _remove_stale_shards(old: dict, new: dict, dst: str, storage: StorageConfig) -> None:
    keep = {s["file"] for split in new["splits"].values() for s in split["shards"]}
    for split in old.get("splits", {}).values():
        for shard in split.get("shards", []):
            if shard["file"] not in keep:
                st.remove(st.join(dst, shard["file"]), storage)
