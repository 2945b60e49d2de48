"""The training job on the driver: check everything up front, run Ray Train's
TensorflowTrainer, then a finalize task that evaluates the last checkpoint in
inference mode over the whole validation split and writes the run directory.

Run directory: model.keras, labels.json, preprocessing.json, config.yaml,
history.json, metrics.json, training.png, confusion.png, tensorboard/ (written
live by rank 0 as training runs), checkpoints/, mlflow.json (when MLflow tracks
the run: its run id, reused by a resume), and summary.json, written last: its
presence marks a completed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from pipeline import storage as st
from pipeline.artifact import LABELS_FILE, MODEL_FILE, PREPROCESSING_FILE, manifest_preprocessing_spec
from pipeline.config import Config
from pipeline.errors import JobFailed, UsageError
from pipeline.runtime.faults import maybe_fault
from pipeline.data.shards import read_manifest

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SUMMARY_FILE = "summary.json"
# What the run's first attempt was started with (resolved config, data
# manifest digest), and the changes later attempts were allowed to make.
ATTEMPT_FILE = "_attempt.json"


@dataclass
class TrainPlan:
    data: str
    output: str
    manifest: dict
    resuming: bool
    # Keys a resume changes against ATTEMPT_FILE (allowed: train.allow_changed_resume).
    changes: list = field(default_factory=list)
    # A warm start's parent (model.init_from): what was named, the model file, its folder.
    parent: Optional[dict] = None


def plan_training(cfg: Config, data: str, output: str) -> TrainPlan:
    """Everything that can fail on user input, checked before any cluster work."""
    from pipeline.artifact import check_model_reference, model_file_uri

    # Workers and tasks run elsewhere: local paths are made absolute here.
    data, output = st.absolute(data), st.absolute(output)
    cfg.registry.uri = st.absolute(cfg.registry.uri)
    cfg.model.init_from = st.absolute(cfg.model.init_from)
    if cfg.model.weights not in ("imagenet", "none"):
        cfg.model.weights = st.absolute(cfg.model.weights)
    manifest = read_manifest(data, cfg.storage)
    if len(manifest["classes"]) < 2:
        raise UsageError(f"{data}: the manifest lists {len(manifest['classes'])} class; need at least 2")
    if manifest["splits"]["train"]["num_examples"] == 0:
        raise UsageError(f"{data}: no training examples in the manifest")
    _check_jpeg_scale(cfg, manifest, data)
    if not cfg.train.phases():
        raise UsageError("both phases have 0 epochs (train.transfer.epochs, train.finetune.epochs)")
    if cfg.model.weights not in ("imagenet", "none") and not _exists(cfg.model.weights, cfg):
        raise UsageError(f"model.weights: file not found: {cfg.model.weights}")
    parent = None
    if cfg.model.init_from:
        # Resolved once, here: every worker warm-starts from the same version,
        # a completed run or registry version in the .keras format without code.
        try:
            location, shown = check_model_reference(cfg.model.init_from, cfg.storage,
                                                hint="a warm start takes safe .keras models only")
        except UsageError as exc:
            raise UsageError(f"model.init_from: {exc}") from None
        cfg.model.init_from = model_file_uri(location)
        if not _exists(cfg.model.init_from, cfg):
            raise UsageError(f"model.init_from: no model at {cfg.model.init_from}")
        parent = {"reference": shown, "model": cfg.model.init_from, "folder": cfg.model.init_from.rsplit("/", 1)[0]}
    if isinstance(cfg.train.class_weights, dict):
        unknown = sorted(set(cfg.train.class_weights) - set(manifest["classes"]))
        if unknown:
            raise UsageError(f"train.class_weights: unknown classes {', '.join(unknown)}")
    if bool(cfg.registry.uri) != bool(cfg.registry.name):
        raise UsageError("--registry and --name go together (registry.uri and registry.name)")
    if cfg.registry.uri:
        from pipeline.registry import list_versions

        list_versions(cfg.registry.uri, cfg.registry.name, cfg.storage)  # readable, valid name
    if _exists(st.join(output, SUMMARY_FILE), cfg):
        raise UsageError(f"{output} holds a completed run ({SUMMARY_FILE}); choose a new --output")
    _check_cache_bound(cfg, manifest, data)
    resuming = _exists(st.join(output, CHECKPOINTS), cfg)
    changes = check_attempt(cfg, output, data, manifest, resuming)
    st.check_writable(output, cfg.storage)
    check_local_placement(cfg)
    from pipeline.tracking.mlflow_runs import check as check_tracking

    check_tracking(cfg)
    _check_unfreeze(cfg)  # last: it loads TensorFlow, after every storage check
    return TrainPlan(data, output, manifest, resuming, changes, parent)


# ----------------------------------------------------------------- attempts

# Keys that may differ between attempts of one run: where and how it runs
# (cluster, storage, workers and their resources, caches, retries, the lease,
# GPU switches), what happens after training (registry, quality gate), tracking
# (MLflow, TensorBoard's step interval), other jobs' sections, and the switches
# that allow a changed resume. Everything else (data, model, augmentation,
# phases, learning rates, seed...) must match.
# data.batch_size may differ too when train.rescale_on_resume is true (the
# global batch check then lets the new batch through).
ATTEMPT_FREE_KEYS = (
    "ray.", "storage.", "prepare.", "score.", "registry.", "scaling.", "tracking.",
    "data.cache_dir", "data.cache_max_gb", "data.download_concurrency", "data.read_parallelism",
    "data.cpu_threads", "train.max_failures", "train.checkpoints_to_keep", "train.lease_timeout_s", "train.lease_wait_s",
    "train.mixed_precision", "train.precision", "train.steps_per_execution", "train.xla",
    "train.min_val_accuracy", "train.rescale_on_resume", "train.allow_changed_resume", "train.export",
    "train.tensorboard_every_steps",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix == "train." and key == "class_weights"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8")).hexdigest()


def attempt_record(cfg: Config, data: str, manifest: dict) -> dict:
    """What decides what a run trains: its resolved config (secrets redacted) and data manifest."""
    return {"data": data, "manifest_sha256": manifest_digest(manifest), "config": cfg.to_dict(redact=True)}


def compared_config(cfg: Config, config: dict) -> dict:
    """The dotted keys of ``config`` that must match between attempts."""
    free = ATTEMPT_FREE_KEYS + (("data.batch_size",) if cfg.train.rescale_on_resume else ())
    return {k: v for k, v in _flat(config).items() if not any(k == f or (f.endswith(".") and k.startswith(f))
                                                              for f in free)}


def attempt_changes(cfg: Config, first: dict, now: dict) -> list[str]:
    """'key: first -> now' for each compared key (and the data manifest) that differs."""
    changes = []
    if first.get("manifest_sha256") != now["manifest_sha256"]:
        changes.append(f"data manifest: {first.get('data')} (sha256 {str(first.get('manifest_sha256'))[:12]}) -> "
                       f"{now['data']} (sha256 {now['manifest_sha256'][:12]})")
    before, after = compared_config(cfg, first.get("config") or {}), compared_config(cfg, now["config"])
    for key in sorted(set(before) | set(after)):
        if before.get(key, "<unset>") != after.get(key, "<unset>"):
            changes.append(f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return changes


def check_attempt(cfg: Config, output: str, data: str, manifest: dict, resuming: bool) -> list[str]:
    """A resume must train what the run started with: UsageError naming the
    differences from ATTEMPT_FILE unless train.allow_changed_resume; returns them."""
    if not resuming:
        return []
    try:
        first = st.read_json(st.join(output, ATTEMPT_FILE), cfg.storage)
    except FileNotFoundError:
        return []  # a run from before the record was kept
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {st.join(output, ATTEMPT_FILE)}: {st.describe_error(exc)}") from None
    changes = attempt_changes(cfg, first, attempt_record(cfg, data, manifest))
    if changes and not cfg.train.allow_changed_resume:
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        raise UsageError(f"{output}: this resume differs from the run's first attempt ({ATTEMPT_FILE}): "
                         f"{'; '.join(changes[:3])}{more}; resume with the same config and data, or set "
                         "train.allow_changed_resume=true")
    return changes


def record_attempt(cfg: Config, plan: TrainPlan) -> None:
    """Write ATTEMPT_FILE at the start of a run (under its lease); a resume
    allowed to change keys appends them and becomes the new reference."""
    uri = st.join(plan.output, ATTEMPT_FILE)
    now = attempt_record(cfg, plan.data, plan.manifest)
    try:
        previous = st.read_json(uri, cfg.storage) if plan.resuming else None
    except FileNotFoundError:
        previous = None
    if previous is not None and not plan.changes:
        return
    accepted = (previous or {}).get("accepted_changes", [])
    if previous is not None:
        accepted = accepted + [{"time": time.time(), "changes": plan.changes}]
        log.warning("train: resuming with changes (train.allow_changed_resume): %s", "; ".join(plan.changes))
    st.write_json(uri, {**now, "started": time.time(), "accepted_changes": accepted}, cfg.storage)


def lease_args(cfg: Config, plan: TrainPlan) -> dict:
    """What the output lease names: two jobs with these equal are the same job."""
    config = json.dumps(compared_config(cfg, cfg.to_dict(redact=True)), sort_keys=True, default=str)
    return {"data": plan.data, "manifest_sha256": manifest_digest(plan.manifest)[:16],
            "config_sha256": hashlib.sha256(config.encode("utf-8")).hexdigest()[:16]}


# ---------------------------------------------------------------- placement

def starts_own_ray(cfg: Config) -> bool:
    """Whether start_ray will start a private local Ray for this job (no
    ray.address, no RAY_ADDRESS, no Ray started on this machine with ``ray
    start``, none initialised in this process): its size is then this machine."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return False
    ray_module = sys.modules.get("ray")
    if ray_module is not None and ray_module.is_initialized():
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 - cannot tell: the check after Ray starts decides
        return False


def local_resources() -> dict:
    """CPUs and GPUs a local Ray started on this machine gets (Ray's own count:
    CPUs within container limits, else os.cpu_count(); visible NVIDIA GPUs)."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001
        cpus = float(os.cpu_count() or 1)
    gpus = 0.0
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        visible = manager.get_current_process_visible_accelerator_ids()
        found = manager.get_current_node_num_accelerators()
        gpus = float(min(found, len(visible)) if visible is not None else found)
    except Exception:  # noqa: BLE001
        pass
    return {"CPU": cpus, "GPU": gpus}


def controller_cpus() -> float:
    """CPUs Ray Train takes beside the workers: Train V2 (Ray's default) runs
    its controller with 0 CPUs; the V1 trainer actor takes 1."""
    return 0.0 if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").strip().lower() not in ("0", "false") else 1.0


def worker_bundle(cfg: Config, use_gpu: bool) -> dict:
    bundle = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu and cfg.scaling.gpus_per_worker:
        bundle["GPU"] = cfg.scaling.gpus_per_worker
    return bundle


def _describe_need(workers: int, bundle: dict) -> str:
    each = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    total = ", ".join(f"{v * workers:g} {k}s" for k, v in bundle.items())
    return f"{workers} worker{'s' if workers != 1 else ''} x {each} = {total}"


def _fits(nodes: list[dict], bundle: dict, workers: int, extra_cpus: float = 0.0) -> bool:
    """Whether ``workers`` bundles fit the nodes' resources (each bundle on one node)."""
    placed = 0
    for i, node in enumerate(nodes):
        per = [math.floor((node.get(k, 0.0) - (extra_cpus if k == "CPU" and i == 0 else 0.0)) / v + 1e-9)
               for k, v in bundle.items() if v > 0]
        placed += max(0, min(per)) if per else workers
    return placed >= workers


def check_local_placement(cfg: Config) -> None:
    """For the job's own local Ray (a fixed size: this machine), refuse a worker
    group that cannot be placed, before Ray starts."""
    if not starts_own_ray(cfg):
        return
    have = local_resources()
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else have["GPU"] > 0
    if use_gpu and have["GPU"] == 0:
        raise UsageError("scaling.use_gpu is true but this machine, where the job starts its own Ray, has no GPUs")
    workers = cfg.scaling.num_workers
    if workers is None:
        workers = max(1, int(have["GPU"] // (cfg.scaling.gpus_per_worker or 1))) if use_gpu else 1
    bundle = worker_bundle(cfg, use_gpu)
    reserve = controller_cpus()
    if not _fits([have], bundle, workers, extra_cpus=reserve):
        held = ", ".join(f"{have[k]:g} {k}s" for k in bundle)
        extra = f" (+ {reserve:g} CPU for Ray Train's trainer)" if reserve else ""
        raise UsageError(f"scaling: {_describe_need(workers, bundle)}{extra} do not fit the local Ray this job "
                         f"starts, which has this machine's {held}; lower scaling.num_workers or "
                         "scaling.cpus_per_worker/gpus_per_worker, or set ray.address to a larger cluster")


def cluster_growth(own_ray: bool) -> tuple[str, Optional[dict]]:
    """("fixed" | "autoscaler" | "unknown", the autoscaler's maximum resources
    when it reports them). The job's own local Ray is fixed. Otherwise: an
    autoscaler that publishes its node types (autoscaler v2: KubeRay, the
    cluster launcher with v2) reports its limits, which Ray Train reads too; the
    v1 autoscaler reports node types in its status: a cluster whose every node
    type is the read-only monitor's "node_<node id>" (a cluster started by hand
    with ``ray start``, or by ray.init()) cannot grow; other node types mean an
    autoscaler that can add nodes. No report at all: unknown (waited on, like an
    autoscaler, for at most scaling.placement_timeout_s)."""
    if own_ray:
        return "fixed", None
    try:
        from ray._private import state as ray_state

        limits = ray_state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001
        limits = None
    if limits:
        return "autoscaler", {k: float(v) for k, v in limits.items()}
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {} if raw else {}
    except Exception:  # noqa: BLE001
        mapping = {}
    if not mapping:
        return "unknown", None
    if all(kind == f"node_{node}" for node, kind in mapping.items()):
        return "fixed", None
    return "autoscaler", None


def ensure_placeable(cfg: Config, workers: int, use_gpu: bool, own_ray: bool = False) -> None:
    """Before the worker group starts: a cluster that cannot grow and cannot
    hold it is a UsageError (exit 2) naming the resources; a group that does not
    fit now is waited for once (a placement group the autoscaler sees), for at
    most scaling.placement_timeout_s, then JobFailed (exit 1)."""
    import ray

    bundle = worker_bundle(cfg, use_gpu)
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    have = ", ".join(f"{totals[k]:g} {k}s" for k in bundle)
    growth, limits = cluster_growth(own_ray)
    reserve = controller_cpus()
    if not _fits(nodes, bundle, workers, extra_cpus=reserve):
        if growth == "fixed":
            raise UsageError(f"scaling: {_describe_need(workers, bundle)} do not fit this Ray cluster, which has no "
                             f"autoscaler: its {len(nodes)} node(s) have {have}; lower scaling.num_workers or "
                             "scaling.cpus_per_worker/gpus_per_worker")
        if limits is not None and any(v * workers > limits.get(k, 0.0) for k, v in bundle.items()):
            most = ", ".join(f"{limits.get(k, 0.0):g} {k}s" for k in bundle)
            raise UsageError(f"scaling: {_describe_need(workers, bundle)} exceed what this cluster's autoscaler "
                             f"may ever provide ({most}); lower scaling.num_workers or the resources per worker")
    available = ray.available_resources()
    if _fits(nodes, bundle, workers, extra_cpus=reserve) and all(
            available.get(k, 0.0) >= v * workers for k, v in bundle.items()):
        return
    timeout = cfg.scaling.placement_timeout_s
    from ray.util.placement_group import placement_group, remove_placement_group

    log.warning("train: waiting up to %.0f s (scaling.placement_timeout_s) for room for %s on the cluster (%s now, "
                "%s free)%s", timeout, _describe_need(workers, bundle), have,
                ", ".join(f"{available.get(k, 0.0):g} {k}s" for k in bundle),
                "; the autoscaler may add nodes" if growth != "fixed" else "")
    group = placement_group([dict(bundle) for _ in range(workers)], strategy="PACK")
    try:
        ready = group.wait(timeout_seconds=timeout)
    finally:
        remove_placement_group(group)
    if not ready:
        raise JobFailed(f"the cluster did not make room for {_describe_need(workers, bundle)} within "
                        f"scaling.placement_timeout_s={timeout:g} s ({have} now); lower scaling.num_workers, or "
                        "check the autoscaler's limits and its log")


def _check_jpeg_scale(cfg: Config, manifest: dict, data: str) -> None:
    """A model input larger than the shards' prepare.jpeg_scale_to is refused."""
    from pipeline.data.images import jpeg_scale_refusal

    refusal = jpeg_scale_refusal(cfg.data.image_size, manifest.get("settings", {}).get("jpeg_scale_to"))
    if refusal:
        raise UsageError(f"the shards at {data}: {refusal}")


def _check_cache_bound(cfg: Config, manifest: dict, data: str) -> None:
    """A worker keeps the shards it reads and fetches ahead pinned in its cache."""
    from pipeline.data.shard_stream import stream_window

    if st.is_local(data):
        return  # read in place
    largest = max((s["bytes"] for split in manifest["splits"].values() for s in split["shards"]), default=0)
    pinned = sum(stream_window(cfg.data.download_concurrency, cfg.data.read_parallelism)) + 1
    need = pinned * largest
    if need > cfg.data.cache_max_gb * 1e9:
        raise UsageError(
            f"data.cache_max_gb={cfg.data.cache_max_gb} is too small: a worker keeps up to {pinned} shards of up to "
            f"{largest / 1e9:.3f} GB in its cache at once; set it to at least {need / 1e9:.3f}"
        )


def _exists(uri: str, cfg: Config) -> bool:
    try:
        return st.exists(uri, cfg.storage)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {uri}: {st.describe_error(exc)}") from None


def _check_unfreeze(cfg: Config) -> None:
    if cfg.train.finetune.epochs == 0:
        return
    from pipeline.training.model import base_layer_names, freeze_index

    try:
        freeze_index(base_layer_names(), cfg.train.finetune.unfreeze_after)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def resolve_scaling(cfg: Config) -> tuple[int, bool, bool, bool]:
    """(num_workers, use_gpu, mixed_precision, xla) from config and the cluster."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.scaling.use_gpu if cfg.scaling.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise UsageError("scaling.use_gpu is true but the cluster has no GPUs")
    workers = cfg.scaling.num_workers
    if workers is None:
        per = cfg.scaling.gpus_per_worker or 1
        workers = max(1, int(gpus // per)) if use_gpu else 1
    mixed = cfg.train.mixed_precision if cfg.train.mixed_precision is not None else use_gpu
    xla = cfg.train.xla if cfg.train.xla is not None else use_gpu
    return workers, use_gpu, mixed, xla


def ray_storage(uri: str, cfg: Config):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if st.is_local(uri):
        return os.path.abspath(uri.replace("file://", "")), None
    import pyarrow.fs as pafs

    fs, path = st.get_fs(uri, cfg.storage)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def worker_env(cfg: Config) -> dict:
    """Environment for the training workers, set when their processes start.
    Never secrets: Ray logs runtime envs. Secrets from the config travel inside
    the pickled Config object (SecretStr), which Ray neither logs nor persists;
    the fault-injection hook passes for tests."""
    from pipeline.runtime.faults import FAULT_ENV

    env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if cfg.scaling.worker_malloc_top_pad_mb:
        env["MALLOC_TOP_PAD_"] = str(cfg.scaling.worker_malloc_top_pad_mb << 20)
    if os.environ.get(FAULT_ENV):
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def expected_global_batch(cfg: Config, workers: int, use_gpu: bool) -> int:
    """data.batch_size times the replicas: one per worker on CPU, one per whole
    GPU of a worker (MultiWorkerMirroredStrategy mirrors over its local GPUs)."""
    per_worker = max(1, int(cfg.scaling.gpus_per_worker)) if use_gpu else 1
    return cfg.data.batch_size * workers * per_worker


def check_resume_batch(cfg: Config, output: str, state: dict, global_batch: int) -> Optional[dict]:
    """A resume at another global batch than the checkpoint's is a UsageError
    unless train.rescale_on_resume; returns {"from", "to"} when it rescales."""
    rescales = state.get("rescales") or []
    in_force = rescales[-1]["scaling"] if rescales else state.get("scaling")
    if not in_force or in_force.get("global_batch") == global_batch:
        return None
    before = in_force["global_batch"]
    if not cfg.train.rescale_on_resume:
        raise UsageError(
            f"{output}: the checkpoint was trained at a global batch of {before} ({in_force.get('workers')} "
            f"worker(s), {in_force.get('replicas')} replica(s) x {in_force.get('per_replica_batch')}), this attempt "
            f"would train at {global_batch} (data.batch_size {cfg.data.batch_size}); resume with the same workers "
            "and batch, or set train.rescale_on_resume=true to go on at the new batch and its learning rates")
    log.warning("train: rescaling on resume: global batch %d -> %d (train.rescale_on_resume)", before, global_batch)
    return {"from": before, "to": global_batch}


def run_training(cfg: Config, plan: TrainPlan, *, lease=None, own_ray: bool = False, export=None) -> dict:
    """``lease``: the run directory's OutputLease (checked before publishing);
    ``own_ray``: Ray was started by this job (a cluster of this machine's size);
    ``export``: called with the run directory once it is published (the
    serving export, ``train.export``), before summary.json; what it returns is
    summary.json's ``export``."""
    from pipeline.tracking import mlflow_runs

    started = time.time()
    workers, use_gpu, mixed, xla = resolve_scaling(cfg)
    st.write_text(st.join(plan.output, "config.yaml"), cfg.to_yaml(), cfg.storage)
    lineage = run_lineage(cfg, plan)
    tracked = mlflow_runs.start_run(cfg, plan.output, tags=tracking_tags(plan, lineage))
    try:
        return _run_training(cfg, plan, lease, own_ray, started, workers, use_gpu, mixed, xla, lineage, tracked,
                             export)
    except BaseException:
        mlflow_runs.fail_run(tracked)
        raise


def run_lineage(cfg: Config, plan: TrainPlan) -> dict:
    """What made this run (pipeline.tracking.lineage)."""
    from pipeline.tracking import lineage as lin

    recipe = manifest_preprocessing_spec(cfg.data.image_size, plan.manifest)
    return lin.build(plan.data, cfg.storage, recipe_version=recipe.get("version"), parent=plan.parent)


def tracking_tags(plan: TrainPlan, lineage: dict) -> dict:
    from pipeline.tracking import lineage as lin
    from pipeline.tracking.mlflow_runs import TAG_PREFIX

    commit = lineage["code"]["commit"]
    tags = {f"{TAG_PREFIX}data": plan.data, f"{TAG_PREFIX}data_manifest_sha256": lineage["data"]["manifest_sha256"],
            f"{TAG_PREFIX}code_version": commit or lin.code_version(), f"{TAG_PREFIX}output": plan.output,
            f"{TAG_PREFIX}recipe_version": lineage["recipe_version"]}
    tags.update({f"{TAG_PREFIX}{k}_version": v for k, v in lineage["libraries"].items()})
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if plan.parent:
        tags[f"{TAG_PREFIX}parent"] = plan.parent["reference"]
    return tags


def _run_training(cfg: Config, plan: TrainPlan, lease, own_ray: bool, started: float, workers: int, use_gpu: bool,
                  mixed: bool, xla: bool, lineage: dict, tracked: Optional[dict], export=None) -> dict:
    import ray

    from pipeline.tracking import mlflow_runs
    log.info(
        "train: %d classes, %d train / %d validation images, %d worker(s)%s%s",
        len(plan.manifest["classes"]), plan.manifest["splits"]["train"]["num_examples"],
        plan.manifest["splits"]["validation"]["num_examples"], workers,
        ", GPU" if use_gpu else ", CPU", " (resuming)" if plan.resuming else "",
    )
    storage_path, storage_fs = ray_storage(plan.output, cfg)
    finished = finished_checkpoint(cfg, plan.output, storage_path, storage_fs) if plan.resuming else None
    if finished is not None:
        # Killed after training, while publishing: nothing is left to train, so
        # no worker group is started; the last checkpoint is published again.
        checkpoint, state = finished
        log.info("train: every epoch is in the last checkpoint (%s); publishing it", checkpoint.path.rsplit("/", 1)[-1])
    else:
        last = last_checkpoint_state(cfg, plan.output) if plan.resuming else None
        if last is not None:
            check_resume_batch(cfg, plan.output, last[1], expected_global_batch(cfg, workers, use_gpu))
        ensure_placeable(cfg, workers, use_gpu, own_ray)
        if lease is not None:
            lease.check()
        checkpoint, state = _fit(cfg, plan, workers, use_gpu, mixed, xla, storage_path, storage_fs, tracked), None
    check_training_failure(cfg, plan.output, checkpoint)
    if lease is not None:
        lease.check()
    train_seconds = time.time() - started

    finalize = ray.remote(finalize_run).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
    outputs = ray.get(finalize.remote(cfg, plan.manifest, plan.data, plan.output, checkpoint))
    if state is not None:
        outputs.update(resumed=True, resumed_from={"phase_index": state["phase_index"], "epoch": state["epoch"],
                                                   "training_done": True})
    maybe_fault("published")
    if lease is not None:
        lease.check()
    registered = None
    if cfg.registry.uri:
        registered = register_and_gate(cfg, plan, outputs["metrics"], use_gpu, lineage)
    mlflow_runs.finish_run(tracked, cfg, plan.output, history=outputs["history"], metrics=outputs["metrics"],
                           scaling=outputs["scaling"])
    elapsed = time.time() - started
    summary = {
        "job": "train",
        "data": plan.data,
        "output": plan.output,
        "model": st.join(plan.output, MODEL_FILE),
        "classes": plan.manifest["classes"],
        "workers": workers,
        "use_gpu": use_gpu,
        "scaling": outputs["scaling"],
        "rescales": outputs.get("rescales", []),
        "resumed": outputs["resumed"],
        "resumed_from": outputs["resumed_from"],
        "epochs": len(outputs["history"]),
        "metrics": {k: outputs["metrics"][k] for k in ("examples", "accuracy", "top_k", "top_k_accuracy", "macro_f1",
                                                         "skipped_records")},
        "bn_statistics_recomputed": outputs["bn_batches"],
        "train_seconds": round(train_seconds, 1),
        "elapsed_s": round(elapsed, 1),
        "images_per_s": outputs["images_per_s"],
        "min_val_accuracy": cfg.train.min_val_accuracy,
        "mixed_precision": mixed,
        "xla": xla,
        "registry": registered,
        "lineage": lineage,
        "mlflow": tracked,
        "outputs": {name: st.join(plan.output, name) for name in outputs["files"]},
        "history": outputs["history"],
    }
    if export is not None:
        summary["export"] = export(plan.output)
    st.write_json(st.join(plan.output, SUMMARY_FILE), summary, cfg.storage)
    return summary


def _fit(cfg: Config, plan: TrainPlan, workers: int, use_gpu: bool, mixed: bool, xla: bool, storage_path,
         storage_fs, tracked: Optional[dict] = None):
    """Ray Train's TensorflowTrainer over the worker group; its last checkpoint."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from pipeline.training.worker import train_loop_per_worker

    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "manifest": plan.manifest,
            "data": plan.data,
            "output": plan.output,
            "mixed_precision": mixed,
            "xla": xla,
            "tracking": tracked,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001
        raise JobFailed(f"training failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    return result.checkpoint


# Ray Train's record of the checkpoints it registered, in the run's checkpoint
# folder: its latest one is what a new trainer resumes from.
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def last_checkpoint_state(cfg: Config, output: str) -> Optional[tuple[str, dict]]:
    """(name, loop state) of the checkpoint a new trainer would resume from,
    from Ray Train's own record; None when there is none or it cannot be read."""
    from pipeline.training.worker import STATE_FILE

    try:
        snapshot = st.read_json(st.join(output, CHECKPOINTS, RAY_CHECKPOINT_SNAPSHOT), cfg.storage)
        name = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        state = st.read_json(st.join(output, CHECKPOINTS, name, STATE_FILE), cfg.storage)
        int(state["phase_index"]), int(state["epoch"])
    except Exception:  # noqa: BLE001 - no snapshot yet, another layout: the trainer decides
        return None
    return name, state


def finished_checkpoint(cfg: Config, output: str, storage_path: str, storage_fs):
    """(the checkpoint a new trainer would resume from, its loop state) when
    that state leaves nothing to train under ``cfg`` (every epoch of every
    enabled phase done, or training stopped on purpose); None otherwise, or
    when that cannot be told (a trainer then resumes as usual)."""
    import ray.train

    last = last_checkpoint_state(cfg, output)
    if last is None:
        return None
    name, state = last
    index, epoch = int(state["phase_index"]), int(state["epoch"])
    # As the training loop walks the phases after a restore.
    left = [i for i, (_, phase) in enumerate(cfg.train.phases()) if i > index or (i == index and epoch < phase.epochs)]
    if left and not state.get("failure"):
        return None
    path = "/".join([storage_path.rstrip("/"), CHECKPOINTS, name])
    return ray.train.Checkpoint(path, filesystem=storage_fs), state


def check_training_failure(cfg: Config, output: str, checkpoint) -> None:
    """Raise JobFailed when the workers stopped training on purpose (too many
    undecodable records), naming the shards and source files."""
    from pipeline.training.worker import BAD_RECORDS, STATE_FILE

    with checkpoint.as_directory() as folder:
        state = json.load(open(os.path.join(folder, STATE_FILE)))
    if not state.get("failure"):
        return
    folder = st.join(output, BAD_RECORDS)
    bad = []
    for name in sorted(_list_names(folder, cfg)):
        bad.extend(st.read_json(st.join(folder, name), cfg.storage))
    where = "; ".join(f"{b['shard']} record {b['record']} ({b['source']})" for b in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise JobFailed(f"{state['failure']}: {where}{more} (all listed in {folder}/)")


def _list_names(uri: str, cfg: Config) -> list[str]:
    fs, path = st.get_fs(uri, cfg.storage)
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def register_and_gate(cfg: Config, plan: TrainPlan, metrics: dict, use_gpu: bool,
                      lineage: Optional[dict] = None) -> dict:
    """Register the run as a new version, score it and the current production
    version now on the same validation shards, and promote it if the gate
    passes and production is still the version it was compared against."""
    import ray

    from pipeline import registry as reg

    uri, name = cfg.registry.uri, cfg.registry.name
    version = reg.register_run(uri, name, plan.output, cfg.storage, metrics=metrics, data=plan.data,
                               lineage=lineage)
    task = ray.remote(evaluate_models).options(num_cpus=1, num_gpus=1 if use_gpu else 0)

    def accuracies(folders: list[str]) -> list[float]:
        return [m["accuracy"] for m in ray.get(task.remote(cfg, plan.manifest, plan.data, folders))]

    outcome = reg.gate(uri, name, version["version"], cfg.storage, evaluate=accuracies,
                       tolerance=cfg.registry.tolerance, min_val_accuracy=cfg.train.min_val_accuracy)
    log.info("registry: %s#%s version %s %s (%s)", uri, name, version["version"],
             "promoted" if outcome["promoted"] else "not promoted", outcome["reason"])
    if outcome["promoted"]:
        from pipeline.tracking.mlflow_runs import set_production_alias

        outcome["mlflow_alias"] = set_production_alias(cfg, uri, name, version["version"],
                                                       reg.version_uri(uri, name, version["version"]))
    return outcome


def evaluate_models(cfg: Config, manifest: dict, data: str, model_uris: list[str]) -> list[dict]:
    """Ray task: metrics of each model (in inference mode) on the same split,
    each read with its own recipe (``preprocessing.json``)."""
    from pipeline.artifact import load_artifact
    from pipeline.training.evaluate import evaluate

    out = []
    for uri in model_uris:
        artifact = load_artifact(uri, cfg.storage)
        out.append(evaluate(artifact.model, cfg, manifest, data, labels=artifact.labels, recipe=artifact.recipe))
    return out


def finalize_run(cfg: Config, manifest: dict, data: str, output: str, checkpoint) -> dict:
    """Ray task: evaluate the final checkpoint in inference mode on the whole
    validation split and publish the run directory's artifacts."""
    import numpy as np

    from pipeline.data import input as inp
    from pipeline.training import model as mdl
    from pipeline.training import reports
    from pipeline.training.evaluate import evaluate, split_stream
    from pipeline.training.worker import STATE_FILE, WEIGHTS_FILE

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    classes = manifest["classes"]
    size = cfg.data.image_size
    with st.local_scratch() as scratch:
        ckpt = checkpoint.to_directory(os.path.join(scratch, "ckpt"))
        state = json.load(open(os.path.join(ckpt, STATE_FILE)))
        model = mdl.build_model(len(classes), size, cfg.model.model_copy(update={"weights": "none"}))
        mdl.restore_verified(model, os.path.join(ckpt, WEIGHTS_FILE), with_optimizer=False)

        recompute = cfg.train.recompute_bn_stats
        if recompute == "auto":
            recompute = cfg.model.weights == "none"
        bn_batches = 0
        if recompute:
            # Shuffled, unaugmented training images, as in inference.
            stream = split_stream(cfg, manifest, data, "train", training=True)
            ds = inp.make_dataset(stream, image_size=size, batch_size=cfg.data.batch_size, training=True, aug=None,
                                  shuffle_buffer=cfg.data.shuffle_buffer, read_parallelism=cfg.data.read_parallelism)
            batches = (images for images, _ in ds.take(cfg.train.bn_stats_batches))
            try:
                bn_batches = mdl.recompute_bn_statistics(model, batches)
                stream.check()
            finally:
                stream.cache.close()
            log.info("recomputed BatchNorm statistics over %d training batches", bn_batches)
        metrics = evaluate(model, cfg, manifest, data)
        history = state["history"]

        out = os.path.join(scratch, "out")
        os.makedirs(out)
        mdl.save_model(model, os.path.join(out, MODEL_FILE))
        _dump(os.path.join(out, LABELS_FILE), classes)
        _dump(os.path.join(out, PREPROCESSING_FILE),
              manifest_preprocessing_spec(size, manifest))
        _dump(os.path.join(out, "history.json"), _history_by_phase(history))
        _dump(os.path.join(out, "metrics.json"), metrics)
        reports.plot_training(history, os.path.join(out, "training.png"))
        reports.plot_confusion(metrics, os.path.join(out, "confusion.png"))
        # tensorboard/: written live by training rank 0 (pipeline.tracking.tensorboard).
        files = []
        for root, _, names in os.walk(out):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), out)
                st.publish_file(os.path.join(root, name), st.join(output, rel), cfg.storage)
                files.append(rel)
    speeds = [h["images_per_s"] for h in history if h.get("images_per_s")]
    return {
        "metrics": metrics,
        "history": history,
        "resumed": state.get("resumed_from") is not None,
        "resumed_from": state.get("resumed_from"),
        "bn_batches": bn_batches,
        "scaling": state.get("scaling"),
        "rescales": [{k: v for k, v in r.items()} for r in state.get("rescales") or []],
        "images_per_s": round(float(np.median(speeds)), 2) if speeds else None,
        "files": sorted(f for f in files if not f.startswith("tensorboard/")) + ["tensorboard/"],
    }


def _history_by_phase(history: list[dict]) -> dict:
    out: dict = {}
    for entry in history:
        out.setdefault(entry["phase"], []).append({k: v for k, v in entry.items() if k != "phase"})
    return out


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_quality_gate(cfg: Config, summary: dict) -> Optional[str]:
    """A message when ``train.min_val_accuracy`` is set and missed."""
    target = cfg.train.min_val_accuracy
    acc = summary["metrics"]["accuracy"]
    if target is not None and acc < target:
        return f"validation accuracy {acc:.4f} is below train.min_val_accuracy {target}"
    return None
