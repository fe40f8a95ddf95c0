"""Build throughput against a naive baseline, measured in the same run.

Baseline: a per-example loop over `model(..., output_hidden_states=True)` with
the LM head, pooling each layer's hidden states in Python (what a researcher
writes first). actcache: length-sorted batches, hooks that pool and summarise
in the forward, a forward that stops after the last requested layer and never
reaches the LM head.

Prints one JSON line per measurement: tokens/s (median of --repeats), the ratio
against the baseline, peak RSS, and each dtype's tokens/s as a fraction of the
matmul peak of a large torch.mm in that dtype (also measured here).

    python benchmarks/bench_build.py --n 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_tflops(dtype, n=2048, reps=5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def forward_flops_per_token(model) -> float:
    """2 x non-embedding parameters: the matmul work per token of a forward pass."""
    emb = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - emb
    return 2.0 * n


def naive(model, seqs, spans, layers):
    """Per-example loop, full forward with LM head and all hidden states, Python pooling."""
    out = []
    with torch.inference_mode():
        for s, (a, b) in zip(seqs, spans):
            o = model(torch.tensor([s]), output_hidden_states=True)
            hs = o.hidden_states
            out.append([[float(x) for x in hs[L + 1][0, a:b].mean(0)] for L in layers])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="examples (pool + eval)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from actcache.builder import BuildConfig, _batches, _plan, identify
    from actcache.capture import Capture, make_batch
    from actcache.data import DataSpec
    from actcache.models import ModelSpec

    peaks = {}
    for dt in args.dtypes.split(","):
        peaks[dt] = matmul_tflops(getattr(torch, dt))
        print(json.dumps({"bench": "matmul_peak", "dtype": dt, "tflops": round(peaks[dt], 3)}), flush=True)

    for dt in args.dtypes.split(","):
        cfg = BuildConfig(model=ModelSpec(dtype=dt), data=DataSpec(pool_limit=args.n * 3 // 4, eval_limit=args.n // 4),
                          masks=("isolated",), components=("resid",), poolings=("mean",))
        ds, lm, _, _ = identify(cfg)
        plan = _plan(ds, lm.tokenizer, cfg)
        seqs, spans = plan.seqs["isolated"], plan.spans["isolated"]
        n_layers = lm.model.config.num_hidden_layers
        layers = list(range(n_layers))
        tokens = sum(len(s) for s in seqs)
        fpt = forward_flops_per_token(lm.model)

        def capture(components, poolings, stats):
            cap = Capture(lm.model, layers, components, poolings, stats=stats)
            for rows in _batches([len(s) for s in seqs], args.batch_size):
                cap.run(make_batch([seqs[i] for i in rows], [spans[i] for i in rows], lm.tokenizer.pad_token_id))

        def run_actcache():
            capture(["resid", "mlp", "attn"], ["mean", "last"], True)

        def run_same_outputs():
            # The baseline's outputs exactly: resid mean pooling at every layer, no statistics.
            capture(["resid"], ["mean"], False)

        def run_naive():
            naive(lm.model, seqs, spans, layers)

        res = {}
        impls = (("naive", run_naive), ("actcache_same_outputs", run_same_outputs), ("actcache_full", run_actcache))
        for name, fn in impls:
            fn()  # warm-up
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            res[name] = statistics.median(times)
        notes = {"naive": "per-example model(..., output_hidden_states=True) with LM head; resid mean in Python",
                 "actcache_same_outputs": "resid mean at every layer, as the baseline, batched and hooked",
                 "actcache_full": "what `actcache build` stores per mask: resid+mlp+attn x every layer x "
                                  "mean+last, plus 6 statistics per component and layer"}
        for name, _ in impls:
            tps = tokens / res[name]
            print(json.dumps({
                "bench": "build", "impl": name, "dtype": dt, "examples": len(seqs), "tokens": tokens,
                "tokens_per_s": round(tps, 1), "median_s": round(res[name], 3), "repeats": args.repeats,
                "ratio_vs_naive": round(res["naive"] / res[name], 2),
                "fraction_of_matmul_peak": round(tps * fpt / (peaks[dt] * 1e12), 4),
                "peak_rss_mb": round(peak_rss_mb(), 1), "threads": args.threads, "note": notes[name],
            }), flush=True)


if __name__ == "__main__":
    main()
