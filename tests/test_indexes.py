"""Tests for the `indexes` package, checked against the numpy reference `exact_search`."""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

import actcache_indexes as ix
from actcache_indexes import IndexFileError, IndexMismatchError, IndexSpec, VectorIndex, exact_search
from actcache_indexes.flat import search_flat

INDEXES_DIR = Path(ix.__file__).resolve().parent


def clustered(n: int, d: int, seed: int, n_clusters: int = 200, noise: float = 1.0, centers=None):
    """Gaussian blobs: centres ~ N(0, I), points = centre + noise * N(0, I)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    a = rng.integers(0, len(centers), n)
    x = centers[a] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), centers


def recall_at(ids: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, ref)]))


def untied_mask(ref_scores: np.ndarray, tol: float) -> np.ndarray:
    """True where a reference rank is separated from both neighbours by > tol."""
    gaps = np.abs(np.diff(ref_scores, axis=1)) > tol
    left = np.concatenate([np.ones((len(gaps), 1), bool), gaps], axis=1)
    right = np.concatenate([gaps, np.ones((len(gaps), 1), bool)], axis=1)
    return left & right


@pytest.fixture(autouse=True)
def _threads():
    ix.set_threads(2)


# --------------------------------------------------------------------------- exact


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_equals_numpy_reference(metric):
    x, c = clustered(3000, 48, seed=1)
    q, _ = clustered(64, 48, seed=2, centers=c)
    v = VectorIndex.build(x, IndexSpec(kind="flat", metric=metric))
    S, I = v.search(q, 10)
    R_s, R_i = exact_search(x, q, 10, metric)
    assert S.dtype == np.float32 and I.dtype == np.int64 and S.shape == I.shape == (64, 10)
    scale = float(np.abs(R_s).max())
    np.testing.assert_allclose(S, R_s, rtol=1e-5, atol=1e-5 * scale)
    mask = untied_mask(R_s, 1e-5 * scale)
    assert mask.mean() > 0.9  # the comparison below must actually cover most ranks
    np.testing.assert_array_equal(I[mask], R_i[mask])
    assert np.all(np.diff(S, axis=1) <= 1e-6 * scale), "scores must be best-first"


def test_exact_search_conventions():
    v = np.array([[1, 0], [0, 1], [1, 0], [-1, 0]], np.float32)
    q = np.array([[2, 0]], np.float32)
    s, i = exact_search(v, q, 3, "cosine")
    assert i.tolist() == [[0, 2, 1]]  # tie (ids 0, 2) broken by lower id first
    np.testing.assert_allclose(s, [[1, 1, 0]])
    s, i = exact_search(v, q, 4, "l2")
    np.testing.assert_allclose(s, [[-1, -1, -5, -9]])  # negative squared distance
    s, i = exact_search(v, q, 2, "ip")
    np.testing.assert_allclose(s, [[2, 2]])


def brute_force(x, q, k, metric, exclude=None):
    """Independent float64 reference: every score, one full sort per row by
    (score descending, id ascending); excluded ids dropped, -1 / -inf padding."""
    X, Q = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    S = -((Q[:, None, :] - X[None, :, :]) ** 2).sum(axis=2) if metric == "l2" else Q @ X.T
    for r, row in enumerate(exclude if exclude is not None else []):
        S[r, row[(row >= 0) & (row < len(X))]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(X)), S.shape), -S), axis=1)[:, :k]
    scores = np.take_along_axis(S, order, axis=1)
    return scores, np.where(np.isneginf(scores), -1, order)


def integer_data(n, q, d, seed):
    """Small-integer vectors: ip and l2 scores are exact in float32, with many exact ties."""
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, (n, d)).astype(np.float32), rng.integers(-3, 4, (q, d)).astype(np.float32)


def some_exclusions(nq, n, seed):
    """Per row: random ids (some repeated or out of range), the row's own id, -1 padding."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(-1, n + 2, (nq, 6)), np.arange(nq)[:, None] % n,
                           -np.ones((nq, 2), np.int64)], axis=1)


# (n, q, k, query_block, pool_block): k = 1, k = ntotal, q = 1, blocks that divide
# n and q exactly, ragged last blocks, a block size one above/below, tails outside
# the column groups (pool_block not a multiple of the group size).
FLAT_SHAPES = [
    (1000, 37, 1, 16, 128),
    (300, 9, 300, 4, 64),
    (1000, 1, 10, 16, 128),
    (512, 32, 5, 32, 256),
    (513, 33, 5, 32, 256),
    (511, 31, 7, 32, 130),
    (20000, 3, 10, 512, 8192),
]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("shape", FLAT_SHAPES)
@pytest.mark.parametrize("excluded", [False, True])
def test_search_flat_exact_on_integer_data(metric, shape, excluded):
    n, nq, k, qb, pb = shape
    x, q = integer_data(n, nq, 8, seed=n + nq + k)
    ex = some_exclusions(nq, n, seed=k) if excluded else None
    S, I = search_flat(x, q, k, metric, exclude=ex, query_block=qb, pool_block=pb)
    R_s, R_i = brute_force(x, q, k, metric, ex)
    assert S.dtype == np.float32 and I.dtype == np.int64 and S.shape == I.shape == (nq, k)
    # Exact scores, so ids must match everywhere, equal scores ordered by id.
    np.testing.assert_array_equal(I, R_i)
    np.testing.assert_array_equal(S, R_s)
    if n > k + ex.shape[1] if excluded else True:
        assert (I >= 0).all()


def assert_same_ranks(S, I, x, q, k, metric, exclude=None, min_cover=0.9):
    """Scores within 1e-5 (of the largest |score|) of the float64 brute force,
    and identical ids at every rank whose reference score is separated from
    both neighbours (rank k+1 included) by more than that; returns the mask."""
    R_s, R_i = brute_force(x, q, min(k + 1, len(x)), metric, exclude)
    scale = float(np.abs(R_s[np.isfinite(R_s)]).max())
    np.testing.assert_allclose(S, R_s[:, :k], rtol=1e-5, atol=1e-5 * scale)
    mask = untied_mask(np.where(np.isfinite(R_s), R_s, -1e30), 1e-5 * scale)[:, :k]
    assert mask.mean() > min_cover  # the id comparison must cover most ranks
    np.testing.assert_array_equal(I[mask], R_i[:, :k][mask])
    return mask


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("shape", FLAT_SHAPES)
@pytest.mark.parametrize("excluded", [False, True])
def test_search_flat_matches_float64_on_float_data(metric, shape, excluded):
    n, nq, k, qb, pb = shape
    x, c = clustered(n, 24, seed=n + k)
    q, _ = clustered(nq, 24, seed=nq + 7, centers=c)
    if metric == "cosine":
        x, q = _normalized(x), _normalized(q)
    ex = some_exclusions(nq, n, seed=k) if excluded else None
    S, I = search_flat(x, q, k, "l2" if metric == "l2" else "ip", exclude=ex, query_block=qb, pool_block=pb)
    assert_same_ranks(S, I, x, q, k, metric, ex, min_cover=0.5 if k == n else 0.9)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("k", [1, 10, 3000])
def test_flat_index_matches_float64_and_faiss(metric, k):
    x, c = clustered(3000, 48, seed=31)
    q, _ = clustered(50, 48, seed=32, centers=c)
    v = VectorIndex.build(x, IndexSpec(kind="flat", metric=metric))
    cover = 0.5 if k == 3000 else 0.9
    for exclude in (None, some_exclusions(50, 3000, seed=33)):
        S, I = v.search(q, k, exclude=exclude)
        assert_same_ranks(S, I, x, q, k, metric, exclude, cover)

    # faiss's own exhaustive search over the same stored vectors must agree
    # with the float64 reference on the same untied ranks, hence with us.
    D, F = faiss.downcast_index(v.index).search(_normalized(q) if metric == "cosine" else q, k)
    D = -D if metric == "l2" else D
    mask = assert_same_ranks(D, F, x, q, k, metric, None, cover)
    S, I = v.search(q, k)
    np.testing.assert_array_equal(I[mask], F[mask])


def _normalized(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_flat_ties_go_to_the_lower_id():
    x = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]], np.float32)
    v = VectorIndex.build(x, IndexSpec(kind="flat", metric="ip"))
    S, I = v.search(np.array([[1, 0]], np.float32), 2)
    assert I.tolist() == [[0, 2]]  # ids 0, 2, 3 tie at the top; the cut keeps the lowest
    S, I = v.search(np.array([[1, 0]], np.float32), 2, exclude=np.array([[2]]))
    assert I.tolist() == [[0, 3]]


def test_flat_search_reads_stored_vectors_in_place(tmp_path):
    x, _ = clustered(500, 16, seed=34)
    v = VectorIndex.build(x, IndexSpec(kind="flat"))
    v.save(tmp_path / "f.faiss")
    w = VectorIndex.load(tmp_path / "f.faiss", mmap=True)
    stored = w._stored_vectors()
    assert not stored.flags.writeable and not stored.flags.owndata
    np.testing.assert_array_equal(stored, _normalized(x).astype(np.float32))
    np.testing.assert_array_equal(w.search(x[:20], 5)[1], v.search(x[:20], 5)[1])


def test_float16_input_and_input_not_mutated():
    x, c = clustered(500, 16, seed=3)
    x16 = x.astype(np.float16)
    before = x16.copy()
    v = VectorIndex.build(x16, IndexSpec())
    np.testing.assert_array_equal(x16, before)
    q = x[:5].copy()
    v.search(q, 3)
    np.testing.assert_array_equal(q, x[:5])
    assert v.search(q, 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_zero_vector_and_nonfinite():
    x, _ = clustered(100, 8, seed=4)
    x[7] = 0
    v = VectorIndex.build(x, IndexSpec())
    S, _ = v.search(np.zeros((1, 8), np.float32), 5)
    assert np.isfinite(S).all()
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex.build(bad, IndexSpec())


# --------------------------------------------------------------------------- approximate


@pytest.fixture(scope="module")
def recall_data():
    # noise 1.2 at d=64 is hard enough that weak settings (nprobe=1, ef_search=1)
    # fall well below 0.95, so the threshold below means something.
    x, c = clustered(20_000, 64, seed=10, n_clusters=200, noise=1.2)
    q, _ = clustered(300, 64, seed=11, centers=c, noise=1.2)
    _, R = exact_search(x, q, 10, "cosine")
    return x, q, R


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_default_recall(recall_data, kind):
    x, q, R = recall_data
    v = VectorIndex.build(x, IndexSpec(kind=kind))
    _, I = v.search(q, 10)
    r = recall_at(I, R)
    assert r >= 0.95, f"{kind} recall@10 {r:.3f} at defaults {v.spec}"
    # The metric must be able to detect a bad setting, or the assertion above is vacuous.
    if kind == "ivf":
        v.nprobe = 1
    else:
        v.ef_search = 1
    _, I1 = v.search(q, 10)
    assert recall_at(I1, R) < 0.95, "recall check is not discriminative on this data"


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16"])
def test_factory_spec(recall_data, factory):
    x, q, _ = recall_data
    x = x[:5000]  # only needs to show the factory path works; keep it quick
    _, R = exact_search(x, q, 10, "cosine")
    v = VectorIndex.build(x, IndexSpec(kind="factory", factory=factory))
    S, I = v.search(q, 10)
    assert I.shape == (len(q), 10) and (I >= 0).all()
    assert recall_at(I, R) >= 0.9
    if factory.startswith("IVF"):
        assert v.nprobe == 16  # default applied to factory IVF, not FAISS's nprobe=1


def test_bad_factory_and_spec():
    x, _ = clustered(100, 8, seed=5)
    with pytest.raises(ValueError, match="factory"):
        VectorIndex.build(x, IndexSpec(kind="factory", factory="NotAnIndex!!"))
    with pytest.raises(ValueError):
        IndexSpec(kind="annoy")
    with pytest.raises(ValueError):
        IndexSpec(metric="manhattan")
    with pytest.raises(ValueError):
        IndexSpec(kind="factory")


def test_ivf_deterministic_for_seed():
    x, c = clustered(5000, 32, seed=6)
    q, _ = clustered(100, 32, seed=7, centers=c)

    def build(seed):
        v = VectorIndex.build(x, IndexSpec(kind="ivf", seed=seed, nprobe=2))
        ivf = faiss.extract_index_ivf(v.index)
        return v.search(q, 10), ivf.quantizer.reconstruct_n(0, ivf.nlist)

    (s1, i1), c1 = build(0)
    (s2, i2), c2 = build(0)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    _, c3 = build(1)
    assert not np.array_equal(c1, c3), "seed must reach k-means"


def test_hnsw_returns_k_even_when_k_exceeds_ef_search():
    x, _ = clustered(2000, 16, seed=8)
    v = VectorIndex.build(x, IndexSpec(kind="hnsw", ef_search=4))
    # FAISS HNSW alone returns ~150-200 valid ids here for k=400 (efSearch=4).
    _, I = v.search(x[:10], 400)
    assert (I >= 0).all()
    _, R = exact_search(x, x[:10], 400, "cosine")
    assert recall_at(I, R) >= 0.9


def test_nprobe_ef_search_applicability():
    x, _ = clustered(1000, 8, seed=9)
    flat = VectorIndex.build(x, IndexSpec())
    assert flat.nprobe is None and flat.ef_search is None
    with pytest.raises(ValueError, match="IVF"):
        flat.nprobe = 4
    with pytest.raises(ValueError, match="HNSW"):
        flat.ef_search = 4
    ivf = VectorIndex.build(x, IndexSpec(kind="ivf"))
    assert ivf.spec.nlist == 1000 // 39 and ivf.nprobe == min(16, ivf.spec.nlist)
    ivf.nprobe = 3
    assert ivf.spec.nprobe == 3


# --------------------------------------------------------------------------- search errors / exclude


def test_search_errors():
    x, _ = clustered(50, 8, seed=12)
    v = VectorIndex.build(x, IndexSpec())
    with pytest.raises(ValueError, match=r"k=51.*ntotal=50"):
        v.search(x[:2], 51)
    with pytest.raises(IndexMismatchError, match="9.*8"):
        v.search(np.zeros((2, 9), np.float32), 3)
    with pytest.raises(ValueError):
        v.search(x[0], 3)  # 1-D
    with pytest.raises(ValueError, match="0 vectors"):
        VectorIndex.build(np.zeros((0, 8), np.float32), IndexSpec())
    S, I = v.search(np.zeros((0, 8), np.float32), 3)
    assert S.shape == I.shape == (0, 3)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_exclude(kind):
    x, c = clustered(2000, 32, seed=13)
    v = VectorIndex.build(x, IndexSpec(kind=kind))
    q = x[:40]
    rng = np.random.default_rng(0)
    _, top = exact_search(x, q, 30, "cosine")
    # Per row: the query itself, a few of its true neighbours, padding, and a random id.
    ex = np.concatenate([np.arange(40)[:, None], top[:, 1:6], -np.ones((40, 2), np.int64),
                         rng.integers(0, 2000, (40, 1))], axis=1)
    S, I = v.search(q, 10, exclude=ex)
    assert I.shape == (40, 10) and (I >= 0).all() and np.isfinite(S).all()
    for r in range(40):
        assert not set(I[r].tolist()) & set(ex[r][ex[r] >= 0].tolist())
    if kind == "flat":
        expected = np.array([[i for i in row if i not in set(e.tolist())][:10] for row, e in zip(top, ex)])
        np.testing.assert_array_equal(I, expected)


def test_exclude_pads_when_pool_too_small():
    x, _ = clustered(12, 4, seed=14)
    v = VectorIndex.build(x, IndexSpec())
    ex = np.tile(np.arange(5), (3, 1))
    S, I = v.search(x[5:8], 10, exclude=ex)
    assert (I[:, :7] >= 5).all() and (I[:, 7:] == -1).all()
    assert np.isneginf(S[:, 7:]).all() and np.isfinite(S[:, :7]).all()


# --------------------------------------------------------------------------- persistence


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, kind, mmap):
    x, c = clustered(3000, 32, seed=15)
    q, _ = clustered(50, 32, seed=16, centers=c)
    v = VectorIndex.build(x, IndexSpec(kind=kind), meta={"key": "abc", "layer": 3})
    S, I = v.search(q, 10)
    p = tmp_path / "idx.faiss"
    v.save(p)
    assert _files(tmp_path) == {"idx.faiss", "idx.faiss.json"}
    side = json.loads((tmp_path / "idx.faiss.json").read_text())
    assert side["d"] == 32 and side["ntotal"] == 3000 and side["meta"]["key"] == "abc"
    assert side["spec"]["kind"] == kind

    w = VectorIndex.load(p, mmap=mmap, expect={"d": 32, "ntotal": 3000, "key": "abc", "metric": "cosine"})
    assert w.spec == v.spec and w.meta == v.meta and w.d == 32 and w.ntotal == 3000
    if sys.platform.startswith("linux"):
        assert w.mmapped is mmap
        assert w.load_mode == ("mmap" if mmap else "read")
    S2, I2 = w.search(q, 10)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_array_equal(S2, S)

    # A memory-mapped index can be saved again, elsewhere and over its own file
    # (legacy IO_FLAG_MMAP fails here: the copy only references the original's
    # inverted lists, and searching it segfaults).
    w.save(tmp_path / "copy.faiss")
    S3, I3 = VectorIndex.load(tmp_path / "copy.faiss", mmap=mmap).search(q, 10)
    np.testing.assert_array_equal(I3, I)
    w.save(p)
    S4, I4 = VectorIndex.load(p, mmap=mmap).search(q, 10)
    np.testing.assert_array_equal(I4, I)
    np.testing.assert_array_equal(w.search(q, 10)[1], I)  # old mapping still valid


def test_search_settings_persist(tmp_path):
    x, _ = clustered(3000, 16, seed=17)
    v = VectorIndex.build(x, IndexSpec(kind="ivf"))
    v.nprobe = 5
    v.save(tmp_path / "a.faiss")
    assert VectorIndex.load(tmp_path / "a.faiss").nprobe == 5


@pytest.fixture
def saved(tmp_path):
    x, _ = clustered(500, 16, seed=18)
    v = VectorIndex.build(x, IndexSpec(), meta={"key": "abc"})
    p = tmp_path / "a.faiss"
    v.save(p)
    return p, v, x


@pytest.mark.parametrize("field,value,found", [("d", 17, 16), ("ntotal", 499, 500), ("key", "xyz", "abc")])
def test_expect_mismatch(saved, field, value, found):
    p, _, _ = saved
    with pytest.raises(IndexMismatchError) as e:
        VectorIndex.load(p, expect={field: value})
    msg = str(e.value)
    assert repr(field) in msg and repr(value) in msg and repr(found) in msg


def test_expect_json_normalised_and_file_mode(tmp_path):
    x, _ = clustered(100, 8, seed=23)
    p = tmp_path / "b.faiss"
    old = os.umask(0o022)
    try:
        VectorIndex.build(x, IndexSpec(), meta={"layers": [1, 2]}).save(p)
    finally:
        os.umask(old)
    assert VectorIndex.load(p, expect={"layers": (1, 2)}).meta["layers"] == [1, 2]
    assert (p.stat().st_mode & 0o777) == 0o644  # follows the umask, unlike mkstemp's 0600
    assert (Path(str(p) + ".json").stat().st_mode & 0o777) == 0o644


def test_expect_missing_field(saved):
    p, _, _ = saved
    with pytest.raises(IndexMismatchError, match="model"):
        VectorIndex.load(p, expect={"model": "gpt2"})


def test_missing_files(saved, tmp_path):
    p, _, _ = saved
    with pytest.raises(IndexFileError, match="does not exist"):
        VectorIndex.load(tmp_path / "nope.faiss")
    os.unlink(str(p) + ".json")
    with pytest.raises(IndexFileError, match="sidecar"):
        VectorIndex.load(p)


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_file(saved, mmap):
    p, _, _ = saved
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFileError, match="rebuild"):
        VectorIndex.load(p, mmap=mmap)


@pytest.mark.parametrize("mmap", [True, False])
def test_garbage_file_reaching_faiss(saved, mmap):
    """Garbage with a self-consistent sidecar: FAISS itself must reject it cleanly."""
    p, _, _ = saved
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    side = Path(str(p) + ".json")
    doc = json.loads(side.read_text())
    doc["file_bytes"] = 4096
    doc["file_fingerprint"] = ix.file_fingerprint(str(p))
    side.write_text(json.dumps(doc))
    with pytest.raises(IndexFileError, match="FAISS could not read"):
        VectorIndex.load(p, mmap=mmap)


def test_corrupt_or_foreign_sidecar(saved):
    p, _, _ = saved
    side = Path(str(p) + ".json")
    side.write_text("{not json")
    with pytest.raises(IndexFileError, match="corrupt"):
        VectorIndex.load(p)
    side.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(IndexFileError, match="corrupt or foreign"):
        VectorIndex.load(p)


def test_torn_pair_detected(saved, tmp_path):
    """Old sidecar next to a new index of the same shape (concurrent saves) is refused."""
    p, _, x = saved
    old_side = Path(str(p) + ".json").read_text()
    VectorIndex.build(x[::-1].copy(), IndexSpec(), meta={"key": "new"}).save(p)
    Path(str(p) + ".json").write_text(old_side)
    with pytest.raises(IndexFileError, match="fingerprint"):
        VectorIndex.load(p, expect={"key": "abc"})


def test_save_failure_keeps_old_index(saved, monkeypatch):
    p, v, x = saved
    old_bytes = p.read_bytes()
    old_side = Path(str(p) + ".json").read_bytes()

    def broken_write(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    new = VectorIndex.build(x[:100], IndexSpec(), meta={"key": "new"})
    with pytest.raises(RuntimeError, match="disk full"):
        new.save(p)
    assert p.read_bytes() == old_bytes
    assert Path(str(p) + ".json").read_bytes() == old_side
    assert _files(p.parent) == {"a.faiss", "a.faiss.json"}, "temp file left behind"
    monkeypatch.undo()
    w = VectorIndex.load(p, expect={"key": "abc", "ntotal": 500})
    np.testing.assert_array_equal(w.search(x[:5], 3)[1], v.search(x[:5], 3)[1])


def test_crash_before_sidecar_is_refused(saved, monkeypatch):
    """A crash after the new index is in place but before its sidecar leaves no stale sidecar."""
    p, _, x = saved

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ix.io, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        VectorIndex.build(x[:100], IndexSpec(), meta={"key": "new"}).save(p)
    monkeypatch.undo()
    assert _files(p.parent) == {"a.faiss"}
    with pytest.raises(IndexFileError, match="sidecar"):
        VectorIndex.load(p, expect={"key": "abc"})


def test_meta_must_be_json():
    x, _ = clustered(50, 4, seed=19)
    with pytest.raises(ValueError, match="JSON"):
        VectorIndex.build(x, IndexSpec(), meta={"arr": np.zeros(2)})


# --------------------------------------------------------------------------- threads / torch coexistence


def test_set_threads():
    assert ix.set_threads(1) == 1
    assert faiss.omp_get_max_threads() == 1
    assert ix.set_threads() == (os.cpu_count() or 1)
    with pytest.raises(ValueError):
        ix.set_threads(0)


def test_torch_and_faiss_in_one_process():
    torch = pytest.importorskip("torch")
    nthreads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(nthreads)
    ix.set_threads(nthreads)

    x, c = clustered(8000, 64, seed=20)
    q, _ = clustered(256, 64, seed=21, centers=c)
    v = VectorIndex.build(x, IndexSpec(kind="flat", metric="ip"))
    R_s, R_i = exact_search(x, q, 10, "ip")
    scale = float(np.abs(R_s).max())

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96).eval()
    W = lin.weight.detach().numpy().astype(np.float64)
    b = lin.bias.detach().numpy().astype(np.float64)
    B = np.random.default_rng(22).standard_normal((96, 32)).astype(np.float32)

    def run_torch():
        with torch.no_grad():
            out = lin(torch.from_numpy(q)) @ torch.from_numpy(B)
        ref = (q.astype(np.float64) @ W.T + b) @ B.astype(np.float64)
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-3)

    def run_faiss():
        S, I = v.search(q, 10)
        np.testing.assert_allclose(S, R_s, rtol=1e-5, atol=1e-5 * scale)
        mask = untied_mask(R_s, 1e-5 * scale)
        np.testing.assert_array_equal(I[mask], R_i[mask])

    run_faiss()
    run_torch()
    run_faiss()
    run_torch()
    assert torch.get_num_threads() == nthreads
    assert faiss.omp_get_max_threads() == nthreads


# --------------------------------------------------------------------------- dependency rule


def test_indexes_imports_only_numpy_faiss_stdlib():
    allowed = {"numpy", "faiss", "__future__"} | set(sys.stdlib_module_names)
    forbidden = {"actcache", "cli", "torch"}
    files = sorted(INDEXES_DIR.rglob("*.py"))
    assert files
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import within indexes/
                    continue
                roots = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "__import__", "import_module"):
                roots = [a.value.split(".")[0] for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            else:
                continue
            for r in roots:
                assert r not in forbidden, f"{f.name}:{node.lineno} imports {r}"
                assert r in allowed, f"{f.name}:{node.lineno} imports non-stdlib module {r}"


# --------------------------------------------------------------------------- self-checks (issue 10)


def test_same_size_garbling_detected(saved):
    """Bytes changed in place at the same size (in the vector data, far from any
    sampled block) must not be trusted."""
    p, _, _ = saved
    data = bytearray(p.read_bytes())
    mid = len(data) // 2 + 3
    data[mid: mid + 64] = bytes(64)
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="fingerprint"):
        VectorIndex.load(p)


def test_sidecar_of_other_vectors_detected(saved, tmp_path):
    """A sidecar and index copied over from another array with the same key, d and
    ntotal pass every shape check; the source fingerprint still tells them apart."""
    p, _, x = saved
    other = tmp_path / "b.faiss"
    VectorIndex.build(x[::-1].copy(), IndexSpec(), meta={"key": "abc"}).save(other)
    p.write_bytes(other.read_bytes())
    Path(str(p) + ".json").write_bytes(Path(str(other) + ".json").read_bytes())
    VectorIndex.load(p, expect={"key": "abc", "d": 16, "ntotal": 500})  # shapes alone cannot tell
    with pytest.raises(IndexMismatchError, match="source_fingerprint"):
        VectorIndex.load(p, expect={"key": "abc", "source_fingerprint": ix.vectors_fingerprint(x)})
    VectorIndex.load(other, expect={"source_fingerprint": ix.vectors_fingerprint(x[::-1])})


def test_vectors_fingerprint_reference():
    import hashlib

    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    ref = hashlib.sha256(json.dumps([3, 4]).encode() + x.astype(np.float32).tobytes()).hexdigest()
    assert ix.vectors_fingerprint(x) == ref
    y = x.copy()
    y[2, 3] = 0
    assert ix.vectors_fingerprint(y) != ref


def test_atomic_write_no_space(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ix.NoSpaceError, match=r"f\.bin.*disk is full.*1\.0 MiB"):
        ix.atomic_write(target, full, nbytes=2**20)
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == {"f.bin"}, "temp file left behind"
    ix.atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and _files(tmp_path) == {"f.bin"}


def test_check_factory_before_any_work():
    ix.check_factory(IndexSpec(kind="factory", factory="IVF4,Flat"))
    with pytest.raises(ValueError, match="could not parse"):
        ix.check_factory(IndexSpec(kind="factory", factory="Nonsense"))


# --------------------------------------------------------------------------- verification against the source


def _side(p: Path) -> dict:
    return json.loads(Path(str(p) + ".json").read_text())


def _fp_reference(a: np.ndarray) -> str:
    """vectors_fingerprint spelled out: sha256 of the shape as JSON, then the float32 C-order bytes."""
    h = hashlib.sha256(json.dumps(list(a.shape)).encode())
    h.update(np.asarray(a, dtype=np.float32).tobytes(order="C"))
    return h.hexdigest()


def test_sidecar_records_full_file_hash_and_source(saved):
    p, v, x = saved
    side = _side(p)
    assert side["file_fingerprint"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert side["file_bytes"] == p.stat().st_size
    assert side["source_fingerprint"] == _fp_reference(x) == v.source_fingerprint
    # Of the vectors as given: the indexed (normalised) copy hashes differently.
    assert side["source_fingerprint"] != _fp_reference(x / np.linalg.norm(x, axis=1, keepdims=True))
    w = VectorIndex.load(p, expect={"source_fingerprint": _fp_reference(x)})
    assert w.source_fingerprint == side["source_fingerprint"]
    w.save(p.parent / "again.faiss")  # kept through load and re-save
    assert _side(p.parent / "again.faiss")["source_fingerprint"] == side["source_fingerprint"]


def test_vectors_fingerprint_invariants():
    rng = np.random.default_rng(40)
    a = rng.standard_normal((37, 11)).astype(np.float32)
    fp = ix.vectors_fingerprint(a)
    assert fp == _fp_reference(a) and len(fp) == 64
    assert ix.vectors_fingerprint(a.copy()) == fp
    assert ix.vectors_fingerprint(np.asfortranarray(a)) == fp
    assert ix.vectors_fingerprint(a.astype(">f4")) == fp  # byte order does not matter, values do
    assert ix.vectors_fingerprint(a.astype(np.float64)) == fp
    h = a.astype(np.float16)
    assert ix.vectors_fingerprint(h) == ix.vectors_fingerprint(h.astype(np.float32)) == _fp_reference(h)
    assert ix.vectors_fingerprint(a.reshape(11, 37)) != fp  # same bytes, other shape
    for i, j in [(0, 0), (18, 5), (36, 10)]:
        b = a.copy()
        b[i, j] = np.nextafter(b[i, j], np.float32(np.inf))
        assert ix.vectors_fingerprint(b) != fp, (i, j)


def test_vectors_fingerprint_reads_datasets_in_blocks():
    """An h5py-like object (shape, dtype, row slicing) is read in row blocks, never whole."""
    a = np.random.default_rng(41).standard_normal((5, 1 << 21)).astype(np.float16)  # 8 MiB float32 rows

    class Dataset:
        shape, dtype = a.shape, a.dtype
        slices: list = []

        def __getitem__(self, s):
            self.slices.append(s)
            return a[s]

    ds = Dataset()
    assert ix.vectors_fingerprint(ds) == _fp_reference(a) == ix.vectors_fingerprint(a)
    assert len(ds.slices) > 1 and all(isinstance(s, slice) and s.stop - s.start < 5 for s in ds.slices)


@pytest.mark.parametrize("mmap", [True, False])
def test_garbled_vectors_caught_by_the_content_hash(saved, mmap):
    p, v, x = saved
    data = bytearray(p.read_bytes())
    mid = len(data) // 2  # inside the stored vectors
    data[mid:mid + 64] = bytes(255 - b for b in data[mid:mid + 64])
    p.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="fingerprint.*rebuild"):
        VectorIndex.load(p, mmap=mmap, expect={"key": "abc", "source_fingerprint": _fp_reference(x)})
    # FAISS alone reads the garbled file without complaint: only the hash stood in the way.
    assert faiss.read_index(str(p)).ntotal == 500


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_file_with_edited_size_record(saved, mmap):
    """Truncated and the sidecar's size edited to match: the hash refuses it, and
    with the hash edited too, FAISS's own read error becomes IndexFileError."""
    p, _, _ = saved
    data = p.read_bytes()[:-100]
    p.write_bytes(data)
    side = Path(str(p) + ".json")
    doc = json.loads(side.read_text())
    doc["file_bytes"] = len(data)
    side.write_text(json.dumps(doc))
    with pytest.raises(IndexFileError, match="fingerprint"):
        VectorIndex.load(p, mmap=mmap)
    doc["file_fingerprint"] = hashlib.sha256(data).hexdigest()
    side.write_text(json.dumps(doc))
    with pytest.raises(IndexFileError, match="FAISS could not read.*rebuild"):
        VectorIndex.load(p, mmap=mmap)


def test_sidecar_alone_swapped_from_another_array(tmp_path):
    """Only the sidecar copied from an index of other vectors with the same d,
    ntotal and key: the caller's array / source_fingerprint catch it as a mismatch."""
    x, _ = clustered(400, 16, seed=42)
    y, _ = clustered(400, 16, seed=43)
    a, b = tmp_path / "a.faiss", tmp_path / "b.faiss"
    VectorIndex.build(x, IndexSpec(), meta={"key": "k", "array": "layer1"}).save(a)
    VectorIndex.build(y, IndexSpec(), meta={"key": "k", "array": "layer2"}).save(b)
    Path(str(a) + ".json").write_bytes(Path(str(b) + ".json").read_bytes())
    base = {"d": 16, "ntotal": 400, "key": "k"}
    with pytest.raises(IndexMismatchError, match="source_fingerprint"):
        VectorIndex.load(a, expect={**base, "source_fingerprint": _fp_reference(x)})
    with pytest.raises(IndexMismatchError, match="'layer1'.*'layer2'"):
        VectorIndex.load(a, expect={**base, "array": "layer1"})
    with pytest.raises(IndexFileError, match="fingerprint"):  # without those, the content hash
        VectorIndex.load(a, expect=base)


def test_source_fingerprint_unknown_is_a_mismatch(tmp_path):
    x, _ = clustered(100, 8, seed=44)
    raw = faiss.IndexFlatIP(8)
    raw.add(x)
    VectorIndex(raw, IndexSpec()).save(tmp_path / "raw.faiss")
    assert _side(tmp_path / "raw.faiss")["source_fingerprint"] is None
    with pytest.raises(IndexMismatchError, match="source_fingerprint"):
        VectorIndex.load(tmp_path / "raw.faiss", expect={"source_fingerprint": _fp_reference(x)})


@pytest.mark.parametrize("exc", [RuntimeError("Error in faiss"), OSError(errno.EIO, "Input/output error"),
                                 ValueError("bad"), MemoryError()])
def test_every_read_error_is_index_file_error(saved, monkeypatch, exc):
    p, _, _ = saved

    def broken_read(*a, **k):
        raise exc

    monkeypatch.setattr(faiss, "read_index", broken_read)
    for mmap in (True, False):
        with pytest.raises(IndexFileError, match="FAISS could not read.*rebuild"):
            VectorIndex.load(p, mmap=mmap)


def test_unreadable_file_is_index_file_error(saved, monkeypatch):
    p, _, _ = saved

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ix.io, "file_fingerprint", denied)
    with pytest.raises(IndexFileError, match="unreadable.*rebuild"):
        VectorIndex.load(p)


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_names_temp(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    seen = []

    def write(f):
        seen.append(Path(f.name))
        f.write(b"new ")
        f.write(np.arange(3, dtype=np.int32))

    old = os.umask(0o022)
    try:
        assert ix.atomic_write(target, write) == target
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new " + np.arange(3, dtype=np.int32).tobytes()
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(f".t.bin.{os.getpid()}.") and tmp.suffix == ".tmp"
    assert ix.tmp_owner(tmp.name) == os.getpid()
    assert _files(tmp_path) == {"t.bin"}
    assert (target.stat().st_mode & 0o777) == 0o644  # umask, not mkstemp's 0600
    ix.fsync_dir(tmp_path)
    ix.fsync_dir(tmp_path / "missing")  # nothing to do, no error


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.EIO, "Input/output error")])
def test_atomic_write_failure_keeps_old_file(tmp_path, exc):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"partial" * 1000)
        raise exc

    with pytest.raises(type(exc)) as e:
        ix.atomic_write(target, write)
    assert not isinstance(e.value, ix.NoSpaceError)
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == {"t.bin"}, "temp file left behind"


@pytest.mark.parametrize("err,why", [(errno.ENOSPC, "disk is full"), (errno.EDQUOT, "disk is full"),
                                     (errno.EFBIG, "file-size limit")])
def test_atomic_write_disk_full_without_size(tmp_path, err, why):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"x" * 1000)
        f.write(b"y" * 500)
        f.flush()
        raise OSError(err, os.strerror(err))

    with pytest.raises(ix.NoSpaceError) as e:
        ix.atomic_write(target, write)
    assert isinstance(e.value, OSError) and e.value.errno == err
    msg = str(e.value)
    assert str(target) in msg and why in msg and "at least 1500 bytes" in msg and "\n" not in msg
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == {"t.bin"}


def test_atomic_write_disk_full_at_fsync(tmp_path, monkeypatch):
    """ENOSPC reported late (delayed allocation, NFS) by fsync is the same error."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    target = tmp_path / "t.bin"
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ix.NoSpaceError, match=r"t\.bin: the disk is full \(at least 4096 bytes"):
        ix.atomic_write(target, lambda f: f.write(b"z" * 4096))
    assert _files(tmp_path) == set()


def test_save_disk_full_keeps_old_index(saved, monkeypatch):
    p, _, x = saved
    old = p.read_bytes(), Path(str(p) + ".json").read_bytes()

    def full_write(index, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error in faiss::FileIOWriter::operator() at impl/io.cpp:110: "
                           "Error: 'ret == nitems' failed: write error: No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_write)
    with pytest.raises(ix.NoSpaceError, match=r"a\.faiss: the disk is full") as e:
        VectorIndex.build(x[:100], IndexSpec()).save(p)
    assert e.value.errno == errno.ENOSPC
    assert (p.read_bytes(), Path(str(p) + ".json").read_bytes()) == old
    assert _files(p.parent) == {"a.faiss", "a.faiss.json"}
    monkeypatch.undo()
    VectorIndex.load(p, expect={"key": "abc", "ntotal": 500})
