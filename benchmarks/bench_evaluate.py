"""Scoring speed of `actcache evaluate`, each against its baseline in the same run.

quality_matrix: 1-shot matrix scoring against a naive baseline.

Baseline (as OpenICL's perplexity inferencer): one full forward pass per prompt
*and per label*, through the full-vocabulary LM head at every position, then the
label's log-probability. actcache: right-padded length-sorted batches, the
candidate's demonstration computed once as a KV prefix for all probes, and
single-token labels scored from the final hidden state and the label rows of
the output embedding only (plus one logsumexp at that position).

selection: the selection experiment's k-shot prompts for a shared-subset
strategy (k random pool demonstrations in one seeded order per seed, as
`experiment.demo_order` makes them, before every eval input), scored with the
demonstrations' KV prefix computed once per seed (`reuse_prefix=True`) against
the same prompts scored in full (`reuse_prefix=False`).

Prints one JSON line per measurement (prompts/s or tokens/s, median of
--repeats, ratio vs the baseline, tokens computed vs in the prompts, and for
bf16 how many predictions flip against fp32). Every line carries the dtype and
`actcache.models.hardware("cpu")` (ISA, AMX, threads...).

    python benchmarks/bench_evaluate.py --task sst2 --candidates 4 --probes 16
    python benchmarks/bench_evaluate.py --bench selection --eval 40 --k 4 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch


def naive_scores(model, tok, prompts, words) -> np.ndarray:
    """(n, c) log p(word | prompt): one full forward per prompt per word."""
    from actcache.prompts import option_ids, prompt_ids

    out = np.empty((len(prompts), len(words)))
    conts = [option_ids(tok, w) for w in words]
    with torch.inference_mode():
        for i, ctx in enumerate(prompt_ids(tok, prompts)):
            for j, cont in enumerate(conts):
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                out[i, j] = sum(float(logp[len(ctx) - 1 + t, c]) for t, c in enumerate(cont))
    return out


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """({name: first result}, {name: median seconds of `repeats` further calls}).

    The implementations alternate within each repeat, so load from other
    processes on a shared machine falls on all of them alike.
    """
    out = {name: fn() for name, fn in fns.items()}  # warm-up, and the values to compare
    ts: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return out, {name: statistics.median(v) for name, v in ts.items()}


def selection_prompts(task, pool, evals, k: int, seeds) -> list[list[str]]:
    """Per seed, k random pool demonstrations in one seeded order, then each eval input."""
    import random

    from actcache.prompts import prompt_segments
    from actcache.experiment import demo_order

    by_id = {e.id: e for e in pool}
    eval_ids = [e.id for e in evals]
    prompts = []
    for seed in seeds:
        ids = random.Random(seed).sample(sorted(by_id), k)
        order = demo_order({t: ids for t in eval_ids}, eval_ids, seed, shared=True)
        prompts += [prompt_segments(task, [by_id[i] for i in o], q) for o, q in zip(order, evals)]
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--bench", default="quality_matrix,selection", help="comma list: quality_matrix, selection")
    ap.add_argument("--eval", type=int, default=40, help="selection: eval inputs per seed")
    ap.add_argument("--pool", type=int, default=200, help="selection: pool to draw demonstrations from")
    ap.add_argument("--k", type=int, default=4, help="selection: demonstrations per prompt")
    ap.add_argument("--seeds", default="0,1", help="selection: one shared subset and order per seed")
    args = ap.parse_args()

    from actcache.data import DataSpec, load
    from actcache.prompts import prompt_segments
    from actcache.models import ModelSpec, hardware, load_model, set_threads
    from actcache.score import TokenCount, score_options
    from actcache.store import default_home

    set_threads()
    hw = hardware("cpu")
    benches = args.bench.split(",")

    def emit(line: dict) -> None:
        print(json.dumps({**line, **hw}), flush=True)

    ds = load(DataSpec(task=args.task, pool_limit=args.candidates, eval_limit=args.probes, seed=0),
              cache_dir=default_home() / "data")
    task = ds.task
    prompts = [prompt_segments(task, [c], p) for c in ds.pool for p in ds.eval]
    words = list(task.label_words)
    if "selection" in benches:
        sel = load(DataSpec(task=args.task, pool_limit=args.pool, eval_limit=args.eval, seed=0),
                   cache_dir=default_home() / "data")
        seeds = [int(s) for s in args.seeds.split(",")]
        sel_prompts = selection_prompts(task, sel.pool, sel.eval, args.k, seeds)
    preds = {}
    for dt in args.dtypes.split(","):
        lm = load_model(ModelSpec(dtype=dt), default_home())
        if "quality_matrix" in benches:
            fns = {
                "naive": lambda: naive_scores(lm.model, lm.tokenizer, prompts, words),
                "actcache": lambda: score_options(lm.model, lm.tokenizer, prompts, words,
                                                  batch_size=args.batch_size),
            }
            scores, times = timed(fns, args.repeats)
            preds[dt] = scores["actcache"].argmax(1)
            for name in ("naive", "actcache"):
                line = {"bench": "quality_matrix", "impl": name, "dtype": dt, "task": args.task,
                        "prompts": len(prompts), "labels": len(words),
                        "prompts_per_s": round(len(prompts) / times[name], 2), "median_s": round(times[name], 3),
                        "repeats": args.repeats, "ratio_vs_naive": round(times["naive"] / times[name], 2)}
                if name == "actcache":
                    line["max_abs_diff_vs_naive"] = float(np.abs(scores["actcache"] - scores["naive"]).max())
                emit(line)
        if "selection" in benches:
            counters = {False: TokenCount(), True: TokenCount()}
            scores, times = timed({reuse: (lambda reuse=reuse: score_options(
                lm.model, lm.tokenizer, sel_prompts, words, batch_size=args.batch_size, reuse_prefix=reuse,
                counter=counters[reuse])) for reuse in (False, True)}, args.repeats)
            calls = args.repeats + 1  # identical calls, warm-up included
            counts = {r: TokenCount(c.computed // calls, c.in_prompts // calls) for r, c in counters.items()}
            for reuse in (False, True):
                t = counts[reuse]
                line = {"bench": "selection", "impl": "prefix_reuse" if reuse else "full_prompts", "dtype": dt,
                        "task": args.task, "prompts": len(sel_prompts), "k": args.k, "seeds": len(seeds),
                        "tokens_computed": t.computed, "tokens_in_prompts": t.in_prompts,
                        "prompt_tokens_per_s": round(t.in_prompts / times[reuse], 1),
                        "computed_tokens_per_s": round(t.computed / times[reuse], 1),
                        "median_s": round(times[reuse], 3), "repeats": args.repeats,
                        "ratio_vs_full": round(times[False] / times[reuse], 2)}
                if reuse:
                    line["max_abs_diff_vs_full"] = float(np.abs(scores[True] - scores[False]).max())
                emit(line)
    if "float32" in preds and len(preds) > 1:
        for dt, p in preds.items():
            if dt != "float32":
                emit({"bench": "prediction_flips", "dtype": dt, "vs": "float32",
                      "flipped": int((p != preds["float32"]).sum()), "n": len(p)})


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
