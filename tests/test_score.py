"""Tests for actcache.score against a hand-computed lm-evaluation-harness reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCHS, make_model, make_tokenizer

from actcache import score as S
from actcache.errors import ConfigError, LabelWordError
from actcache.prompts import encode_continuation, encode_segments, fit_demonstrations
from actcache.score import (
    classify,
    exact_match,
    extract_number,
    generate,
    margins,
    score_options,
)

TOL = 1e-4

# Demonstrations are longer than gemma3's sliding window (16) on their own, and
# some queries are too, so cached prefixes cross the window boundary.
DEMOS = [
    "Review: a great movie with a fine cast\nSentiment: positive\n\n",
    "Review: dull, slow and far too long\nSentiment: negative\n\n",
    "Review: the quick brown fox jumps over the lazy dog.\nSentiment: positive\n\n",
]
QUERIES = [
    "Review: news\nSentiment:",
    "Review: a man sleeps and the sky is blue, the business of the day is far too slow\nSentiment:",
    "Review: fine\nSentiment:",
    "Review: World Sports Business Technology news of the day\nSentiment:",
]
SINGLE = [" the", " a", " False", "x"]  # one token each with the conftest tokenizer
MULTI = [" positive", " negative", " False"]  # 5, 4 and 1 tokens


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box
    thread hand-offs make each forward ~30x slower; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return {a: make_model(a, len(tok)) for a in ARCHS}


def reference(model, tok, prompts, options, length_normalize=False):
    """Harness-style: one unbatched forward per (prompt, option), full-vocab log_softmax."""
    per_prompt = isinstance(options[0], (list, tuple))
    n_opt = max(len(o) for o in options) if per_prompt else len(options)
    out = np.full((len(prompts), n_opt), -np.inf)
    for i, p in enumerate(prompts):
        ctx = encode_segments(tok, p)
        for j, o in enumerate(options[i] if per_prompt else options):
            cont = encode_continuation(tok, o)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            s = sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            out[i, j] = s / len(cont) if length_normalize else s
    return out


def matrix_prompts():
    """The 1-shot quality-matrix shape: every demo followed by every query."""
    return [[d, q] for d in DEMOS for q in QUERIES]


# --------------------------------------------------------------------------- #
# tokenization contract
# --------------------------------------------------------------------------- #


def test_encode_contract(tok):
    segs = ["Review: fine", "\nSentiment:"]
    parts = [tok(s, add_special_tokens=False)["input_ids"] for s in segs]
    assert encode_segments(tok, segs) == [tok.bos_token_id] + parts[0] + parts[1]
    assert encode_continuation(tok, " positive") == tok(" positive", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in encode_continuation(tok, " positive")
    assert all(len(encode_continuation(tok, w)) == 1 for w in SINGLE)
    assert [len(encode_continuation(tok, w)) for w in MULTI] == [5, 4, 1]


# --------------------------------------------------------------------------- #
# agreement with the reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_matches_reference(arch, tok, models, monkeypatch):
    model = models[arch]
    prompts = [[q] for q in QUERIES] + matrix_prompts()[:3]
    ref = reference(model, tok, prompts, SINGLE)
    # The fast path must never run the LM head module over all positions.
    lm = model.get_output_embeddings()

    def boom(*a, **k):
        raise AssertionError("full LM head called")

    monkeypatch.setattr(lm, "forward", boom)
    got = score_options(model, tok, prompts, SINGLE, batch_size=3)
    assert got.dtype == np.float64 and got.shape == (len(prompts), len(SINGLE))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    # Single-token options: length normalization is a no-op.
    np.testing.assert_allclose(
        score_options(model, tok, prompts, SINGLE, length_normalize=True), ref, atol=TOL, rtol=0
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_general_path_matches_reference(arch, tok, models):
    model = models[arch]
    prompts = [[q] for q in QUERIES[:3]] + matrix_prompts()[4:6]
    ref = reference(model, tok, prompts, MULTI)
    np.testing.assert_allclose(score_options(model, tok, prompts, MULTI, batch_size=4), ref, atol=TOL, rtol=0)
    ref_ln = reference(model, tok, prompts, MULTI, length_normalize=True)
    got_ln = score_options(model, tok, prompts, MULTI, batch_size=4, length_normalize=True)
    np.testing.assert_allclose(got_ln, ref_ln, atol=TOL, rtol=0)
    assert not np.allclose(got_ln, ref, atol=1e-3)  # normalization actually did something


@pytest.mark.parametrize("options", [SINGLE, MULTI], ids=["fast", "general"])
def test_final_logit_softcapping(options, tok, models, monkeypatch):
    """Gemma-2/3 style soft-capping must be applied to the selected rows as the model does."""
    model = models["gemma3"]
    monkeypatch.setattr(model.config, "final_logit_softcapping", 0.5)  # strong cap: large effect
    prompts = [[q] for q in QUERIES[:2]] + matrix_prompts()[1:2]
    ref = reference(model, tok, prompts, options)
    np.testing.assert_allclose(score_options(model, tok, prompts, options), ref, atol=TOL, rtol=0)


def test_per_prompt_ragged_options(tok, models):
    model = models["llama"]
    prompts = [[QUERIES[0]], [DEMOS[0], QUERIES[1]], [QUERIES[2]]]
    options = [[" yes", " no"], [" A", " B", " C positive"], [" the"]]
    ref = reference(model, tok, prompts, options)
    got = score_options(model, tok, prompts, options, batch_size=2)
    assert got.shape == (3, 3)
    assert np.isneginf(got[0, 2]) and np.isneginf(got[2, 1:]).all()
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("options", [SINGLE, MULTI], ids=["fast", "general"])
def test_normalize_labels(options, tok, models):
    model = models["gemma3"]
    prompts = [[q] for q in QUERIES]
    vocab = score_options(model, tok, prompts, options, normalize="vocab")
    labels = score_options(model, tok, prompts, options, normalize="labels")
    # Within-prompt differences (hence predictions and margins) are unchanged...
    np.testing.assert_allclose(labels - labels[:, :1], vocab - vocab[:, :1], atol=TOL, rtol=0)
    gold = np.arange(len(prompts)) % len(options)
    np.testing.assert_allclose(margins(labels, gold), margins(vocab, gold), atol=TOL, rtol=0)
    # ...and the label set is now a distribution.
    np.testing.assert_allclose(np.exp(labels).sum(1), 1.0, atol=1e-6)
    assert (vocab < labels - 1e-3).all()
    with pytest.raises(ConfigError):
        score_options(model, tok, prompts, options, normalize="softmax")


# --------------------------------------------------------------------------- #
# batching / padding / prefix reuse invariance
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [SINGLE, MULTI], ids=["fast", "general"])
def test_batched_equals_unbatched(arch, options, models):
    model = models[arch]
    # Very different lengths: 3 tokens up to ~150 tokens.
    prompts = [["x"], DEMOS * 2 + [QUERIES[1]], [QUERIES[0]], DEMOS + [QUERIES[3]], ["Review: fine"]]
    results = []
    for side, sizes in (("left", (1, 2)), ("right", (5,))):
        t = make_tokenizer(padding_side=side)
        for bs in sizes:
            results.append(score_options(model, t, prompts, options, batch_size=bs, reuse_prefix=False))
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_reuse_prefix_equals_no_reuse(arch, tok, models, monkeypatch):
    model = models[arch]
    assert len(encode_segments(tok, DEMOS[:1])) > 16 and len(encode_continuation(tok, QUERIES[1])) > 16
    # Matrix prompts share prefixes; the single-segment extras must take the plain path.
    prompts = matrix_prompts() + [[QUERIES[0]], [DEMOS[2], DEMOS[0], QUERIES[2]]]
    calls = []
    real = S._collect_hidden

    def spy(*a, **k):
        calls.append(k.get("prefix") is not None)
        return real(*a, **k)

    monkeypatch.setattr(S, "_collect_hidden", spy)
    for options in (SINGLE, MULTI):
        calls.clear()
        plain = score_options(model, tok, prompts, options, batch_size=1, reuse_prefix=False)
        assert calls == [False]
        calls.clear()
        reused = score_options(model, tok, prompts, options, batch_size=3, reuse_prefix=True)
        # One plain call for the ungrouped prompts, one cached call per demo, no fallback.
        # With multi-token options the lone 3-segment prompt also reuses its prefix
        # across its own options (one request per option).
        extra = 1 if options is MULTI else 0
        assert sorted(calls) == [False] + [True] * (len(DEMOS) + extra), calls
        np.testing.assert_allclose(reused, plain, atol=TOL, rtol=0)


def test_reuse_prefix_window_boundary_gemma3(tok, models):
    """Prefix and suffix each longer than the sliding window, suffix lengths straddling it."""
    model = models["gemma3"]
    assert model.config.sliding_window == 16
    demo = " ".join(DEMOS)
    queries = ["a" * n for n in (1, 15, 16, 17, 40)]
    prompts = [[demo, q] for q in queries]
    a = score_options(model, tok, prompts, MULTI, reuse_prefix=True, batch_size=5)
    b = score_options(model, tok, prompts, MULTI, reuse_prefix=False, batch_size=1)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reuse_prefix_hybrid_gemma3(attn, tok):
    """Real Gemma-3 mixes sliding and full layers (conftest's tiny one is all sliding)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config._attn_implementation == attn
    prompts = matrix_prompts()[:6]
    ref = reference(model, tok, prompts, MULTI)
    for options, want in ((MULTI, ref), (SINGLE, None)):
        a = score_options(model, tok, prompts, options, reuse_prefix=True, batch_size=4)
        b = score_options(model, tok, prompts, options, reuse_prefix=False, batch_size=1)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        if want is not None:
            np.testing.assert_allclose(a, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_kshot_shared_prefix_matches_reference_and_counts_tokens(arch, tok, models):
    """The selection experiment's shape: the same k ordered demonstrations before
    every query. One prefix computed once; log-probs as a plain forward per prompt."""
    model = models[arch]
    demos = [DEMOS[2], DEMOS[0], DEMOS[1]]
    prompts = [demos + [q] for q in QUERIES] + [[QUERIES[0]]]
    P = len(encode_segments(tok, demos))
    n_query = [len(encode_continuation(tok, q)) for q in QUERIES]
    assert P > 3 * 16  # crosses gemma3's sliding window several times
    for options in (SINGLE, MULTI):
        ref = reference(model, tok, prompts, options)
        n_opt = [0] if options is SINGLE else [len(encode_continuation(tok, o)) - 1 for o in options]
        # Harness-style tokens: every (prompt, option) sequence in full; the fast path feeds each prompt once.
        lens = [len(encode_segments(tok, p)) for p in prompts]
        in_prompts = sum(n + m for n in lens for m in n_opt)
        for reuse in (False, True):
            c = S.TokenCount()
            got = score_options(model, tok, prompts, options, batch_size=3, reuse_prefix=reuse, counter=c)
            np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
            assert c.in_prompts == in_prompts
            # Reused: the prefix once, then each query (+ option[:-1]); the zero-shot prompt in full.
            want = P + sum(n + m for n in n_query for m in n_opt) + sum(lens[-1] + m for m in n_opt) \
                if reuse else in_prompts
            assert c.computed == want, (reuse, c)
            assert c.as_dict()["saved"] == in_prompts - want


# --------------------------------------------------------------------------- #
# errors and limits
# --------------------------------------------------------------------------- #


def test_label_word_errors(tok, models):
    model = models["llama"]
    with pytest.raises(LabelWordError, match="''"):
        score_options(model, tok, [[QUERIES[0]]], [" the", ""])
    with pytest.raises(LabelWordError):
        score_options(model, tok, [[QUERIES[0]]], [[" the", ""]])
    t = make_tokenizer()
    t.unk_token = "<eos>"  # pretend <eos> is the unknown token
    assert t.unk_token_id == t.eos_token_id
    with pytest.raises(LabelWordError, match="unknown"):
        score_options(model, t, [[QUERIES[0]]], [" the", "<eos>"])


def test_too_long_prompt_raises(tok, models):
    model = models["llama"]
    prompts = [[QUERIES[0]], DEMOS + [QUERIES[1]]]
    with pytest.raises(ConfigError, match=r"prompt 1 has \d+ tokens"):
        score_options(model, tok, prompts, SINGLE, max_length=40)
    # Default limit comes from the model config (512 positions).
    with pytest.raises(ConfigError, match="prompt 0"):
        score_options(model, tok, [DEMOS * 20], SINGLE)


def test_fit_demonstrations(tok):
    lens = [len(encode_continuation(tok, d)) for d in DEMOS]
    q = QUERIES[0]
    full = len(encode_segments(tok, DEMOS + [q]))
    kept, n = fit_demonstrations(tok, DEMOS, q, max_length=full + 2, reserve=2)
    assert (kept, n) == (DEMOS, 0)
    # One token short -> the first demo goes.
    kept, n = fit_demonstrations(tok, DEMOS, q, max_length=full + 1, reserve=2)
    assert (kept, n) == (DEMOS[1:], 1)
    kept, n = fit_demonstrations(tok, DEMOS, q, max_length=full - lens[0] - lens[1], reserve=0)
    assert (kept, n) == (DEMOS[2:], 2)
    kept, n = fit_demonstrations(tok, DEMOS, q, max_length=full - sum(lens), reserve=0)
    assert (kept, n) == ([], 3)
    with pytest.raises(ConfigError):
        fit_demonstrations(tok, DEMOS, q, max_length=full - sum(lens), reserve=1)


def test_empty_prompts(tok, models):
    out = score_options(models["llama"], tok, [], SINGLE)
    assert out.shape == (0, len(SINGLE)) and out.dtype == np.float64
    assert score_options(models["llama"], tok, [], []).shape == (0, 0)


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #


def test_classify_and_margins():
    scores = np.array([[0.0, -1.0, -2.0], [-3.0, -1.0, -2.0], [-1.0, -0.5, 0.0], [0.0, -2.0, -1.0], [-1, 0, -3]])
    gold = np.array([0, 1, 1, 2, 1])
    res = classify(scores, gold)
    np.testing.assert_array_equal(res["pred"], [0, 1, 2, 0, 1])
    assert res["accuracy"] == pytest.approx(3 / 5)
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp0 fn1 -> 4/5; class 2: tp0 fp1 fn1 -> 0
    assert res["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    np.testing.assert_allclose(margins(scores, gold), [1.0, 1.0, -0.5, -1.0, 1.0])
    # -inf padding (ragged options) never counts as the best other option.
    np.testing.assert_allclose(margins(np.array([[-1.0, -2.0, -np.inf]]), [1]), [-1.0])


def test_extract_number_and_exact_match():
    assert extract_number("She pays 3 + 4 = 7 dollars.\n#### 1,234") == "1234"
    assert extract_number("so the answer is 42.") == "42"
    assert extract_number("it costs 3.50 then 1,000,000 total") == "1000000"
    assert extract_number("#### -5") == "-5"
    assert extract_number("first 12 then #### 7.") == "7"
    assert extract_number("no digits here") is None
    assert exact_match(["1234", "42", None], ["1234", "41", "3"]) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- #
# generation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_greedy_and_stop(arch, tok, models):
    model = models[arch]
    prompts = [[QUERIES[0]], DEMOS + [QUERIES[1]], ["x"]]
    free = generate(model, tok, prompts, max_new_tokens=12, stop=(), batch_size=1)
    assert all(isinstance(s, str) for s in free)
    # Left padding done right: batching does not change greedy outputs.
    assert generate(model, tok, prompts, max_new_tokens=12, stop=(), batch_size=3) == free
    # Pick a stop string the model actually emits mid-output, then check the cut.
    text = max(free, key=len)
    assert len(text) >= 4
    stop = text[2:4]
    got = generate(model, tok, prompts, max_new_tokens=12, stop=(stop,), batch_size=2)
    for g, f in zip(got, free):
        assert stop not in g
        assert g == (f[: f.find(stop)] if stop in f else f)
    assert any(g != f for g, f in zip(got, free))
