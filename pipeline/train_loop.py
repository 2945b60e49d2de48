"""The per-worker training loop run by Ray Train's TensorflowTrainer.

Each worker builds and compiles the model inside MultiWorkerMirroredStrategy
(mirrored over its local GPUs, collective across workers), reads its own shards,
and runs the two phases. After every epoch rank 0 writes a checkpoint (weights
+ the loop state: phase, epoch, history, early-stopping counters) and every rank
calls ``ray.train.report``; a restarted worker group resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import tf_keras as keras

from pipeline import storage as st
from pipeline.config import Config
from pipeline.faults import maybe_fault

log = logging.getLogger(__name__)

# TensorFlow checkpoint format: variables are matched through the object graph,
# so the trainable flags of the phase that saved them do not matter (HDF5
# weights are ordered trainable-first and would not load across phases).
WEIGHTS_FILE = "weights/model"
STATE_FILE = "state.json"


@dataclass
class LoopState:
    phase_index: int = 0  # index into the list of enabled phases
    epoch: int = 0  # epochs completed in that phase
    history: list = field(default_factory=list)
    best_val_loss: Optional[float] = None
    wait: int = 0  # epochs without val_loss improvement in this phase
    resumed_from: Optional[dict] = None


def stage_files(uris: list[str], cache_dir: Optional[str], storage) -> list[str]:
    """Local copies of shard files (reused across restarts on the same node)."""
    root = cache_dir or os.path.join(tempfile.gettempdir(), "inception-ray-cache")
    os.makedirs(root, exist_ok=True)
    out = []
    for uri in uris:
        if st.is_local(uri) and os.path.exists(uri.replace("file://", "")):
            out.append(uri.replace("file://", ""))
            continue
        name = hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + os.path.basename(uri)
        local = os.path.join(root, name)
        if not os.path.exists(local):
            fs, path = st.get_fs(uri, storage)
            tmp = f"{local}.tmp-{os.getpid()}"
            fs.get_file(path, tmp)
            os.replace(tmp, local)
        out.append(local)
    return out


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


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import tensorflow as tf

    from pipeline import input as inp
    from pipeline import model as mdl

    cfg: Config = config["cfg"]
    manifest, data_uri = config["manifest"], config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tf.get_logger().setLevel(logging.ERROR)  # per-step collective chatter

    if config["mixed_precision"]:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.data.batch_size * replicas
    worker_batch = global_batch // world

    shards = {s: [st.join(data_uri, x["file"]) for x in manifest["splits"][s]["shards"]] for s in ("train", "validation")}
    local = {s: stage_files(shards[s], cfg.data.cache_dir, cfg.storage) for s in shards}
    aug = cfg.augment.model_dump()
    seed = None if cfg.data.seed is None else cfg.data.seed + rank

    train_assign = inp.assign_shards(len(local["train"]), rank, world)
    train_ds = inp.make_dataset(
        local["train"], assignment=train_assign, image_size=cfg.data.image_size, batch_size=worker_batch,
        training=True, aug=aug, shuffle_buffer=cfg.data.shuffle_buffer, seed=seed,
    )
    steps = inp.steps_per_epoch(manifest["splits"]["train"]["num_examples"], global_batch)
    val_ds, val_steps = None, None
    if local["validation"]:
        val_assign = inp.assign_shards(len(local["validation"]), rank, world)
        val_ds = inp.make_dataset(
            local["validation"], assignment=val_assign, image_size=cfg.data.image_size,
            batch_size=worker_batch, training=False, repeat=True,
        )
        val_steps = inp.steps_per_epoch(manifest["splits"]["validation"]["num_examples"], global_batch)

    state = LoopState()
    weights_file = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        ckpt_dir = checkpoint.to_directory(tempfile.mkdtemp(prefix="inception-ray-restore-"))
        state = LoopState(**json.load(open(os.path.join(ckpt_dir, STATE_FILE))))
        weights_file = os.path.join(ckpt_dir, WEIGHTS_FILE)
        state.resumed_from = {"phase_index": state.phase_index, "epoch": state.epoch}
        if rank == 0:
            log.info("resuming from checkpoint: phase %d, %d epochs done", state.phase_index, state.epoch)

    no_top = None
    if cfg.model.weights not in ("imagenet", "none") and weights_file is None:
        no_top = fetch_to_local(cfg.model.weights, cfg.storage, ".h5")
    with strategy.scope():
        model = mdl.build_model(len(manifest["classes"]), cfg.data.image_size, cfg.model, weights_file=no_top)
        if weights_file:
            model.load_weights(weights_file).expect_partial()
        elif cfg.model.init_from:
            donor = fetch_to_local(cfg.model.init_from, cfg.storage, ".keras")  # resolved by the driver
            mdl.warm_start(model, donor)

    weights = class_weights(cfg, manifest)
    phases = cfg.train.phases()
    for index, (name, phase) in enumerate(phases):
        if index < state.phase_index:
            continue
        if index > state.phase_index:
            state.phase_index, state.epoch, state.best_val_loss, state.wait = index, 0, None, 0
        if state.epoch >= phase.epochs:
            continue
        with strategy.scope():
            trainable = mdl.set_phase(model, name, getattr(phase, "unfreeze_after", "mixed8"))
            mdl.compile_for(model, phase, top_k=min(cfg.train.top_k, len(manifest["classes"])), jit_compile=config["xla"])
        if rank == 0:
            log.info("phase %s: %d epochs, %d trainable base layers, global batch %d (%d replicas), %d steps/epoch",
                     name, phase.epochs, trainable, global_batch, replicas, steps)
        reporter = Reporter(name, index, phase.epochs, state, cfg, rank, global_batch * steps, model)
        model.fit(
            train_ds,
            epochs=phase.epochs,
            initial_epoch=state.epoch,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_steps=val_steps,
            class_weight=weights,
            callbacks=[reporter],
            verbose=0,
        )


class Reporter(keras.callbacks.Callback):
    """Per-epoch line, early stopping whose counters survive a restart, and a
    checkpoint + ``ray.train.report`` after every epoch."""

    def __init__(self, phase, phase_index, epochs, state, cfg, rank, images, model):
        super().__init__()
        self.phase, self.phase_index, self.epochs = phase, phase_index, epochs
        self.state, self.cfg, self.rank, self.images = state, cfg, rank, images
        self._model_ref = model
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        _on_epoch_end(self, epoch, logs or {})


def _on_epoch_end(cb, epoch: int, logs: dict) -> None:
    import ray.train

    seconds = time.time() - cb._started
    entry = {"phase": cb.phase, "epoch": epoch + 1}
    for key in ("loss", "accuracy", "top_k_accuracy", "val_loss", "val_accuracy", "val_top_k_accuracy"):
        if key in logs:
            entry[key] = float(logs[key])
    entry["images_per_s"] = round(cb.images / seconds, 2) if seconds > 0 else None
    entry["seconds"] = round(seconds, 2)
    state = cb.state
    state.history.append(entry)
    state.epoch = epoch + 1

    patience = cb.cfg.train.early_stopping_patience
    stop = False
    if patience and "val_loss" in entry:
        if state.best_val_loss is None or entry["val_loss"] < state.best_val_loss - 1e-4:
            state.best_val_loss, state.wait = entry["val_loss"], 0
        else:
            state.wait += 1
            stop = state.wait >= patience
    if stop:
        cb._model_ref.stop_training = True
        state.epoch = cb.epochs  # the phase is over; a resume moves on
        entry["early_stopped"] = True

    if cb.rank == 0:
        log.info(_epoch_line(entry, cb.epochs))
    metrics = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
    metrics.update(phase_index=cb.phase_index, phase=cb.phase)
    with tempfile.TemporaryDirectory(prefix="inception-ray-ckpt-") as tmp:
        # Every rank saves: reading mirrored / sync-on-read variables is a
        # collective under MultiWorkerMirroredStrategy, so a rank-0-only save
        # would wait forever for the others. Only rank 0's copy is reported.
        cb._model_ref.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        checkpoint = None
        if cb.rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
    maybe_fault(f"epoch-{len(state.history)}")


def _epoch_line(e: dict, epochs: int) -> str:
    parts = [f"{e['phase']} epoch {e['epoch']}/{epochs}:"]
    for key, label in (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_acc"), ("val_top_k_accuracy", "val_top_k")):
        if key in e:
            parts.append(f"{label} {e[key]:.4f}")
    parts.append(f"| {e['images_per_s']} img/s, {e['seconds']:.1f}s")
    if e.get("early_stopped"):
        parts.append("| early stop")
    return " ".join(parts)
