"""The package's own structure: no import cycle between its modules, and no backend name compared
outside the registry (visionzip_kernels/_backends.py), so a new backend is one file plus one entry."""

from __future__ import annotations

import ast
from pathlib import Path

import visionzip_kernels as vz

PACKAGE = Path(vz.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("visionzip_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("visionzip_kernels"):
                continue
            found.add(target)
            for alias in node.names:  # "from . import compress" imports a submodule
                sub = f"{target}.{alias.name}"
                if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / sub.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(sub)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # importing a.b.c runs a/__init__, a/b/__init__: an edge to each parent package is implied,
        # and the parents' own imports are theirs; record only the module's explicit imports
        graph[name] = {m for m in _imports(path) if m in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """An import cycle of ``graph`` (module -> imported modules), or [] (depth-first search). A
    package importing its own submodules (or a submodule its package) is initialisation, not a cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycle_between_package_modules():
    """Every intra-package import, at module level or inside a function, of every module."""
    graph = _graph()
    assert len(graph) > 10
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
    # the search is not vacuous
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]


def _mentions_backend(node: ast.AST) -> bool:
    ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "backend" in ident.lower()


def test_backend_names_are_compared_only_in_the_registry():
    """No ``backend == "triton"``-style branch (or ``backend in ("cpu", ...)``) outside
    visionzip_kernels/_backends.py. Device types ("cpu", "cuda") share two of the names and are not
    backends: only comparisons with something named like a backend count."""
    names = set(vz.BACKENDS)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_backends.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            consts = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if any(v in names for v in consts if isinstance(v, str)) and any(_mentions_backend(o) for o in operands):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_the_structure_check_finds_a_backend_branch(tmp_path):
    """The check above is not vacuous: it flags the pattern it forbids."""
    tree = ast.parse('if backend == "triton":\n    pass\n')
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert _mentions_backend(compare.left)
