"""Every bad input ends in one specific error that says what to fix, raised
before any forward pass (and, where no model is needed to judge it, before the
model loads); through the CLI it is one stderr line and a nonzero exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, TEXTS, cfg_for, write_jsonl, write_reviews

from actcache import builder
from actcache.builder import build
from actcache.capture import resolve_layers
from actcache.data import DataSpec, load, read_jsonl_rows
from actcache.errors import ConfigError, DatasetError, StoreError
from actcache.query import QueryConfig, query
from actcache.select import select
from actcache.pipeline import EvalConfig
from actcache.store import Store, check_home, index_spec

GOOD = {"review": "a fine film", "label": 1}


def _spec(path, **kw) -> DataSpec:
    return DataSpec(path=str(path), text_fields=("review",), label_words=(" negative", " positive"), **kw)


def _lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if a build gets as far as loading the model."""
    def boom(*a, **kw):
        raise AssertionError("the model was loaded: the input should have been refused before")

    monkeypatch.setattr(builder, "load_model", boom)


@pytest.fixture()
def no_forward(monkeypatch):
    """Fail the test if a build runs a forward pass."""
    def boom(*a, **kw):
        raise AssertionError("a forward pass ran: the input should have been refused before")

    monkeypatch.setattr(builder, "_run_pass", boom)


# ----------------------------------------------------------------------------- data files

BAD_FILES = {
    # name: (lines, words the message must hold)
    "malformed": ([json.dumps(GOOD), '{"review": "bad", "label": '], ["line 2", "not valid JSON"]),
    "missing_label": ([json.dumps(GOOD), json.dumps(GOOD), '{"review": "no label"}'],
                      ["line 3", "'label'", "['review']"]),
    "missing_text": ([json.dumps(GOOD), '{"label": 0, "other": "x"}'], ["line 2", "'review'", "['label', 'other']"]),
    "json_list": ([json.dumps(GOOD), '["a fine film", 1]'], ["line 2", "JSON list", "not an object"]),
    "json_string": (['"just a string"'], ["line 1", "JSON string", "not an object"]),
    "null_text": ([json.dumps(GOOD), '{"review": null, "label": 0}'], ["line 2", "'review'", "null"]),
    "null_label": ([json.dumps(GOOD), '{"review": "x", "label": null}'], ["line 2", "'label'", "null"]),
    "list_text": ([json.dumps(GOOD), '{"review": ["x"], "label": 0}'], ["line 2", "'review'", "list"]),
    "empty": ([], ["empty"]),
    "blank_lines_only": (["", "   "], ["empty"]),
    "negative_label": ([json.dumps(GOOD), '{"review": "x", "label": -1}'], ["negative integer label -1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_jsonl_rows_name_line_and_field(tmp_path, case):
    lines, words = BAD_FILES[case]
    path = _lines(tmp_path / "d.jsonl", *lines)
    with pytest.raises(DatasetError) as e:
        load(_spec(path))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert str(path) in str(e.value)


def test_non_utf8_names_offset_line_and_re_encoding(tmp_path):
    first = json.dumps(GOOD).encode()
    path = _lines(tmp_path / "latin1.jsonl", first, '{"review": "café", "label": 0}'.encode("latin-1"))
    offset = len(first) + 1 + len(b'{"review": "caf')  # independent: where the 0xe9 byte sits
    with pytest.raises(DatasetError) as e:
        load(_spec(path))
    msg = str(e.value)
    assert f"byte 0xe9 at byte offset {offset}" in msg and "line 2 is not UTF-8" in msg
    assert "UTF-8" in msg and "iconv" in msg


def test_null_text_is_not_the_string_none(tmp_path):
    """Before: a null text became the example text 'None'."""
    path = _lines(tmp_path / "d.jsonl", json.dumps(GOOD), json.dumps({"review": None, "label": 0}))
    with pytest.raises(DatasetError, match="line 2"):
        load(_spec(path))


def test_utf8_bom_and_good_rows_still_load(tmp_path):
    rows = [{"review": t, "label": lab} for t, lab in TEXTS]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n\n" for r in rows).encode())
    ds = load(_spec(path))
    got = sorted((e.get("review"), e.label) for e in ds.pool + ds.eval)
    assert got == sorted(TEXTS)
    assert [ln for ln, _ in read_jsonl_rows(path)] == list(range(1, 2 * len(rows), 2))


def test_csv_short_row_and_non_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("review,label\na fine film,1\njust text\n")
    with pytest.raises(DatasetError) as e:
        load(_spec(path))
    assert "line 3" in str(e.value) and "'label'" in str(e.value)
    path.write_bytes("review,label\na fine film,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"line 3 is not UTF-8 \(byte 0xe9"):
        load(_spec(path))


def test_data_spec_options(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": t, "label": lab} for t, lab in TEXTS])
    for kw, words in (({"pool_limit": -1}, "--limit -1"), ({"pool_limit": 0}, "--limit 0"),
                      ({"eval_limit": -2}, "--eval-limit -2"), ({"template": "Review: {"}, "not a valid format"),
                      ({"template": "Review: {}"}, "unnamed"), ({"template": "{nope}"}, "'nope'")):
        with pytest.raises((ConfigError, DatasetError)) as e:
            load(_spec(path, **kw))
        assert words in str(e.value), (kw, str(e.value))
    with pytest.raises(DatasetError, match="is a directory"):
        load(_spec(tmp_path))
    assert len(load(_spec(path, pool_limit=3)).pool) == 3  # a good limit still works


# ----------------------------------------------------------------------------- options

LAYER_CASES = ["all", "0", "-1", "0,2", "1:3", "::2", "::-1", " 1 , 3 ", "2:", "-2:"]


@pytest.mark.parametrize("spec", LAYER_CASES)
def test_good_layers_match_python_slicing(spec):
    n = 5
    ref = set()  # independent reference: Python's own indexing and slicing of a list
    for part in (range(n) if spec == "all" else spec.split(",")):
        if isinstance(part, int):
            ref.add(part)
        elif ":" in part:
            ref.update(list(range(n))[slice(*[int(b) if b.strip() else None for b in part.split(":")])])
        else:
            ref.add(list(range(n))[int(part)])
    assert resolve_layers(spec, n) == tuple(sorted(ref))


@pytest.mark.parametrize("spec,words", [
    ("1:x", "bad layer slice '1:x'"), ("::0", "non-zero step"), ("a", "bad layer 'a'"), ("1,,2", "bad layer ''"),
    ("1:2:3:4", "bad layer slice"), ("", "bad layer ''"),
])
def test_bad_layer_syntax(spec, words):
    with pytest.raises(ConfigError) as e:
        resolve_layers(spec, 1 << 20)  # as BuildConfig.validate checks it, before the model is known
    assert words in str(e.value)


def test_layer_range_and_empty_selection():
    with pytest.raises(ConfigError, match=r"layer 99 is out of range: the model has 4 layers"):
        resolve_layers("99", 4)
    with pytest.raises(ConfigError, match=r"layer -5 is out of range"):
        resolve_layers((0, -5), 4)
    with pytest.raises(ConfigError, match="selects no layer"):
        resolve_layers("3:1", 4)


def test_eval_config_sizes():
    for kw, words in (({"n_eval": -1}, "--n-eval -1"), ({"n_boot": -1}, "--n-boot -1"),
                      ({"batch_size": 0}, "--batch-size 0"), ({"seeds": ()}, "--seeds"), ({"k": -1}, "--k")):
        with pytest.raises(ConfigError) as e:
            EvalConfig(**kw).validate()
        assert words in str(e.value)
    EvalConfig().validate()


@pytest.mark.parametrize("factory,words", [
    ("IVF0,Flat", "0 lists"), ("Nonsense", "could not parse"), ("HNSW0", "degree below 2"),
    ("HNSW1", "degree below 2"), ("IVF16_HNSW0,Flat", "degree below 2"), ("LSH", "could not parse"),
])
def test_bad_index_factory(factory, words):
    with pytest.raises(ConfigError) as e:
        index_spec(factory)
    assert words in str(e.value) and "--index" in str(e.value)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32", "PQ48", "OPQ16_64,IVF64,PQ16", "HNSW2"])
def test_good_index_factory(factory):
    spec = index_spec(factory)
    assert spec.kind == "factory" and spec.factory == factory
    assert index_spec("HNSW").kind == "factory" and index_spec("hnsw").kind == "hnsw"
    assert index_spec(None).kind == "flat"


# ----------------------------------------------------------------------------- store root


def test_store_root_that_is_a_file(tmp_path):
    f = tmp_path / "regular"
    f.write_text("x")
    for home in (f, f / "sub"):
        with pytest.raises(StoreError) as e:
            check_home(home, writable=True)
        assert "is a file, not a directory" in str(e.value) and str(f) in str(e.value)
        assert "--store" in str(e.value) and "ACTCACHE_HOME" in str(e.value)
        with pytest.raises(StoreError, match="is a file"):
            Store.open("abcdef", home)
    new = tmp_path / "new"
    assert check_home(new) == new and not new.exists()  # reading needs no folder
    assert check_home(new, writable=True) == new and (new / "builds").is_dir()


def _unwritable_dir() -> Path | None:
    """/sys refuses new entries even to root, where chmod does not."""
    d = Path("/sys")
    try:
        (d / "builds").mkdir()
    except OSError:
        return d
    (d / "builds").rmdir()  # pragma: no cover
    return None


@pytest.mark.skipif(_unwritable_dir() is None, reason="no unwritable directory on this machine")
def test_unwritable_store_root():
    with pytest.raises(StoreError) as e:
        check_home(_unwritable_dir(), writable=True)
    assert "/sys is not writable" in str(e.value) and "--store" in str(e.value)


# ----------------------------------------------------------------------------- builds refuse early


@pytest.mark.parametrize("kw,exc,words", [
    ({"layers": "1:x"}, ConfigError, "'1:x'"),
    ({"layers": "::0"}, ConfigError, "non-zero step"),
    ({"index": "IVF0,Flat"}, ConfigError, "0 lists"),
    ({"index": "Nonsense"}, ConfigError, "could not parse"),
    ({"context_k": -1}, ConfigError, "--context-k"),
])
def test_build_refuses_before_loading_the_model(tiny_model_dir, jsonl, tmp_path, no_model, kw, exc, words):
    with pytest.raises(exc) as e:
        build(cfg_for(tiny_model_dir["gpt2"], jsonl, tmp_path / "s", **kw))
    assert words in str(e.value)


def test_build_refuses_bad_data_and_store_before_the_model(tiny_model_dir, jsonl, tmp_path, no_model):
    bad = _lines(tmp_path / "bad.jsonl", json.dumps({"id": "a", "review": "x", "label": 1, "split": "train"}),
                 '{"id": "b", "review": null, "label": 0, "split": "eval"}')
    with pytest.raises(DatasetError, match=r"line 2, row 2 has a null 'review' field"):
        build(cfg_for(tiny_model_dir["gpt2"], bad, tmp_path / "s"))
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(StoreError, match="is a file"):
        build(cfg_for(tiny_model_dir["gpt2"], jsonl, f))


@pytest.mark.parametrize("factory,need", [("IVF64,Flat", 64), ("PQ8", 256), ("IVF4,PQ4x4", 16)])
def test_index_too_big_for_the_pool_refused_before_any_forward_pass(tiny_model_dir, jsonl, tmp_path, no_forward,
                                                                    factory, need):
    with pytest.raises(ConfigError, match=rf"needs at least {need} pool examples to train, but the pool has 9"):
        build(cfg_for(tiny_model_dir["gpt2"], jsonl, tmp_path / "s", index=factory))
    # the reference: FAISS itself refuses to train it on that few vectors
    import faiss

    index = faiss.index_factory(64, factory, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(RuntimeError):
        index.train(np.random.default_rng(0).normal(size=(9, 64)).astype(np.float32))


def test_layer_out_of_range_refused_before_any_forward_pass(tiny_model_dir, jsonl, tmp_path, no_forward):
    with pytest.raises(ConfigError, match="layer 99 is out of range: the model has 4 layers"):
        build(cfg_for(tiny_model_dir["gpt2"], jsonl, tmp_path / "s", layers="0,99"))


def test_index_hnsw_over_a_flat_build_rebuilds_the_indexes(tiny_model_dir, jsonl, tmp_path):
    kw = dict(layers="0,1", masks=("isolated",), components=("mlp",), poolings=("mean",), store_dtype="float32")
    flat = build(cfg_for(tiny_model_dir["gpt2"], jsonl, tmp_path / "s", index="flat", **kw))
    assert flat.report["indexes_built"] == 2
    hnsw = build(cfg_for(tiny_model_dir["gpt2"], jsonl, tmp_path / "s", index="hnsw", **kw))
    assert hnsw.report["forward_batches"] == 0 and hnsw.report["indexes_built"] == 2
    for a in hnsw.arrays:
        idx = Store.open(hnsw.key, tmp_path / "s").index(a.component, a.layer, a.pooling, a.mask)
        assert idx.spec.kind == "hnsw"
        P = hnsw.acts(a.component, a.layer, a.pooling, a.mask, split="pool").astype(np.float64)
        Q = hnsw.acts(a.component, a.layer, a.pooling, a.mask, split="eval").astype(np.float64)
        S = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ (P / np.linalg.norm(P, axis=1, keepdims=True)).T
        scores, _ = idx.search(Q.astype(np.float32), 3)
        np.testing.assert_allclose(scores, np.sort(S, axis=1)[:, ::-1][:, :3], atol=1e-5)  # tiny pool: exact


# ----------------------------------------------------------------------------- query inputs and k


@pytest.fixture(scope="module")
def small_build(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput")
    data = write_reviews(root)
    st = build(cfg_for(tiny_model_dir["gpt2"], data, root / "s", layers="0", masks=("isolated",),
                       components=("mlp",), poolings=("mean",)))
    return st, root


def _q(st, root, **kw):
    return QueryConfig(key=st.key, home=str(root / "s"), component="mlp", layer=0, pooling="mean",
                       mask="isolated", **kw)


@pytest.mark.parametrize("case", ["malformed", "json_list", "null_text", "empty"])
def test_query_input_file_errors(small_build, case, tmp_path):
    st, root = small_build
    lines, words = BAD_FILES[case]
    path = _lines(tmp_path / "in.jsonl", *lines)
    with pytest.raises(DatasetError) as e:
        query(_q(st, root, source=str(path), text_field="review"))
    if case == "empty":
        assert "no inputs" in str(e.value)
    else:
        assert "line 2" in str(e.value) and str(path) in str(e.value)


def test_query_input_non_utf8(small_build, tmp_path):
    st, root = small_build
    path = _lines(tmp_path / "in.txt", b"fine", "caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"line 2 is not UTF-8 \(byte 0xe9 at byte offset 8\)"):
        query(_q(st, root, source=str(path)))


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one(small_build, k):
    st, root = small_build
    with pytest.raises(ConfigError, match=f"--k {k}|got {k}"):
        query(_q(st, root, k=k))
    with pytest.raises(ConfigError, match=f"--k {k} must be at least 1"):
        select(st, "knn", k=k, layer=0, component="mlp", mask="isolated")


# ----------------------------------------------------------------------------- the CLI: one line, no traceback


def _cli(*args, cwd=REPO_ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def _one_line_error(proc, *words):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)


def test_cli_one_line_errors(small_build, tiny_model_dir, tmp_path):
    st, root = small_build
    model = str(tiny_model_dir["gpt2"])
    base = ["build", "--model", model, "--text-field", "review", "--label-words", "negative,positive",
            "--masks", "isolated", "--layers", "0", "--store", str(tmp_path / "s")]
    bad = _lines(tmp_path / "bad.jsonl", json.dumps(GOOD), '{"review": "x", "label": ')
    _one_line_error(_cli(*base, "--data", str(bad)), "line 2", "not valid JSON")
    good = write_jsonl(tmp_path / "good.jsonl", [{"review": t, "label": lab} for t, lab in TEXTS])
    _one_line_error(_cli(*base, "--data", str(good), "--layers", "1:x"), "'1:x'")
    _one_line_error(_cli(*base, "--data", str(good), "--index", "IVF0,Flat"), "0 lists")
    f = tmp_path / "regular"
    f.write_text("x")
    _one_line_error(_cli(*base[:-1], str(f), "--data", str(good)), "is a file", "--store")
    q = ["query", st.key[:12], "--store", str(root / "s"), "--layer", "0", "--mask", "isolated", "--out", "-"]
    _one_line_error(_cli(*q, "--k", "0"), "--k")
    nul = _lines(tmp_path / "in.jsonl", '{"text": "fine"}', '{"text": null}')
    _one_line_error(_cli(*q, "--input", str(nul)), "line 2", "null")
    _one_line_error(_cli("evaluate", st.key[:12], "--store", str(root / "s"), "--seeds", "a,b"), "--seeds 'a,b' is not a comma-separated list")


def test_vector_index_refuses_factories_that_crash_faiss():
    """FAISS aborts or segfaults the process on these once vectors are added;
    the indexes layer must refuse them first (a regression kills pytest)."""
    from actcache_indexes import IndexSpec, VectorIndex

    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    for factory, words in (("HNSW0", "degree below 2"), ("HNSW1", "degree below 2"),
                           ("IVF0,Flat", "0 lists"), ("IVF4_HNSW1,Flat", "degree below 2")):
        with pytest.raises(ValueError, match=words):
            VectorIndex.build(x, IndexSpec(kind="factory", factory=factory))
    with pytest.raises(ValueError, match="hnsw_m must be >= 2"):
        IndexSpec(kind="hnsw", hnsw_m=1)
    ok = VectorIndex.build(x, IndexSpec(kind="factory", factory="HNSW2"))
    assert ok.ntotal == 50
