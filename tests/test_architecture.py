"""Imports flow one way (DESIGN.md "Packages"): the module import graph of subjectpaint, adapters_store and trainers,
read with ast (imports inside functions count), has no cycle; placing and storage never import the trainer; the
trainer imports only subjectpaint's leaf modules; production code does not import the demo instrument."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("subjectpaint", "adapters_store", "trainers")
LEAVES = {"subjectpaint.base", "subjectpaint.masks", "subjectpaint.images", "subjectpaint.errors"}
# the training facade, the CLI and the training worker loop start training; nothing else may import trainers
TRAINING_ENTRIES = {"subjectpaint.subject", "subjectpaint.cli", "subjectpaint.serve.jobs"}
# the `demo` and `eval` commands show the demo base: the CLI is the one production importer of the instrument
DEMO_USERS = {"subjectpaint.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module of ours that `import name` loads (the longest known prefix), or None (a third-party one)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else names of pkg
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in map(_target, names) if t is not None and t != module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _cycles() -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    # the reader sees what it must: an import inside a function, a relative import, `from pkg import module`
    assert "trainers.train" in GRAPH["subjectpaint.subject"]  # inside Subject.train
    assert "subjectpaint.workframe" in GRAPH["subjectpaint.sessions.progressive"]  # from ..workframe import
    assert "adapters_store.adapter_file" in GRAPH["subjectpaint.slots"]  # from adapters_store import adapter_file
    assert "subjectpaint.sessions.progressive" in GRAPH["subjectpaint.studio"]


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle():
    GRAPH["subjectpaint.workframe"].add("subjectpaint.studio")  # what the sessions did before the work frame moved
    try:
        assert any({"subjectpaint.studio", "subjectpaint.workframe"} <= set(c) for c in _cycles())
    finally:
        GRAPH["subjectpaint.workframe"].discard("subjectpaint.studio")


def test_placing_and_storage_never_import_trainers():
    offenders = {m: sorted(t for t in targets if t.split(".")[0] == "trainers")
                 for m, targets in GRAPH.items() if not m.startswith("trainers") and m not in TRAINING_ENTRIES}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_storage_imports_neither_the_sdk_nor_the_trainer():
    bad = {m: sorted(t for t in targets if not t.startswith("adapters_store"))
           for m, targets in GRAPH.items() if m.startswith("adapters_store")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_trainers_import_only_the_sdks_leaf_modules():
    used = {t for m, targets in GRAPH.items() if m.startswith("trainers") for t in targets if t.startswith("subjectpaint")}
    assert used <= LEAVES, sorted(used - LEAVES)
    # and the leaves are leaves: nothing of the SDK beyond them comes along
    beyond = {t for leaf in LEAVES for t in _reachable(leaf) if t.startswith("subjectpaint") and t not in LEAVES}
    assert beyond == set()


def _demo_importers() -> set[str]:
    return {m for m, targets in GRAPH.items()
            if not m.startswith("subjectpaint.demo") and any(t.startswith("subjectpaint.demo") for t in targets)}


def test_production_code_does_not_import_the_demo():
    assert _demo_importers() - DEMO_USERS - {"subjectpaint.subject"} == set()


def test_the_training_facade_does_not_import_the_demo():
    assert "subjectpaint.subject" not in _demo_importers()


def test_a_placement_loads_neither_the_trainer_nor_the_demo():
    code = textwrap.dedent("""
        import sys
        import numpy as np, PIL.Image
        from subjectpaint import Studio
        rng = np.random.default_rng(0)
        room = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        mask = PIL.Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 32 > 16).astype(np.uint8) * 255)
        studio = Studio.load("tiny")
        studio.inpaint(room, mask, room, steps=1, progress=False)
        studio.progressive(steps=1, progress=False).place(room, room, mask)
        studio.dual_branch(steps=1).place(room, room, mask)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "trainers" or m.startswith("subjectpaint.demo"))
        print(loaded)
        sys.exit(1 if loaded else 0)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
