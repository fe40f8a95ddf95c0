"""The selection experiment: k-shot accuracy of each demonstration-selection
strategy (and zero-shot) on eval inputs disjoint from the study's probes, over
seeds; retrieved demonstrations ordered as KATE does by default."""

from __future__ import annotations

import json
import random

from pathlib import Path
from typing import Callable

import numpy as np

from .capture import resolve_layers
from .config import EvalConfig, SelectionResult, StudyResult
from .data import Example
from .errors import ConfigError, DatasetError, MismatchError, ModelError
from .harness import sample_fields
from .prompts import fit_demonstrations, prompt_segments
from .quality import study_rows
from .score import TokenCount, classify, extract_number, generate, length_normalized, score_prompts
from .select import STRATEGIES, retrieve_within, select, votek_vectors
from .store import Store
from .study import Signal

Progress = Callable[[str, int, int], None]

def _knn_layers(store: Store, spec: str) -> list[int]:
    layers = store.layers
    if spec == "auto":
        return sorted({layers[0], layers[len(layers) // 2], layers[-1]})

    return [layers[i] if i < len(layers) else i for i in resolve_layers(spec, len(layers))]

def _best_stat(study: StudyResult | None) -> dict:
    """The statistic the `stat` strategy ranks by: the best of the discovery half
    (controlled for label and length, see correlate.replicate), with its sign.
    Chosen from the quality matrix's candidates only, never from eval inputs."""
    top = ((study.replication if study else None) or {}).get("top")
    if not top:
        return {"stat": "kurt", "component": "mlp", "layer": None, "mask": "isolated", "order": "high"}
    best = top[0]
    s = Signal.parse(best["name"])
    return {"stat": s.stat, "component": s.component, "layer": s.layer, "mask": s.mask,
            "order": "high" if best["rho_discovery"] >= 0 else "low"}

def _best_sae_feature(study: StudyResult | None) -> dict | None:
    """The SAE feature the `sae-feature` strategy ranks by: the best feature of
    the SAE study's discovery half (its per-example statistics are skipped), with
    its sign; when no discovery ranking exists (too few candidates) the study's
    best feature on all candidates. None without SAE features."""
    sae = (study.sae if study else None) or {}
    top = [(s, t["rho_discovery"]) for t in (sae.get("replication") or {}).get("top", [])
           if (s := Signal.parse(t["name"])).is_sae_feature]
    top += [(Signal.parse(f["name"]), f["rho_len"]) for f in sae.get("features", [])]
    if not top:
        return None
    s, rho = top[0]
    return {"sae": s.sae, "mask": s.mask, "pooling": s.pooling, "feature": s.feature,
            "order": "high" if rho >= 0 else "low"}

def load_demos(path: str, store: Store) -> dict:
    """Demonstration ids per test id from an `actcache query` JSONL (neighbours
    best first) or a `--strategy knn` selection file."""
    per = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"cannot read demonstrations file {path}: {e.strerror}") from None
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("build_key") and rec["build_key"] != store.key:
            raise MismatchError(f"{path} was made from build {rec['build_key'][:12]}, not {store.key[:12]}; "
                                f"rerun `actcache query` on this build")
        ids = [n["id"] for n in rec["neighbors"]] if "neighbors" in rec else list(rec.get("ids", []))
        per[str(rec["test_id"])] = ids
    if not per:
        raise DatasetError(f"{path} holds no records; make it with `actcache query`")
    return per


def _kind(name: str) -> str:
    """A strategy's kind (`select.STRATEGIES`); "per-input" for a file of demonstrations."""
    if name == "file":
        return "per-input"
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[name].kind


def per_input(name: str) -> bool:
    """Whether each eval input gets its own demonstrations (retrieval, or retrieval
    from an annotation set); else one subset of k is shared by all inputs."""
    return _kind(name) in ("per-input", "annotation")

def demo_order(chosen: dict, test_ids: list[str], seed: int, shared: bool, order: str = "shuffle"
               ) -> list[list[str]]:
    """Demonstration order in the prompt: one list of pool ids per test id.

    A shared subset is shuffled once (seeded), so every input's prompt starts
    with the same ordered demonstrations: one prefix whose KV cache
    score_options computes once for all inputs. Per-input demonstrations come
    best first from retrieval and are laid out by `order`: "similar-last" (KATE:
    the most similar nearest the query), "similar-first", or "shuffle" (seeded).
    """
    r = random.Random(seed)
    if shared and test_ids:
        ids = list(chosen[test_ids[0]])
        if any(list(chosen[t]) != ids for t in test_ids):
            raise ConfigError("a shared-subset strategy gave the eval inputs different demonstrations")
        r.shuffle(ids)
        return [ids] * len(test_ids)
    out = []
    for tid in test_ids:
        ids = list(chosen[tid])
        if order == "similar-last":
            ids.reverse()
        elif order == "shuffle":
            r.shuffle(ids)
        out.append(ids)
    return out

BASELINE = "random+turns"  # the balanced random baseline of every paired difference
N_BOOT = 2000  # resamples of the two-way bootstrap (eval inputs x seeds)

def choose(store: Store, name: str, k: int, seed: int, test_ids: list[str], turns: bool = False, lm=None,
           memo: dict | None = None, **opts) -> dict:
    """Demonstration ids per test input: retrieval strategies give each input its
    own k; subset strategies pick a budget of k used for every input, from the
    pool less the near-duplicates of every eval input, with labels taking turns
    when `turns` (select._in_turns); vote-k and vote-k-lm select an annotation
    set of `votek_budget` from which each input retrieves its k most similar.
    `lm`: the loaded model, for vote-k's confidence stage (None: vote-k loads the
    build's). `memo`: a dict shared across seeds, in which vote-k keeps its
    annotation set when no seed can change it."""
    if _kind(name) == "per-input":
        per = select(store, name, k=k, seed=seed, **opts).per_query
        missing = [t for t in test_ids if t not in per]
        if missing:
            raise MismatchError(f"{name} returned no neighbours for {len(missing)} eval inputs")
        return {t: per[t] for t in test_ids}
    if name == "vote-k":
        # As published (Su et al. 2022): the annotation set, then each input retrieves its k
        # most similar examples from it by the same sentence embeddings.
        budget = min(opts.pop("votek_budget", 100), len(store.pool_rows))
        key = (name, budget, tuple(sorted(opts.items())))
        ann = memo.get(key) if memo is not None else None
        if ann is None:
            sel = select(store, name, budget=budget, seed=seed, lm=lm, **opts)
            ann = list(sel.ids)
            if memo is not None and not sel.params["random_fill"]:
                memo[key] = ann  # the seed only draws a random fill, and none was needed
        return retrieve_within(store, ann, test_ids, k, vectors=votek_vectors(store))
    if opts.get("layer") is None:
        opts.pop("layer", None)
    if name == "vote-k-lm":
        # Vote-k's graph stage (degree 10) on the LM activations selects an annotation
        # set; each input then retrieves its k most similar examples from that set.
        budget = min(opts.pop("votek_budget", 100), len(store.pool_rows))
        ann = list(select(store, name, budget=budget, seed=seed, k=min(10, len(store.pool_rows) - 1), **opts).ids)
        return retrieve_within(store, ann, test_ids, k, **opts)
    row = {str(i): r for r, i in enumerate(store.ids)}
    near = set(store.dups[[row[t] for t in test_ids]])
    view = store.with_pool([r for r in store.pool_rows if store.dups[r] not in near])
    if len(view.pool_rows) < k:
        raise DatasetError(f"only {len(view.pool_rows)} pool rows are not near-duplicates of an eval input; "
                           f"rebuild with a larger --limit")
    ids = list(select(view, name, budget=k, seed=seed, turns=turns, **opts).ids)
    return {t: ids for t in test_ids}

def _jobs(store: Store, cfg: EvalConfig, study: StudyResult | None) -> tuple[list, list, dict]:
    """(jobs: (label, seed, options), skipped: (label, reason), chosen: label ->
    how its options were chosen). Every option is fixed in advance or chosen on
    the study's discovery half; none is chosen on the eval inputs."""
    jobs: list[tuple[str, int, dict]] = [("zero-shot", 0, {})]
    skipped: list[tuple[str, str]] = []
    chosen: dict[str, str] = {"zero-shot": "no demonstrations"}
    modes = {"on": (True,), "off": (False,), "both": (False, True)}[cfg.turns]
    turn_rule = "labels take turns (fixed rule for every subset strategy, set before any data)"

    def subset(base: str, opts: dict, how: str, ways=modes):
        for t in ways:
            label = base + ("+turns" if t else "")
            chosen[label] = how + ("; " + turn_rule if t else "; ranked/drawn without label turns")
            jobs.extend((label, s, {**opts, "turns": t}) for s in cfg.seeds)

    for name in cfg.strategies:
        if name.startswith("sae-") and not store.sae_groups:
            skipped.append((name, f"build {store.key[:12]} holds no SAE features (add them with "
                                  f"`actcache build ... --sae DIR`)"))
        elif name == "random":  # the balanced baseline runs whatever --turns says
            subset("random", {"strategy": "random"}, "uniform draw (seeded)",
                   ways=modes if True in modes else modes + (True,))
        elif name == "sae-feature":
            b = _best_sae_feature(study)
            if b is None:
                skipped.append((name, "the SAE study found no feature active in enough candidates "
                                      "(lower --sae-min-active)"))
                continue
            subset(f"sae-feature:f{b['feature']}/{b['pooling']}/{b['mask']}:{b['order']}", {"strategy": name, **b},
                   "feature and sign: the SAE study's discovery-half best (label + log length controlled)")
        elif name == "stat":
            b = _best_stat(study)
            subset(f"stat:{b['stat']}@{b['component']}/L{b['layer']}/{b['mask']}:{b['order']}",
                   {"strategy": "stat", **b}, "statistic and sign: the study's discovery-half best "
                                              "(label + log length controlled)")
        elif name in ("k-center", "kmeans"):
            subset(name, {"strategy": name}, "the build's default array (mlp, last layer, label-masked); seeded")
        elif name == "knn":
            for L in _knn_layers(store, cfg.knn_layers):
                chosen[f"knn@L{L}"] = (f"layer {L} of --knn-layers {cfg.knn_layers} (first/middle/last: fixed); "
                                       f"order {cfg.knn_order} (fixed)")
                jobs += [(f"knn@L{L}", s, {"strategy": "knn", "layer": L}) for s in cfg.seeds]
        elif name in ("vote-k", "vote-k-lm"):
            chosen[name] = f"annotation set {cfg.votek_budget} (fixed), then per-input retrieval"
            jobs += [(name, s, {"strategy": name, "votek_budget": cfg.votek_budget}) for s in cfg.seeds]
        elif _kind(name) == "subset":
            subset(name, {"strategy": name}, "the strategy's defaults (fixed)")
        else:
            chosen[name] = "the strategy's defaults (fixed)"
            jobs += [(name, s, {"strategy": name}) for s in cfg.seeds]
    return jobs, skipped, chosen

def wilson(hits: float, n: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(round(hits)), n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)

def two_way_interval(A: np.ndarray, B: np.ndarray | None = None, n_boot: int = N_BOOT, seed: int = 0,
                     ) -> tuple[float, float, float]:
    """(estimate, 2.5 %, 97.5 %) of mean(A) - mean(B) (mean(A) when B is None) by a
    two-way bootstrap: eval inputs are resampled once per replicate and shared by A
    and B (the comparison is paired on inputs), and each strategy's seeds (rows)
    are resampled on their own. A, B: (seeds, inputs) 0/1 correctness; a strategy
    whose prompts do not change with the seed has one row."""
    rng = np.random.default_rng(seed)
    n = A.shape[1]
    items = rng.integers(0, n, size=(n_boot, n))
    est = float(A.mean() - (B.mean() if B is not None else 0.0))

    def boot(M):
        rows = rng.integers(0, M.shape[0], size=(n_boot, M.shape[0]))
        per_item = M[rows]  # (n_boot, seeds, n)
        return np.take_along_axis(per_item.mean(1), items, axis=1).mean(1)

    vals = boot(A) - (boot(B) if B is not None else 0.0)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return est, float(lo), float(hi)

def _summary(results: list[dict], correct: dict[str, list], seed: int, mc: bool, chosen: dict) -> list[dict]:
    """One row per strategy: mean accuracy with its 95 % interval over eval inputs
    and seeds, the std over seeds (ddof 1; nan when the prompts never change with
    the seed), the paired difference from balanced random with its interval, and
    how its options were chosen (`chosen`)."""
    table: dict[str, list[dict]] = {}
    for r in results:
        if "skipped" not in r:  # skipped strategies are listed with their reason, not as a nan row
            table.setdefault(r["strategy"], []).append(r)
    base = np.array(correct[BASELINE]) if BASELINE in correct else None
    out = []
    for name, rs in table.items():
        A = np.array(correct[name], dtype=np.float64)
        est, lo, hi = two_way_interval(A, seed=seed)
        acc = [r["accuracy"] for r in rs]
        row = {"strategy": name, "mean": est, "ci_lo": lo, "ci_hi": hi,
               "std": float(np.std(acc, ddof=1)) if len(A) > 1 else float("nan"),
               "n_seeds": len(rs), "n_distinct": len(A), "n_eval": int(A.shape[1]), "chosen": chosen.get(name, "")}
        if mc:
            row["acc_norm"] = float(np.nanmean([r.get("acc_norm", float("nan")) for r in rs]))
        if base is not None and name not in (BASELINE,):
            d, dlo, dhi = two_way_interval(A, base, seed=seed)
            row.update(diff_vs_baseline=d, diff_lo=dlo, diff_hi=dhi)
        out.append(row)
    return out

def _file_demos(store: Store, path: str, evals: list[Example]) -> tuple[dict, list[Example]]:
    """(demonstration ids per test id from `path`, the eval inputs to score): the
    sampled inputs, or the file's own when it does not cover them."""
    per = load_demos(path, store)
    if all(e.id in per for e in evals):
        return per, evals
    evals = [e for e in store.examples(store.eval_rows) if e.id in per]
    if not evals:
        raise DatasetError(f"{path} names none of build {store.key[:12]}'s eval ids; "
                           f"make it with `actcache query {store.key[:12]}`")
    return per, evals

def _exact_matches(lm, task, prompts, evals: list[Example], batch_size: int) -> tuple[np.ndarray, list[str]]:
    """((n,) 0/1: the greedy answer's final number equals the gold one, the generated texts) (generative tasks)."""
    outs = generate(lm.model, lm.tokenizer, prompts, stop=(task.stop,), max_new_tokens=256,
                    batch_size=max(1, batch_size // 4))
    return np.array([extract_number(o) is not None and extract_number(o) == extract_number(e.answer)
                     for o, e in zip(outs, evals)], dtype=np.float64), list(outs)

def _run_row(label: str, seed: int, m: dict, reused: bool) -> dict:
    """One row of `SelectionResult.runs`: accuracy with its Wilson interval over the eval inputs."""
    lo, hi = wilson(m["correct"].sum(), len(m["correct"]))
    return {"strategy": label, "seed": seed, "accuracy": m["accuracy"], "ci_lo": lo, "ci_hi": hi,
            "n_eval": len(m["correct"]), "macro_f1": m["macro_f1"], "acc_norm": m.get("acc_norm", float("nan")),
            "tokens_computed": 0 if reused else m["tokens"].computed, "tokens_in_prompts": m["tokens"].in_prompts,
            "same_prompts_as_earlier_seed": reused}

def _items(task, evals: list[Example], demos: list[list[Example]], m: dict, gold: np.ndarray) -> list[dict]:
    """Per-item records of one run, like lm-evaluation-harness's --log_samples: actcache's
    fields (id, demo_ids, logprobs, pred, gold) and the harness's (see harness.sample_fields)."""
    out = []
    for i, (e, d) in enumerate(zip(evals, demos)):
        rec = {"id": e.id, "demo_ids": [x.id for x in d],
               **({"logprobs": m["scores"][i].tolist()} if m.get("scores") is not None else {}),
               "pred": int(m["pred"][i]) if len(m["pred"]) else None, "gold": int(gold[i])}
        context = "".join(m["prompts"][i])
        if task.kind == "generation":
            rec.update(sample_fields(i, dict(e.fields), e.answer, context, None, None,
                                     {"exact_match": float(m["correct"][i])}, m["generated"][i], (task.stop,)))
        else:
            opts = task.options(e)
            metrics = {"acc": float(m["correct"][i])}
            if task.kind == "multiple_choice":
                metrics["acc_norm"] = float(m["norm_pred"][i] == gold[i])
            rec.update(sample_fields(i, dict(e.fields), int(gold[i]), context, opts,
                                     m["scores"][i][:len(opts)], metrics))
        out.append(rec)
    return out

def _fp32_flips(store: Store, cfg: EvalConfig, lm, task, evals, gold, zs_pred, tokens) -> dict | None:
    """The zero-shot predictions made again in float32 when scoring ran in another
    dtype: how many flip (None for float32 runs and generative tasks)."""
    if not cfg.compare_fp32 or lm.provenance["dtype"] == "float32" or task.kind == "generation":
        return None
    lm32 = store.load_model("float32", cfg.device)
    m32 = classify(score_prompts(lm32, task, [prompt_segments(task, [], q) for q in evals], evals, cfg.batch_size,
                                 counter=tokens), gold)
    return {"n": len(evals), "flipped": int((m32["pred"] != zs_pred).sum()), "acc_fp32": m32["accuracy"],
            "dtype": lm.provenance["dtype"]}

def selection_experiment(store: Store, cfg: EvalConfig, lm, study: StudyResult | None = None,
                         progress: Progress | None = None) -> SelectionResult:
    """k-shot accuracy on eval inputs for zero-shot and each strategy, over seeds
    (see `SelectionResult`), with 95 % intervals over eval inputs and seeds and
    each strategy's paired difference from balanced random. The `stat` and
    `sae-feature` strategies rank by the study's discovery best.

    Subset strategies use one seeded demonstration order for all eval inputs, so
    their prompts share a prefix that is computed once per run (see demo_order);
    a strategy whose prompts repeat across seeds is scored once.
    """
    task = store.task()
    eval_rows = study_rows(store, cfg).evals  # never a probe, nor a probe's near-duplicate
    if len(eval_rows) == 0:
        raise DatasetError(f"the build's {len(store.eval_rows)} eval rows are all quality-matrix probes; "
                           f"rebuild with a larger --eval-limit or lower --n-probes")
    evals = store.examples(eval_rows)
    eval_ids = [e.id for e in evals]
    pool_by_id = {store.ids[r]: ex for r, ex in zip(store.pool_rows, store.examples(store.pool_rows))}
    gold = np.array([e.label for e in evals])

    dropped: dict[str, int] = {}
    tokens = TokenCount()

    def fit(label: str, segs: list[str]) -> list[str]:
        # Never truncate silently: drop whole demonstrations from the front and count them.
        kept, n = fit_demonstrations(lm.tokenizer, segs[:-1], segs[-1], cfg.max_length, reserve=64)
        if n:
            dropped[label] = dropped.get(label, 0) + n
        return kept + [segs[-1]]

    def run(demos_per_query: list[list[Example]], label: str = "") -> dict:
        prompts = [fit(label, prompt_segments(task, d, q)) for d, q in zip(demos_per_query, evals)]
        count = TokenCount()
        if task.kind == "generation":
            hit, outs = _exact_matches(lm, task, prompts, evals, cfg.batch_size)
            return {"accuracy": float(hit.mean()), "macro_f1": float("nan"), "pred": [], "tokens": count,
                    "correct": hit, "prompts": prompts, "generated": outs}
        s = score_prompts(lm, task, prompts, evals, cfg.batch_size, counter=count)
        tokens.add(count)
        m = classify(s, gold)
        # Multiple choice: acc (summed log-probs) and acc_norm (lm-eval's: by the choice's length in characters).
        nm = classify(length_normalized(task, evals, s), gold) if task.kind == "multiple_choice" else None
        return {**m, "acc_norm": nm["accuracy"] if nm else float("nan"), "tokens": count, "scores": s,
                "correct": (np.asarray(m["pred"]) == gold).astype(np.float64), "prompts": prompts,
                "norm_pred": nm["pred"] if nm else None}

    jobs, skipped, chosen = _jobs(store, cfg, study)
    per = None
    if cfg.demos:
        per, evals = _file_demos(store, cfg.demos, evals)
        eval_ids, gold = [e.id for e in evals], np.array([e.label for e in evals])
        label = f"file:{Path(cfg.demos).name}"
        chosen[label] = "demonstrations from the given file"
        jobs += [(label, s, {"strategy": "file"}) for s in cfg.seeds]
    results = [{"strategy": n, "seed": s, "accuracy": float("nan"), "macro_f1": float("nan"), "skipped": why}
               for n, why in skipped for s in cfg.seeds]
    samples: list[dict] = []  # per-item records, like lm-evaluation-harness's --log_samples
    done: dict = {}
    correct: dict[str, list] = {}  # strategy -> one (n_eval,) 0/1 row per distinct prompt set
    memo: dict = {}  # vote-k's annotation set, selected once for every seed
    zs_pred = None
    for j, (label, seed, opts) in enumerate(jobs):
        if progress:
            progress("selection", j, len(jobs))
        if label == "zero-shot":
            demos = [[] for _ in evals]
        else:
            opts = dict(opts)
            name = opts.pop("strategy")
            try:
                chosen_ids = per if name == "file" else choose(store, name, k=cfg.k, seed=seed,
                                                               test_ids=eval_ids, lm=lm, memo=memo, **opts)
            except ModelError as e:  # an optional baseline whose package is absent
                results.append({"strategy": label, "seed": seed, "accuracy": float("nan"),
                                "macro_f1": float("nan"), "skipped": str(e)})
                continue
            order = demo_order(chosen_ids, eval_ids, seed, shared=not per_input(name), order=cfg.knn_order)
            demos = [[pool_by_id[i] for i in ids] for ids in order]
        key = (label, tuple(tuple(e.id for e in d) for d in demos))
        reused = key in done  # a deterministic strategy gives every seed the same prompts: score them once
        m = done[key] if reused else run(demos, label)
        done[key] = m
        if not reused:
            correct.setdefault(label, []).append(m["correct"])
        if label == "zero-shot":
            zs_pred = np.asarray(m["pred"])
        results.append(_run_row(label, seed, m, reused))
        samples.append({"strategy": label, "seed": seed, "items": _items(task, evals, demos, m, gold)})
    if progress:
        progress("selection", len(jobs), len(jobs))
    flips = _fp32_flips(store, cfg, lm, task, evals, gold, zs_pred, tokens)
    summary = _summary(results, correct, cfg.seed, task.kind == "multiple_choice", chosen)
    return SelectionResult(runs=results, summary=summary, eval_ids=eval_ids, flips=flips, k=cfg.k,
                           dropped_demonstrations=dropped, max_length=cfg.max_length, tokens=tokens.as_dict(),
                           samples=samples, baseline=BASELINE)
