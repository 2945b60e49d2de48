"""Score images with a trained model: exactly one Parquet row per input file.

1. ``plan_score`` (driver; no Ray, no TensorFlow): check the model, list the
   inputs (a folder/prefix scanned for image names, or a .txt/.csv/.parquet list
   of URIs), split the sorted list into chunks of ``rows_per_file`` and find the
   chunks an earlier run already committed. Every user error is raised here.
2. ``run_score``: a streaming Ray Data pipeline. CPU tasks read and decode the
   files (``read_and_decode``, with the recipe of the model's
   ``preprocessing.json``: the pixels and resize it was trained and evaluated
   on, see ``pipeline.preprocess``), ``ScoringPredictor``
   actors run the model (one GPU each when the cluster has GPUs), and the driver
   writes each chunk as soon as all its rows are in: to a local file, then
   published atomically as ``part-<index>-<hash of the chunk's URIs>.parquet``.

Resume: a part becomes visible only when complete, and its name is fixed by the
chunk's URIs, so a re-run with the same arguments keeps committed parts and
scores the rest. ``_summary.json`` records the arguments at the start and the
counts at the end; its leading underscore keeps Parquet readers (pyarrow,
pandas, Spark) from taking it for data when they read the output folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import posixpath
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.config import Config, StorageConfig
from pipeline.errors import UsageError
from pipeline.faults import maybe_fault
from pipeline.images import IMAGE_EXTENSIONS, ImageRejected, has_image_extension
from pipeline.preprocess import Recipe, file_pixels, model_inputs

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("top_k_labels", pa.list_(pa.string())),
        ("top_k_scores", pa.list_(pa.float32())),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
SUMMARY_NAME = "_summary.json"
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
PART_NAME = re.compile(r"^part-\d{5,}-[0-9a-f]{8}\.parquet$")
# Inside the pipeline "no error" is "" rather than null, so the column keeps one
# Arrow type in every block; the Parquet output has null there.
NO_ERROR = ""


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Chunk:
    """The inputs of one Parquet part (sorted URIs; sizes -1 where unknown)."""

    index: int
    uris: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def name(self) -> str:
        digest = hashlib.sha1("\n".join(self.uris).encode("utf-8")).hexdigest()[:8]
        return f"part-{self.index:05d}-{digest}.parquet"


@dataclass
class ScorePlan:
    model: str  # the `model` column: --model as given, or REGISTRY#name@version
    model_uri: str  # where the model is loaded from (run dir or model file)
    source: str  # --images
    output: str
    labels: list[str]
    top_k: int  # already capped at the number of labels
    image_size: int
    chunks: list[Chunk]
    recipe: Optional[Recipe] = None  # the model's preprocessing.json
    ignored: int = 0  # files under the prefix without an image name
    committed: dict[int, Counter] = field(default_factory=dict)  # chunk index -> error reasons
    stale: list[str] = field(default_factory=list)  # our parts this plan does not produce

    @property
    def images(self) -> int:
        return sum(len(c.uris) for c in self.chunks)


def make_chunks(found: list[tuple[str, int]], rows_per_file: int) -> list[Chunk]:
    return [
        Chunk(i, tuple(u for u, _ in found[start : start + rows_per_file]),
              tuple(s for _, s in found[start : start + rows_per_file]))
        for i, start in enumerate(range(0, len(found), rows_per_file))
    ]


def list_images(images: str, storage: StorageConfig) -> tuple[list[tuple[str, int]], int]:
    """Sorted, distinct ``(uri, size)`` to score (size -1 when a list gives none),
    and how many files under a prefix were skipped for not having an image name."""
    try:
        fs, path = st.get_fs(images, storage)
        is_file = fs.isfile(path)
    except Exception as exc:  # noqa: BLE001 - any storage failure is a usage problem here
        raise UsageError(f"cannot read {images}: {st.describe_error(exc)}") from None
    if is_file:
        if not images.lower().endswith(LIST_SUFFIXES):
            raise UsageError(
                f"--images {images} is a file: give a folder/prefix of images or a list of URIs "
                "(.txt, or .csv/.parquet with a 'uri' column)"
            )
        return sorted({(uri, -1) for uri in read_uri_list(images, fs, path)}), 0
    fs, root = st.check_source(images, storage)
    try:
        listed = st.list_files(fs, root)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list {images}: {st.describe_error(exc)}") from None
    found = sorted((st.full_uri(fs, p, like=images), size) for p, size in listed if has_image_extension(p))
    if not found:
        raise UsageError(f"no image files under {images} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case)")
    return found, len(listed) - len(found)


def read_uri_list(uri: str, fs, path: str) -> list[str]:
    """URIs from a text file (one per line, # comments), or the 'uri' column of a
    CSV or Parquet file. Relative entries are relative to the list's folder."""
    try:
        data = fs.cat_file(path)
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            columns = table.column_names
            entries = table.column("uri").to_pylist() if "uri" in columns else None
        elif uri.lower().endswith(".csv"):
            reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
            columns = reader.fieldnames or []
            entries = [row["uri"] for row in reader] if "uri" in columns else None
        else:
            lines = (line.strip() for line in data.decode("utf-8-sig").splitlines())
            columns, entries = ["uri"], [line for line in lines if not line.startswith("#")]
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read the list {uri}: {st.describe_error(exc)}") from None
    if entries is None:
        raise UsageError(f"{uri} has no 'uri' column (columns: {', '.join(map(str, columns))})")
    base = st.full_uri(fs, path.rsplit("/", 1)[0], like=uri)
    uris = [_resolve(e.strip(), base) for e in entries if e and e.strip()]
    if not uris:
        raise UsageError(f"{uri} lists no images")
    return uris


def _resolve(entry: str, base: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return st.join(base, posixpath.normpath(entry))


def _canonical(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def plan_score(cfg: Config, model: str, images: str, output: str, *,
               overwrite: bool = False, allow_unsafe: bool = False) -> ScorePlan:
    """Everything that can fail on user input, checked before any cluster work."""
    from pipeline.artifact import LABELS_FILE, check_model_reference, check_model_uri, model_recipe

    model_uri, shown = check_model_reference(model, cfg.storage, allow_unsafe=allow_unsafe)
    labels_uri = st.join(check_model_uri(model_uri, cfg.storage).rsplit("/", 1)[0], LABELS_FILE)
    try:
        labels = st.read_json(labels_uri, cfg.storage)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise UsageError(f"{labels_uri} is not a JSON list of class names")
    found, ignored = list_images(images, cfg.storage)
    st.check_writable(output, cfg.storage)
    plan = ScorePlan(
        model=shown, model_uri=model_uri, source=images, output=output, labels=list(labels),
        top_k=min(cfg.score.top_k, len(labels)), image_size=0,
        chunks=make_chunks(found, cfg.score.rows_per_file), ignored=ignored,
    )
    _check_previous_output(plan, cfg.storage, overwrite)
    plan.recipe = model_recipe(model_uri, cfg.storage, allow_unsafe=allow_unsafe)
    plan.image_size = plan.recipe.image_size
    return plan


def _check_previous_output(plan: ScorePlan, storage: StorageConfig, overwrite: bool) -> None:
    """Fill ``plan.committed`` and ``plan.stale`` from what OUTPUT already holds,
    refusing to mix with scores of other arguments unless ``overwrite``."""
    names = _listdir(plan.output, storage)
    foreign = sorted(n for n in names if n.endswith(".parquet") and not PART_NAME.match(n) and n[0] not in "._")
    if foreign:
        raise UsageError(f"{plan.output} holds Parquet files this job did not write ({foreign[0]}); "
                         "give an empty or new --output")
    parts = {n for n in names if PART_NAME.match(n)}
    if parts and not overwrite:
        previous = _read_summary(plan.output, storage)
        mine = {"model": _canonical(plan.model), "source": _canonical(plan.source), "top_k": plan.top_k}
        theirs = previous and {k: _canonical(previous[k]) if k != "top_k" else previous[k] for k in mine}
        if theirs != mine:
            what = (f"scores of {previous['source']} by {previous['model']} (top_k {previous['top_k']})"
                    if previous else f"part files without {SUMMARY_NAME}")
            raise UsageError(f"{plan.output} already holds {what}; pass --overwrite to replace them, "
                             "or choose another --output")
    wanted = {c.name for c in plan.chunks}
    plan.stale = sorted(parts - wanted)
    if overwrite:
        return
    for chunk in plan.chunks:
        if chunk.name in parts:
            reasons = _committed_errors(st.join(plan.output, chunk.name), storage, len(chunk.uris))
            if reasons is not None:
                plan.committed[chunk.index] = reasons


def _listdir(uri: str, storage: StorageConfig) -> list[str]:
    try:
        fs, path = st.get_fs(uri, storage)
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot list {uri}: {st.describe_error(exc)}") from None


def _read_summary(output: str, storage: StorageConfig) -> Optional[dict]:
    try:
        data = st.read_json(st.join(output, SUMMARY_NAME), storage)
    except (FileNotFoundError, ValueError):  # absent, or not JSON
        return None
    return data if isinstance(data, dict) and {"model", "source", "top_k"} <= data.keys() else None


def _committed_errors(uri: str, storage: StorageConfig, rows: int) -> Optional[Counter]:
    """Error reasons of a committed part, or None when it must be written again."""
    try:
        fs, path = st.get_fs(uri, storage)
        with fs.open(path, "rb") as f:
            errors = pq.read_table(f, columns=["error"]).column("error")
    except Exception as exc:  # noqa: BLE001 - an unreadable part is simply scored again
        log.warning("%s is unreadable (%s); scoring its images again", uri, st.describe_error(exc))
        return None
    if len(errors) != rows:
        log.warning("%s has %d rows, expected %d; scoring its images again", uri, len(errors), rows)
        return None
    return Counter(_reason_kind(e) for e in errors.to_pylist() if e is not None)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------- CPU tasks


def read_and_decode(batch: dict, *, storage: StorageConfig, recipe: Recipe,
                    max_bytes: int, max_pixels: int, resize_bytes: int = 64 << 20) -> dict:
    """{uri, size, chunk} -> {uri, chunk, image, error}: the model input made
    with ``recipe`` (float32 [N, size, size, 3] in [0, 255], exactly what
    evaluation feeds the model for the file's shard record) or the reason a
    file cannot be scored (its image is zeros). Never raises for a bad file.
    Decoded images wait for their resize, which runs per group of one shape, up
    to ``resize_bytes`` of them at a time."""
    size = recipe.image_size
    uris = [str(u) for u in batch["uri"]]
    images = np.zeros((len(uris), size, size, 3), np.float32)
    errors = np.full(len(uris), NO_ERROR, dtype=object)
    pending: list[tuple[int, np.ndarray]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        for (i, _), resized in zip(pending, model_inputs([a for _, a in pending], recipe)):
            images[i] = resized
        pending.clear()
        pending_bytes = 0

    for i, raw in enumerate(read_files(uris, batch["size"], storage, max_bytes)):
        if isinstance(raw, str):
            errors[i] = raw
            continue
        try:
            decoded = file_pixels(raw, recipe, max_pixels)
            pending.append((i, decoded))
            pending_bytes += decoded.nbytes
        except ImageRejected as exc:
            errors[i] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the job
            errors[i] = f"cannot decode: {st.describe_error(exc)}"
        if pending_bytes >= resize_bytes:
            flush()
    flush()
    return {"uri": np.array(uris, dtype=object), "chunk": batch["chunk"], "image": images, "error": errors}


def read_files(uris: list[str], sizes, storage: StorageConfig, max_bytes: int) -> list:
    """Bytes per URI, or a one-line reason; fetched concurrently."""

    def fetch(item: tuple[str, int]):
        uri, size = item
        try:
            fs, path = st.get_fs(uri, storage)
            if size < 0:
                size = fs.size(path)
            if size > max_bytes:
                return f"file too large: {size / 2**20:.1f} MiB is over score.max_file_mb ({max_bytes / 2**20:g} MiB)"
            return fs.cat_file(path)
        except FileNotFoundError:
            return "cannot read: file not found"
        except Exception as exc:  # noqa: BLE001
            return f"cannot read: {st.describe_error(exc)}"

    items = list(zip(uris, (int(s) for s in sizes)))
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(items)))) as pool:
        return list(pool.map(fetch, items))


# ---------------------------------------------------------------- model actors


class ScoringPredictor:
    """Loads the model once; ``__call__`` scores one batch dict (the output of
    ``read_and_decode``) into top-k label indices and probabilities, best first.
    A plain class: try it on ``ds.take_batch()`` without an actor pool."""

    def __init__(self, model_uri: str, storage: StorageConfig, top_k: int,
                 recipe: Optional[Recipe] = None, allow_unsafe: bool = False):
        from pipeline.artifact import load_artifact

        self.artifact = load_artifact(model_uri, storage, allow_unsafe=allow_unsafe)
        if recipe is not None and recipe != self.artifact.recipe:
            raise ValueError(f"{model_uri}: its preprocessing.json changed after the images were decoded "
                             f"with {recipe.to_dict()}")
        self.k = min(top_k, len(self.artifact.labels))

    def __call__(self, batch: dict) -> dict:
        errors = np.asarray(batch["error"], dtype=object)
        ok = errors == NO_ERROR
        index = np.full((len(errors), self.k), -1, np.int32)
        scores = np.zeros((len(errors), self.k), np.float32)
        if ok.any():
            images = np.asarray(batch["image"])[ok]
            probs = self.artifact.predict_batch(images)
            top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
            index[ok] = top
            scores[ok] = np.take_along_axis(probs, top, axis=1)
        return {"uri": batch["uri"], "chunk": batch["chunk"], "top_k_index": index,
                "top_k_scores": scores, "error": errors}


def to_table(batch: dict, labels: list[str], model: str) -> pa.Table:
    """A predictor batch -> rows of the output schema (error rows: no label,
    empty top-k lists)."""
    errors = np.asarray(batch["error"], dtype=object)
    ok = errors == NO_ERROR
    index = np.asarray(batch["top_k_index"])
    scores = np.asarray(batch["top_k_scores"], dtype=np.float32)
    names = np.asarray(labels, dtype=object)
    k = index.shape[1]
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(ok, k, 0))]).astype(np.int32))
    top_labels = pa.ListArray.from_arrays(offsets, pa.array(names[index[ok]].ravel(), pa.string()))
    top_scores = pa.ListArray.from_arrays(offsets, pa.array(scores[ok].ravel(), pa.float32()))
    first = np.where(ok, index[:, 0], 0)
    columns = [
        pa.array([str(u) for u in batch["uri"]], pa.string()),
        pa.array(names[first], pa.string(), mask=~ok),
        pa.array(scores[:, 0], pa.float32(), mask=~ok),
        top_labels,
        top_scores,
        pa.array(errors, pa.string(), mask=ok),
        pa.array([model] * len(errors), pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


# ---------------------------------------------------------------- driver


class PartWriter:
    """Collects rows per chunk and publishes a chunk's Parquet file as soon as
    all its rows are in; memory holds only the chunks still in flight."""

    def __init__(self, plan: ScorePlan, chunks: list[Chunk], storage: StorageConfig):
        self.plan, self.storage = plan, storage
        self.chunks = {c.index: c for c in chunks}
        self.pending: dict[int, list[pa.Table]] = {}
        self.rows: Counter = Counter()
        self.written: list[Chunk] = []

    def add(self, batch: dict) -> list[tuple[Chunk, pa.Table]]:
        table = to_table(batch, self.plan.labels, self.plan.model)
        chunk_ids = np.asarray(batch["chunk"])
        done = []
        for index in np.unique(chunk_ids).tolist():
            rows = table.filter(pa.array(chunk_ids == index))
            self.pending.setdefault(index, []).append(rows)
            self.rows[index] += rows.num_rows
            if self.rows[index] >= len(self.chunks[index].uris):
                done.append(self._commit(index))
        return done

    def _commit(self, index: int) -> tuple[Chunk, pa.Table]:
        chunk = self.chunks[index]
        table = pa.concat_tables(self.pending.pop(index))
        table = table.take(pc.sort_indices(table, [("uri", "ascending")]))
        if tuple(table.column("uri").to_pylist()) != chunk.uris:  # a bug, never silent loss
            raise RuntimeError(f"{chunk.name}: {table.num_rows} rows do not match its {len(chunk.uris)} inputs")
        with st.local_scratch() as scratch:
            local = os.path.join(scratch, chunk.name)
            pq.write_table(table, local)
            st.publish_file(local, st.join(self.plan.output, chunk.name), self.storage)
        self.written.append(chunk)
        return chunk, table

    def check_complete(self) -> None:
        written = {c.index for c in self.written}
        missing = [c.name for i, c in self.chunks.items() if i not in written]
        if missing:
            raise RuntimeError(f"scoring ended with {len(missing)} parts incomplete, e.g. {missing[0]}")


def pool_sizes(cfg: Config) -> tuple[int, int, int]:
    """(predictor actors, GPUs per actor, concurrent decode tasks) for this cluster:
    one actor per GPU when there are GPUs, else one per 8 CPUs (at least one);
    decode tasks on the CPUs the actors leave free (at least one)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    actors = cfg.score.concurrency or (gpus if gpus else max(1, cpus // 8))
    return actors, (1 if gpus else 0), max(1, cpus - actors)


def build_dataset(cfg: Config, plan: ScorePlan, chunks: list[Chunk], allow_unsafe: bool = False):
    import ray

    sc = cfg.score
    actors, gpus_per_actor, decoders = pool_sizes(cfg)
    items = [{"uri": u, "size": s, "chunk": c.index} for c in chunks for u, s in zip(c.uris, c.sizes)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / sc.batch_size)))
    ds = ds.map_batches(
        read_and_decode,
        batch_size=sc.read_batch,
        fn_kwargs={"storage": cfg.storage, "recipe": plan.recipe,
                   "max_bytes": int(sc.max_file_mb * 2**20), "max_pixels": sc.max_pixels},
        # Each decode worker process imports TensorFlow (for the training resize)
        # once: no more of them than there are free CPUs.
        compute=ray.data.TaskPoolStrategy(size=decoders),
        # Half a CPU: decoding is light next to the model. The request also differs
        # from the predictor's, which keeps Ray Data from fusing decoding into the
        # actors, where it would run in series with the model.
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        ScoringPredictor,
        batch_size=sc.batch_size,
        fn_constructor_kwargs={"model_uri": plan.model_uri, "storage": cfg.storage, "top_k": plan.top_k,
                               "recipe": plan.recipe, "allow_unsafe": allow_unsafe},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=1,
    )
    options = ds.context.execution_options
    # In order, chunks complete one after another: the driver holds about one.
    options.preserve_order = True
    # Decoded images waiting for the model: a few batches per actor, however
    # many images there are and however large the object store is.
    batch_bytes = sc.batch_size * plan.image_size**2 * 3 * 4
    options.resource_limits = options.resource_limits.copy(
        object_store_memory=max(256 * 2**20, 8 * batch_bytes * actors)
    )
    return ds


def run_score(cfg: Config, plan: ScorePlan, *, allow_unsafe: bool = False) -> dict:
    """Score the chunks not yet committed; returns the summary (also written as
    ``_summary.json``)."""
    started = time.time()
    storage = cfg.storage
    summary_uri = st.join(plan.output, SUMMARY_NAME)
    params = {"job": "score", "model": plan.model, "model_uri": plan.model_uri, "source": plan.source,
              "output": plan.output,
              "top_k": plan.top_k, "rows_per_file": cfg.score.rows_per_file,
              "preprocessing": plan.recipe.to_dict() if plan.recipe else None}
    st.write_json(summary_uri, {**params, "status": "running"}, storage)
    _remove_temp_files(plan.output, storage)

    todo = [c for c in plan.chunks if c.index not in plan.committed]
    reasons = sum(plan.committed.values(), Counter())
    log.info("score: %d images in %d parts: %d parts already committed, %d to score",
             plan.images, len(plan.chunks), len(plan.committed), len(todo))
    writer = PartWriter(plan, todo, storage)
    if todo:
        ds = build_dataset(cfg, plan, todo, allow_unsafe)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for chunk, table in writer.add(batch):
                errors = table.column("error").drop_null().to_pylist()
                reasons.update(_reason_kind(e) for e in errors)
                log.info("committed %s: %d rows, %d errors (%d of %d parts left)", chunk.name,
                         table.num_rows, len(errors), len(todo) - len(writer.written), len(todo))
        writer.check_complete()
    maybe_fault("score-parts-committed")
    for name in plan.stale:
        st.remove(st.join(plan.output, name), storage)

    elapsed = time.time() - started
    scored_now = sum(len(c.uris) for c in writer.written)
    errors = sum(reasons.values())
    summary = {
        **params,
        "status": "complete",
        "images": plan.images,
        "scored": plan.images - errors,
        "errors": errors,
        "errors_by_reason": dict(reasons.most_common()),
        "ignored_files": plan.ignored,
        "files": len(plan.chunks),
        "files_written": len(writer.written),
        "files_kept": len(plan.committed),
        "stale_files_removed": len(plan.stale),
        "images_this_run": scored_now,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(scored_now / elapsed, 1) if scored_now and elapsed > 0 else None,
        "parquet": [st.join(plan.output, c.name) for c in plan.chunks],
    }
    st.write_json(summary_uri, summary, storage)
    return summary


def _remove_temp_files(output: str, storage: StorageConfig) -> None:
    """Leftovers of a run killed while publishing a part on a local disk."""
    for name in _listdir(output, storage):
        if name.startswith(st.TMP_MARK):
            st.remove(st.join(output, name), storage)
