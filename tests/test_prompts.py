"""prompts.py, the one owner of prompt layout, against hand-built references."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import cfg_for, make_tokenizer

from actcache import prompts
from actcache.builder import build


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
    segs = prompts.stored_context_segments(st, st.task())
    ids = st.provenance["in_context"]["demo_ids"]
    assert len(segs) == len(ids) == 2
    assert "".join(segs) == st.provenance["in_context"]["prefix"]
    by_id = {i: r for i, r in zip(st.ids, st.demos)}
    assert segs == [by_id[i] + "\n\n" for i in ids]
