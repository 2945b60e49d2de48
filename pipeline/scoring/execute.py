"""Running a planned score job on Ray.

Per part, a ``score_part`` task (no CPU of its own: it only coordinates) reads
the part's plan file, sends its files in groups of ``read_batch`` to
``decode_files`` CPU tasks, passes each model batch's decoded uint8 images,
as object references that the part task never fetches, to one of the
``ScoringPredictor`` actors (one GPU each when the cluster has GPUs, plus
``score.cpus_per_actor`` CPUs kept from decoding to feed it), and writes and
publishes the part's Parquet file itself (``pipeline.scoring.commit``). Each
batch goes to the actor that this part task expects to finish it first
(``LeastLoaded``), not in a fixed rotation, so a slow or restarting actor gets
less work; each actor takes two calls at once, so one batch is fetched and
copied to the device while the other runs.
A batch in which no file decoded never reaches the model. At most a few parts
are in flight, each with a bounded window of batches (4, or more while too few
parts run to keep the actors and decode CPUs busy: ``batches_ahead``), so
memory does not grow with the number of images.

The driver checks that the cluster can place the actors (else exit 2), starts
them and waits until every one has loaded and compiled the model (one clear
error before any part when the model does not load), hands out parts, tracks their completion and
writes progress into ``_summary.json``. A part task that dies is run again by
Ray (the same part, the same file); a predictor actor that dies is restarted
and its calls retried; a killed driver leaves only complete parts, which the
next run keeps.

Before it changes anything in the output, a run removes ``_SUCCESS``; our
part files the plan does not produce are removed before any part is written;
``_summary.json`` (status ``complete``) and then ``_SUCCESS`` are written last.
A re-run that finds a completed output of the same input, model and settings
writes nothing ("complete, nothing to score").
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow.compute as pc

from pipeline import storage as st
from pipeline.config import Config, StorageConfig
from pipeline.errors import JobFailed, UsageError
from pipeline.runtime.faults import maybe_fault
from pipeline.data.preprocess import Recipe
from pipeline.scoring.commit import (SUCCESS_NAME, SUMMARY_NAME, error_counts, publish_part, remove_temp_files,
                                     to_table)
from pipeline.scoring.decode import NO_ERROR, TransientReadError, read_and_decode
from pipeline.storage.lease import LeaseLost, OutputLease, check_holder
from pipeline.scoring.parts import PartSpec, read_plan_chunk
from pipeline.scoring.plan import ScorePlan, prepare_parts
from pipeline.scoring.progress import Progress

log = logging.getLogger(__name__)
BATCHES_AHEAD = 4  # model batches a part task keeps in flight


DECODE_RETRIES = 2  # a decode task whose reads kept failing is run again this many times


class TooManyErrors(RuntimeError):
    """A part whose error rows exceed score.max_error_fraction."""


@dataclass(frozen=True)
class PredictorPool:
    """The predictor actors a job starts on this cluster."""

    actors: int
    gpus: int  # per actor: 1 on a cluster with GPUs, else 0
    cpus: float  # reserved per actor (score.cpus_per_actor)
    decode_cpus: int  # CPUs left for decode tasks
    batch_size: int  # images per model batch (score.batch_size)


def predictor_pool(cfg: Config) -> PredictorPool:
    """One actor per GPU when there are GPUs, else one per 8 CPUs (at least
    one), or ``score.concurrency``; UsageError (exit 2) when the actors cannot
    all be placed on the cluster's nodes with a CPU left for decoding, which
    would leave actors that never start or decode tasks that never run."""
    import ray

    from pipeline.scoring.predictor import CPU_BATCH, GPU_BATCH

    sc = cfg.score
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    actors = sc.concurrency or (gpus if gpus else max(1, cpus // 8))
    if sc.cpus_per_actor is not None:
        per_actor = float(sc.cpus_per_actor)
    elif gpus:
        per_actor = float(max(0, min(4, (cpus - 1) // max(actors, 1))))
    else:
        # A CPU actor holds one CPU (its TensorFlow uses the node's cores); a
        # default single actor on a one-CPU machine holds none.
        per_actor = 1.0 if sc.concurrency or cpus > actors else 0.0
    need_gpus = 1 if gpus else 0
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] or [resources]
    placeable = sum(_fits(node, need_gpus, per_actor) for node in nodes)
    what = f"{cpus} CPUs" + (f", {gpus} GPUs" if gpus else "") + f" on {len(nodes)} node" + ("s" if len(nodes) > 1 else "")
    each = (f"1 GPU and {per_actor:g} CPUs" if need_gpus else f"{per_actor:g} CPUs")
    if actors > placeable or cpus - actors * per_actor < 1:
        room = min(placeable, int((cpus - 1) // per_actor) if per_actor else placeable)
        raise UsageError(f"score.concurrency={actors} asks for {actors} predictor actors of {each} each (score."
                         f"cpus_per_actor) and at least 1 CPU for decoding; this cluster ({what}) can place "
                         f"{max(room, 0)}: lower --concurrency or score.cpus_per_actor")
    batch = sc.batch_size or (GPU_BATCH if gpus else CPU_BATCH)
    return PredictorPool(actors, need_gpus, per_actor, max(1, int(cpus - actors * per_actor)), batch)


def _fits(node: dict, gpus: int, cpus: float) -> int:
    """How many actors of ``gpus`` GPUs and ``cpus`` CPUs one node holds."""
    counts = []
    if gpus:
        counts.append(int(node.get("GPU", 0) // gpus))
    if cpus:
        counts.append(int(node.get("CPU", 0) // cpus))
    return min(counts) if counts else 10**9


def pool_sizes(cfg: Config) -> tuple[int, int, int]:
    """(predictor actors, GPUs per actor, CPUs left for decoding): ``predictor_pool``."""
    pool = predictor_pool(cfg)
    return pool.actors, pool.gpus, pool.decode_cpus


def decode_files(uris: list, sizes: list, storage: StorageConfig, recipe: Recipe, max_bytes: int,
                 max_pixels: int, retry_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task: (errors, uint8 images of the files that decoded, in order)
    for a group of files; TransientReadError when a file could not be read for
    ``retry_s`` (the task is then retried)."""
    out = read_and_decode({"uri": uris, "size": sizes}, storage=storage, recipe=recipe, max_bytes=max_bytes,
                          max_pixels=max_pixels, retry_s=retry_s)
    errors = out["error"]
    return errors, out["image"][errors == NO_ERROR]


def score_part(spec: PartSpec, plan: dict, storage: StorageConfig, actors: list, settings: dict,
               ahead: int = BATCHES_AHEAD) -> dict:
    """A Ray task: score one part and publish its Parquet file, ``ahead``
    model batches being decoded and as many being scored at a time. Returns
    {"index", "rows", "errors": {reason: count}}."""
    import ray

    table = read_plan_chunk(plan["plan_dir"], spec, storage)
    # Kept as Arrow (a part may hold millions of URIs): Python lists only of
    # the files each decode task gets.
    uris = table.column("uri").combine_chunks()
    sizes = table.column("size").combine_chunks()
    batch, group = settings["batch_size"], settings["read_batch"]
    decode = ray.remote(decode_files).options(num_cpus=1, num_returns=2, max_retries=DECODE_RETRIES,
                                              retry_exceptions=[TransientReadError])
    starts = list(range(0, len(uris), batch))

    def submit(start: int) -> list:
        end = min(start + batch, len(uris))
        return [decode.remote(uris.slice(s, min(group, end - s)).to_pylist(),
                              sizes.slice(s, min(group, end - s)).to_pylist(), storage,
                              settings["recipe"], settings["max_bytes"], settings["max_pixels"], settings["retry_s"])
                for s in range(start, end, group)]

    balance = LeastLoaded(len(actors))
    decoding = [submit(s) for s in starts[:ahead]]
    scored: list = []  # per batch: [errors, result ref, result or None]
    waiting: deque[int] = deque()  # batches whose result is still a reference
    for i in range(len(starts)):
        refs = decoding[i]
        if i + ahead < len(starts):
            decoding.append(submit(starts[i + ahead]))
        errors = np.concatenate(ray.get([e for e, _ in refs]))
        ok = errors == NO_ERROR
        result = None
        if ok.any():
            chosen = balance.pick()
            result = actors[chosen].score.remote(ok, *[images for _, images in refs])
            balance.sent(chosen, result)
            waiting.append(i)
        decoding[i] = None  # the images are the actor's now
        scored.append([errors, result])
        while len(waiting) > ahead:
            first = waiting.popleft()
            scored[first][1] = ray.get(scored[first][1])
    k = settings["top_k"]
    index_parts, score_parts, error_parts = [], [], []
    for n in waiting:
        scored[n][1] = ray.get(scored[n][1])
    for errors, result in scored:
        if result is None:
            result = (np.full((len(errors), k), -1, np.int32), np.zeros((len(errors), k), np.float32))
        index_parts.append(result[0])
        score_parts.append(result[1])
        error_parts.append(errors)
    rows = to_table({"uri": uris, "top_k_index": np.concatenate(index_parts),
                     "top_k_scores": np.concatenate(score_parts), "error": np.concatenate(error_parts)},
                    plan["labels"], plan["model"])
    limit = settings.get("max_error_fraction")
    failed = int(np.sum(np.concatenate(error_parts) != NO_ERROR))
    if limit is not None and len(uris) and failed > limit * len(uris):
        reasons = Counter(e for e in np.concatenate(error_parts) if e != NO_ERROR).most_common(3)
        raise TooManyErrors(f"{spec.name}: {failed} of {len(uris)} images could not be scored, over "
                            f"score.max_error_fraction={limit} ({'; '.join(f'{n} {r}' for r, n in reasons)}); "
                            "not committed")
    maybe_fault("score-part-ready")
    if plan.get("lease_job"):
        # The fence: a conditional rewrite of the lease, refused unless this job
        # holds it with a fresh heartbeat; nobody can take it over for a full
        # timeout afterwards, far longer than the publish below takes.
        check_holder(plan["output"], plan["lease_job"], storage)
    published = publish_part(rows, uris.take(pc.sort_indices(uris)), st.join(plan["output"], spec.name),
                             storage, tmp_tag=plan.get("lease_job", ""), writer=plan.get("writer"),
                             part_digest=spec.digest)
    return {"index": spec.index, "rows": published.num_rows, "errors": dict(error_counts(published))}


def batches_wanted(pool: PredictorPool, read_batch: int) -> int:
    """Model batches in flight, over all parts, that keep every actor busy
    (two calls each) and every decode CPU busy."""
    return max(2 * pool.actors, math.ceil(pool.decode_cpus / math.ceil(pool.batch_size / read_batch)))


def batches_ahead(wanted: int, running: list[int]) -> int:
    """The window of a part task started while parts with the windows
    ``running`` are in flight: BATCHES_AHEAD, or what the running ones leave
    of ``wanted`` when that is more. So a job of few large parts (score.part_mb)
    still keeps the actors and decode CPUs busy, and in-flight batches stay
    within ``wanted`` plus BATCHES_AHEAD a part."""
    return max(BATCHES_AHEAD, wanted - sum(running))


class LeastLoaded:
    """Which predictor actor gets a part task's next batch: the one that
    would finish it first by what this task has seen, (its calls still
    running + 1) x its time per call (a running average of its finished calls,
    timed when each finishes, at least the age of its oldest running one);
    among equals, in turn from a random start (part tasks do not see each
    other's calls, so they do not all begin with the same actor). A slow
    actor, or one being restarted (its call stays running until Ray has
    retried it), gets less work instead of holding up every part; an idle
    actor not yet timed counts as fast, so each one is tried, and a busy one
    as the slowest timed one."""

    def __init__(self, actors: int, start: Optional[int] = None):
        self.outstanding: list[dict] = [{} for _ in range(actors)]  # call -> when it was sent
        self.per_call: list[float] = [0.0] * actors
        self.turn = random.randrange(actors) if start is None else start
        self._lock = threading.Lock()

    def pick(self) -> int:
        now = time.monotonic()
        with self._lock:
            busy = [dict(calls) for calls in self.outstanding]
            per_call = list(self.per_call)
        slowest = max(per_call)

        def expected(actor: int) -> float:
            calls = busy[actor]
            if not calls:
                return per_call[actor]
            # Not timed yet but busy: as slow as the slowest timed one.
            return (len(calls) + 1) * max(per_call[actor] or slowest, now - min(calls.values()))

        count = len(busy)
        order = [(self.turn + j) % count for j in range(count)]
        chosen = min(order, key=lambda a: (expected(a), len(busy[a])))
        self.turn = (chosen + 1) % count
        return chosen

    def sent(self, actor: int, ref) -> None:
        key = ref.hex()
        with self._lock:
            self.outstanding[actor][key] = time.monotonic()
        ref.future().add_done_callback(lambda _: self._finished(actor, key))

    def _finished(self, actor: int, key: str) -> None:
        with self._lock:
            started = self.outstanding[actor].pop(key, None)
            if started is not None:
                took = time.monotonic() - started
                self.per_call[actor] = took if not self.per_call[actor] else (self.per_call[actor] + took) / 2


def start_predictors(cfg: Config, plan: ScorePlan, allow_unsafe: bool) -> list:
    """Create the predictor actors: each starts loading and compiling the
    model at once; ``predictors_ready`` waits for them."""
    import ray

    from pipeline.scoring.predictor import ScoringPredictor

    pool = predictor_pool(cfg)
    # Two calls at once: one batch's images are fetched and copied to the
    # device while the other's run; the device work is one call at a time.
    cls = ray.remote(ScoringPredictor).options(num_cpus=pool.cpus, num_gpus=pool.gpus, max_restarts=3,
                                               max_task_retries=3, max_concurrency=2)
    return [cls.remote(plan.model_uri, cfg.storage, plan.top_k, plan.recipe, allow_unsafe,
                       device_batch=pool.batch_size, defer_errors=True)
            for _ in range(pool.actors)]


def predictors_ready(cfg: Config, handles: list) -> list:
    """``handles`` once each has its model loaded and compiled; one clear
    error before any part is scored when the model does not load (UsageError
    for the model's own faults, else JobFailed) or the actors are not all up
    within ``score.actor_start_timeout_s`` (the actors are then killed)."""
    import ray

    pool = predictor_pool(cfg)
    try:
        wait_ready(handles, cfg.score.actor_start_timeout_s)
    except BaseException:
        for actor in handles:
            ray.kill(actor)
        raise
    log.info("score: %d predictor actors ready (%d GPU, %g CPUs each; batches of %d)", pool.actors, pool.gpus,
             pool.cpus, pool.batch_size)
    return handles


def wait_ready(actors: list, timeout_s: float) -> None:
    """Every actor's ``ready()``, or the first actor's reason not to be."""
    import ray
    from ray.exceptions import RayError

    refs = [actor.ready.remote() for actor in actors]
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise JobFailed(f"{len(actors) - len(pending)} of {len(actors)} predictor actors were ready after "
                            f"{timeout_s:g} s (score.actor_start_timeout_s): the cluster could not place or "
                            "start the others in time")
        try:
            state = ray.get(done[0])
        except RayError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise JobFailed(f"a predictor actor died while starting: {lines[-1] if lines else type(exc).__name__}") from None
        if not state["ok"]:
            raise (UsageError if state.get("usage") else JobFailed)(state["message"])


def run_score(cfg: Config, plan: ScorePlan, *, lease: Optional[OutputLease] = None, allow_unsafe: bool = False,
              overwrite: bool = False) -> dict:
    """Plan the parts (or reuse the plan), score those not yet committed and
    return the summary (also written as ``_summary.json``)."""
    import ray

    started = time.time()
    storage = cfg.storage
    summary_uri = st.join(plan.output, SUMMARY_NAME)
    success_uri = st.join(plan.output, SUCCESS_NAME)
    params = {"job": "score", "model": plan.model, "model_uri": plan.model_uri,
              "model_fingerprint": plan.model_fingerprint, "source": plan.source,
              "output": plan.output, "top_k": plan.top_k, "rows_per_file": plan.rows_per_file,
              "preprocessing": plan.recipe.to_dict() if plan.recipe else None}
    progress: Optional[Progress] = None
    writing = False

    def start_writing() -> None:
        """Before the first change to the output: it is no longer complete."""
        nonlocal writing
        if not writing:
            writing = True
            st.remove(success_uri, storage)
            st.write_json(summary_uri, {**params, "status": "planning"}, storage)

    if lease is not None:
        tags = [lease.job_id] + ([lease.previous.get("holder")] if lease.previous else [])
        # A heartbeat of ours caught mid-write here only fails and is retried.
        remove_temp_files(plan.output, storage, tags, control=True)
    if overwrite:
        start_writing()
    written: list[PartSpec] = []
    timeline: dict = {}  # when listing ended and the first part was committed (time.time())
    early: list = []  # predictors started before planning, not yet handed to scoring
    try:
        if plan.is_list and (overwrite or plan.previous_complete is None):
            # Ray Data tasks read and split a list before any part can be
            # scored: the predictors load the model meanwhile. (A prefix is
            # scored while it is listed; a completed output may need nothing.)
            early = start_predictors(cfg, plan, allow_unsafe)
        prepare_parts(cfg, plan, overwrite, start_writing, stream=True)
        if lease is not None:
            lease.check()

        todo = [p for p in plan.parts if p.index not in plan.committed]
        kept = sum(p.rows for p in plan.parts if p.index in plan.committed)
        progress = Progress(len(plan.parts), plan.images, len(plan.committed), kept,
                            sum(plan.committed.values(), Counter()))
        nothing = (not writing and not todo and not plan.stale and plan.previous_complete is not None
                   and plan.stream is None)
        if nothing:
            log.info("score: %s is complete, nothing to score (%d images in %d parts by %s)", plan.output,
                     plan.images, len(plan.parts), plan.model)
        else:
            if plan.stream is not None:
                log.info("score: listing %s; parts are scored as they are listed", plan.source)
            else:
                log.info("score: %d images in %d parts: %d parts already committed, %d to score", plan.images,
                         len(plan.parts), len(plan.committed), len(todo))
            start_writing()
            # Parts of another plan (other rows per file, a changed input) go
            # before any part of this one is published: never two rows for an image.
            for name in plan.stale:
                st.remove(st.join(plan.output, name), storage)
            if plan.stale:
                log.info("score: removed %d parts of an earlier plan: %s", len(plan.stale), ", ".join(plan.stale[:10]))

            def write_running() -> None:
                st.write_json(summary_uri, {**params, "status": "running", "input": plan.input,
                                            "progress": progress.to_dict(), "listing_tasks": plan.listing_tasks,
                                            "plan_reused": plan.plan_reused}, storage)

            write_running()
            if todo or plan.stream is not None:
                actors, early = predictors_ready(cfg, early or start_predictors(cfg, plan, allow_unsafe)), []
                try:
                    written = _dispatch(cfg, plan, todo, actors, progress, lease, write_running, timeline)
                finally:
                    for actor in actors:
                        ray.kill(actor)
            # Parts of a run stopped before its listing ended that this listing did not produce.
            for name in plan.stale_after:
                st.remove(st.join(plan.output, name), storage)
            maybe_fault("score-parts-committed")
            if lease is not None:
                # Leftovers of this job's writers killed while publishing (local
                # disks): nothing but the parts ends in .parquet.
                remove_temp_files(plan.output, storage, [lease.job_id])
    except BaseException as exc:
        if plan.stream is not None:
            plan.stream.stop()
        if writing:
            # A reader can tell a failed output from a running one.
            try:
                st.write_json(summary_uri, {**params, "status": "failed", "error": str(exc).strip()[-500:],
                                            "input": plan.input,
                                            "progress": progress.to_dict() if progress else None}, storage)
            except Exception:  # noqa: BLE001 - the job's own error is the one to report
                pass
        raise
    finally:
        for actor in early:  # started early, never used (nothing to score, or planning failed)
            ray.kill(actor)

    elapsed = time.time() - started
    scored_now = sum(p.rows for p in written)
    errors = sum(progress.errors.values())
    rescored = {kind: len(names) for kind, names in sorted(plan.rescored.items())}
    summary = {
        **params,
        "status": "complete",
        "input": plan.input,
        "images": plan.images,
        "scored": plan.images - errors,
        "errors": errors,
        "errors_by_reason": dict(progress.errors.most_common()),
        "ignored_files": plan.ignored,
        "files": len(plan.parts),
        "files_written": len(written),
        "files_kept": len(plan.committed),
        "files_rescored": sum(rescored.values()),
        "files_rescored_other_model": rescored.get("other model", 0),
        "files_rescored_by_reason": rescored,
        "stale_files_removed": len(plan.stale),
        "images_this_run": scored_now,
        "listing_tasks": plan.listing_tasks,
        "plan_reused": plan.plan_reused,
        "nothing_to_score": nothing,
        "listing_ended_s": round(timeline["listed"] - started, 2) if "listed" in timeline else None,
        "first_part_committed_s": round(timeline["first_commit"] - started, 2) if "first_commit" in timeline else None,
        "elapsed_s": round(elapsed, 2),
        "images_per_s": round(scored_now / elapsed, 1) if scored_now and elapsed > 0 else None,
        "progress": progress.to_dict(),
        "parquet": [st.join(plan.output, p.name) for p in plan.parts],
    }
    if nothing:
        return summary  # the output is left as the run that completed it wrote it
    if lease is not None:
        # The completion is published behind the same fence as the parts: a
        # job that lost the output never marks it complete.
        lease.check()
        try:
            check_holder(plan.output, lease.job_id, storage)
        except LeaseLost as exc:
            raise JobFailed(str(exc)) from None
    st.write_json(summary_uri, summary, storage)
    # Last: a reader that finds it reads a complete output.
    st.write_json(success_uri, {"status": "complete", "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "parts": len(plan.parts), "images": plan.images, "errors": errors,
                                "model": plan.model, "model_fingerprint": plan.model_fingerprint,
                                "top_k": plan.top_k, "source": plan.source, "input": plan.input,
                                "summary": SUMMARY_NAME}, storage)
    return summary


def _dispatch(cfg: Config, plan: ScorePlan, todo: list[PartSpec], actors: list, progress: Progress,
              lease: Optional[OutputLease], report, timeline: Optional[dict] = None) -> list[PartSpec]:
    """Score ``todo``, and the parts of ``plan.stream`` as listing produces them."""
    import ray

    sc = cfg.score
    # Enough parts that their decode tasks can fill the free CPUs and their
    # batches keep every actor busy; each part has BATCHES_AHEAD batches out,
    # more when fewer parts run than that needs (batches_ahead).
    pool = predictor_pool(cfg)
    cpus = pool.decode_cpus
    decodes_per_part = BATCHES_AHEAD * math.ceil(pool.batch_size / sc.read_batch)
    in_flight = max(2, 2 * len(actors), math.ceil(cpus / decodes_per_part) + 1)
    wanted = batches_wanted(pool, sc.read_batch)
    shared = {"plan_dir": plan.plan_dir, "output": plan.output, "labels": plan.labels, "model": plan.model,
              "lease_job": lease.job_id if lease else "", "writer": plan.writer}
    settings = {"batch_size": pool.batch_size, "read_batch": sc.read_batch, "recipe": plan.recipe,
                "max_bytes": int(sc.max_file_mb * 2**20), "max_pixels": sc.max_pixels, "top_k": plan.top_k,
                "retry_s": sc.read_retry_s, "max_error_fraction": sc.max_error_fraction}
    task = ray.remote(score_part).options(num_cpus=0, max_retries=3)
    actors_ref = ray.put(actors)
    shared_ref, settings_ref = ray.put(shared), ray.put(settings)
    queue = deque(todo)
    running: dict = {}  # part task -> (its part, its batches_ahead)
    written: list[PartSpec] = []
    timeline = {} if timeline is None else timeline
    stream = plan.stream
    last_report = time.time()
    try:
        while queue or running or (stream is not None and not stream.done):
            listing = stream is not None and not stream.done
            if listing:
                for spec in stream.poll(0.0 if queue or running else 0.5):
                    _planned(progress, spec, plan.committed.get(spec.index))
                    if spec.index not in plan.committed:
                        queue.append(spec)
                if stream.done:
                    timeline["listed"] = time.time()
            while queue and len(running) < in_flight:
                spec = queue.popleft()
                ahead = batches_ahead(wanted, [window for _, window in running.values()])
                running[task.remote(spec, shared_ref, cfg.storage, actors_ref, settings_ref, ahead)] = (spec, ahead)
            done = []
            if running:
                done, _ = ray.wait(list(running), num_returns=1,
                                   timeout=0.2 if listing else min(5.0, sc.progress_every_s))
            for ref in done:
                spec, _ = running.pop(ref)
                result = _result(ref)
                written.append(spec)
                timeline.setdefault("first_commit", time.time())
                progress.part_done(result["rows"], result["errors"])
                log.info("committed %s: %d rows, %d errors", spec.name, result["rows"], sum(result["errors"].values()))
                if stream is not None and not stream.done:
                    maybe_fault("score-part-committed-while-listing")
            if lease is not None:
                lease.check()
            if time.time() - last_report >= sc.progress_every_s:
                log.info(progress.line())
                report()
                last_report = time.time()
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True, recursive=True)
        raise
    log.info(progress.line())
    return written


def _planned(progress: Progress, spec: PartSpec, committed: Optional[Counter]) -> None:
    """A part listed while scoring goes on: into the totals (and done, when
    an earlier run committed it)."""
    progress.parts_total += 1
    progress.rows_total += spec.rows
    if committed is not None:
        progress.parts_done += 1
        progress.rows_done += spec.rows
        progress.errors.update(committed)


def _result(ref) -> dict:
    """A part task's result; a lost lease inside it becomes the driver's error."""
    import ray

    try:
        return ray.get(ref)
    except (LeaseLost, TransientReadError, TooManyErrors) as exc:
        # Ray's error for a task that raised one of these is also one: its
        # last line is the original message.
        name = next(t.__name__ for t in (LeaseLost, TransientReadError, TooManyErrors) if isinstance(exc, t))
        raise JobFailed(str(exc).strip().splitlines()[-1].split(f"{name}: ", 1)[-1]) from None
