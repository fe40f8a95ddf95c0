"""Lazy FAISS indexes: a build writes HDF5 only; an index is built on first use,
persisted atomically, and a first use killed mid-write leaves nothing a later
use trusts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT, cfg_for

from actcache.builder import build
from actcache.store import Store


def _exact_top(st: Store, k: int) -> np.ndarray:
    pool = st.acts("mlp", 2, "mean", "isolated", "pool").astype(np.float64)
    q = st.acts("mlp", 2, "mean", "isolated", "eval").astype(np.float64)
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ pn.T), axis=1, kind="stable")[:, :k]


@pytest.fixture()
def lazy(tiny_model_dir, jsonl, tmp_path):
    return build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1,2", masks=("isolated",),
                         components=("mlp",), poolings=("mean",)))


def test_build_writes_no_index_and_first_use_persists_one(lazy):
    st = lazy
    assert st.report["indexes_built"] == 0
    assert not list(st.dir.glob("indexes/*.faiss"))
    assert st.info()["n_indexes"] == 0
    idx = st.index("mlp", 2, "mean", "isolated")
    _, ids = idx.search(st.acts("mlp", 2, "mean", "isolated", "eval"), 3)
    np.testing.assert_array_equal(ids, _exact_top(st, 3))
    files = sorted(p.name for p in st.dir.glob("indexes/*.faiss"))
    assert files == [st.index_path(a).name for a in st.arrays if a.layer == 2]
    again = Store.open(st.key, st.home).index("mlp", 2, "mean", "isolated")
    assert again.mmapped and again.ntotal == len(st.pool_rows)


def test_eager_index_option_builds_every_index_and_replaces_other_kinds(tiny_model_dir, jsonl, tmp_path, lazy):
    st = lazy
    st.index("mlp", 2, "mean", "isolated")  # a lazy flat index exists
    cfg = cfg_for(tiny_model_dir["llama"], jsonl, st.home, layers="1,2", masks=("isolated",),
                  components=("mlp",), poolings=("mean",), index="hnsw")
    again = build(cfg)
    assert again.report["indexes_built"] == len(st.arrays) and again.report["forward_batches"] == 0
    for a in st.arrays:
        assert again.index(a.component, a.layer, a.pooling, a.mask).spec.kind == "hnsw"
    assert build(cfg).report["cache_hit"]


KILL = textwrap.dedent("""
    import os, signal, sys
    real = os.replace
    def replace(src, dst, *a, **kw):
        dst = str(dst)
        if {point!r} == "before-index-rename" and dst.endswith(".faiss"):
            with open(src, "r+b") as f:
                f.truncate(os.path.getsize(src) // 2)   # half written, then killed
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *a, **kw)
        if {point!r} == "after-index-rename" and dst.endswith(".faiss"):
            os.kill(os.getpid(), signal.SIGKILL)         # index in place, sidecar not yet
    os.replace = replace
    from actcache.store import Store
    Store.open({key!r}, {home!r}).index("mlp", 2, "mean", "isolated")
""")


@pytest.mark.parametrize("point", ["before-index-rename", "after-index-rename"])
def test_killed_first_use_leaves_no_index_a_later_use_trusts(lazy, point):
    st = lazy
    r = subprocess.run([sys.executable, "-c", KILL.format(point=point, key=st.key, home=str(st.home))],
                       cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    st = Store.open(st.key, st.home)
    a = next(a for a in st.arrays if a.layer == 2)
    assert not st.has_index(a)
    idx = st.index("mlp", 2, "mean", "isolated")
    _, ids = idx.search(st.acts("mlp", 2, "mean", "isolated", "eval"), 4)
    np.testing.assert_array_equal(ids, _exact_top(st, 4))
    assert st.has_index(a)
