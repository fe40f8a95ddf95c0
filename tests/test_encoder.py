"""One encoder path: only actcache/prompts.py tokenizes text and lays out token
rows, and one capture runner whose pooling set is a registry."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cfg_for, make_model, make_tokenizer

from actcache import capture, prompts
from actcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("actcache", "cli", "indexes", "benchmarks")
OWNER = "actcache/prompts.py"
# Calls that tokenize text or assemble token rows (prompts.py's own functions included:
# another module calling them lays out rows itself instead of asking prompts.py for them).
LAYOUT_FUNCS = {"encode_text", "encode_segments", "encode_continuation", "bos_ids", "row_layout"}
TOKENIZER_METHODS = {"encode", "encode_plus", "batch_encode_plus", "apply_chat_template",
                     "convert_tokens_to_ids", "tokenize"}
TOKENIZER_NAMES = {"tok", "tokenizer", "tk"}
# (file, called name) -> why it may tokenize outside prompts.py.
ALLOWED = {
    ("actcache/select.py", "tok"): "the packaged MiniLM sentence embedder (vote-k) tokenizes with its own "
                                   "model's tokenizer, not the build's LM: its ids never enter a row",
}


def _receiver(node) -> str:
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return node.attr
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def tokenizer_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call in `source` that tokenizes text or lays out token rows."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and (f.id in TOKENIZER_NAMES or f.id in LAYOUT_FUNCS):
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute):
            if f.attr in LAYOUT_FUNCS or f.attr in TOKENIZER_NAMES:  # prompts.encode_segments(...), self.tokenizer(...)
                found.append((node.lineno, f.attr))
            elif f.attr in TOKENIZER_METHODS and "tok" in _receiver(f.value).lower():
                found.append((node.lineno, f.attr))
    return sorted(found)


def _offences() -> list[str]:
    out = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == OWNER:
                continue
            for line, name in tokenizer_calls(path.read_text()):
                if (rel, name) not in ALLOWED:
                    out.append(f"{rel}:{line} {name}(...)")
    return out


def test_only_prompts_tokenizes():
    offences = _offences()
    assert not offences, "token ids laid out outside actcache/prompts.py:\n" + "\n".join(offences)


def test_the_scan_sees_tokenizer_calls():
    src = ("ids = tokenizer('a')['input_ids']\n"
           "x = self.tokenizer.encode('b')\n"
           "y = prompts.encode_segments(tok, ['c'])\n"
           "z = row_layout(pre, q, t, 8, True)\n"
           "w = tok.apply_chat_template([])\n"
           "v = sae.encode(x)\n"
           "u = 'text'.encode()\n")
    assert [n for _, n in tokenizer_calls(src)] == ["tokenizer", "encode", "encode_segments", "row_layout",
                                                    "apply_chat_template"]


# --------------------------------------------------------------------------- the attention rule of a mask


def test_attention_rule_is_prompts_and_capture_builds_it():
    assert {m: prompts.attention_rule(m) for m in prompts.MASKS} == {
        "isolated": "causal", "in-context": "causal", "label-masked": "causal", "sink-masked": "sink"}
    assert prompts.DEFAULT_MASK in prompts.MASKS
    assert not hasattr(capture, "MASKS")
    with pytest.raises(ConfigError, match="unknown mask"):
        prompts.attention_rule("nope")
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    b = capture.make_batch([tok("a fine cast")["input_ids"]], [(1, 3)], 0)
    assert capture.attention_for(model, b, "causal") is b.attention_mask
    torch.testing.assert_close(capture.attention_for(model, b, "sink"),
                               capture.sink_masks(model, b.attention_mask, model.dtype))


# --------------------------------------------------------------------------- a registered pooling


def _max_pool(x, sp):
    return x.masked_fill(~sp.span[..., None], float("-inf")).amax(1)


@pytest.fixture()
def max_pooling(request):
    capture.register_pooling("max", _max_pool)
    request.addfinalizer(lambda: capture.unregister_pooling("max"))
    return "max"


def _cos_top(P, Q, k):
    P = P.astype(np.float64) / np.linalg.norm(P, axis=1, keepdims=True)
    Q = Q.astype(np.float64) / np.linalg.norm(Q, axis=1, keepdims=True)
    return np.argsort(-(Q @ P.T), axis=1, kind="stable")[:, :k]


def test_a_registered_pooling_is_built_stored_and_queried(max_pooling, tiny_model_dir, jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actcache.builder import build
    from actcache.data import load
    from actcache.query import QueryConfig, encode_texts, query
    from actcache.store import verify

    home = tmp_path / "s"
    cfg = cfg_for(tiny_model_dir["llama"], jsonl, home, layers="1", components=("resid",),
                  masks=("isolated",), poolings=("mean", max_pooling), store_dtype="float32")
    st = build(cfg)
    assert "max" in st.info()["poolings"] and "max" in capture.pooling_names()
    assert verify(st.dir).ok
    # Independent reference: a plain forward's hidden states, numpy max / mean over each span.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    plan = prompts.plan_rows(load(cfg.data), tok, cfg)
    got_max, got_mean = st.acts("resid", 1, "max", "isolated"), st.acts("resid", 1, "mean", "isolated")
    for r, (seq, (s, e)) in enumerate(zip(plan.seqs["isolated"], plan.spans["isolated"])):
        with torch.no_grad():
            h = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[2][0, s:e].numpy()
        np.testing.assert_allclose(got_max[r], h.max(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_mean[r], h.mean(0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got_max, got_mean)
    # A query in the new pooling: the build's eval rows re-encoded, and a kNN search against numpy.
    X, _ = encode_texts(st, st.texts[st.eval_rows], "resid", 1, "max", "isolated")
    np.testing.assert_allclose(X, st.acts("resid", 1, "max", "isolated", "eval"), rtol=1e-5, atol=1e-5)
    recs = query(QueryConfig(key=st.key, home=str(home), component="resid", layer=1, pooling="max",
                             mask="isolated", k=3, exclude_self=False))
    P, Q = st.acts("resid", 1, "max", "isolated", "pool"), st.acts("resid", 1, "max", "isolated", "eval")
    pool_ids = list(st.ids[st.pool_rows])
    want = [[pool_ids[j] for j in row] for row in _cos_top(P, Q, 3)]
    assert [[n["id"] for n in r["neighbors"]] for r in recs] == want


def test_unregistered_pooling_is_refused():
    from actcache.builder import BuildConfig

    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        BuildConfig(poolings=("max",)).validate()
    with pytest.raises(ConfigError, match="built in"):
        capture.unregister_pooling("mean")


# --------------------------------------------------------------------------- SAE training rows


@pytest.mark.parametrize("bos", [True, False])
def test_sae_training_rows_drop_the_start_like_every_row(bos):
    from types import SimpleNamespace

    from actcache.sae import token_activations

    tok = make_tokenizer(bos=bos)
    model = make_model("llama", len(tok)).eval()
    text = "the quick brown fox jumps over the lazy dog, a great movie with a fine cast"
    short = "great fun"
    q = tok(text, add_special_tokens=False)["input_ids"]
    max_length = 10
    assert len(q) > max_length
    head = [tok.bos_token_id] if bos else []
    # By hand: the end of the text kept, its start dropped; BOS (or the first token) out of the span.
    rows = [head + q[-(max_length - len(head)):], head + tok(short, add_special_tokens=False)["input_ids"]]
    want = []
    for ids in rows:
        with torch.no_grad():
            want.append(model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0, 1:].numpy())
    got = token_activations(SimpleNamespace(model=model, tokenizer=tok), [text, short], 2, "resid_post",
                            max_length, batch_size=2)
    assert len(rows[0]) == max_length and rows[0][-1] == q[-1]
    # Rows run longest first: the long text's tokens come first.
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-5)
    seqs, spans = prompts.text_rows(tok, [text], max_length)
    assert seqs == rows[:1] and spans == [(1, max_length)]
