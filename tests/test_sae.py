"""SAE loading and encoding against hand-written numpy references; Gemma Scope
hook points against plain forward hooks; sparse storage round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokenizer

from actcache.errors import ConfigError
from actcache.capture import hook_module
from actcache.sae import HOOK_POINTS, SAE, from_csr, load_sae, pooled_codes, save_sae, to_csr


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
    # Metadata that does not change the codes does not change the key; the layer does.
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({**cfg, "trainer": "someone else", "epochs": 3}))
    assert load_sae(tmp_path / "a").key == load_sae(tmp_path / "a", layer=1).key != load_sae(tmp_path / "a", layer=5).key


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
    mu = np.concatenate([h[i, s:e] for i, (s, e) in enumerate(spans)]).mean(0)  # every span token
    for i, (s, e) in enumerate(spans):
        f = sae.encode(h[i, s:e])
        np.testing.assert_allclose(out["mean"][i], f.mean(0), rtol=1e-6)
        np.testing.assert_allclose(out["max"][i], f.max(0), rtol=1e-6)
        assert out["l0"][i] == pytest.approx((f > 0).sum(1).mean())
        r = h[i, s:e] - sae.decode(f)
        assert out["fvu"][i] == pytest.approx((r ** 2).sum() / ((h[i, s:e] - mu) ** 2).sum(), rel=1e-4)
        assert out["explained"][i] == pytest.approx(1 - (r ** 2).sum() / (h[i, s:e] ** 2).sum(), rel=1e-4)
    assert out["fvu_reference"] == "pass mean"
    assert isinstance(sae, SAE)


def _fvu_reference(sae, h, spans, mu):
    """Per-example FVU by the SAE libraries' convention, in float64 numpy: the span's
    squared error over its squared distance to one dataset mean mu."""
    out = []
    for i, (s, e) in enumerate(spans):
        x = h[i, s:e].astype(np.float64)
        x_hat = sae.decode(sae.encode(h[i, s:e])).astype(np.float64)
        out.append(((x - x_hat) ** 2).sum() / ((x - mu) ** 2).sum())
    return np.array(out)


def test_per_example_fvu_uses_one_dataset_mean_not_each_span_mean(tmp_path):
    """Spans sitting at different offsets (as examples do) and a one-token span: the
    span-mean ratio differs from the convention (and is undefined for one token)."""
    _hand_layout(tmp_path, "relu")
    sae = load_sae(tmp_path)
    rng = np.random.default_rng(3)
    h = rng.normal(size=(3, 7, 8)).astype(np.float32) * 0.3
    h += np.array([-2.0, 0.5, 3.0], np.float32)[:, None, None] * rng.normal(size=8).astype(np.float32)
    spans = [(0, 7), (2, 5), (4, 5)]
    out = pooled_codes(sae, h, spans)
    mu = np.concatenate([h[i, s:e] for i, (s, e) in enumerate(spans)]).astype(np.float64).mean(0)
    want = _fvu_reference(sae, h, spans, mu)
    np.testing.assert_allclose(out["fvu"], want, rtol=1e-6)
    span_mean = [((h[i, s:e] - h[i, s:e].mean(0)) ** 2).sum() for i, (s, e) in enumerate(spans)]
    assert span_mean[2] == 0 and np.isfinite(out["fvu"]).all()
    own = np.array([_fvu_reference(sae, h[i:i + 1], [spans[i]], h[i, s:e].mean(0))[0] for i, (s, e) in
                    enumerate(spans[:2])])
    assert (np.abs(own - out["fvu"][:2]) > 0.05 * out["fvu"][:2]).all()  # the conventions differ here
    # Summed over examples it is the libraries' batch FVU of all the tokens (evaluate_sae, sparsify's formula).
    from actcache.sae import evaluate_sae

    x = np.concatenate([h[i, s:e] for i, (s, e) in enumerate(spans)])
    err = (want * [((h[i, s:e] - mu) ** 2).sum() for i, (s, e) in enumerate(spans)]).sum()
    assert err / ((x - mu) ** 2).sum() == pytest.approx(evaluate_sae(sae, x)["fvu"], rel=1e-5)
    # A given reference, and the SAE's own training mean (kept through save/load), take mu's place.
    ref = rng.normal(size=8)
    np.testing.assert_allclose(pooled_codes(sae, h, spans, reference=ref)["fvu"],
                               _fvu_reference(sae, h, spans, ref), rtol=1e-6)
    from dataclasses import replace

    trained = load_sae(save_sae(replace(sae, data_mean=ref.astype(np.float32)), tmp_path / "with_mean"))
    assert trained.key == sae.key  # a statistic, not the codes
    got = pooled_codes(trained, h, spans)
    assert got["fvu_reference"] == "sae training mean"
    np.testing.assert_allclose(got["fvu"], _fvu_reference(sae, h, spans, ref.astype(np.float32)), rtol=1e-6)


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
    # One key: the directory's name, cfg.json's "key" and the key a build records when it loads the SAE.
    assert loaded.key == rep["key"] == json.loads((Path(rep["path"]) / "cfg.json").read_text())["key"]
    assert Path(rep["path"]).name == rep["key"][:16]
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
    xs = []
    for r in range(len(st.ids)):
        seen = {}
        h = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0].detach().float().numpy()))
        with torch.no_grad():
            lm.model(torch.tensor([plan.seqs["isolated"][r]]))
        h.remove()
        s, e = plan.spans["isolated"][r]
        xs.append(seen["x"][s:e])
        if r in (0, 5):
            f = sae.encode(xs[-1])
            np.testing.assert_allclose(got[r], f.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got_max[r], f.max(0), rtol=1e-4, atol=1e-5)
    stats = st.sae_stats(sae.key, "label-masked")
    assert stats.shape == (len(st.ids), 3) and (stats[:, 0] >= 0).all()
    # FVU per example around the mean of every span token of the pass, though the pass ran in batches.
    mu = np.concatenate(xs).astype(np.float64).mean(0)
    want = [((x - sae.decode(sae.encode(x))) ** 2).sum() / ((x - mu) ** 2).sum() for x in xs]
    np.testing.assert_allclose(st.sae_stats(sae.key, "isolated")[:, 1], want, rtol=1e-3)
    assert st.provenance["saes"][sae.key[:16]]["fvu_reference"] == "pass mean"
    assert st.provenance["saes"][sae.key[:16]]["training"] is None


# --------------------------------------------------------------------------- other libraries' layouts


def test_jumprelu_matches_saelens_with_negative_thresholds(tmp_path):
    """SAELens's JumpReLUSAE.encode is relu(pre) * (pre > threshold): a negative
    threshold never passes a negative value (reference written from its source)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    w = {"W_enc": rng.normal(size=(8, 16)).astype(np.float32), "b_enc": rng.normal(size=16).astype(np.float32),
         "W_dec": rng.normal(size=(16, 8)).astype(np.float32), "b_dec": rng.normal(size=8).astype(np.float32),
         "threshold": -np.abs(rng.normal(size=16)).astype(np.float32)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 8, "d_sae": 16,
                                                   "apply_b_dec_to_input": False,
                                                   "metadata": {"hook_name": "blocks.2.hook_resid_post"}}))
    sae = load_sae(tmp_path)
    assert (sae.hook, sae.layer) == ("resid_post", 2)  # SAELens 6 keeps hook_name under metadata
    x = rng.normal(size=(30, 8)).astype(np.float32)
    pre = x.astype(np.float64) @ w["W_enc"] + w["b_enc"]
    ref = np.where((pre > w["threshold"]) & (pre > 0), pre, 0.0)
    assert ((pre < 0) & (pre > w["threshold"])).any()  # the case the two formulas disagree on occurs
    np.testing.assert_allclose(sae.encode(x), ref, rtol=1e-5, atol=1e-5)


def test_topk_rescaled_by_decoder_norm_matches_reference(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(4)
    w = {"W_enc": rng.normal(size=(8, 24)).astype(np.float32), "b_enc": rng.normal(size=24).astype(np.float32),
         "W_dec": (rng.normal(size=(24, 8)) * rng.uniform(0.1, 3, size=(24, 1))).astype(np.float32),
         "b_dec": rng.normal(size=8).astype(np.float32)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 5, "d_in": 8, "d_sae": 24,
                                                   "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True,
                                                   "hook_name": "blocks.0.hook_mlp_out"}))
    sae = load_sae(tmp_path)
    x = rng.normal(size=(12, 8))
    norm = np.linalg.norm(w["W_dec"].astype(np.float64), axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norm
    ref = np.zeros_like(pre)
    for i, row in enumerate(pre):
        top = np.argsort(-row)[:5]
        ref[i, top] = np.maximum(row[top], 0)
    f = sae.encode(x.astype(np.float32))
    np.testing.assert_allclose(f, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae.decode(f), (ref / norm) @ w["W_dec"] + w["b_dec"], rtol=1e-3, atol=1e-3)
    again = load_sae(save_sae(sae, tmp_path / "copy"))
    assert again.rescale_acts_by_decoder_norm
    np.testing.assert_array_equal(again.encode(x.astype(np.float32)), f)


def test_an_sae_saved_by_sparsify_encodes_as_sparsify_does(tmp_path):
    pytest.importorskip("sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(8, SparseCoderConfig(num_latents=40, k=6))
    with torch.no_grad():
        coder.encoder.bias.normal_()
        coder.b_dec.normal_()
    d = tmp_path / "layers.3.post_feedforward_layernorm"  # sparsify names folders by hookpoint
    coder.save_to_disk(d)
    sae = load_sae(d)
    assert (sae.kind, sae.k, sae.hook, sae.layer, sae.apply_b_dec_to_input) == ("topk", 6, "mlp_out", 3, True)
    x = torch.randn(25, 8)
    with torch.no_grad():
        enc = coder.encode(x)
        ref = torch.zeros(25, 40).scatter_(1, enc.top_indices, enc.top_acts)
        recon = coder.decode(enc.top_acts, enc.top_indices)
    f = sae.encode(x.numpy())
    np.testing.assert_allclose(f, ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.decode(f), recon.numpy(), rtol=1e-4, atol=1e-4)
    # FVU as sparsify computes it (SparseCoder.forward: over the batch's tokens, around their mean).
    from actcache.sae import evaluate_sae

    with torch.no_grad():
        fvu = float(coder(x).fvu)
    assert evaluate_sae(sae, x.numpy())["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert pooled_codes(sae, x.numpy()[None], [(0, 25)])["fvu"][0] == pytest.approx(fvu, rel=1e-4)


def test_gemma_scope_folder_and_config(tmp_path):
    """Gemma Scope 2's own files: params.safetensors, lower-case names, config.json
    with hf_hook_point_in, or only the folder names saying hook and layer."""
    d = tmp_path / "attn_out" / "layer_7_width_16k_l0_small"
    d.mkdir(parents=True)
    _hand_layout(d, "jumprelu", lower=True)
    (d / "cfg.json").unlink()
    sae = load_sae(d)
    assert (sae.kind, sae.hook, sae.layer, sae.apply_b_dec_to_input) == ("jumprelu", "attn_out", 7, False)
    (d / "config.json").write_text(json.dumps({"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                               "hf_hook_point_in": "model.layers.5.self_attn.o_proj.input"}))
    assert (load_sae(d).hook, load_sae(d).layer) == ("attn_out", 5)
    (d / "config.json").write_text(json.dumps({"architecture": "jump_relu", "affine_connection": False,
                                               "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
                                               "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}))
    with pytest.raises(ConfigError, match="transcoder"):
        load_sae(d)


@pytest.mark.parametrize("name,want", [
    ("blocks.9.hook_mlp_out", ("mlp_out", 9)), ("blocks.3.attn.hook_z", ("attn_out", 3)),
    ("blocks.0.hook_resid_post", ("resid_post", 0)), ("model.layers.5.output", ("resid_post", 5)),
    ("model.layers.11.post_feedforward_layernorm.output", ("mlp_out", 11)),
    ("model.layers.2.self_attn.o_proj.input", ("attn_out", 2)), ("layers.7", ("resid_post", 7)),
    ("blocks.4.hook_mlp_in", (None, 4)), ("embed", (None, None))])
def test_hook_names(name, want):
    from actcache.sae import hook_from_name

    assert hook_from_name(name) == want


def test_unsupported_saelens_settings_are_refused(tmp_path):
    _hand_layout(tmp_path, "relu")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ConfigError, match="normalize_activations"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.1.hook_attn_out"}))
    with pytest.raises(ConfigError, match="hook_attn_out"):
        load_sae(tmp_path)
    assert load_sae(tmp_path, hook="attn_out").hook == "attn_out"  # the caller may say what it reads


def test_attn_out_round_trips_under_its_transformerlens_name(tmp_path):
    _hand_layout(tmp_path, "relu")
    sae = load_sae(tmp_path, hook="attn_out", layer=2)
    out = save_sae(sae, tmp_path / "copy")
    assert json.loads((out / "cfg.json").read_text())["hook_name"] == "blocks.2.attn.hook_z"
    again = load_sae(out)
    assert (again.hook, again.layer) == ("attn_out", 2)


# --------------------------------------------------------------------------- the study and selection


def test_sae_study_and_strategies_in_evaluate(tiny_model_dir, study_jsonl, tmp_path):
    """SAE features enter the study as their own family (checked against scipy on the stored
    codes), the top features list their most-activating pool texts, and sae-knn / sae-feature
    run in the selection experiment."""
    from scipy.stats import spearmanr

    from conftest import cfg_for, write_sae

    from actcache.builder import build
    from actcache.data import record_text
    from actcache.pipeline import EvalConfig, evaluate

    st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "s", layers="1", components=("mlp",),
                       masks=("isolated",), saes=(write_sae(tmp_path / "sae", layer=1),)))
    out = tmp_path / "report"
    m = 2
    res = evaluate(EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=8, n_probes=4, n_eval=1,
                              k=2, seeds=(0,), strategies=("random", "sae-knn", "sae-feature"), n_boot=20,
                              sae_min_active=m, out=str(out)))
    sae = res.study.sae
    cand = np.array(res.quality_cand_rows)
    quality = np.array(res.study.quality)
    (k16, mask), = st.sae_groups
    names = []
    for pooling in ("mean", "max"):
        C = st.sae_codes(k16, pooling, mask)
        feats = np.flatnonzero((C[cand] > 0).sum(0) >= m)
        names += [f"sae|{k16[:8]}|{mask}|{pooling}|{f}" for f in feats]
        by_name = {r["name"]: r for r in sae["rows"]}
        for f in feats[:10]:
            r = by_name[f"sae|{k16[:8]}|{mask}|{pooling}|{f}"]
            want = spearmanr(C[cand, f], quality)[0]
            assert r["rho_raw"] == pytest.approx(want, abs=1e-9) or (np.isnan(want) and np.isnan(r["rho_raw"]))
    stat_names = [f"sae|{k16[:8]}|{mask}|stat|{s}" for s in ("l0", "fvu", "explained")]
    assert [r["name"] for r in sae["rows"]] == stat_names + names  # exactly the features active in >= m candidates
    assert sae["features"], "no feature listed"
    for f in sae["features"]:
        col = st.sae_codes(k16, f["pooling"], mask)[st.pool_rows, f["feature"]]
        want = [i for i in np.argsort(-col, kind="stable")[:5] if col[i] > 0]
        assert [e["id"] for e in f["examples"]] == [str(st.ids[st.pool_rows[i]]) for i in want]
        assert [e["text"] for e in f["examples"]] == [record_text(st.records[st.pool_rows[i]]) for i in want]
    strategies = [s["strategy"] for s in res.selection.summary]
    assert "sae-knn" in strategies and any(s.startswith("sae-feature:f") for s in strategies)
    md = (out / "report.md").read_text()
    assert "SAE features beside the moment statistics" in md and (out / "sae_correlations.csv").exists()
    data = json.loads((out / "results.json").read_text())
    assert data["study"]["sae"]["min_active"] == m


def test_sae_strategies_are_skipped_with_a_reason_without_sae_features(tiny_model_dir, study_jsonl, tmp_path):
    from conftest import cfg_for

    from actcache.builder import build
    from actcache.pipeline import EvalConfig, evaluate
    from actcache.report import summary_lines

    st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "s", layers="1", components=("mlp",),
                       masks=("isolated",)))
    res = evaluate(EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=8, n_probes=4, n_eval=1,
                              k=1, seeds=(0,), strategies=("random", "sae-knn"), n_boot=0,
                              out=str(tmp_path / "r")))
    assert res.study.sae is None
    assert [s["strategy"] for s in res.selection.summary] == ["zero-shot", "random+turns"]
    assert any(line.startswith("skipped sae-knn: build") and "--sae DIR" in line for line in summary_lines(res))


# --------------------------------------------------------------------------- training text vs the study's rows


def _norm(text: str) -> str:
    return " ".join(text.split())


def _train_on_lines(tiny_model_dir, tmp_path, home, lines, **kw):
    from actcache.sae import SAETrainConfig, train_sae

    f = tmp_path / f"lines{len(list(tmp_path.glob('lines*')))}.txt"
    f.write_text("".join(ln + "\n" for ln in lines))
    return train_sae(SAETrainConfig(model=str(tiny_model_dir["llama"]), dtype="float32", text_file=str(f), layer=1,
                                    width=32, k=4, epochs=2, batch_tokens=64, lr=3e-3, home=str(home), **kw))


def test_sae_study_refuses_an_sae_trained_on_its_candidates_and_reports_the_overlap_when_allowed(
        tiny_model_dir, study_jsonl, tmp_path):
    jsonl = study_jsonl
    pytest.importorskip("sparsify")
    from conftest import EXTRA_EVAL, TEXTS, cfg_for

    from actcache.builder import build
    from actcache.errors import OverlapError
    from actcache.pipeline import EvalConfig, evaluate
    from actcache.sae import training_overlap

    home = tmp_path / "s"
    kw = dict(layers="1", components=("mlp",), masks=("isolated",))
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, home, **kw))
    reviews = {f"x{i}": t for i, (t, _) in enumerate(TEXTS)} | {f"y{i}": t for i, (t, _) in enumerate(EXTRA_EVAL)}
    # Raw texts of three pool rows and an eval row, and one pool row's demonstration on one line;
    # three copies each, so the held-out tenth never takes every copy of one.
    pool_ids = [str(i) for i in st.ids[st.pool_rows]]
    demo_row = int(st.pool_rows[-1])
    picked = [reviews[pool_ids[0]], reviews[pool_ids[1]], reviews[pool_ids[4]], reviews["x4"],
              _norm(str(st.demos[demo_row]))]
    filler = [f"{t} number {i}" for i in range(3) for t, _ in TEXTS]
    sae, rep = _train_on_lines(tiny_model_dir, tmp_path, home, filler + picked * 3)
    assert rep["texts"]["train"] + rep["texts"]["heldout"] == len(filler) + 3 * len(picked)
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, home, saes=(rep["path"],), **kw))
    assert st.provenance["saes"][sae.key[:16]]["fvu_reference"] == "sae training mean"
    assert st.provenance["saes"][sae.key[:16]]["training"]["n_texts"] == rep["texts"]["train"]

    lines = {_norm(x) for x in picked}  # computed here, independently of sae.row_digests

    def overlapping(rows):
        return sorted(str(st.ids[r]) for r in rows
                      if {_norm(str(st.demos[r])), _norm(str(st.texts[r])), _norm(reviews[str(st.ids[r])])} & lines)

    cfg = EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=8, n_probes=4, n_eval=1, k=2,
                     seeds=(0,), strategies=("random",), n_boot=0, sae_min_active=1, out=str(tmp_path / "r"))
    with pytest.raises(OverlapError, match=r"--exclude-build .*--allow-overlap") as e:
        evaluate(cfg)
    assert "trained on the text of" in str(e.value)
    from typer.testing import CliRunner

    from actcache_cli.main import app

    cli = CliRunner().invoke(app, ["evaluate", st.key, "--store", str(home), "--n-candidates", "8", "--n-probes", "4",
                                   "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 2 and "--allow-overlap" in cli.output, cli.output  # refused before any scoring
    from actcache.quality import study_rows
    from actcache.study import sae_study

    rows = study_rows(st, cfg)
    cand, probes = rows.cands, rows.probes
    want_c, want_p = overlapping(cand), overlapping(probes)
    assert want_c, "the test needs a candidate the SAE trained on"
    q = np.zeros(len(cand))
    with pytest.raises(OverlapError):  # the study itself refuses, whoever calls it
        sae_study(st, cand, q, st.labels[cand], q + 1, cfg, probes=probes)

    from dataclasses import replace

    res = evaluate(replace(cfg, allow_overlap=True))
    (ov,) = res.study.sae["training_overlap"]
    assert ov["status"] == "checked"
    assert ov["candidates"]["n_overlap"] == len(want_c) and sorted(ov["candidates"]["ids"]) == want_c
    assert ov["probes"]["n_overlap"] == len(want_p) and sorted(ov["probes"]["ids"]) == want_p
    assert (ov["candidates"]["n_rows"], ov["probes"]["n_rows"]) == (len(cand), len(probes))
    every = training_overlap(st, sae.key, np.arange(len(st.ids)))
    assert every["n_overlap"] == len(overlapping(range(len(st.ids)))) == 5
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"trained on the text of {len(want_c)} of {len(cand)} candidates" in md
    assert json.loads((tmp_path / "r" / "results.json").read_text())["study"]["sae"]["training_overlap"] == \
        res.study.sae["training_overlap"]

    # Trained with --exclude-build: every row of the build left out, no overlap, the study runs.
    sae2, rep2 = _train_on_lines(tiny_model_dir, tmp_path, home, filler + picked * 3, exclude_build=st.key[:8])
    assert rep2["source"]["exclude_build"] == st.key and rep2["source"]["n_excluded"] == 3 * len(picked)
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, home, saes=(rep["path"], rep2["path"]), **kw))
    clean = training_overlap(st, sae2.key, np.arange(len(st.ids)))
    assert clean["status"] == "checked" and clean["n_overlap"] == 0
    assert training_overlap(st, sae.key, np.arange(len(st.ids)))["n_overlap"] == 5  # the first SAE's kept
    from actcache.store import verify

    rep_v = verify(st.dir)
    assert not rep_v.findings and rep_v.checked > 0
    import h5py

    with h5py.File(st.h5_path, "r") as f:
        assert sorted(f["sae_training"]) == sorted([sae.key[:16], sae2.key[:16]])


def test_an_sae_without_recorded_training_texts_is_unknown(tiny_model_dir, jsonl, tmp_path):
    from conftest import cfg_for, write_sae

    from actcache.builder import build
    from actcache.sae import training_overlap

    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", components=("mlp",),
                       masks=("isolated",), saes=(write_sae(tmp_path / "sae", layer=1),)))
    k16 = st.sae_groups[0][0]
    assert st.sae_training_digests(k16) is None and st.provenance["saes"][k16]["training"] is None
    got = training_overlap(st, k16, st.pool_rows)
    assert got["status"] == "unknown" and got["n_overlap"] is None and got["n_rows"] == len(st.pool_rows)


def test_exclude_build_on_task_data(tiny_model_dir, tmp_path):
    """SST-2's pool: an SAE on the build's own pool texts trained on every row it kept; with
    --exclude-build it draws its --limit texts from the rest."""
    pytest.importorskip("sparsify")
    from conftest import shared_data_dir

    d = shared_data_dir()
    if d is None or not (d / "sst2").exists():
        pytest.skip("the shared sst2 data is not here")
    from actcache.builder import BuildConfig, build
    from actcache.data import DataSpec
    from actcache.models import ModelSpec
    from actcache.sae import SAETrainConfig, train_sae, training_overlap

    home = tmp_path / "s"
    st = build(BuildConfig(model=ModelSpec(str(tiny_model_dir["llama"]), dtype="float32"),
                           data=DataSpec(task="sst2", data_dir=str(d), pool_limit=30, eval_limit=10), layers="1",
                           components=("mlp",), masks=("isolated",), context_k=1, batch_size=8, home=str(home)))
    base = dict(model=str(tiny_model_dir["llama"]), dtype="float32", task="sst2", data_dir=str(d), limit=30, layer=1,
                width=32, k=4, epochs=1, batch_tokens=64, home=str(home))
    same, rep = train_sae(SAETrainConfig(**base))
    apart, rep2 = train_sae(SAETrainConfig(**base, exclude_build=st.key))
    assert rep2["source"]["n_excluded"] >= 30 and rep2["texts"]["train"] + rep2["texts"]["heldout"] == 30
    st = build(BuildConfig(model=ModelSpec(str(tiny_model_dir["llama"]), dtype="float32"),
                           data=DataSpec(task="sst2", data_dir=str(d), pool_limit=30, eval_limit=10), layers="1",
                           components=("mlp",), masks=("isolated",), context_k=1, batch_size=8, home=str(home),
                           saes=(rep["path"], rep2["path"])))
    # The first SAE's training texts are the build's pool demonstrations (all but its held-out tenth).
    assert training_overlap(st, same.key, st.pool_rows)["n_overlap"] == rep["texts"]["train"] > 20
    assert training_overlap(st, apart.key, np.arange(len(st.ids)))["n_overlap"] == 0
