"""The registry and the promotion gate: two real trainings into one registry,
the worse one is not promoted (it is also trained through a worker that raises
and one killed with SIGKILL, found among the processes of the test session's
Ray), rollback; concurrent writers (processes on local
disk and on S3) and a gate whose production changes under it; hostile
registry names and versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import registry as registry_job
from jobs import train as train_job
from jobs._cli import run
from pipeline import registry as reg
from pipeline import storage as st
from pipeline.artifact import load_keras_file
from pipeline.config import StorageConfig
from pipeline.runtime.faults import FAULT_ENV
from tests.test_faults import QUICK, checkpoints, epochs_of

ROOT = Path(__file__).resolve().parents[1]

LEARN = ["--set", "data.image_size=75", "--set", "data.batch_size=8", "--set", "data.seed=0",
         "--set", "model.weights=none", "--set", "model.head_units=32", "--set", "model.bn_momentum=0.9",
         "--set", "train.transfer.epochs=0", "--set", "train.finetune.epochs=4",
         "--set", "train.finetune.optimizer=adam", "--set", "train.finetune.learning_rate=0.001",
         "--set", "train.finetune.unfreeze_after=0", "--set", "train.early_stopping_patience=null",
         "--set", "train.top_k=2", "--set", "scaling.num_workers=1", "--set", "augment.enabled=false",
         "--set", "train.bn_stats_batches=12"]


@pytest.fixture(scope="module")
def trained(learnable_shards, tmp_path_factory):
    """A registry holding a real model and a worse one (trained with lr 0).
    The worse one is trained through two worker failures (see
    ``through_failures``)."""
    root = tmp_path_factory.mktemp("registry")
    data, _ = learnable_shards
    registry = str(root / "registry")
    good, worse = str(root / "good"), root / "worse"
    assert run(train_job.main, ["--data", data, "--output", good, *LEARN,
                                "--registry", registry, "--name", "shapes"]) == 0
    failures = through_failures(data, worse, root / "raised-once", ["--registry", registry, "--name", "shapes"])
    return registry, good, str(worse), data, failures


def through_failures(data: str, out: Path, raised: Path, extra: list[str]) -> dict:
    """One training run on 3 workers (lr 0: nothing is learned; the records of
    4 training and 4 validation shards split unevenly over the workers), two
    worker failures: an exception raised right after epoch 2 (finetune 1) was
    checkpointed, then, once checkpoint 3 is registered, a SIGKILL of one of the
    restarted workers' processes mid-epoch. The resume restores 3 replicas,
    each compared with the checkpoint. Returns what the test checks: the exit
    code, the checkpoints seen, the workers found."""
    result: dict = {}

    def train():
        try:
            result["code"] = run(train_job.main, [
                "--data", data, "--output", str(out), *QUICK, "--set", "train.max_failures=2",
                "--set", "train.transfer.epochs=1", "--set", "train.finetune.epochs=4",
                "--set", "train.transfer.learning_rate=0", "--set", "train.finetune.learning_rate=0",
                "--set", "scaling.num_workers=3", "--set", "scaling.cpus_per_worker=0.5", *extra])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = repr(exc)

    with pytest.MonkeyPatch.context() as env:
        env.setenv(FAULT_ENV, f"epoch-2:raise:{raised}")
        job = threading.Thread(target=train)
        job.start()
        deadline = time.time() + 600
        # Checkpoint 3 (finetune 2) comes from the group restarted after the
        # raise; two epochs remain when it appears. (Only the last
        # train.checkpoints_to_keep are listed at any time: count every one.)
        seen: set = set()
        while len(seen) < 3 and time.time() < deadline and job.is_alive():
            seen.update(checkpoints(out))
            time.sleep(0.2)
        workers = live_train_workers() if raised.exists() and len(seen) >= 3 else []
        if len(workers) == 3:
            os.kill(workers[1], signal.SIGKILL)  # mid-epoch 4 (finetune 3), a real process kill
        job.join(900)
    return {**result, "raised": raised.exists(), "seen": sorted(seen), "workers": workers}


def live_train_workers() -> list[int]:
    """PIDs of the live Ray Train workers of this test session's Ray: processes
    its raylet started that Ray titled ``ray::RayTrainWorker`` (the other test
    process has a Ray of its own, with workers of its own)."""
    import ray
    from ray._private import ray_constants

    node = ray._private.worker.global_worker.node
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = open(f"/proc/{entry}/cmdline").read()
            state, parent = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if title.startswith("ray::RayTrainWorker") and int(parent) == raylet and state != "Z":
            found.append(int(entry))
    return found



@pytest.mark.slow
def test_worse_model_is_not_promoted(trained):
    registry, good, worse, _, _ = trained
    s_good = json.load(open(os.path.join(good, "summary.json")))["registry"]
    s_worse = json.load(open(os.path.join(worse, "summary.json")))["registry"]
    assert s_good["promoted"] and s_good["production_before"] is None
    assert not s_worse["promoted"] and " < production " in s_worse["reason"], s_worse
    assert s_worse["production_before"] == s_good["version"] == s_worse["production"]
    # both were scored now, on the same shards
    assert s_worse["production_accuracy"] == pytest.approx(s_good["accuracy"], abs=1e-6)
    assert s_worse["accuracy"] < s_good["accuracy"]
    assert s_good["accuracy"] > 0.6  # three classes: chance is 1/3

    storage = StorageConfig()
    versions = reg.list_versions(registry, "shapes", storage)
    assert [v["run"] for v in versions] == [good, worse]
    for v in versions:
        folder = reg.version_uri(registry, "shapes", v["version"])
        assert {"model.keras", "labels.json", "metrics.json", "version.json"} <= set(os.listdir(folder))
    index = json.load(open(os.path.join(registry, "shapes", "index.json")))
    assert index["production"] == s_good["version"] and len(index["versions"]) == 2


@pytest.mark.slow
def test_promote_rollback_and_cli(trained, capsys):
    registry, good, worse, _, _ = trained
    storage = StorageConfig()
    versions = [v["version"] for v in reg.list_versions(registry, "shapes", storage)]
    base = ["--registry", registry, "--name", "shapes"]
    assert run(registry_job.main, ["promote", *base, "--version", versions[1]]) == 0
    assert reg.read_production(registry, "shapes", storage)["version"] == versions[1]
    assert run(registry_job.main, ["rollback", *base]) == 0
    assert reg.read_production(registry, "shapes", storage)["version"] == versions[0]
    capsys.readouterr()
    assert run(registry_job.main, ["list", *base]) == 0
    table = capsys.readouterr().out
    assert f"* {versions[0]}" in table and versions[1] in table
    assert run(registry_job.main, ["show", *base]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == versions[0] and shown["production"] is True
    assert run(registry_job.main, ["promote", *base, "--version", "nope"]) == 2


@pytest.mark.slow
def test_worker_failures_raised_and_sigkilled_resume_from_the_last_checkpoint(trained):
    """The worse model's run: each time the worker group restarts from the last
    checkpoint, mid-phase, with every weight and optimizer slot verified against
    the file; every epoch runs exactly once, and the run ends (exit 0: not
    promoted is not a failure)."""
    _, _, worse, _, failures = trained
    assert failures["raised"], failures  # the raise really happened
    assert len(failures["seen"]) >= 3 and len(failures["workers"]) == 3, failures  # and the SIGKILL
    assert failures.get("code") == 0, failures
    summary = json.load(open(os.path.join(worse, "summary.json")))
    assert summary["resumed"] is True and summary["scaling"]["replicas"] == 3
    # every epoch exactly once: each failed epoch was redone, nothing before it
    assert epochs_of(summary) == [("transfer", 1)] + [("finetune", i) for i in (1, 2, 3, 4)]
    # Killed inside the phase: the model and the SGD optimizer (momentum slots,
    # step count) came back, each variable compared with the checkpoint file.
    resumed = summary["resumed_from"]
    # the finetune phase (index 1), at least 2 of its epochs done: after the SIGKILL, not the raise
    assert resumed["phase_index"] == 1 and resumed["epoch"] >= 2 and resumed["optimizer_restored"] is True
    model = load_keras_file(os.path.join(worse, "model.keras"))
    # every model variable, the optimizer's step count, and SGD's momentum slot
    # ("m") for every trainable variable of the fine-tuning phase, by name
    verified = resumed["verified"]
    assert verified["variables"] == len(model.variables) and verified["iterations"] == 1
    assert verified["m"] == verified["trainable"] > 0
    assert json.load(open(os.path.join(worse, "metrics.json")))["examples"] > 0


def test_gate_decisions():
    assert reg.decide(0.8, None, tolerance=0.0, min_val_accuracy=None)["promote"]
    assert reg.decide(0.8, 0.8, tolerance=0.0, min_val_accuracy=None)["promote"]
    assert not reg.decide(0.79, 0.8, tolerance=0.0, min_val_accuracy=None)["promote"]
    assert reg.decide(0.79, 0.8, tolerance=0.02, min_val_accuracy=None)["promote"]
    assert not reg.decide(0.9, 0.5, tolerance=0.0, min_val_accuracy=0.95)["promote"]


def test_reference_parsing():
    assert reg.parse_reference("s3://b/reg#cats") == ("s3://b/reg", "cats")
    assert reg.parse_reference("/runs/1") is None
    with pytest.raises(Exception, match="REGISTRY_URI#name"):
        reg.parse_reference("s3://b/reg#")




# ---------------------------------------------------------------- compare-and-swap


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def registry_uri(request, tmp_path):
    """A registry folder on local disk, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "registry")
    request.getfixturevalue("atomic_moto")
    _, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/registry"


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3), "memory"])
def test_a_write_with_a_stale_token_is_refused(where, tmp_path, request):
    """The primitive under every pointer update: a write based on a read that
    another writer has since overtaken changes nothing and says so."""
    if where == "s3":
        request.getfixturevalue("atomic_moto")
        _, bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/p.json"
        assert st.conditional_writes(uri, StorageConfig())  # If-Match / If-None-Match, not the lease
    elif where == "local":
        uri = str(tmp_path / "p.json")
    else:  # a store with neither conditional writes nor locks: the lease
        uri = f"memory://{tmp_path.name}/p.json"
    storage = StorageConfig()
    assert st.read_for_update(uri, storage) == (None, None)
    assert st.write_if_unchanged(uri, b"first", None, storage)
    assert not st.write_if_unchanged(uri, b"second creator", None, storage)
    data, token = st.read_for_update(uri, storage)
    assert data == b"first"
    assert st.write_if_unchanged(uri, b"update", token, storage)
    assert not st.write_if_unchanged(uri, b"stale update", token, storage)
    assert st.read_for_update(uri, storage)[0] == b"update"


@pytest.mark.s3
def test_an_s3_store_that_ignores_the_conditions_gets_the_lease(s3_bucket, monkeypatch):
    """An S3-compatible store that accepts If-Match / If-None-Match and writes
    anyway (moto with the headers removed) is found out, and pointer updates
    there go through the lease: a stale write is still refused."""
    from moto.s3.responses import S3Response
    from requests.structures import CaseInsensitiveDict

    original = S3Response.put_object

    def ignore_conditions(self, *args, **kwargs):
        self.headers = CaseInsensitiveDict({k: v for k, v in self.headers.items()
                                            if k.lower() not in ("if-match", "if-none-match")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", ignore_conditions)
    _, bucket = s3_bucket
    uri, storage = f"s3://{bucket}/registry/m/production.json", StorageConfig()
    assert not st.conditional_writes(uri, storage)
    assert st.write_if_unchanged(uri, b"first", None, storage)
    assert not st.write_if_unchanged(uri, b"second creator", None, storage)
    data, token = st.read_for_update(uri, storage)
    assert st.write_if_unchanged(uri, b"update", token, storage)
    assert not st.write_if_unchanged(uri, b"stale update", token, storage)
    assert st.read_for_update(uri, storage)[0] == b"update"
    fs, _ = s3_bucket
    assert fs.find(f"{bucket}/registry") == [f"{bucket}/registry/m/production.json"]  # no probe or lease left


def fake_run(folder: Path, accuracy: float = 0.5) -> str:
    """A run directory as the registry copies it (no model needs loading)."""
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(os.urandom(2_000))
    (folder / "labels.json").write_text('["a", "b"]')
    (folder / "metrics.json").write_text(json.dumps({"accuracy": accuracy}))
    return str(folder)


RACER = """
import json, os, random, sys, time
from pipeline import registry as reg
from pipeline import storage as st
from pipeline.config import StorageConfig
registry, name, versions, seed, ready, go, seconds, min_calls, max_calls, met, writers = sys.argv[1:]
versions, rng, storage = json.loads(versions), random.Random(int(seed)), StorageConfig()
reg.read_production(registry, name, storage)  # imported and connected before the start
stats = {"writes": 0, "lost": 0, "met": False}
real_read, real_write = st.read_for_update, st.write_if_unchanged

def read_for_update(uri, storage):
    # The first read of production.json waits until every racer has read it:
    # all of them then hold the same token, and all but one must lose.
    out = real_read(uri, storage)
    if uri.endswith(reg.PRODUCTION_FILE) and not os.path.exists(os.path.join(met, seed)):
        open(os.path.join(met, seed), "w").close()
        end = time.time() + 15
        while len(os.listdir(met)) < int(writers) and time.time() < end:
            time.sleep(0.002)
        stats["met"] = len(os.listdir(met)) >= int(writers)
    return out

def write_if_unchanged(uri, data, token, storage):
    out = real_write(uri, data, token, storage)
    stats["writes"] += 1
    stats["lost"] += out is None  # another writer came first: a race this process lost
    return out

st.read_for_update, st.write_if_unchanged = read_for_update, write_if_unchanged
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
calls, end = [], time.time() + float(seconds)
while len(calls) < int(max_calls) and (len(calls) < int(min_calls) or time.time() < end):
    action = rng.choice(["promote", "promote", "rollback"]) if calls else "promote"
    try:
        if action == "promote":
            pointer = reg.promote(registry, name, rng.choice(versions), storage, reason="racer")
        else:
            pointer = reg.rollback(registry, name, storage)
        calls.append({"ok": True, "action": action, "id": pointer["id"], "version": pointer["version"]})
    except Exception as exc:
        calls.append({"ok": False, "action": action, "error": f"{type(exc).__name__}: {exc}"})
print(json.dumps({"calls": calls, "stats": stats}))
"""


def test_processes_promoting_and_rolling_back_at_once_lose_nothing(registry_uri, tmp_path):
    """4 processes promote and roll back at random for a few seconds while two
    threads read the pointer. Afterwards production.json's list of changes is
    one chain holding every call that reported success exactly once (and
    nothing else), replaying it gives the pointer's history, and each rollback
    returned the version before the one it replaced. The racers' first
    promotions all start from the same read of the pointer, and every racer
    counts the conditional writes it lost: the test fails unless races were
    really lost (writers that took turns would lose none)."""
    storage = StorageConfig()
    name, writers, min_calls, max_calls = "race", 4, 12, 60
    versions = [reg.register_run(registry_uri, name, fake_run(tmp_path / f"run{i}"), storage,
                                 metrics={"accuracy": 0.5}, data="d")["version"] for i in range(3)]
    first = reg.promote(registry_uri, name, versions[0], storage, reason="start")
    succeeded = {first["id"]: {"ok": True, "action": "promote", "id": first["id"], "version": versions[0]}}

    go, met = tmp_path / "go", tmp_path / "met"
    met.mkdir()
    procs = []
    for i in range(writers):
        ready = tmp_path / f"ready{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, "-c", RACER, registry_uri, name, json.dumps(versions), str(i), str(ready), str(go),
             "4", str(min_calls), str(max_calls), str(met), str(writers)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)))
    deadline = time.time() + 120
    while not all(r.exists() for r, _ in procs) and time.time() < deadline:
        time.sleep(0.05)

    done, errors, reads = threading.Event(), [], []

    def reader():
        try:
            while not done.is_set() or len(reads) < 40:
                pointer = reg.read_production(registry_uri, name, storage)
                assert pointer["version"] in versions, pointer
                assert pointer["changes"][-1]["id"] == pointer["id"]
                reads.append(pointer["id"])
                time.sleep(0.005)  # leave the moto server in this process time to answer the writers
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    go.touch()
    calls, stats = [], []
    try:
        for _, p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            result = json.loads(out.strip().splitlines()[-1])
            calls.extend(result["calls"])
            stats.append(result["stats"])
    finally:
        done.set()
        for t in readers:
            t.join(120)
    if errors:
        raise errors[0]
    assert len(reads) >= 80  # both readers read throughout (40 each at least)
    lost = sum(s["lost"] for s in stats)
    assert lost >= 1, f"no racer lost a conditional write: the writers did not race ({stats})"
    if all(s["met"] for s in stats):  # all first writes were based on one read: all but one lost
        assert lost >= writers - 1, stats

    ok = [c for c in calls if c["ok"]]
    failed = [c for c in calls if not c["ok"]]
    for c in failed:  # nothing but a clear refusal or a clear "lost too many races"
        assert "no earlier production version" in c["error"] or "nothing was changed" in c["error"], c
    assert len(calls) >= writers * min_calls and ok
    succeeded.update({c["id"]: c for c in ok})
    assert len(succeeded) == len(ok) + 1  # ids are unique

    final = reg.read_production(registry_uri, name, storage)
    changes = final["changes"]
    assert len(changes) < reg.CHANGES_LIMIT  # nothing trimmed: the whole race is in the list
    ids = [c["id"] for c in changes]
    assert len(ids) == len(set(ids))  # exactly once
    assert set(ids) == set(succeeded)  # every success is there, nothing else is
    # one chain: each change starts where the one before it ended
    assert changes[0]["from"] is None
    for before, after in zip(changes, changes[1:]):
        assert after["from"] == before["version"], (before, after)
    assert final["id"] == changes[-1]["id"] and final["version"] == changes[-1]["version"]
    # replaying the chain gives the history rollback walks; each rollback went to the previous version
    history = []
    for change in changes:
        assert succeeded[change["id"]]["version"] == change["version"]
        assert succeeded[change["id"]]["action"] == change["action"]
        if change["action"] == "promote":
            if change["from"] and change["from"] != change["version"]:
                history = (history + [change["from"]])[-reg.HISTORY_LIMIT:]
        else:
            assert history and change["version"] == history.pop(), change
    assert final["history"] == history
    # the index the racing writers left (not rebuilt here) is up to date
    fs, path = st.get_fs(st.join(registry_uri, name, reg.INDEX_FILE), storage)
    index = json.loads(fs.cat_file(path))
    assert index["production"] == final["version"]
    assert sorted(v["version"] for v in index["versions"]) == sorted(versions)
    print(f"\n{registry_uri.split(':')[0] if '://' in registry_uri else 'local'}: {len(calls)} calls, "
          f"{len(ok)} succeeded ({sum(c['action'] == 'rollback' for c in ok)} rollbacks), "
          f"{len(failed)} refused, {len(reads)} reads, {lost} lost writes of {sum(s['writes'] for s in stats)}, "
          f"{sum(s['met'] for s in stats)} of {writers} racers met before their first write")


# ---------------------------------------------------------------- the gate under a race


@pytest.fixture
def refused_promotions(monkeypatch) -> list:
    """Every ProductionChanged that a promotion with ``expected`` (the gate's)
    raised: the races the gate lost, counted."""
    real, refused = reg.promote, []

    def promote(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except reg.ProductionChanged as exc:
            refused.append((exc.expected, exc.found))
            raise

    monkeypatch.setattr(reg, "promote", promote)
    return refused


@pytest.mark.parametrize("meanwhile, promoted", [(0.9, False), (0.6, True)])
def test_gate_does_not_apply_a_decision_made_against_an_old_production(tmp_path, meanwhile, promoted,
                                                                      refused_promotions):
    """While the gate evaluates candidate C (0.8) against production A (0.7),
    someone promotes B. The decision "C beats A" is not applied to B: the gate
    compares C with B and promotes C only if it beats B too."""
    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    a, b, c = (reg.register_run(registry, "gate", fake_run(tmp_path / n), storage, metrics={}, data="d")["version"]
               for n in ("a", "b", "c"))
    reg.promote(registry, "gate", a, storage, reason="start")
    accuracy = {a: 0.7, b: meanwhile, c: 0.8}
    evaluated = []

    def evaluate(folders):
        evaluated.append([f.rsplit("/", 1)[-1] for f in folders])
        if len(evaluated) == 1:  # another promoter, between the gate's read and its promotion
            reg.promote(registry, "gate", b, storage, reason="promoted meanwhile")
        return [accuracy[f.rsplit("/", 1)[-1]] for f in folders]

    outcome = reg.gate(registry, "gate", c, storage, evaluate=evaluate, tolerance=0.0, min_val_accuracy=None)
    assert refused_promotions == [(a, b)]  # the gate's promotion against A lost the race to B's
    assert evaluated == [[c, a], [b]]  # compared again, with the new production only
    assert outcome["production_before"] == b and outcome["production_accuracy"] == meanwhile
    assert outcome["comparisons"] == 2 and outcome["promoted"] is promoted
    pointer = reg.read_production(registry, "gate", storage)
    assert pointer["version"] == (c if promoted else b)
    assert [ch["version"] for ch in pointer["changes"]] == [a, b] + ([c] if promoted else [])


def test_a_gate_whose_production_keeps_changing_gives_up_without_promoting(tmp_path, refused_promotions):
    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    a, b, c = (reg.register_run(registry, "gate", fake_run(tmp_path / n), storage, metrics={}, data="d")["version"]
               for n in ("a", "b", "c"))
    reg.promote(registry, "gate", a, storage, reason="start")
    others = iter([b, a, b])

    def evaluate(folders):  # a better candidate, but someone promotes during every comparison
        reg.promote(registry, "gate", next(others), storage, reason="meanwhile")
        return [0.9 if f.endswith(c) else 0.1 for f in folders]

    outcome = reg.gate(registry, "gate", c, storage, evaluate=evaluate, tolerance=0.0, min_val_accuracy=None)
    assert outcome["comparisons"] == reg.GATE_ATTEMPTS and not outcome["promoted"]
    assert refused_promotions == [(a, b), (b, a), (a, b)]  # each of the gate's promotions lost its race
    assert "changed during each of 3 comparisons (now " + b in outcome["reason"] and outcome["production"] == b
    assert reg.read_production(registry, "gate", storage)["version"] == b


def test_a_promotion_expecting_another_production_changes_nothing(tmp_path):
    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    a, b = (reg.register_run(registry, "m", fake_run(tmp_path / n), storage, metrics={}, data="d")["version"]
            for n in ("a", "b"))
    with pytest.raises(reg.ProductionChanged):
        reg.promote(registry, "m", b, storage, reason="x", expected=a)
    assert reg.read_production(registry, "m", storage) is None
    reg.promote(registry, "m", a, storage, reason="x", expected=None)
    before = open(os.path.join(registry, "m", "production.json")).read()
    with pytest.raises(reg.ProductionChanged):
        reg.promote(registry, "m", b, storage, reason="x", expected=None)
    assert open(os.path.join(registry, "m", "production.json")).read() == before


REGISTER_AND_PROMOTE = """
import sys
from pipeline import registry as reg
from pipeline.config import StorageConfig
registry, run_dir = sys.argv[1], sys.argv[2]
v = reg.register_run(registry, "race", run_dir, StorageConfig(), metrics={"accuracy": 0.5}, data="d")
for _ in range(10):
    reg.promote(registry, "race", v["version"], StorageConfig(), reason="race")
print(v["version"])
"""


def test_two_processes_registering_at_once_leave_a_valid_registry(tmp_path):
    registry = str(tmp_path / "registry")
    runs = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        (run_dir / "model.keras").write_bytes(os.urandom(200_000))
        (run_dir / "labels.json").write_text('["a", "b"]')
        (run_dir / "metrics.json").write_text('{"accuracy": 0.5}')
        runs.append(str(run_dir))
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_AND_PROMOTE, registry, r], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in runs]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    versions = [out.strip() for out, _ in results]
    storage = StorageConfig()
    listed = reg.list_versions(registry, "race", storage)
    assert sorted(v["version"] for v in listed) == sorted(versions)
    assert {v["run"] for v in listed} == set(runs)
    for v in versions:  # each version is complete, byte for byte
        folder = reg.version_uri(registry, "race", v)
        source = runs[versions.index(v)]
        assert open(os.path.join(folder, "model.keras"), "rb").read() == open(os.path.join(source, "model.keras"), "rb").read()
    pointer = reg.read_production(registry, "race", storage)
    assert pointer["version"] in versions and len(pointer["changes"]) == 20
    # the index as the racing writers left it (not rebuilt here) lists both versions and the pointer
    index = json.load(open(os.path.join(registry, "race", reg.INDEX_FILE)))
    assert sorted(v["version"] for v in index["versions"]) == sorted(versions)
    assert index["production"] == pointer["version"]
    assert not [f for f in os.listdir(os.path.join(registry, "race")) if f.startswith(".tmp-")]


REGISTER_ONLY = """
import os, sys, time
from pipeline import registry as reg
from pipeline.config import StorageConfig
registry, run_dir, ready, go = sys.argv[1:]
storage = StorageConfig()
reg.list_versions(registry, "once", storage)  # connected and imported before the start
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
print(reg.register_run(registry, "once", run_dir, storage, metrics={}, data="d")["version"])
"""


def test_one_run_registered_by_three_processes_at_once_is_one_version(registry_uri, tmp_path):
    run_dir = fake_run(tmp_path / "run")
    ready, go = [tmp_path / f"ready{i}" for i in range(3)], tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_ONLY, registry_uri, run_dir, str(r), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in ready]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    returned = {out.strip() for out, _ in results}
    listed = reg.list_versions(registry_uri, "once", StorageConfig())
    assert len(returned) == 1 and [v["version"] for v in listed] == list(returned)


def test_a_registration_abandoned_by_a_dead_process_is_taken_over(tmp_path):
    import hashlib
    import socket

    storage = StorageConfig()
    registry, run_dir = str(tmp_path / "registry"), fake_run(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = {"run": run_dir, "version": "20260101-000000-abcdef", "host": socket.gethostname(),
             "pid": int(dead.stdout), "claimed": time.time()}
    claims = tmp_path / "registry" / "m" / reg.RUNS
    claims.mkdir(parents=True)
    (claims / (hashlib.sha256(run_dir.encode()).hexdigest()[:32] + ".json")).write_text(json.dumps(claim))
    record = reg.register_run(registry, "m", run_dir, storage, metrics={}, data="d")
    assert record["version"] != claim["version"] and record["run"] == run_dir
    assert reg.get_version(registry, "m", record["version"], storage)["run"] == run_dir


def test_a_change_whose_answer_was_lost_is_not_applied_twice(tmp_path, monkeypatch):
    """A conditional write that succeeded but whose answer was lost (the retried
    request is refused, since the object changed: by this very write), and
    another writer's change right after it: the promotion is in the chain once."""
    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    a, b = (reg.register_run(registry, "m", fake_run(tmp_path / n), storage, metrics={}, data="d")["version"]
            for n in ("a", "b"))
    real = st.write_if_unchanged
    lost = []

    def answer_lost(uri, data, token, storage):
        written = real(uri, data, token, storage)
        if uri.endswith(reg.PRODUCTION_FILE) and not lost:
            lost.append(uri)
            monkeypatch.setattr(st, "write_if_unchanged", real)
            reg.promote(registry, "m", b, storage, reason="someone else, right after")
            return False
        return written

    monkeypatch.setattr(st, "write_if_unchanged", answer_lost)
    mine = reg.promote(registry, "m", a, storage, reason="mine")
    pointer = reg.read_production(registry, "m", storage)
    assert lost and [(c["id"], c["version"]) for c in pointer["changes"]][0] == (mine["id"], a)
    assert [c["version"] for c in pointer["changes"]] == [a, b] and pointer["version"] == b
