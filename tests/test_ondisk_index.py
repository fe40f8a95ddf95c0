"""On-disk IVF indexes built shard by shard (indexes.build_ondisk)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import actcache_indexes as ix
from actcache_indexes import IndexFileError, IndexSpec, VectorIndex


def clustered(n: int, d: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def pool():
    centers = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32) * 2
    shards = [clustered(n, 64, i + 1, centers) for i, n in enumerate((6000, 5000, 4500, 4500))]
    return shards, clustered(200, 64, 99, centers)


@pytest.fixture(scope="module")
def built(pool, tmp_path_factory):
    shards, queries = pool
    path = tmp_path_factory.mktemp("ondisk") / "pool.faiss"
    loaders = [lambda s=s: s for s in shards]  # streamed: each shard loaded when called
    idx = ix.build_ondisk(loaders, IndexSpec(kind="ivf", nlist=64, nprobe=16), path, queries=queries)
    return idx, path


def test_recall_against_exact_numpy_search(pool, built):
    shards, queries = pool
    idx, _ = built
    assert idx.ondisk and idx.load_mode == "mmap" and idx.ntotal == 20000
    assert idx.meta["recall_at_10"] >= 0.95
    _, ref = ix.exact_search(np.concatenate(shards), queries, 10, "cosine")
    _, got = idx.search(queries, 10)
    hits = np.mean([np.intersect1d(g, r).size / 10 for g, r in zip(got, ref)])
    assert hits >= 0.95
    assert ix.recall_at_k(idx, shards, queries, 10) == pytest.approx(hits)


def test_exact_topk_streamed_equals_whole(pool):
    shards, queries = pool
    S, I = ix.exact_topk(shards, queries[:20], 10, "l2")
    S0, I0 = ix.exact_search(np.concatenate(shards), queries[:20], 10, "l2")
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(S, S0, rtol=1e-6)


def test_ids_are_global_rows_and_sidecar_checks(pool, built):
    shards, _ = pool
    idx, path = built
    starts = np.cumsum([0] + [len(s) for s in shards])
    for i, s in enumerate(shards):
        rows = np.array([0, len(s) // 2, len(s) - 1])
        _, got = idx.search(s[rows], 1)
        np.testing.assert_array_equal(got[:, 0], starts[i] + rows)
    assert idx.source_fingerprint == ix.vectors_fingerprint(np.concatenate(shards))
    again = VectorIndex.load(path, expect={"ntotal": 20000, "source_fingerprint": idx.source_fingerprint})
    assert again.ondisk and again.nprobe == 16
    with pytest.raises(ValueError, match="cannot be saved again"):
        again.save(str(path) + ".copy")


def test_damaged_or_missing_ivfdata_is_refused(pool, tmp_path):
    shards, _ = pool
    path = tmp_path / "x.faiss"
    ix.build_ondisk(shards[:2], IndexSpec(kind="ivf", nlist=16, metric="l2"), path, sample=2000)
    data = str(path) + ix.IVFDATA_SUFFIX
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x7f" * 16)
    with pytest.raises(IndexFileError, match="fingerprint"):
        VectorIndex.load(path)
    os.truncate(data, size // 2)
    with pytest.raises(IndexFileError, match="truncated"):
        VectorIndex.load(path)
    os.unlink(data)
    with pytest.raises(IndexFileError, match="missing"):
        VectorIndex.load(path)


def test_rebuild_replaces_in_place_and_moves_with_its_folder(pool, tmp_path):
    shards, queries = pool
    path = tmp_path / "a" / "x.faiss"
    path.parent.mkdir()
    spec = IndexSpec(kind="factory", factory="IVF32,SQ8", metric="ip")
    ix.build_ondisk(shards[:1], spec, path)
    ix.build_ondisk(shards[:2], spec, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.faiss", "x.faiss.ivfdata", "x.faiss.json"]
    moved = tmp_path / "b"
    os.rename(path.parent, moved)
    idx = VectorIndex.load(moved / "x.faiss")
    assert idx.ntotal == 11000 and ix.recall_at_k(idx, shards[:2], queries[:50]) >= 0.9


def test_bad_input_is_refused(pool, tmp_path):
    shards, _ = pool
    with pytest.raises(ValueError, match="needs an IVF spec"):
        ix.build_ondisk(shards, IndexSpec(kind="hnsw"), tmp_path / "h.faiss")
    with pytest.raises(TypeError, match="sequence"):
        ix.build_ondisk(iter(shards), IndexSpec(kind="ivf"), tmp_path / "i.faiss")
    with pytest.raises(ValueError, match="shard 1"):
        ix.build_ondisk([shards[0], shards[1][:, :32]], IndexSpec(kind="ivf", nlist=8), tmp_path / "d.faiss",
                        sample=1000)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    bad = shards[0].copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ix.build_ondisk([bad], IndexSpec(kind="ivf", nlist=8), tmp_path / "n.faiss", sample=1000)


def test_store_builds_a_pool_above_the_threshold_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import cfg_for, write_jsonl

    from actcache.builder import build
    from actcache.store import ArrayId, Store, verify

    words = ["fine", "dull", "slow", "great", "cast", "movie", "sofa", "news", "sky", "fox"]
    rows = [{"id": f"x{i}", "review": f"{words[i % 10]} {words[i // 10 % 10]} {words[i * 7 % 10]}",
             "label": i % 2, "split": "eval" if i % 5 == 0 else "train"} for i in range(100)]
    data = write_jsonl(tmp_path / "reviews.jsonl", rows)
    monkeypatch.setenv("ACTCACHE_INDEX_SHARD_BYTES", "2048")  # a few rows per shard
    st = build(cfg_for(tiny_model_dir["llama"], data, tmp_path / "store", layers="-1", store_dtype="float32",
                       components=("resid",), index="ivf"))
    a = next(x for x in st.arrays if x.pooling == "mean" and x.mask == "isolated")
    assert isinstance(a, ArrayId)
    idx = st.index(a.component, a.layer, a.pooling, a.mask)
    assert idx.ondisk and idx.ntotal == len(st.pool_rows)
    assert os.path.exists(str(st.index_path(a)) + ix.IVFDATA_SUFFIX)
    pool = st.acts(a.component, a.layer, a.pooling, a.mask, split="pool")
    flat = VectorIndex.build(pool)
    queries = st.acts(a.component, a.layer, a.pooling, a.mask, split="eval")
    _, got = idx.search(queries, 5)
    _, want = flat.search(queries, 5)
    assert np.mean([np.intersect1d(g, w).size / 5 for g, w in zip(got, want)]) >= 0.9
    assert verify(st.dir).ok
    data_file = str(st.index_path(a)) + ix.IVFDATA_SUFFIX
    os.truncate(data_file, os.path.getsize(data_file) // 2)
    rep = verify(st.dir)
    assert [f.what for f in rep.findings] == ["index"]
    assert verify(st.dir, repair=True).findings[0].repaired
    assert verify(st.dir).ok and Store(st.dir).index(a.component, a.layer, a.pooling, a.mask).ondisk
