"""README's "Code map" names exactly the packages and top-level modules of
`pipeline/`, plus jobs/, infra/ and tests/, and every path it lists exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_OUTSIDE_PIPELINE = {"jobs/", "infra/", "tests/"}


def code_map_paths(text: str) -> list[str]:
    """The first-column paths of the table under the `## Code map` heading."""
    section = re.search(r"^## Code map\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README.md has no '## Code map' section"
    paths = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 2:
            continue
        first = cells[0].strip("`")
        if first in ("path", "") or set(first) <= set("-: "):
            continue  # header and separator rows
        paths.append(first)
    assert paths, "the Code map section holds no table rows"
    return paths


def pipeline_entries() -> set[str]:
    """Package folders (with __init__.py) directly under pipeline/, and the
    top-level modules other than __init__.py."""
    pipeline = ROOT / "pipeline"
    packages = {f"pipeline/{p.name}/" for p in pipeline.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {f"pipeline/{p.name}" for p in pipeline.glob("*.py") if p.name != "__init__.py"}
    return packages | modules


def test_code_map_names_every_package_and_module_of_pipeline():
    listed = code_map_paths((ROOT / "README.md").read_text())
    assert len(listed) == len(set(listed)), f"listed twice: {sorted(p for p in listed if listed.count(p) > 1)}"
    in_pipeline = {p for p in listed if p.startswith("pipeline/")}
    expected = pipeline_entries()
    assert not expected - in_pipeline, f"missing from the code map: {sorted(expected - in_pipeline)}"
    assert not in_pipeline - expected, f"not a package or top-level module of pipeline/: {sorted(in_pipeline - expected)}"
    assert REQUIRED_OUTSIDE_PIPELINE <= set(listed), f"missing: {sorted(REQUIRED_OUTSIDE_PIPELINE - set(listed))}"


def test_every_listed_path_exists():
    for path in code_map_paths((ROOT / "README.md").read_text()):
        target = ROOT / path
        assert target.is_dir() if path.endswith("/") else target.is_file(), f"code map names {path}, which does not exist"


def test_a_removed_row_is_noticed():
    """The check above fails when a row goes missing."""
    text = (ROOT / "README.md").read_text()
    without = re.sub(r"^\| `pipeline/scoring/` \|.*\n", "", text, flags=re.M)
    assert without != text
    assert "pipeline/scoring/" not in code_map_paths(without)
    assert "pipeline/scoring/" in pipeline_entries()
