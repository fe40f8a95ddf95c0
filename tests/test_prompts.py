"""prompts.py, the one owner of prompt layout, against hand-built references."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import cfg_for, make_model, make_tokenizer

from actcache import prompts
from actcache.builder import build
from actcache.data import load as load_data
from actcache.errors import ConfigError, LabelWordError, MismatchError
from actcache.prompts import (
    bos_ids, context_demos, context_for, encode_segments, length_batches, pad_id, plan_rows, prompt_segments,
    stored_context_segments,
)
from actcache.score import build_requests


def test_row_layout_by_hand():
    pre, q, t = [1], [10, 11, 12, 13], [20, 21]
    assert prompts.row_layout(pre, q, t, 16, True) == ([1, 10, 11, 12, 13, 20, 21], (1, 7), 0)
    assert prompts.row_layout(pre, q, t, 16, False) == ([1, 10, 11, 12, 13, 20, 21], (1, 5), 0)
    # too long: the input loses its start, next to the answer stays
    assert prompts.row_layout(pre, q, t, 5, True) == ([1, 12, 13, 20, 21], (1, 5), 2)
    # no BOS: the first token is the attention sink and is left out of the span
    assert prompts.row_layout([], q, [], 16, False) == ([10, 11, 12, 13], (1, 4), 0)
    assert prompts.row_layout([], [10], [], 16, False) == ([10], (0, 1), 0)


def test_segments_and_bos_contract():
    for bos in (True, False):
        tok = make_tokenizer(bos=bos)
        segs = ["Review: a\nSentiment: positive\n\n", "Review: b\nSentiment:"]
        by_hand = ([tok.bos_token_id] if bos else []) + sum(
            (tok(s, add_special_tokens=False)["input_ids"] for s in segs), [])
        assert prompts.encode_segments(tok, segs) == by_hand
        assert prompts.bos_ids(tok) == ([tok.bos_token_id] if bos else [])


def test_pad_id_fallbacks():
    assert prompts.pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert prompts.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert prompts.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_query_side_prefix_equals_builder_prefix(tiny_model_dir, jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], jsonl, tmp_path / "s", layers="1", masks=("in-context",),
                       components=("mlp",), poolings=("mean",)))
    [segs] = prompts.stored_context_segments(st, st.task())  # k=2 >= 2 labels: one rotation
    ids = st.provenance["in_context"]["demo_ids"]
    assert len(segs) == len(ids) == 2
    assert "".join(segs) == st.provenance["in_context"]["prefix"]
    by_id = {i: r for i, r in zip(st.ids, st.demos)}
    assert segs == [by_id[i] + "\n\n" for i in ids]


# --------------------------------------------------------------------------- plans, prefixes, requests
# (row ids and spans against the tokenizer called directly, for tokenizers with and without BOS)


def test_pad_ids_of_zero_are_real_ids():
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=0)) == 0


def _plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no-bos"])
def tok(request):
    return make_tokenizer(bos=request.param)


def test_prompt_segments_text():
    task = SimpleNamespace(instruction="Classify.", fewshot_delimiter="\n\n", demo_text=lambda e: f"D{e}", query_text=lambda e: f"Q{e}")
    assert prompt_segments(task, [1, 2], 3) == ["Classify.\n\n", "D1\n\n", "D2\n\n", "Q3"]
    task.instruction = ""
    assert prompt_segments(task, [], 3) == ["Q3"]


def test_length_batches_longest_first_ties_by_row():
    got = [b.tolist() for b in length_batches([3, 5, 5, 1, 4], 2)]
    assert got == [[1, 2], [4, 0], [3]]
    assert length_batches([], 4) == []


def _dataset(tmp_path, jsonl, **kw):
    cfg = cfg_for(tmp_path, jsonl, tmp_path / "s", **kw)
    return load_data(cfg.data), cfg


def test_plan_rows_equal_direct_tokenization(tok, jsonl, tmp_path):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("isolated", "label-masked"), max_length=33)
    plan = plan_rows(ds, tok, cfg)
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
        plan_rows(ds, tok, dataclasses.replace(cfg, max_length=1))


def test_in_context_prefix_is_the_demonstrations_but_never_a_rows_own(tok, jsonl, tmp_path):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("in-context",), context_k=3, max_length=256)
    plan = plan_rows(ds, tok, cfg)
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
    task = SimpleNamespace(instruction="Classify.", fewshot_delimiter="\n\n")
    store = SimpleNamespace(key="k" * 16, ids=np.array(["a", "b", "c"]), demos=np.array(["A+", "B+", "C+"]),
                            provenance={"in_context": {"k": 2, "demo_ids": ["c", "a"],
                                                       "prefix": "Classify.\n\nC+\n\nA+\n\n"}})
    assert stored_context_segments(store, task) == [["Classify.\n\n", "C+\n\n", "A+\n\n"]]  # no "rotations": one
    store.provenance["in_context"]["prefix"] = "something else"
    with pytest.raises(MismatchError, match="rebuild"):
        stored_context_segments(store, task)
    store.provenance["in_context"] = {"k": 2, "demo_ids": ["zz"], "prefix": ""}
    with pytest.raises(MismatchError, match="zz"):
        stored_context_segments(store, task)
    store.provenance["in_context"] = {"k": 0, "demo_ids": []}
    assert stored_context_segments(store, task) == [[]]


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_prefix_query_reconstructs_from_a_store_is_the_builds(bos, jsonl, tmp_path):
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
    plan = plan_rows(load_data(cfg.data), lm.tokenizer, cfg)
    [segs] = stored_context_segments(st, st.task())
    rebuilt = encode_segments(lm.tokenizer, segs)
    ctx_rows = [i for i, ex in enumerate(plan.rows) if ex.id not in plan.context_ids]
    assert len(rebuilt) > len(bos_ids(t)) + 4 and ctx_rows
    for i in ctx_rows:
        assert plan.seqs["in-context"][i][:len(rebuilt)] == rebuilt
        assert plan.spans["in-context"][i][0] == len(rebuilt)


def test_scoring_requests_match_the_harness_layout(tok):
    ps = [["Review: fine\n\n", "Review: slow\nSentiment:"], ["Review: dull\nSentiment:"]]
    req = build_requests(tok, ps, [" positive", " negative day"], max_len=512)
    assert not req.fast and req.n_opt == 2 and [len(p) for p in req.prompts] == [2, 1]
    k = 0
    for i, p in enumerate(ps):
        ctx = encode_segments(tok, p)
        assert req.prefixes[i] + req.suffixes[i] == ctx
        assert req.suffixes[i] == _plain(tok, p[-1])
        for j, o in enumerate([" positive", " negative day"]):
            c = _plain(tok, o)
            pi, oj, ids, pos, tgt = req.reqs[k]
            # (context + continuation)[:-1], read where each continuation token is predicted
            assert (pi, oj, ids, tgt) == (i, j, (ctx + c)[:-1], c)
            assert [(ctx + c)[p_ + 1] for p_ in pos] == c and pos[0] == len(ctx) - 1
            k += 1
    assert k == len(req.reqs)
    single = [o for o in (" positive", " negative") if len(_plain(tok, o)) == 1]
    if single:
        fast = build_requests(tok, ps, single, max_len=512)
        assert fast.fast and [r[2] for r in fast.reqs] == [encode_segments(tok, p) for p in ps]
    with pytest.raises(LabelWordError):
        build_requests(tok, ps, [""], max_len=512)
    n = len(encode_segments(tok, ps[0]))
    with pytest.raises(ConfigError, match="max_length"):
        build_requests(tok, ps, [" positive"], max_len=n - 1)


# --------------------------------------------------------------------------- label rotations of the in-context prefix


def _four_way(tmp_path, jsonl, **kw):
    """The reviews data relabelled into 4 classes (3 pool rows each), as a 4-way task."""
    from conftest import TEXTS, write_jsonl

    rows = [{"id": f"x{i}", "review": t, "label": i % 4, "split": "eval" if i >= 12 else "train"}
            for i, (t, _) in enumerate(TEXTS + TEXTS[:3])]
    path = write_jsonl(tmp_path / "four.jsonl", rows)
    ds, cfg = _dataset(tmp_path, jsonl, **kw)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, path=str(path), label_words=(" World", " Sports", " Business", " Technology")))
    return load_data(cfg.data), cfg


def _check_rotation_layout(tok, ds, plan, k, seed):
    """Each rotation r's rows against the tokenizer called directly: prefix = BOS + the
    demonstrations of context_demos(ds, k, seed + r), a row's own copy replaced by its
    seeded same-label stand-in, then the row."""
    for r, rot in enumerate(plan.rotations):
        ctx = context_demos(ds, k, seed + r)
        assert rot.demo_ids == [e.id for e in ctx]
        assert rot.prefix == "".join(ds.task.demo_text(e) + "\n\n" for e in ctx)
        for i, (ex, split) in enumerate(zip(plan.rows, plan.splits)):
            own = context_for(ds, ctx, ex, seed + r) if split == "pool" else ctx
            assert ex not in own or split == "eval"
            pre = bos_ids(tok) + [x for e in own for x in _plain(tok, ds.task.demo_text(e) + "\n\n")]
            q = _plain(tok, ds.task.query_text(ex))
            t = _plain(tok, ds.task.target(ex)) if split == "pool" else []
            assert rot.seqs[i] == pre + q + t
            assert rot.spans[i] == (len(pre) if pre else 1, len(pre) + len(q) + len(t))


def test_one_shot_prefix_rotates_over_both_labels(tok, jsonl, tmp_path):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("in-context", "isolated"), context_k=1, context_seed=5,
                       max_length=256)
    plan = plan_rows(ds, tok, cfg)
    assert prompts.context_rotations(ds, 1) == 2 and len(plan.rotations) == 2
    by_id = {e.id: e for e in ds.pool}
    assert sorted(by_id[r.demo_ids[0]].label for r in plan.rotations) == [0, 1]  # each label leads once
    _check_rotation_layout(tok, ds, plan, 1, 5)
    # rotation 0 is what seqs["in-context"] and context_ids report; other masks have one layout
    assert plan.seqs["in-context"] == plan.rotations[0].seqs and plan.context_ids == plan.rotations[0].demo_ids
    assert plan.layouts("in-context") == [(r.seqs, r.spans) for r in plan.rotations]
    assert plan.layouts("isolated") == [(plan.seqs["isolated"], plan.spans["isolated"])]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefix_shorter_than_four_labels_rotates_four_times(tok, jsonl, tmp_path, k):
    ds, cfg = _four_way(tmp_path, jsonl, masks=("in-context",), context_k=k, max_length=256)
    plan = plan_rows(ds, tok, cfg)
    assert len(plan.rotations) == 4
    labels = {e.id: e.label for e in ds.pool}
    per_rot = [[labels[i] for i in r.demo_ids] for r in plan.rotations]
    assert all(len(set(ls)) == k for ls in per_rot)  # k distinct labels in each prefix
    # over the rotations every label is in the prefix equally often (k times) and, at k=1, leads once
    assert sorted(sum(per_rot, [])) == sorted(list(range(4)) * k)
    _check_rotation_layout(tok, ds, plan, k, cfg.context_seed)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_prefix_that_holds_every_label_is_one_rotation_as_before(tok, jsonl, tmp_path, k):
    ds, cfg = _dataset(tmp_path, jsonl, masks=("in-context",), context_k=k, max_length=256)
    plan = plan_rows(ds, tok, cfg)
    assert prompts.context_rotations(ds, k) == 1 and len(plan.rotations) == 1
    _check_rotation_layout(tok, ds, plan, k, cfg.context_seed)
    assert plan.spans["in-context"] == plan.rotations[0].spans
    ds4, cfg4 = _four_way(tmp_path, jsonl, masks=("in-context",), context_k=4, max_length=256)
    assert len(plan_rows(ds4, tok, cfg4).rotations) == 1


def test_stored_rotations_are_each_rebuilt_and_checked():
    task = SimpleNamespace(instruction="", fewshot_delimiter="\n\n")
    rots = [{"demo_ids": ["c"], "prefix": "C+\n\n"}, {"demo_ids": ["a"], "prefix": "A+\n\n"}]
    store = SimpleNamespace(key="k" * 16, ids=np.array(["a", "b", "c"]), demos=np.array(["A+", "B+", "C+"]),
                            provenance={"in_context": {"k": 1, "demo_ids": ["c"], "prefix": "C+\n\n",
                                                       "rotations": rots}})
    assert stored_context_segments(store, task) == [["C+\n\n"], ["A+\n\n"]]
    rots[1]["prefix"] = "B+\n\n"
    with pytest.raises(MismatchError, match="rebuild"):
        stored_context_segments(store, task)
