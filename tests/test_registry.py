"""The registry and the promotion gate: two real trainings into one registry,
the worse one is not promoted, rollback, concurrent writers."""

from __future__ import annotations

import json
import os
import threading

import pytest

from jobs import registry as registry_job
from jobs import train as train_job
from jobs._cli import run
from pipeline import registry as reg
from pipeline.config import StorageConfig

LEARN = ["--set", "data.image_size=75", "--set", "data.batch_size=8", "--set", "data.seed=0",
         "--set", "model.weights=none", "--set", "model.head_units=32", "--set", "model.bn_momentum=0.9",
         "--set", "train.transfer.epochs=0", "--set", "train.finetune.epochs=4",
         "--set", "train.finetune.optimizer=adam", "--set", "train.finetune.learning_rate=0.001",
         "--set", "train.finetune.unfreeze_after=0", "--set", "train.early_stopping_patience=null",
         "--set", "train.top_k=2", "--set", "scaling.num_workers=1", "--set", "augment.enabled=false"]


@pytest.fixture(scope="module")
def trained(learnable_shards, tmp_path_factory):
    """A registry holding a real model and a worse one (trained with lr 0)."""
    root = tmp_path_factory.mktemp("registry")
    data, _ = learnable_shards
    registry = str(root / "registry")
    good, worse = str(root / "good"), str(root / "worse")
    assert run(train_job.main, ["--data", data, "--output", good, *LEARN,
                                "--registry", registry, "--name", "shapes"]) == 0
    assert run(train_job.main, ["--data", data, "--output", worse, *LEARN,
                                "--set", "train.finetune.learning_rate=0",
                                "--registry", registry, "--name", "shapes"]) == 0
    return registry, good, worse, data


@pytest.mark.slow
def test_worse_model_is_not_promoted(trained):
    registry, good, worse, _ = trained
    s_good = json.load(open(os.path.join(good, "summary.json")))["registry"]
    s_worse = json.load(open(os.path.join(worse, "summary.json")))["registry"]
    assert s_good["promoted"] and s_good["production_before"] is None
    assert not s_worse["promoted"]
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
    registry, good, worse, _ = trained
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
def test_concurrent_writers_never_break_the_pointer(trained):
    registry, _, _, _ = trained
    storage = StorageConfig()
    versions = [v["version"] for v in reg.list_versions(registry, "shapes", storage)]
    errors, seen = [], []

    def writer(i):
        try:
            for j in range(15):
                reg.promote(registry, "shapes", versions[(i + j) % 2], storage, reason=f"writer {i}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        for _ in range(60):
            pointer = reg.read_production(registry, "shapes", storage)
            seen.append(pointer["version"])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(seen) <= set(versions)
    assert reg.read_production(registry, "shapes", storage)["version"] in versions
    assert not [f for f in os.listdir(os.path.join(registry, "shapes")) if f.startswith(".tmp-")]


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
    import subprocess
    import sys

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
                              text=True) for r in runs]
    versions = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    storage = StorageConfig()
    listed = reg.list_versions(registry, "race", storage)
    assert sorted(v["version"] for v in listed) == sorted(versions)
    assert {v["run"] for v in listed} == set(runs)
    for v in versions:  # each version is complete, byte for byte
        folder = reg.version_uri(registry, "race", v)
        source = runs[versions.index(v)]
        assert open(os.path.join(folder, "model.keras"), "rb").read() == open(os.path.join(source, "model.keras"), "rb").read()
    pointer = reg.read_production(registry, "race", storage)
    assert pointer["version"] in versions
    # the index is rebuilt from the version folders by the last writer or by anyone
    assert {v["version"] for v in reg.write_index(registry, "race", storage)} == set(versions)
