"""Shared fixtures: one Ray instance for the whole session, and a real S3-protocol
server (moto's server mode) on 127.0.0.1. Hypothesis profiles: "ci" (the
default) tests the same examples on every run; "fuzz" (`make fuzz`) draws new
random ones, many more."""

from __future__ import annotations

import os
import re
import threading

import pytest
from hypothesis import HealthCheck, settings

# A fixed set of examples per test (derived from the test itself), and no example
# database, so that `make test` passes or fails the same way on every machine.
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# `make fuzz`: random examples, many of them; failures are saved and replayed.
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")), derandomize=False,
                          deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
# --hypothesis-profile NAME (pytest) overrides this.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Before Ray starts, so that its worker processes inherit them.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)
# Ray's per-node metrics agent gathers process statistics every few seconds, for
# dashboards these tests never look at: CPU the tests need.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# oneDNN's CPU kernels are set up per layer shape on first use: on runs of a few
# steps, as here, that costs more than they save (a quarter of a training
# process's CPU time). Users' CPU runs keep TensorFlow's default;
# tests/test_native_logs.py turns it back on to see its start-up notice.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            # Idle worker processes are kept (up to 6, for 10 minutes) instead of
            # Ray's default (as many as CPUs, the rest stopped after a second), so
            # that the many short jobs of these tests reuse workers that have
            # imported TensorFlow already: each score job otherwise starts its
            # decode and predictor processes again (about 3 s each here).
            _system_config={"num_workers_soft_limit": 6, "idle_worker_killing_time_threshold_ms": 600_000},
            logging_level="WARNING",
            runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                                      "TF_ENABLE_ONEDNN_OPTS": os.environ["TF_ENABLE_ONEDNN_OPTS"]}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def learnable_shards(ray_session, tmp_path_factory):
    """Prepared shards of 3 demo classes x 40 images: enough for a from-scratch
    model to learn well above chance in a few epochs. Returns (shards, images)."""
    from jobs import prepare as prepare_job
    from jobs._cli import run
    from pipeline.data import demo_data

    root = tmp_path_factory.mktemp("learnable")
    demo_data.generate(str(root / "images"), per_class=40, size=80, classes=["circle", "square", "stripes"])
    data = str(root / "shards")
    assert run(prepare_job.main, ["--src", str(root / "images"), "--dst", data]) == 0
    return data, root / "images"


# Test files by how long they take (longest first; the rest follow in their
# usual order). `make test` runs files in two processes (pytest-xdist
# --dist loadfile --no-loadscope-reorder), each taking the next file when it is
# free: the longest first, so that no long file starts last while the other
# process sits idle.
LONGEST_FIRST = ["test_registry.py", "test_distributed.py", "test_faults.py", "test_tracking.py", "test_score.py",
                 "test_score_scale.py", "test_flaky_storage.py", "test_submit.py", "test_model.py",
                 "test_score_lease.py", "test_score_outputs.py", "test_gpu_path.py", "test_odd_keys.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback; AWS_ENDPOINT_URL points at it for the session."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself (a port picked beforehand
    # could be taken by another process before the server binds it).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket; returns (s3fs filesystem, bucket name)."""
    import s3fs

    name = "test-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    yield fs, name
    fs.rm(name, recursive=True)


@pytest.fixture
def atomic_moto(s3_endpoint, monkeypatch):
    """Conditional writes on moto as atomic as on AWS S3 (races on S3 need it).

    moto's server checks a PutObject's If-Match / If-None-Match and then
    stores the object in two steps, so two conditional writes racing in its
    threads can both pass; AWS S3 applies the condition and the write as one.
    One lock around moto's PutObject handler makes it behave like S3."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    original = S3Response.put_object

    def put_object(self, *args, **kwargs):
        with lock:
            return original(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", put_object)
    return s3_endpoint
