"""``make gpu-check``: the GPU training path on the GPUs of this machine.

    python -m tests.gpu_check [--steps N] [--image-size 299] [--batch-size 32]

Trains InceptionV3 for a few steps as a training worker does: the
MultiWorkerMirroredStrategy over every visible GPU (NCCL), mixed precision
(bfloat16 where the GPUs support it, else float16), XLA, steps_per_execution,
and the worker's input (500x375 JPEG records, uint8 out of tf.data,
augmentation in the train step). Then checkpoints, restores into a new model
(verified, optimizer included) and checks that the restored model predicts
the same. Prints images/s and, when nvidia-smi is present, GPU utilisation
and memory sampled during the timed steps.

Without a visible GPU it prints one line saying it skipped and exits 0.
``--allow-cpu`` runs it on the CPU anyway (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time


def gpu_samples(stop: threading.Event, out: list, every_s: float = 0.5) -> None:
    """nvidia-smi utilisation (%) and memory (MiB) per GPU, until ``stop``."""
    while not stop.is_set():
        try:
            text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=10).stdout
            out.append([tuple(float(v) for v in line.split(",")) for line in text.strip().splitlines()])
        except (OSError, ValueError, subprocess.SubprocessError):
            return
        stop.wait(every_s)


def bf16_capable(gpus) -> bool:
    import tensorflow as tf

    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if tuple(capability) < (8, 0):
            return False
    return bool(gpus)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tests.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="timed steps (after the warm-up)")
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch-size", type=int, default=32, help="per replica (GPU)")
    parser.add_argument("--steps-per-execution", type=int, default=16)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is visible")
    args = parser.parse_args(argv)

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        print("gpu-check: SKIPPED: no GPU visible to TensorFlow on this machine (nothing was run)")
        return 0

    import numpy as np

    from pipeline.config import ModelConfig, PhaseConfig, StorageConfig
    from pipeline.data import input as inp
    from pipeline.data.shard_stream import ShardCache, ShardRef, ShardStream
    from pipeline.training import model as mdl
    from pipeline.training.worker import collective_implementation, configure_gpus
    from tests.photos import write_photo_shard

    n_gpus = configure_gpus()
    policy = "mixed_bfloat16" if (bf16_capable(gpus) or not gpus) else "mixed_float16"
    mdl.set_precision(policy)
    implementation = collective_implementation("auto", n_gpus)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
    replicas = strategy.num_replicas_in_sync
    size, per_replica, spe = args.image_size, args.batch_size, args.steps_per_execution
    global_batch = per_replica * replicas
    steps = max(spe, args.steps // spe * spe)
    print(f"gpu-check: {n_gpus} GPUs ({', '.join(d.name for d in gpus) or 'CPU only'}), {replicas} replicas, "
          f"collective {implementation.name}, {policy}, XLA, steps_per_execution {spe}, "
          f"{size}x{size}, global batch {global_batch}", flush=True)

    tmp = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        records = max(2 * global_batch, 64)
        shard = os.path.join(tmp, "train-00000-of-00001.tfrecord")
        write_photo_shard(shard, records)
        refs = [ShardRef(shard, os.path.getsize(shard), None, records)]
        segments = inp.assign_records([records], 0, 1)
        aug = {"enabled": True, "rotation": 30.0, "width_shift": 0.2, "height_shift": 0.2, "shear": 0.2,
               "zoom": 0.2, "horizontal_flip": True}
        cache = ShardCache(os.path.join(tmp, "cache"), StorageConfig())

        def make(context):
            batch = context.get_per_replica_batch_size(global_batch)
            per_epoch = records // global_batch * global_batch
            stream = ShardStream(cache, refs, shuffle=False, repeat=True,
                                 passes=inp.epoch_passes(segments, per_epoch, 0, 0))
            return inp.train_input(stream, segments, records_per_epoch=per_epoch, first_epoch=0, seed=0, rank=0,
                                   image_size=size, batch_size=batch, aug=aug, shuffle_buffer=64,
                                   read_parallelism=1)

        data = strategy.distribute_datasets_from_function(make)
        phase = PhaseConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9)

        def new_model():
            with strategy.scope():
                model = mdl.build_model(5, size, ModelConfig(weights="none", head_units=256))
                mdl.compile_for(model, phase, top_k=1, jit_compile=True, steps_per_execution=spe)
                mdl.count_inputs(model)
                model.optimizer.build(model.trainable_variables)
            return model

        model = new_model()
        started = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=2 * spe, verbose=0)  # traces and compiles
        print(f"gpu-check: warm-up (tracing, XLA compile) {time.perf_counter() - started:.1f}s", flush=True)

        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=gpu_samples, args=(stop, samples), daemon=True)
        if shutil.which("nvidia-smi"):
            sampler.start()
        started = time.perf_counter()
        history = model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0).history
        seconds = time.perf_counter() - started
        stop.set()
        images = int(history["examples"][0])
        loss = float(history["loss"][0])
        print(f"gpu-check: {steps} steps, {images} images in {seconds:.2f}s: {images / seconds:.1f} images/s "
              f"({images / seconds / max(1, n_gpus):.1f} per GPU), loss {loss:.3f}", flush=True)
        if samples:
            busy = samples[len(samples) // 4:] or samples  # past the first quarter: steady state
            for g in range(len(busy[0])):
                util = [s[g][0] for s in busy if len(s) > g]
                mem = [s[g][1] for s in busy if len(s) > g]
                print(f"gpu-check: GPU {g}: utilisation mean {np.mean(util):.0f}% (min {min(util):.0f}%), "
                      f"memory up to {max(mem):.0f} MiB", flush=True)
        elif gpus:
            print("gpu-check: nvidia-smi not found: no utilisation figures", flush=True)
        if not np.isfinite(loss):
            print("gpu-check: FAILED: the loss is not finite")
            return 1

        path = os.path.join(tmp, "ckpt", "model")
        model.save_weights(path)
        restored = new_model()
        with strategy.scope():
            verified = mdl.restore_verified(restored, path, with_optimizer=True)
        probe = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
        same = np.array_equal(model.predict(probe, verbose=0), restored.predict(probe, verbose=0))
        print(f"gpu-check: checkpoint restored and verified ({verified['variables']} variables, optimizer step "
              f"{int(restored.optimizer.iterations.numpy())}); predictions {'identical' if same else 'DIFFER'}",
              flush=True)
        cache.close()
        if not same:
            print("gpu-check: FAILED: the restored model predicts otherwise")
            return 1
        print("gpu-check: OK")
        return 0
    finally:
        mdl.set_precision("float32")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
