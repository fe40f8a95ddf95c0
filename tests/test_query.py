"""`actcache query`: exactness against numpy, self-exclusion, new texts, caching, errors, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from test_build import TEXTS, cfg_for, write_jsonl

from actcache.builder import build
from actcache.errors import ConfigError, DatasetError, MismatchError, StoreError
from actcache.query import QueryConfig, encode_texts, query, write_jsonl as write_records
from actcache.store import Store

# Pool and eval share texts under different ids, and the pool itself holds a duplicate.
DUPS = [("d1", 1), ("d2", 5), ("d3", 2)]  # eval id -> the pool row x<i> whose text it repeats


def _rows():
    rows = [{"id": f"x{i}", "review": t, "label": lab, "split": "eval" if i in (0, 4, 8) else "train"}
            for i, (t, lab) in enumerate(TEXTS)]
    rows.append({"id": "x2b", "review": TEXTS[2][0], "label": 0, "split": "train"})  # same text as x2
    rows += [{"id": d, "review": TEXTS[i][0], "label": TEXTS[i][1], "split": "eval"} for d, i in DUPS]
    return rows


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A float32 build of layers 0 and 3, resid + mlp, every mask, on the llama tiny model."""
    root = tmp_path_factory.mktemp("query")
    data = write_jsonl(root / "reviews.jsonl", _rows())
    home = root / "store"
    st = build(cfg_for(tiny_model_dir["llama"], data, home, layers="0,-1", store_dtype="float32",
                       components=("resid", "mlp")))
    return st, home, root


def _cos(P, Q):
    P = P.astype(np.float64) / np.linalg.norm(P, axis=1, keepdims=True)
    Q = Q.astype(np.float64) / np.linalg.norm(Q, axis=1, keepdims=True)
    return Q @ P.T


def _check_against(S, recs, k, pool_ids, allowed=None):
    """Every record's neighbours are a true top-k of S (ties in any order), best first."""
    for qi, r in enumerate(recs):
        s = S[qi].copy()
        if allowed is not None:
            s[~allowed[qi]] = -np.inf
        want = np.sort(s)[::-1][:k]
        got_ids = [n["id"] for n in r["neighbors"]]
        got = np.array([n["score"] for n in r["neighbors"]])
        assert len(got_ids) == k
        np.testing.assert_allclose(got, want, atol=1e-5)
        # each returned id really has the score reported
        np.testing.assert_allclose([s[pool_ids.index(i)] for i in got_ids], got, atol=1e-5)
        assert [n["rank"] for n in r["neighbors"]] == list(range(k))


@pytest.mark.parametrize("array", [("mlp", 3, "mean", "label-masked"), ("resid", 0, "last", "isolated")])
def test_exact_query_equals_numpy_bruteforce(built, array):
    st, home, _ = built
    c, L, p, m = array
    P = st.acts(c, L, p, m, split="pool")
    Q = st.acts(c, L, p, m, split="eval")
    S = _cos(P, Q)
    pool_ids = list(st.ids[st.pool_rows])
    recs = query(QueryConfig(key=st.key, home=str(home), component=c, layer=L, pooling=p, mask=m, k=5,
                             exclude_self=False))
    assert [r["test_id"] for r in recs] == list(st.ids[st.eval_rows])
    _check_against(S, recs, 5, pool_ids)
    # With exclusion: an independent per-pair loop decides what may be returned.
    pool_texts = list(st.texts[st.pool_rows])
    allowed = np.array([[not (pid == tid or pt == tt) for pid, pt in zip(pool_ids, pool_texts)]
                        for tid, tt in zip(st.ids[st.eval_rows], st.texts[st.eval_rows])])
    recs = query(QueryConfig(key=st.key, home=str(home), component=c, layer=L, pooling=p, mask=m, k=5))
    _check_against(S, recs, 5, pool_ids, allowed)


def test_duplicates_are_excluded_and_would_otherwise_win(built):
    st, home, _ = built
    base = dict(key=st.key, home=str(home), k=3, component="resid", layer=3, mask="label-masked")
    on = {r["test_id"]: r for r in query(QueryConfig(**base))}
    off = {r["test_id"]: r for r in query(QueryConfig(**base, exclude_self=False))}
    for d, i in DUPS:
        dup_ids = {"x2", "x2b"} if i == 2 else {f"x{i}"}
        # Without exclusion an identical text is its own nearest neighbour (cosine 1) ...
        assert off[d]["neighbors"][0]["id"] in dup_ids
        assert off[d]["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        # ... with it, no pool item of the same text ever comes back.
        assert not dup_ids & {n["id"] for n in on[d]["neighbors"]}
        assert all(n["text"] != on[d]["test_text"] for n in on[d]["neighbors"])


def test_new_texts_equal_to_pool_texts_never_return_themselves(built):
    st, home, root = built
    pool_raw = [st.records[r]["fields"]["review"] for r in st.pool_rows]
    src = root / "pool_texts.txt"
    src.write_text("\n".join(pool_raw) + "\n")
    k = len(st.pool_rows) - 2  # x2 and x2b share a text: both must go
    recs = query(QueryConfig(key=st.key, home=str(home), k=k, source=str(src)))
    assert len(recs) == len(pool_raw)
    for r in recs:
        assert r["test_label"] is None and r["test_id"].startswith("input-")
        assert all(n["text"] != r["test_text"] for n in r["neighbors"])
        assert len(r["neighbors"]) == k  # 10 pool items, at most 2 share the input's text
    # By id: a JSONL input naming a pool id never gets that pool item back, even with new text.
    src2 = write_jsonl(root / "by_id.jsonl", [{"id": "x3", "text": "something else entirely"},
                                               {"id": "q-new", "review": pool_raw[0]}])
    recs = query(QueryConfig(key=st.key, home=str(home), k=len(st.pool_rows) - 1, source=str(src2)))
    assert [r["test_id"] for r in recs] == ["x3", "q-new"]
    assert "x3" not in {n["id"] for n in recs[0]["neighbors"]}
    assert len(recs[0]["neighbors"]) == len(st.pool_rows) - 1
    assert str(st.ids[st.pool_rows[0]]) not in {n["id"] for n in recs[1]["neighbors"]}


def test_label_balanced_returns_k_per_class_exactly(built):
    st, home, _ = built
    k = 2
    recs = query(QueryConfig(key=st.key, home=str(home), k=k, balanced=True, exclude_self=False))
    P = st.acts("mlp", 3, "mean", "label-masked", split="pool")
    S = _cos(P, st.acts("mlp", 3, "mean", "label-masked", split="eval"))
    labels = st.labels[st.pool_rows]
    pool_ids = list(st.ids[st.pool_rows])
    for qi, r in enumerate(recs):
        got = r["neighbors"]
        assert len(got) == k * 2
        scores = [n["score"] for n in got]
        assert scores == sorted(scores, reverse=True)
        for c in (0, 1):
            mine = sorted((n["score"] for n in got if n["label"] == c), reverse=True)
            ref = np.sort(S[qi][labels == c])[::-1][:k]
            np.testing.assert_allclose(mine, ref, atol=1e-5)
            for n in got:
                assert labels[pool_ids.index(n["id"])] == n["label"]
    with pytest.raises(ConfigError, match="per class"):
        query(QueryConfig(key=st.key, home=str(home), k=99, balanced=True))


def test_records_are_plain_json_with_key_and_config(built, tmp_path):
    st, home, _ = built
    cfg = QueryConfig(key=st.key[:10], home=str(home), k=2, out=str(tmp_path / "n.jsonl"))
    recs = query(cfg)
    lines = (tmp_path / "n.jsonl").read_text().splitlines()
    assert len(lines) == len(st.eval_rows) == len(recs)
    for line, rec in zip(lines, recs):
        r = json.loads(line)
        assert r == rec
        assert set(r) == {"test_id", "test_text", "test_label", "neighbors", "metric", "array", "build_key",
                          "config", "k"}
        assert r["build_key"] == st.key and r["metric"] == "cosine" and r["k"] == 2
        assert r["array"] == "mlp/L3/mean/label-masked"
        assert r["config"] == cfg.to_json() and r["config"]["key"] == st.key[:10]
        assert "home" not in r["config"] and r["config"]["mask"] == "label-masked"
        assert set(r["neighbors"][0]) == {"id", "score", "text", "label", "rank"}
    write_records(recs, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "n.jsonl").read_text()


def test_repeated_new_text_query_runs_no_forward(built):
    st, home, root = built
    src = root / "new.txt"
    src.write_text("an entirely new review of a film\nslow and dull\n")
    cfg = QueryConfig(key=st.key, home=str(home), k=2, source=str(src), mask="sink-masked", component="resid",
                      layer=0)
    first = query(cfg)
    second = query(cfg)
    assert first.report["forward_batches"] > 0 and first.report["cache_hit"] is False
    assert second.report["forward_batches"] == 0 and second.report["cache_hit"] is True
    assert list(first) == list(second)
    assert len(list((st.dir / "queries").glob("*.npz"))) >= 1


@pytest.mark.parametrize("mask", ["isolated", "label-masked", "in-context", "sink-masked"])
def test_new_text_activations_equal_stored_rows(built, mask):
    st, _, _ = built
    texts = st.texts[st.eval_rows]
    for comp, L, pool in (("resid", 3, "mean"), ("mlp", 0, "last")):
        X, rep = encode_texts(st, texts, comp, L, pool, mask)
        np.testing.assert_allclose(X, st.acts(comp, L, pool, mask, split="eval"), atol=1e-5)


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_new_text_activations_equal_stored_rows_under_label_rotations(tiny_model_dir, tmp_path, store_dtype):
    """A one-shot build's in-context rows are the mean over one prefix per label; a
    text re-encoded through query is averaged over the same prefixes."""
    from actcache.prompts import stored_context_segments

    data = write_jsonl(tmp_path / "r.jsonl", _rows())
    st = build(cfg_for(tiny_model_dir["llama"], data, tmp_path / "s", layers="0,-1", components=("resid", "mlp"),
                       masks=("in-context",), context_k=1, store_dtype=store_dtype))
    rots = stored_context_segments(st, st.task())
    assert len(rots) == 2 and rots[0] != rots[1]
    texts = st.texts[st.eval_rows]
    tol = dict(atol=1e-5) if store_dtype == "float32" else dict(rtol=1e-3, atol=1e-3)
    for comp, L, pool in (("resid", 3, "mean"), ("mlp", 0, "last")):
        X, rep = encode_texts(st, texts, comp, L, pool, "in-context")
        assert rep["forward_batches"] == 2 * -(-len(texts) // 3)  # each rotation's batches
        np.testing.assert_allclose(X, st.acts(comp, L, pool, "in-context", split="eval"), **tol)
    # Under one rotation alone the query would not match the stored row.
    one = st.provenance["in_context"]
    one = {**one, "rotations": one["rotations"][:1]}
    st.provenance["in_context"] = one
    X1, _ = encode_texts(st, texts[:1], "resid", 3, "mean", "in-context")
    assert not np.allclose(X1, st.acts("resid", 3, "mean", "in-context", split="eval")[:1], atol=1e-3)


def test_in_context_prefix_survives_an_incremental_build(tiny_model_dir, tmp_path):
    """Adding arrays without the in-context mask keeps the recorded prefix (builder fix)."""
    data = write_jsonl(tmp_path / "r.jsonl", _rows())
    home = tmp_path / "s"
    cfg = dict(components=("resid",), poolings=("mean",), store_dtype="float32")
    build(cfg_for(tiny_model_dir["qwen2"], data, home, layers="0", masks=("in-context",), **cfg))
    st = build(cfg_for(tiny_model_dir["qwen2"], data, home, layers="1", masks=("isolated",), **cfg))
    assert st.provenance["in_context"]["demo_ids"]
    X, _ = encode_texts(st, st.texts[st.eval_rows], "resid", 0, "mean", "in-context")
    np.testing.assert_allclose(X, st.acts("resid", 0, "mean", "in-context", split="eval"), atol=1e-5)


def test_float16_store_new_text_within_tolerance(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", _rows())
    st = build(cfg_for(tiny_model_dir["gpt2"], data, tmp_path / "s", layers="1", masks=("label-masked",),
                       components=("mlp",), poolings=("mean",)))
    X, _ = encode_texts(st, st.texts[st.eval_rows], "mlp", 1, "mean", "label-masked")
    ref = st.acts("mlp", 1, "mean", "label-masked", split="eval")
    np.testing.assert_allclose(X, ref, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- errors


def test_errors(built, tmp_path):
    st, home, root = built
    with pytest.raises(StoreError, match="no build"):
        query(QueryConfig(key="0123456789abcdef", home=str(home)))
    with pytest.raises(StoreError, match="no layer 2"):
        query(QueryConfig(key=st.key, home=str(home), layer=2))
    with pytest.raises(StoreError, match="layer -3 does not exist"):
        query(QueryConfig(key=st.key, home=str(home), layer=-3))
    with pytest.raises(StoreError, match="no component 'attn'"):
        query(QueryConfig(key=st.key, home=str(home), component="attn"))
    n = len(st.pool_rows)
    with pytest.raises(ConfigError, match=rf"--k 50 is larger than the pool of {n} examples"):
        query(QueryConfig(key=st.key, home=str(home), k=50))
    empty = root / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no inputs"):
        query(QueryConfig(key=st.key, home=str(home), source=str(empty)))
    with pytest.raises(DatasetError, match="does not exist"):
        query(QueryConfig(key=st.key, home=str(home), source=str(root / "nope.txt")))
    bad = write_jsonl(root / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(DatasetError, match="--text-field"):
        query(QueryConfig(key=st.key, home=str(home), source=str(bad)))
    for value, kind in ((["a", "b"], "list"), ({"t": "a"}, "object")):  # was stringified to "['a', 'b']"
        bad = write_jsonl(root / "bad.jsonl", [{"text": "fine"}, {"text": value}])
        with pytest.raises(DatasetError, match=rf"bad.jsonl line 2 has an? {kind} 'text' field, not text"):
            query(QueryConfig(key=st.key, home=str(home), source=str(bad)))


def test_foreign_or_damaged_index_is_rebuilt_and_model_mismatch(built, tmp_path):
    import h5py

    from actcache_indexes import VectorIndex

    st, _, _ = built
    home = tmp_path / "copy"
    shutil.copytree(st.dir, home / "builds" / st.key)
    cp = Store.open(st.key, home)
    want = query(QueryConfig(key=st.key, home=str(home)))
    a = cp.index_path(next(x for x in cp.arrays if (x.component, x.layer, x.mask) == ("mlp", 3, "label-masked")
                           and x.pooling == "mean"))
    side = a.with_name(a.name + ".json")
    # A sidecar naming another build, another build's index (same shape) saved at
    # this path, and a truncated file: each is rebuilt from the array, not trusted.
    doc = json.loads(side.read_text())
    doc["meta"]["key"] = "f" * 64
    side.write_text(json.dumps(doc))
    assert query(QueryConfig(key=st.key, home=str(home))) == want
    other = VectorIndex.build(np.random.default_rng(0).standard_normal((len(cp.pool_rows), 64)).astype(np.float32),
                              meta={"key": "0" * 64})
    other.save(str(a))
    assert query(QueryConfig(key=st.key, home=str(home))) == want
    assert json.loads(side.read_text())["meta"]["key"] == st.key
    with open(a, "r+b") as f:
        f.truncate(a.stat().st_size // 2)
    assert query(QueryConfig(key=st.key, home=str(home))) == want
    # The model on disk is not the one the build used.
    with h5py.File(cp.h5_path, "r+") as f:
        prov = json.loads(f.attrs["provenance"])
        prov["model"]["weights_sha256"] = "0" * 64
        f.attrs["provenance"] = json.dumps(prov)
    with pytest.raises(MismatchError, match="weights_sha256"):
        encode_texts(Store.open(st.key, home), ["Review: new\nSentiment:"], "resid", 3, "mean", "isolated")


# ----------------------------------------------------------------------------- CLI


def test_cli_query_strategy_and_one_line_errors(built, tmp_path):
    from typer.testing import CliRunner

    from actcache_cli.main import app

    st, home, root = built
    runner = CliRunner()
    out = tmp_path / "n.jsonl"
    res = runner.invoke(app, ["query", st.key[:8], "--store", str(home), "--k", "2", "--layer", "-1",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"wrote {len(st.eval_rows)} records to {out}" in res.stdout and "0 forward batches" in res.stdout
    assert all(len(json.loads(x)["neighbors"]) == 2 for x in out.read_text().splitlines())
    res = runner.invoke(app, ["query", st.key[:8], "--store", str(home), "--input", "-", "--out", "-", "--k", "1"],
                        input="a brand new line of text\n")
    assert res.exit_code == 0, res.output
    (line,) = res.stdout.strip().splitlines()
    assert json.loads(line)["test_text"] == "Review: a brand new line of text\nSentiment:"
    sel = tmp_path / "s.jsonl"
    res = runner.invoke(app, ["query", st.key, "--store", str(home), "--strategy", "random", "--budget", "3",
                              "--seed", "7", "--out", str(sel)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in sel.read_text().splitlines()]
    assert len(lines) == 3 and len({x["id"] for x in lines}) == 3
    assert all(x["build_key"] == st.key and x["config"]["seed"] == 7 for x in lines)
    res = runner.invoke(app, ["query", "ffffffffffff", "--store", str(home)])
    assert res.exit_code == 5
    assert res.stderr.strip().count("\n") == 0 and "no build" in res.stderr
    res = runner.invoke(app, ["query", st.key, "--store", str(home), "--k", "99"])
    assert res.exit_code == 2 and "larger than the pool" in res.stderr
