"""The fault matrix: damaged files, foreign files, full disks, read-only stores,
locks and bad input. Each case ends in one clear error or a correct recovery
that is checked against an undamaged reference, never a traceback or silently
different numbers."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, assert_same_arrays, cfg_for, write_jsonl

from actcache.builder import build
from actcache.errors import ConfigError, CorruptStoreError, DatasetError, StoreError
from actcache.store import ArrayId, Store, file_lock, list_builds, verify

LAYERS = "1,2"


@pytest.fixture()
def built(tiny_model_dir, jsonl, tmp_path):
    return build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers=LAYERS,
                         masks=("isolated", "label-masked"), components=("mlp", "resid")))


@pytest.fixture()
def pristine(built, tmp_path):
    """A copy of the undamaged build, the reference every recovery is compared with."""
    ref = tmp_path / "ref" / "builds" / built.key
    shutil.copytree(built.dir, ref)
    return Store(ref)


def _read_everything(st: Store) -> dict:
    out = {}
    for a in st.arrays:
        out[a.name()] = st.acts(a.component, a.layer, a.pooling, a.mask)
        out[a.stats_name()] = st.stats(a.component, a.layer, a.mask)
    return out


def _array_offset(st: Store, a: ArrayId) -> int:
    with h5py.File(st.h5_path, "r") as f:
        ds = f[a.name()]
        off = ds.id.get_offset()
        return int(off if off is not None else ds.id.get_chunk_info(0).byte_offset)


# --------------------------------------------------------------------------- damaged arrays


def test_rows_overwritten_with_other_finite_values_are_detected(built):
    a = ArrayId("mlp", 2, "mean", "isolated")
    off = _array_offset(built, a)
    with open(built.h5_path, "r+b") as f:
        f.seek(off + 64)
        f.write(np.full(38 * 8, 0.5, dtype=np.float16).tobytes())  # finite, plausible values
    st = Store(built.dir)
    with pytest.raises(CorruptStoreError, match=r"mlp/L2/mean/isolated.*damaged.*actcache verify"):
        st.acts("mlp", 2, "mean", "isolated")
    rep = verify(built.dir)
    assert not rep.ok and [f.path for f in rep.findings if f.what == "array"] == [a.name()]


@pytest.mark.parametrize("where", [0.001, 0.02, 0.3, 0.7])
def test_random_bytes_anywhere_never_silent(built, pristine, where):
    size = built.h5_path.stat().st_size
    with open(built.h5_path, "r+b") as f:
        f.seek(int(size * where))
        f.write(np.random.default_rng(int(where * 1000)).bytes(512))
    try:
        got = _read_everything(Store(built.dir))
    except CorruptStoreError:
        return  # detected: one clear error
    want = _read_everything(pristine)
    for name in want:  # not detected only where the bytes did not matter
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_examples_damage_detected(built):
    import hashlib

    with h5py.File(built.h5_path, "r+") as f:
        f.attrs["examples_sha256"] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CorruptStoreError, match="examples"):
        Store(built.dir)
    assert [r["status"] for r in list_builds(built.home)] == ["corrupt"]


def test_foreign_acts_h5_rejected_and_rebuilt(tiny_model_dir, jsonl, built, pristine, tmp_path):
    other = build(cfg_for(tiny_model_dir["qwen2"], jsonl, tmp_path / "o", layers=LAYERS,
                          masks=("isolated", "label-masked"), components=("mlp", "resid")))
    shutil.copy(other.h5_path, built.h5_path)
    with pytest.raises(CorruptStoreError, match="copied from another build"):
        Store(built.dir)
    with pytest.warns(UserWarning, match="copied from another build"):
        again = build(cfg_for(tiny_model_dir["llama"], jsonl, built.home, layers=LAYERS,
                              masks=("isolated", "label-masked"), components=("mlp", "resid")))
    assert not again.report["cache_hit"] and again.key == built.key
    assert_same_arrays(again, pristine)


# --------------------------------------------------------------------------- indexes


def _exact(st: Store, a: ArrayId, k: int) -> np.ndarray:
    P = st.acts(a.component, a.layer, a.pooling, a.mask, "pool").astype(np.float64)
    Q = st.acts(a.component, a.layer, a.pooling, a.mask, "eval").astype(np.float64)
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    return np.argsort(-(Q @ P.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("damage", ["garble", "truncate", "other-array"])
def test_damaged_index_is_rebuilt_on_use_and_by_verify(built, damage):
    a = ArrayId("mlp", 2, "mean", "isolated")
    b = ArrayId("resid", 1, "mean", "isolated")
    built.index(a.component, a.layer, a.pooling, a.mask)
    built.index(b.component, b.layer, b.pooling, b.mask)
    p = built.index_path(a)
    data = bytearray(p.read_bytes())
    if damage == "garble":
        data[len(data) // 2: len(data) // 2 + 32] = bytes(32)
        p.write_bytes(bytes(data))
    elif damage == "truncate":
        p.write_bytes(bytes(data[: len(data) // 2]))
    else:  # an index and sidecar of another array, same key, count and dimension
        shutil.copy(built.index_path(b), p)
        shutil.copy(f"{built.index_path(b)}.json", f"{p}.json")
    assert not built.has_index(a)
    rep = verify(built.dir)
    assert not rep.ok and [f.what for f in rep.findings] == ["index"]
    assert verify(built.dir, repair=True).ok and verify(built.dir).ok
    idx = Store(built.dir).index(a.component, a.layer, a.pooling, a.mask)
    _, ids = idx.search(built.acts(a.component, a.layer, a.pooling, a.mask, "eval"), 3)
    np.testing.assert_array_equal(ids, _exact(built, a, 3))


def test_ls_is_not_done_while_promised_indexes_are_missing(tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers=LAYERS, masks=("isolated",),
                       components=("mlp",), index="flat"))
    assert [r["status"] for r in list_builds(st.home)] == ["done"]
    for a in st.arrays[:2]:  # a kill while indexes were being written
        st.index_path(a).unlink()
    assert [r["status"] for r in list_builds(st.home)] == ["done, 2 indexes to rebuild"]
    assert verify(st.dir, repair=True).ok
    assert [r["status"] for r in list_builds(st.home)] == ["done"]


# --------------------------------------------------------------------------- derived caches and leftovers


def test_damaged_query_cache_and_leftovers_repaired(built):
    from actcache.query import encode_texts

    a = ArrayId("mlp", 2, "mean", "isolated")
    first, rep1 = encode_texts(built, ["a new review"], a.component, a.layer, a.pooling, a.mask)
    cache = built.dir / rep1["cache"].split(built.dir.name + "/", 1)[1]
    cache.write_bytes(cache.read_bytes()[:40])
    tmp = built.dir / "indexes" / ".x.faiss.999999999.abc.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(b"partial")
    rep = verify(built.dir)
    assert sorted(f.what for f in rep.findings) == ["cache", "leftover"]
    assert verify(built.dir, repair=True).ok and not tmp.exists() and not cache.exists()
    again, rep2 = encode_texts(built, ["a new review"], a.component, a.layer, a.pooling, a.mask)
    assert not rep2["cache_hit"]
    np.testing.assert_array_equal(again, first)


# --------------------------------------------------------------------------- full disks, read-only stores, locks


def test_disk_full_while_writing_the_build(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    import actcache.store as store_mod

    real = store_mod._h5_dataset

    def full(f, name, data, **kw):
        if name.startswith("acts/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, name, data, **kw)

    monkeypatch.setattr(store_mod, "_h5_dataset", full)
    with pytest.raises(StoreError, match=r"cannot write .*acts\.h5: no space left.*MiB"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", masks=("isolated",)))
    (bdir,) = (tmp_path / "s" / "builds").iterdir()
    assert not list(bdir.glob("*.tmp")) and not (bdir / "acts.h5").exists()
    monkeypatch.undo()  # space again: the rerun resumes from the flushed shards, no forward pass
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", masks=("isolated",)))
    assert st.report["forward_batches"] == 0


def test_disk_full_while_flushing_a_shard(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    import actcache_indexes.io

    def full(path, write, nbytes=None):
        raise actcache_indexes.io.no_space_error(OSError(errno.ENOSPC, "full"), path, nbytes)

    for where in ("actcache.store", "actcache.files"):  # the build file; derived .npz files
        monkeypatch.setattr(f"{where}.atomic_write", full)
    with pytest.raises(StoreError, match=r"b00000\.npz: the disk is full"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", masks=("isolated",)))


def test_read_only_store_serves_and_computes_in_memory(built, monkeypatch):
    from actcache_indexes import VectorIndex

    from actcache.query import QueryConfig, query

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    for where in ("actcache.store", "actcache.files"):  # the build file; derived .npz files
        monkeypatch.setattr(f"{where}.atomic_write", ro)
    monkeypatch.setattr(VectorIndex, "save", ro)
    new = built.dir.parent.parent / "new.txt"
    new.write_text("a new review\n")
    for source in ("eval", str(new)):
        recs = query(QueryConfig(key=built.key, home=str(built.home), component="mlp", layer=2, mask="isolated",
                                 k=2, source=source))
        assert len(recs) >= 1 and all(len(r["neighbors"]) == 2 for r in recs)
    assert not list(built.dir.glob("indexes/*.faiss")) and not (built.dir / "queries").exists()


def test_lock_timeout_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTCACHE_LOCK_TIMEOUT", "0.2")
    with file_lock(tmp_path / "lock"):
        with pytest.raises(StoreError, match=r"locked for 0 s by pid \d+ on .*ACTCACHE_LOCK_TIMEOUT"):
            with file_lock(tmp_path / "lock"):
                pass


# --------------------------------------------------------------------------- bad input


BAD_ROWS = {
    "malformed": ('{"review": "ok", "label": 1}\n{"review": "broken", "label": \n', r"line 2 is not valid JSON"),
    "list": ('{"review": "ok", "label": 1}\n["a", 1]\n', r"line 2 is a JSON list, not an object"),
    "null": ('{"review": "ok", "label": 1}\n{"review": null, "label": 0}\n', r"row 2 has a null 'review'"),
    "missing": ('{"review": "ok", "label": 1}\n{"label": 0}\n', r"row 2 has no 'review' field"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_data_rows(tmp_path, case):
    from actcache.data import DataSpec, load

    text, msg = BAD_ROWS[case]
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DatasetError, match=msg):
        load(DataSpec(path=str(p), text_fields=("review",)))


def test_non_utf8_data(tmp_path):
    from actcache.data import DataSpec, load

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"review": "ok", "label": 1}\n{"review": "caf\xe9", "label": 0}\n')
    with pytest.raises(DatasetError, match=r"line 2 is not UTF-8 .*re-encode"):
        load(DataSpec(path=str(p), text_fields=("review",)))


@pytest.mark.parametrize("layers,msg", [("1:x", "bad layer slice"), ("::0", "non-zero step"), ("a", "bad layer")])
def test_bad_layers_fail_before_loading_anything(tiny_model_dir, jsonl, tmp_path, monkeypatch, layers, msg):
    monkeypatch.setattr("actcache.builder.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=msg):
        build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers=layers))


def test_bad_index_factory_fails_before_the_forward_pass(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    monkeypatch.setattr("actcache.builder.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=r"--index 'Nonsense'.*could not parse"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", index="Nonsense"))


def test_query_input_with_null_text(built):
    from actcache.query import QueryConfig, query

    p = write_jsonl(built.home / "in.jsonl", [{"text": None}])
    with pytest.raises(DatasetError, match=r"line 1: field 'text' is null"):
        query(QueryConfig(key=built.key, home=str(built.home), component="mlp", layer=2, mask="isolated",
                          source=str(p)))


def _cli(*args, env_home=None):
    return subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, cwd=REPO_ROOT)


@pytest.mark.parametrize("args,msg", [
    (["ls", "--store", "{file}"], "is a file, not a directory"),
    (["evaluate", "last", "--seeds", "a,b", "--store", "{dir}"], "comma-separated list of integers"),
    (["build", "--data", "{bad}", "--text-field", "review", "--store", "{dir}"], "line 2 is not valid JSON"),
    (["verify", "--store", "{dir}"], "no finished build in"),
    (["verify", "last", "--all", "--store", "{dir}"], "give a build key or --all"),
    (["verify", "--all", "--store", "{file}"], "is a file, not a directory"),
    (["verify", "--all", "--store", "{dir}"], "does not exist; point --store"),
    (["verify", "--all", "--store", "{empty}"], "holds no builds"),
    (["verify", "abcdef123", "--store", "{dir}"], "no build 'abcdef123'"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, msg):
    f = tmp_path / "f"
    f.write_text("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"review": "ok", "label": 1}\n{oops\n')
    (tmp_path / "empty").mkdir()
    args = [a.format(file=f, dir=tmp_path / "s", bad=bad, empty=tmp_path / "empty") for a in args]
    r = _cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and msg in " ".join(r.stderr.split()), r.stderr


def test_cli_verify_reports_and_repairs(built):
    built.index("mlp", 2, "mean", "isolated")
    p = built.index_path(ArrayId("mlp", 2, "mean", "isolated"))
    p.write_bytes(p.read_bytes()[:100])
    r = _cli("verify", built.key[:12], "--store", str(built.home))
    assert r.returncode == 1 and "index damaged" in r.stdout and "NOT ok" in r.stdout
    r = _cli("verify", "--all", "--repair", "--store", str(built.home))
    assert r.returncode == 0 and "repaired" in r.stdout, r.stdout + r.stderr
    assert json.loads(_cli("ls", "--json", "--store", str(built.home)).stdout)[0]["status"] == "done"


# --------------------------------------------------------------------------- later faults


def test_read_only_store_cache_hit_build(tiny_model_dir, jsonl, built, pristine, monkeypatch):
    """A cache-hit build of a read-only store opens it (no lock to take, nothing
    written); one that needs new arrays says the store is read-only."""
    import os
    from types import SimpleNamespace

    import filelock
    from actcache_indexes import VectorIndex

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.FileLock, "acquire", ro)
    for where in ("actcache.store", "actcache.files"):  # the build file; derived .npz files
        monkeypatch.setattr(f"{where}.atomic_write", ro)
    monkeypatch.setattr(VectorIndex, "save", ro)
    kw = dict(layers=LAYERS, masks=("isolated", "label-masked"), components=("mlp", "resid"))
    again = build(cfg_for(tiny_model_dir["llama"], jsonl, built.home, **kw))
    assert again.report["cache_hit"]
    assert_same_arrays(again, pristine)
    monkeypatch.setattr("actcache.builder.os", SimpleNamespace(access=lambda *a: False, W_OK=os.W_OK))
    with pytest.raises(StoreError, match=r"lacks 8 of the arrays asked for.*read-only"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, built.home, **{**kw, "layers": "1,2,3"}))


FSIZE_SCRIPT = r"""
import json, resource, signal, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from pathlib import Path
from conftest import cfg_for
from actcache.builder import build
from actcache.errors import StoreError

model, data, home = sys.argv[3:6]
st = build(cfg_for(model, Path(data), home, layers="1", masks=("isolated",)))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
limit = st.h5_path.stat().st_size + 2048
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    build(cfg_for(model, Path(data), home, layers="all", masks=("isolated",)))
    print(json.dumps({"error": None}))
except StoreError as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__}))
"""


def test_file_size_limit_while_writing_the_build(tiny_model_dir, jsonl, tmp_path):
    """A real EFBIG from HDF5's writes (RLIMIT_FSIZE) is one StoreError naming the
    file and the size; the temp file is gone and the old build still reads."""
    home = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(REPO_ROOT), str(REPO_ROOT / "tests"),
                        str(tiny_model_dir["llama"]), str(jsonl), str(home)],
                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] and re.search(r"cannot write .*acts\.h5: no space left \(or a file-size limit\).*MiB",
                                      out["error"]), out
    (bdir,) = (home / "builds").iterdir()
    assert not list(bdir.rglob("*.tmp"))
    st = Store(bdir)
    assert st.layers == [1]
    assert verify(bdir).findings == [] or all(f.what == "leftover" for f in verify(bdir).findings)


def test_finished_resume_data_is_cleaned_but_unfinished_kept(tiny_model_dir, jsonl, tmp_path, monkeypatch):
    """A kill between the rename of acts.h5 and the removal of partial/ leaves resume
    data of arrays the file holds: `ls` leaves it, `gc` deletes it; a pass for other
    arrays stays."""
    from actcache.admin import plan_gc, remove

    import actcache.builder as builder_mod

    real = builder_mod.shutil.rmtree
    monkeypatch.setattr(builder_mod.shutil, "rmtree", lambda *a, **k: None)
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", masks=("isolated",)))
    monkeypatch.setattr(builder_mod.shutil, "rmtree", real)
    (done,) = (st.dir / "partial").iterdir()
    assert list(done.glob("b*.npz"))
    other = st.dir / "partial" / "0123456789abcdef"
    other.mkdir()
    np.savez(other / "b00000.npz", rows=np.arange(3), **{"acts/isolated/attn/L03/mean": np.zeros((3, 64))})
    assert [f.path for f in verify(st.dir).findings] == [str(done)]
    assert [r["status"] for r in list_builds(st.home)] == ["done"]
    assert done.exists() and other.exists()  # listing only reads
    plan = plan_gc(st.home)
    assert [r.path for r in plan] == [done]
    remove(plan)
    assert not done.exists() and other.exists()
    assert verify(st.dir).ok


def test_verify_names_the_build_command_and_resolves_a_prefix(built):
    a = ArrayId("resid", 1, "mean", "label-masked")
    off = _array_offset(built, a)
    with open(built.h5_path, "r+b") as f:
        f.seek(off + 16)
        f.write(np.full(64, 0.25, dtype=np.float16).tobytes())
    (fd,) = verify(built.dir).findings
    assert fd.what == "array" and not fd.repairable
    assert re.search(r"actcache build --model \S+ --data \S+ --components mlp,resid --layers 1,2 "
                     r"--pooling last,mean --masks isolated,label-masked", fd.message), fd.message
    with h5py.File(built.h5_path, "r+") as f:
        f.attrs["examples_sha256"] = "0" * 64
    r = _cli("verify", built.key[:10], "--store", str(built.home))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "examples table" in r.stdout, r.stdout + r.stderr


def test_embeddings_cache_is_keyed(built, monkeypatch):
    """The embeddings file records its derive_key; another key (or a damaged file) is recomputed."""
    import actcache.select as select_mod
    from actcache.store import derive_key

    calls = []

    def fake(texts, progress=None):
        calls.append(len(texts))
        return np.random.default_rng(len(calls)).standard_normal((len(texts), 384)).astype(np.float32)

    monkeypatch.setattr(select_mod, "embed_texts", fake)
    E1 = select_mod.store_embeddings(built)
    np.testing.assert_array_equal(select_mod.store_embeddings(built), E1)
    assert calls == [len(built.ids)]
    (path,) = (built.dir / "embed").glob("*.npz")
    with np.load(path) as z:
        assert str(z["key"]) == derive_key(built.key, "embed", model=select_mod.EMBED_MODEL, texts="records")
    np.savez(path, E=E1, key=np.array("another build"))
    E2 = select_mod.store_embeddings(built)
    assert len(calls) == 2 and not np.array_equal(E2, E1)


# --------------------------------------------------------------------------- damaged SAE directories


def _sae_dir(d, **change):
    """A tiny ReLU SAE by hand in the SAELens layout; `change` replaces weights by name."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = {"W_enc": rng.normal(size=(8, 16)).astype(np.float32), "b_enc": rng.normal(size=16).astype(np.float32),
         "W_dec": rng.normal(size=(16, 8)).astype(np.float32), "b_dec": rng.normal(size=8).astype(np.float32)}
    d.mkdir()
    save_file({**w, **change}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8, "d_sae": 16,
                                            "hook_name": "blocks.1.hook_mlp_out"}))
    return d


def _garble_header(p):
    data = bytearray(p.read_bytes())
    data[8:24] = b"#" * 16  # the JSON header follows its 8-byte length
    p.write_bytes(bytes(data))


SAE_DAMAGE = {
    "cfg-not-json": (lambda d: (d / "cfg.json").write_text('{"architecture": "standard", "d_in": '),
                     r"cfg\.json is damaged .*copy or download"),
    "cfg-a-list": (lambda d: (d / "cfg.json").write_text("[1, 2]"), r"cfg\.json holds a JSON list, not an object"),
    "weights-truncated": (lambda d: (d / "sae_weights.safetensors").write_bytes(
        (d / "sae_weights.safetensors").read_bytes()[:300]), r"sae_weights\.safetensors is damaged.*copy or download"),
    "weights-header": (lambda d: _garble_header(d / "sae_weights.safetensors"),
                       r"sae_weights\.safetensors is damaged.*copy or download"),
    "weights-empty": (lambda d: (d / "sae_weights.safetensors").write_bytes(b""),
                      r"sae_weights\.safetensors is damaged"),
}


@pytest.mark.parametrize("case", sorted(SAE_DAMAGE))
def test_damaged_sae_directory_is_one_clear_error(tmp_path, case):
    from actcache.sae import load_sae

    d = _sae_dir(tmp_path / "sae")
    assert load_sae(d).d_sae == 16  # undamaged: loads
    damage, msg = SAE_DAMAGE[case]
    damage(d)
    with pytest.raises(ConfigError, match=msg):
        load_sae(d)


@pytest.mark.parametrize("name,value", [("W_enc", np.nan), ("b_enc", np.inf), ("W_dec", -np.inf), ("b_dec", np.nan)])
def test_sae_with_nan_or_inf_weights_is_refused(tmp_path, name, value):
    from actcache.sae import load_sae

    shapes = {"W_enc": (8, 16), "b_enc": (16,), "W_dec": (16, 8), "b_dec": (8,)}
    bad = np.zeros(shapes[name], np.float32)
    bad.flat[3] = value
    d = _sae_dir(tmp_path / "sae", **{name: bad})
    with pytest.raises(ConfigError, match=rf"the SAE's {name} holds 1 NaN or infinite values.*train or download"):
        load_sae(d)


def test_sae_with_a_nan_data_mean_is_refused(tmp_path):
    from actcache.sae import load_sae

    d = _sae_dir(tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "data_mean": [0.0] * 7 + [float("nan")]}))
    with pytest.raises(ConfigError, match=r"data_mean holds 1 NaN"):
        load_sae(d)


def test_cli_build_with_a_damaged_sae_is_one_clear_line(tmp_path):
    d = _sae_dir(tmp_path / "sae")
    (d / "cfg.json").write_text("{oops")
    bad = write_jsonl(tmp_path / "d.jsonl", [{"review": "ok", "label": 1}])
    r = _cli("build", "--data", str(bad), "--text-field", "review", "--sae", str(d), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cfg.json is damaged" in r.stderr, r.stderr


# --------------------------------------------------------------------------- quality matrices


def _qcfg(st):
    from actcache.config import EvalConfig

    return EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=4, n_probes=2)


def _same_matrix(got, want):
    for name in ("cand_rows", "probe_rows", "cand_half", "probe_half", "correct", "margin", "zs_correct",
                 "zs_margin"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.key == want.key


def test_read_only_store_computes_the_quality_matrix_in_memory(built, pristine, monkeypatch):
    """Nothing is written (no matrix, no partial chunks) and the numbers are those
    a writable store computes and keeps."""
    from actcache.quality import quality_matrix

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        for where in ("actcache.store", "actcache.files"):
            m.setattr(f"{where}.atomic_write", ro)
        got = quality_matrix(built, _qcfg(built))
    assert got.path == "" and not (built.dir / "quality").exists()
    want = quality_matrix(pristine, _qcfg(pristine))
    assert want.path and (pristine.dir / "quality").exists()
    assert np.isfinite(want.margin).sum() > 0
    _same_matrix(got, want)


def test_verify_finds_a_quality_matrix_of_another_build(tiny_model_dir, jsonl, built, tmp_path):
    from actcache.errors import MismatchError
    from actcache.quality import quality_matrix

    other = build(cfg_for(tiny_model_dir["qwen2"], jsonl, tmp_path / "o", layers="1", masks=("isolated",),
                          components=("mlp",)))
    mine = quality_matrix(built, _qcfg(built))
    theirs = quality_matrix(other, _qcfg(other))
    assert verify(built.dir).ok
    shutil.copy(theirs.path, mine.path)  # copied over this build's matrix
    with pytest.raises(MismatchError, match="computed for build"):
        quality_matrix(built, _qcfg(built))
    (fd,) = verify(built.dir).findings
    assert fd.what == "cache" and fd.path == mine.path and fd.repairable
    assert re.search(rf"quality/\S+\.npz was computed for build {other.key[:12]}, not {built.key[:12]}.*"
                     r"verify --repair", fd.message), fd.message
    r = _cli("verify", built.key[:12], "--store", str(built.home))
    assert r.returncode == 1 and "cache damaged" in r.stdout and "computed for build" in r.stdout, r.stdout
    assert verify(built.dir, repair=True).ok and verify(built.dir).ok
    _same_matrix(quality_matrix(built, _qcfg(built)), mine)  # recomputed: the build's own numbers


def test_verify_finds_a_quality_matrix_under_another_name(built):
    """A matrix of this build moved to a name its parameters do not give."""
    from actcache.quality import quality_matrix

    q = quality_matrix(built, _qcfg(built))
    moved = built.dir / "quality" / ("0" * 32 + ".npz")
    shutil.copy(q.path, moved)
    (fd,) = verify(built.dir).findings
    assert fd.path == str(moved) and "not the one its name says" in fd.message


def test_the_rebuild_command_verify_prints_makes_the_build_again(built, pristine):
    """Following a damaged array's finding literally (delete the build, run the
    printed command) makes the same build: same key, same arrays, verify passes."""
    import shlex

    a = ArrayId("mlp", 1, "last", "isolated")
    off = _array_offset(built, a)
    with open(built.h5_path, "r+b") as f:
        f.seek(off + 16)
        f.write(np.full(64, 0.25, dtype=np.float16).tobytes())
    r = _cli("verify", built.key[:12], "--store", str(built.home))
    assert r.returncode == 1, r.stdout + r.stderr
    m = re.search(r"delete (\S+) and run `([^`]+)` again", r.stdout)
    assert m and m.group(1) == str(built.dir), r.stdout
    shutil.rmtree(m.group(1))
    argv = shlex.split(m.group(2))
    assert argv[:2] == ["actcache", "build"]
    rb = _cli(*argv[1:])
    assert rb.returncode == 0, rb.stdout + rb.stderr
    assert f"key  {built.key}" in rb.stdout
    r = _cli("verify", built.key[:12], "--store", str(built.home))
    assert r.returncode == 0 and " ok:" in r.stdout, r.stdout + r.stderr
    assert_same_arrays(Store(built.dir), pristine)
