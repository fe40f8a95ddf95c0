"""The study design: label-balanced probes and quality, discovery and
confirmation on their own candidates and probes, label turns for every subset
strategy, and accuracies with intervals. Each is checked against an
independent computation (scipy, a hand-written rule, or the design it replaces)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from scipy import stats

from conftest import cfg_for, write_jsonl

from actcache.builder import build
from actcache.correlate import replicate
from actcache.pipeline import EvalConfig
from actcache.quality import QualityMatrix, study_rows
from actcache.study import candidate_quality, push_check

ADJ = ["great", "dull", "fine", "slow", "bright", "long", "sharp", "flat", "warm", "cold", "clever", "tired"]
NOUN = ["movie", "cast", "plot", "score", "story", "ending"]


def _rows(n_pool=36, eval_labels=(0,) * 18 + (1,) * 8):
    """Pool rows with both labels, an eval split with 18 negatives and 8 positives,
    and three eval rows that repeat a pool text (near-duplicates)."""
    rows = [{"id": f"p{i}", "review": f"a {ADJ[i % 12]} {NOUN[i % 6]} {i}", "label": i % 2, "split": "train"}
            for i in range(n_pool)]
    rows += [{"id": f"e{i}", "review": f"the {ADJ[(i * 5) % 12]} {NOUN[(i * 7) % 6]} number {i}", "label": lab,
              "split": "eval"} for i, lab in enumerate(eval_labels)]
    rows += [{"id": f"d{i}", "review": rows[i]["review"].upper() + "!", "label": rows[i]["label"], "split": "eval"}
             for i in range(3)]
    return rows


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("design")
    data = write_jsonl(d / "rows.jsonl", _rows())
    return build(cfg_for(tiny_model_dir["llama"], data, d / "s", layers="0", masks=("label-masked",),
                         components=("mlp",)))


def test_probes_are_label_balanced_in_each_half_by_default(store):
    assert (store.labels[store.eval_rows] == 0).sum() > 2 * (store.labels[store.eval_rows] == 1).sum() - 4
    for seed in range(5):
        r = study_rows(store, EvalConfig(key=store.key, n_candidates=20, n_probes=12, n_eval=6, seed=seed))
        for h in (0, 1):
            _, probes = r.half(h)
            counts = np.bincount(store.labels[probes], minlength=2)
            assert counts[0] == counts[1] == 3, counts


def test_halves_share_no_probe_no_candidate_and_no_near_duplicate(store):
    r = study_rows(store, EvalConfig(key=store.key, n_candidates=30, n_probes=12, n_eval=10))
    dc, dp = r.half(0)
    cc, cp = r.half(1)
    assert len(dc) and len(cc) and len(dp) and len(cp)
    assert not set(dc) & set(cc) and not set(dp) & set(cp)
    dup = store.dups
    assert len(set(dup[r.probes])) == len(r.probes)  # no two probes share a key
    assert not set(dup[r.cands]) & set(dup[r.probes])
    assert not set(dup[dc]) & set(dup[cc])
    assert not set(dup[r.evals]) & set(dup[r.probes]) and not set(r.evals) & set(r.probes)


def _fake(labels):
    return types.SimpleNamespace(labels=np.asarray(labels))


def _matrix(S, cand_half, probe_half, n_cand):
    """A QualityMatrix over store rows 0..N-1 (candidates) and N.. (probes); pairs
    across halves are NaN, as quality_matrix leaves them."""
    M = np.where(cand_half[:, None] == probe_half[None, :], S, np.nan)
    P = S.shape[1]
    return QualityMatrix(np.arange(n_cand), np.arange(n_cand, n_cand + P), (M > 0).astype(float), M,
                         np.zeros(P), np.zeros(P), key="k", path="p", meta={},
                         cand_half=cand_half, probe_half=probe_half)


def test_quality_that_is_pure_label_push_has_no_within_label_signal_by_default():
    rng = np.random.default_rng(0)
    N = 2000
    cl = rng.integers(0, 2, N)
    pl = np.array([0] * 23 + [1] * 17)  # the unbalanced probe mix the old draw gave
    push = rng.gamma(2.0, 1.0, N)  # how hard each demonstration pushes toward its own label
    S = np.where(cl[:, None] == pl[None, :], 1.0, -1.0) * push[:, None] + rng.normal(0, 0.3, (N, len(pl)))
    ch = (np.arange(N) % 2).astype(np.int8)
    ph = np.array([i % 2 for i in range(len(pl))], dtype=np.int8)
    q = _matrix(S, ch, ph, N)
    st = _fake(np.concatenate([cl, pl]))
    cfg = EvalConfig()
    quality = candidate_quality(q, st, cfg)

    def within(x, y):  # the largest |rho| inside one label
        return max(abs(stats.spearmanr(x[cl == g], y[cl == g]).statistic) for g in (0, 1))

    assert abs(within(push, quality)) < 0.05
    assert abs(push_check(q, st, cfg, quality)["rho_within_label"]) < 0.05
    # The old default (mean over an unbalanced probe set) rewards the push itself.
    old = candidate_quality(q, st, EvalConfig(quality_def="mean"))
    assert abs(within(push, old)) > 0.5


def test_a_signal_tracking_the_discovery_probes_does_not_replicate():
    """A signal equal to what the discovery probes reward (no real candidate effect)
    replicates when confirmation reuses those probes, and not on its own probes."""
    rng = np.random.default_rng(1)
    N, P = 400, 40
    cl = rng.integers(0, 2, N)
    pl = np.array([0, 1] * (P // 2))
    ph = np.array([0, 0, 1, 1] * (P // 4), dtype=np.int8)  # each half: both labels equally
    ch = (np.arange(N) % 2).astype(np.int8)
    S = rng.normal(0, 1, (N, P))  # probe-specific affinities only
    disc_p = ph == 0
    signal = S[:, disc_p].mean(1)  # what the discovery probes reward, for every candidate
    sigs = {"tracks-discovery-probes": signal, **{f"noise{i}": rng.normal(size=N) for i in range(15)}}
    lengths = rng.integers(5, 30, N).astype(float)
    halves = (np.flatnonzero(ch == 0), np.flatnonzero(ch == 1))
    st = _fake(np.concatenate([cl, pl]))
    independent = candidate_quality(_matrix(S, ch, ph, N), st, EvalConfig())
    rep = replicate(sigs, independent, cl, lengths, top=5, n_boot=200, seed=0, halves=halves)
    top = {t["name"]: t for t in rep["top"]}
    assert "tracks-discovery-probes" in top and abs(top["tracks-discovery-probes"]["rho_discovery"]) > 0.5
    assert not top["tracks-discovery-probes"]["replicates"]
    # The design it replaces: both halves scored on the discovery probes.
    shared = candidate_quality(_matrix(S, np.zeros(N, dtype=np.int8), np.where(disc_p, 0, 1).astype(np.int8), N),
                               st, EvalConfig())
    old = replicate(sigs, shared, cl, lengths, top=5, n_boot=200, seed=0, halves=halves)
    assert {t["name"]: t for t in old["top"]}["tracks-discovery-probes"]["replicates"]
    assert 0 < rep["mde"] < 1 and rep["n_needed"] > 0


def test_min_detectable_rho_matches_a_simulated_power():
    from actcache.correlate import min_detectable_rho, n_for_rho

    n, alpha = 120, 0.05
    r = min_detectable_rho(n, alpha, 0.8)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        x = rng.normal(size=n)
        y = r * x + np.sqrt(1 - r ** 2) * rng.normal(size=n)  # Pearson r; Spearman slightly below it
        hits += stats.spearmanr(x, y).pvalue < alpha
    assert 0.7 < hits / 400 < 0.9
    assert n_for_rho(r, alpha, 0.8) in (n, n + 1)


def test_gain_is_gone_and_balanced_is_the_default():
    from actcache.errors import ConfigError
    from actcache.pipeline import QUALITY_DEFS

    assert EvalConfig().quality_def == "balanced" and "gain" not in QUALITY_DEFS
    with pytest.raises(ConfigError):
        EvalConfig(quality_def="gain").validate()
    assert len(EvalConfig().seeds) >= 10


def test_labels_take_turns_in_every_subset_strategy(store):
    from actcache.select import select

    lab = {str(store.ids[r]): int(store.labels[r]) for r in store.pool_rows}
    for name in ("random", "k-center", "kmeans"):
        for seed in (0, 1):
            sel = select(store, name, budget=6, seed=seed, turns=True, layer=0) if name != "random" else \
                select(store, name, budget=6, seed=seed, turns=True)
            labels = [lab[i] for i in sel.ids]
            assert labels == [0, 1, 0, 1, 0, 1], (name, labels)
            # within a label, the picks are the strategy's own on that label's rows
            zero = store.with_pool([r for r in store.pool_rows if store.labels[r] == 0])
            own = select(zero, name, budget=3, seed=seed, **({} if name == "random" else {"layer": 0}))
            assert list(sel.ids[0::2]) == list(own.ids)


def test_subset_strategies_never_pick_a_near_duplicate_of_an_eval_input(store):
    from actcache.experiment import choose

    test_ids = [f"d{i}" for i in range(3)] + ["e0"]
    for seed in range(6):
        got = choose(store, "random", k=len(store.pool_rows) - 3, seed=seed, test_ids=test_ids)
        assert not {"p0", "p1", "p2"} & set(got["e0"])


def test_two_way_interval_is_the_item_bootstrap_for_one_seed():
    from actcache.experiment import two_way_interval

    rng = np.random.default_rng(0)
    A = (rng.random((1, 400)) < 0.7).astype(float)
    est, lo, hi = two_way_interval(A)
    p = A.mean()
    se = np.sqrt(p * (1 - p) / A.shape[1])
    assert est == pytest.approx(p) and lo == pytest.approx(p - 1.96 * se, abs=0.012)
    assert hi == pytest.approx(p + 1.96 * se, abs=0.012)
    # seeds that disagree widen the interval
    B = np.vstack([A, 1 - A])
    _, lo2, hi2 = two_way_interval(B)
    assert hi2 - lo2 > hi - lo


def test_selection_rows_carry_intervals_and_balanced_random(store):
    from actcache.experiment import selection_experiment

    cfg = EvalConfig(key=store.key, home=str(store.home), dtype="float32", n_candidates=12, n_probes=8,
                     n_eval=8, k=2, seeds=(0, 1, 2), strategies=("random", "k-center"), compare_fp32=False)
    res = selection_experiment(store, cfg, store.load_model(None))
    names = {s["strategy"] for s in res.summary}
    assert {"random+turns", "k-center+turns", "zero-shot"} <= names and "random" not in names
    both = selection_experiment(store, EvalConfig(**{**cfg.__dict__, "turns": "both", "seeds": (0,)}),
                                store.load_model(None))
    assert {"random", "random+turns", "k-center", "k-center+turns"} <= {s["strategy"] for s in both.summary}
    for r in res.runs:
        n = r["n_eval"]
        z = 1.959963984540054
        p = r["accuracy"]
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert r["ci_lo"] == pytest.approx(centre - half, abs=1e-9) and r["ci_hi"] == pytest.approx(centre + half)
    for s in res.summary:
        assert s["ci_lo"] <= s["mean"] <= s["ci_hi"]
        if s["strategy"] != "random+turns":
            assert s["diff_lo"] <= s["diff_vs_baseline"] <= s["diff_hi"]
        assert s["chosen"]


def test_acc_norm_divides_by_the_choice_length_in_characters_as_lm_eval():
    """lm-eval's process_results: lls / [float(len(c)) for c in doc_to_choice(doc)];
    not the UTF-8 bytes of the scored continuation ' ' + choice."""
    from actcache.data import Example, Task
    from actcache.score import length_normalized

    task = Task(name="mc", kind="multiple_choice", template="{q}", label_words=())
    ex = Example("a", (("q", "x"),), 0, ("ab", "été ou hiver"), None)
    s = np.array([[-2.0, -11.0]])
    got = length_normalized(task, [ex], s)
    np.testing.assert_allclose(got, [[-2.0 / 2, -11.0 / 12]])
    by_bytes = [-2.0 / len(" ab".encode()), -11.0 / len(" été ou hiver".encode())]
    assert np.argmax(got[0]) != np.argmax(by_bytes)  # the rule changes the prediction here
