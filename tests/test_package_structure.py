"""The package's shape: no import cycles, imports at the top, the core free of the shapes benchmark, small files."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxt2i"
CORE = ("jaxt2i.models", "jaxt2i.nn", "jaxt2i.diffusion", "jaxt2i.pipelines", "jaxt2i.convert", "jaxt2i.train")
# Optional heavy dependencies a module may import where it needs them (and nothing else).
LAZY_ALLOWED = ("torch", "tensorflow", "tensorflow_datasets", "diffusers")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The jaxt2i modules an import statement loads (``from pkg import mod`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported jaxt2i module, at module level?) for every import in module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _imported(node, name, path.name == "__init__.py"):
                out.append((target, id(node) in top))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for target, _ in _imports(name):
            while target and target not in MODULES:  # `import jaxt2i.a.b.c` of a symbol: its module
                target = target.rpartition(".")[0]
            if target.startswith("jaxt2i") and target != name and not name.startswith(target + "."):
                targets.add(target)  # a package's own parents are not edges (Python imports them first anyway)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_import_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_are_at_the_top_of_modules():
    """A lazy import only for optional heavy dependencies (torch, tensorflow, diffusers)."""
    late = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not all(n.split(".")[0] in LAZY_ALLOWED for n in names):
                    late.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {', '.join(names)}")
    assert late == []


def test_the_core_never_imports_the_shapes_benchmark():
    offenders = sorted(f"{name} -> {target}" for name, targets in _graph().items()
                       if name.startswith(CORE) for target in targets if target.startswith("jaxt2i.shapes"))
    assert offenders == []
    code = ("import sys, jaxt2i.models.unet, jaxt2i.pipelines, jaxt2i.train.loop, jaxt2i.train.kinds.unet, "
            "jaxt2i.train.kinds.vae, jaxt2i.train.kinds.clip, jaxt2i.data.sources; "
            "print(sorted(m for m in sys.modules if m.startswith('jaxt2i.shapes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_longer_than_the_limit(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines; split it by what its parts do"
