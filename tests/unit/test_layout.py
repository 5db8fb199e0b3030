"""The package layout's rules, read from the code: no import cycle, dependencies only point down the
pipeline, the generators meet only through ``pseudolabel.base``, the production path never imports the
synthetic data generator, and nothing finds the project's files through ``Path(__file__).parents``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PKG = ROOT / "ovtasks"

# lower layers first; a module may import its own layer's siblings and anything below
LAYERS = [
    {"core"},
    {"data"},
    {"models", "report"},
    {"ingest", "pseudolabel", "validate"},
    {"train"},
    {"evaluate"},
    {"registry"},
    {"orchestration", "ui"},
    {"cli", "demo"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
GENERATORS = {"ovtasks.pseudolabel.maskfree.generator", "ovtasks.pseudolabel.grounded.generator"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every ovtasks module ``path`` imports, at module level or inside a function."""
    found = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ovtasks"):
            for a in n.names:
                full = f"{n.module}.{a.name}"
                found.add(full if full in MODULES else n.module)
        elif isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.startswith("ovtasks")}
    return {m for m in found if m in MODULES}


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms <= set(LAYER), f"rooms without a layer in this test: {sorted(rooms - set(LAYER))}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_dependencies_point_down():
    up = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                if _room(m) and _room(d) and LAYER[_room(d)] > LAYER[_room(m)])
    assert not up, "imports that point up the pipeline:\n" + "\n".join(up)


def test_only_the_runner_imports_a_generator_and_generators_share_only_base():
    inside = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps & GENERATORS
                    if m.startswith("ovtasks.pseudolabel") and m != "ovtasks.pseudolabel.runner")
    assert not inside, inside
    for g in GENERATORS:
        assert "ovtasks.pseudolabel.runner" not in GRAPH[g]


def test_the_production_path_never_imports_the_synthetic_generator():
    allowed = {"ovtasks.data.synth", "ovtasks.data.sa1b", "ovtasks.demo", "ovtasks.cli.data"}  # `ovtasks synth`, the demo
    users = sorted(m for m, deps in GRAPH.items() if "ovtasks.data.synth" in deps and m not in allowed)
    assert not users, f"modules of the production path importing the synthetic data generator: {users}"


def test_the_builtin_vocabulary_is_the_synthetic_categories():
    from ovtasks.data.synth import categories_doc
    from ovtasks.pseudolabel.candidates import Vocabulary

    assert Vocabulary.load(None).to_records() == categories_doc()


def test_no_project_files_found_through_parents_of_file():
    offenders = sorted(str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py") if ".parents[" in p.read_text())
    assert not offenders, f"use settings.paths instead: {offenders}"
