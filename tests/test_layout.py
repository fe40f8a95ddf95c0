"""Imports run one way: cli -> actcache -> indexes, and no module of actcache
imports, at any depth (inside functions and under TYPE_CHECKING included), a
module that imports it back. Checked on the source with ast."""

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

ALLOWED = {
    "indexes": {"indexes"},
    "actcache": {"actcache", "indexes"},
    "cli": {"cli", "actcache", "indexes"},
}
OURS = {"indexes", "actcache", "cli"}
# The folders `indexes/` and `cli/` install as `actcache_indexes` and `actcache_cli` (pyproject's
# package-dir), so that no installed top-level name can collide with another package's.
INSTALLED = {"actcache_indexes": "indexes", "actcache_cli": "cli"}


def folder_of(name: str) -> str:
    """An imported module name with its installed top-level name mapped to the folder it comes from."""
    head, dot, rest = name.partition(".")
    return INSTALLED.get(head, head) + dot + rest


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {folder_of(a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(folder_of(node.module).split(".")[0])
    return roots & OURS


def test_modules_import_the_installed_names():
    """`indexes` and `cli` are folder names only: code imports `actcache_indexes` / `actcache_cli`."""
    for pkg in OURS | {"tests", "benchmarks"}:
        for f in sorted((REPO_ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                bad = [n for n in names if n.split(".")[0] in ("indexes", "cli")]
                assert not bad, f"{f.relative_to(REPO_ROOT)} imports {bad}; use {sorted(INSTALLED)}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = imported_roots(f) - ALLOWED[package]
        assert not bad, f"{f.relative_to(REPO_ROOT)} imports {bad}"


def test_indexes_uses_only_numpy_and_faiss():
    std = {"os", "json", "math", "dataclasses", "tempfile", "typing", "pathlib", "__future__", "time",
           "shutil", "contextlib", "warnings", "hashlib", "sys", "functools", "itertools", "abc", "enum",
           "secrets", "resource", "struct", "zlib", "errno", "threading", "collections", "re", "io", "mmap", "ctypes"}
    for f in (REPO_ROOT / "indexes").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                assert folder_of(n).split(".")[0] in std | {"numpy", "faiss", "indexes"}, f"{f.name} imports {n}"


def test_help_is_fast_and_light():
    import subprocess
    import sys

    code = "import sys, actcache_cli.main; print(sorted(m for m in ('torch','transformers','faiss','h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]", out.stderr


PACKAGES = ("actcache", "cli", "indexes")


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """{module: modules of the project it imports anywhere in its source}."""
    files = {_module(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [folder_of(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    head = ".".join(base + ([node.module] if node.module else []))
                else:
                    head = folder_of(node.module or "")
                names = [f"{head}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    graph[mod].add(n)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "actcache.store" in graph and "actcache.files" in graph["actcache.store"]
    cycle = find_cycle({m: {n for n in ns if n.startswith("actcache")} for m, ns in graph.items()
                        if m.startswith("actcache")})
    assert cycle is None, "import circle: " + " -> ".join(cycle)


GROUND_FLOOR = ("actcache.files", "actcache.config", "actcache.errors", "actcache.harness", "actcache.extras",
                "actcache.display")


def test_the_ground_floor_imports_nothing_of_actcache_but_errors():
    graph = import_graph()
    for mod in GROUND_FLOOR:
        assert graph[mod] <= set(GROUND_FLOOR) | {"indexes.io"}, (mod, graph[mod])


# Modules imported by `actcache --help` (or `import actcache`), whose imports of the
# rest of the package are made inside functions on purpose, as their docstrings say.
LIGHT = {"cli.main", "actcache", "actcache.pipeline"}


def test_imports_inside_functions_say_why():
    """Elsewhere an import of the package inside a function is allowed only with a
    comment on its line saying why (it loads FAISS or torch, kept out of --help)."""
    bare = []
    for pkg in PACKAGES:
        for path in sorted((REPO_ROOT / pkg).rglob("*.py")):
            if _module(path, REPO_ROOT) in LIGHT:
                continue
            lines = path.read_text().splitlines()
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0]
                                                             in PACKAGES) and "#" not in lines[node.lineno - 1]:
                        bare.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not bare, bare
