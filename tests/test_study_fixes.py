"""Study defects found in review (issue 9), each tested against an independent
reference: the no-BOS sink, in-context rows that saw themselves, and the
class-0 in-context prefix."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TEXTS, cfg_for, make_model, make_tokenizer, write_jsonl

from actcache.builder import build
from actcache.prompts import context_demos, plan_rows
from actcache.capture import STATS
from actcache.data import load as load_data
from actcache.models import load_model
from actcache.store import default_home


def _nobos_qwen_dir(tmp_path):
    tok = make_tokenizer(bos=False)
    assert tok.bos_token_id is None and tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]
    d = tmp_path / "qwen-nobos"
    make_model("qwen2", len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d, tok


def test_no_bos_tokenizer_leaves_the_first_token_out_of_every_span(jsonl, tmp_path):
    model_dir, tok = _nobos_qwen_dir(tmp_path)
    st = build(cfg_for(model_dir, jsonl, tmp_path / "s", layers="1", store_dtype="float32", components=("resid",),
                       masks=("isolated", "label-masked")))
    assert st.provenance["sink"] == "first token"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    row = int(st.pool_rows[0])
    q = tok(st.texts[row], add_special_tokens=False)["input_ids"]
    t = tok(" " + ("negative", "positive")[st.labels[row]], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        h = model(torch.tensor([q + t]), output_hidden_states=True).hidden_states[2][0].double().numpy()
    # The sink (position 0, "Review") is pooled nowhere; BOS-less rows start at 1.
    np.testing.assert_allclose(st.acts("resid", 1, "mean", "isolated")[row], h[1:].mean(0), atol=1e-5)
    np.testing.assert_allclose(st.acts("resid", 1, "mean", "label-masked")[row], h[1:len(q)].mean(0), atol=1e-5)
    vals = h[1:].ravel()
    got = st.stats("resid", 1, "isolated")[row]
    np.testing.assert_allclose(got[STATS.index("max_abs")], np.abs(vals).max(), rtol=1e-5)
    np.testing.assert_allclose(got[STATS.index("mean")], vals.mean(), rtol=1e-4, atol=1e-6)


def test_in_context_rows_never_see_their_own_demonstration(tiny_model_dir, jsonl, tmp_path):
    cfg = cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", context_k=3)
    ds = load_data(cfg.data)
    lm = load_model(cfg.model, default_home(cfg.home))
    plan = plan_rows(ds, lm.tokenizer, cfg)
    assert len(plan.context_ids) == 3
    seen = 0
    for i, ex in enumerate(plan.rows):
        seq, (start, _) = plan.seqs["in-context"][i], plan.spans["in-context"][i]
        prefix = lm.tokenizer.decode(seq[:start])
        assert ds.task.query_text(ex) not in prefix, (ex.id, prefix)
        if ex.id in plan.context_ids:
            seen += 1
            assert lm.tokenizer.decode(seq[start:]) == ds.task.demo_text(ex)
    assert seen == 3  # every context demonstration was checked


def test_in_context_prefix_is_label_balanced_across_seeds(tiny_model_dir, jsonl):
    cfg = cfg_for(tiny_model_dir["llama"], jsonl, "unused")
    ds = load_data(cfg.data)
    firsts = [context_demos(ds, 1, seed)[0].label for seed in range(4)]
    assert sorted(firsts) == [0, 0, 1, 1]
    for seed in range(4):
        labels = [e.label for e in context_demos(ds, 4, seed)]
        assert sorted(labels) == [0, 0, 1, 1]


def test_boolq_split_keeps_a_passage_on_one_side():
    import pytest

    from conftest import shared_data_dir
    from actcache.data import DataSpec, normalize_text

    d = shared_data_dir()
    if d is None or not (d / "boolq").exists():
        pytest.skip("../shared/data/boolq is not here")
    ds = load_data(DataSpec(task="boolq", data_dir=str(d)))
    pool = {normalize_text(e.get("passage")) for e in ds.pool}
    shared = [e.id for e in ds.eval if normalize_text(e.get("passage")) in pool]
    assert not shared, f"{len(shared)} eval rows share a passage with the pool"
    assert len(ds.eval) > 400 and len(ds.pool) > 2000


def _dup_rows():
    rows = [{"id": f"p{i}", "review": t, "label": lab, "split": "train"} for i, (t, lab) in enumerate(TEXTS)]
    # Eval rows that repeat pool rows up to case and punctuation.
    rows += [{"id": "e0", "review": "A great movie, with a fine cast!", "label": 1, "split": "eval"},
             {"id": "e1", "review": "Dull -- slow and far too long", "label": 0, "split": "eval"},
             {"id": "e2", "review": "nothing like the others at all", "label": 1, "split": "eval"},
             {"id": "e3", "review": "Great fun.", "label": 1, "split": "eval"}]
    return rows


def test_near_duplicates_are_never_retrieved_nor_paired(tiny_model_dir, tmp_path):
    from actcache.query import QueryConfig, query
    from actcache.pipeline import EvalConfig
    from actcache.quality import study_rows

    data = write_jsonl(tmp_path / "dups.jsonl", _dup_rows())
    st = build(cfg_for(tiny_model_dir["llama"], data, tmp_path / "s", layers="0", masks=("label-masked",),
                       components=("mlp",)))
    twin = {"e0": "p0", "e1": "p1", "e3": "p8"}
    recs = query(QueryConfig(key=st.key, home=str(st.home), layer=0, k=len(st.pool_rows) - 1))
    for r in recs:
        got = {n["id"] for n in r["neighbors"]}
        assert twin.get(r["test_id"]) not in got, (r["test_id"], got)
    assert len({n["id"] for n in recs[2]["neighbors"]}) == len(st.pool_rows) - 1  # nothing else dropped
    r = study_rows(st, EvalConfig(key=st.key, n_candidates=12, n_probes=2, n_eval=4))
    cands, probes, evals = r.cands, r.probes, r.evals
    assert not set(st.dups[cands]) & set(st.dups[probes])
    assert not set(probes) & set(evals) and not set(st.dups[evals]) & set(st.dups[probes])
    assert len(cands) == len(st.pool_rows) - sum(twin.get(st.ids[p]) is not None for p in probes)


def test_kate_order_puts_the_most_similar_demonstration_last():
    from actcache.experiment import demo_order

    chosen = {"t": ["best", "second", "third"]}  # retrieval order, best first
    assert demo_order(chosen, ["t"], 0, shared=False, order="similar-last") == [["third", "second", "best"]]
    assert demo_order(chosen, ["t"], 0, shared=False, order="similar-first") == [["best", "second", "third"]]
    shuffled = {tuple(demo_order(chosen, ["t"], s, shared=False, order="shuffle")[0]) for s in range(8)}
    assert len(shuffled) > 1


def test_vote_k_lm_selects_an_annotation_set_then_retrieves_per_input(tiny_model_dir, jsonl, tmp_path):
    from actcache.select import select
    from actcache.experiment import choose

    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="0,-1", masks=("label-masked",),
                       components=("mlp",)))
    test_ids = [str(st.ids[r]) for r in st.eval_rows]
    got = choose(st, "vote-k-lm", k=2, seed=0, test_ids=test_ids, votek_budget=5)
    ann = list(select(st, "vote-k-lm", budget=5, k=min(10, len(st.pool_rows) - 1)).ids)
    X = st.acts("mlp", st.layers[-1], "mean", "label-masked").astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    row = {i: r for r, i in enumerate(st.ids)}
    for t in test_ids:
        sims = {a: X[row[t]] @ X[row[a]] for a in ann}
        assert got[t] == sorted(ann, key=lambda a: -sims[a])[:2]  # the 2 most similar of the set, best first
    assert len({tuple(v) for v in got.values()}) > 1  # per input, not one fixed set


def test_multiple_choice_reports_acc_and_acc_norm_like_the_harness(tiny_model_dir, tmp_path):
    import pytest

    from conftest import shared_data_dir
    from actcache.builder import BuildConfig
    from actcache.data import DataSpec
    from actcache.models import ModelSpec
    from actcache.experiment import selection_experiment
    from actcache.pipeline import EvalConfig

    d = shared_data_dir()
    if d is None or not (d / "arc").exists():
        pytest.skip("../shared/data/arc is not here")
    st = build(BuildConfig(model=ModelSpec(str(tiny_model_dir["llama"]), dtype="float32"),
                           data=DataSpec(task="arc_challenge", data_dir=str(d), pool_limit=10, eval_limit=6),
                           layers="0", masks=("isolated",), components=("mlp",), home=str(tmp_path / "s"),
                           context_k=0))
    cfg = EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_probes=0, n_eval=6, k=1, seeds=(0,),
                     strategies=("random",), compare_fp32=False)
    res = selection_experiment(st, cfg, st.load_model(None))
    run = next(r for r in res.samples if r["strategy"] == "random+turns")
    recs = {x["id"]: x for x in run["items"]}
    opts = {rec["id"]: rec["choices"] for rec in st.records}
    acc = np.mean([np.argmax(x["logprobs"]) == x["gold"] for x in recs.values()])
    # lm-eval's rule (process_results): the choice's length in characters, no target delimiter
    norm = np.mean([np.argmax([lp / float(len(c)) for lp, c in zip(x["logprobs"], opts[i])]) == x["gold"]
                    for i, x in recs.items()])
    row = next(r for r in res.runs if r["strategy"] == "random+turns")
    assert row["accuracy"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(norm)
    assert "acc_norm" in next(s for s in res.summary if s["strategy"] == "random+turns")


def test_a_build_from_a_data_file_is_evaluated_after_the_file_moves(tiny_model_dir, study_jsonl, tmp_path):
    """Store.task comes from what the build stored, never from the original file."""
    jsonl = study_jsonl
    from actcache.store import Store
    from actcache.pipeline import EvalConfig
    from actcache.quality import quality_matrix

    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="0", masks=("isolated",)))
    before = st.task()
    jsonl.rename(tmp_path / "moved.jsonl")
    st = Store.open(st.key, st.home)
    assert st.task() == before and before.template == "Review: {review}\nSentiment:"
    q = quality_matrix(st, EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=4, n_probes=4))
    assert q.margin.shape == (4, 4)  # every candidate x probe; pairs across halves are NaN
