"""Jobs run unchanged under `ray job submit` against a real cluster started
with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.data import demo_data

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on free ports; (its process, dashboard address)."""
    port, dash, agent = free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         # The agent's default port (52365) is taken by any other Ray on this
         # machine, such as the test session's own; an agent that cannot bind
         # exits and the head then answers every submission with
         # "No available agent to submit job".
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}"],
        stdout=open(temp / "head.log", "a"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    return head, f"http://127.0.0.1:{dash}"


@pytest.fixture(scope="module")
def cluster():
    """A separate single-node cluster; stopped by killing its own process group
    (never `ray stop`, which would stop every Ray on the machine)."""
    # Short: Ray's socket paths (TEMP/session_.../sockets/...) must stay under
    # the 107 characters of a Unix socket path, which pytest's temp folders
    # (one more level per xdist worker) can exceed.
    temp = Path(tempfile.mkdtemp(prefix="ir-head-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A job's `python` is the cluster's: here this virtualenv's, as on the
    # cluster image the image's.
    env["PATH"] = os.pathsep.join([BIN, env.get("PATH", "")])
    # Ray 2.60 clusters require a token; this one gets its own.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head, address = start_head(temp, env)
    starts = 1
    # Ready means a job can be submitted and run, not only that the dashboard
    # answers: the job agent comes up after the dashboard.
    deadline = time.time() + 180
    while time.time() < deadline:
        if head.poll() is not None and starts < 3:
            # `ray start --block` exits when a Ray process dies, e.g. one whose
            # port another process took after it was picked: new ports.
            os.killpg(head.pid, signal.SIGKILL)
            head, address = start_head(temp, env)
            starts += 1
        probe = subprocess.run([os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--",
                                "python", "-c", "pass"], capture_output=True, text=True, env=env, timeout=120)
        if probe.returncode == 0:
            break
        time.sleep(3)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        logs = "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                       for p in [temp / "head.log", *sorted(temp.glob("session_latest/logs/dashboard_agent*.log"))])
        pytest.fail(f"ray start --head did not accept a job within 180 s ({starts} starts)\n{probe.stderr[-2000:]}\n{logs}")
    yield address, env
    # SIGKILL at once: a throwaway cluster has nothing to save, and on SIGTERM
    # `ray start --block` takes over 30 s to wind down.
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(30)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> str:
    """infra/runtime_env.yaml as users submit with it (working dir excludes, env
    vars), less its `pip` list. Under a virtualenv such as this test's, Ray
    builds a pip runtime env by copying the whole virtualenv (gigabytes, most of
    a minute); on the cluster image every pin is installed and the env is a
    thin layer over it. tests/test_infra.py checks the pip list itself: the
    pins of pyproject.toml, accepted by Ray's RuntimeEnv."""
    import yaml

    spec = yaml.safe_load(open(os.path.join(ROOT, "infra", "runtime_env.yaml")))
    assert spec.pop("pip")["packages"]
    path = tmp_path_factory.mktemp("runtime-env") / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def submit(cluster, runtime_env: str, *job: str, timeout=900) -> subprocess.CompletedProcess:
    address, env = cluster
    return subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--working-dir", ".",
         "--runtime-env", runtime_env, "--", "python", "-m", *job],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


# Start-up notices that must not show in a successful job's output (pipeline.runtime.native_logs).
NOTICES = ("E0000", "cuInit", "absl::InitializeLog", "I0000", "oneDNN", "cudart_stub",
           "Failed to query Ray Train Controller", "has constructor arguments in the object store")


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    for notice in NOTICES:
        assert notice not in proc.stdout + proc.stderr, (notice, proc.stdout[-3000:])


def test_prepare_train_and_score_through_ray_job_submit(cluster, runtime_env, tmp_path):
    images = tmp_path / "images"
    demo_data.generate(str(images), per_class=6, size=80, classes=["circle", "square"])
    shards, run_dir, scores = tmp_path / "shards", tmp_path / "run", tmp_path / "scores"

    proc = submit(cluster, runtime_env, "jobs.prepare", "--src", str(images), "--dst", str(shards))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(shards / "manifest.json"))["accepted"] == 12
    assert_quiet(proc)

    proc = submit(cluster, runtime_env, "jobs.train", "--data", str(shards), "--output", str(run_dir),
                  "--set", "data.image_size=75", "--set", "data.batch_size=4", "--set", "model.weights=none",
                  "--set", "model.head_units=8", "--set", "train.transfer.epochs=1",
                  "--set", "train.finetune.epochs=0", "--set", "train.bn_stats_batches=1",
                  "--set", "train.top_k=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "transfer epoch 1/1" in proc.stdout  # per-epoch progress streams back
    assert_quiet(proc)
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["classes"] == ["circle", "square"] and (run_dir / "model.keras").exists()

    proc = submit(cluster, runtime_env, "jobs.score", "--model", str(run_dir), "--images", str(images),
                  "--output", str(scores), "--batch-size", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pyarrow.parquet as pq

    assert_quiet(proc)
    table = pq.read_table(str(scores))
    assert table.num_rows == 12 and set(table.column("label").to_pylist()) <= {"circle", "square"}


def test_a_failing_job_makes_ray_job_submit_fail(cluster, runtime_env, tmp_path):
    proc = submit(cluster, runtime_env, "jobs.train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "run"),
                  timeout=300)
    assert proc.returncode != 0
    assert "no manifest.json" in proc.stdout + proc.stderr
