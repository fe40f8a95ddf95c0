"""Quality-matrix scoring speed against a naive baseline, measured in the same run.

Baseline (as OpenICL's perplexity inferencer): one full forward pass per prompt
*and per label*, through the full-vocabulary LM head at every position, then the
label's log-probability. actcache: right-padded length-sorted batches, the
candidate's demonstration computed once as a KV prefix for all probes, and
single-token labels scored from the final hidden state and the label rows of
the output embedding only (plus one logsumexp at that position).

Prints one JSON line per measurement (prompts/s, median of --repeats, ratio vs
the naive baseline, and for bf16 how many predictions flip against fp32).

    python benchmarks/bench_evaluate.py --task sst2 --candidates 4 --probes 16
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
    from actcache.score import encode_continuation, encode_segments

    out = np.empty((len(prompts), len(words)))
    with torch.inference_mode():
        for i, segs in enumerate(prompts):
            ctx = encode_segments(tok, segs)
            for j, w in enumerate(words):
                cont = encode_continuation(tok, w)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                out[i, j] = sum(float(logp[len(ctx) - 1 + t, c]) for t, c in enumerate(cont))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    from actcache.data import DataSpec, load, prompt_segments
    from actcache.models import ModelSpec, load_model, set_threads
    from actcache.score import score_options
    from actcache.store import default_home

    threads = set_threads()
    ds = load(DataSpec(task=args.task, pool_limit=args.candidates, eval_limit=args.probes, seed=0),
              cache_dir=default_home() / "data")
    task = ds.task
    prompts = [prompt_segments(task, [c], p) for c in ds.pool for p in ds.eval]
    words = list(task.label_words)
    preds = {}
    for dt in args.dtypes.split(","):
        lm = load_model(ModelSpec(dtype=dt), default_home())
        fns = {
            "naive": lambda: naive_scores(lm.model, lm.tokenizer, prompts, words),
            "actcache": lambda: score_options(lm.model, lm.tokenizer, prompts, words, batch_size=args.batch_size),
        }
        times, scores = {}, {}
        for name in ("naive", "actcache"):
            scores[name] = fns[name]()  # warm-up, and the values to compare
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fns[name]()
                ts.append(time.perf_counter() - t)
            times[name] = statistics.median(ts)
        preds[dt] = scores["actcache"].argmax(1)
        for name in ("naive", "actcache"):
            line = {"bench": "quality_matrix", "impl": name, "dtype": dt, "task": args.task,
                    "prompts": len(prompts), "labels": len(words),
                    "prompts_per_s": round(len(prompts) / times[name], 2), "median_s": round(times[name], 3),
                    "repeats": args.repeats, "ratio_vs_naive": round(times["naive"] / times[name], 2),
                    "threads": threads}
            if name == "actcache":
                line["max_abs_diff_vs_naive"] = float(np.abs(scores["actcache"] - scores["naive"]).max())
            print(json.dumps(line), flush=True)
    if "float32" in preds and len(preds) > 1:
        for dt, p in preds.items():
            if dt != "float32":
                print(json.dumps({"bench": "prediction_flips", "dtype": dt, "vs": "float32",
                                  "flipped": int((p != preds["float32"]).sum()), "n": len(p)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
