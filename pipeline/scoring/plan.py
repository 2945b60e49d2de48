"""Planning a score run.

``plan_score`` (driver, no Ray, no TensorFlow) checks everything a user can get
wrong: the model and its labels and recipe, the images (a prefix's first level,
or a list's columns and first entries, see ``pipeline.scoring.entries``), and
what the output already holds. Every such error is a UsageError here.

``prepare_parts`` (Ray) derives the parts. ``--overwrite`` always lists the
prefix or reads the lists again (``pipeline.scoring.listing``). Otherwise it
reuses ``OUTPUT/_plan/plan.json`` when an earlier run with the same images,
rows per file and allowed protocols wrote one: as it is when that run did not
finish (resume), and after checking the input when it did (``_SUCCESS``): a
list by its ETag or content hash and size (checked in ``plan_score``, before
Ray), a prefix by listing it again and comparing its set of URIs (count and an
order-free hash: parts may be packed differently). Without a plan to reuse, a
prefix's parts are handed to scoring as listing produces them (``PartStream``)
and plan.json is written when listing ends. A changed input
is refused (UsageError) unless ``--overwrite``. ``plan.json`` records what it
was built from (``input``). The driver holds one small descriptor per part,
whatever the number of images. It then finds the parts already committed by
this model and settings (resume; the footer of each part, ``commit``) and our
parts this plan no longer produces (``stale``: removed before any part is
written, so that two plans' parts are never visible together).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from pipeline import storage as st
from pipeline.config import Config, StorageConfig
from pipeline.errors import UsageError
from pipeline.data.preprocess import Recipe
from pipeline.scoring import listing
from pipeline.scoring.commit import (SUCCESS_NAME, SUMMARY_NAME, NotKept, committed_errors, listdir, part_bytes,
                                     short_digest)
from pipeline.scoring.entries import EntryRejected, allowed_protocols
from pipeline.scoring.parts import PART_NAME, PLAN_DIR, PLAN_FILE, SET_MOD, PartSpec, read_plan_chunk

log = logging.getLogger(__name__)
PLAN_VERSION = 3  # 2: plan.json records its input; 3: parts sized by score.part_mb (rows_per_part)
# Rows per part are sized for this much more than the first names' bytes a
# row: later names may compress a little worse (more digits change).
PART_SIZE_MARGIN = 1.05
DIFF_PARTS = 64  # changed parts whose URIs are read to count the images added and removed


@dataclass
class ScorePlan:
    model: str  # the `model` column: --model as given, or REGISTRY#name@version
    model_uri: str  # where the model is loaded from (run dir or model file)
    source: str  # --images
    output: str
    labels: list[str]
    top_k: int  # already capped at the number of labels
    image_size: int
    rows_per_file: int  # rows per part: score.rows_per_file, or what score.part_mb gives (rows_per_part)
    part_mb: Optional[float] = None  # score.part_mb
    rows_cap: Optional[int] = None  # score.rows_per_file
    is_list: bool = False
    allowed: frozenset = frozenset()  # protocols list entries may name
    recipe: Optional[Recipe] = None  # the model's preprocessing.json
    # Filled by prepare_parts:
    parts: list[PartSpec] = field(default_factory=list)
    ignored: int = 0  # files under the prefix without an image name
    listing_tasks: int = 0  # 0 when the plan was reused
    plan_reused: bool = False
    committed: dict[int, Counter] = field(default_factory=dict)  # part index -> error reasons
    stale: list[str] = field(default_factory=list)  # our parts this plan does not produce
    stale_after: list[str] = field(default_factory=list)  # known once listing ends (removed then)
    stream: Optional["PartStream"] = None  # parts still being listed (prepare_parts(stream=True))
    rescored: dict[str, list] = field(default_factory=dict)  # why parts present are scored again -> names
    # Filled by plan_score:
    model_fingerprint: str = ""  # changes when the model file's bytes do
    input: dict = field(default_factory=dict)  # what the plan is built from (plan.json's "input")
    saved: Optional[dict] = None  # OUTPUT/_plan/plan.json of an earlier run
    previous_complete: Optional[dict] = None  # OUTPUT/_SUCCESS of an earlier run ({} when not JSON)

    @property
    def images(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def plan_dir(self) -> str:
        return st.join(self.output, PLAN_DIR)

    @property
    def writer(self) -> dict:
        """Who writes the parts (``commit.IDENTITY_FIELDS``): a part is kept
        by a later run only when all of these are the same."""
        return {"model": self.model, "model_fingerprint": self.model_fingerprint, "labels": short_digest(self.labels),
                "top_k": self.top_k, "recipe": short_digest(self.recipe.to_dict()) if self.recipe else ""}

    def lease_args(self) -> dict:
        """What decides the rows: two jobs may share an output only if these match."""
        return {"model": canonical(self.model), "images": canonical(self.source), "top_k": self.top_k,
                "rows_per_file": self.rows_cap, "part_mb": self.part_mb}


def canonical(uri: str) -> str:
    if "#" in uri and "://" not in uri.split("#", 1)[0]:
        path, ref = uri.split("#", 1)
        return f"{os.path.abspath(path)}#{ref}"
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def plan_score(cfg: Config, model: str, images: str, output: str, *,
               overwrite: bool = False, allow_unsafe: bool = False) -> ScorePlan:
    """Everything that can fail on user input, checked before any cluster work."""
    from pipeline.artifact import LABELS_FILE, check_model_reference, check_model_uri, model_recipe

    model_uri, shown = check_model_reference(model, cfg.storage, allow_unsafe=allow_unsafe)
    model_fp = model_fingerprint(model_uri, cfg.storage)
    labels_uri = st.join(check_model_uri(model_uri, cfg.storage).rsplit("/", 1)[0], LABELS_FILE)
    try:
        labels = st.read_json(labels_uri, cfg.storage)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise UsageError(f"{labels_uri} is not a JSON list of class names")
    plan = ScorePlan(model=shown, model_uri=model_uri, source=images, output=output, labels=list(labels),
                     top_k=min(cfg.score.top_k, len(labels)), image_size=0,
                     rows_per_file=0, part_mb=cfg.score.part_mb, rows_cap=cfg.score.rows_per_file,
                     model_fingerprint=model_fp)
    plan.is_list = listing.is_list(images, cfg.storage)
    sample: Optional[list[str]] = None
    if plan.is_list:
        plan.allowed = allowed_protocols(images, output, cfg.score.uri_protocols)
        sample = listing.check_list_head(images, cfg.storage, plan.allowed)
        plan.input = {"kind": "list", "uri": images, **object_fingerprint(images, cfg.storage)}
    else:
        if not listing.first_level(images, cfg.storage):
            raise UsageError(no_images(images))
    st.check_writable(output, cfg.storage)
    check_previous_output(plan, cfg.storage, overwrite)
    plan.recipe = model_recipe(model_uri, cfg.storage, allow_unsafe=allow_unsafe)
    plan.image_size = plan.recipe.image_size
    plan.rows_per_file = saved_rows(plan) or rows_per_part(cfg, plan, sample)
    if not overwrite:
        check_list_unchanged(plan)
    return plan


def rows_per_part(cfg: Config, plan: ScorePlan, sample: Optional[list[str]] = None) -> int:
    """Rows per part: as many as fit in ``score.part_mb`` by the bytes a row
    of ``sample`` (image URIs of this input; read here when None) takes in a
    part file, rounded down to two significant digits (the same input gives
    the same size run after run, a few more keys too), at most
    ``score.rows_per_file``."""
    sc = cfg.score
    if sc.part_mb is None:
        return int(sc.rows_per_file)
    if sample is None:
        sample = listing.sample_uris(plan.source, cfg.storage)
    if not sample:  # an S3 Inventory: keys of 32 hex digits, which hardly compress
        rng = np.random.default_rng(0)
        folder = plan.source.rsplit("/", 1)[0] if plan.is_list else plan.source.rstrip("/")
        sample = [f"{folder}/{rng.bytes(16).hex()}.jpg" for _ in range(listing.SAMPLE_URIS)]
    per_row, fixed = part_bytes(sample, plan.labels, plan.top_k, plan.model)
    rows = int(max(sc.part_mb * 2**20 - fixed, per_row) / (per_row * PART_SIZE_MARGIN))
    if rows >= 100:
        unit = 10 ** (len(str(rows)) - 2)
        rows = rows // unit * unit
    rows = max(1, min(rows, sc.rows_per_file or rows))
    log.info("score: parts of up to %d rows (%.0f bytes a row, score.part_mb %g%s)", rows, per_row, sc.part_mb,
             f", score.rows_per_file {sc.rows_per_file}" if sc.rows_per_file else "")
    return rows


def saved_rows(plan: ScorePlan) -> Optional[int]:
    """Rows per part of the earlier run's plan (``plan.saved``) when it was
    made from this input with these settings, else None. A plan from before
    score.part_mb (version 2, parts of ``rows_per_file``) is kept unless
    score.rows_per_file now asks for another number."""
    key, now = (plan.saved or {}).get("key") or {}, plan_key(plan)
    if key == now:
        rows = plan.saved.get("rows_per_part")
        return int(rows) if isinstance(rows, int) and rows > 0 else None
    rows = key.get("rows_per_file")
    same_input = all(key.get(k) == now[k] for k in ("images", "uri_protocols"))
    if key.get("version") == 2 and isinstance(rows, int) and same_input and plan.rows_cap in (None, rows):
        return rows
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def object_fingerprint(uri: str, storage: StorageConfig) -> dict:
    """What identifies a file's content: {size, mtime, and sha256 (a local
    file, its bytes hashed) or etag (object stores)}."""
    fs, path = st.get_fs(uri, storage)
    try:
        if st.is_local(uri):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            stat = os.stat(path)
            return {"size": stat.st_size, "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                    "sha256": digest.hexdigest()}
        try:
            info = fs.info(path, refresh=True)
        except TypeError:
            info = fs.info(path)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {uri}: {st.describe_error(exc)}") from None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5") or ""
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return {"size": int(info.get("size") or 0), "mtime": str(mtime), "etag": str(etag).strip('"')}


def model_fingerprint(model_uri: str, storage: StorageConfig) -> str:
    """Of the model file's bytes: its sha256 (local), else its ETag and size
    (or size and modification time where the store gives no ETag)."""
    from pipeline.artifact import model_file_uri

    fp = object_fingerprint(model_file_uri(model_uri), storage)
    if fp.get("sha256"):
        return f"sha256:{fp['sha256'][:32]}"
    if fp.get("etag"):
        return f"etag:{fp['etag']},size:{fp['size']}"
    return f"size:{fp['size']},mtime:{fp['mtime']}"


def input_changes(before: dict, now: dict) -> list[str]:
    """How a list file changed between two ``object_fingerprint``s (empty: it did not)."""
    changes = []
    for key, what in (("sha256", "content (sha256)"), ("etag", "ETag")):
        if before.get(key) and now.get(key) and before[key] != now[key]:
            changes.append(f"{what} {before[key][:16]} -> {now[key][:16]}")
    if before.get("size") != now.get("size"):
        changes.append(f"size {before.get('size')} -> {now.get('size')} bytes")
    if changes and before.get("mtime") != now.get("mtime"):
        changes.append(f"modified {now.get('mtime')} (planned from the version of {before.get('mtime')})")
    return changes


def check_list_unchanged(plan: ScorePlan) -> None:
    """Without --overwrite, a list whose plan is reused must be the list that
    plan was made from, whether the earlier run finished or not."""
    saved = plan.saved
    if not plan.is_list or saved is None or saved_rows(plan) is None:
        return
    before = saved.get("input") or {}
    changes = input_changes(before, plan.input)
    if changes:
        state = "was completed" if plan.previous_complete is not None else "was planned (that run did not finish)"
        raise UsageError(f"{plan.source} changed since {plan.output} {state}: {', '.join(changes)}; its plan "
                         f"has {saved.get('images', '?')} images of the list as it was. Pass --overwrite to "
                         "score the list as it is now, or give a new --output")


def no_images(images: str) -> str:
    from pipeline.data.images import IMAGE_EXTENSIONS

    return f"no image files under {images} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)"


def check_previous_output(plan: ScorePlan, storage: StorageConfig, overwrite: bool) -> None:
    """Refuse to mix with scores of other arguments unless ``overwrite``."""
    names = listdir(plan.output, storage)
    foreign = sorted(n for n in names if n.endswith(".parquet") and not PART_NAME.match(n) and n[0] not in "._")
    if foreign:
        raise UsageError(f"{plan.output} holds Parquet files this job did not write ({foreign[0]}); "
                         "give an empty or new --output")
    if not overwrite:
        plan.saved = _read_plan(st.join(plan.plan_dir, PLAN_FILE), storage)
        if SUCCESS_NAME in names:
            try:
                marker = st.read_json(st.join(plan.output, SUCCESS_NAME), storage)
            except (FileNotFoundError, ValueError):
                marker = {}
            plan.previous_complete = marker if isinstance(marker, dict) else {}
    if overwrite or not any(PART_NAME.match(n) for n in names):
        return
    previous = _read_summary(plan.output, storage)
    mine = {"model": canonical(plan.model), "source": canonical(plan.source), "top_k": plan.top_k}
    theirs = previous and {k: canonical(previous[k]) if k != "top_k" else previous[k] for k in mine}
    if theirs != mine:
        what = (f"scores of {previous['source']} by {previous['model']} (top_k {previous['top_k']})"
                if previous else f"part files without {SUMMARY_NAME}")
        raise UsageError(f"{plan.output} already holds {what}; pass --overwrite to replace them, "
                         "or choose another --output")
    if previous.get("model_fingerprint") and previous["model_fingerprint"] != plan.model_fingerprint:
        raise UsageError(f"{plan.output} already holds scores by another version of {plan.model} (its model file "
                         f"was {previous['model_fingerprint']}, now {plan.model_fingerprint}); pass --overwrite to "
                         "replace them, or choose another --output")


def _read_summary(output: str, storage: StorageConfig) -> Optional[dict]:
    try:
        data = st.read_json(st.join(output, SUMMARY_NAME), storage)
    except (FileNotFoundError, ValueError):  # absent, or not JSON
        return None
    return data if isinstance(data, dict) and {"model", "source", "top_k"} <= data.keys() else None


# ---------------------------------------------------------------- the parts (Ray)


def plan_key(plan: ScorePlan) -> dict:
    return {"version": PLAN_VERSION, "images": canonical(plan.source), "rows_per_file": plan.rows_cap,
            "part_mb": plan.part_mb, "uri_protocols": sorted(plan.allowed)}


def prepare_parts(cfg: Config, plan: ScorePlan, overwrite: bool = False,
                  start_writing: Optional[Callable[[], None]] = None, stream: bool = False) -> None:
    """Fill ``plan.parts`` (from ``_plan/`` or by listing), ``committed``,
    ``rescored`` and ``stale``. ``start_writing`` is called before the plan
    in the output changes (a new plan.json); a changed input of a completed
    output raises UsageError before anything is written. ``stream``: a prefix
    to list is not waited for: ``plan.stream`` hands out its parts as listing
    produces them (``PartStream``) and writes plan.json when listing ends."""
    storage = cfg.storage
    saved = plan.saved if not overwrite else None
    if saved is not None and saved_rows(plan) == plan.rows_per_file:
        plan.parts = [PartSpec(**p) for p in saved["parts"]]
        plan.ignored = int(saved.get("ignored", 0))
        plan.input = saved.get("input") or plan.input
        plan.plan_reused = True
        if plan.previous_complete is not None and not plan.is_list:
            _check_prefix_unchanged(cfg, plan)
        else:
            log.info("score: reusing the plan in %s (%d parts)", plan.plan_dir, len(plan.parts))
    else:
        if saved is not None:
            log.info("score: the plan in %s was made with other settings (%s); planning again", plan.plan_dir,
                     ", ".join(f"{k} {saved.get('key', {}).get(k)!r}, now {v!r}" for k, v in plan_key(plan).items()
                               if saved.get("key", {}).get(k) != v) or "an older plan format")
        if start_writing is not None:
            start_writing()
        if plan.is_list:
            _build(cfg, plan)
            _write_plan(plan, storage)
        else:
            parts = PartStream(cfg, plan, overwrite or saved is not None)
            if stream:
                plan.stream = parts
                parts.start()
                return
            parts.start()
            while not parts.done:
                parts.poll(1.0)
    if not plan.parts:
        raise UsageError(no_images(plan.source) if not plan.is_list else f"{plan.source} lists no images")
    _find_committed(plan, storage, overwrite)


def _write_plan(plan: ScorePlan, storage: StorageConfig) -> None:
    """plan.json, then the plan files it does not name are removed."""
    st.write_json(st.join(plan.plan_dir, PLAN_FILE),
                  {"key": plan_key(plan), "rows_per_part": plan.rows_per_file, "made": _now(), "input": plan.input,
                   "images": plan.images,
                   "ignored": plan.ignored, "listing_tasks": plan.listing_tasks,
                   "parts": [p.to_dict() for p in sorted(plan.parts, key=lambda p: p.index)]}, storage)
    wanted = {p.plan_file for p in plan.parts} | {PLAN_FILE}
    for name in listdir(plan.plan_dir, storage):
        if name not in wanted and not name.startswith(st.TMP_MARK):
            st.remove(st.join(plan.plan_dir, name), storage)


def uris_hash(parts: list) -> str:
    """The set hash of all URIs of these parts ("" when a part lacks one:
    a plan from before parts recorded it)."""
    if any(not p.uris_hash for p in parts):
        return ""
    return f"{sum(int(p.uris_hash, 16) for p in parts) % SET_MOD:016x}"


class PartStream:
    """The parts of a prefix, handed out as listing produces them (the
    listing runs in a thread of the driver; ``poll`` numbers the parts in the
    order they come, from 0). When listing ends, plan.json is written.

    ``replace`` (``--overwrite``, or an earlier plan of other settings): our
    parts already in the output are all removed before any part of this plan
    is published (``plan.stale``). Otherwise part files found without a plan
    (a run stopped before its listing ended) are kept where this listing
    produces the same URIs again (the same digest, the part keeps its
    number; the file's footer says it is complete and of this model); new
    parts take numbers no such file has, and the files this listing does not
    produce are removed once it ends (``plan.stale_after``)."""

    def __init__(self, cfg: Config, plan: ScorePlan, replace: bool):
        self.cfg, self.plan = cfg, plan
        self.stats: dict = {}
        self.done = False
        self._items: queue.Queue = queue.Queue()
        self._stop = False
        self._listed_at = _now()
        self._next = 0
        names = sorted(n for n in listdir(plan.output, cfg.storage) if PART_NAME.match(n))
        plan.parts, plan.committed, plan.stale = [], {}, (names if replace else [])
        self._found: dict[str, list[str]] = {}
        self._used: set[int] = set()
        if not replace:
            for name in names:
                self._found.setdefault(name.rsplit("-", 1)[1][:8], []).append(name)
                self._used.add(int(name.split("-")[1]))
        self._kept: set[str] = set()
        self._thread = threading.Thread(target=self._list, name="score-listing", daemon=True)

    def start(self) -> None:
        st.remove(st.join(self.plan.plan_dir, PLAN_FILE), self.cfg.storage)  # no plan until listing ends
        self._thread.start()

    def stop(self) -> None:
        self._stop = True

    def _list(self) -> None:
        plan, sc = self.plan, self.cfg.score
        try:
            for d in listing.iter_prefix(plan.source, self.cfg.storage, plan.plan_dir, plan.rows_per_file,
                                         sc.list_concurrency, self.stats, stop=lambda: self._stop):
                self._items.put(d)
        except BaseException as exc:  # noqa: BLE001 - raised again by poll
            self._items.put(exc)
        else:
            self._items.put(None)

    def poll(self, timeout: float = 0.0) -> list[PartSpec]:
        """The parts listed since the last call (waiting up to ``timeout``
        for the first); the listing's error, if it failed."""
        new: list[PartSpec] = []
        while not self.done:
            try:
                item = self._items.get(timeout=timeout) if (timeout > 0 and not new) else self._items.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if item is None:
                self._finish()
                break
            new.append(self._number(item))
        return new

    def _number(self, d: dict) -> PartSpec:
        plan = self.plan
        for name in self._found.get(d["digest"][:8], []):
            spec = PartSpec(**{**d, "index": int(name.split("-")[1])})
            if name in self._kept or spec.name != name:
                continue
            try:
                errors = committed_errors(st.join(plan.output, name), self.cfg.storage, spec.rows, plan.writer,
                                          spec.digest)
            except NotKept as why:
                plan.rescored.setdefault(why.kind, []).append((name, str(why)))
                continue
            self._kept.add(name)
            plan.committed[spec.index] = errors
            break
        else:
            while self._next in self._used:
                self._next += 1
            spec = PartSpec(**{**d, "index": self._next})
            self._used.add(self._next)
        plan.parts.append(spec)
        return spec

    def _finish(self) -> None:
        plan = self.plan
        self._thread.join()
        plan.ignored, plan.listing_tasks = self.stats.get("ignored", 0), self.stats.get("tasks", 0)
        plan.input = {"kind": "prefix", "uri": plan.source, "listed_at": self._listed_at, "images": plan.images,
                      "parts": len(plan.parts), "ignored": plan.ignored, "uris_hash": uris_hash(plan.parts)}
        self.done = True
        log.info("score: planned %d images in %d parts (%d listing tasks)", plan.images, len(plan.parts),
                 plan.listing_tasks)
        if not plan.parts:
            raise UsageError(no_images(plan.source))
        _write_plan(plan, self.cfg.storage)
        wanted = {p.name for p in plan.parts}
        plan.stale_after = sorted(n for names in self._found.values() for n in names if n not in wanted)


def _check_prefix_unchanged(cfg: Config, plan: ScorePlan) -> None:
    """A completed output of a prefix: list the prefix again (into ``_plan/``,
    whose plan files are named by their URIs) and compare the parts. Changed:
    UsageError saying how, the new plan files removed again."""
    storage = cfg.storage
    found, ignored, plan.listing_tasks = listing.list_prefix(
        plan.source, storage, plan.plan_dir, plan.rows_per_file, cfg.score.list_concurrency)
    old = {p.digest: p for p in plan.parts}
    new = {d["digest"]: PartSpec(**{**d, "index": -1}) for d in found}
    keep = {p.plan_file for p in plan.parts} | {PLAN_FILE}
    # Part boundaries may differ between two listings (small folders are
    # packed in the order their listings end): the same set of URIs is the same input.
    same = set(new) == set(old) or (sum(p.rows for p in new.values()) == plan.images
                                     and _uris_hash_of(plan, storage) == uris_hash(list(new.values())))
    if same:
        for p in new.values():
            if p.plan_file not in keep:
                st.remove(st.join(plan.plan_dir, p.plan_file), storage)
        log.info("score: listed %s again: the same %d images in %d parts as when %s was completed", plan.source,
                 plan.images, len(plan.parts), plan.output)
        return
    gone = [old[d] for d in old if d not in new]
    came = [new[d] for d in new if d not in old]
    now = sum(p.rows for p in new.values())
    if len(gone) + len(came) <= DIFF_PARTS:
        before = {u for p in gone for u in read_plan_chunk(plan.plan_dir, p, storage).column("uri").to_pylist()}
        after = {u for p in came for u in read_plan_chunk(plan.plan_dir, p, storage).column("uri").to_pylist()}
        added, removed = sorted(after - before), sorted(before - after)
        how = f"{len(added)} images added, {len(removed)} removed" + "".join(
            f" (e.g. {word} {names[0]})" for word, names in (("added", added), ("removed", removed)) if names)
    else:
        how = (f"{len(came)} parts changed or new and {len(gone)} changed or gone, "
               f"about {max(now - plan.images, 0)} images added and {max(plan.images - now, 0)} removed")
    for p in came:
        if p.plan_file not in keep:
            st.remove(st.join(plan.plan_dir, p.plan_file), storage)
    raise UsageError(f"{plan.source} changed since {plan.output} was completed ({plan.input.get('listed_at', '?')}): "
                     f"{now} images now, {plan.images} then: {how}. Pass --overwrite to score it as it is now, "
                     "or give a new --output")


def _uris_hash_of(plan: ScorePlan, storage: StorageConfig) -> str:
    """The set hash of the plan's URIs; read from its plan files when the
    plan is older than parts that record it."""
    recorded = uris_hash(plan.parts)
    if recorded:
        return recorded
    from pipeline.scoring.parts import set_hash

    def one(p: PartSpec) -> int:
        return set_hash(read_plan_chunk(plan.plan_dir, p, storage).column("uri").to_pylist())

    with ThreadPoolExecutor(max_workers=16) as pool:
        return f"{sum(pool.map(one, plan.parts)) % SET_MOD:016x}"


def _read_plan(uri: str, storage: StorageConfig) -> Optional[dict]:
    try:
        data = st.read_json(uri, storage)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("parts"), list) else None


def _build(cfg: Config, plan: ScorePlan) -> None:
    """The parts of a URI list."""
    try:
        found = listing.read_list(plan.source, cfg.storage, plan.allowed, plan.plan_dir, plan.rows_per_file)
    except EntryRejected as exc:
        raise UsageError(str(exc)) from None
    found.sort(key=lambda d: d["index"])
    plan.listing_tasks = 0
    plan.parts = [PartSpec(**d) for d in found]
    log.info("score: planned %d images in %d parts", plan.images, len(plan.parts))


def _find_committed(plan: ScorePlan, storage: StorageConfig, overwrite: bool) -> None:
    names = {n for n in listdir(plan.output, storage) if PART_NAME.match(n)}
    plan.stale = sorted(names - {p.name for p in plan.parts})
    if overwrite:
        return
    present = [p for p in plan.parts if p.name in names]
    writer = plan.writer

    def check(spec: PartSpec):
        try:
            return spec, committed_errors(st.join(plan.output, spec.name), storage, spec.rows, writer, spec.digest)
        except NotKept as why:
            return spec, why

    with ThreadPoolExecutor(max_workers=16) as pool:
        for spec, result in pool.map(check, present):
            if isinstance(result, NotKept):
                plan.rescored.setdefault(result.kind, []).append((spec.name, str(result)))
            else:
                plan.committed[spec.index] = result
    for kind, parts in sorted(plan.rescored.items()):
        if kind == "unrecorded":  # said once, however many parts
            log.warning("score: %d parts in %s were written before parts recorded their writer; scoring them "
                        "again", len(parts), plan.output)
            continue
        shown = "; ".join(f"{name}: {why}" for name, why in parts[:10])
        more = f" (and {len(parts) - 10} more)" if len(parts) > 10 else ""
        log.warning("score: scoring %d parts again, %s: %s%s", len(parts), kind, shown, more)
