"""One typed config for every job.

Override order (lowest first): built-in defaults < YAML file < ``--set key=value``
< command-line flags. Unknown keys and wrong types are a :class:`UsageError`
naming the dotted key, raised before any cluster work starts. Secrets are
``SecretStr`` so that dumping the config (``to_yaml``) redacts them.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from pipeline.errors import UsageError
from pipeline.storage.settings import StorageConfig

REDACTED = "**********"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    """``address`` None means: RAY_ADDRESS or a local cluster already running,
    else a local Ray started for this job."""

    address: Optional[str] = None


class PrepareConfig(_Section):
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    shard_size_mb: float = Field(100.0, gt=0)
    # A split with enough images gets at least this many shards, so that
    # readers (and training workers) can parallelise over them.
    min_shards: int = Field(4, ge=1)
    min_examples_per_shard: int = Field(64, ge=1)
    max_side: Optional[int] = Field(None, ge=16)
    # JPEGs decoded at the largest DCT scale (1/2, 1/4, 1/8) that keeps the
    # shorter side >= this (and the longer >= max_side); such records are PNG.
    # 299: InceptionV3's input (data.image_size's default); photos under 597
    # pixels on the shorter side decode at full size as before. None: always a
    # full-size decode (recipe version 2). Training refuses a data.image_size
    # above it. Measured on real photos: accuracy unchanged within noise.
    jpeg_scale_to: Optional[int] = Field(299, ge=16)
    # PIL's own decompression-bomb threshold.
    max_pixels: int = Field(89_478_485, ge=1)
    # zlib level of the lossless PNG that prepare writes for a file whose own
    # bytes the training decoder cannot take as they are (pipeline.data.preprocess).
    png_compress_level: int = Field(1, ge=0, le=9)
    # Files fetched together from storage (concurrently on object stores).
    read_batch: int = Field(32, ge=1)


class DataConfig(_Section):
    """The training input pipeline."""

    image_size: int = Field(299, ge=75)
    # Per replica: the global batch is this times the number of replicas.
    batch_size: int = Field(32, ge=1)
    shuffle_buffer: int = Field(1000, ge=1)
    # Where each worker caches the shards it streams from object storage (None:
    # a folder under the system temp dir), and how much of them it keeps, per
    # worker: least recently used shards are evicted beyond this.
    cache_dir: Optional[str] = None
    cache_max_gb: float = Field(50.0, gt=0)
    # Shards each worker downloads at once, ahead of the reader.
    download_concurrency: int = Field(4, ge=1)
    # Shards each worker reads (interleaves) at once.
    read_parallelism: int = Field(4, ge=1)
    # Threads each worker's tf.data pipelines may use (their own thread pool:
    # the host CPU budget of the input). None: TensorFlow's default (every core).
    cpu_threads: Optional[int] = Field(None, ge=1)
    # Records that fail to decode are skipped and counted; above this fraction
    # of an epoch's records the job fails, naming the shards that hold them.
    max_bad_record_fraction: float = Field(0.001, ge=0, le=1)
    # Seeds model initialisation, shuffling and augmentation, and makes the
    # training input read records in a fixed order (None: random, and records
    # taken as the readers deliver them).
    seed: Optional[int] = None


class AugmentConfig(_Section):
    """Training-only augmentation, one affine resample per image, with
    ImageDataGenerator's semantics (rotation and shear in degrees)."""

    enabled: bool = True
    rotation: float = Field(30.0, ge=0, le=180)
    width_shift: float = Field(0.2, ge=0, lt=1)
    height_shift: float = Field(0.2, ge=0, lt=1)
    shear: float = Field(0.2, ge=0, lt=90)
    zoom: float = Field(0.2, ge=0, lt=1)
    horizontal_flip: bool = True


class ModelConfig(_Section):
    # "imagenet" (Keras download), "none" (random init), or a file/URI of
    # InceptionV3 no-top weights (.h5).
    weights: str = "imagenet"
    # Warm start: a previous run directory or model file; layers are matched by
    # name and skipped where shapes differ (a new class set re-initialises the head).
    init_from: Optional[str] = None
    head_units: int = Field(1024, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    # BatchNorm momentum in the base (None keeps Keras' 0.99). From-scratch runs
    # need a lower value so inference-mode statistics keep up with the weights.
    bn_momentum: Optional[float] = Field(None, gt=0, lt=1)
    # BatchNorm while fine-tuning: "frozen" keeps the base's BatchNorm layers in
    # inference mode (their statistics and scale untouched, as the Keras
    # transfer-learning guide recommends for pretrained weights), "train"
    # updates them; "auto": frozen for pretrained weights (imagenet, a weights
    # file, init_from), trained from scratch.
    bn_mode: Literal["auto", "frozen", "train"] = "auto"


class PhaseConfig(_Section):
    """Phase 1, ``transfer``: the whole base frozen, a new head trained."""

    epochs: int = Field(2, ge=0)
    optimizer: Literal["rmsprop", "sgd", "adam"] = "rmsprop"
    learning_rate: float = Field(1e-3, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class FinetuneConfig(PhaseConfig):
    """Phase 2, ``finetune``: the top inception blocks trained with a small SGD step."""

    optimizer: Literal["rmsprop", "sgd", "adam"] = "sgd"
    learning_rate: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    # Freeze everything up to and including this layer name (default: mixed8,
    # leaving the top two inception blocks trainable), or the first N layers
    # when an integer is given (the classic tutorial used 249, "172" in older
    # versions); 0 trains every layer.
    unfreeze_after: Union[int, str] = "mixed8"


class TrainConfig(_Section):
    transfer: PhaseConfig = PhaseConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    # "none", "balanced" (from manifest counts) or {class name: weight}.
    class_weights: Union[Literal["none", "balanced"], dict[str, float]] = "none"
    early_stopping_patience: Optional[int] = Field(3, ge=1)
    max_failures: int = Field(2, ge=-1)
    min_val_accuracy: Optional[float] = Field(None, ge=0, le=1)
    top_k: int = Field(5, ge=1)
    # None: on when GPUs are used.
    mixed_precision: Optional[bool] = None
    # The Keras dtype policy: float32, mixed_float16 (with loss scaling) or
    # mixed_bfloat16 (no loss scaling; A100/H100 and newer). None: follows
    # mixed_precision (mixed_float16 when on). The output layer stays float32.
    precision: Optional[Literal["float32", "mixed_float16", "mixed_bfloat16"]] = None
    xla: Optional[bool] = None
    # Training steps per call of the compiled step function (Keras
    # steps_per_execution): the host dispatches that many steps at once and
    # batch callbacks run once per call. "auto": 32 on GPUs, 1 on CPUs (capped
    # at the steps of an epoch).
    steps_per_execution: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = "auto"
    # Re-estimate BatchNorm moving statistics on training data (inference-mode
    # passes) before the final evaluation and export. "auto": when weights is none.
    recompute_bn_stats: Union[bool, Literal["auto"]] = "auto"
    # Learning rates above are for a global batch of lr_reference_batch images
    # (None: data.batch_size, i.e. one replica). With ratio = global batch /
    # reference: "linear" multiplies them by the ratio (Goyal et al., 2017),
    # "sqrt" by its square root, "none" leaves them; "auto": linear for SGD,
    # square root for the adaptive optimizers (RMSprop, Adam). docs/training.md.
    lr_scaling: Literal["auto", "linear", "sqrt", "none"] = "auto"
    lr_reference_batch: Optional[int] = Field(None, ge=1)
    # Linear warmup at the start of each phase, in epochs (fractions allowed).
    # None: automatic, per phase: a quarter of the phase's epochs, at most 5,
    # when its learning rate is scaled up more than 2x, else none.
    warmup_epochs: Optional[float] = Field(None, ge=0)
    # A resume whose global batch differs from the checkpoint's (other worker or
    # replica count, or data.batch_size) is refused unless this is true: then
    # the new batch and its scaled learning rates are used and the change is
    # recorded (state, summary.json "rescales").
    rescale_on_resume: bool = False
    # A resume whose config (training keys: docs/training.md) or data manifest
    # differs from what the run started with is refused unless this is true.
    allow_changed_resume: bool = False
    # The run directory's lease (_lease.json): a holder whose heartbeat is older
    # than this (or whose process on this machine and pid namespace is gone) may
    # be taken over.
    lease_timeout_s: float = Field(300.0, gt=0)
    # The most a job waits for the lease of a job with the same arguments (a
    # retry finding the failed attempt's) to go stale; none: that holder's
    # timeout less its heartbeat's age, plus a quarter of it and 1 s; 0: refuse.
    lease_wait_s: Optional[float] = Field(None, ge=0)
    bn_stats_batches: int = Field(20, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    # Write the serving export (SavedModel with the recipe and labels inside,
    # docs/export.md) to RUN/export/ after publishing, before summary.json marks
    # the run complete. Off by default: it loads the model once more in the
    # job's own process; `python -m jobs.export` exports any run later.
    export: bool = False
    # Rank 0 writes TensorBoard scalars (loss, accuracy, learning rate,
    # images/s) every this many training steps and at every epoch's end, into
    # RUN/tensorboard/ (uploaded after each epoch on object storage).
    tensorboard_every_steps: int = Field(50, ge=1)

    def phases(self) -> list[tuple[str, PhaseConfig]]:
        """The phases that run, in order (a phase with 0 epochs is skipped)."""
        return [(n, p) for n, p in (("transfer", self.transfer), ("finetune", self.finetune)) if p.epochs > 0]


class RegistryConfig(_Section):
    """Where ``jobs.train`` registers its run (``--registry``/``--name``) and the
    promotion gate: promote when accuracy >= production's - tolerance."""

    uri: Optional[str] = None
    name: Optional[str] = None
    tolerance: float = Field(0.0, ge=0, le=1)


class TrackingConfig(_Section):
    """Optional MLflow tracking (``pip install -e .[mlflow]``): with a tracking
    URI (this, else the MLFLOW_TRACKING_URI environment variable of the job),
    the training job logs its config, per-epoch metrics, evaluation and plots
    to an MLflow run; a resumed run continues it. With ``mlflow_model_name``,
    registry promotions and rollbacks move the alias ``mlflow_alias`` of that
    registered model in MLflow's model registry."""

    mlflow_uri: Optional[str] = None
    mlflow_experiment: str = "inception-ray"
    mlflow_model_name: Optional[str] = None
    mlflow_alias: str = "production"


class ScalingConfig(_Section):
    # None: fit the cluster found (one worker per GPU node share, else 1).
    num_workers: Optional[int] = Field(None, ge=1)
    use_gpu: Optional[bool] = None
    gpus_per_worker: float = Field(1, ge=0)
    # MultiWorkerMirroredStrategy's collective implementation: "nccl" (GPUs
    # only), "ring" (gRPC, works anywhere), "auto": NCCL when the worker sees
    # GPUs, else ring. Inside a worker the replicas of its GPUs are mirrored.
    collective: Literal["auto", "nccl", "ring"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    # glibc's MALLOC_TOP_PAD_ for training workers, in MB (0: glibc's default).
    # Iterating a tf.distribute dataset frees and regrows the heap every step;
    # the pad keeps it, which on CPU workers saves about a third of the step
    # time (BENCHMARKS.md, training section 1).
    worker_malloc_top_pad_mb: int = Field(256, ge=0)
    # On a cluster that can grow (an autoscaler), how long the job waits for
    # room for the whole worker group before it gives up (exit 1). A fixed-size
    # cluster that cannot hold the group is refused at once (exit 2).
    placement_timeout_s: float = Field(600.0, gt=0)


class ScoreConfig(_Section):
    """Batch scoring (``jobs.score``)."""

    # Images per model batch sent to a predictor actor (and per device call).
    # None: 256 when the actors have a GPU each, else 64.
    batch_size: Optional[int] = Field(None, ge=1)
    top_k: int = Field(5, ge=1)
    # Predictor actors. None: one per GPU when the cluster has GPUs, else one
    # per 8 CPUs (at least one); each CPU actor's TensorFlow uses its node's cores.
    # More than the cluster can place is refused (exit 2) before any work.
    concurrency: Optional[int] = Field(None, ge=1)
    # CPUs each predictor actor reserves: on a GPU actor, the cores that feed
    # it (fetching batches, copying them to the device), kept from decode
    # tasks. None: 1 for a CPU actor; for a GPU actor 4, or fewer when the
    # cluster has fewer CPUs than that per GPU plus one for decoding.
    cpus_per_actor: Optional[float] = Field(None, ge=0)
    # The most a job waits for all predictor actors to load the model (placed,
    # started, model loaded and compiled) before any part is scored; then it
    # exits 1 naming how many were ready.
    actor_start_timeout_s: float = Field(600.0, gt=0)
    # A part's Parquet file aims at this size (MiB): before Ray starts, the
    # job encodes rows of the first image URIs it finds (a list's head, a
    # prefix's first keys) as a part file would hold them and takes as many
    # rows per part as fit with 5% to spare, rounded down to two significant
    # digits (at 128, top 5: 3.4M rows of numbered keys, 1.9M of hashed
    # names). Parts are also the unit of work and of resume. None:
    # rows_per_file alone.
    part_mb: Optional[float] = Field(128.0, gt=0)
    # The most rows a part (one Parquet file) holds; None: as many as
    # part_mb gives. One of the two must be set.
    rows_per_file: Optional[int] = Field(None, ge=1)
    # Files read (concurrently on object stores) and decoded per CPU task call;
    # a model batch is ceil(batch_size / read_batch) such tasks.
    read_batch: int = Field(64, ge=1)
    # Larger files get an error row instead of being read.
    max_file_mb: float = Field(64.0, gt=0)
    # A read that fails for a reason of the moment (throttling, timeouts, 5xx,
    # connection or credential errors) is retried with backoff for this long;
    # then its part fails (retried as a task, then the job exits 1), never an
    # error row.
    read_retry_s: float = Field(120.0, gt=0)
    # A part whose share of error rows (files missing, too large, undecodable)
    # is above this fails the job instead of being committed. None: no limit.
    max_error_fraction: Optional[float] = Field(None, ge=0, le=1)
    # Decoded-size limit (PIL's decompression-bomb threshold by default).
    max_pixels: int = Field(89_478_485, ge=1)
    # Protocols a URI list may name besides its own and the output's (e.g. ["s3"]
    # for a local list of S3 images); local paths only when the list is local.
    uri_protocols: list[str] = Field(default_factory=list)
    # Listing tasks in flight at once (one per folder level or key range of a
    # prefix), and at most three times the cluster's CPUs: they reserve no Ray
    # CPU and wait on the object store for most of each page.
    list_concurrency: int = Field(16, ge=1)
    # A job's hold on its output: a lease whose heartbeat is older than this
    # (or whose holder process on this machine and pid namespace is gone) may
    # be taken over.
    lease_timeout_s: float = Field(300.0, gt=0)
    # The most a job waits for the lease of a job with the same arguments (a
    # retried RayJob finding the failed attempt's) to go stale; none: that
    # holder's timeout less its heartbeat's age, plus a quarter of it and 1 s;
    # 0: refuse at once.
    lease_wait_s: Optional[float] = Field(None, ge=0)
    # Progress (parts, rows/s, errors, ETA) is logged and written into
    # _summary.json this often.
    progress_every_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _part_size_given(self) -> "ScoreConfig":
        if self.part_mb is None and self.rows_per_file is None:
            raise ValueError("score.part_mb and score.rows_per_file are both null: set one (the size of a part)")
        return self


class Config(_Section):
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    prepare: PrepareConfig = PrepareConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    registry: RegistryConfig = RegistryConfig()
    score: ScoreConfig = ScoreConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _sections_are_mappings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if key in cls.model_fields and value is None:
                    raise ValueError(f"section '{key}' is empty")
        return data

    def to_dict(self, redact: bool = True) -> dict:
        """Plain dict; secrets are replaced by a fixed mask unless redact=False."""
        data = self.model_dump(mode="python")
        return _plain(data, redact)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(redact=True), sort_keys=False)


def _plain(value: Any, redact: bool) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED if redact else value.get_secret_value()
    if isinstance(value, dict):
        return {k: _plain(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, redact) for v in value]
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set expects key=value, got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {key}: value is not valid YAML ({exc.problem})") from None
    return key, value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise UsageError(f"config key '{dotted}': '{prefix}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe(error: dict) -> str:
    # Union members and validators add tags to the location ("constrained-int",
    # "literal['auto']", "function-after[...]"): not keys.
    tags = ("function-after", "function-before", "constrained-int")
    loc = ".".join(str(p) for p in error["loc"] if p not in tags and not str(p).startswith(("literal[", "function-")))
    if error["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    where = f"config key '{loc}'" if loc else "config"
    return f"{where}: {error['msg']}{shown}"


def build_config(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # One clear line: the first problem, plus how many more there are.
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(_describe(errors[0]) + more) from None


def read_config_file(path: str, storage: StorageConfig | None = None) -> dict:
    from pipeline import storage as st

    try:
        text = st.read_text(path, storage or StorageConfig())
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(
    path: Optional[str] = None,
    overrides: Union[list[str], tuple[str, ...]] = (),
    flags: Optional[dict[str, Any]] = None,
) -> Config:
    """Resolve defaults < file < ``--set`` overrides < flags (dotted keys; None
    flag values mean "not given")."""
    data: dict = {}
    if path:
        data = read_config_file(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    # Merged over the full defaults, so a partial section keeps its defaults.
    return build_config(_merge(Config().to_dict(redact=False), data))
