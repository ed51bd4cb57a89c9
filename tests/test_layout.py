"""The code's layout: ``scripts/`` imports only downwards, has no import cycles, and no module
uses another module's private names (the layers are listed in ``scripts/__init__.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "eoir_bundle" / "scripts"

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    ("foundation", {"errors", "file_io", "geometry", "threads"}),
    ("model", {"layers", "inverse", "network", "losses", "checkpoint"}),
    ("components", {"lean", "data", "evaluation", "transforms", "mni", "preprocessing"}),
    ("runtime", {"instance_optimization", "disp_writer", "training", "warp", "convert_checkpoint"}),
    ("generators", {"synthetic"}),
    ("tools", {"tools"}),
    ("entry points", {"qc", "lumir_metrics", "make_synthetic_lumir", "compare_methods", "benchmark"}),
]


def _modules() -> dict[str, Path]:
    """``{"scripts.lean.covers": path, ...}`` for every module of the package."""
    out = {}
    for path in SCRIPTS.rglob("*.py"):
        parts = path.relative_to(SCRIPTS.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} is in no layer of the list above: place it")


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, path: Path) -> set[str]:
    """The ``scripts`` modules that ``module`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("scripts"):
                continue
            for alias in node.names:  # "from . import lean" imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("scripts")}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "scripts":
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "scripts"))
def test_imports_go_downwards(module):
    up = [m for m in GRAPH[module] if m != "scripts" and _layer(m) > _layer(module)]
    assert not up, f"{module} ({LAYERS[_layer(module)][0]}) imports a higher layer: {up}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def _private_uses(path: Path, module: str | None) -> list[str]:
    """``from X import _name`` and ``alias._name`` where ``alias`` is a scripts module."""
    tree = ast.parse(path.read_text(), str(path))
    aliases, bad = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and not mod.startswith("scripts"):
                continue
            for a in node.names:
                if a.name.startswith("_"):
                    bad.append(f"from {'.' * node.level}{mod} import {a.name}")
                target = f"{mod}.{a.name}" if mod else a.name
                if any(m.endswith(target) or m.endswith("." + a.name) for m in MODULES):
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("scripts"):
                    aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in aliases:
                bad.append(f"{node.value.id}.{node.attr}")
    return bad


@pytest.mark.parametrize("path", sorted(list(SCRIPTS.rglob("*.py")) + list((ROOT / "tests").glob("*.py"))),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_across_modules(path):
    assert not _private_uses(path, None), f"{path.name} uses private names of other modules: {_private_uses(path, None)}"
