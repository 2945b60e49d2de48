"""The code's layout: imports point down only, and no module imports itself
back through another (no import circles), counting the imports made inside
functions too. Layers, lowest first: errors < storage < config < runtime, data,
tracking < registry < artifact < training, scoring, export < jobs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A package (or top-level module) may import only from layers strictly below
# its own, and from itself.
LAYER = {
    "pipeline.errors": 0,
    "pipeline.storage": 1,
    "pipeline.config": 2,
    "pipeline.runtime": 3,
    "pipeline.data": 3,
    "pipeline.registry": 4,
    "pipeline.artifact": 5,
    "pipeline.training": 6,
    "pipeline.scoring": 6,
    "pipeline.export": 6,
    "pipeline.tracking": 3,
    "jobs": 7,
    "pipeline": 8,  # the package's __init__: version and the start-up log filter
}


def modules() -> dict[str, Path]:
    found = {}
    for base in ("pipeline", "jobs"):
        for path in sorted((ROOT / base).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    out = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        out[name] = {m for m in found if m in mods and m != name}
    return out


def unit(module: str) -> str:
    """The layered unit a module belongs to: its package under pipeline/, a
    top-level pipeline module, or jobs."""
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    return ".".join(parts[:2]) if len(parts) > 1 else "pipeline"


def test_every_unit_has_a_layer():
    assert {unit(m) for m in modules()} <= set(LAYER), "a new package or module needs a layer in LAYER"


def test_imports_point_down_only():
    wrong = []
    for module, targets in imports(modules()).items():
        for target in targets:
            a, b = unit(module), unit(target)
            if a != b and not LAYER[b] < LAYER[a]:
                wrong.append(f"{module} -> {target} ({a} layer {LAYER[a]} -> {b} layer {LAYER[b]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(sorted(wrong))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(imports(modules())) == []


def test_the_circle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in modules().values()
               if ast.get_docstring(ast.parse(p.read_text())) is None and p.read_text().strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_input_and_model_code_never_import_ray():
    mods = modules()
    for name in ("pipeline.data.input", "pipeline.data.preprocess", "pipeline.training.model"):
        tree = ast.parse(mods[name].read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "ray" not in names, name
