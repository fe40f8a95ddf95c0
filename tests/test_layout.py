"""Imports run one way: cli -> actcache -> indexes. Checked on the source with ast."""

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


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots & OURS


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
           "secrets", "resource", "struct", "zlib", "errno", "threading", "collections", "re", "io", "mmap"}
    for f in (REPO_ROOT / "indexes").rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for n in names:
                assert n.split(".")[0] in std | {"numpy", "faiss", "indexes"}, f"{f.name} imports {n}"


def test_help_is_fast_and_light():
    import subprocess
    import sys

    code = "import sys, cli.main; print(sorted(m for m in ('torch','transformers','faiss','h5py') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]", out.stderr
