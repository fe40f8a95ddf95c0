"""Query-path benchmarks: batched vs per-query search, numpy reference, IVF/HNSW, index loading.

    python benchmarks/bench_query.py            # ~3-4 min on 2 cores
    python benchmarks/bench_query.py --n 20000  # quicker

Prints one JSON line per measurement. Every line names its baseline, measured
in the same run on the same data, and the ratio against it; timings are the
median of `--repeats` runs. Every line also carries the dtype, thread counts
(`threads`: faiss and, via threadpoolctl when installed, numpy's BLAS), the
BLAS kernel, and the CPU's ISA class and AMX presence from
`actcache.models.hardware("cpu")`. Data: `--n` pool vectors of width `--d` (640, the
width of Gemma-3-270m, the default model) drawn around random cluster centres,
plus held-out queries drawn the same way, so neighbours are meaningful.

Measurements:
  matmul-peak        a large square numpy float32 matmul (--peak-size^3): the
                     BLAS peak the exact search is measured against
  exact-batched      VectorIndex(flat, cosine).search(all queries, k) in one call
                     (numpy BLAS matmul + tiled top-k): GFLOP/s (2 n d q / s)
                     and its share of matmul-peak
  per-query-loop     one faiss search call per query (how OpenICL's TopkRetriever
                     queries its index), on --loop-queries queries; the goal is
                     exact-batched >= 20x its qps
  faiss-flat         faiss's own IndexFlat search of all queries in one call (the
                     exact search before it moved to numpy's BLAS), ids compared
  numpy-bruteforce   float32 Q @ P.T in blocks + argpartition (no FAISS)
  ivf / hnsw         approximate indexes with actcache's defaults: queries/s
                     (ratio vs exact-batched) and recall@k against the exact ids
  load-mmap / load-read  VectorIndex.load of the persisted flat index with and
                     without memory-mapping (and the same plus a first search)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actcache.models import hardware  # noqa: E402
from actcache_indexes import IndexSpec, VectorIndex, set_threads  # noqa: E402

try:  # optional: reports (and sets) numpy's own BLAS thread pool
    import threadpoolctl
except ImportError:
    threadpoolctl = None


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls, and the last result."""
    ts, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def clustered(n: int, d: int, n_centers: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    centers = rng.standard_normal((n_centers, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    step = 20000
    for s in range(0, n, step):
        e = min(n, s + step)
        out[s:e] = centers[rng.integers(n_centers, size=e - s)]
        out[s:e] += noise * rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def numpy_topk(P: np.ndarray, Q: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """Exact cosine top-k in numpy float32, blocked over queries; (q, k) ids best first."""
    Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    ids = np.empty((len(Q), k), dtype=np.int64)
    for s in range(0, len(Q), block):
        S = Qn[s:s + block] @ Pn.T
        top = np.argpartition(-S, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(S, top, axis=1), axis=1)
        ids[s:s + block] = np.take_along_axis(top, order, axis=1)
    return ids


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a[a >= 0]) & set(e)) for a, e in zip(approx, exact))
    return hits / exact.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="pool vectors")
    ap.add_argument("--d", type=int, default=640, help="width (Gemma-3-270m: 640)")
    ap.add_argument("--queries", type=int, default=1000, help="queries for batched searches")
    ap.add_argument("--loop-queries", type=int, default=200, help="queries for the per-query loop")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=2.0, help="within-cluster spread / centre spread")
    ap.add_argument("--peak-size", type=int, default=4096, help="side of the square matmul-peak matmul")
    ap.add_argument("--skip-approx", action="store_true", help="skip the IVF/HNSW builds")
    args = ap.parse_args()

    threads = set_threads(args.threads)
    blas = {}
    if threadpoolctl is not None:
        threadpoolctl.threadpool_limits(threads, user_api="blas")
        info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        if info:
            blas = {"blas": info[0]["internal_api"], "blas_threads": info[0]["num_threads"],
                    "blas_kernel": info[0].get("architecture")}
    hw = hardware("cpu")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    allx = clustered(args.n + args.queries, args.d, max(10, args.n // 100), args.noise, rng)
    P, Q = allx[: args.n], allx[args.n:]
    common = {"n_pool": args.n, "d": args.d, "k": args.k, "dtype": "float32", "threads": threads, **blas,
              "torch_threads": hw["threads"], "cpu": hw["device_name"], "isa": hw["isa"], "class": hw["class"],
              "amx_bf16": hw["amx_bf16"], "avx512_bf16": hw["avx512_bf16"], "repeats": args.repeats,
              "noise": args.noise, "load_avg_1m": round(os.getloadavg()[0], 2)}
    k = args.k

    m = args.peak_size
    A, B = rng.standard_normal((m, m), dtype=np.float32), rng.standard_normal((m, m), dtype=np.float32)
    C = np.empty((m, m), np.float32)
    np.matmul(A, B, out=C)  # warm-up: thread pool start, page faults
    t_peak, _ = timed(lambda: np.matmul(A, B, out=C), args.repeats)
    peak = 2 * m ** 3 / t_peak / 1e9
    del A, B, C
    emit(bench="matmul-peak", shape=[m, m, m], seconds=round(t_peak, 4), gflops=round(peak, 1), **common)

    flat = VectorIndex.build(P, IndexSpec(kind="flat"))
    flat.search(Q[:1], k)  # warm-up
    t_exact, (_, exact_ids) = timed(lambda: flat.search(Q, k), args.repeats)
    qps_exact = args.queries / t_exact
    gflops = 2 * args.n * args.d * args.queries / t_exact / 1e9
    emit(bench="exact-batched", queries=args.queries, seconds=round(t_exact, 4), qps=round(qps_exact, 1),
         gflops=round(gflops, 1), share_of_matmul_peak=round(gflops / peak, 3), baseline=None, ratio=1.0, **common)

    # OpenICL style: normalised embeddings, one index.search call per test input.
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    raw = flat.index
    nl = min(args.loop_queries, args.queries)

    def loop():
        out = np.empty((nl, k), dtype=np.int64)
        for i in range(nl):
            _, I = raw.search(Qn[i:i + 1], k)
            out[i] = I[0]
        return out

    t_loop, loop_ids = timed(loop, args.repeats)
    qps_loop = nl / t_loop
    assert (loop_ids == exact_ids[:nl]).mean() > 0.99  # same answers, different speed
    emit(bench="per-query-loop", queries=nl, seconds=round(t_loop, 4), qps=round(qps_loop, 1),
         baseline="exact-batched", ratio=round(qps_exact / qps_loop, 2), goal_ratio=20,
         meets_goal=bool(qps_exact / qps_loop >= 20), note="ratio = exact-batched qps / this qps", **common)

    t_ff, (_, ff_ids) = timed(lambda: raw.search(Qn, k), args.repeats)
    qps_ff = args.queries / t_ff
    emit(bench="faiss-flat", queries=args.queries, seconds=round(t_ff, 4), qps=round(qps_ff, 1),
         gflops=round(2 * args.n * args.d * args.queries / t_ff / 1e9, 1), baseline="exact-batched",
         ratio=round(qps_exact / qps_ff, 2), same_ids=round(float((ff_ids == exact_ids).mean()), 5),
         note="ratio = exact-batched qps / this qps", **common)

    t_np, np_ids = timed(lambda: numpy_topk(P, Q, k), args.repeats)
    qps_np = args.queries / t_np
    emit(bench="numpy-bruteforce", queries=args.queries, seconds=round(t_np, 4), qps=round(qps_np, 1),
         baseline="exact-batched", ratio=round(qps_exact / qps_np, 2),
         agreement=round(recall(exact_ids, np_ids), 4), note="ratio = exact-batched qps / this qps", **common)

    for kind in () if args.skip_approx else ("ivf", "hnsw"):
        tb = time.perf_counter()
        idx = VectorIndex.build(P, IndexSpec(kind=kind))
        build_s = time.perf_counter() - tb
        t, (_, ids) = timed(lambda: idx.search(Q, k), args.repeats)
        spec = idx.spec
        emit(bench=kind, queries=args.queries, seconds=round(t, 4), qps=round(args.queries / t, 1),
             baseline="exact-batched", ratio=round((args.queries / t) / qps_exact, 2),
             recall_at_k=round(recall(ids, exact_ids), 4), build_seconds=round(build_s, 1),
             params={"nlist": spec.nlist, "nprobe": spec.nprobe} if kind == "ivf" else
             {"M": spec.hnsw_m, "efConstruction": spec.ef_construction, "efSearch": spec.ef_search},
             note="ratio = this qps / exact-batched qps", **common)
        del idx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flat.faiss")
        flat.save(path)
        size_mb = os.path.getsize(path) / 2 ** 20
        del flat
        loads = {}
        for mode, mm in (("read", False), ("mmap", True)):
            t, idx = timed(lambda: VectorIndex.load(path, mmap=mm), max(5, args.repeats))
            assert idx.mmapped == mm, (mode, idx.load_mode)
            tq, _ = timed(lambda: VectorIndex.load(path, mmap=mm).search(Q[:1], k), max(5, args.repeats))
            loads[mode] = (t, tq)
            del idx
        for mode in ("read", "mmap"):
            t, tq = loads[mode]
            emit(bench=f"load-{mode}", seconds=round(t, 5), load_plus_first_query_s=round(tq, 5),
                 file_mb=round(size_mb, 1), baseline="load-read", ratio=round(loads["read"][0] / t, 2),
                 note="ratio = load-read seconds / this seconds (warm page cache)", **common)
    emit(bench="total", seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
