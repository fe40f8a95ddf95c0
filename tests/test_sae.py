"""SAE loading and encoding against hand-written numpy references; Gemma Scope
hook points against plain forward hooks; sparse storage round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokenizer

from actcache.errors import ConfigError
from actcache.sae import HOOK_POINTS, SAE, from_csr, hook_module, load_sae, pooled_codes, save_sae, to_csr


def _hand_layout(d, kind, d_in=8, d_sae=32, k=None, seed=0, lower=False, b_dec_in=False):
    """Write an SAE directory by hand (as SAELens / Gemma Scope do), return its weights."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    w = {"W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
         "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
         "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
         "b_dec": rng.normal(size=d_in).astype(np.float32)}
    if kind == "jumprelu":
        w["threshold"] = np.abs(rng.normal(size=d_sae)).astype(np.float32)
    names = {n: n.lower() if lower else n for n in w}
    save_file({names[n]: v for n, v in w.items()}, str(d / ("params.safetensors" if lower else "sae_weights.safetensors")))
    cfg = {"architecture": {"relu": "standard"}.get(kind, kind), "d_in": d_in, "d_sae": d_sae,
           "hook_name": "blocks.1.hook_mlp_out", "apply_b_dec_to_input": b_dec_in}
    if k:
        cfg["k"] = k
    (d / "cfg.json").write_text(json.dumps(cfg))
    return w


def _reference(w, kind, x, k=None, b_dec_in=False):
    x = x.astype(np.float64)
    pre = (x - w["b_dec"] if b_dec_in else x) @ w["W_enc"] + w["b_enc"]
    out = np.zeros_like(pre)
    for i in range(len(pre)):
        for j in range(pre.shape[1]):
            v = pre[i, j]
            if kind == "relu":
                out[i, j] = max(v, 0.0)
            elif kind == "jumprelu":
                out[i, j] = v if v > w["threshold"][j] else 0.0
            else:
                out[i, j] = max(v, 0.0)
        if kind == "topk":
            keep = sorted(range(len(out[i])), key=lambda j: -out[i, j])[:k]
            out[i, [j for j in range(len(out[i])) if j not in keep]] = 0.0
    return out


@pytest.mark.parametrize("kind,k,lower,b_dec_in", [("relu", None, False, True), ("jumprelu", None, True, False),
                                                   ("topk", 4, False, False)])
def test_load_and_encode_equal_reference(tmp_path, kind, k, lower, b_dec_in):
    w = _hand_layout(tmp_path, kind, k=k, lower=lower, b_dec_in=b_dec_in)
    sae = load_sae(tmp_path)
    assert (sae.kind, sae.hook, sae.layer, sae.k) == (kind, "mlp_out", 1, k)
    x = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    f = sae.encode(x)
    np.testing.assert_allclose(f, _reference(w, kind, x, k, b_dec_in), rtol=1e-5, atol=1e-5)
    if kind == "topk":
        assert ((f > 0).sum(1) <= k).all()
    np.testing.assert_allclose(sae.decode(f), f.astype(np.float64) @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)
    again = load_sae(save_sae(sae, tmp_path / "copy"))
    np.testing.assert_array_equal(again.encode(x), f)


def test_key_changes_with_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _hand_layout(tmp_path / "a", "relu")
    _hand_layout(tmp_path / "b", "relu", seed=1)
    assert load_sae(tmp_path / "a").key != load_sae(tmp_path / "b").key
    assert load_sae(tmp_path / "a").key == load_sae(tmp_path / "a").key


def test_bad_directories(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sae(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no SAE weights"):
        load_sae(tmp_path)


def test_sparse_storage_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 50)).astype(np.float32)
    x[rng.random(x.shape) < 0.9] = 0
    s = to_csr(x)
    assert s["data"].size == (x != 0).sum()
    np.testing.assert_array_equal(from_csr(s), x)


@pytest.mark.parametrize("point", HOOK_POINTS)
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_hook_points_equal_the_modules_they_name(point, arch):
    tok = make_tokenizer()
    model = make_model(arch, len(tok)).eval()
    layer = model.model.layers[1]
    ids = torch.tensor([tok("a small test of hooks")["input_ids"]])
    seen = {}
    mod, where = hook_module(layer, point)
    if where == "input":
        hd = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    else:
        hd = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach().clone()))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hd.remove()
    # Independent references: the residual stream, the block's delta, and o_proj's input by hand.
    if point == "resid_post":
        torch.testing.assert_close(seen["x"], out.hidden_states[2])
    elif point == "mlp_out":
        ref = {}
        names = ("post_feedforward_layernorm",) if arch == "gemma3" else ("mlp",)
        h = getattr(layer, names[0]).register_forward_hook(lambda m, a, o: ref.__setitem__("x", o.detach().clone()))
        with torch.no_grad():
            model(ids)
        h.remove()
        torch.testing.assert_close(seen["x"], ref["x"])
    else:
        o_proj = layer.self_attn.o_proj
        ref = {}
        h = o_proj.register_forward_hook(lambda m, a, o: ref.__setitem__("y", o.detach().clone()))
        with torch.no_grad():
            model(ids)
        h.remove()
        torch.testing.assert_close(seen["x"] @ o_proj.weight.T + (o_proj.bias if o_proj.bias is not None else 0),
                                   ref["y"], rtol=1e-4, atol=1e-5)


def test_pooled_codes_by_hand(tmp_path):
    _hand_layout(tmp_path, "relu")
    sae = load_sae(tmp_path)
    h = np.random.default_rng(2).normal(size=(2, 6, 8)).astype(np.float32)
    spans = [(1, 4), (0, 6)]
    out = pooled_codes(sae, h, spans)
    for i, (s, e) in enumerate(spans):
        f = sae.encode(h[i, s:e])
        np.testing.assert_allclose(out["mean"][i], f.mean(0), rtol=1e-6)
        np.testing.assert_allclose(out["max"][i], f.max(0), rtol=1e-6)
        assert out["l0"][i] == pytest.approx((f > 0).sum(1).mean())
        r = h[i, s:e] - sae.decode(f)
        assert out["fvu"][i] == pytest.approx((r ** 2).sum() / ((h[i, s:e] - h[i, s:e].mean(0)) ** 2).sum(), rel=1e-4)
        assert out["explained"][i] == pytest.approx(1 - (r ** 2).sum() / (h[i, s:e] ** 2).sum(), rel=1e-4)
    assert isinstance(sae, SAE)


def test_train_lowers_error_below_the_mean_and_is_reproducible(tiny_model_dir, tmp_path):
    pytest.importorskip("sparsify")
    from conftest import TEXTS

    from actcache.sae import SAETrainConfig, evaluate_sae, train_sae

    f = tmp_path / "texts.txt"
    f.write_text("".join(f"{t} number {i}\n" for i in range(4) for t, _ in TEXTS))
    cfg = SAETrainConfig(model=str(tiny_model_dir["llama"]), dtype="float32", text_file=str(f), layer=1,
                         width=64, k=4, epochs=40, batch_tokens=64, lr=3e-3, home=str(tmp_path / "h"))
    sae, rep = train_sae(cfg)
    # A mean predictor has FVU 1 by definition: the SAE must beat it, on held-out text too.
    assert rep["train"]["fvu"] < 0.6 and rep["heldout"]["fvu"] < 0.9, rep
    assert rep["heldout"]["l0"] <= 4
    again, rep2 = train_sae(cfg)
    assert rep2["key"] == rep["key"]
    np.testing.assert_array_equal(again.W_enc, sae.W_enc)
    loaded = load_sae(rep["path"])
    assert loaded.kind == "topk" and loaded.k == 4 and loaded.apply_b_dec_to_input
    x = np.random.default_rng(0).normal(size=(5, sae.d_in)).astype(np.float32)
    np.testing.assert_array_equal(loaded.encode(x), sae.encode(x))
    assert evaluate_sae(loaded, x)["l0"] <= 4


def test_build_with_sae_adds_only_its_pass_and_equals_a_plain_forward(tiny_model_dir, jsonl, tmp_path):
    from conftest import assert_same_arrays, cfg_for

    from actcache.builder import build
    from actcache.capture import decoder_layers
    from actcache.prompts import plan_rows
    from actcache.store import Store

    kw = dict(layers="1,2", masks=("isolated", "label-masked"), components=("mlp",))
    dense = build(cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "s", **kw))
    ref = tmp_path / "ref"
    import shutil

    shutil.copytree(dense.dir, ref / "builds" / dense.key)
    d = tmp_path / "sae"
    d.mkdir()
    _hand_layout(d, "relu", d_in=64, d_sae=48)
    sae = load_sae(d)
    st = build(cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "s", saes=(str(d),), **kw))
    n_batches = -(-len(st.ids) // 3)
    assert st.report["forward_batches"] == 2 * n_batches  # one SAE pass per mask, no dense pass
    assert st.report["computed"] == [f"sae/{sae.key[:16]}/isolated", f"sae/{sae.key[:16]}/label-masked"]
    assert_same_arrays(st, Store(ref / "builds" / dense.key))
    assert build(cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "s", saes=(str(d),), **kw)).report["cache_hit"]
    # Independent reference: a plain forward, the module's output read by a plain hook, numpy SAE.
    from actcache.data import load
    from actcache.models import ModelSpec, load_model

    cfg = cfg_for(tiny_model_dir["gemma3"], jsonl, tmp_path / "s", **kw)
    lm = load_model(ModelSpec(str(tiny_model_dir["gemma3"]), dtype="float32"), tmp_path / "s")
    plan = plan_rows(load(cfg.data), lm.tokenizer, cfg)
    mod = decoder_layers(lm.model)[1][1].post_feedforward_layernorm
    got = st.sae_codes(sae.key, "mean", "isolated")
    got_max = st.sae_codes(sae.key[:8], "max", "isolated")
    for r in (0, 5):
        seen = {}
        h = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0].detach().float().numpy()))
        with torch.no_grad():
            lm.model(torch.tensor([plan.seqs["isolated"][r]]))
        h.remove()
        s, e = plan.spans["isolated"][r]
        f = sae.encode(seen["x"][s:e])
        np.testing.assert_allclose(got[r], f.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_max[r], f.max(0), rtol=1e-4, atol=1e-5)
    stats = st.sae_stats(sae.key, "label-masked")
    assert stats.shape == (len(st.ids), 3) and (stats[:, 0] >= 0).all()
