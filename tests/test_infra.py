"""infra/ stays valid and consistent with the code: every YAML parses, the
workflow passes GitHub's schema (and actionlint where installed), the cluster
config passes Ray's own schema, and pins, images, entrypoints, flags and
config paths agree with pyproject.toml and jobs/. Offline, a few seconds."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
RUNTIME_ENV = INFRA / "runtime_env.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER = INFRA / "ray" / "cluster.yaml"
WORKFLOW = INFRA / "ci" / "retrain.yml"
RAYJOBS = sorted((INFRA / "k8s").glob("*.yaml"))  # RayJobs and the RayCronJob
CRONJOB = INFRA / "k8s" / "retrain-raycronjob.yaml"
KUBERAY_CRDS = ROOT / "tests" / "data" / "kuberay"

# The jobs and the flags each one documents (the README's command reference).
# A flag used in infra/ must be in this contract and in the module's argparse source.
JOBS = {"prepare", "train", "score", "predict", "registry"}
CONTRACT_FLAGS = {
    "prepare": {"--src", "--dst", "--val-fraction", "--shard-size-mb"},
    "train": {"--data", "--output", "--config", "--set", "--registry", "--name"},
    "score": {"--model", "--images", "--output", "--batch-size", "--top-k", "--concurrency"},
    "predict": {"--model", "--plot"},
    "registry": {"--registry", "--name", "--version"},
}
REQUIRED_FLAGS = {
    "prepare": {"--src", "--dst"},
    "train": {"--data", "--output"},
    "score": {"--model", "--images", "--output"},
    "predict": {"--model"},
    "registry": {"--registry", "--name"},
}

# No network for anything these tests start: a request would fail fast.
OFFLINE_ENV = {
    **os.environ,
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}


# --- helpers -----------------------------------------------------------------

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([A-Za-z0-9.+!-]+)$")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, str]:
    """{canonical name: version} of [project] dependencies, all exact pins."""
    pins = {}
    for req in pyproject()["project"]["dependencies"]:
        match = PIN.match(req.replace(" ", ""))
        assert match, f"pyproject dependency is not an exact pin: {req}"
        pins[canonical(match.group(1))] = match.group(3)
    return pins


def walk(node, path=()):
    """Every (path, value) in a parsed YAML tree."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, path + (i,))


def workflow() -> dict:
    return load_yaml(WORKFLOW)


def workflow_on(wf: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean true.
    return wf.get("on", wf.get(True))


def workflow_steps(wf: dict) -> list[dict]:
    return [step for job in wf["jobs"].values() for step in job.get("steps", [])]


def rayjob_spec(doc: dict) -> dict:
    """The RayJob spec of a RayJob, or of the RayJobs a RayCronJob creates."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def entrypoint_script(spec: dict) -> str:
    """The shell text of an entrypoint: a `bash -c "..."` entrypoint's script
    (as the submitter's shell hands it on), else the entrypoint itself."""
    words = shlex.split(spec["entrypoint"])
    return words[2] if words[:2] == ["bash", "-c"] and len(words) == 3 else spec["entrypoint"]


def rayjob_containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group, group spec, container) for the head and every worker group."""
    spec = rayjob_spec(doc)["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, group, c) for name, group in groups for c in group["template"]["spec"]["containers"]]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- entrypoints: `python -m jobs.<name> ...` wherever infra/ writes one -------

ENTRY = re.compile(r"\bpython3?\s+-m\s+jobs\.(\w+)(.*)")
SHELL_STOP = {"2>&1"}


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """(job, argument tokens) for each `python -m jobs.X` in a shell text."""
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        for match in ENTRY.finditer(line):
            lexer = shlex.shlex(match.group(2), posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, ""
            try:
                tokens = list(lexer)
            except ValueError:  # unbalanced quotes: prose, not a command
                tokens = match.group(2).split()
            for i, token in enumerate(tokens):
                if token in SHELL_STOP or set(token) <= set(";&|<>()") or token.startswith("#"):
                    tokens = tokens[:i]
                    break
            found.append((match.group(1), tokens))
    return found


def comment_text(path: Path) -> str:
    """The file's `#` comment lines with the marker removed (usage examples)."""
    out = []
    for line in path.read_text().splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#"):
            out.append(stripped[1:])
    return "\n".join(out)


def all_entrypoints() -> list[tuple[str, str, list[str]]]:
    """(where, job, tokens) from RayJob entrypoints, workflow steps and the usage
    comments of every infra file and example config."""
    found = []
    for path in RAYJOBS:
        for doc in yaml.safe_load_all(path.read_text()):
            for job, tokens in commands_in(entrypoint_script(rayjob_spec(doc))):
                found.append((f"{path.name}:entrypoint", job, tokens))
    for i, step in enumerate(workflow_steps(workflow())):
        for job, tokens in commands_in(step.get("run", "")):
            found.append((f"{WORKFLOW.name}:step{i}:{step.get('name', '')}", job, tokens))
    commented = [p for p in sorted(INFRA.rglob("*")) if p.is_file()] + sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
    for path in commented:
        for job, tokens in commands_in(comment_text(path)):
            found.append((f"{path.relative_to(ROOT)}:comment", job, tokens))
    return found


def flags_of(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if re.match(r"^--[a-z][a-z0-9-]*", t)]


def value_of(tokens: list[str], flag: str) -> str | None:
    for i, token in enumerate(tokens):
        if token == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def job_source(job: str) -> str | None:
    for path in (ROOT / "jobs" / f"{job}.py", ROOT / "jobs" / job / "__main__.py"):
        if path.exists():
            # The common flags (--config, --set, --address, --quiet) live in _cli.py.
            return path.read_text() + (ROOT / "jobs" / "_cli.py").read_text()
    return None


def source_flags(source: str) -> set[str]:
    return set(re.findall(r"add_argument\(\s*(?:\"-\w\",\s*)?\"(--[\w-]+)\"", source))


ENTRYPOINTS = all_entrypoints()


# --- every file parses -----------------------------------------------------------

@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_infra_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_the_infra_files_exist():
    for path in (RUNTIME_ENV, DOCKERFILE, CLUSTER, WORKFLOW):
        assert path.is_file(), path
    assert {p.name for p in RAYJOBS} >= {"train-rayjob.yaml", "score-rayjob.yaml", CRONJOB.name}


# --- runtime_env -----------------------------------------------------------------

def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**load_yaml(RUNTIME_ENV))  # Ray's own validation
    assert env.env_vars()["TF_USE_LEGACY_KERAS"] == "1"
    assert all(isinstance(v, str) for v in env.env_vars().values())
    assert "working_dir" not in env, "the working dir comes from `--working-dir .`"


def test_runtime_env_pins_are_pyprojects():
    packages = load_yaml(RUNTIME_ENV)["pip"]["packages"]
    assert sorted(packages) == sorted(pyproject()["project"]["dependencies"])


def test_runtime_env_upload_excludes_heavy_folders_but_not_code():
    from ray._private.runtime_env.packaging import _get_excludes  # what `ray job submit` applies

    excluded = _get_excludes(ROOT, load_yaml(RUNTIME_ENV)["excludes"])
    for heavy in (".venv", ".git", "demo_output", "jobs/__pycache__", ".pytest_cache", "x.egg-info",
                  "tests/data/kuberay/ray.io_rayjobs.yaml"):
        assert excluded(ROOT / heavy), heavy
    for needed in ("jobs/train.py", "jobs/_cli.py", "pipeline/config.py", "jobs/configs/demo.yaml",
                   "jobs/configs/inceptionv3_imagenet.yaml", "pyproject.toml", "infra/runtime_env.yaml"):
        assert not excluded(ROOT / needed), needed


# --- Dockerfile --------------------------------------------------------------------

def test_dockerfile_base_image_is_pinned_and_matches_ray_and_python():
    froms = [[t for t in args.split() if not t.startswith("--")][0]
             for word, args in dockerfile_instructions() if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag and tag != "latest" and "latest" not in tag, f"base image not pinned: {image}"
    base = froms[-1]
    if base.startswith("rayproject/ray:"):
        tag = base.split(":", 1)[1]
        assert tag.startswith(pyproject_pins()["ray"] + "-"), f"{base} is not Ray {pyproject_pins()['ray']}"
        py = re.search(r"(\d)\.(\d+)", pyproject()["project"]["requires-python"])
        assert f"-py{py.group(1)}{py.group(2)}" in tag, f"{base} is not Python {py.group(0)}"


def test_dockerfile_installs_pyproject_pins_and_the_package():
    pins = pyproject_pins()
    runs = " ".join(args for word, args in dockerfile_instructions() if word == "RUN")
    installed = {}
    for req in re.findall(r"[\"']?([A-Za-z0-9][\w.-]*(?:\[[^\]]*\])?==[\w.+!-]+)[\"']?", runs):
        match = PIN.match(req)
        installed[canonical(match.group(1))] = match.group(3)
    for name in ("tensorflow", "tf-keras", "ray"):
        assert installed.get(name) == pins[name], f"Dockerfile {name}=={installed.get(name)}, pyproject {pins[name]}"
    for name, version in installed.items():
        if name in pins:
            assert version == pins[name], f"Dockerfile {name}=={version}, pyproject {pins[name]}"
    assert "tensorflow[and-cuda]==" in runs, "the GPU image needs TensorFlow's CUDA wheels"
    assert re.search(r"pip install (--\S+ )*\.(\s|$|&)", runs), "the package itself (`pip install .`)"


def test_dockerfile_env_user_workdir_and_copies():
    instructions = dockerfile_instructions()
    env = {}
    for word, args in instructions:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
            assert not re.search(r"AWS_(SECRET|ACCESS|SESSION)", args), "credentials baked into the image"
        if word == "ARG":
            assert not re.search(r"AWS_(SECRET|ACCESS|SESSION)", args), "credentials as build args"
    assert env.get("TF_USE_LEGACY_KERAS") == "1"
    users = [args.split(":")[0] for word, args in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    workdirs = [args for word, args in instructions if word == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/")
    for word, args in instructions:
        if word == "COPY" and "--from" not in args:
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def dockerfile_workdir() -> str:
    return [args for word, args in dockerfile_instructions() if word == "WORKDIR"][-1]


# --- images: one tag everywhere ------------------------------------------------------

def cluster_images() -> list[str]:
    docker = load_yaml(CLUSTER)["docker"]
    return [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]


def rayjob_images() -> list[str]:
    return [c["image"] for path in RAYJOBS for doc in yaml.safe_load_all(path.read_text())
            for _, _, c in rayjob_containers(doc)]


def test_one_image_tag_everywhere_and_it_is_the_package_version():
    documented = re.findall(r"docker build .*-t (\S+)", DOCKERFILE.read_text())
    images = set(cluster_images()) | set(rayjob_images()) | set(documented)
    assert len(images) == 1, f"cluster.yaml, the RayJobs and the Dockerfile name different images: {images}"
    image = images.pop()
    tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
    assert tag == pyproject()["project"]["version"], f"{image}: tag is not the package version"


# --- Ray cluster launcher ---------------------------------------------------------------

def test_cluster_yaml_passes_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load_yaml(CLUSTER), schema)


def test_cluster_yaml_head_cpu_workers_gpu_and_bounds():
    cfg = load_yaml(CLUSTER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu = [t for t in workers.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    # jobs.train stops (exit 2) on a cluster without GPUs when use_gpu is set.
    assert any(t["min_workers"] >= 1 for t in gpu)


def test_cluster_yaml_start_commands_and_auth():
    cfg = load_yaml(CLUSTER)
    head, worker = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


# --- KubeRay RayJobs and the RayCronJob ------------------------------------------------------

# The RayJob a RayCronJob creates is named "<RayCronJob>-<minutes since 1970>".
CRON_SUFFIX = "-29412345"
TTL_MAX_S = 600  # minutes, not hours: idle GPU workers cost money


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_manifest(path):
    (doc,) = list(yaml.safe_load_all(path.read_text()))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayJob", "RayCronJob")
    # KubeRay's own checks (ValidateRayJobMetadata/Spec), with RUN_ID filled in
    # the way the header comment says.
    name = doc["metadata"]["name"].replace("RUN_ID", "20261130-120000")
    if doc["kind"] == "RayCronJob":
        name += CRON_SUFFIX
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    spec = rayjob_spec(doc)
    assert spec["shutdownAfterJobFinishes"] is True
    # With shutdownAfterJobFinishes, the delay before KubeRay deletes the cluster.
    ttl = spec["ttlSecondsAfterFinished"]
    assert isinstance(ttl, int) and 0 <= ttl <= TTL_MAX_S, f"ttlSecondsAfterFinished {ttl}: GPUs idle that long"
    assert spec.get("activeDeadlineSeconds", 1) > 0
    assert spec.get("backoffLimit", 0) > 0, "a failed attempt is retried (and resumes)"
    assert not spec.get("clusterSelector") and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pyproject_pins()["ray"]
    assert cluster.get("authOptions", {}).get("mode") == "token"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == load_yaml(RUNTIME_ENV)["env_vars"]
    assert runtime_env["working_dir"] == dockerfile_workdir(), "the image's code is what the job runs"

    gpu_groups = []
    for group, group_spec, container in rayjob_containers(doc):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{group}: {kind} needs cpu and memory"
        gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
        if group == "head":
            assert gpus == 0, "the head needs no GPU"
        elif gpus:
            gpu_groups.append(group)
            assert group_spec["minReplicas"] <= group_spec["replicas"] <= group_spec["maxReplicas"]
        if "gpu" in group:
            assert gpus >= 1, f"worker group {group} requests no GPU"
        assert any(src.get("secretRef") for src in container.get("envFrom", [])), f"{group}: no AWS Secret"
    assert gpu_groups, "no GPU worker group"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_ttl_comment_says_what_it_does(path):
    """The comment above ttlSecondsAfterFinished: KubeRay deletes the cluster that
    long after the job finishes (with shutdownAfterJobFinishes)."""
    lines = path.read_text().splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.strip().startswith("ttlSecondsAfterFinished:")]
    above = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith(("#", "shutdownAfterJobFinishes")):
            break
        above.insert(0, line.strip().lstrip("# "))
    comment = " ".join(above)
    assert re.search(r"deletes the Ray cluster .*ttlSecondsAfterFinished seconds after the\s+job finishes", comment), comment
    assert "day" not in comment


def test_run_directory_is_stable_across_retries():
    """A retry re-runs the same entrypoint: its --output must not depend on the
    attempt (a fixed RUN_ID, or the RayJob's own name)."""
    for path in RAYJOBS:
        (doc,) = list(yaml.safe_load_all(path.read_text()))
        script = entrypoint_script(rayjob_spec(doc))
        outputs = [value_of(tokens, "--output") for job, tokens in commands_in(script) if job in ("train", "score")]
        assert outputs, path.name
        for output in outputs:
            assert "$(" not in output and "`" not in output and "RANDOM" not in output, f"{path.name}: {output}"
            if doc["kind"] == "RayJob":
                assert "RUN_ID" in output, f"{path.name}: {output}"
            else:
                assert output.endswith("/$RETRAIN_RUN"), f"{path.name}: {output}"


# KubeRay copies a RayCronJob's jobTemplate into each RayJob and labels the
# submitter pod with the RayJob's name; the submitter runs
#   bash -ce -- '... ray job submit --address ... --no-wait ... -- <entrypoint> ; fi ; ...'
# (ray-operator/controllers/ray/common/job.go), and `ray job submit` hands the
# words after `--` to the head's shell as shlex.join(words).
SUBMITTER_LABEL = "ray.io/originated-from-cr-name"
FAKE_RAY = """#!{python}
import shlex, sys
args = sys.argv[1:]
print(shlex.join(args[args.index("--") + 1:]))
"""
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
"""


def cron_doc() -> dict:
    return load_yaml(CRONJOB)


def submitter_env(doc: dict) -> dict:
    (container,) = rayjob_spec(doc)["submitterPodTemplate"]["spec"]["containers"]
    return {e["name"]: e for e in container.get("env", [])}


def run_cron_tick(tmp_path: Path, rayjob_name: str, prepare: str) -> list[str]:
    """The commands the head runs for one RayJob of the RayCronJob."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(FAKE_RAY.format(python=sys.executable))
    (bin_dir / "python").write_text(FAKE_PYTHON)
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "CALLS": str(tmp_path / "calls"),
           "RETRAIN_RUN": rayjob_name, "RETRAIN_PREPARE": prepare}
    entrypoint = rayjob_spec(cron_doc())["entrypoint"].strip()
    submitter = f"ray job submit --address http://head:8265 --no-wait -- {entrypoint} ;"
    handed = subprocess.run(["bash", "-ce", "--", submitter], capture_output=True, text=True, env=env, timeout=30)
    assert handed.returncode == 0, handed.stderr
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    # On the head: the job's shell, without the submitter's variables.
    head_env = {"PATH": env["PATH"], "CALLS": env["CALLS"]}
    ran = subprocess.run(["bash", "-c", handed.stdout.strip()], capture_output=True, text=True, env=head_env,
                         timeout=30)
    assert ran.returncode == 0, ran.stderr
    return calls.read_text().splitlines()


def test_raycronjob_prepares_when_asked_then_trains_and_registers(tmp_path):
    doc = cron_doc()
    assert doc["kind"] == "RayCronJob" and len(doc["spec"]["schedule"].split()) == 5
    assert doc["spec"].get("suspend") is not True
    env = submitter_env(doc)
    assert env["RETRAIN_RUN"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{SUBMITTER_LABEL}']"
    assert env["RETRAIN_PREPARE"]["value"] in ("true", "false")
    run_name = "inception-retrain" + CRON_SUFFIX

    trained = run_cron_tick(tmp_path, run_name, "false")
    assert len(trained) == 1 and trained[0].startswith("-m jobs.train ")
    tokens = shlex.split(trained[0])
    assert value_of(tokens, "--output").endswith(f"/runs/{run_name}")
    assert value_of(tokens, "--registry") and value_of(tokens, "--name")
    default_data = value_of(tokens, "--data")

    prepared = run_cron_tick(tmp_path, run_name, "true")
    assert [c.split()[1] for c in prepared] == ["jobs.prepare", "jobs.train"]
    prepare, train = (shlex.split(c) for c in prepared)
    assert value_of(prepare, "--dst").endswith(f"/{run_name}") and "--skip-existing" in prepare
    assert value_of(train, "--data") == value_of(prepare, "--dst") != default_data
    assert value_of(train, "--output") == value_of(tokens, "--output")


# Strict validation against KubeRay's own CRDs (tests/data/kuberay, copied
# unchanged from the KubeRay repository; see SOURCE.md there).

# ObjectMeta fields a manifest may set (the CRDs leave top-level metadata to
# the API server).
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}


def strict_schema(node):
    """KubeRay's structural schema as JSON Schema that refuses what it does not
    define: every object schema with properties gets additionalProperties
    false unless it sets additionalProperties or x-kubernetes-preserve-unknown-
    fields; int-or-string and nullable become JSON Schema types."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = strict_schema(value)
        elif key == "x-kubernetes-validations":
            continue  # CEL rules: KubeRay's webhook/controller checks, not JSON Schema
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_validator(kind: str):
    import jsonschema

    files = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
    assert kind in files, f"no CRD for {kind} in {KUBERAY_CRDS}"
    crd = yaml.load((KUBERAY_CRDS / files[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


_VALIDATORS: dict = {}


def crd_errors(doc: dict) -> list[str]:
    kind = doc["kind"]
    if kind not in _VALIDATORS:
        _VALIDATORS[kind] = crd_validator(kind)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in _VALIDATORS[kind].iter_errors(doc)]
    errors += [f"metadata.{key}: not an ObjectMeta field a manifest sets" for key in set(doc["metadata"]) - OBJECT_META]
    return errors


def test_crds_are_kuberays_with_their_source_noted():
    source = (KUBERAY_CRDS / "SOURCE.md").read_text()
    assert "github.com/ray-project/kuberay" in source and re.search(r"\b[0-9a-f]{40}\b", source)
    assert "Apache" in (KUBERAY_CRDS / "LICENSE").read_text()


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_manifest_passes_kuberays_crd_strictly(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    ray_docs = [d for d in docs if d.get("apiVersion") == "ray.io/v1"]
    assert ray_docs, f"{path.name}: no ray.io/v1 resource"
    for doc in ray_docs:
        errors = crd_errors(doc)
        assert not errors, f"{path.name}: " + "; ".join(errors)


@pytest.mark.parametrize("where,value", [
    (("spec", "ttlSecondAfterFinished"), 300),  # a typo of a real field
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resource"), {}),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replica"), 2),
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "metadata", "labelz"), {}),
    (("metadata", "labelz"), {}),
])
def test_strict_validation_refuses_an_unknown_field(where, value):
    doc = load_yaml(INFRA / "k8s" / "train-rayjob.yaml")
    assert not crd_errors(doc)
    node = doc
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    errors = crd_errors(doc)
    assert errors and any(str(where[-1]) in e for e in errors), errors


def test_strict_validation_refuses_wrong_types_and_unknown_fields_in_the_cronjob():
    doc = cron_doc()
    assert not crd_errors(doc)
    doc["spec"]["jobTemplate"]["backoffLimit"] = "2"
    doc["spec"]["concurrencyPolicy"] = "Forbid"  # a CronJob field RayCronJob does not have
    errors = crd_errors(doc)
    assert any("backoffLimit" in e for e in errors) and any("concurrencyPolicy" in e for e in errors), errors
    # Quantities are int-or-string: both pass.
    doc = cron_doc()
    doc["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["cpu"] = 4
    assert not crd_errors(doc)


# --- GitHub workflow ------------------------------------------------------------------------

def test_workflow_passes_githubs_schema_offline(tmp_path):
    check = BIN / "check-jsonschema"
    assert check.exists(), "check-jsonschema is a dev dependency (pip install -e '.[dev]')"
    ok = subprocess.run([str(check), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                        capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The schema is really applied: a job without runs-on is refused.
    broken = workflow()
    del broken["jobs"]["retrain"]["runs-on"]
    bad = tmp_path / "broken.yml"
    bad.write_text(yaml.safe_dump(broken))
    refused = subprocess.run([str(check), "--builtin-schema", "vendor.github-workflows", str(bad)],
                             capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert refused.returncode != 0, refused.stdout


def actionlint() -> str | None:
    found = BIN / "actionlint"
    return str(found) if found.exists() else shutil.which("actionlint")


def test_workflow_passes_actionlint(tmp_path):
    exe = actionlint()
    assert exe is not None, "actionlint is a dev dependency (pip install -e '.[dev]')"
    # shellcheck (from the venv) is on PATH, so run: scripts are checked too.
    lint = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True,
                          env=OFFLINE_ENV, timeout=120, cwd=tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    injected = WORKFLOW.read_text().replace('run: python -m pip install "ray',
                                            'run: echo "${{ github.event.head_commit.message }}" && python -m pip install "ray')
    assert injected != WORKFLOW.read_text()
    bad = tmp_path / "injected.yml"
    bad.write_text(injected)
    refused = subprocess.run([exe, "-no-color", str(bad)], capture_output=True, text=True,
                             env=OFFLINE_ENV, timeout=120, cwd=tmp_path)
    assert refused.returncode != 0, "actionlint should flag script injection"


def test_workflow_schedule_dispatch_concurrency_and_pins():
    wf = workflow()
    on = workflow_on(wf)
    assert on["schedule"] and all(len(s["cron"].split()) == 5 for s in on["schedule"])
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["run_prepare"]["type"] == "boolean"
    assert (ROOT / inputs["config"]["default"]).is_file()
    assert wf["concurrency"]["cancel-in-progress"] is False
    for step in workflow_steps(wf):
        if "uses" in step:
            assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", step["uses"]), f"unpinned action {step['uses']}"
        if "actions/setup-python" in step.get("uses", ""):
            py = re.search(r"\d\.\d+", pyproject()["project"]["requires-python"]).group(0)
            assert str(step["with"]["python-version"]) == py
    runs = "\n".join(step.get("run", "") for step in workflow_steps(wf))
    assert f'"ray[default]=={pyproject_pins()["ray"]}"' in runs


def test_workflow_submits_with_the_runtime_env_and_reports_the_gate():
    steps = workflow_steps(workflow())
    submits = [s for s in steps if "ray job submit" in s.get("run", "")]
    assert {job for s in submits for job, _ in commands_in(s["run"])} >= {"train"}
    for step in submits:
        run = re.sub(r"\\\n", " ", step["run"])
        assert "--working-dir ." in run and "--runtime-env infra/runtime_env.yaml" in run
        assert '--address "$RAY_ADDRESS"' in run
    (train,) = [s for s in submits if "jobs.train" in s["run"]]
    assert "${{ github.run_id }}" in workflow()["jobs"]["retrain"]["env"]["RUN_OUTPUT"]
    (report,) = [s for s in steps if "infra/ci/report_gate.py" in s.get("run", "")]
    assert report["if"].startswith("always()")
    assert '--job-id "$SUBMISSION_ID-train" --run-output "$RUN_OUTPUT"' in report["run"]


# --- the retrain report: infra/ci/report_gate.py ---------------------------------------------

REPORT = INFRA / "ci" / "report_gate.py"


def sample_summary(promoted: bool | None) -> dict:
    """A train summary.json as pipeline.training.driver writes it; promoted None: no registry."""
    summary = {"job": "train", "output": "s3://b/runs/7", "min_val_accuracy": None,
               "metrics": {"examples": 120, "accuracy": 0.81, "top_k": 3, "top_k_accuracy": 0.97, "macro_f1": 0.8},
               "history": [{"phase": "finetune", "epoch": 1, "loss": 0.5}], "registry": None}
    if promoted is not None:
        summary["registry"] = {
            "registry": "s3://b/registry", "name": "flowers", "version": "20261201-031700-abc123",
            "accuracy": 0.81, "production_before": "20261124-031700-def456", "production_accuracy": 0.84,
            "tolerance": 0.0, "promoted": promoted,
            "reason": "no production version yet" if promoted else "accuracy 0.8100 below production's 0.8400 - 0.0",
            "production": "20261201-031700-abc123" if promoted else "20261124-031700-def456"}
    return summary


def run_report(tmp_path: Path, code: int, summary: dict | None, *flags: str) -> tuple[int, str, str]:
    """(exit status, stdout with the annotations, the run summary written)."""
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("")
    args = [sys.executable, str(REPORT), "--exit-code", str(code), "--run-output", "s3://b/runs/7", *flags]
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        args += ["--summary", str(tmp_path / "summary.json")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**OFFLINE_ENV, "GITHUB_STEP_SUMMARY": str(step_summary)})
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout, step_summary.read_text()


def annotations(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^::(error|warning|notice) title=([^:]*)::", stdout, re.M)]


def test_report_promoted_is_green_with_a_notice(tmp_path):
    code, out, md = run_report(tmp_path, 0, sample_summary(True), "--fail-if-not-promoted")
    assert code == 0 and annotations(out) == [("notice", "Promoted")]
    assert md.startswith("## Retrain: trained, promoted to production (exit code 0)")
    assert "version 20261201-031700-abc123" in md and '"history"' not in md


def test_report_not_promoted_is_a_warning_with_the_reason(tmp_path):
    summary = sample_summary(False)
    reason = summary["registry"]["reason"]
    code, out, md = run_report(tmp_path, 0, summary)
    assert code == 0, "without --fail-if-not-promoted the run stays green"
    assert annotations(out) == [("warning", "Not promoted")]
    assert reason in out and "production stays 20261124-031700-def456" in out
    assert md.startswith("## Retrain: trained, NOT promoted (exit code 0)")
    assert f"**not promoted**: {reason}" in md.split("\n\n")[1], "the reason sits at the top of the summary"
    # The input fail_on_not_promoted: the same report, as an error, and the step fails.
    code, out, md = run_report(tmp_path, 0, summary, "--fail-if-not-promoted")
    assert code == 1 and annotations(out) == [("error", "Not promoted")] and reason in out


def test_report_failed_job_keeps_its_exit_code(tmp_path):
    code, out, md = run_report(tmp_path, 1, None, "--verdict", "failed: training failed: OOM")
    assert code == 1 and annotations(out) == [("error", "Training failed (exit 1)")]
    assert "failed: training failed: OOM" in out and "no summary.json" in md
    gate = sample_summary(False)
    gate["min_val_accuracy"] = 0.9
    code, out, md = run_report(tmp_path, 3, gate, "--verdict", "quality gate: validation accuracy 0.8100 is below")
    assert code == 3 and annotations(out) == [("error", "Quality gate not met")]
    assert md.startswith("## Retrain: quality gate not met (exit code 3)")
    code, out, _ = run_report(tmp_path, 0, sample_summary(None))
    assert code == 0 and annotations(out) == []


def test_report_annotation_messages_are_escaped():
    sys.path.insert(0, str(REPORT.parent))
    try:
        import report_gate
    finally:
        sys.path.remove(str(REPORT.parent))
    line = report_gate.annotation("warning", "Not promoted: a, b", "100% sure\nsecond line")
    assert line == "::warning title=Not promoted%3A a%2C b::100%25 sure%0Asecond line"


def test_workflow_wires_the_fail_on_not_promoted_input(tmp_path):
    wf = workflow()
    fail_input = workflow_on(wf)["workflow_dispatch"]["inputs"]["fail_on_not_promoted"]
    assert fail_input["type"] == "boolean" and fail_input["default"] is False
    (report,) = [s for s in workflow_steps(wf) if "infra/ci/report_gate.py" in s.get("run", "")]
    assert "inputs.fail_on_not_promoted" in report["env"]["FAIL_ON_NOT_PROMOTED"]
    assert "vars.RETRAIN_FAIL_ON_NOT_PROMOTED" in report["env"]["FAIL_ON_NOT_PROMOTED"]
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text('#!/bin/sh\necho "$*"\n')
    (shim / "python").chmod(0o755)
    for setting, expected in (("true", True), ("false", False)):
        env = {"PATH": f"{shim}{os.pathsep}/usr/bin{os.pathsep}/bin", "FAIL_ON_NOT_PROMOTED": setting,
               "SUBMISSION_ID": "retrain-1-1", "RUN_OUTPUT": "s3://b/runs/1"}
        ran = subprocess.run(["bash", "-e", "-c", report["run"]], capture_output=True, text=True, env=env, timeout=30)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.startswith("infra/ci/report_gate.py --job-id retrain-1-1-train --run-output s3://b/runs/1")
        assert ("--fail-if-not-promoted" in ran.stdout) is expected


# --- entrypoints ------------------------------------------------------------------------------

def test_entrypoints_cover_train_and_score():
    where = {(w.split(":")[0], job) for w, job, _ in ENTRYPOINTS}
    assert ("train-rayjob.yaml", "train") in where and ("score-rayjob.yaml", "score") in where
    assert (WORKFLOW.name, "train") in where
    assert ("infra/ray/cluster.yaml", "train") in where


@pytest.mark.parametrize("where,job,tokens", ENTRYPOINTS, ids=[f"{w}:{j}" for w, j, _ in ENTRYPOINTS])
def test_entrypoint_names_a_job_and_its_flags(where, job, tokens):
    assert job in JOBS, f"{where}: jobs.{job} is not one of {sorted(JOBS)}"
    flags = flags_of(tokens)
    missing = REQUIRED_FLAGS[job] - set(flags)
    assert not missing, f"{where}: jobs.{job} needs {sorted(missing)}"
    config = value_of(tokens, "--config")
    if config and "$" not in config and "://" not in config:
        assert (ROOT / config).is_file(), f"{where}: --config {config} does not exist"

    source = job_source(job)
    known = CONTRACT_FLAGS[job] | (source_flags(source) if source else set())
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{where}: jobs.{job} has no flag {unknown}"
    assert source is not None, f"{where}: jobs/{job}.py does not exist"
    pending = [f for f in flags if f not in source_flags(source)]
    assert not pending, f"{where}: jobs.{job} does not define {pending}"


def test_entrypoint_parser_reads_what_infra_writes():
    text = 'ray job submit -- \\\n  python -m jobs.score --model \'s3://r#m\' --images "$IMG" --output o; echo done'
    assert commands_in(text) == [("score", ["--model", "s3://r#m", "--images", "$IMG", "--output", "o"])]
    assert source_flags('p.add_argument(\n    "--set",\n)\np.add_argument("-q", "--quiet")') == {"--set", "--quiet"}


# --- secrets ------------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b", re.IGNORECASE),
]
AWS_SECRET_NAMES = re.compile(r"^AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)$|^RAY_AUTH_TOKEN$")


def scanned_files() -> list[Path]:
    return [p for p in sorted(INFRA.rglob("*")) if p.is_file()] + sorted((ROOT / "jobs" / "configs").glob("*"))


def test_secret_patterns_catch_a_literal_key():
    key_id, secret = "AKIA" + "IOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert SECRET_PATTERNS[0].search(f"AWS_ACCESS_KEY_ID={key_id}")
    assert SECRET_PATTERNS[1].search(f"aws_secret_access_key = {secret}")


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_literal_credentials(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path}: literal AWS credential"
    if path.suffix not in (".yaml", ".yml"):
        return
    for doc in yaml.safe_load_all(text):
        for keys, value in walk(doc):
            # mapping style (workflow env, runtime env_vars): only ${{ secrets.X }}
            if keys and isinstance(keys[-1], str) and AWS_SECRET_NAMES.match(keys[-1]):
                assert isinstance(value, str) and re.fullmatch(r"\$\{\{\s*secrets\.\w+\s*\}\}", value), \
                    f"{path}: {keys[-1]} must come from secrets.*"
            # Kubernetes env list: valueFrom.secretKeyRef, never value
            if isinstance(value, dict) and AWS_SECRET_NAMES.match(str(value.get("name", ""))):
                assert "value" not in value and "secretKeyRef" in value.get("valueFrom", {}), \
                    f"{path}: {value['name']} must come from a Secret"


def test_no_credentials_in_runtime_envs():
    """env_vars show in the dashboard and job metadata: credentials never go there."""
    envs = [load_yaml(RUNTIME_ENV)] + [yaml.safe_load(rayjob_spec(doc)["runtimeEnvYAML"]) for path in RAYJOBS
                                       for doc in yaml.safe_load_all(path.read_text())]
    for env in envs:
        assert not [k for k in env.get("env_vars", {}) if AWS_SECRET_NAMES.match(k) or k.startswith("AWS_")]


# --- the image carries the ImageNet weights ------------------------------------------------------

def test_dockerfile_bakes_the_imagenet_weights_into_the_keras_cache():
    from pipeline.training.model import IMAGENET_NO_TOP_FILE

    instructions = dockerfile_instructions()
    words = [word for word, _ in instructions]
    env = {}
    for word, args in instructions:
        if word == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
    user = [args for word, args in instructions if word == "USER"][-1]
    home = dockerfile_workdir().rsplit("/", 1)[0]
    assert home == f"/home/{user}", "the WORKDIR is under the image user's home"
    keras_home = env.get("KERAS_HOME")
    assert keras_home == f"{home}/.keras", "KERAS_HOME: the image user's Keras cache"
    cached = f"{keras_home}/models/{IMAGENET_NO_TOP_FILE}"
    (at,) = [i for i, (word, args) in enumerate(instructions) if word == "RUN" and IMAGENET_NO_TOP_FILE in args]
    run = instructions[at][1]
    steps = [s.strip() for s in run.split("&&")]
    assert steps[0] == f"mkdir -p {keras_home}/models", "tf_keras falls back to /tmp/.keras without ~/.keras"
    fetch = re.fullmatch(r"python -c \"(.*)\"", steps[1])
    assert fetch, steps[1]
    assert "InceptionV3(include_top=False, weights='imagenet')" in fetch.group(1)
    assert steps[2] == f"test -s {cached}"
    # Fetched as the image's user (into its home), after TensorFlow is installed,
    # before the code layers (a code change does not fetch them again).
    assert words.index("USER") < at and any("tf-keras==" in a for w, a in instructions[:at] if w == "RUN")
    assert at < words.index("COPY")
