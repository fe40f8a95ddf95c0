"""Study defects found in review (issue 9), each tested against an independent
reference: the no-BOS sink, in-context rows that saw themselves, and the
class-0 in-context prefix."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TEXTS, cfg_for, make_model, make_tokenizer, write_jsonl

from actcache.builder import _context_demos, _plan, build
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
    plan = _plan(ds, lm.tokenizer, cfg)
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
    firsts = [_context_demos(ds, 1, seed)[0].label for seed in range(4)]
    assert sorted(firsts) == [0, 0, 1, 1]
    for seed in range(4):
        labels = [e.label for e in _context_demos(ds, 4, seed)]
        assert sorted(labels) == [0, 0, 1, 1]
