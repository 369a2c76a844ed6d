"""The package's layering, checked on its source: no import circles, no private names imported
across modules, and DiT / PixArt knowledge only inside the model adapters (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ilf_runtime"
ADAPTERS = {"ilf_runtime.models"}  # the one module allowed to name model kinds


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, function-local ones included."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [a.name for a in node.names]
            found.append((base, names))
    return found


def _edges() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import sub`` counts as importing sub)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            if not mod.startswith("ilf_runtime"):
                continue
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            targets = subs or ([mod] if mod in MODULES else [])
            if mod in MODULES and len(subs) < len(names):
                targets.append(mod)
            edges[name] |= {t for t in targets if t != name}
    return edges


def test_no_import_circles():
    edges = _edges()
    edges.pop("ilf_runtime")  # the public facade re-exports; nothing below imports it
    for deps in edges.values():
        deps.discard("ilf_runtime")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_facade_is_not_imported_from_below():
    for name, path in MODULES.items():
        if name == "ilf_runtime":
            continue
        for mod, names in _imports(name, path):
            if mod == "ilf_runtime":
                assert all(f"ilf_runtime.{n}" in MODULES for n in names), (
                    f"{name} imports {names} from the facade"
                )


def test_no_private_names_across_modules():
    roots = [PKG, PKG.parent / "tests", PKG.parent / "benchmarks", PKG.parent / "scripts"]
    for root in roots:
        for path in root.rglob("*.py"):
            for mod, names in _imports("x.y", path):
                if not mod.startswith("ilf_runtime"):
                    continue
                assert not any(p.startswith("_") for p in mod.split(".")), f"{path}: imports module {mod}"
                bad = [n for n in names if n.startswith("_")]
                assert not bad, f"{path}: imports private {bad} from {mod}"


def test_model_kinds_only_in_adapters():
    pattern = re.compile(r'kind ==|"dit"|"pixart"')
    for name, path in MODULES.items():
        if name in ADAPTERS:
            continue
        hits = [ln for ln in path.read_text().splitlines() if pattern.search(ln)]
        assert not hits, f"{name} names a model kind outside the adapters: {hits}"


def test_no_underscore_modules_imported():
    for name, path in MODULES.items():
        for mod, _ in _imports(name, path):
            assert not re.search(r"\._[a-z]", mod), f"{name} imports {mod}"


def test_largest_module_is_under_600_lines():
    sizes = {n: len(p.read_text().splitlines()) for n, p in MODULES.items()}
    big = {n: s for n, s in sizes.items() if s >= 600}
    assert not big, big
