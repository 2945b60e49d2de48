"""Hostile model references: registry names and versions that climb out of the
registry, a production pointer that names one, `.h5` models and models that
carry code, runs that are not finished. Each is refused with exit code 2 and
one line, before TensorFlow or Ray is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from jobs import registry as registry_job
from jobs._cli import run
from pipeline import registry as reg
from pipeline.artifact import check_model_reference, load_artifact
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from tests import imagefactory as fx

ROOT = Path(__file__).resolve().parents[1]
VERSION = "20260101-000000-abcdef"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny models (8x8 input, 2 classes) in run folders: a safe one, one with a
    Lambda layer (as .keras and as .h5), each in a completed run, and the safe
    one in a run that has not written summary.json."""
    import tf_keras as keras

    root = tmp_path_factory.mktemp("models")

    def build(with_lambda: bool):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Lambda(lambda t: t * 2.0, name="lambda")(inputs) if with_lambda else inputs
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))

    def folder(name: str, complete: bool = True) -> Path:
        path = root / name
        path.mkdir()
        (path / "labels.json").write_text('["a", "b"]')
        if complete:
            (path / "summary.json").write_text(json.dumps({"job": "train"}))
        return path

    safe = folder("safe")
    build(False).save(safe / "model.keras")
    unfinished = folder("unfinished", complete=False)
    build(False).save(unfinished / "model.keras")
    lambda_keras = folder("lambda-keras")
    build(True).save(lambda_keras / "model.keras")
    lambda_h5 = folder("lambda-h5")
    with warnings.catch_warnings():  # "HDF5 is a legacy format": the point of this one
        warnings.simplefilter("ignore", UserWarning)
        build(True).save(lambda_h5 / "model.h5")
    return {"root": root, "safe": str(safe), "unfinished": str(unfinished),
            "lambda_keras": str(lambda_keras), "lambda_h5": str(lambda_h5 / "model.h5")}


def test_registry_versions_and_names_that_leave_the_registry_are_refused(tmp_path, capsys):
    registry = tmp_path / "registry"
    (registry / "m" / "versions").mkdir(parents=True)
    (tmp_path / "other" / "versions" / "v1").mkdir(parents=True)
    before = tree(tmp_path)
    cases = [
        (["promote", "--name", "m", "--version", "../../other/versions/v1"], "is not valid"),
        (["promote", "--name", "m", "--version", "../../../x"], "is not valid"),
        (["show", "--name", "m", "--version", "../m"], "is not valid"),
        (["promote", "--name", "../other", "--version", VERSION], "registry name '../other' is not valid"),
        (["list", "--name", ".."], "is not valid"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert run(registry_job.main, [*argv, "--registry", str(registry)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
    assert tree(tmp_path) == before  # nothing made, inside the registry or out

    # a production.json that names a folder outside the registry is not followed
    (registry / "m" / "production.json").write_text(json.dumps(
        {"version": "../../other/versions/v1", "history": []}))
    with pytest.raises(UsageError, match="is not valid"):
        reg.read_production(str(registry), "m", StorageConfig())
    (registry / "m" / "production.json").write_text(json.dumps({"version": VERSION, "history": ["../../x"]}))
    with pytest.raises(UsageError, match="'../../x' in .*production.json is not valid"):
        reg.rollback(str(registry), "m", StorageConfig())
    for action in ("show", "rollback", "list"):
        capsys.readouterr()
        assert run(registry_job.main, [action, "--registry", str(registry), "--name", "m"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_version_folders_the_registry_did_not_make_are_not_listed(tmp_path):
    storage = StorageConfig()
    registry = str(tmp_path / "registry")
    for folder in (VERSION, "..hidden", "not-a-version"):
        path = tmp_path / "registry" / "m" / "versions" / folder
        path.mkdir(parents=True)
        (path / "version.json").write_text(json.dumps({"version": VERSION if folder == VERSION else folder}))
    assert [v["version"] for v in reg.list_versions(registry, "m", storage)] == [VERSION]


JOBS_SCRIPT = """
import json, sys
from jobs import predict, score
from jobs._cli import run
codes = [run(getattr({"score": score, "predict": predict}[job], "main"), argv) for job, argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "tensorflow": "tensorflow" in sys.modules, "ray": "ray" in sys.modules}))
"""


def test_score_and_predict_refuse_hostile_or_unfinished_models_before_any_work(models, tmp_path):
    registry = tmp_path / "registry"
    (registry / "evil").mkdir(parents=True)
    (registry / "evil" / "production.json").write_text(json.dumps(
        {"version": f"../../../{Path(models['safe']).name}", "history": []}))
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(fx.encode(fx.solid(), "PNG"))
    cases = {
        "is not valid": f"{registry}#evil",  # production.json naming a folder outside the registry
        "only .keras models are loaded in safe mode": models["lambda_h5"],
        "contains code (a Lambda layer 'lambda')": models["lambda_keras"],
        "is not a completed training run (no summary.json)": models["unfinished"],
    }
    argv = []
    for model in cases.values():
        argv.append(["score", ["--model", model, "--images", str(image.parent), "--output", str(tmp_path / "out")]])
    for model in cases.values():
        argv.append(["predict", ["--model", model, str(image)]])
    proc = subprocess.run([sys.executable, "-c", JOBS_SCRIPT, json.dumps(argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [2] * len(argv)
    assert not result["tensorflow"] and not result["ray"]  # refused while planning
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == len(argv) and all(line.startswith("error: ") for line in lines), proc.stderr
    for expected, line in zip(list(cases) * 2, lines):
        assert expected in line, (expected, line)
    assert not (tmp_path / "out").exists()


def test_unsafe_models_load_only_when_allowed(models, tmp_path):
    storage = StorageConfig()
    for model in (models["lambda_h5"], models["lambda_keras"]):
        with pytest.raises(UsageError, match="--allow-unsafe"):
            check_model_reference(model, storage)
        location, _ = check_model_reference(model, storage, allow_unsafe=True)
        assert load_artifact(location, storage, allow_unsafe=True).labels == ["a", "b"]
    with pytest.raises(UsageError, match="only .keras models"):  # the loader refuses too
        load_artifact(models["lambda_h5"], storage)
    with pytest.raises(UsageError, match="refused in safe mode"):
        load_artifact(models["lambda_keras"], storage)
    # a warm start says what it takes
    with pytest.raises(UsageError, match="a warm start takes safe .keras models only"):
        check_model_reference(models["lambda_keras"], storage, hint="a warm start takes safe .keras models only")
    with pytest.raises(UsageError, match="not a completed training run"):
        check_model_reference(models["unfinished"], storage, allow_unsafe=True)  # never, even when allowed


def test_completed_runs_and_registry_versions_are_accepted(models, tmp_path):
    storage = StorageConfig()
    assert check_model_reference(models["safe"], storage) == (models["safe"], models["safe"])
    model_file = os.path.join(models["safe"], "model.keras")
    assert check_model_reference(model_file, storage)[0] == model_file
    registry = str(tmp_path / "registry")
    version = reg.register_run(registry, "m", models["safe"], storage, metrics={}, data="d")["version"]
    reg.promote(registry, "m", version, storage, reason="test")
    location, shown = check_model_reference(f"{registry}#m", storage)
    assert location == reg.version_uri(registry, "m", version) and shown == f"{registry}#m@{version}"
    assert load_artifact(location, storage).labels == ["a", "b"]


def test_a_warm_start_from_an_unfinished_run_or_a_model_with_code_is_refused(models, tmp_path, capsys):
    from jobs import train as train_job
    from pipeline.data.shards import FORMAT_VERSION, MANIFEST_NAME, SPLITS

    data = tmp_path / "shards"
    data.mkdir()
    (data / MANIFEST_NAME).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "classes": ["a", "b"],
        "splits": {split: {"num_examples": 1, "shards": []} for split in SPLITS}}))
    cases = {
        "model.init_from: " + models["unfinished"] + " is not a completed training run": models["unfinished"],
        "a Lambda layer 'lambda') and is refused in safe mode; a warm start takes": models["lambda_keras"],
        "only .keras models are loaded in safe mode": models["lambda_h5"],
    }
    for expected, donor in cases.items():
        capsys.readouterr()
        code = run(train_job.main, ["--data", str(data), "--output", str(tmp_path / "run"),
                                    "--set", f"model.init_from={donor}", "--set", "model.weights=none"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], (code, err)
    assert not (tmp_path / "run").exists()
