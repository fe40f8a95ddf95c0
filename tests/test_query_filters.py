"""Search options of `query`: label/id filters, min_score, offset paging, raw vector
queries and field selection, each against a brute-force numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_query import built  # noqa: F401  (the module's tiny float32 build)

from actcache.errors import ConfigError, DatasetError
from actcache.query import RECORD_FIELDS, QueryConfig, query, search_vectors, select_fields
from actcache.store import Store

ARRAY = ("mlp", 3, "mean", "label-masked")  # the default array of QueryConfig on this build


def _pool(st):
    return (st.acts(*ARRAY, split="pool").astype(np.float64), list(st.ids[st.pool_rows]),
            st.labels[st.pool_rows], list(st.texts[st.pool_rows]))


def _cos(P, Q):
    P = P / np.linalg.norm(P, axis=1, keepdims=True)
    Q = np.asarray(Q, np.float64)
    return (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ P.T


def _ref(s, allowed, k, offset=0, min_score=None):
    """Best-first pool positions of one query's scores `s` among `allowed`, ties to the lower position."""
    pos = np.flatnonzero(allowed)
    pos = pos[np.lexsort((pos, -s[pos]))][offset:offset + k]
    if min_score is not None:
        pos = pos[s[pos] >= min_score]
    return list(pos)


def _ref_balanced(s, allowed, labels, k, offset=0):
    per = [_ref(s, allowed & (labels == c), k, offset) for c in np.unique(labels[allowed])]
    merged = [p for ps in per for p in ps]
    order = np.argsort(-s[merged], kind="stable")
    return [merged[i] for i in order]


def _check(recs, S, want, pool_ids, offset=0, tie=1e-5):
    """The neighbours are the reference's, rank by rank, except that rows whose
    reference scores tie within `tie` (duplicate texts have equal vectors, whose
    float32 scores FAISS may order either way) may trade places."""
    for qi, r in enumerate(recs):
        got = r["neighbors"]
        pos = [pool_ids.index(n["id"]) for n in got]
        assert len(pos) == len(want[qi]) and len(set(pos)) == len(pos)
        np.testing.assert_allclose(S[qi][pos], S[qi][want[qi]], atol=tie)  # the same score at every rank
        np.testing.assert_allclose([n["score"] for n in got], S[qi][want[qi]], atol=tie)
        for p, w in zip(pos, want[qi]):
            assert p == w or abs(S[qi][p] - S[qi][w]) <= tie, (qi, pool_ids[p], pool_ids[w])
        assert [n["rank"] for n in got] == list(range(offset, offset + len(got)))


def _cfg(st, home, **kw):
    return QueryConfig(key=st.key, home=str(home), **{"exclude_self": False, **kw})


def test_label_filter_is_exact_not_a_filtered_top_k(built):
    st, home, _ = built
    P, pool_ids, labels, _ = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    for lab in (0, 1):
        k = int((labels == lab).sum())  # every allowed row: a filtered top-k would come up short
        recs = query(_cfg(st, home, k=k, labels=(lab,)))
        want = [_ref(s, labels == lab, k) for s in S]
        assert all(len(w) == k for w in want)
        _check(recs, S, want, pool_ids)
        assert all(n["label"] == lab for r in recs for n in r["neighbors"])
        assert recs[0]["config"]["labels"] == [lab]


def test_id_allowlist_and_exclusion(built):
    st, home, _ = built
    P, pool_ids, labels, _ = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    allow = tuple(pool_ids[i] for i in (1, 3, 4, 6, 7))
    recs = query(_cfg(st, home, k=3, ids=allow, exclude_ids=(allow[2],)))
    ok = np.isin(pool_ids, allow) & (np.asarray(pool_ids) != allow[2])
    _check(recs, S, [_ref(s, ok, 3) for s in S], pool_ids)
    # k above what the filter allows: every allowed row, best first
    recs = query(_cfg(st, home, k=5, ids=allow[:2]))
    _check(recs, S, [_ref(s, np.isin(pool_ids, allow[:2]), 5) for s in S], pool_ids)
    assert all(len(r["neighbors"]) == 2 for r in recs)
    ex = tuple(pool_ids[:4])
    recs = query(_cfg(st, home, k=4, exclude_ids=ex))
    _check(recs, S, [_ref(s, ~np.isin(pool_ids, ex), 4) for s in S], pool_ids)


def test_filters_with_self_exclusion(built):
    st, home, _ = built
    P, pool_ids, labels, pool_texts = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    recs = query(QueryConfig(key=st.key, home=str(home), k=3, labels=(1,), exclude_ids=(pool_ids[0],)))
    for qi, (tid, tt) in enumerate(zip(st.ids[st.eval_rows], st.texts[st.eval_rows])):
        ok = np.array([lab == 1 and pid != pool_ids[0] and pid != tid and pt != tt
                       for pid, pt, lab in zip(pool_ids, pool_texts, labels)])
        _check(recs[qi:qi + 1], S[qi:qi + 1], [_ref(S[qi], ok, 3)], pool_ids)


def test_balanced_combines_with_filters_and_offset(built):
    st, home, _ = built
    P, pool_ids, labels, _ = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    ex = tuple(pool_ids[i] for i in range(0, len(pool_ids), 3))
    ok = ~np.isin(pool_ids, ex)
    recs = query(_cfg(st, home, k=2, balanced=True, exclude_ids=ex))
    _check(recs, S, [_ref_balanced(s, ok, labels, 2) for s in S], pool_ids)
    recs = query(_cfg(st, home, k=2, balanced=True, exclude_ids=ex, offset=1))
    _check(recs, S, [_ref_balanced(s, ok, labels, 2, 1) for s in S], pool_ids, offset=1)
    recs = query(_cfg(st, home, k=2, balanced=True, labels=(0,)))
    _check(recs, S, [_ref(s, labels == 0, 2) for s in S], pool_ids)


def test_min_score_keeps_at_least_this_similar(built):
    st, home, _ = built
    P, pool_ids, _, _ = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    t = float(np.median(S))
    recs = query(_cfg(st, home, k=6, min_score=t))
    want = [_ref(s, np.ones(len(pool_ids), bool), 6, min_score=t) for s in S]
    assert any(0 < len(w) < 6 for w in want)
    _check(recs, S, want, pool_ids)
    assert all(n["score"] >= t for r in recs for n in r["neighbors"])
    assert recs[0]["config"]["min_score"] == t


def test_offset_pages_are_slices_of_a_larger_search(built):
    st, home, _ = built
    P, pool_ids, _, _ = _pool(st)
    S = _cos(P, st.acts(*ARRAY, split="eval"))
    n = len(pool_ids)
    full = query(_cfg(st, home, k=n))
    everything = np.ones(n, bool)
    for offset, k in ((0, 3), (2, 3), (n - 2, 3), (n, 2)):
        recs = query(_cfg(st, home, k=k, offset=offset))
        _check(recs, S, [_ref(s, everything, k, offset) for s in S], pool_ids, offset=offset)
        for r, f in zip(recs, full):
            assert r["neighbors"] == f["neighbors"][offset:offset + k]
    assert query(_cfg(st, home, k=2, offset=n))[0]["neighbors"] == []


def test_vector_queries_equal_numpy_and_id_queries(built):
    st, home, _ = built
    P, pool_ids, labels, _ = _pool(st)
    st = Store.open(st.key, str(home))
    E = st.acts(*ARRAY, split="eval")
    by_id = query(_cfg(st, home, k=4))
    recs = search_vectors(st, E, _cfg(st, home, k=4))
    assert [r["test_id"] for r in recs] == [f"vector-{i}" for i in range(len(E))]
    assert all(r["test_text"] is None and r["test_label"] is None for r in recs)
    assert [r["neighbors"] for r in recs] == [r["neighbors"] for r in by_id]
    # a vector has no id or text, so exclude_self has nothing to drop
    again = search_vectors(st, E, QueryConfig(key=st.key, home=str(home), k=4))
    assert [r["neighbors"] for r in again] == [r["neighbors"] for r in recs]
    rng = np.random.default_rng(0)
    V = rng.standard_normal((5, E.shape[1])) * 3
    S = _cos(P, V)
    recs = search_vectors(st, V, _cfg(st, home, k=3, labels=(1,), offset=1))
    _check(recs, S, [_ref(s, labels == 1, 3, 1) for s in S], pool_ids, offset=1)
    # the same normalisation as stored rows: a scaled vector has the same neighbours
    assert search_vectors(st, V * 7, _cfg(st, home, k=3))[0]["neighbors"][0]["id"] == \
        search_vectors(st, V, _cfg(st, home, k=3))[0]["neighbors"][0]["id"]


def test_vector_query_errors(built):
    st, home, _ = built
    st = Store.open(st.key, str(home))
    d = st.acts(*ARRAY, split="eval").shape[1]
    cfg = _cfg(st, home, k=2)
    with pytest.raises(DatasetError, match=f"d={d + 1}.*d={d}"):
        search_vectors(st, np.zeros((1, d + 1)), cfg)
    bad = np.ones((3, d))
    bad[1, 0] = np.nan
    with pytest.raises(DatasetError, match=r"row\(s\) \[1\].*finite"):
        search_vectors(st, bad, cfg)
    with pytest.raises(DatasetError, match="2-D"):
        search_vectors(st, np.ones(d), cfg)
    with pytest.raises(DatasetError, match="numbers"):
        search_vectors(st, np.array([["a"] * d]), cfg)


def test_option_errors_are_config_errors(built):
    st, home, _ = built
    pool_ids = list(st.ids[st.pool_rows])
    cases = [({"labels": (7,)}, "--label 7 is not a pool class.*\\[0, 1\\]"),
             ({"labels": ()}, "--label"),
             ({"ids": ("nope",)}, "--id 'nope' is not a pool example id"),
             ({"ids": (str(st.ids[st.eval_rows[0]]),)}, "eval rows are never returned"),
             ({"exclude_ids": ("nope",)}, "--exclude-id 'nope'"),
             ({"fields": ("test_id", "nope")}, "unknown record field 'nope'"),
             ({"offset": -1}, "--offset"),
             ({"min_score": float("nan")}, "--min-score"),
             ({"labels": (0,), "ids": (pool_ids[int(np.flatnonzero(st.labels[st.pool_rows] == 1)[0])],)},
              "leave no pool example")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            query(_cfg(st, home, k=1, **kw))


def test_field_selection_and_unchanged_default_records(built):
    st, home, _ = built
    recs = query(_cfg(st, home, k=2))
    assert list(recs[0]) == list(RECORD_FIELDS)
    assert sorted(recs[0]["config"]) == sorted(["key", "component", "layer", "pooling", "mask", "k", "balanced",
                                                "exclude_self", "source", "text_field", "out"])
    slim = select_fields(recs, ["neighbors", "test_id"])
    assert slim == [{"test_id": r["test_id"], "neighbors": r["neighbors"]} for r in recs]
    assert [dict(r) for r in query(_cfg(st, home, k=2, fields=("test_id", "neighbors")))] == slim
    with pytest.raises(ConfigError, match="unknown record field 'score'.*test_id"):
        select_fields(recs, ["score"])
    assert select_fields(recs, None) is recs


def test_cli_search_options(built, tmp_path):
    from typer.testing import CliRunner

    from actcache_cli.main import app

    st, home, _ = built
    base = ["query", st.key[:8], "--store", str(home), "--no-exclude-self", "--out", "-"]
    res = CliRunner().invoke(app, base + ["--k", "2", "--label", "1", "--offset", "1", "--min-score", "-1",
                                          "--fields", "test_id,neighbors"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    want = query(_cfg(st, home, k=2, labels=(1,), offset=1, min_score=-1.0, fields=("test_id", "neighbors")))
    assert lines == [dict(r) for r in want]
    res = CliRunner().invoke(app, base + ["--label", "5"])
    assert res.exit_code == 2 and "--label 5" in res.output
    res = CliRunner().invoke(app, base + ["--exclude-id", "x1", "--id", "x1"])
    assert res.exit_code == 2 and "leave no pool example" in res.output
    res = CliRunner().invoke(app, ["query", st.key[:8], "--store", str(home), "--strategy", "random", "--budget", "3",
                                   "--label", "1", "--out", str(tmp_path / "s.jsonl")])
    assert res.exit_code == 2 and "local neighbour query only" in res.output
