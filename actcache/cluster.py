"""Builds and quality matrices on a Ray cluster (`--engine ray`).

The unit of work is the unit a local run already flushes: one forward batch of
one pass of a build (`builder.pass_layouts`), or one part of the quality
matrix (`quality.quality_parts`). A Ray Data pipeline (`from_items` ->
`map_batches(<actor class>, compute=ActorPoolStrategy(size=N))`) sends the units still missing to
a pool of actors. Each actor loads the model once, plans the build exactly as
the driver does (the plan is a pure function of the config), runs the same
capture or scoring code, and flushes the same file a local run would (atomic
rename; numpy's zip members carry CRCs, so a torn or damaged file reads as
missing). As results stream back the driver appends each unit to its manifest
(`partial/manifest.jsonl`: file, rows, sha256, worker): a rerun trusts a unit
only when its file's sha256 matches the manifest, and recomputes the rest.

The driver then assembles the store with the local code path, which finds
every unit flushed. The HDF5 file, its checksums and the key are therefore
those of a local build, bit for bit wherever the arithmetic is (fp32 on CPU).
This is a merge into one file rather than a virtual dataset over per-shard
files: pooled arrays are small next to the forward passes that make them (a
100k-row pool at d=2048 and 28 layers is 11 GiB in float16), a merge is one
sequential write, and every reader (`Store`, `query`, `serve`, `verify`)
keeps one file with one checksum table and no dependence on shard files
that could move or be lost.

Ray's own checkpointing is not used: it needs a Read at the start and a
Datasink at the end, and it is at-least-once; the manifest is the truth.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actcache_indexes.io import quiet_fd

from .builder import batch_file, flushed, identify, pass_capture, pass_layouts, run_batch
from .errors import ConfigError, MissingExtraError
from .files import MANIFEST, Manifest, file_sha256
from .models import set_threads
from .prompts import plan_rows
from .quality import compute_part, flushed_part
from .score import TokenCount
from .store import Store



@dataclass(frozen=True)
class RayEngine:
    """Where and how wide to run. address: a running cluster ("auto", or
    "ray://host:10001"); None starts a local one sized to this machine.
    workers: actors (None: one per GPU, else one per `cpus_per_worker` cores).
    cpus_per_worker: cores (and torch threads) per actor. gpus_per_worker: 1
    to give each actor a GPU."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0

    def connect(self):
        """Connect to (or start) the cluster; the Ray module."""
        try:
            import ray
        except ImportError:
            raise MissingExtraError("--engine ray needs Ray: pip install 'actcache[ray]'", extra="ray") from None
        # Ray's native core logs to stderr (its start-up line, and errors it raises about its own
        # actor restarts); the library never prints, so only fatal ones are kept.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        if not ray.is_initialized():
            kw = {"address": self.address} if self.address else {"num_cpus": os.cpu_count()}
            with quiet_fd(2):
                ray.init(**kw, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                         ignore_reinit_error=True)
        import logging

        from ray.data import DataContext

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # the library never prints
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the library never prints; progress goes to the callback
        return ray

    def n_workers(self, ray) -> int:
        if self.workers:
            return self.workers
        res = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(res.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    @property
    def provenance(self) -> dict:
        """What the provenance records of the engine: the workers as resolved on the cluster."""
        workers = self.workers
        if workers is None:
            import ray

            workers = self.n_workers(ray) if ray.is_initialized() else None
        return {"kind": "ray", "workers": workers, "cpus_per_worker": self.cpus_per_worker,
                "gpus_per_worker": self.gpus_per_worker}

    # ------------------------------------------------------------------ the build
    def run_build(self, cfg, key: str, bdir: Path, plan, passes, progress=None) -> int:
        """Flush every missing forward batch of `passes` on the cluster; the batches run."""
        manifest = Manifest(bdir / "partial" / MANIFEST)
        todo = []
        for p, (mask, units, pools) in enumerate(passes):
            for li, (pdir, _, _, batches) in enumerate(pass_layouts(plan, mask, units, pools, bdir, key, cfg)):
                for bi, rows in enumerate(batches):
                    shard = batch_file(pdir, bi)
                    if not (manifest.trusts(shard) and flushed(shard, rows) is not None):
                        todo.append({"pass": p, "layout": li, "batch": bi})
        if not todo:
            return 0
        return self._run(todo, BuildWorker, {"cfg": cfg, "key": key, "bdir": str(bdir), "passes": passes},
                         manifest, "build (ray)", progress)

    # ------------------------------------------------------------------ the quality matrix
    def run_quality(self, store, cfg, parts, progress=None):
        """Flush every missing part of the quality matrix on the cluster; the TokenCount computed."""
        manifest = Manifest(parts[0].path.parent / MANIFEST)
        todo = [{"part": i} for i, part in enumerate(parts)
                if not (manifest.trusts(part.path) and flushed_part(part) is not None)]
        tokens = TokenCount()
        if todo:
            self._run(todo, QualityWorker, {"build_dir": str(store.dir), "dtype": cfg.dtype,
                                            "batch_size": cfg.batch_size, "parts": parts},
                      manifest, "quality matrix (ray)", progress, tokens=tokens)
        return tokens

    # ------------------------------------------------------------------ one pipeline
    def _run(self, items: list[dict], worker, kwargs: dict, manifest: "Manifest", desc: str, progress,
             tokens=None) -> int:
        ray = self.connect()
        n = min(self.n_workers(ray), len(items))
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(worker, fn_constructor_kwargs={**kwargs, "threads": self.cpus_per_worker},
                             batch_size=1, compute=ray.data.ActorPoolStrategy(size=n),
                             num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None)
        got = 0
        for row in out.iter_rows():
            manifest.add({"file": row["file"], "rows": int(row["rows"]), "sha256": row["sha256"],
                          "worker": row["worker"]})
            if tokens is not None:
                tokens.computed += int(row["computed"])
                tokens.in_prompts += int(row["in_prompts"])
            got += 1
            if progress:
                progress(desc, got, len(items))
        return got


def _row(f: Path, rows: int, **extra) -> dict:
    return {"file": np.array([str(f)]), "rows": np.array([rows]), "sha256": np.array([file_sha256(f)]),
            "worker": np.array([f"{socket.gethostname()}:{os.getpid()}"]),
            **{k: np.array([v]) for k, v in extra.items()}}


class BuildWorker:
    """A Ray actor: loads the model and plans the build once, then runs and
    flushes the forward batches it is given ({"pass", "layout", "batch"})."""

    def __init__(self, cfg, key: str, bdir: str, passes, threads: int):
        set_threads(threads)
        ds, self.lm, got_key, _ = identify(cfg)
        if got_key != key:
            raise ConfigError(f"this worker computes build key {got_key[:12]}, the driver {key[:12]}: the model or "
                              f"data differ between nodes; give every node the same files")
        plan = plan_rows(ds, self.lm.tokenizer, cfg)
        self.passes = [(mask, units, pass_capture(self.lm, units, pools),
                        pass_layouts(plan, mask, units, pools, Path(bdir), key, cfg))
                       for mask, units, pools in passes]

    def __call__(self, batch: dict) -> dict:
        p, li, bi = int(batch["pass"][0]), int(batch["layout"][0]), int(batch["batch"][0])
        mask, units, cap, layouts = self.passes[p]
        pdir, seqs, spans, batches = layouts[li]
        pdir.mkdir(parents=True, exist_ok=True)
        shard = batch_file(pdir, bi)
        run_batch(self.lm, cap, seqs, spans, batches[bi], mask, units, shard)
        return _row(shard, len(batches[bi]))


class QualityWorker:
    """A Ray actor: opens the build and its model once, then scores and flushes
    the parts of the quality matrix it is given ({"part"})."""

    def __init__(self, build_dir: str, dtype, batch_size: int, parts, threads: int):
        set_threads(threads)
        self.store = Store(Path(build_dir))
        self.lm = self.store.load_model(dtype)
        self.task = self.store.task()
        self.batch_size, self.parts = batch_size, parts

    def __call__(self, batch: dict) -> dict:
        part = self.parts[int(batch["part"][0])]
        tokens = TokenCount()
        compute_part(self.lm, self.task, self.store, part, self.batch_size, tokens)
        return _row(part.path, len(part.cand_rows), computed=tokens.computed, in_prompts=tokens.in_prompts)


__all__ = ["RayEngine", "Manifest", "BuildWorker", "QualityWorker", "MANIFEST"]
