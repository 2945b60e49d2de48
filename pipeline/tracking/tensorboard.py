"""Live TensorBoard scalars, written by training rank 0 while it trains.

RUN/tensorboard/train and RUN/tensorboard/validation hold the event files:
per epoch (step: the epoch counted over both phases) ``epoch_loss``,
``epoch_accuracy``, ``epoch_top_k_accuracy`` (train and validation),
``learning_rate`` and ``images_per_s``; every ``train.tensorboard_every_steps``
training steps (step: the optimizer step counted over both phases)
``batch_loss``, ``batch_accuracy`` (the epoch's running means), ``learning_rate``
and ``images_per_s``. On a local disk the writer writes into the run directory;
elsewhere into a local folder whose files are uploaded after every epoch. A
restarted worker writes new event files beside the old ones (TensorBoard
reads them together)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable

import tf_keras as keras

from pipeline import storage as st
from pipeline.config import StorageConfig

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
EPOCH_METRICS = ("loss", "accuracy", "top_k_accuracy")


class LiveBoard:
    """Rank 0's TensorBoard writers for one training attempt."""

    def __init__(self, output: str, storage: StorageConfig, *, every_steps: int, steps_per_epoch: int,
                 global_batch: int, learning_rate: Callable[[], float]):
        import tensorflow as tf

        self._tf = tf
        self.target, self.storage = st.join(output, TENSORBOARD_DIR), storage
        self.local = st.is_local(output)
        self.logdir = self.target.replace("file://", "") if self.local else tempfile.mkdtemp(prefix="inception-ray-tb-")
        self.every, self.steps, self.global_batch = max(1, int(every_steps)), steps_per_epoch, global_batch
        self.learning_rate = learning_rate
        self.writers = {name: tf.summary.create_file_writer(os.path.join(self.logdir, name))
                        for name in ("train", "validation")}

    def _scalar(self, writer: str, tag: str, value, step: int) -> None:
        with self.writers[writer].as_default():
            self._tf.summary.scalar(tag, value, step=step)

    def callback(self, epoch_offset: int) -> "BatchScalars":
        """The batch hook of one phase's ``model.fit`` (``epoch_offset``: epochs of the phases before it)."""
        return BatchScalars(self, epoch_offset)

    def epoch(self, step: int, entry: dict) -> None:
        """Epoch ``step`` (1-based over both phases) is done: its scalars, then the files reach the run directory."""
        for metric in EPOCH_METRICS:
            for writer, key in (("train", metric), ("validation", f"val_{metric}")):
                if entry.get(key) is not None:
                    self._scalar(writer, f"epoch_{metric}", float(entry[key]), step)
        for key in ("learning_rate", "images_per_s"):
            if entry.get(key) is not None:
                self._scalar("train", f"epoch_{key}", float(entry[key]), step)
        self.sync()

    def sync(self) -> None:
        """Flush, and upload the event files when the run directory is not local."""
        for writer in self.writers.values():
            writer.flush()
        if self.local:
            return
        try:
            fs, root = st.get_fs(self.target, self.storage)
            for folder, _, names in os.walk(self.logdir):
                for name in names:
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, self.logdir).replace(os.sep, "/")
                    fs.put_file(path, f"{root.rstrip('/')}/{rel}")
        except Exception as exc:  # noqa: BLE001 - never fails training; the next epoch uploads again
            log.warning("tensorboard: upload to %s failed: %s", self.target, st.describe_error(exc))

    def close(self) -> None:
        self.sync()
        for writer in self.writers.values():
            writer.close()


class BatchScalars(keras.callbacks.Callback):
    """Every ``every_steps`` training steps: the logs' loss and accuracy, the
    learning rate and images/s. The logs stay tensors (``_supports_tf_logs``):
    no host sync per step, one every ``every_steps`` steps, when they are written."""

    def __init__(self, board: LiveBoard, epoch_offset: int):
        super().__init__()
        self._supports_tf_logs = True
        self.board, self.offset = board, epoch_offset
        self._epoch = 0
        self._mark, self._mark_time = 0, 0.0  # the step last written (or before the epoch's first), and when

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._mark, self._mark_time = (self.offset + epoch) * self.board.steps, time.time()

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1 the hook sees every k-th step only.
        board = self.board
        step = (self.offset + self._epoch) * board.steps + batch + 1
        if step // board.every == self._mark // board.every:
            return
        now = time.time()
        logs = logs or {}
        for key in ("loss", "accuracy"):
            if key in logs:
                board._scalar("train", f"batch_{key}", logs[key], step)
        board._scalar("train", "batch_learning_rate", board.learning_rate(), step)
        if now > self._mark_time:
            rate = (step - self._mark) * board.global_batch / (now - self._mark_time)
            board._scalar("train", "batch_images_per_s", rate, step)
        board.writers["train"].flush()
        self._mark, self._mark_time = step, now
