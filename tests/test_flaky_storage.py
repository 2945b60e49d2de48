"""Flaky object storage: prepare, train and score run through a fault-injecting
proxy in front of the S3 server (10% of requests answered ``503 SlowDown`` or
dropped without an answer) and still produce complete, correct outputs, with no
row or file lost; storage that is wrong (credentials, bucket, endpoint) ends in
exit 2 with one clear line within 30 seconds, never a hang or a stack trace."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from jobs import prepare as prepare_job
from jobs._cli import run
from pipeline.data import demo_data
from tests.faultproxy import Blackhole, FaultProxy, closed_port

pytestmark = pytest.mark.s3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FAULTPROXY_P / FAULTPROXY_KINDS / FAULTPROXY_SEED try other mixes by hand
# (e.g. FAULTPROXY_KINDS=slowdown,drop,lost FAULTPROXY_P=0.3).
FAULT_RATE = float(os.environ.get("FAULTPROXY_P", "0.1"))
KINDS = tuple(os.environ.get("FAULTPROXY_KINDS", "slowdown,drop").split(","))
# Seeded: the proxy's draws are fixed. With the default seed, rate and kinds,
# draw 6 is a drop and draw 9 a SlowDown: every job below (dozens of requests)
# meets both kinds of fault.
SEED = int(os.environ.get("FAULTPROXY_SEED", "5"))
CLASSES = ["circle", "square", "stripes"]


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, p=FAULT_RATE, seed=SEED, kinds=KINDS) as px:
        yield px


def via(px) -> list[str]:
    return ["--set", f"storage.endpoint_url={px.url}"]


def upload_images(fs, bucket: str, tmp_path, per_class: int = 5) -> tuple[str, int]:
    """Demo images written straight to the S3 server (not through the proxy)."""
    local = tmp_path / "images"
    count = demo_data.generate(str(local), per_class=per_class, size=80, classes=CLASSES)
    fs.put(str(local) + "/", f"{bucket}/raw/", recursive=True)
    return f"s3://{bucket}/raw", count


def assert_faults_met(stats: dict) -> None:
    assert stats["faults"] > 0 and all(stats[kind] > 0 for kind in KINDS), stats


# ---------------------------------------------------------------- the proxy itself


class _Echo(BaseHTTPRequestHandler):
    """Upstream for the proxy's own tests: answers with what it received (method,
    path, headers in order, body digest); ``/big`` streams 2 MiB in chunked framing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if not size:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        elif self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(32):
                block = bytes([i]) * 65536
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            self.wfile.write(b"0\r\n\r\n")
            return
        echo = json.dumps({"method": self.command, "path": self.path, "headers": list(self.headers.items()),
                           "body": hashlib.sha256(body).hexdigest()}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(echo)))
        self.send_header("ETag", '"abc"')
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(echo)

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET


@pytest.fixture
def echo_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_proxy_relays_requests_and_responses_unchanged(echo_upstream):
    body = os.urandom(300_000)
    headers = {"Host": "bucket.s3.example.com:9000", "X-Amz-Date": "20261130T000000Z",
               "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/...", "x-amz-meta-Mixed": "Case",
               "Content-Encoding": "aws-chunked", "Expect": "100-continue",
               "Accept-Encoding": "identity"}
    with FaultProxy(echo_upstream, p=0) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
        for framing in ("length", "chunked"):
            if framing == "chunked":
                pieces = (body[i:i + 50_000] for i in range(0, len(body), 50_000))
                conn.request("PUT", "/b/k?partNumber=2&uploadId=x%2Fy", body=pieces, headers=headers,
                             encode_chunked=True)
            else:
                conn.request("PUT", "/b/k?partNumber=2&uploadId=x%2Fy", body=body, headers=headers)
            resp = conn.getresponse()
            assert resp.status == 201 and resp.getheader("ETag") == '"abc"'
            seen = json.loads(resp.read())
            assert seen["method"] == "PUT" and seen["path"] == "/b/k?partNumber=2&uploadId=x%2Fy"
            assert seen["body"] == hashlib.sha256(body).hexdigest()
            sent = [(k, v) for k, v in seen["headers"] if k.lower() not in ("content-length", "transfer-encoding")]
            assert sent[: len(headers)] == list(headers.items())  # Host included, order kept
        conn.request("HEAD", "/b/k", headers={"Host": "b.example"})
        resp = conn.getresponse()
        assert resp.status == 201 and resp.read() == b""
        conn.request("GET", "/big")  # streamed back chunk by chunk, same connection
        resp = conn.getresponse()
        assert resp.read() == b"".join(bytes([i]) * 65536 for i in range(32))
        conn.close()
        stats = px.settled_stats()
    assert stats["requests"] == stats["forwarded"] == 4 and stats["faults"] == 0


def _outcomes(url: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=10)
        try:
            conn.request("GET", "/b/k")
            resp = conn.getresponse()
            data = resp.read()
            if resp.status == 503:
                assert b"<Code>SlowDown</Code>" in data
                out.append("slowdown")
            else:
                assert resp.status == 201
                out.append("ok")
        except (http.client.RemoteDisconnected, ConnectionResetError):
            out.append("drop")
        finally:
            conn.close()
    return out


def test_proxy_injects_seeded_faults_and_counts_them(echo_upstream):
    with FaultProxy(echo_upstream, p=0.3, seed=11) as px:
        first = _outcomes(px.url, 100)
        stats = px.settled_stats()
    with FaultProxy(echo_upstream, p=0.3, seed=11) as px:
        assert _outcomes(px.url, 100) == first  # seeded: the same faults in the same places
    assert stats["requests"] == 100
    assert stats["slowdown"] == first.count("slowdown") > 0 and stats["drop"] == first.count("drop") > 0
    assert stats["forwarded"] == first.count("ok") == 100 - stats["faults"]
    assert 15 <= stats["faults"] <= 45


def test_proxy_close_ends_idle_connections(echo_upstream):
    px = FaultProxy(echo_upstream, p=0).start()
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
    conn.request("GET", "/b/k")
    assert conn.getresponse().read()
    px.close()
    assert conn.sock.recv(1) == b""  # the idle keep-alive connection was closed
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", px.port), timeout=5)


# ---------------------------------------------------------------- jobs through faults


@pytest.mark.slow
def test_prepare_s3_to_s3_through_faults(ray_session, s3_bucket, proxy, tmp_path):
    from tests.test_prepare import check_shards_match_manifest

    fs, bucket = s3_bucket
    src, count = upload_images(fs, bucket, tmp_path)
    dst = f"s3://{bucket}/shards"
    code = run(prepare_job.main, ["--src", src, "--dst", dst, *via(proxy),
                                  "--set", "prepare.min_examples_per_shard=2", "--set", "prepare.read_batch=4"])
    stats = proxy.settled_stats()
    print(f"\nprepare through the proxy: {stats}")
    assert code == 0
    manifest = json.loads(fs.cat_file(f"{bucket}/shards/manifest.json"))
    # no file lost to a fault: none rejected as "cannot read", all accounted for
    assert manifest["files_seen"] == count == manifest["accepted"] and manifest["rejected"] == []
    fs.get(f"{bucket}/shards/", str(tmp_path / "got") + "/", recursive=True)
    records = check_shards_match_manifest(str(tmp_path / "got"), manifest)
    assert sorted(r["source"] for r in records) == sorted(f"s3://{p}" for p in fs.find(f"{bucket}/raw"))
    assert_faults_met(stats)


TINY = ["--set", "data.image_size=75", "--set", "data.batch_size=4", "--set", "data.shuffle_buffer=32",
        "--set", "model.weights=none", "--set", "model.head_units=16", "--set", "train.top_k=2",
        "--set", "train.early_stopping_patience=null", "--set", "train.bn_stats_batches=2",
        "--set", "scaling.num_workers=1", "--set", "train.transfer.epochs=2", "--set", "train.finetune.epochs=0"]
RUN_FILES = ["model.keras", "labels.json", "preprocessing.json", "config.yaml", "history.json", "metrics.json",
             "training.png", "confusion.png", "summary.json"]


@pytest.fixture(scope="module")
def local_shards(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("flaky-shards")
    demo_data.generate(str(root / "images"), per_class=6, size=80, classes=CLASSES)
    dst = str(root / "shards")
    assert run(prepare_job.main, ["--src", str(root / "images"), "--dst", dst,
                                  "--set", "prepare.min_examples_per_shard=3"]) == 0
    return dst


@pytest.mark.slow
def test_train_reads_shards_and_writes_run_through_faults(s3_bucket, local_shards, proxy, tmp_path):
    from jobs import train as train_job

    fs, bucket = s3_bucket
    fs.put(local_shards + "/", f"{bucket}/shards/", recursive=True)
    data, out = f"s3://{bucket}/shards", f"s3://{bucket}/runs/r1"
    cache = tmp_path / "cache"  # empty: the worker stages every shard through the proxy
    code = run(train_job.main, ["--data", data, "--output", out, *via(proxy), *TINY,
                                "--set", f"data.cache_dir={cache}"])
    stats = proxy.settled_stats()
    print(f"\ntrain through the proxy: {stats}")
    assert code == 0
    for name in RUN_FILES:
        assert fs.size(f"{bucket}/runs/r1/{name}") > 0, name
    summary = json.loads(fs.cat_file(f"{bucket}/runs/r1/summary.json"))
    assert [(h["phase"], h["epoch"]) for h in summary["history"]] == [("transfer", 1), ("transfer", 2)]
    manifest = json.loads(fs.cat_file(f"{bucket}/shards/manifest.json"))
    assert summary["metrics"]["examples"] == manifest["splits"]["validation"]["num_examples"]
    # Ray Train's own checkpoint uploads (pyarrow -> fsspec -> s3fs) went through the proxy too
    snapshot = json.loads(fs.cat_file(f"{bucket}/runs/r1/checkpoints/checkpoint_manager_snapshot.json"))
    kept = [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
    assert len(kept) == 2
    for name in kept:
        assert fs.find(f"{bucket}/runs/r1/checkpoints/{name}"), name
    # Every shard was fetched through the proxy into a worker's cache (cached
    # under its SHA-256) and verified there.
    staged = {name for folder in os.listdir(cache) for name in os.listdir(os.path.join(cache, folder))}
    for split in ("train", "validation"):
        for shard in manifest["splits"][split]["shards"]:
            assert f"{shard['sha256']}.tfrecord" in staged, (shard, staged)
    assert_faults_met(stats)
    assert stats["by_method"].get("POST", 0) > 0  # multipart uploads (the model) included


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A completed run directory with a small untrained 75x75 classifier (tests.small_model)."""
    from tests.small_model import write_run

    return write_run(tmp_path_factory.mktemp("flaky-model") / "run", CLASSES)


@pytest.mark.slow
def test_score_s3_images_to_s3_parquet_through_faults(ray_session, s3_bucket, tiny_model_dir, proxy, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import score as score_job
    from pipeline.scoring.commit import SUMMARY_NAME

    fs, bucket = s3_bucket
    fs.put(tiny_model_dir + "/", f"{bucket}/model/", recursive=True)
    src, count = upload_images(fs, bucket, tmp_path, per_class=6)
    out = f"s3://{bucket}/scores"
    code = run(score_job.main, ["--model", f"s3://{bucket}/model", "--images", src, "--output", out, *via(proxy),
                                "--rows-per-file", "4", "--batch-size", "4", "--set", "score.read_batch=4"])
    stats = proxy.settled_stats()
    print(f"\nscore through the proxy: {stats}")
    assert code == 0
    uris = sorted(f"s3://{p}" for p in fs.find(f"{bucket}/raw"))
    parts = sorted(fs.glob(f"{bucket}/scores/*.parquet"))
    folders = {u.rsplit("/", 1)[0] for u in uris}
    per_folder = [sum(u.rsplit("/", 1)[0] == f for u in uris) for f in folders]
    # Full parts of 4 per folder, the last few of every folder packed together.
    assert len(parts) == sum(n // 4 for n in per_folder) + -(-sum(n % 4 for n in per_folder) // 4)
    table = pa.concat_tables(pq.read_table(p, filesystem=fs) for p in parts)
    assert sorted(table["uri"].to_pylist()) == uris and len(uris) == count  # one row per image
    assert table["error"].null_count == count  # no image turned into an error row by a fault
    assert all(label in CLASSES for label in table["label"].to_pylist())
    summary = json.loads(fs.cat_file(f"{bucket}/scores/{SUMMARY_NAME}"))
    assert summary["images"] == summary["scored"] == count and summary["errors"] == 0
    assert_faults_met(stats)


# ---------------------------------------------------------------- wrong storage: exit 2, one line, < 30 s


@pytest.fixture(scope="module")
def moto_with_auth():
    """A second S3 server (moto, own process) that checks credentials like AWS
    does: with INITIAL_NO_AUTH_ACTION_COUNT=0 every request must be signed with
    an access key moto's IAM knows, else 403 InvalidAccessKeyId."""
    port = closed_port()  # free now: moto takes it
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, "moto server exited"
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def blackhole():
    with Blackhole() as bh:
        yield bh.url


def job_argv(job: str, bucket: str, model_dir: str) -> list[str]:
    b = f"s3://{bucket}"
    if job == "prepare":
        return ["--src", f"{b}/raw", "--dst", f"{b}/shards"]
    if job == "train":
        return ["--data", f"{b}/shards", "--output", f"{b}/runs/r1"]
    return ["--model", model_dir, "--images", f"{b}/raw", "--output", f"{b}/scores"]  # score


@pytest.mark.parametrize("job", ["prepare", "train", "score"])
@pytest.mark.parametrize("case", ["wrong-credentials", "missing-bucket", "connection-refused", "blackhole"])
def test_unusable_storage_exits_2_with_one_line_within_30s(job, case, request, s3_endpoint, tiny_model_dir):
    env = dict(os.environ)
    bucket = "no-such-bucket-flaky"
    if case == "wrong-credentials":
        endpoint = request.getfixturevalue("moto_with_auth")
        env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0", AWS_SECRET_ACCESS_KEY="wrong-secret")
        expected = "rejected the credentials: InvalidAccessKeyId"
    elif case == "missing-bucket":
        endpoint, expected = s3_endpoint, bucket
    elif case == "connection-refused":
        endpoint = f"http://127.0.0.1:{closed_port()}"
        expected = f"{endpoint} did not answer (cannot connect"
    else:
        endpoint = request.getfixturevalue("blackhole")
        expected = f"{endpoint} did not answer (read timeout"
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", *job_argv(job, bucket, tiny_model_dir),
                           "--set", f"storage.endpoint_url={endpoint}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - started
    print(f"\n{job} {case}: exit {proc.returncode} in {elapsed:.1f}s: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 30, elapsed
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- failures of the moment are never answers


def score_through(px, model: str, src: str, out: str, *extra: str) -> int:
    from jobs import score as score_job

    return run(score_job.main, ["--model", model, "--images", src, "--output", out, *via(px),
                                "--rows-per-file", "6", "--batch-size", "6", "--set", "score.read_batch=6",
                                "--set", "storage.read_timeout_s=2", "--set", "storage.max_attempts=2", *extra])


def read_scores(fs, prefix: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(fs.glob(f"{prefix}/*.parquet"))
    return pa.concat_tables(pq.read_table(p, filesystem=fs) for p in parts) if parts else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expired", "slowdown", "drop"])
def test_a_window_of_failing_image_reads_stores_no_error_rows(kind, ray_session, s3_bucket, s3_endpoint,
                                                              tiny_model_dir, tmp_path):
    """Every image GET answered with 403 ExpiredToken (credentials lapsing),
    503 SlowDown or a reset connection, for 4 s from the first one: every image
    is scored, no error row. The storage client does not retry a 403 at all
    (the job's own read retries carry it: this case fails when they are taken
    out); SlowDown and resets it retries itself for about 20 s (measured
    through this proxy with 2 attempts per request), which the job keeps."""
    fs, bucket = s3_bucket
    fs.put(tiny_model_dir + "/", f"{bucket}/model/", recursive=True)
    src, count = upload_images(fs, bucket, tmp_path, per_class=2)
    with FaultProxy(s3_endpoint, p=0) as px:
        px.fail_object_reads(kind, 4.0, match="/raw/")
        code = score_through(px, f"s3://{bucket}/model", src, f"s3://{bucket}/scores-{kind}")
        stats = px.settled_stats()
    assert stats[f"window_{kind}"] > 0, stats  # the fault really met the job's reads
    assert code == 0
    table = read_scores(fs, f"{bucket}/scores-{kind}")
    assert table.num_rows == count and table["error"].null_count == count


@pytest.mark.slow
def test_reads_that_keep_failing_fail_the_job_and_commit_nothing(ray_session, s3_bucket, s3_endpoint,
                                                                 tiny_model_dir, tmp_path, capsys):
    """Past score.read_retry_s (retried as a task too) the job exits 1 naming
    the cause; no part is committed and _summary.json says failed."""
    from pipeline.scoring.commit import SUMMARY_NAME

    fs, bucket = s3_bucket
    fs.put(tiny_model_dir + "/", f"{bucket}/model/", recursive=True)
    src, _ = upload_images(fs, bucket, tmp_path, per_class=1)
    out = f"s3://{bucket}/scores-expired"
    capsys.readouterr()
    with FaultProxy(s3_endpoint, p=0) as px:
        px.fail_object_reads("expired", 600.0, match="/raw/")
        code = score_through(px, f"s3://{bucket}/model", src, out, "--set", "score.read_retry_s=1")
    err = capsys.readouterr().err
    assert code == 1
    assert "score.read_retry_s" in err and ("ExpiredToken" in err or "expired" in err), err[-2000:]
    assert read_scores(fs, f"{bucket}/scores-expired") is None
    assert json.loads(fs.cat_file(f"{bucket}/scores-expired/{SUMMARY_NAME}"))["status"] == "failed"


@pytest.mark.slow
def test_a_job_that_scores_nothing_and_a_part_over_the_error_limit_fail(ray_session, s3_bucket, tiny_model_dir,
                                                                        tmp_path, capsys):
    from jobs import score as score_job

    fs, bucket = s3_bucket
    fs.put(tiny_model_dir + "/", f"{bucket}/model/", recursive=True)
    for i in range(3):
        fs.pipe_file(f"{bucket}/junk/bad-{i}.jpg", b"not an image at all")
    common = ["--model", f"s3://{bucket}/model", "--set", "score.read_batch=4"]
    # Every image an error row: the rows are written (they are the answer), and the job does not exit 0.
    assert run(score_job.main, [*common, "--images", f"s3://{bucket}/junk", "--output",
                                f"s3://{bucket}/scores-junk"]) == 1
    assert "none of the 3 images could be scored" in capsys.readouterr().err
    assert read_scores(fs, f"{bucket}/scores-junk").num_rows == 3
    # A part with more error rows than score.max_error_fraction is not committed.
    src, count = upload_images(fs, bucket, tmp_path, per_class=1)
    fs.pipe_file(f"{bucket}/raw/circle/zz-bad.jpg", b"not an image")
    assert run(score_job.main, [*common, "--images", src, "--output", f"s3://{bucket}/scores-limit",
                                "--set", "score.max_error_fraction=0.1"]) == 1
    assert "score.max_error_fraction=0.1" in capsys.readouterr().err
    assert read_scores(fs, f"{bucket}/scores-limit") is None or \
        "circle" not in "".join(read_scores(fs, f"{bucket}/scores-limit")["uri"].to_pylist())
