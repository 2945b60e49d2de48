"""Start-up notices that make a successful run look broken, kept out of sight.

TensorFlow's native libraries log through absl before anything configures it,
so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them: every process that imports
TensorFlow prints "All log messages before absl::InitializeLog()", oneDNN and
CUDA-stub notices, and, on a machine without an NVIDIA driver, an ``E0000``
"failed call to cuInit". Ray adds per-worker notices of its own.

``install()`` (run when ``pipeline`` is imported, and by Ray as the worker
process setup hook) makes the first ``import tensorflow`` of the process run
with the process's stderr (file descriptor 2) captured; when the import is
done the captured lines are written back, less the known notices:

- absl INFO lines (``I<mmdd> ...``) and the "before absl::InitializeLog" banner;
- the CPU-instructions advice that follows one of them;
- the cuInit failure, only where there is no NVIDIA driver at all.

``filter_ray_worker_logs()`` drops, from the worker output Ray forwards to the
driver, the same lines plus two notices of Ray Train's own; ``quiet_ray_data()``
leaves progress to the jobs' own lines.
Everything else, warnings and errors included, is shown as it was. Setting
``INCEPTION_RAY_VERBOSE=1`` (the jobs' ``-v``) turns all filtering off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from typing import Callable, Iterator

VERBOSE_ENV = "INCEPTION_RAY_VERBOSE"

_NOTICES = [
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(r"^I\d{4} \d\d:\d\d:\d\d"),  # absl INFO
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags"),
]
_NO_DRIVER_NOTICES = [re.compile(r"^E\d{4} .*\] failed call to cuInit: ")]
# Ray's own: Ray Train on a local Ray without the dashboard (no state API), its
# per-report bookkeeping (the job logs each epoch and checkpoint itself), and a
# core-worker note about Ray's internal actors (Ray Train's preemption watcher,
# Ray Data's map workers) that is logged at error level.
_RAY_NOTICES = [
    re.compile(r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable"),
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '.*' and ID: '[0-9a-f]+' has constructor arguments "
               r"in the object store and max_restarts > 0"),
    re.compile(r"^Sharding callback duration: \d+ microseconds"),
    re.compile(r"^Checkpoint successfully created at: Checkpoint\("),
    re.compile(r"^Reporting training result \d+: TrainingReport\("),
]


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@functools.lru_cache(maxsize=1)
def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def is_notice(line: str, *, ray: bool = False) -> bool:
    """Whether ``line`` is a known start-up notice of a healthy run."""
    patterns = _NOTICES + ([] if has_nvidia_driver() else _NO_DRIVER_NOTICES) + (_RAY_NOTICES if ray else [])
    return any(p.search(line) for p in patterns)


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there directly) and write
    the captured lines back, less the notices, when the block ends."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_notice(line)]
            if kept:
                os.write(2, "".join(kept).encode())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` like the normal path finder, and runs its import
    (and the GPU platform's start, where cuInit is called) under
    ``filtered_stderr``. Removes itself on first use."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module: Callable = spec.loader.exec_module

        def quiet_exec_module(module):
            with filtered_stderr():
                exec_module(module)
                with contextlib.suppress(Exception):
                    module.config.list_physical_devices("GPU")

        spec.loader.exec_module = quiet_exec_module
        return spec


def install() -> None:
    """Filter the start-up notices of this process's first TensorFlow import
    (a no-op when verbose or when TensorFlow is imported already)."""
    if verbose() or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowImport)]


class _FilteredWorkerLogs:
    def __init__(self, handler: Callable):
        self.handler = handler

    def __call__(self, data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not is_notice(line, ray=True)]
        if lines:
            self.handler({**data, "lines": lines})


def quiet_ray_data() -> None:
    """Ray Data's own progress (a block of lines every few seconds when the
    output is not a terminal) and start/finish notices off: the jobs log their
    own progress, one line per unit of work."""
    if verbose():
        return
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... which it then warns about.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def filter_process_stderr() -> None:
    """For a job run from the command line: this process's stderr (and that of
    the local Ray it starts, which inherits it) goes through a small filter
    process that drops the notices (``is_notice(ray=True)``) and passes
    everything else on at once. Being a separate process, it still writes out
    whatever this one wrote before dying, a crash report included."""
    if verbose():
        return
    import subprocess

    import atexit
    import subprocess

    try:
        sys.stderr.flush()
        original = os.dup(2)
        child = subprocess.Popen([sys.executable, "-u", "-c", "from pipeline.runtime.native_logs import filter_main; filter_main()"],
                                 stdin=subprocess.PIPE, stdout=original, stderr=original, close_fds=True,
                                 start_new_session=True)
    except (OSError, ValueError):
        return
    os.dup2(child.stdin.fileno(), 2)
    child.stdin.close()

    def drain() -> None:
        # Straight to the terminal again, and the filter's last lines out
        # before the shell prompt (Ray's own processes, stopped before this
        # runs, held the pipe too).
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(original, 2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)

    atexit.register(drain)


def _filter_stream(src, dst) -> None:
    for line in iter(src.readline, b""):
        if not is_notice(line.decode("utf-8", "replace"), ray=True):
            dst.write(line)
            dst.flush()


def filter_ray_worker_logs() -> None:
    """Drop the notices from the worker output Ray prints on this driver."""
    if verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # Ray moved it: the output is simply not filtered
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, _FilteredWorkerLogs(h) if name == "ray_print_logs" and not isinstance(h, _FilteredWorkerLogs) else h)
            for name, h in dispatcher.handlers
        ]


def filter_main() -> None:
    """The filter process of ``filter_process_stderr``: stdin to stdout."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the job; this ends when its input does
    _filter_stream(sys.stdin.buffer, sys.stdout.buffer)
