"""A model registry on any fsspec URI.

    REGISTRY/<name>/versions/<YYYYmmdd-HHMMSS>-<id>/   immutable copy of a run's artifacts
                                        version.json   written last: a version without it is incomplete
    REGISTRY/<name>/production.json     {"version", "promoted_at", "reason", "id", "history": [...], "changes": [...]}
    REGISTRY/<name>/index.json          the versions with their metrics (rebuilt from the folders)
    REGISTRY/<name>/runs/<hash>.json    which version a run becomes (created once, conditionally)

The version folders are the source of truth. ``production.json`` and
``index.json`` are changed by compare-and-swap (``storage.write_if_unchanged``:
a conditional write on S3, a file lock on local disk, a lease elsewhere): a
promotion or rollback that lost a race to another writer starts again from
what that writer left, so no change is lost, and the pointer only ever names a
complete version. ``production.json`` keeps the list of changes that made it
(``changes``: id, action, version, previous version, time, and the lineage of
the version it points to).

Names and versions are checked against strict patterns wherever they are read
(flags, ``production.json``, folder names), so no reference can leave the
registry. ``REGISTRY#name`` names the production version of ``name`` wherever a
model URI is accepted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import random
import re
import socket
import time
import uuid
from typing import Callable, Optional

from pipeline import storage as st
from pipeline.config import StorageConfig
from pipeline.errors import JobFailed, UsageError
from pipeline.data.shards import now_utc

log = logging.getLogger(__name__)

VERSIONS = "versions"
RUNS = "runs"
VERSION_FILE = "version.json"
PRODUCTION_FILE = "production.json"
INDEX_FILE = "index.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
VERSION_PATTERN = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")  # what register_run makes
HISTORY_LIMIT = 50  # versions that rollback can walk back through
CLAIM_STALE_S = 900.0  # a registration that has not finished after this long is taken over
CHANGES_LIMIT = 1000  # entries of production.json's change list
UPDATE_ATTEMPTS = 25  # tries of a pointer update that keeps losing races
GATE_ATTEMPTS = 3  # comparisons of the gate when production keeps changing
ARTIFACTS = ("model.keras", "labels.json", "preprocessing.json", "config.yaml", "history.json", "metrics.json",
             "training.png", "confusion.png", "mlflow.json")


def parse_reference(uri: str) -> Optional[tuple[str, str]]:
    """``"s3://b/registry#cats"`` -> ``("s3://b/registry", "cats")``; None for plain URIs."""
    if "#" not in uri:
        return None
    registry, _, name = uri.rpartition("#")
    if not registry or not name:
        raise UsageError(f"model reference '{uri}' must look like REGISTRY_URI#name")
    return registry, name


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"registry name {name!r} is not valid: letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 100 characters")
    return name


def check_version(version: str, where: str = "") -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        source = f" in {where}" if where else ""
        raise UsageError(f"registry version {version!r}{source} is not valid: versions look like "
                         "YYYYmmdd-HHMMSS-xxxxxx (6 hex digits)")
    return version


def name_root(registry: str, name: str) -> str:
    return st.join(registry, check_name(name))


def version_uri(registry: str, name: str, version: str) -> str:
    return st.join(name_root(registry, name), VERSIONS, check_version(version))


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
        if not VERSION_PATTERN.fullmatch(folder):
            continue  # not a version this registry made
        try:
            record = st.read_json(st.join(root, folder, VERSION_FILE), storage)
        except FileNotFoundError:
            continue  # being written, or abandoned by a killed writer
        if isinstance(record, dict) and record.get("version") == folder:
            out.append(record)
    return out


def get_version(registry: str, name: str, version: str, storage: StorageConfig) -> dict:
    try:
        return st.read_json(st.join(version_uri(registry, name, version), VERSION_FILE), storage)
    except FileNotFoundError:
        raise UsageError(f"no version '{version}' of '{name}' in {registry}") from None


def production_uri(registry: str, name: str) -> str:
    return st.join(name_root(registry, name), PRODUCTION_FILE)


def read_production(registry: str, name: str, storage: StorageConfig) -> Optional[dict]:
    uri = production_uri(registry, name)
    try:
        raw = st.read_bytes(uri, storage)
    except FileNotFoundError:
        return None
    return _parse_pointer(raw, uri)


def _parse_pointer(raw: Optional[bytes], uri: str) -> Optional[dict]:
    """The pointer in ``raw``, its version and history checked: a pointer that
    names anything but a version of this registry is refused, never followed."""
    if raw is None:
        return None
    try:
        pointer = json.loads(raw)
    except ValueError:
        raise UsageError(f"{uri} is not valid JSON") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("history", []), list):
        raise UsageError(f"{uri} is not a production pointer")
    check_version(pointer.get("version"), uri)
    for version in pointer.get("history", []):
        check_version(version, uri)
    return pointer


def production_model_uri(reference: str, storage: StorageConfig) -> tuple[str, str]:
    """(version folder URI, "REGISTRY#name@version") for ``REGISTRY#name``."""
    registry, name = parse_reference(reference)
    pointer = read_production(registry, name, storage)
    if pointer is None:
        raise UsageError(f"'{name}' has no production version in {registry}")
    get_version(registry, name, pointer["version"], storage)  # complete
    return version_uri(registry, name, pointer["version"]), f"{registry}#{name}@{pointer['version']}"


def register_run(registry: str, name: str, run_uri: str, storage: StorageConfig, *,
                 metrics: dict, data: str, lineage: Optional[dict] = None) -> dict:
    """Copy a finished run's artifacts into a new immutable version. Registering
    the same run again, or from two processes at once, gives one version: the
    first to create the run's claim (``runs/<hash>.json``, a conditional
    create) makes it, the others wait for it to be complete. ``lineage``
    (pipeline.tracking.lineage: data manifest, code, libraries, recipe,
    warm-start parent) is kept in ``version.json``."""
    for existing in list_versions(registry, name, storage):
        if existing.get("run") == run_uri:
            return existing
    claim_uri = st.join(name_root(registry, name), RUNS, hashlib.sha256(run_uri.encode()).hexdigest()[:32] + ".json")
    deadline = time.time() + CLAIM_STALE_S + 60
    while True:
        raw, token = st.read_for_update(claim_uri, storage)
        claim = _parse_claim(raw)
        if claim is not None:
            try:
                return get_version(registry, name, claim["version"], storage)
            except UsageError:
                pass  # not complete (yet)
            if not _abandoned(claim):
                if time.time() > deadline:
                    raise JobFailed(f"{run_uri} is being registered as version {claim['version']} by "
                                    f"{claim.get('host')} (pid {claim.get('pid')}), which has not finished; try again")
                time.sleep(0.5)
                continue
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        version = f"{stamp}-{uuid.uuid4().hex[:6]}"
        claim = {"run": run_uri, "version": version, "host": socket.gethostname(), "pid": os.getpid(),
                 "claimed": time.time()}
        if st.write_if_unchanged(claim_uri, _dump(claim), token, storage):
            break
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
        "lineage": lineage,
    }
    st.write_json(st.join(target, VERSION_FILE), record, storage)  # last: marks the version complete
    write_index(registry, name, storage)
    return record


def _parse_claim(raw: Optional[bytes]) -> Optional[dict]:
    """A run's claim, or None when there is none or it is unreadable (then it
    is replaced, conditionally, like an abandoned one)."""
    try:
        claim = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(claim, dict) or not VERSION_PATTERN.fullmatch(str(claim.get("version"))):
        return None
    return claim


def _abandoned(claim: dict) -> bool:
    """A claim whose registration will not finish: older than CLAIM_STALE_S,
    or made on this host by a process that is gone."""
    if time.time() - float(claim.get("claimed", 0)) > CLAIM_STALE_S:
        return True
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive, someone else's
    return False


def write_index(registry: str, name: str, storage: StorageConfig) -> list[dict]:
    """Rebuild ``index.json`` from the version folders and the pointer. Each
    try reads the index's token before listing, so a write that succeeds was
    based on a listing made after every earlier successful write."""
    uri = st.join(name_root(registry, name), INDEX_FILE)
    for attempt in range(UPDATE_ATTEMPTS):
        _, token = st.read_for_update(uri, storage)
        versions = list_versions(registry, name, storage)
        pointer = read_production(registry, name, storage)
        index = {"name": name, "production": pointer["version"] if pointer else None, "versions": versions}
        if st.write_if_unchanged(uri, _dump(index), token, storage):
            return versions
        _backoff(attempt)
    # Derived data: the versions and the pointer are already right; the next
    # registry change rebuilds the index.
    log.warning("registry: %s kept changing during %d attempts to rebuild it; left to the next change",
                uri, UPDATE_ATTEMPTS)
    return versions


class ProductionChanged(Exception):
    """Production is no longer the version a caller decided against."""

    def __init__(self, expected: Optional[str], found: Optional[str]):
        super().__init__(f"production is {found or 'unset'}, not {expected or 'unset'}")
        self.expected, self.found = expected, found


_ANY = object()


def promote(registry: str, name: str, version: str, storage: StorageConfig, *, reason: str,
            expected=_ANY) -> dict:
    """Point production at ``version`` (which must be complete). With
    ``expected`` (a version, or None for "no production yet"), only if
    production is still that version: ProductionChanged otherwise."""
    get_version(registry, name, version, storage)

    def change(current: Optional[dict]) -> dict:
        found = current["version"] if current else None
        if expected is not _ANY and found != expected:
            raise ProductionChanged(expected, found)
        history = list(current.get("history", [])) if current else []
        if found and found != version:
            history.append(found)
        return {"version": version, "reason": reason, "history": history[-HISTORY_LIMIT:]}

    return _update_pointer(registry, name, storage, change, action="promote")


def rollback(registry: str, name: str, storage: StorageConfig) -> dict:
    """Restore the previous production version."""

    def change(current: Optional[dict]) -> dict:
        if not current or not current.get("history"):
            raise UsageError(f"'{name}' has no earlier production version to roll back to")
        history = list(current["history"])
        previous = history.pop()
        get_version(registry, name, previous, storage)
        return {"version": previous, "reason": f"rollback from {current['version']}", "history": history}

    return _update_pointer(registry, name, storage, change, action="rollback")


def _update_pointer(registry: str, name: str, storage: StorageConfig,
                    change: Callable[[Optional[dict]], dict], *, action: str) -> dict:
    """Read production, apply ``change``, and write the result only if
    production is still what was read; else start again from what the other
    writer left. Returns the pointer written (its ``id`` is in ``changes``)."""
    uri = production_uri(registry, name)
    for attempt in range(UPDATE_ATTEMPTS):
        raw, token = st.read_for_update(uri, storage)
        current = _parse_pointer(raw, uri)
        pointer = change(current)
        entry = {"id": uuid.uuid4().hex, "action": action, "version": pointer["version"],
                 "from": current["version"] if current else None, "at": now_utc(),
                 "lineage": get_version(registry, name, pointer["version"], storage).get("lineage")}
        pointer.update(promoted_at=entry["at"], id=entry["id"],
                       changes=(list(current.get("changes", [])) if current else [])[-(CHANGES_LIMIT - 1):] + [entry])
        pointer = {k: pointer[k] for k in ("version", "promoted_at", "reason", "id", "history", "changes")}
        if st.write_if_unchanged(uri, _dump(pointer), token, storage):
            break
        # Lost the race, or won it and lost the answer (a retried request): the id says which.
        if _applied(uri, pointer["id"], storage):
            break
        log.info("registry: %s changed during this %s; trying again from the new state", uri, action)
        _backoff(attempt)
    else:
        raise JobFailed(f"production of '{name}' in {registry} changed {UPDATE_ATTEMPTS} times while this "
                        f"{action} was being applied; nothing was changed, try again")
    write_index(registry, name, storage)
    return pointer


def _applied(uri: str, change_id: str, storage: StorageConfig) -> bool:
    """Whether the change ``change_id`` is in the pointer at ``uri``, even if
    other changes followed it."""
    raw, _ = st.read_for_update(uri, storage)
    try:
        changes = json.loads(raw).get("changes", []) if raw is not None else []
    except (ValueError, AttributeError):
        return False
    return any(isinstance(c, dict) and c.get("id") == change_id for c in changes)


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** attempt)))


def gate(registry: str, name: str, version: str, storage: StorageConfig, *,
         evaluate: Callable[[list[str]], list[float]], tolerance: float,
         min_val_accuracy: Optional[float]) -> dict:
    """The promotion gate for the new ``version``: compare it with the current
    production version (``evaluate`` gives the accuracy of each version
    folder, on the same data) and promote it only if production is still the
    version it was compared against; if production changed meanwhile, compare
    again with the new one (up to GATE_ATTEMPTS times, then not promoted)."""
    new_acc = None
    before = read_production(registry, name, storage)
    for attempt in range(GATE_ATTEMPTS):
        prod = before["version"] if before else None
        folders = [version_uri(registry, name, version)] if new_acc is None else []
        if prod and prod != version:
            folders.append(version_uri(registry, name, prod))
        scores = evaluate(folders) if folders else []
        if new_acc is None:
            new_acc, scores = scores[0], scores[1:]
        prod_acc = scores[0] if scores else None
        decision = decide(new_acc, prod_acc, tolerance=tolerance, min_val_accuracy=min_val_accuracy)
        if prod == version:
            decision = {"promote": False, "reason": "this run is already the production version"}
        after = before
        if not decision["promote"]:
            break
        try:
            after = promote(registry, name, version, storage, reason=decision["reason"], expected=prod)
            break
        except ProductionChanged as changed:
            log.info("registry: production of '%s' changed from %s to %s during the gate; comparing again",
                     name, prod, changed.found)
            before = read_production(registry, name, storage)
    else:
        after = before
        decision = {"promote": False, "reason": f"production changed during each of {GATE_ATTEMPTS} comparisons "
                                                f"(now {after['version'] if after else 'unset'}); promote by hand"}
        log.warning("registry: %s#%s version %s not promoted: %s", registry, name, version, decision["reason"])
    return {
        "registry": registry,
        "name": name,
        "version": version,
        "accuracy": new_acc,
        "production_before": prod,
        "production_accuracy": prod_acc,
        "tolerance": tolerance,
        "promoted": decision["promote"],
        "reason": decision["reason"],
        "production": after["version"] if after else None,
        "comparisons": attempt + 1,
    }


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
