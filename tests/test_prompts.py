"""actcache.prompts: prompt -> token rows, checked against the tokenizer called
directly and against hand-computed layouts."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import cfg_for, make_model, make_tokenizer

from actcache.data import load as load_data
from actcache.errors import ConfigError, LabelWordError, MismatchError
from actcache.prompts import (
    bos_ids, build_plan, context_demos, context_for, encode_continuation, encode_segments, length_batches,
    pad_id, prompt_segments, row_layout, scoring_requests, stored_context_segments,
)


def _plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tok(request):
    return make_tokenizer(bos=request.param)


# --------------------------------------------------------------------------- tokens


def test_bos_and_segments_follow_the_tokenizer(tok):
    has_bos = tok.bos_token_id is not None
    assert bos_ids(tok) == ([tok.convert_tokens_to_ids("<bos>")] if has_bos else [])
    # A plain call adds exactly the BOS that bos_ids reports.
    assert tok("great fun")["input_ids"] == bos_ids(tok) + _plain(tok, "great fun")
    segs = ["Review: fine\nSentiment: positive\n\n", "Review: slow\nSentiment:"]
    assert encode_segments(tok, segs) == bos_ids(tok) + _plain(tok, segs[0]) + _plain(tok, segs[1])
    assert encode_segments(tok, []) == bos_ids(tok)
    assert encode_continuation(tok, " positive") == _plain(tok, " positive")
    with pytest.raises(ConfigError, match="wrap it"):
        encode_segments(tok, "a str")


def test_pad_id_falls_back_to_eos_then_zero():
    t = SimpleNamespace
    assert pad_id(t(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(t(pad_token_id=0, eos_token_id=7)) == 0  # a pad id of 0 is a real pad id
    assert pad_id(t(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(t(pad_token_id=None, eos_token_id=0)) == 0
    assert pad_id(t(pad_token_id=None, eos_token_id=None)) == 0
    real = make_tokenizer()
    assert pad_id(real) == real.convert_tokens_to_ids("<pad>")


def test_prompt_segments_text():
    task = SimpleNamespace(instruction="Classify.", demo_text=lambda e: f"D{e}", query_text=lambda e: f"Q{e}")
    assert prompt_segments(task, [1, 2], 3) == ["Classify.\n\n", "D1\n\n", "D2\n\n", "Q3"]
    task.instruction = ""
    assert prompt_segments(task, [], 3) == ["Q3"]


# --------------------------------------------------------------------------- row layout


def test_row_layout_truncates_the_start_and_spans_input_and_target():
    pre, q, t = [1], list(range(10, 20)), [50, 51]
    ids, span, dropped = row_layout(pre, q, t, 8, True)
    assert ids == [1, 15, 16, 17, 18, 19, 50, 51] and span == (1, 8) and dropped == 5
    ids, span, dropped = row_layout(pre, q, t, 8, False)
    assert ids == [1, 15, 16, 17, 18, 19, 50, 51] and span == (1, 6) and dropped == 5
    ids, span, dropped = row_layout(pre, q[:3], [], 8, False)
    assert ids == [1, 10, 11, 12] and span == (1, 4) and dropped == 0
    # No prefix (no BOS): the first token is the sink and is left out of the span...
    ids, span, _ = row_layout([], q[:3], t, 8, True)
    assert ids == [10, 11, 12, 50, 51] and span == (1, 5)
    # ...unless it is the span's only token.
    assert row_layout([], [10], [], 8, False)[1] == (0, 1)


def test_length_batches_longest_first_ties_by_row():
    got = [b.tolist() for b in length_batches([3, 5, 5, 1, 4], 2)]
    assert got == [[1, 2], [4, 0], [3]]
    assert length_batches([], 4) == []


def _dataset(tmp_path, jsonl, **kw):
    cfg = cfg_for(tmp_path, jsonl, tmp_path / "s", **kw)
    return load_data(cfg.data), cfg


def test_build_plan_rows_equal_direct_tokenization(tok, jsonl, tmp_path):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("isolated", "label-masked"), max_length=33)
    plan = build_plan(ds, tok, cfg)
    head = tok("x")["input_ids"][:-len(_plain(tok, "x"))]  # what a plain call prepends
    assert plan.sink == ("bos" if head else "first token")
    n_trunc = 0
    for i, (ex, split) in enumerate(zip(plan.rows, plan.splits)):
        q = _plain(tok, ds.task.query_text(ex))
        t = _plain(tok, ds.task.target(ex)) if split == "pool" else []
        keep = min(len(q), cfg.max_length - len(head) - len(t))
        want = head + q[len(q) - keep:] + t
        start = len(head) if head else 1
        assert plan.seqs["isolated"][i] == want
        assert plan.seqs["label-masked"][i] == want
        assert plan.spans["isolated"][i] == (start, len(want))
        assert plan.spans["label-masked"][i] == (start, len(head) + keep)
        assert plan.truncated[i] == len(q) - keep and plan.n_tokens[i] == len(q) and plan.n_target[i] == len(t)
        n_trunc += keep < len(q)
    assert n_trunc > 0 and "eval" in plan.splits  # truncation and target-less rows were both checked
    with pytest.raises(ConfigError, match="max-length"):
        build_plan(ds, tok, dataclasses.replace(cfg, max_length=1))


def test_in_context_prefix_is_the_demonstrations_but_never_a_rows_own(tok, jsonl, tmp_path):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("in-context",), context_k=3, max_length=256)
    plan = build_plan(ds, tok, cfg)
    ctx = context_demos(ds, 3, cfg.context_seed)
    assert plan.context_ids == [e.id for e in ctx]
    assert plan.context_text == "".join(ds.task.demo_text(e) + "\n\n" for e in ctx)
    for i, ex in enumerate(plan.rows):
        own = context_for(ds, ctx, ex, cfg.context_seed)
        assert (own is ctx) == (ex not in ctx)
        assert ex not in own
        pre = bos_ids(tok) + [x for e in own for x in _plain(tok, ds.task.demo_text(e) + "\n\n")]
        seq, (start, _) = plan.seqs["in-context"][i], plan.spans["in-context"][i]
        assert seq[:len(pre)] == pre and start == len(pre)


def test_stored_prefix_reconstruction_checks_the_store():
    task = SimpleNamespace(instruction="Classify.")
    store = SimpleNamespace(key="k" * 16, ids=np.array(["a", "b", "c"]), demos=np.array(["A+", "B+", "C+"]),
                            provenance={"in_context": {"k": 2, "demo_ids": ["c", "a"],
                                                       "prefix": "Classify.\n\nC+\n\nA+\n\n"}})
    assert stored_context_segments(store, task) == ["Classify.\n\n", "C+\n\n", "A+\n\n"]
    store.provenance["in_context"]["prefix"] = "something else"
    with pytest.raises(MismatchError, match="rebuild"):
        stored_context_segments(store, task)
    store.provenance["in_context"] = {"k": 2, "demo_ids": ["zz"], "prefix": ""}
    with pytest.raises(MismatchError, match="zz"):
        stored_context_segments(store, task)
    store.provenance["in_context"] = {"k": 0, "demo_ids": []}
    assert stored_context_segments(store, task) == []


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_prefix_query_reconstructs_from_a_store_is_the_builds(bos, jsonl, tmp_path):
    from actcache.builder import build
    from actcache.models import load_model
    from actcache.store import default_home

    t = make_tokenizer(bos=bos)
    model_dir = tmp_path / "m"
    make_model("qwen2", len(t), num_layers=2).save_pretrained(model_dir)
    t.save_pretrained(model_dir)
    cfg = cfg_for(model_dir, jsonl, tmp_path / "s", layers="0", components=("resid",), poolings=("mean",),
                  masks=("in-context",), context_k=2)
    st = build(cfg)
    lm = load_model(cfg.model, default_home(cfg.home))
    plan = build_plan(load_data(cfg.data), lm.tokenizer, cfg)
    rebuilt = encode_segments(lm.tokenizer, stored_context_segments(st, st.task()))
    ctx_rows = [i for i, ex in enumerate(plan.rows) if ex.id not in plan.context_ids]
    assert len(rebuilt) > len(bos_ids(t)) + 4 and ctx_rows
    for i in ctx_rows:
        assert plan.seqs["in-context"][i][:len(rebuilt)] == rebuilt
        assert plan.spans["in-context"][i][0] == len(rebuilt)


# --------------------------------------------------------------------------- scoring requests


def test_scoring_requests_match_the_harness_layout(tok):
    prompts = [["Review: fine\n\n", "Review: slow\nSentiment:"], ["Review: dull\nSentiment:"]]
    req = scoring_requests(tok, prompts, [" positive", " negative day"], max_length=512)
    assert not req.fast and req.n_options == 2 and req.n_segments == [2, 1]
    k = 0
    for i, p in enumerate(prompts):
        ctx = encode_segments(tok, p)
        assert req.prefixes[i] + req.suffixes[i] == ctx
        assert req.suffixes[i] == _plain(tok, p[-1])
        for j, o in enumerate([" positive", " negative day"]):
            c = _plain(tok, o)
            pi, oj, ids, pos, tgt = req.requests[k]
            # (context + continuation)[:-1], read where each continuation token is predicted
            assert (pi, oj, ids, tgt) == (i, j, (ctx + c)[:-1], c)
            assert [(ctx + c)[p_ + 1] for p_ in pos] == c and pos[0] == len(ctx) - 1
            k += 1
    assert k == len(req.requests)
    single = [o for o in (" positive", " negative") if len(_plain(tok, o)) == 1]
    if single:
        fast = scoring_requests(tok, prompts, single, max_length=512)
        assert fast.fast and [r[2] for r in fast.requests] == [encode_segments(tok, p) for p in prompts]
    with pytest.raises(LabelWordError):
        scoring_requests(tok, prompts, [""], max_length=512)
    n = len(encode_segments(tok, prompts[0]))
    with pytest.raises(ConfigError, match="max_length"):
        scoring_requests(tok, prompts, [" positive"], max_length=n - 1)
