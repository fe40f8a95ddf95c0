"""On-disk IVF build (indexes.build_ondisk) against the in-memory IVF build.

    python benchmarks/bench_ondisk.py                    # 400k x 128, 8 shards
    python benchmarks/bench_ondisk.py --n 100000 --d 64  # quicker

Each build runs in its own process, so the peak RSS reported (ru_maxrss) is
that build's alone. The pool is `--n` vectors drawn around random cluster
centres, generated shard by shard from seeds (the on-disk build never holds
more than one shard; the in-memory build gets the whole array). Prints one
JSON line per build: seconds, peak RSS (all, and anonymous memory only:
the file pages of memory-mapped shards and lists count in the first but the
kernel can drop them), the pool's size, recall@k against
exact search streamed over the shards, queries/s at the default nprobe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import actcache_indexes as ix  # noqa: E402


def shard(i: int, rows: int, d: int, clusters: int) -> np.ndarray:
    centers = np.random.default_rng(0).normal(size=(clusters, d)).astype(np.float32) * 2
    rng = np.random.default_rng(1000 + i)
    x = centers[rng.integers(0, clusters, rows)]
    x += rng.normal(size=(rows, d)).astype(np.float32)
    return x


class AnonPeak:
    """Peak anonymous RSS (RssAnon: heap and arrays, not the file pages that
    mmapped indexes and the page cache add to ru_maxrss), sampled every 10 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(0.01):
            with open("/proc/self/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            self.peak = max(self.peak, kb)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 1024


def child(args) -> dict:
    rows = args.n // args.shards
    loaders = [lambda i=i: shard(i, rows, args.d, args.clusters) for i in range(args.shards)]
    queries = shard(10_000, args.queries, args.d, args.clusters)
    spec = ix.IndexSpec(kind="ivf")
    path = os.path.join(args.dir, f"{args.child}.faiss")
    anon = AnonPeak()
    t = time.perf_counter()
    if args.child == "ondisk":
        idx = ix.build_ondisk(loaders, spec, path, sizes=[rows] * args.shards)
    else:
        idx = ix.VectorIndex.build(np.concatenate([f() for f in loaders]), spec)
        idx.save(path)
        idx = ix.VectorIndex.load(path)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_anon = anon.stop()
    t = time.perf_counter()
    idx.search(queries, args.k)
    qps = len(queries) / (time.perf_counter() - t)
    recall = ix.recall_at_k(idx, loaders, queries, args.k)
    files = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.startswith(args.child))
    return {"build": args.child, "n": rows * args.shards, "d": args.d, "shards": args.shards,
            "pool_mib": round(rows * args.shards * args.d * 4 / 2**20, 1), "seconds": round(secs, 2),
            "peak_rss_mib": round(peak, 1),
            "peak_anon_mib": round(peak_anon, 1), "nlist": idx.spec.nlist, "nprobe": idx.nprobe,
            f"recall_at_{args.k}": round(recall, 4), "qps": round(qps, 1),
            "files_mib": round(files / 2**20, 1), "threads": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--clusters", type=int, default=500)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--child", choices=("ondisk", "memory"))
    p.add_argument("--dir")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ondisk", "memory"):
            cmd = [sys.executable, __file__, "--child", mode, "--dir", tmp] + \
                  [f"--{k}={getattr(args, k)}" for k in ("n", "d", "shards", "clusters", "queries", "k")]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
