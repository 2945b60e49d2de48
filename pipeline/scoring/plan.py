"""Planning a score run.

``plan_score`` (driver, no Ray, no TensorFlow) checks everything a user can get
wrong: the model and its labels and recipe, the images (a prefix's first level,
or a list's columns and first entries, see ``pipeline.scoring.entries``), and
what the output already holds. Every such error is a UsageError here.

``prepare_parts`` (Ray) derives the parts: it reuses ``OUTPUT/_plan/plan.json``
when an earlier run with the same images and rows per file wrote one, and
otherwise lists the prefix or reads the lists with Ray tasks
(``pipeline.scoring.listing``) and writes the plan, ``plan.json`` last. The
driver holds one small descriptor per part, whatever the number of images. It
then finds the parts already committed (resume) and our parts this plan no
longer produces (removed at the end, ``--overwrite`` only).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from pipeline import storage as st
from pipeline.config import Config, StorageConfig
from pipeline.errors import UsageError
from pipeline.data.preprocess import Recipe
from pipeline.scoring import listing
from pipeline.scoring.commit import SUMMARY_NAME, committed_errors, listdir
from pipeline.scoring.entries import EntryRejected, allowed_protocols
from pipeline.scoring.parts import PART_NAME, PLAN_DIR, PLAN_FILE, PartSpec

log = logging.getLogger(__name__)
PLAN_VERSION = 1


@dataclass
class ScorePlan:
    model: str  # the `model` column: --model as given, or REGISTRY#name@version
    model_uri: str  # where the model is loaded from (run dir or model file)
    source: str  # --images
    output: str
    labels: list[str]
    top_k: int  # already capped at the number of labels
    image_size: int
    rows_per_file: int
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

    @property
    def images(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def plan_dir(self) -> str:
        return st.join(self.output, PLAN_DIR)

    def lease_args(self) -> dict:
        """What decides the rows: two jobs may share an output only if these match."""
        return {"model": canonical(self.model), "images": canonical(self.source), "top_k": self.top_k,
                "rows_per_file": self.rows_per_file}


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
    labels_uri = st.join(check_model_uri(model_uri, cfg.storage).rsplit("/", 1)[0], LABELS_FILE)
    try:
        labels = st.read_json(labels_uri, cfg.storage)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise UsageError(f"{labels_uri} is not a JSON list of class names")
    plan = ScorePlan(model=shown, model_uri=model_uri, source=images, output=output, labels=list(labels),
                     top_k=min(cfg.score.top_k, len(labels)), image_size=0,
                     rows_per_file=cfg.score.rows_per_file)
    plan.is_list = listing.is_list(images, cfg.storage)
    if plan.is_list:
        plan.allowed = allowed_protocols(images, output, cfg.score.uri_protocols)
        listing.check_list_head(images, cfg.storage, plan.allowed)
    else:
        has_image, has_dir = listing.first_level(images, cfg.storage)
        if not has_image and not has_dir:
            raise UsageError(no_images(images))
    st.check_writable(output, cfg.storage)
    check_previous_output(plan, cfg.storage, overwrite)
    plan.recipe = model_recipe(model_uri, cfg.storage, allow_unsafe=allow_unsafe)
    plan.image_size = plan.recipe.image_size
    return plan


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


def _read_summary(output: str, storage: StorageConfig) -> Optional[dict]:
    try:
        data = st.read_json(st.join(output, SUMMARY_NAME), storage)
    except (FileNotFoundError, ValueError):  # absent, or not JSON
        return None
    return data if isinstance(data, dict) and {"model", "source", "top_k"} <= data.keys() else None


# ---------------------------------------------------------------- the parts (Ray)


def plan_key(plan: ScorePlan) -> dict:
    return {"version": PLAN_VERSION, "images": canonical(plan.source), "rows_per_file": plan.rows_per_file,
            "uri_protocols": sorted(plan.allowed)}


def prepare_parts(cfg: Config, plan: ScorePlan, overwrite: bool = False) -> None:
    """Fill ``plan.parts`` (from ``_plan/`` or by listing), ``committed`` and ``stale``."""
    storage = cfg.storage
    plan_uri = st.join(plan.plan_dir, PLAN_FILE)
    saved = _read_plan(plan_uri, storage)
    if saved is not None and saved.get("key") == plan_key(plan):
        plan.parts = [PartSpec(**p) for p in saved["parts"]]
        plan.ignored = int(saved.get("ignored", 0))
        plan.plan_reused = True
        log.info("score: reusing the plan in %s (%d parts)", plan.plan_dir, len(plan.parts))
    else:
        _build(cfg, plan)
        st.write_json(plan_uri, {"key": plan_key(plan), "images": plan.images, "ignored": plan.ignored,
                                 "listing_tasks": plan.listing_tasks,
                                 "parts": [p.to_dict() for p in plan.parts]}, storage)
        wanted = {p.plan_file for p in plan.parts} | {PLAN_FILE}
        for name in listdir(plan.plan_dir, storage):
            if name not in wanted and not name.startswith(st.TMP_MARK):
                st.remove(st.join(plan.plan_dir, name), storage)
    if not plan.parts:
        raise UsageError(no_images(plan.source) if not plan.is_list else f"{plan.source} lists no images")
    _find_committed(plan, storage, overwrite)


def _read_plan(uri: str, storage: StorageConfig) -> Optional[dict]:
    try:
        data = st.read_json(uri, storage)
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("parts"), list) else None


def _build(cfg: Config, plan: ScorePlan) -> None:
    sc = cfg.score
    if plan.is_list:
        try:
            found = listing.read_list(plan.source, cfg.storage, plan.allowed, plan.plan_dir, plan.rows_per_file)
        except EntryRejected as exc:
            raise UsageError(str(exc)) from None
        found.sort(key=lambda d: d["index"])
        plan.listing_tasks = 0
    else:
        found, plan.ignored, plan.listing_tasks = listing.list_prefix(
            plan.source, cfg.storage, plan.plan_dir, plan.rows_per_file, sc.list_concurrency)
        found.sort(key=lambda d: d["first"])
        for i, d in enumerate(found):
            d["index"] = i
    plan.parts = [PartSpec(**d) for d in found]
    log.info("score: planned %d images in %d parts (%d listing tasks)", plan.images, len(plan.parts),
             plan.listing_tasks)


def _find_committed(plan: ScorePlan, storage: StorageConfig, overwrite: bool) -> None:
    names = {n for n in listdir(plan.output, storage) if PART_NAME.match(n)}
    plan.stale = sorted(names - {p.name for p in plan.parts})
    if overwrite:
        return
    present = [p for p in plan.parts if p.name in names]

    def check(spec: PartSpec):
        return spec.index, committed_errors(st.join(plan.output, spec.name), storage, spec.rows)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for index, reasons in pool.map(check, present):
            if reasons is not None:
                plan.committed[index] = reasons
