"""Lineage: what made a model. Recorded in ``summary.json`` (a run),
``version.json`` (a registry version) and each change of ``production.json``:

    {"data": {"uri", "manifest_sha256"},      # sha256 of manifest.json's bytes
     "code": {"package", "version", "commit"}, # commit: INCEPTION_RAY_COMMIT, else git in the checkout, else None
     "libraries": {"tensorflow", "tf_keras", "ray"},
     "recipe_version": int,
     "parent": None | {"reference", "model", "folder"}}   # model.init_from of a warm start

Nothing here fails on what cannot be known: unknown values are None.
``chain`` follows ``parent`` through runs and registry versions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib import metadata
from typing import Optional

from pipeline import storage as st
from pipeline.config import StorageConfig

COMMIT_ENV = "INCEPTION_RAY_COMMIT"
PACKAGE = "inception-ray"
MANIFEST_FILE = "manifest.json"
# A parent's lineage is read from these files in its folder, in this order.
LINEAGE_SOURCES = ("version.json", "summary.json")
CHAIN_LIMIT = 20
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def manifest_sha256(data: str, storage: StorageConfig) -> Optional[str]:
    """sha256 of the data's ``manifest.json`` as stored (what ``sha256sum`` prints)."""
    try:
        return hashlib.sha256(st.read_bytes(st.join(data, MANIFEST_FILE), storage)).hexdigest()
    except Exception:  # noqa: BLE001 - lineage never fails a job
        return None


def source_commit() -> Optional[str]:
    """INCEPTION_RAY_COMMIT, else ``git rev-parse HEAD`` of the checkout this
    code runs from (with "-dirty" when it has uncommitted changes), else None."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    if not os.path.exists(os.path.join(_CHECKOUT, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", _CHECKOUT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", _CHECKOUT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_version() -> Optional[str]:
    return _version(PACKAGE) or getattr(sys.modules.get("pipeline"), "__version__", None)


def code_version() -> str:
    """One string for the code: the commit when known, else the package version."""
    return source_commit() or f"{PACKAGE} {package_version() or 'unknown'}"


def build(data: str, storage: StorageConfig, *, recipe_version: Optional[int],
          parent: Optional[dict] = None, digest: Optional[str] = None) -> dict:
    """The lineage of a run trained on ``data`` (``digest``: the manifest's, when already known)."""
    return {
        "data": {"uri": data, "manifest_sha256": digest or manifest_sha256(data, storage)},
        "code": {"package": PACKAGE, "version": package_version(), "commit": source_commit()},
        "libraries": {name: _version(name) for name in ("tensorflow", "tf_keras", "ray")},
        "recipe_version": recipe_version,
        "parent": parent,
    }


def read_lineage(folder: str, storage: StorageConfig) -> Optional[dict]:
    """(the record's lineage) of a registry version or completed run folder; None when it has none."""
    for name in LINEAGE_SOURCES:
        try:
            record = st.read_json(st.join(folder, name), storage)
        except Exception:  # noqa: BLE001 - missing or unreadable: try the next
            continue
        if isinstance(record, dict):
            return record.get("lineage")
    return None


def chain(lineage: Optional[dict], storage: StorageConfig, limit: int = CHAIN_LIMIT) -> list[dict]:
    """``lineage`` followed by its warm-start parents' lineages, nearest first;
    a parent whose folder holds no lineage ends the chain with {"folder", "lineage": None}."""
    out: list[dict] = []
    seen: set[str] = set()
    while lineage and lineage.get("parent") and len(out) < limit:
        parent = lineage["parent"]
        folder = parent.get("folder")
        if not folder or folder in seen:
            break
        seen.add(folder)
        lineage = read_lineage(folder, storage)
        out.append({"reference": parent.get("reference"), "folder": folder, "lineage": lineage})
    return out
