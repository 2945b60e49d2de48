"""Start-up notices are hidden; everything else written to stderr is kept."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.runtime import native_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796257811.950480   15433 port.cc:153] oneDNN custom operations are on.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
]
CUINIT = "E0000 00:00:1796257821.649468   15433 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error"
REAL = ["E0000 00:00:1.0 1 op_kernel.cc:1] a real error", "W0000 00:00:1.0 1 x.cc:1] a warning",
        "Traceback (most recent call last):"]


def test_notices_are_dropped_and_everything_else_kept(capfd):
    with native_logs.filtered_stderr():
        os.write(2, ("\n".join(NOTICES + REAL + [CUINIT]) + "\n").encode())
    err = capfd.readouterr().err
    assert err.splitlines() == REAL + ([CUINIT] if native_logs.has_nvidia_driver() else [])


def test_ray_worker_output_is_filtered_line_by_line():
    got = []
    handler = native_logs._FilteredWorkerLogs(got.append)
    handler({"pid": 1, "is_err": True, "lines": NOTICES + ["Failed to query Ray Train Controller actor state. "
                                                            "State API may be temporarily unavailable."]})
    assert got == []
    handler({"pid": 1, "is_err": True, "lines": [NOTICES[0], REAL[0]]})
    assert got == [{"pid": 1, "is_err": True, "lines": [REAL[0]]}]


def run_python(code: str, **env) -> str:
    """stderr of ``code`` in a new process, with TensorFlow's oneDNN on (the
    default users get; the test session turns it off) so that its notice shows."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", **env}).stderr


def test_importing_tensorflow_through_the_package_is_quiet_and_verbose_brings_it_back():
    """With oneDNN on (as users run; the test session turns it off, so no other
    test can see its notice): the notice is printed, and hidden unless verbose."""
    code = "import pipeline, tensorflow as tf, sys; tf.constant(1) + 1; print('after', file=sys.stderr)"
    loud = run_python(code, INCEPTION_RAY_VERBOSE="1")
    assert "absl::InitializeLog" in loud and "oneDNN custom operations are on" in loud, loud  # it does appear
    assert loud.strip().endswith("after")
    quiet = run_python(code, INCEPTION_RAY_VERBOSE="0")
    assert "oneDNN" not in quiet, quiet
    assert quiet.strip().splitlines() == ["after"], quiet


def test_a_job_processes_stderr_is_filtered_by_another_process_that_outlives_a_crash():
    """What the job wrote before it died, a crash report included, still comes
    out (the filter is a separate process); the notices do not."""
    payload = ("\n".join(NOTICES + REAL + [CUINIT]) + "\n").encode()
    code = ("import os, sys\n"
            "from pipeline.runtime import native_logs\n"
            "native_logs.filter_process_stderr()\n"
            f"os.write(2, {payload!r})\n"
            "print('from python', file=sys.stderr)\n"
            "os._exit(7)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "INCEPTION_RAY_VERBOSE": "0"})
    assert proc.returncode == 7
    assert proc.stderr.splitlines() == REAL + ([CUINIT] if native_logs.has_nvidia_driver() else []) + ["from python"]
