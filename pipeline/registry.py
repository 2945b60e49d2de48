"""A model registry on any fsspec URI.

    REGISTRY/<name>/versions/<YYYYmmdd-HHMMSS>-<id>/   immutable copy of a run's artifacts
                                        version.json   written last: a version without it is incomplete
    REGISTRY/<name>/production.json     {"version", "promoted_at", "reason", "history": [...]}
    REGISTRY/<name>/index.json          the versions with their metrics (rebuilt from the folders)

The version folders are the source of truth; ``production.json`` is replaced
atomically and only ever names a complete version, so concurrent writers can
race but never leave a broken pointer. ``REGISTRY#name`` names the production
version of ``name`` wherever a model URI is accepted.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from typing import Optional

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import UsageError
from pipeline.shards import now_utc

VERSIONS = "versions"
VERSION_FILE = "version.json"
PRODUCTION_FILE = "production.json"
INDEX_FILE = "index.json"
ARTIFACTS = ("model.keras", "labels.json", "preprocessing.json", "config.yaml", "history.json", "metrics.json",
             "training.png", "confusion.png")


def parse_reference(uri: str) -> Optional[tuple[str, str]]:
    """``"s3://b/registry#cats"`` -> ``("s3://b/registry", "cats")``; None for plain URIs."""
    if "#" not in uri:
        return None
    registry, _, name = uri.rpartition("#")
    if not registry or not name:
        raise UsageError(f"model reference '{uri}' must look like REGISTRY_URI#name")
    return registry, name


def name_root(registry: str, name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"registry name '{name}' must be a plain folder name")
    return st.join(registry, name)


def version_uri(registry: str, name: str, version: str) -> str:
    return st.join(name_root(registry, name), VERSIONS, version)


def list_versions(registry: str, name: str, storage: StorageConfig) -> list[dict]:
    """Complete versions, oldest first."""
    root = st.join(name_root(registry, name), VERSIONS)
    try:
        fs, path = st.get_fs(root, storage)
        if not fs.exists(path):
            return []
        folders = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read registry {registry}: {st.describe_error(exc)}") from None
    out = []
    for folder in folders:
        try:
            out.append(st.read_json(st.join(root, folder, VERSION_FILE), storage))
        except FileNotFoundError:
            continue  # being written, or abandoned by a killed writer
    return out


def get_version(registry: str, name: str, version: str, storage: StorageConfig) -> dict:
    try:
        return st.read_json(st.join(version_uri(registry, name, version), VERSION_FILE), storage)
    except FileNotFoundError:
        raise UsageError(f"no version '{version}' of '{name}' in {registry}") from None


def read_production(registry: str, name: str, storage: StorageConfig) -> Optional[dict]:
    try:
        return st.read_json(st.join(name_root(registry, name), PRODUCTION_FILE), storage)
    except FileNotFoundError:
        return None


def production_model_uri(reference: str, storage: StorageConfig) -> tuple[str, str]:
    """(version folder URI, "REGISTRY#name@version") for ``REGISTRY#name``."""
    registry, name = parse_reference(reference)
    pointer = read_production(registry, name, storage)
    if pointer is None:
        raise UsageError(f"'{name}' has no production version in {registry}")
    return version_uri(registry, name, pointer["version"]), f"{registry}#{name}@{pointer['version']}"


def register_run(registry: str, name: str, run_uri: str, storage: StorageConfig, *,
                 metrics: dict, data: str) -> dict:
    """Copy a finished run's artifacts into a new immutable version. Registering
    the same run again returns the version it already has."""
    for existing in list_versions(registry, name, storage):
        if existing.get("run") == run_uri:
            return existing
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    version = f"{stamp}-{uuid.uuid4().hex[:6]}"
    target = version_uri(registry, name, version)
    for artifact in ARTIFACTS:
        src = st.join(run_uri, artifact)
        if st.exists(src, storage):
            st.copy_file(src, st.join(target, artifact), storage)
    record = {
        "name": name,
        "version": version,
        "created": now_utc(),
        "run": run_uri,
        "data": data,
        "metrics": {k: metrics[k] for k in ("examples", "accuracy", "top_k", "top_k_accuracy", "macro_f1") if k in metrics},
        "classes": metrics.get("classes"),
    }
    st.write_json(st.join(target, VERSION_FILE), record, storage)  # last: marks the version complete
    write_index(registry, name, storage)
    return record


def write_index(registry: str, name: str, storage: StorageConfig) -> list[dict]:
    versions = list_versions(registry, name, storage)
    pointer = read_production(registry, name, storage)
    st.write_json(
        st.join(name_root(registry, name), INDEX_FILE),
        {"name": name, "production": pointer["version"] if pointer else None, "versions": versions},
        storage,
    )
    return versions


def promote(registry: str, name: str, version: str, storage: StorageConfig, *, reason: str) -> dict:
    """Point production at ``version`` (which must be complete)."""
    get_version(registry, name, version, storage)
    current = read_production(registry, name, storage)
    history = list(current.get("history", [])) if current else []
    if current and current["version"] != version:
        history.append(current["version"])
    pointer = {"version": version, "promoted_at": now_utc(), "reason": reason, "history": history[-50:]}
    st.write_json(st.join(name_root(registry, name), PRODUCTION_FILE), pointer, storage)
    write_index(registry, name, storage)
    return pointer


def rollback(registry: str, name: str, storage: StorageConfig) -> dict:
    """Restore the previous production version."""
    current = read_production(registry, name, storage)
    if not current or not current.get("history"):
        raise UsageError(f"'{name}' has no earlier production version to roll back to")
    history = list(current["history"])
    previous = history.pop()
    get_version(registry, name, previous, storage)
    pointer = {"version": previous, "promoted_at": now_utc(), "reason": f"rollback from {current['version']}",
               "history": history}
    st.write_json(st.join(name_root(registry, name), PRODUCTION_FILE), pointer, storage)
    write_index(registry, name, storage)
    return pointer


def decide(new_accuracy: float, production_accuracy: Optional[float], *, tolerance: float,
           min_val_accuracy: Optional[float]) -> dict:
    """The promotion gate: at least production's accuracy minus ``tolerance``, and
    at least ``min_val_accuracy`` when set."""
    if min_val_accuracy is not None and new_accuracy < min_val_accuracy:
        return {"promote": False, "reason": f"accuracy {new_accuracy:.4f} below min_val_accuracy {min_val_accuracy}"}
    if production_accuracy is None:
        return {"promote": True, "reason": "no production version yet"}
    floor = production_accuracy - tolerance
    if new_accuracy >= floor:
        return {"promote": True,
                "reason": f"accuracy {new_accuracy:.4f} >= production {production_accuracy:.4f} - tolerance {tolerance}"}
    return {"promote": False,
            "reason": f"accuracy {new_accuracy:.4f} < production {production_accuracy:.4f} - tolerance {tolerance}"}


def resolve_model(model: str, storage: StorageConfig) -> tuple[str, str]:
    """(where to load it from, what the output records) for a run directory, a
    model file, or ``REGISTRY#name`` (its production version, recorded as
    ``REGISTRY#name@version`` so that a re-run never mixes two versions)."""
    if parse_reference(model) is None:
        return model, model
    try:
        return production_model_uri(model, storage)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read the registry of {model}: {st.describe_error(exc)}") from None
