"""Capture throughput of a paper-sized model against the device's measured matmul peak.

Parts (--parts, comma-separated, run in this order):

  peak     the device's matmul peak in --dtype, measured now: repeated
           --peak-n x --peak-n matmuls (8192 on CUDA), timed between
           synchronisations
  forward  the base model's plain forward (no hooks, no LM head) over the same
           length-sorted batches the build runs: the floor any capture pays
  ray      `--engine ray` against a local build with the same resources (one
           actor with every core; the engine's overhead, goal <= 15 %), and
           rows/s at 1 and 2 one-core workers (a local Ray instance)
  capture  `actcache build` over --n synthetic rows: every layer, the mlp
           component, mean pooling and the 6 statistics, isolated mask; timed
           from the first forward batch to the last (model set-up and the HDF5
           write are reported apart). Run after `forward` it finds every batch
           shape's kernels warm, as a long build does after its first batches;
           on CUDA a small build of other rows runs first

The model is `--model-config`'s architecture with random weights (`actcache
build --model-config`): llama-3.2-3b, qwen2.5-3b, a config.json path, or
"tiny" (2 layers, hidden 64: a CPU smoke run). Random weights cost the same
FLOPs as trained ones. Each forward or capture line carries
share_of_peak = 2 x matmul parameters x tokens/s / the measured peak, where
matmul parameters are the decoder layers' (the embedding is a lookup and the
LM head never runs); attention's T^2 work is not counted, so the share is a
lower bound. share_of_peak_all_params counts every parameter, as papers often do.
Prints one JSON line per measurement (`emit`), with `actcache.models.hardware()`.

    python benchmarks/bench_scale.py --device cuda --model-config llama-3.2-3b --n 4096 --batch-size 64
    python benchmarks/bench_scale.py --device cpu --model-config tiny --n 64 --dtype float32
    python benchmarks/bench_scale.py --device cpu --parts ray --ray-model gemma-3-270m --dtype float32 --n 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

TINY = {"model_type": "llama", "vocab_size": 30522, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": True}
WORDS = ("the a film movie story cast plot scene great dull slow fine long short fun bright dark actor "
         "director music score ending opening moment quiet loud warm cold clever silly honest charming "
         "tired fresh old new first last best worst kind of very quite rather never always again").split()

_DEVICE = {"name": "cpu"}


def emit(**kw) -> None:
    """Print one measurement as a JSON line, with the hardware it ran on."""
    from actcache.models import hardware

    print(json.dumps({**kw, **hardware(_DEVICE["name"])}), flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype, n: int, reps: int) -> float:
    """FLOP/s of the median of `reps` timed n x n x n matmuls (after a warm-up)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def write_rows(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """n synthetic labelled reviews of about `words` words (every 8th in the eval split)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            length = rng.randint(words // 2, words * 3 // 2)
            f.write(json.dumps({"id": f"r{i}", "text": " ".join(rng.choice(WORDS) for _ in range(length)),
                                "label": i % 2, "split": "eval" if i % 8 == 7 else "train"}) + "\n")
    return path


def model_config_arg(name: str, folder: Path) -> str:
    if name != "tiny":
        return name
    path = folder / "tiny-config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def build_config(args, data: Path, home: Path):
    from actcache.builder import BuildConfig
    from actcache.data import DataSpec
    from actcache.models import ModelSpec

    spec = ModelSpec(dtype=args.dtype, device=args.device, model_config=args.model_config, init_seed=0)
    ds = DataSpec(path=str(data), text_fields=("text",), label_field="label", split_field="split",
                  id_field="id", template="Review: {text}\nSentiment:", label_words=(" negative", " positive"))
    return BuildConfig(model=spec, data=ds, layers="all", components=("mlp",), poolings=("mean",),
                       masks=("isolated",), context_k=0, max_length=args.max_length,
                       batch_size=args.batch_size, home=str(home))


def matmul_params(model) -> tuple[int, int]:
    """(decoder-layer parameters, all parameters; tied weights once)."""
    from actcache.capture import decoder_layers

    blocks = decoder_layers(model)[1]
    return sum(p.numel() for p in blocks.parameters()), sum(p.numel() for p in model.parameters())


def shares(tps: float, params: tuple[int, int], peak: float | None) -> dict:
    if not peak:
        return {}
    return {"share_of_peak": round(2 * params[0] * tps / peak, 4),
            "share_of_peak_all_params": round(2 * params[1] * tps / peak, 4)}


def run_forward(args, cfg, peak: float | None) -> None:
    """Plain forward of the base model over the build's batches, timed on a second pass."""
    from actcache.builder import identify
    from actcache.capture import decoder_layers, make_batch
    from actcache.prompts import length_batches, pad_id, plan_rows

    ds, lm, _, _ = identify(cfg)
    plan = plan_rows(ds, lm.tokenizer, cfg)
    seqs, spans = plan.seqs["isolated"], plan.spans["isolated"]
    base = decoder_layers(lm.model)[0]
    batches = [make_batch([seqs[i] for i in rows], [spans[i] for i in rows], pad_id(lm.tokenizer), args.device)
               for rows in length_batches([len(s) for s in seqs], args.batch_size)]
    with torch.inference_mode():
        for b in batches:  # warm-up: every batch shape once (kernel selection, allocator)
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        sync(args.device)
        t = time.perf_counter()
        for b in batches:
            base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        sync(args.device)
        secs = time.perf_counter() - t
    tokens = sum(len(s) for s in seqs)
    params = matmul_params(lm.model)
    emit(bench="scale", part="forward", model_config=args.shape, dtype=lm.provenance["dtype"],
         rows=len(seqs), tokens=tokens, batches=len(batches), batch_size=args.batch_size, seconds=round(secs, 3),
         tokens_per_s=round(tokens / secs, 1), params=params[1], matmul_params=params[0],
         **shares(tokens / secs, params, peak))
    del lm, base, batches
    if args.device == "cuda":
        torch.cuda.empty_cache()


def run_capture(args, cfg, peak: float | None) -> None:
    """`actcache.build` of `cfg`, its forward batches timed through the progress callback."""
    import actcache

    marks: dict = {}

    def progress(desc: str, done: int, total: int) -> None:
        if desc.startswith("build"):
            marks.setdefault("first", time.perf_counter())
            if done == total:
                marks["last"] = time.perf_counter()

    t0 = time.perf_counter()
    st = actcache.build(cfg, progress=progress)
    total = time.perf_counter() - t0
    secs = marks["last"] - marks["first"]
    m = st.provenance["model"]
    tokens = _tokens_of(cfg)
    params = (m["n_params"] - _embedding_params(m["config"]), m["n_params"])
    emit(bench="scale", part="capture", model_config=args.shape, dtype=m["dtype"], rows=len(st.ids),
         tokens=tokens, batches=st.report["forward_batches"], batch_size=args.batch_size,
         layers=len({a.layer for a in st.arrays}), seconds=round(secs, 3),
         setup_and_write_s=round(total - secs, 3), tokens_per_s=round(tokens / secs, 1), params=params[1],
         matmul_params=params[0], key=st.key[:16], **shares(tokens / secs, params, peak))


def actcache_build(cfg):
    import actcache

    return actcache.build(cfg)


def _embedding_params(config: dict) -> int:
    """Parameters outside the decoder layers: the embedding (LM head tied or not) and the final norm."""
    tied = config.get("tie_word_embeddings", True)
    return config["vocab_size"] * config["hidden_size"] * (1 if tied else 2) + config["hidden_size"]


def _tokens_of(cfg) -> int:
    from actcache.data import load as load_data
    from actcache.prompts import plan_rows
    from actcache.shapes import shape_tokenizer

    plan = plan_rows(load_data(cfg.data), shape_tokenizer(), cfg)
    return sum(len(s) for s in plan.seqs["isolated"])


def _timed_build(cfg, remote=None) -> tuple[float, object]:
    from actcache.builder import build

    t = time.perf_counter()
    st = build(cfg, remote=remote)
    return time.perf_counter() - t, st


def run_ray(args, data: Path, folder: Path) -> None:
    """The engine's cost: a local single-process build against `--engine ray`
    with the same resources (one actor with every core), then Ray at 1 and 2
    one-core workers; each on a fresh store (every forward batch computed),
    median of --ray-repeats, alternating so outside load hits all alike. Ray
    runs include starting the actors and loading the model in each; the local
    Ray instance is started once, before any timing."""
    import ray

    from actcache.cluster import RayEngine
    from actcache.models import ModelSpec, set_threads

    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    runs = {"local": None, "ray_same": RayEngine(workers=1, cpus_per_worker=cores),
            "ray_1x1": RayEngine(workers=1, cpus_per_worker=1), "ray_2x1": RayEngine(workers=2, cpus_per_worker=1)}
    times: dict = {k: [] for k in runs}
    keys = set()
    for r in range(args.ray_repeats):
        for name, engine in runs.items():
            set_threads(cores)
            cfg = build_config(args, data, folder / f"ray-{name}-{r}")
            if args.ray_model:
                cfg = dataclasses.replace(cfg, model=ModelSpec(args.ray_model, dtype=args.dtype, device=args.device))
            s, st = _timed_build(cfg, engine)
            times[name].append(s)
            keys.add(st.key)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, model = args.n, args.ray_model or args.shape
    emit(bench="scale", part="ray_overhead", model=model, rows=rows, repeats=args.ray_repeats,
         local_s=round(med["local"], 2),
         ray_same_resources_s=round(med["ray_same"], 2),
         overhead=round(med["ray_same"] / med["local"] - 1, 3), goal=0.15, same_key=len(keys) == 1)
    emit(bench="scale", part="ray_workers", model=model, rows=rows, workers_1_rows_per_s=round(rows / med["ray_1x1"], 2),
         workers_2_rows_per_s=round(rows / med["ray_2x1"], 2),
         speedup_2_over_1=round(med["ray_1x1"] / med["ray_2x1"], 2), cores=cores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="peak,forward,capture", help="any of peak, forward, capture, ray")
    ap.add_argument("--ray-model", default=None, help="ray part: a model id or path instead of --model-config")
    ap.add_argument("--ray-repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--model-config", default="llama-3.2-3b", help="llama-3.2-3b, qwen2.5-3b, a config.json or tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=4096, help="rows (pool + eval)")
    ap.add_argument("--words", type=int, default=120, help="mean words per row")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size (default 8192 on CUDA, 2048 on CPU)")
    ap.add_argument("--peak-reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--store", default=None, help="store root (default: a temporary directory)")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - {"peak", "forward", "capture", "ray"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from peak, forward, capture, ray")
    _DEVICE["name"] = args.device
    from actcache.models import set_threads

    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        folder = Path(tmp)
        args.shape, args.model_config = args.model_config, model_config_arg(args.model_config, folder)
        home = Path(args.store) if args.store else folder / "store"
        cfg = build_config(args, write_rows(folder / "rows.jsonl", args.n, args.words), home)
        peak = None
        if "peak" in parts:
            n = args.peak_n or (8192 if args.device == "cuda" else 2048)
            peak = matmul_peak(args.device, getattr(torch, args.dtype), n, args.peak_reps)
            emit(bench="scale", part="peak", dtype=args.dtype, n=n, reps=args.peak_reps,
                 tflops=round(peak / 1e12, 3))
        if "forward" in parts:
            run_forward(args, cfg, peak)
        if "capture" in parts:
            if args.device == "cuda":  # CUDA context, cuBLAS handles and allocator warmed on other rows
                warm = write_rows(folder / "warm.jsonl", 2 * args.batch_size, args.words, seed=1)
                actcache_build(build_config(args, warm, folder / "warm-store"))
            run_capture(args, cfg, peak)
        if "ray" in parts:
            run_ray(args, Path(cfg.data.path), folder)


if __name__ == "__main__":
    main()
