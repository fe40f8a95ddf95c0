"""Capture cost against a plain forward and a naive loop, measured in the same run.

Per dtype, on the same length-sorted batches of the same model:

  plain                  the base model's forward over every layer, no hooks, no
                         LM head: the floor any capture pays
  naive                  per-example `model(..., output_hidden_states=True)` with
                         the LM head, resid mean pooled in Python (what a
                         researcher writes first)
  actcache_same_outputs  resid mean at every layer, as naive, batched and hooked
  actcache_full          what `actcache build` stores per mask: resid+mlp+attn x
                         every layer x mean+last, plus the 6 statistics per unit
  dense_unit             the dense capture of the one unit an SAE reads (mlp at
                         --sae-layer: mean+last and the 6 statistics), stopping
                         after that layer as the SAE pass does
  sae                    `build --sae`'s pass over the same rows: the forward up
                         to the SAE's layer, encode every token, pool mean+max,
                         L0/FVU/explained, CSR (ratio_vs_dense_unit: its cost
                         against the dense capture of the same unit)

The machine may be shared, so each repeat runs every implementation on a batch
before moving to the next batch (order rotated per batch): a burst of outside
load hits all of them alike. Prints one JSON line per measurement with tokens/s
(median over --repeats), the ratios against plain and naive (of the medians, and
the median of the per-repeat ratios), the hardware (`actcache.models.hardware`)
and each dtype's tokens/s as a fraction of a large torch.mm's peak.

    python benchmarks/bench_build.py --n 64 --repeats 5
    python benchmarks/bench_build.py --impls plain,dense_unit,sae --sae ~/.cache/actcache/sae/<key16>

Without --sae the SAE is a seeded random TopK one (--sae-width, k=32) on mlp_out at
--sae-layer: encoding costs the same whatever its weights.
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


def random_sae(d_in: int, width: int, layer: int, k: int = 32, seed: int = 0):
    """A seeded random TopK SAE on mlp_out: the same encode cost as a trained one."""
    import numpy as np

    from actcache.sae import SAE

    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(d_in, width)) / np.sqrt(d_in)).astype(np.float32)
    return SAE(W_enc=W, b_enc=np.zeros(width, np.float32), W_dec=W.T.copy(), b_dec=np.zeros(d_in, np.float32),
               kind="topk", hook="mlp_out", layer=layer, k=k, key="random-topk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="examples (pool + eval)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--impls", default="plain,naive,actcache_same_outputs,actcache_full,dense_unit,sae")
    ap.add_argument("--sae", default=None, help="an SAE directory (default: a random TopK SAE)")
    ap.add_argument("--sae-layer", type=int, default=9, help="layer of the random SAE (mlp_out)")
    ap.add_argument("--sae-width", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from actcache.builder import BuildConfig, identify
    from actcache.prompts import length_batches, pad_id, plan_rows
    from actcache.capture import Capture, decoder_layers, make_batch
    from actcache.data import DataSpec
    from actcache.models import ModelSpec, hardware
    from actcache.sae import load_sae, sae_pass

    hw = hardware("cpu")
    peaks = {}
    for dt in args.dtypes.split(","):
        peaks[dt] = matmul_tflops(getattr(torch, dt))
        print(json.dumps({"bench": "matmul_peak", "dtype": dt, "tflops": round(peaks[dt], 3), **hw}), flush=True)

    for dt in args.dtypes.split(","):
        cfg = BuildConfig(model=ModelSpec(dtype=dt), data=DataSpec(pool_limit=args.n * 3 // 4, eval_limit=args.n // 4),
                          masks=("isolated",), components=("resid",), poolings=("mean",))
        ds, lm, _, _ = identify(cfg)
        plan = plan_rows(ds, lm.tokenizer, cfg)
        seqs, spans = plan.seqs["isolated"], plan.spans["isolated"]
        base = decoder_layers(lm.model)[0]
        layers = list(range(lm.model.config.num_hidden_layers))
        tokens = sum(len(s) for s in seqs)
        fpt = forward_flops_per_token(lm.model)
        batches = [(rows, make_batch([seqs[i] for i in rows], [spans[i] for i in rows], pad_id(lm.tokenizer)))
                   for rows in length_batches([len(s) for s in seqs], args.batch_size)]
        full = Capture(lm.model, layers, ["resid", "mlp", "attn"], ["mean", "last"], stats=True)
        same = Capture(lm.model, layers, ["resid"], ["mean"], stats=False)
        sae = load_sae(args.sae) if args.sae else random_sae(lm.model.config.hidden_size, args.sae_width,
                                                               min(args.sae_layer, layers[-1]))
        unit = Capture(lm.model, [sae.layer], ["mlp"], ["mean", "last"], stats=True)
        depth = (sae.layer + 1) / len(layers)

        def plain(rows, b):
            with torch.inference_mode():
                base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

        impls = {"plain": plain,
                 "naive": lambda rows, b: naive(lm.model, [seqs[i] for i in rows], [spans[i] for i in rows], layers),
                 "actcache_same_outputs": lambda rows, b: same.run(b),
                 "actcache_full": lambda rows, b: full.run(b),
                 "dense_unit": lambda rows, b: unit.run(b),
                 "sae": lambda rows, b: sae_pass(lm.model, lm.tokenizer, sae, [seqs[i] for i in rows],
                                                 [spans[i] for i in rows], "isolated", len(rows))}
        names = [n for n in args.impls.split(",")]
        for name in names:  # warm-up
            for rows, b in batches:
                impls[name](rows, b)
        per_repeat = {name: [] for name in names}
        for r in range(args.repeats):
            spent = dict.fromkeys(names, 0.0)
            for bi, (rows, b) in enumerate(batches):
                k = (bi + r) % len(names)
                for name in names[k:] + names[:k]:
                    t = time.perf_counter()
                    impls[name](rows, b)
                    spent[name] += time.perf_counter() - t
            for name in names:
                per_repeat[name].append(spent[name])
        med = {name: statistics.median(v) for name, v in per_repeat.items()}

        def ratios(name, base_name):
            if base_name not in med:
                return {}
            paired = statistics.median(b / s for b, s in zip(per_repeat[base_name], per_repeat[name]))
            return {f"ratio_vs_{base_name}": round(med[base_name] / med[name], 3),
                    f"ratio_vs_{base_name}_paired": round(paired, 3)}

        for name in names:
            tps = tokens / med[name]
            print(json.dumps({
                "bench": "build", "impl": name, "dtype": dt, "examples": len(seqs), "tokens": tokens,
                "batches": len(batches), "tokens_per_s": round(tps, 1), "median_s": round(med[name], 3),
                "repeats": args.repeats, **ratios(name, "plain"), **ratios(name, "naive"),
                **(ratios(name, "dense_unit") if name == "sae" else {}),
                **({"sae": {"key": sae.key[:16], "hook": sae.hook, "layer": sae.layer, "d_sae": sae.d_sae,
                            "kind": sae.kind, "k": sae.k}} if name in ("sae", "dense_unit") else {}),
                # dense_unit and sae stop after the SAE's layer: only that share of the layers' work
                "fraction_of_matmul_peak": round(tps * fpt * (depth if name in ("dense_unit", "sae") else 1.0)
                                                 / (peaks[dt] * 1e12), 4),
                "peak_rss_mb": round(peak_rss_mb(), 1), **hw,
            }), flush=True)


if __name__ == "__main__":
    main()
