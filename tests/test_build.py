"""Build, capture, statistics and store tests on tiny random models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import ARCHS, REPO_ROOT, TEXTS, assert_same_arrays, cfg_for, make_model, make_tokenizer, write_jsonl  # noqa: F401

from actcache.builder import BuildConfig, build
from actcache.capture import STATS, Capture, make_batch, sink_masks, span_stats
from actcache.data import DataSpec
from actcache.errors import ConfigError, CorruptStoreError, DatasetError, ModelError, StoreError
from actcache.models import ModelSpec
from actcache.store import FORMAT_VERSION, Store, list_builds

# ----------------------------------------------------------------------------- capture


def _captured_three(arch):
    """A tiny model of `arch` and a full capture (every layer and component) of three texts."""
    tok = make_tokenizer()
    model = make_model(arch, len(tok))
    seqs = [tok("Review: a great movie")["input_ids"], tok("dull")["input_ids"],
            tok("the quick brown fox jumps over the lazy dog")["input_ids"]]
    n = model.config.num_hidden_layers
    cap = Capture(model, list(range(n)), ["resid", "mlp", "attn"], ["mean", "last"])
    cap.run(make_batch(seqs, [(1, len(s)) for s in seqs], tok.pad_token_id))
    return tok, model, seqs, n, cap


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_equals_plain_forward(arch):
    """Hooked resid capture == model(..., output_hidden_states=True) where they overlap."""
    tok, model, seqs, n, cap = _captured_three(arch)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            hs = model(torch.tensor([s]), output_hidden_states=True).hidden_states
        # hidden_states[n] has the final norm applied in these models, so compare 0..n-2.
        for L in range(n - 1):
            ref = hs[L + 1][0, 1:len(s)]
            np.testing.assert_allclose(cap.pooled[("resid", L, "mean")][i], ref.mean(0).numpy(), atol=1e-4)
            np.testing.assert_allclose(cap.pooled[("resid", L, "last")][i], ref[-1].numpy(), atol=1e-4)
            # Every component is taken where it joins the residual stream, so the
            # block's delta is attn + mlp (Gemma's sandwich norms included).
            delta = (hs[L + 1] - hs[L])[0, 1:len(s)].mean(0).numpy()
            got = cap.pooled[("attn", L, "mean")][i] + cap.pooled[("mlp", L, "mean")][i]
            np.testing.assert_allclose(got, delta, atol=1e-4)
        # Statistics over the same span, against scipy on the plain forward's values.
        vals = hs[2][0, 1:len(s)].reshape(-1).double().numpy()
        st = cap.stats[("resid", 1)][i]
        np.testing.assert_allclose(st[STATS.index("mean")], vals.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(st[STATS.index("kurt")], scipy.stats.kurtosis(vals), rtol=1e-4, atol=1e-5)


def test_capture_stops_early_and_skips_lm_head():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    called = []
    model.model.layers[2].register_forward_hook(lambda *a: called.append("layer2"))
    model.lm_head.register_forward_hook(lambda *a: called.append("lm_head"))
    cap = Capture(model, [0, 1], ["resid"], ["mean"])
    cap.run(make_batch([tok("hello there")["input_ids"]], [(1, 3)], 0))
    assert called == []
    assert cap.pooled[("resid", 1, "mean")].shape == (1, 64)


def _reference_stats(v: np.ndarray) -> list[float]:
    """numpy/scipy float64 statistics of one span's values."""
    a = np.abs(v)
    return [v.mean(), v.var(), scipy.stats.skew(v), scipy.stats.kurtosis(v), a.max(), a.max() / np.median(a)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 7])
def test_span_stats_against_scipy(dtype, d):
    """Variable spans (odd and even value counts, split padding tokens), ties and
    a large offset, in every model dtype, against scipy on the same values."""
    rng = np.random.default_rng(d)
    B, T = 6, 9
    h = torch.tensor(rng.standard_t(4, size=(B, T, d)) * 3, dtype=torch.float32)
    h[1] += 200.0  # mean >> std: a one-pass float32 moment would lose every digit
    h[2] = torch.round(h[2])  # many ties, the median among them
    h[3, 2:5] = 0.0  # zeros inside the span
    h = h.to(dtype)
    start = torch.tensor([0, 2, 4, 1, 3, 8])
    end = torch.tensor([9, 5, 5, 8, 4, 9])
    got = span_stats(h, start, end)
    for i in range(B):
        v = h[i, int(start[i]):int(end[i])].reshape(-1).double().numpy()
        ref = _reference_stats(v)
        # Moments: float32 element work with float64 accumulation, ~1e-6 relative.
        np.testing.assert_allclose(got[i, :4], ref[:4], rtol=2e-5, atol=2e-6, err_msg=f"row {i}")
        # max |a| and the median are exact order statistics: bit-identical ratios.
        np.testing.assert_array_equal(got[i, 4:], ref[4:], err_msg=f"row {i}")


def test_span_stats_detects_a_wrong_median():
    """One changed value moves the median, and the ratio with it."""
    h = torch.arange(1.0, 7.0).reshape(1, 6, 1)
    span = torch.tensor([0]), torch.tensor([6])
    assert span_stats(h, *span)[0, STATS.index("max_over_median")] == 6.0 / 3.5
    h[0, 0, 0] = 5.0
    assert span_stats(h, *span)[0, STATS.index("max_over_median")] == 6.0 / 4.5


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_stats_of_every_component(arch):
    """Statistics of resid, mlp and attn at every layer equal scipy on the same
    module outputs of an independent plain forward, one example at a time."""
    tok, model, seqs, n, cap = _captured_three(arch)
    layers = model.model.layers
    for i, s in enumerate(seqs):
        seen = {}

        def keep(key):
            return lambda _m, _i, o: seen.__setitem__(key, o[0] if isinstance(o, tuple) else o)

        # Where each contribution joins the residual stream, stated here independently of HOOKS.
        mlp_at = (lambda b: b.post_feedforward_layernorm) if arch == "gemma3" else (lambda b: b.mlp)
        attn_at = (lambda b: b.post_attention_layernorm) if arch == "gemma3" else (lambda b: b.self_attn)
        handles = [m.register_forward_hook(keep((c, L))) for L in range(n)
                   for c, m in (("resid", layers[L]), ("mlp", mlp_at(layers[L])), ("attn", attn_at(layers[L])))]
        with torch.no_grad():
            model(torch.tensor([s]))
        for h in handles:
            h.remove()
        assert len(seen) == 3 * n
        for (c, L), out in seen.items():
            v = out[0, 1:len(s)].reshape(-1).double().numpy()
            np.testing.assert_allclose(cap.stats[(c, L)][i], _reference_stats(v), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{c} L{L} row {i}")


def test_capture_only_the_requested_units():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    cap = Capture(model, [0, 1], ["resid", "mlp"], ["mean"], units=[("resid", 0), ("mlp", 1)])
    cap.run(make_batch([tok("hello there")["input_ids"]], [(1, 3)], 0))
    assert set(cap.stats) == {("resid", 0), ("mlp", 1)}
    assert set(cap.pooled) == {("resid", 0, "mean"), ("mlp", 1, "mean")}
    with pytest.raises(ConfigError, match="outside"):
        Capture(model, [0], ["resid"], ["mean"], units=[("mlp", 0)])


def test_sink_mask_removes_attention_to_first_token():
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    model.config._attn_implementation = "eager"
    ids = torch.tensor([tok("a great movie with a fine cast")["input_ids"]])
    am = torch.ones_like(ids)
    with torch.no_grad():
        out = model(ids, attention_mask=sink_masks(model, am, torch.float32), output_attentions=True)
        plain = model(ids, attention_mask=am, output_attentions=True)
    att = out.attentions[0][0]  # (heads, T, T)
    assert torch.all(att[:, 1:, 0] == 0)
    assert torch.all(plain.attentions[0][0][:, 1:, 0] > 0)
    np.testing.assert_allclose(att.sum(-1).numpy(), 1.0, atol=1e-5)


def test_sink_mask_gemma_sliding_window_dict():
    tok = make_tokenizer()
    model = make_model("gemma3", len(tok))
    m = sink_masks(model, torch.ones((1, 40), dtype=torch.long), torch.float32)
    assert set(m) == {"full_attention", "sliding_attention"}
    sw = m["sliding_attention"][0, 0]
    assert sw[30, 10] < -1e30 and sw[30, 20] == 0 and sw[30, 0] < -1e30


# ----------------------------------------------------------------------------- build + store


@pytest.mark.parametrize("arch", ARCHS)
def test_build_each_architecture(arch, tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir[arch], jsonl, tmp_path / "store", layers="0,-1"))
    n_pool, n_eval = len(st.pool_rows), len(st.eval_rows)
    assert (n_pool, n_eval) == (9, 3)
    assert st.layers == [0, 3]
    x = st.acts("mlp", 3, "mean", "isolated", split="pool")
    assert x.shape == (9, 64) and x.dtype == np.float32 and np.isfinite(x).all()
    assert st.stats("resid", 0, "sink-masked").shape == (12, len(STATS))
    # in-context and isolated differ (a prefix changes the activations); label-masked
    # pools fewer tokens than isolated for pool rows with span=full.
    assert not np.allclose(st.acts("resid", 0, "mean", "in-context"), st.acts("resid", 0, "mean", "isolated"))
    assert not np.allclose(st.acts("resid", 3, "last", "label-masked", "pool"),
                           st.acts("resid", 3, "last", "isolated", "pool"))
    # eval rows carry no label, so their label-masked and isolated vectors agree.
    np.testing.assert_allclose(st.acts("resid", 3, "mean", "label-masked", "eval"),
                               st.acts("resid", 3, "mean", "isolated", "eval"), atol=2e-3)
    prov = st.provenance
    for k in ("weights_sha256", "tokenizer_sha256", "dtype", "revision"):
        assert k in prov["model"]
    assert prov["data"]["fingerprint"] and prov["versions"]["torch"] and prov["format_version"] == FORMAT_VERSION


def test_pooled_rows_match_independent_forward(tiny_model_dir, jsonl, tmp_path):
    """A stored row equals a plain forward of the demonstration's token ids."""
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", store_dtype="float32",
                       masks=("isolated",)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    row = int(st.pool_rows[0])
    q = tok(st.texts[row], add_special_tokens=False)["input_ids"]
    t = tok(" " + ("negative", "positive")[st.labels[row]], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tok.bos_token_id] + q + t])
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[2][0, 1:]
    np.testing.assert_allclose(st.acts("resid", 1, "mean", "isolated")[row], h.mean(0).numpy(), atol=1e-5)


def test_cache_hit_and_partial_reuse(tiny_model_dir, jsonl, tmp_path):
    home = tmp_path / "store"
    a = build(cfg_for(tiny_model_dir["qwen2"], jsonl, home, layers="0", masks=("isolated",),
                      components=("resid",)))
    assert a.report["forward_batches"] > 0 and not a.report["cache_hit"]
    b = build(cfg_for(tiny_model_dir["qwen2"], jsonl, home, layers="0", masks=("isolated",),
                      components=("resid",)))
    assert b.report["cache_hit"] and b.report["forward_batches"] == 0 and b.key == a.key
    c = build(cfg_for(tiny_model_dir["qwen2"], jsonl, home, layers="0,1", masks=("isolated",),
                      components=("resid", "mlp")))
    assert c.key == a.key
    assert sorted(c.report["reused"]) == ["resid/L0/last/isolated", "resid/L0/mean/isolated"]
    assert len(c.report["computed"]) == 6
    np.testing.assert_array_equal(c.acts("resid", 0), a.acts("resid", 0))
    # A config change that alters bytes gives another key.
    d = build(cfg_for(tiny_model_dir["qwen2"], jsonl, home, layers="0", masks=("isolated",),
                      components=("resid",), max_length=64))
    assert d.key != a.key
    assert {r["key"] for r in list_builds(home)} == {a.key, d.key}


def test_index_built_and_matches_numpy(tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="2", masks=("isolated",),
                       components=("mlp",), poolings=("mean",)))
    idx = st.index("mlp", 2, "mean", "isolated")
    pool = st.acts("mlp", 2, "mean", "isolated", "pool").astype(np.float64)
    q = st.acts("mlp", 2, "mean", "isolated", "eval").astype(np.float64)
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ pn.T), axis=1)[:, :3]
    _, ids = idx.search(q.astype(np.float32), 3)
    np.testing.assert_array_equal(ids, ref)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import cfg_for
    from actcache.builder import build
    n = 0
    def progress(desc, done, total):
        global n
        if desc.startswith("build") and done > 0:
            n += 1
            if n == {after}:
                os.kill(os.getpid(), signal.SIGKILL)
    build(cfg_for({model!r}, {data!r}, {home!r}, layers="all", store_dtype="float32"), progress=progress)
""")


def test_killed_build_resumes_to_identical_result(tiny_model_dir, jsonl, tmp_path):
    home = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(REPO_ROOT / "tests"), after=5, model=str(tiny_model_dir["gemma3"]),
                                data=str(jsonl), home=str(home))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (bdir,) = list((home / "builds").iterdir())
    assert not (bdir / "acts.h5").exists()
    with pytest.raises(StoreError, match="incomplete"):
        Store(bdir)
    assert [r["status"] for r in list_builds(home)] == ["incomplete"]
    flushed = len(list((bdir / "partial").rglob("*.npz")))
    assert flushed >= 4
    resumed = build(cfg_for(tiny_model_dir["gemma3"], jsonl, home, layers="all", store_dtype="float32"))
    total = sum(1 for _ in range(4)) * 4  # 4 masks x 4 batches of 3 rows
    assert resumed.report["forward_batches"] == total - flushed
    clean = build(cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "clean", layers="all",
                          store_dtype="float32"))
    assert clean.key == resumed.key
    assert_same_arrays(resumed, clean)


CONCURRENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import cfg_for
    from actcache.builder import build
    st = build(cfg_for({model!r}, {data!r}, {home!r}, layers="0,1"))
    print(st.key, st.report["forward_batches"])
""")


def test_two_processes_building_same_key(tiny_model_dir, jsonl, tmp_path):
    home = tmp_path / "shared-store"
    script = CONCURRENT.format(tests=str(REPO_ROOT / "tests"), model=str(tiny_model_dir["llama"]),
                               data=str(jsonl), home=str(home))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    keys = {o[0].split()[0] for o in outs}
    batches = sorted(int(o[0].split()[1]) for o in outs)
    assert len(keys) == 1
    assert batches[0] == 0 and batches[1] > 0  # one computed, the other reused
    st = Store.open(keys.pop(), home)
    assert np.isfinite(st.acts("resid", 1)).all()


def test_corrupt_and_foreign_files(tiny_model_dir, jsonl, tmp_path):
    import h5py

    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="0", masks=("isolated",)))
    st.h5_path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(CorruptStoreError, match="delete"):
        Store(st.dir)
    with h5py.File(st.h5_path, "w") as f:
        f.attrs["something"] = 1
    with pytest.raises(CorruptStoreError, match="not an actcache build"):
        Store(st.dir)
    with pytest.raises(StoreError, match="no build"):
        Store.open("0123456789abcdef", tmp_path / "s")


def test_missing_array_errors(tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="0", masks=("isolated",),
                       components=("resid",)))
    with pytest.raises(StoreError, match="no layer 3"):
        st.acts("resid", 3)
    with pytest.raises(StoreError, match="no component 'mlp'"):
        st.acts("mlp", 0)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(tiny_model_dir, jsonl, tmp_path):
    home = tmp_path / "s"
    with pytest.raises(ConfigError, match="out of range"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, home, layers="7"))
    with pytest.raises(ModelError, match="does not exist"):
        build(cfg_for(tmp_path / "no-such-model", jsonl, home))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DatasetError, match="no rows"):
        build(cfg_for(tiny_model_dir["llama"], empty, home))
    with pytest.raises(DatasetError, match="field 'review' not found"):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 0, "split": "eval", "id": "1"}])
        build(cfg_for(tiny_model_dir["llama"], bad, home))
    with pytest.raises(ConfigError, match="unknown component"):
        build(cfg_for(tiny_model_dir["llama"], jsonl, home, components=("mlpx",)))
    with pytest.raises(DatasetError, match="--data-dir"):
        from actcache.data import load

        load(DataSpec(task="sst2", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="unknown task"):
        from actcache.data import load

        load(DataSpec(task="nope"))


def test_cli_build_cache_hit_and_one_line_errors(tiny_model_dir, jsonl, tmp_path):
    args = [sys.executable, "-m", "actcache", "build", "--model", str(tiny_model_dir["gpt2"]), "--data", str(jsonl),
            "--text-field", "review", "--split-field", "split", "--id-field", "id",
            "--template", "Review: {review}\\nSentiment:", "--label-words", "negative,positive",
            "--layers", "0", "--masks", "isolated", "--store", str(tmp_path / "s")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert first.returncode == 0, first.stderr
    assert "computed" in first.stdout and "key" in first.stdout
    assert "(auto) on cpu-" in first.stdout  # the resolved dtype and the hardware class
    assert "build isolated: 0/" in first.stderr and "(100%)" in first.stderr  # plain progress, no TTY
    second = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert "cache hit: 0 forward passes" in second.stdout
    bad = subprocess.run(args[:-2] + ["--layers", "99", "--store", str(tmp_path / "s")], capture_output=True,
                         text=True, cwd=REPO_ROOT, env=env)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0
    assert "out of range" in bad.stderr
    ls = subprocess.run([sys.executable, "-m", "actcache", "ls", "--store", str(tmp_path / "s")],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert ls.returncode == 0 and "reviews" in ls.stdout


# ----------------------------------------------------------------------------- in-context label rotations


def test_rotated_in_context_build_is_the_mean_of_plain_forwards(tiny_model_dir, jsonl, tmp_path):
    """context_k=1 on a binary task: every in-context row (pooled vector, statistics,
    SAE codes) is the mean over two prefixes, one per label, each row computed here
    by a plain forward of token ids built with the tokenizer."""
    from conftest import write_sae

    from actcache.data import load as load_data
    from actcache.prompts import context_demos, context_for
    from actcache.sae import load_sae

    sae_dir = write_sae(tmp_path / "sae", hook="resid_post", layer=1)
    cfg = cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", components=("resid",),
                  masks=("in-context",), store_dtype="float32", context_k=1, context_seed=3, saes=(sae_dir,))
    st = build(cfg)
    ic = st.provenance["in_context"]
    assert ic["combine"] == "mean over label rotations" and len(ic["rotations"]) == 2
    ds = load_data(cfg.data)
    label = {e.id: e.label for e in ds.pool}
    assert sorted(label[r["demo_ids"][0]] for r in ic["rotations"]) == [0, 1]
    assert ic["demo_ids"] == ic["rotations"][0]["demo_ids"] and ic["prefix"] == ic["rotations"][0]["prefix"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    sae = load_sae(sae_dir)

    def plain(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    acts, stats = st.acts("resid", 1, "mean", "in-context"), st.stats("resid", 1, "in-context")
    last = st.acts("resid", 1, "last", "in-context")
    codes, codes_max = st.sae_codes(sae.key, "mean", "in-context"), st.sae_codes(sae.key, "max", "in-context")
    sae_stats = st.sae_stats(sae.key, "in-context")
    by_id = {e.id: e for e in list(ds.pool) + list(ds.eval)}
    checked_stand_in = 0
    for row, ex_id in enumerate(st.ids):
        ex = by_id[str(ex_id)]
        pool = st.splits[row] == "pool"
        per = []
        for r, rot in enumerate(ic["rotations"]):
            ctx = context_demos(ds, 1, 3 + r)
            assert [e.id for e in ctx] == rot["demo_ids"]
            own = context_for(ds, ctx, ex, 3 + r) if pool else ctx
            checked_stand_in += own is not ctx
            pre = [tok.bos_token_id] + [x for e in own for x in plain(ds.task.demo_text(e) + "\n\n")]
            body = plain(ds.task.query_text(ex)) + (plain(ds.task.target(ex)) if pool else [])
            with torch.no_grad():
                h = model(torch.tensor([pre + body]), output_hidden_states=True).hidden_states[2][0, len(pre):]
            h = h.double().numpy()
            f = sae.encode(h.astype(np.float32))
            per.append((h.mean(0), h[-1], h.mean(), h.var(), np.abs(h).max(), f.mean(0), f.max(0),
                        (f > 0).sum(1).mean()))
        want = [np.mean([p[j] for p in per], axis=0) for j in range(len(per[0]))]
        np.testing.assert_allclose(acts[row], want[0], atol=1e-5)
        np.testing.assert_allclose(last[row], want[1], atol=1e-5)
        got = stats[row]
        np.testing.assert_allclose(got[STATS.index("mean")], want[2], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got[STATS.index("var")], want[3], rtol=1e-4)
        np.testing.assert_allclose(got[STATS.index("max_abs")], want[4], rtol=1e-5)
        np.testing.assert_allclose(codes[row], want[5], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(codes_max[row], want[6], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(sae_stats[row, 0], want[7], rtol=1e-6)
        # and not one rotation alone: the two prefixes give different vectors
        assert not np.allclose(per[0][0], per[1][0], atol=1e-4)
    assert checked_stand_in == 2  # each rotation's demonstration row was encoded with its stand-in


def test_build_key_has_rotations_only_when_there_are_several(tiny_model_dir, jsonl, tmp_path):
    from actcache.builder import identify
    from actcache.store import canonical_key

    # Every field the key payload held before label rotations existed.
    before = {"model", "device_type", "data", "task", "span", "max_length", "batch_size", "store_dtype",
              "context_k", "context_seed"}
    for k in (0, 2, 3):  # the prefix holds both labels (or none): one rotation, key as before
        _, _, key, payload = identify(cfg_for(tiny_model_dir["qwen2"], jsonl, tmp_path / "s", context_k=k))
        assert set(payload) == before and key == canonical_key(payload)
    _, _, key, payload = identify(cfg_for(tiny_model_dir["qwen2"], jsonl, tmp_path / "s", context_k=1))
    assert payload["context_rotations"] == 2 and set(payload) == before | {"context_rotations"}
    assert key == canonical_key(payload) != canonical_key({k: v for k, v in payload.items() if k in before})


def test_interrupted_rotated_build_resumes_to_identical_result(tiny_model_dir, jsonl, tmp_path):
    """Batches are flushed per rotation; a build stopped in the second rotation
    runs only what it had not flushed and equals an uninterrupted one."""
    kw = dict(layers="0,1", components=("resid", "mlp"), masks=("in-context",), store_dtype="float32",
              context_k=1)
    home = tmp_path / "stopped"
    seen = []

    def stop(desc, done, total):
        if done > 0:
            seen.append(desc)
        if desc.endswith("(rotation 2/2)") and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(cfg_for(tiny_model_dir["gemma3"], jsonl, home, **kw), progress=stop)
    assert "build in-context (rotation 1/2)" in seen
    (bdir,) = list((home / "builds").iterdir())
    flushed = len(list((bdir / "partial").rglob("*.npz")))
    assert flushed == 4 + 2  # rotation 1's four batches, rotation 2's first two
    resumed = build(cfg_for(tiny_model_dir["gemma3"], jsonl, home, **kw))
    assert resumed.report["forward_batches"] == 2 * 4 - flushed
    clean = build(cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "clean", **kw))
    assert clean.key == resumed.key and clean.report["forward_batches"] == 2 * 4
    assert_same_arrays(resumed, clean)
