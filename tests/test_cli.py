"""What every job shares on the command line: --help shows the usage examples,
--version prints the package version, and --dry-run plans like a real run
(same checks, same exit code 2 on bad input), prints what would run, exits 0,
starts no Ray and writes nothing. No Ray, no training: a few seconds."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs._cli import run
from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["prepare", "train", "predict", "score", "registry", "demo"]
CLASSES = ["circle", "square", "stripes"]


def job(name: str):
    return importlib.import_module(f"jobs.{name}")


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def call(name: str, argv: list[str], capsys) -> tuple[int, str]:
    code = run(job(name).main, argv)
    out = capsys.readouterr()
    return code, out.out + out.err


# --- --help and --version --------------------------------------------------------------

@pytest.mark.parametrize("name", JOBS)
def test_help_shows_the_usage_examples(name, capsys):
    with pytest.raises(SystemExit) as done:
        job(name).main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    examples = [line.strip() for line in job(name).__doc__.splitlines() if line.strip().startswith("python -m jobs.")]
    assert len(examples) >= 2, f"jobs.{name} documents fewer than two usage examples"
    for example in examples:
        assert example in shown, f"jobs.{name} --help lost the example: {example}"
    assert "--dry-run" in shown and "--version" in shown and "Exit codes" in shown


@pytest.mark.parametrize("name", JOBS)
def test_version_is_the_package_version(name, capsys):
    with pytest.raises(SystemExit) as done:
        job(name).main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.split() == ["inception-ray", importlib.metadata.version("inception-ray")]


def test_version_from_the_command_line_and_registry_keeps_its_version_flag(tmp_path):
    version = importlib.metadata.version("inception-ray")
    shown = subprocess.run([sys.executable, "-m", "jobs.registry", "-V"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert shown.returncode == 0 and shown.stdout.split() == ["inception-ray", version], shown.stderr
    # With an action, --version is still the model version.
    args = job("registry")
    with pytest.raises(UsageError, match="registry version 'v9' is not valid"):
        args.main(["show", "--registry", str(tmp_path / "registry"), "--name", "flowers", "--version", "v9"])


# --- the dry-run guard in storage ----------------------------------------------------------

def test_read_only_refuses_writes_and_checks_outputs_without_writing(tmp_path):
    storage = StorageConfig()
    target = tmp_path / "out" / "deeper"
    with st.read_only():
        with pytest.raises(st.ReadOnlyViolation, match="dry run"):
            st.write_text(str(target / "x.json"), "{}", storage)
        with pytest.raises(st.ReadOnlyViolation):
            st.remove(str(tmp_path / "nothing"), storage)
        st.check_writable(str(target), storage)  # a folder that does not exist yet: fine
        (tmp_path / "file").write_text("x")
        with pytest.raises(UsageError, match="is a file"):
            st.check_writable(str(tmp_path / "file" / "below"), storage)
    assert not (tmp_path / "out").exists()
    st.write_text(str(target / "x.json"), "{}", storage)  # outside: writes again
    assert (target / "x.json").read_text() == "{}"


# --- --dry-run on each job ------------------------------------------------------------------

@pytest.fixture
def no_ray(monkeypatch) -> list[str]:
    """Records (and refuses) every way a job could start or attach to Ray: the
    jobs' ``start_ray`` (as each job imported it, and in pipeline.runtime.cluster)
    and ``ray.init`` itself (Ray's APIs call it to start Ray on first use). A Ray
    started by another test in this process would make ``ray.is_initialized()``
    and ``sys.modules`` say nothing, hence the patching. Returns the calls seen:
    a dry-run test asserts it is empty."""
    import ray

    from pipeline.runtime import cluster

    calls: list[str] = []

    def refuse(what: str):
        def refused(*args, **kwargs):
            calls.append(what)
            raise RuntimeError(f"a dry run called {what}")
        return refused

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(cluster, "start_ray", refuse("pipeline.runtime.cluster.start_ray"))
    for name in JOBS:
        module = job(name)
        if hasattr(module, "start_ray"):
            monkeypatch.setattr(module, "start_ray", refuse(f"jobs.{name}.start_ray"))
    was_running = ray.is_initialized()
    yield calls
    assert ray.is_initialized() == was_running, "Ray started during a dry run"
    assert not calls, f"a dry run started Ray: {calls}"


@pytest.fixture
def images(tmp_path_factory) -> Path:
    from pipeline.data import demo_data

    root = tmp_path_factory.mktemp("images") / "images"
    demo_data.generate(str(root), per_class=4, size=32, classes=CLASSES)
    return root


@pytest.fixture
def shards(tmp_path_factory) -> Path:
    """A manifest as jobs.prepare writes it (planning reads only the manifest)."""
    from pipeline.data.shards import MANIFEST_NAME, build_manifest

    root = tmp_path_factory.mktemp("shards")
    counts = {c: 2 for c in CLASSES}
    entries = {split: [{"file": f"{split}-00000-{'0' * 12}.tfrecord", "examples": 6, "bytes": 4096,
                        "sha256": "0" * 64, "class_counts": counts}] for split in ("train", "validation")}
    manifest = build_manifest(source="images", classes=CLASSES, shards=entries, rejected=[], files_seen=12,
                              layout="flat", settings={})
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


@pytest.fixture
def model_dir(tmp_path_factory) -> Path:
    """A completed run directory as planning sees it: a model archive (its config
    only: planning reads that, never the weights), labels, preprocessing recipe,
    summary.json."""
    import zipfile

    from pipeline.artifact import LABELS_FILE, MODEL_FILE, PREPROCESSING_FILE, preprocessing_spec

    root = tmp_path_factory.mktemp("run")
    with zipfile.ZipFile(root / MODEL_FILE, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"layers": []}}))
    (root / "summary.json").write_text(json.dumps({"classes": CLASSES}))
    (root / LABELS_FILE).write_text(json.dumps(CLASSES))
    (root / PREPROCESSING_FILE).write_text(json.dumps(preprocessing_spec(75)))
    return root


def test_prepare_dry_run_writes_nothing(images, tmp_path, capsys, no_ray):
    dst = tmp_path / "shards"
    before = snapshot(images.parent)
    code, out = call("prepare", ["--src", str(images), "--dst", str(dst), "--dry-run"], capsys)
    assert code == 0, out
    assert not dst.exists() and snapshot(images.parent) == before
    assert "dry run: jobs.prepare would" in out and f"12 files under {images}" in out
    assert re.search(r"write \d+ train shards \(\d+ images\), \d+ validation shards", out), out
    # The same checks as a real run: a missing source is exit 2, still nothing written.
    code, out = call("prepare", ["--src", str(tmp_path / "missing"), "--dst", str(dst), "--dry-run"], capsys)
    assert code == 2 and "error:" in out and not dst.exists()
    assert not no_ray, f"the dry run started Ray: {no_ray}"


@pytest.mark.s3
def test_prepare_dry_run_to_s3_writes_nothing(s3_bucket, images, capsys, no_ray):
    fs, bucket = s3_bucket
    fs.put(str(images), f"{bucket}/raw", recursive=True)
    before = sorted(fs.find(bucket))
    code, out = call("prepare", ["--src", f"s3://{bucket}/raw", "--dst", f"s3://{bucket}/shards", "--dry-run"], capsys)
    assert code == 0, out
    assert sorted(fs.find(bucket)) == before and f"12 files under s3://{bucket}/raw" in out
    code, out = call("prepare", ["--src", f"s3://{bucket}/raw", "--dst", "s3://no-such-bucket-here/shards",
                                 "--dry-run"], capsys)
    assert code == 2 and "bucket no-such-bucket-here does not exist" in out, out
    assert not no_ray, f"the dry run started Ray: {no_ray}"


def test_prepare_skip_existing_leaves_prepared_shards_alone(shards, images, capsys):
    before = snapshot(shards)
    code, out = call("prepare", ["--src", str(images), "--dst", str(shards), "--skip-existing"], capsys)
    assert code == 0 and "nothing to do" in out and snapshot(shards) == before
    code, out = call("prepare", ["--src", str(images), "--dst", str(shards), "--skip-existing", "--overwrite"], capsys)
    assert code == 2


def test_train_dry_run_writes_nothing(shards, tmp_path, capsys, no_ray):
    output, registry = tmp_path / "runs" / "r1", tmp_path / "registry"
    # One transfer epoch and no fine-tuning: planning then needs no TensorFlow.
    argv = ["--data", str(shards), "--output", str(output), "--config", str(ROOT / "jobs/configs/demo.yaml"),
            "--set", "train.transfer.epochs=1", "--set", "train.finetune.epochs=0",
            "--registry", str(registry), "--name", "flowers", "--dry-run"]
    before = snapshot(shards)
    code, out = call("train", argv, capsys)
    assert code == 0, out
    assert not (tmp_path / "runs").exists() and not registry.exists() and snapshot(shards) == before
    assert "start a new run in" in out and "3 classes, 6 training and 6 validation images" in out
    assert f"register the run in {registry}#flowers" in out
    # A run directory with checkpoints: the dry run says it resumes, and leaves it as it was.
    (output / "checkpoints").mkdir(parents=True)
    before = snapshot(tmp_path)
    code, out = call("train", argv, capsys)
    assert code == 0 and "resume the run" in out and snapshot(tmp_path) == before
    code, out = call("train", ["--data", str(tmp_path / "none"), "--output", str(output), "--dry-run"], capsys)
    assert code == 2 and "no manifest.json" in out
    # A fine-tuning cut that names no InceptionV3 block is a usage error while planning.
    code, out = call("train", [*argv, "--set", "train.finetune.epochs=1", "--set", "train.finetune.unfreeze_after=mixed99"],
                     capsys)
    assert code == 2 and "'mixed99' is not a layer of InceptionV3" in out and "mixed10" in out, out
    assert not no_ray, f"the dry run started Ray: {no_ray}"


def test_score_dry_run_writes_nothing(model_dir, images, tmp_path, capsys, no_ray):
    output = tmp_path / "scores"
    before = snapshot(model_dir), snapshot(images)
    code, out = call("score", ["--model", str(model_dir), "--images", str(images), "--output", str(output),
                               "--dry-run"], capsys)
    assert code == 0, out
    assert not output.exists() and (snapshot(model_dir), snapshot(images)) == before
    assert f"score the images under {images}" in out and f"to {output}" in out
    assert not no_ray, f"the dry run started Ray: {no_ray}"


def test_predict_dry_run_writes_nothing(model_dir, images, tmp_path, capsys, no_ray):
    plot = tmp_path / "plots" / "predict.png"
    files = [str(p) for p in sorted(images.rglob("*.png"))[:2]]
    code, out = call("predict", ["--model", str(model_dir), *files, "--plot", str(plot), "--dry-run"], capsys)
    assert code == 0, out
    assert not plot.parent.exists() and "top 5 classes of 2 images" in out
    code, out = call("predict", ["--model", str(model_dir), str(tmp_path / "gone.png"), "--dry-run"], capsys)
    assert code == 2 and "image not found" in out
    assert not no_ray, f"the dry run started Ray: {no_ray}"


def test_registry_dry_run_writes_nothing(model_dir, tmp_path, capsys, no_ray):
    from pipeline import registry as reg

    storage, registry = StorageConfig(), str(tmp_path / "registry")
    first = reg.register_run(registry, "flowers", str(model_dir), storage, metrics={"accuracy": 0.5}, data="d")
    reg.promote(registry, "flowers", first["version"], storage, reason="test")
    other = tmp_path / "run2"
    other.mkdir()
    for f in model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    second = reg.register_run(registry, "flowers", str(other), storage, metrics={"accuracy": 0.6}, data="d")
    reg.promote(registry, "flowers", second["version"], storage, reason="test")
    before = snapshot(tmp_path / "registry")
    common = ["--registry", registry, "--name", "flowers", "--dry-run"]
    code, out = call("registry", ["promote", *common, "--version", first["version"]], capsys)
    assert code == 0 and f"make version {first['version']} the production version" in out, out
    code, out = call("registry", ["rollback", *common], capsys)
    assert code == 0 and f"back from version {second['version']} to {first['version']}" in out, out
    code, out = call("registry", ["promote", *common, "--version", "nope"], capsys)
    assert code == 2
    assert snapshot(tmp_path / "registry") == before
    assert reg.read_production(registry, "flowers", storage)["version"] == second["version"]
    assert not no_ray, f"the dry run started Ray: {no_ray}"


def test_demo_dry_run_writes_nothing(tmp_path, capsys, no_ray):
    workdir = tmp_path / "demo"
    code, out = call("demo", ["--workdir", str(workdir), "--dry-run"], capsys)
    assert code == 0, out
    assert not workdir.exists()
    for step in ("jobs.prepare", "jobs.train", "jobs.predict", "jobs.score"):
        assert f"python -m {step} " in out
    assert not no_ray, f"the dry run started Ray: {no_ray}"