"""The per-worker training loop run by Ray Train's TensorflowTrainer.

Each worker builds and compiles the model inside MultiWorkerMirroredStrategy
(mirrored over its local GPUs, collective across workers), reads its own shards,
and runs the two phases. After every epoch rank 0 writes a checkpoint (weights
+ the loop state: phase, epoch, history, early-stopping counters) and every rank
calls ``ray.train.report``; a restarted worker group resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import tf_keras as keras

from pipeline.data import input as inp
from pipeline import storage as st
from pipeline.config import Config
from pipeline.runtime.faults import maybe_fault
from pipeline.data.shard_stream import ShardCache, ShardRef, ShardStream, shard_refs, stream_window

log = logging.getLogger(__name__)

# TensorFlow checkpoint format: variables are matched through the object graph,
# so the trainable flags of the phase that saved them do not matter (HDF5
# weights are ordered trainable-first and would not load across phases).
WEIGHTS_FILE = "weights/model"
STATE_FILE = "state.json"
BAD_RECORDS = "bad_records"


@dataclass
class LoopState:
    phase_index: int = 0  # index into the list of enabled phases
    epoch: int = 0  # epochs completed in that phase
    history: list = field(default_factory=list)
    best_val_loss: Optional[float] = None
    best_epoch: Optional[int] = None  # the phase's epoch (1-based) with the best val_loss
    wait: int = 0  # epochs without val_loss improvement in this phase
    resumed_from: Optional[dict] = None
    # Batch sizes and learning rates the run started with (batch_scaling), kept
    # across resumes: a resume at another global batch is refused by the driver
    # unless train.rescale_on_resume, and then recorded in ``rescales``.
    scaling: Optional[dict] = None
    rescales: list = field(default_factory=list)
    failure: Optional[str] = None  # set when training must stop (bad records)


def worker_cache(cfg: Config, name: str) -> ShardCache:
    """A shard cache in its own folder under ``data.cache_dir``, by name (a
    restarted worker of the same rank on the same node finds its shards again)."""
    root = cfg.data.cache_dir or os.path.join(tempfile.gettempdir(), "inception-ray-cache")
    return ShardCache(os.path.join(root, name), cfg.storage,
                      max_bytes=int(cfg.data.cache_max_gb * 1e9), concurrency=cfg.data.download_concurrency)


def shard_stream(cache: ShardCache, refs: list[ShardRef], cfg: Config, *, training: bool,
                 seed: Optional[int]) -> ShardStream:
    """Every shard of ``refs`` for one process (evaluation, the gate):
    shuffled endless passes for training, one pass in order otherwise."""
    lookahead, keep_open = stream_window(cfg.data.download_concurrency, cfg.data.read_parallelism)
    return ShardStream(cache, refs, shuffle=training, repeat=training, seed=seed,
                       lookahead=lookahead, keep_open=keep_open)


def segment_stream(cache: ShardCache, refs: list[ShardRef], segments, cfg: Config, *, passes,
                   repeat: bool) -> ShardStream:
    """The shards of ``segments`` (one per segment, in segment order): read per
    ``passes`` (epoch -> segment indices) when training, one pass in order otherwise."""
    lookahead, keep_open = stream_window(cfg.data.download_concurrency, cfg.data.read_parallelism)
    return ShardStream(cache, [refs[seg.shard] for seg in segments], shuffle=False, repeat=repeat,
                       lookahead=lookahead, keep_open=keep_open, passes=passes)


def fetch_to_local(uri: str, storage, suffix: str = "") -> str:
    """A local path for ``uri`` (downloaded to a temp file when remote)."""
    if st.is_local(uri):
        return uri.replace("file://", "")
    fd, local = tempfile.mkstemp(suffix=suffix or os.path.splitext(uri)[1])
    os.close(fd)
    fs, path = st.get_fs(uri, storage)
    fs.get_file(path, local)
    return local


def class_weights(cfg: Config, manifest: dict) -> Optional[dict[int, float]]:
    classes = manifest["classes"]
    spec = cfg.train.class_weights
    if spec == "none":
        return None
    if spec == "balanced":
        counts = manifest["splits"]["train"]["class_counts"]
        total = sum(counts.values())
        return {i: (total / (len(classes) * counts[c]) if counts[c] else 0.0) for i, c in enumerate(classes)}
    unknown = sorted(set(spec) - set(classes))
    if unknown:
        raise ValueError(f"train.class_weights names unknown classes: {', '.join(unknown)}")
    return {i: float(spec.get(c, 1.0)) for i, c in enumerate(classes)}


def batch_scaling(cfg: Config, workers: int, replicas: int, train_examples: int) -> dict:
    """Per-replica and global batch, steps per epoch, and per phase: the rule
    its optimizer scales by (``train.lr_scaling``; "auto": linear for SGD,
    sqrt for RMSprop and Adam), its learning rate after scaling with the global
    batch, and its warmup (``train.warmup_epochs``; None: automatic)."""
    from pipeline.training.model import lr_factor, lr_rule, warmup_epochs_for

    per_replica = cfg.data.batch_size
    global_batch = per_replica * replicas
    steps = inp.steps_per_epoch(train_examples, global_batch)
    reference = cfg.train.lr_reference_batch or per_replica
    ratio = global_batch / reference
    phases = {}
    for name, phase in cfg.train.phases():
        rule = lr_rule(phase.optimizer, cfg.train.lr_scaling)
        factor = lr_factor(rule, ratio)
        warmup = warmup_epochs_for(cfg.train.warmup_epochs, factor, phase.epochs)
        phases[name] = {"optimizer": phase.optimizer, "lr_rule": rule, "lr_factor": factor,
                        "base_learning_rate": phase.learning_rate, "learning_rate": phase.learning_rate * factor,
                        "warmup_epochs": warmup, "warmup_steps": int(math.ceil(warmup * steps))}
    return {"workers": workers, "replicas": replicas, "per_replica_batch": per_replica,
            "global_batch": global_batch, "steps_per_epoch": steps, "lr_scaling": cfg.train.lr_scaling,
            "lr_reference_batch": reference, "batch_ratio": ratio, "phases": phases}


def scaling_in_force(state: LoopState) -> Optional[dict]:
    """The scaling the last attempt ran with: the start's, or the last rescale's."""
    return state.rescales[-1]["scaling"] if state.rescales else state.scaling


def adopt_scaling(state: LoopState, scaling: dict, rescale_allowed: bool) -> Optional[dict]:
    """Keep the scaling the run started with in ``state``; a restored run at
    another global batch records a rescale (returned), which the driver lets
    through only with train.rescale_on_resume."""
    before = scaling_in_force(state)
    if before is None:
        state.scaling = scaling
        return None
    if before["global_batch"] == scaling["global_batch"]:
        return None
    if not rescale_allowed:
        raise RuntimeError(f"the checkpoint was trained at a global batch of {before['global_batch']}, this "
                           f"attempt runs at {scaling['global_batch']}; set train.rescale_on_resume=true")
    rescale = {"phase_index": state.phase_index, "epoch": state.epoch, "after_epochs": len(state.history),
               "from_global_batch": before["global_batch"], "to_global_batch": scaling["global_batch"],
               "scaling": scaling}
    state.rescales.append(rescale)
    return rescale


# steps_per_execution "auto": on GPUs, steps dispatched per host call.
GPU_STEPS_PER_EXECUTION = 32
# StreamCheck looks at the shard streams once per this many steps (and at
# every epoch's end): a pure host check, no device sync.
STREAM_CHECK_EVERY = 32


def configure_gpus() -> int:
    """Memory growth on every GPU this worker sees (before TensorFlow
    initialises them): a worker takes GPU memory as it needs it, so that
    workers sharing a GPU (fractional ``scaling.gpus_per_worker``) both fit.
    Returns the number of GPUs."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised (set before, in this process)
            pass
    return len(gpus)


def collective_implementation(setting: str, gpus: int):
    """``scaling.collective`` -> MultiWorkerMirroredStrategy's implementation:
    NCCL on GPUs ("auto" with GPUs, or "nccl"), else RING."""
    import tensorflow as tf

    kinds = tf.distribute.experimental.CommunicationImplementation
    if setting == "nccl" or (setting == "auto" and gpus > 0):
        if gpus == 0:
            raise ValueError("scaling.collective=nccl needs GPUs; this worker sees none (use ring or auto)")
        return kinds.NCCL
    return kinds.RING


def make_strategy(cfg: Config, gpus: int):
    """MultiWorkerMirroredStrategy with the configured collective: mirrored over
    this worker's GPUs, collective across workers."""
    import tensorflow as tf

    options = tf.distribute.experimental.CommunicationOptions(
        implementation=collective_implementation(cfg.scaling.collective, gpus))
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def precision_policy(cfg: Config, mixed_precision: bool) -> str:
    """``train.precision``, else mixed_float16 when ``train.mixed_precision``
    (resolved by the driver: on with GPUs) is on, else float32."""
    if cfg.train.precision is not None:
        return cfg.train.precision
    return "mixed_float16" if mixed_precision else "float32"


def steps_per_execution(cfg: Config, gpus: int, steps: int) -> int:
    """``train.steps_per_execution`` ("auto": 32 with GPUs, 1 on CPUs), at
    most the steps of an epoch."""
    setting = cfg.train.steps_per_execution
    if setting == "auto":
        setting = GPU_STEPS_PER_EXECUTION if gpus else 1
    return max(1, min(int(setting), steps))


def training_callbacks(streams: list, reporter, every: int = STREAM_CHECK_EVERY, board=None,
                       epoch_offset: int = 0) -> list:
    """The callbacks of the worker's ``model.fit``: none of them makes
    tf_keras turn a step's logs into numbers (a host sync per step); rank 0's
    TensorBoard scalars (``board``) read them once every
    ``train.tensorboard_every_steps`` steps."""
    out = [StreamCheck(streams, every=every), reporter]
    if board is not None:
        out.append(board.callback(epoch_offset))
    return out


def epoch_trackers(config: dict, cfg: Config, rank: int, *, steps: int, global_batch: int, learning_rate) -> list:
    """Rank 0's live tracking: TensorBoard scalars in RUN/tensorboard, and the
    MLflow run's per-epoch metrics when the driver started one. Other ranks: none."""
    if rank != 0:
        return []
    from pipeline.tracking.tensorboard import LiveBoard

    trackers = [LiveBoard(config["output"], cfg.storage, every_steps=cfg.train.tensorboard_every_steps,
                          steps_per_epoch=steps, global_batch=global_batch, learning_rate=learning_rate)]
    if config.get("tracking"):
        from pipeline.tracking.mlflow_runs import EpochLogger

        trackers.append(EpochLogger(config["tracking"]))
    return trackers


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import tensorflow as tf

    from pipeline.training import model as mdl

    cfg: Config = config["cfg"]
    manifest, data_uri = config["manifest"], config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tf.get_logger().setLevel(logging.ERROR)  # per-step collective chatter

    gpus = configure_gpus()
    mdl.set_precision(precision_policy(cfg, config["mixed_precision"]))
    strategy = make_strategy(cfg, gpus)
    n_train = manifest["splits"]["train"]["num_examples"]
    scaling = batch_scaling(cfg, world, strategy.num_replicas_in_sync, n_train)
    global_batch, steps = scaling["global_batch"], scaling["steps_per_epoch"]
    per_execution = steps_per_execution(cfg, gpus, steps)
    if rank == 0:
        log.info("%d GPUs per worker, collective %s, precision %s, %d steps per execution", gpus,
                 collective_implementation(cfg.scaling.collective, gpus).name,
                 precision_policy(cfg, config["mixed_precision"]), per_execution)
    # Unseeded runs take a seed from their output folder: a resumed run (the
    # same folder) reads and augments exactly as the first attempt would have.
    seed = cfg.data.seed if cfg.data.seed is not None else zlib.crc32(config["output"].encode())
    weights = class_weights(cfg, manifest)
    table = [weights.get(i, 1.0) for i in range(len(manifest["classes"]))] if weights else None

    # Each worker streams only the shards of its own records, fetched ahead of the reader.
    cache = worker_cache(cfg, f"rank-{rank}")
    refs = {split: shard_refs(manifest, data_uri, split) for split in ("train", "validation")}
    assign = {split: inp.assign_records([r.examples for r in refs[split]], rank, world) for split in refs}
    local_replicas = max(1, strategy.num_replicas_in_sync // world)
    worker_batch = cfg.data.batch_size * local_replicas
    records_per_epoch = steps * worker_batch  # this worker's part of every epoch
    if rank == 0 and n_train < global_batch:
        log.warning("%d training images, fewer than one global batch of %d: an epoch reads some twice",
                    n_train, global_batch)

    streams: list[ShardStream] = []  # checked after every step (ShardStream.check)

    def training_data(first_epoch: int):
        """The distributed training input from global epoch ``first_epoch`` on."""
        def make(context: tf.distribute.InputContext) -> tf.data.Dataset:
            segments = assign["train"]
            stream = segment_stream(cache, refs["train"], segments, cfg,
                                    passes=inp.epoch_passes(segments, records_per_epoch, seed, rank), repeat=True)
            streams.append(stream)
            return inp.train_input(
                stream, segments, records_per_epoch=records_per_epoch, first_epoch=first_epoch, seed=seed,
                rank=rank, image_size=cfg.data.image_size,
                batch_size=context.get_per_replica_batch_size(global_batch), aug=cfg.augment.model_dump(),
                shuffle_buffer=cfg.data.shuffle_buffer, read_parallelism=cfg.data.read_parallelism,
                class_weights=table, cpu_threads=cfg.data.cpu_threads, device_augment=gpus > 0)
        return strategy.distribute_datasets_from_function(make)

    val_ds, val_steps = None, None
    n_val = manifest["splits"]["validation"]["num_examples"]
    if refs["validation"] and n_val:
        # One pass over this worker's validation records per epoch, batched per
        # replica; every worker runs the same number of steps (padded batches).
        val_steps = max(1, math.ceil(math.ceil(n_val / world) / worker_batch))
        val_weight = val_steps * global_batch / n_val

        def validation_input(context: tf.distribute.InputContext) -> tf.data.Dataset:
            segments = assign["validation"]
            stream = segment_stream(cache, refs["validation"], segments, cfg, passes=None, repeat=False)
            streams.append(stream)
            return inp.validation_input(stream, segments, image_size=cfg.data.image_size,
                                        batch_size=context.get_per_replica_batch_size(global_batch),
                                        batches=val_steps * local_replicas, weight=val_weight,
                                        read_parallelism=cfg.data.read_parallelism,
                                        cpu_threads=cfg.data.cpu_threads)

        val_ds = strategy.distribute_datasets_from_function(validation_input)

    state = LoopState()
    ckpt_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        ckpt_dir = checkpoint.to_directory(tempfile.mkdtemp(prefix="inception-ray-restore-"))
        state = LoopState(**json.load(open(os.path.join(ckpt_dir, STATE_FILE))))
        state.resumed_from = {"phase_index": state.phase_index, "epoch": state.epoch}
        if rank == 0:
            log.info("resuming from checkpoint: phase %d, %d epochs done", state.phase_index, state.epoch)
    rescale = adopt_scaling(state, scaling, cfg.train.rescale_on_resume)
    if rescale and rank == 0:
        log.info("rescaled on resume: global batch %d -> %d (train.rescale_on_resume)",
                 rescale["from_global_batch"], rescale["to_global_batch"])

    phases = cfg.train.phases()
    top_k = min(cfg.train.top_k, len(manifest["classes"]))
    trackers = epoch_trackers(config, cfg, rank, steps=steps, global_batch=global_batch,
                              learning_rate=lambda: mdl.learning_rate_at(model.optimizer))
    board = next((t for t in trackers if hasattr(t, "callback")), None)
    freeze_bn = mdl.bn_frozen(cfg.model)

    def enter_phase(index: int) -> int:
        name, phase = phases[index]
        lr = scaling["phases"][name]
        with strategy.scope():
            trainable = mdl.set_phase(model, name, getattr(phase, "unfreeze_after", "mixed8"), freeze_bn=freeze_bn)
            mdl.compile_for(model, phase, top_k=top_k, jit_compile=config["xla"],
                            learning_rate=lr["learning_rate"], warmup_steps=lr["warmup_steps"],
                            steps_per_execution=per_execution)
            model.optimizer.build(model.trainable_variables)
        return trainable

    no_top = None
    if cfg.model.weights not in ("imagenet", "none") and ckpt_dir is None:
        no_top = fetch_to_local(cfg.model.weights, cfg.storage, ".h5")
    if cfg.data.seed is not None:
        # Right before the variables are made: the same initial weights on every
        # worker and in every run, whatever ops were created before.
        keras.utils.set_random_seed(cfg.data.seed)
    with strategy.scope():
        model = mdl.build_model(len(manifest["classes"]), cfg.data.image_size, cfg.model, weights_file=no_top)
        mdl.count_inputs(model)
        if ckpt_dir is None and cfg.model.init_from:
            donor = fetch_to_local(cfg.model.init_from, cfg.storage, ".keras")  # resolved by the driver
            mdl.warm_start(model, donor)
    entered = None
    resumed_best = None
    if ckpt_dir is not None:
        # Inside a phase, its optimizer (slots, step count) is restored too; at a
        # phase boundary only the model, since the next phase starts afresh.
        mid_phase = state.phase_index < len(phases) and state.epoch < phases[state.phase_index][1].epochs
        if mid_phase:
            enter_phase(state.phase_index)
            entered = state.phase_index
        best_file = os.path.join(ckpt_dir, BEST_WEIGHTS_FILE)
        if mid_phase and state.wait > 0 and os.path.exists(best_file + ".index"):
            # The phase's best epoch came before the last checkpoint: its
            # weights, for an early stop still to come.
            with strategy.scope():
                model.load_weights(best_file).expect_partial()
                resumed_best = model.get_weights()
        with strategy.scope():
            verified = mdl.restore_verified(model, os.path.join(ckpt_dir, WEIGHTS_FILE), with_optimizer=mid_phase)
        state.resumed_from.update(verified=verified, optimizer_restored=mid_phase)
        if rank == 0:
            log.info("restored and verified %d model variables%s", verified["variables"],
                     f" and the optimizer ({verified})" if mid_phase else "")

    for index, (name, phase) in enumerate(phases):
        if state.failure or index < state.phase_index:
            continue
        if index > state.phase_index:
            state.phase_index, state.epoch, state.best_val_loss, state.wait = index, 0, None, 0
            state.best_epoch = None
        if state.epoch >= phase.epochs:
            continue
        trainable = enter_phase(index) if entered != index else None
        if rank == 0:
            log.info("phase %s: %d epochs%s, global batch %d (%d x %d replicas), learning rate %.3g, "
                     "%d steps/epoch", name, phase.epochs,
                     "" if trainable is None else f", {trainable} trainable base layers", global_batch,
                     cfg.data.batch_size, scaling["replicas"], scaling["phases"][name]["learning_rate"], steps)
        reporter = Reporter(name, index, phase.epochs, state, cfg, rank, model,
                            bad_records=lambda: find_bad_records(cache, refs, assign, cfg, config["output"], rank),
                            best_weights=resumed_best if index == state.phase_index else None, trackers=trackers)
        resumed_best = None
        first_epoch = sum(p.epochs for _, p in phases[:index]) + state.epoch  # counted over both phases
        model.fit(
            training_data(first_epoch),
            epochs=phase.epochs,
            initial_epoch=state.epoch,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_steps=val_steps,
            callbacks=training_callbacks(streams, reporter, board=board,
                                         epoch_offset=sum(p.epochs for _, p in phases[:index])),
            verbose=0,
        )
        for stream in streams:  # the data may have run out because a shard could not be had
            stream.check()
    if board is not None:
        board.close()
    cache.close()


def find_bad_records(cache: ShardCache, refs: dict, assign: dict, cfg: Config, output: str, rank: int) -> list[dict]:
    """This worker's undecodable records (shard, position, source), written to
    ``<output>/bad_records/rank-<rank>.json`` for the driver's message."""
    import tensorflow as tf

    from pipeline.data.shards import SOURCE

    bad = []
    for split in ("train", "validation"):
        for segment in assign[split]:
            ref = refs[split][segment.shard]
            records = inp.read_records(cache.local_path(ref)).skip(segment.start).take(segment.count)
            for position, record in enumerate(records, start=segment.start):
                try:
                    inp.decode_example(record)
                except tf.errors.InvalidArgumentError as exc:
                    example = tf.train.Example.FromString(record.numpy())
                    source = example.features.feature[SOURCE].bytes_list.value
                    bad.append({"shard": ref.name, "record": position,
                                "source": source[0].decode("utf-8", "replace") if source else None,
                                "error": str(exc).strip().splitlines()[0][:200]})
    st.write_json(st.join(output, BAD_RECORDS, f"rank-{rank}.json"), bad, cfg.storage)
    return bad


class StreamCheck(keras.callbacks.Callback):
    """Fails training after a shard could not be had (missing, changed,
    unreadable), with that error: never a shorter epoch or split in silence.
    It looks at the streams (host state, never the logs) once ``every`` steps
    and at the end of every epoch and validation pass; it says it takes the
    logs as tensors (``_supports_tf_logs``), so tf_keras does not wait for
    each step to finish to convert them."""

    def __init__(self, streams: list[ShardStream], every: int = 1):
        super().__init__()
        self.streams, self.every = streams, max(1, int(every))
        self._supports_tf_logs = True
        self._last = -1

    def _check(self, *_args) -> None:
        for stream in self.streams:
            stream.check()

    def _on_batch_end(self, batch, logs=None) -> None:
        # With steps_per_execution > 1 the hook sees every k-th step only.
        if batch // self.every != self._last // self.every:
            self._check()
        self._last = batch

    def on_epoch_begin(self, epoch, logs=None):
        self._last = -1

    def on_test_begin(self, logs=None):
        self._last = -1

    on_train_batch_end = on_test_batch_end = _on_batch_end
    on_epoch_end = on_test_end = _check


BEST_WEIGHTS_FILE = "best/model"


class EarlyStop:
    """Early stopping on val_loss that ends the phase with the weights of its
    best epoch. The counters live in the loop state (they survive a restart);
    the best weights are kept in memory and, while later epochs are worse,
    written beside each checkpoint (``BEST_WEIGHTS_FILE``) so that a restarted
    worker group still ends on them."""

    def __init__(self, patience: Optional[int], state: LoopState, best_weights: Optional[list] = None):
        self.patience, self.state, self.best_weights = patience, state, best_weights

    def update(self, model, epoch: int, val_loss: Optional[float]) -> bool:
        """After ``epoch`` (1-based): True when training must stop, the best
        weights then already put back into ``model``."""
        state = self.state
        if not self.patience or val_loss is None:
            return False
        if state.best_val_loss is None or val_loss < state.best_val_loss - 1e-4:
            state.best_val_loss, state.best_epoch, state.wait = val_loss, epoch, 0
            self.best_weights = model.get_weights()
            return False
        state.wait += 1
        if state.wait < self.patience:
            return False
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
        return True

    def save_best(self, model, path: str) -> None:
        """Write the best weights to ``path`` (a checkpoint of this epoch is
        not the best one); the model keeps its own weights."""
        if self.state.wait == 0 or self.best_weights is None:
            return
        current = model.get_weights()
        model.set_weights(self.best_weights)
        try:
            model.save_weights(path)
        finally:
            model.set_weights(current)


class Reporter(keras.callbacks.Callback):
    """Per-epoch line, early stopping whose counters survive a restart, the
    bad-record limit, and a checkpoint + ``ray.train.report`` after every epoch."""

    def __init__(self, phase, phase_index, epochs, state, cfg, rank, model, bad_records, best_weights=None,
                 trackers=()):
        super().__init__()
        self.trackers = list(trackers)  # rank 0's live TensorBoard and MLflow logging, after each checkpoint
        self.early = EarlyStop(cfg.train.early_stopping_patience, state, best_weights)
        self.phase, self.phase_index, self.epochs = phase, phase_index, epochs
        self.state, self.cfg, self.rank = state, cfg, rank
        self._model_ref = model
        self._bad_records = bad_records
        self._started = 0.0
        self._validation_s, self._test_started = 0.0, None

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()
        self._validation_s, self._test_started = 0.0, None

    def on_test_begin(self, logs=None):
        self._test_started = time.time()

    def on_test_end(self, logs=None):
        if self._test_started is not None:
            self._validation_s += time.time() - self._test_started
            self._test_started = None

    def on_epoch_end(self, epoch, logs=None):
        _on_epoch_end(self, epoch, logs or {})


COUNTED = ("examples", "replica_batch", "skipped_records", "val_examples", "val_skipped_records")


def _on_epoch_end(cb, epoch: int, logs: dict) -> None:
    import ray.train

    from pipeline.training.model import learning_rate_at

    seconds = time.time() - cb._started
    entry = {"phase": cb.phase, "epoch": epoch + 1}
    for key in ("loss", "accuracy", "top_k_accuracy", "val_loss", "val_accuracy", "val_top_k_accuracy"):
        if key in logs:
            entry[key] = float(logs[key])
    # Counted inside the train and test steps, over every replica of every worker.
    for key in COUNTED:
        if key in logs:
            value = float(logs[key])
            entry[key] = int(round(value)) if key != "replica_batch" else round(value, 3)
    # Training time only: the validation pass is timed apart.
    train_s = seconds - cb._validation_s
    entry["images_per_s"] = round(entry.get("examples", 0) / train_s, 2) if train_s > 0 else None
    entry["validation_seconds"] = round(cb._validation_s, 2)
    # Read from the optimizer: its schedule (warmup, scaled rate) at the step
    # this epoch's last update used.
    optimizer = cb._model_ref.optimizer
    entry["learning_rate"] = learning_rate_at(optimizer)
    entry["optimizer_step"] = int(getattr(optimizer, "inner_optimizer", optimizer).iterations.numpy())
    entry["seconds"] = round(seconds, 2)
    state = cb.state
    state.history.append(entry)
    state.epoch = epoch + 1

    if cb.early.update(cb._model_ref, epoch + 1, entry.get("val_loss")):
        cb._model_ref.stop_training = True
        state.epoch = cb.epochs  # the phase is over; a resume moves on
        entry["early_stopped"] = True
        entry["restored_best_epoch"] = state.best_epoch if cb.early.best_weights is not None else None
    skipped = entry.get("skipped_records", 0) + entry.get("val_skipped_records", 0)
    read = entry.get("examples", 0) + entry.get("val_examples", 0) + skipped
    limit = cb.cfg.data.max_bad_record_fraction
    if skipped and skipped > limit * read:
        # Every worker sees the same summed counts, so all stop together; each
        # names its own bad records for the driver's message.
        cb._bad_records()
        state.failure = (f"{skipped} of {read} records in {cb.phase} epoch {epoch + 1} could not be decoded, "
                         f"over data.max_bad_record_fraction={limit}")
        cb._model_ref.stop_training = True

    if cb.rank == 0:
        log.info(_epoch_line(entry, cb.epochs))
    metrics = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
    metrics.update(phase_index=cb.phase_index, phase=cb.phase)
    with tempfile.TemporaryDirectory(prefix="inception-ray-ckpt-") as tmp:
        # Every rank saves: reading mirrored / sync-on-read variables is a
        # collective under MultiWorkerMirroredStrategy, so a rank-0-only save
        # would wait forever for the others. Only rank 0's copy is reported.
        cb._model_ref.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        if not entry.get("early_stopped"):
            cb.early.save_best(cb._model_ref, os.path.join(tmp, BEST_WEIGHTS_FILE))
        checkpoint = None
        if cb.rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
    for tracker in cb.trackers:  # the epoch's scalars reach TensorBoard and MLflow as it ends
        try:
            tracker.epoch(len(state.history), entry)
        except Exception as exc:  # noqa: BLE001 - tracking never fails training
            log.warning("%s: epoch %d not written: %s", type(tracker).__name__, len(state.history), exc)
    maybe_fault(f"epoch-{len(state.history)}")


def _epoch_line(e: dict, epochs: int) -> str:
    parts = [f"{e['phase']} epoch {e['epoch']}/{epochs}:"]
    for key, label in (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_acc"), ("val_top_k_accuracy", "val_top_k")):
        if key in e:
            parts.append(f"{label} {e[key]:.4f}")
    if e.get("learning_rate") is not None:
        parts.append(f"lr {e['learning_rate']:.3g}")
    parts.append(f"| {e.get('examples', 0)} images, {e['images_per_s']} img/s, {e['seconds']:.1f}s")
    if e.get("skipped_records") or e.get("val_skipped_records"):
        parts.append(f"| {e.get('skipped_records', 0) + e.get('val_skipped_records', 0)} undecodable records skipped")
    if e.get("early_stopped"):
        parts.append("| early stop")
    return " ".join(parts)
