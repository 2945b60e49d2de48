"""Running a planned score job on Ray.

Per part, a ``score_part`` task (no CPU of its own: it only coordinates) reads
the part's plan file, sends its files in groups of ``read_batch`` to
``decode_files`` CPU tasks, passes each model batch's decoded uint8 images,
as object references that the part task never fetches, to one of the
``ScoringPredictor`` actors (one GPU each when the cluster has GPUs), and
writes and publishes the part's Parquet file itself (``pipeline.scoring.commit``).
A batch in which no file decoded never reaches the model. At most a few parts
are in flight, each with a bounded window of batches, so memory does not grow
with the number of images.

The driver starts the actors, hands out parts, tracks their completion and
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
import time
from collections import Counter, deque
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline import storage as st
from pipeline.config import Config, StorageConfig
from pipeline.runtime.faults import maybe_fault
from pipeline.data.preprocess import Recipe
from pipeline.scoring.commit import (SUCCESS_NAME, SUMMARY_NAME, error_counts, publish_part, remove_temp_files,
                                     to_table)
from pipeline.scoring.decode import NO_ERROR, TransientReadError, read_and_decode
from pipeline.storage.lease import OutputLease, check_holder
from pipeline.scoring.parts import PartSpec, read_plan_chunk
from pipeline.scoring.plan import ScorePlan, prepare_parts
from pipeline.scoring.progress import Progress

log = logging.getLogger(__name__)
BATCHES_AHEAD = 4  # model batches a part task keeps in flight


DECODE_RETRIES = 2  # a decode task whose reads kept failing is run again this many times


class TooManyErrors(RuntimeError):
    """A part whose error rows exceed score.max_error_fraction."""


def pool_sizes(cfg: Config) -> tuple[int, int, int]:
    """(predictor actors, GPUs per actor, CPUs left for decoding) for this
    cluster: one actor per GPU when there are GPUs, else one per 8 CPUs (at
    least one)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    actors = cfg.score.concurrency or (gpus if gpus else max(1, cpus // 8))
    return actors, (1 if gpus else 0), max(1, cpus - (0 if gpus else actors))


def decode_files(uris: list, sizes: list, storage: StorageConfig, recipe: Recipe, max_bytes: int,
                 max_pixels: int, retry_s: float) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task: (errors, uint8 images of the files that decoded, in order)
    for a group of files; TransientReadError when a file could not be read for
    ``retry_s`` (the task is then retried)."""
    out = read_and_decode({"uri": uris, "size": sizes}, storage=storage, recipe=recipe, max_bytes=max_bytes,
                          max_pixels=max_pixels, retry_s=retry_s)
    errors = out["error"]
    return errors, out["image"][errors == NO_ERROR]


def score_part(spec: PartSpec, plan: dict, storage: StorageConfig, actors: list, settings: dict) -> dict:
    """A Ray task: score one part and publish its Parquet file. Returns
    {"index", "rows", "errors": {reason: count}}."""
    import ray

    table = read_plan_chunk(plan["plan_dir"], spec, storage)
    uris = table.column("uri").to_pylist()
    sizes = table.column("size").to_pylist()
    batch, group = settings["batch_size"], settings["read_batch"]
    decode = ray.remote(decode_files).options(num_cpus=1, num_returns=2, max_retries=DECODE_RETRIES,
                                              retry_exceptions=[TransientReadError])
    starts = list(range(0, len(uris), batch))

    def submit(start: int) -> list:
        end = min(start + batch, len(uris))
        return [decode.remote(uris[s : min(s + group, end)], sizes[s : min(s + group, end)], storage,
                              settings["recipe"], settings["max_bytes"], settings["max_pixels"], settings["retry_s"])
                for s in range(start, end, group)]

    decoding = [submit(s) for s in starts[:BATCHES_AHEAD]]
    scored: list = []  # per batch: [errors, result ref, result or None]
    waiting: deque[int] = deque()  # batches whose result is still a reference
    for i in range(len(starts)):
        refs = decoding[i]
        if i + BATCHES_AHEAD < len(starts):
            decoding.append(submit(starts[i + BATCHES_AHEAD]))
        errors = np.concatenate(ray.get([e for e, _ in refs]))
        ok = errors == NO_ERROR
        result = None
        if ok.any():
            actor = actors[(spec.index + i) % len(actors)]
            result = actor.score.remote(ok, *[images for _, images in refs])
            waiting.append(i)
        decoding[i] = None  # the images are the actor's now
        scored.append([errors, result])
        while len(waiting) > BATCHES_AHEAD:
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
    if limit is not None and uris and failed > limit * len(uris):
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
    published = publish_part(rows, pa.array(sorted(uris), pa.string()), st.join(plan["output"], spec.name),
                             storage, tmp_tag=plan.get("lease_job", ""), writer=plan.get("writer"),
                             part_digest=spec.digest)
    return {"index": spec.index, "rows": published.num_rows, "errors": dict(error_counts(published))}


def start_predictors(cfg: Config, plan: ScorePlan, allow_unsafe: bool) -> list:
    import ray

    from pipeline.scoring.predictor import ScoringPredictor

    actors, gpus, _ = pool_sizes(cfg)
    cls = ray.remote(ScoringPredictor).options(num_cpus=0 if gpus else 1, num_gpus=gpus, max_restarts=3,
                                               max_task_retries=3)
    handles = [cls.remote(plan.model_uri, cfg.storage, plan.top_k, plan.recipe, allow_unsafe)
               for _ in range(actors)]
    return handles


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
        remove_temp_files(plan.output, storage, tags)
    if overwrite:
        start_writing()
    written: list[PartSpec] = []
    timeline: dict = {}  # when listing ended and the first part was committed (time.time())
    try:
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
                actors = start_predictors(cfg, plan, allow_unsafe)
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
    # batches keep every actor busy; each part has BATCHES_AHEAD batches out.
    _, _, cpus = pool_sizes(cfg)
    decodes_per_part = BATCHES_AHEAD * math.ceil(sc.batch_size / sc.read_batch)
    in_flight = max(2, 2 * len(actors), math.ceil(cpus / decodes_per_part) + 1)
    shared = {"plan_dir": plan.plan_dir, "output": plan.output, "labels": plan.labels, "model": plan.model,
              "lease_job": lease.job_id if lease else "", "writer": plan.writer}
    settings = {"batch_size": sc.batch_size, "read_batch": sc.read_batch, "recipe": plan.recipe,
                "max_bytes": int(sc.max_file_mb * 2**20), "max_pixels": sc.max_pixels, "top_k": plan.top_k,
                "retry_s": sc.read_retry_s, "max_error_fraction": sc.max_error_fraction}
    task = ray.remote(score_part).options(num_cpus=0, max_retries=3)
    actors_ref = ray.put(actors)
    shared_ref, settings_ref = ray.put(shared), ray.put(settings)
    queue = deque(todo)
    running: dict = {}
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
                running[task.remote(spec, shared_ref, cfg.storage, actors_ref, settings_ref)] = spec
            done = []
            if running:
                done, _ = ray.wait(list(running), num_returns=1,
                                   timeout=0.2 if listing else min(5.0, sc.progress_every_s))
            for ref in done:
                spec = running.pop(ref)
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

    from pipeline.errors import JobFailed
    from pipeline.storage.lease import LeaseLost

    try:
        return ray.get(ref)
    except (LeaseLost, TransientReadError, TooManyErrors) as exc:
        # Ray's error for a task that raised one of these is also one: its
        # last line is the original message.
        name = next(t.__name__ for t in (LeaseLost, TransientReadError, TooManyErrors) if isinstance(exc, t))
        raise JobFailed(str(exc).strip().splitlines()[-1].split(f"{name}: ", 1)[-1]) from None
