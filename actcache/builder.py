"""`actcache build`: run a causal LM over a dataset once and keep what it computed.

The build key is the sha256 of the canonical JSON of everything that changes
the stored bytes (model weights and tokenizer hashes, dtype, device type, the
dataset fingerprint, template, spans, max length, batch size, storage dtype,
in-context set-up) plus the format version. Layers, components, poolings and
masks are not part of the key: they are the *contents* of a build, so asking
for more of them later computes only what is missing and adds it to the same
build.

Crash safety: each forward batch is flushed to `partial/<pass>/bNNNNN.npz`
(atomic rename). The HDF5 file is assembled in a temporary file and renamed
into place only when every batch is done, so a build that dies is never
visible as finished, and a rerun resumes from the flushed batches. The batch
plan is a pure function of the config, so a resumed build is byte-identical to
an uninterrupted one.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .capture import (
    COMPONENTS, POOLINGS, SPANS, STORE_DTYPES, Capture, decoder_layers, forward_rows, pooling_names, resolve_layers,
)
from .config import MASKS, VERSION
from .data import Dataset, DataSpec, load as load_data
from .display import auto_progress
from .errors import ConfigError, CorruptStoreError, StoreError
from .models import LoadedModel, ModelSpec, load_model, set_threads
from .prompts import RowPlan, context_rotations, length_batches, plan_rows, token_batches
from .sae import SAE, TEXT_DIGEST_RULE, fvu_reference, load_sae, sae_pass, to_csr
from actcache_indexes import IndexSpec, min_vectors

from .store import (
    ArrayId, Store, build_lock, canonical_key, check_home, clean_leftovers, default_home, derive_key,
    index_spec, load_npz, save_npz, short_sae_key, write_build,
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuildConfig:
    """Everything `actcache build` needs. Frozen; `key()` fingerprints it.

    layers: "all", "0,6,-1", "2:10" or a tuple of ints (negatives count from the end).
    span: "full" pools a pool example's tokens including its label/answer;
          "input" stops before it. Eval rows never carry a label.
    store_dtype: "float16" (default) or "float32" for the pooled arrays.
    context_k / context_seed: the demonstrations of the in-context mask's prefix
          (`prompts.context_demos`). When 0 < context_k < L labels the prefix
          cannot hold every label, so the mask runs once per label rotation
          (seeds context_seed .. context_seed + L - 1, each label leading once)
          and stores the mean over rotations (`prompts.context_rotations`).
    index: None (default) builds no index: each is built on first use (query,
           select, evaluate), flat (exact cosine) unless the build asked for
           another kind. flat, ivf, hnsw or a FAISS factory string builds
           every array's index of that kind now.
    batch_tokens: None (default) makes forward batches of batch_size rows; a
          number makes them of as many length-sorted rows as fit that many
          padded tokens (`prompts.token_batches`), to fill a GPU. It changes
          the batches' composition, so it is part of the key. SAE passes keep
          batch_size.
    saes: SAE directories (SAELens / Gemma Scope layout); their features are
          pooled (mean, max) over the same spans and masks and stored sparse.
          Like layers, they are contents, not part of the key: adding one to a
          finished build computes only its pass.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    layers: str | tuple[int, ...] = "all"
    components: tuple[str, ...] = COMPONENTS
    poolings: tuple[str, ...] = POOLINGS
    masks: tuple[str, ...] = MASKS
    span: str = "full"
    max_length: int = 384
    batch_size: int = 16
    batch_tokens: int | None = None
    store_dtype: str = "float16"
    context_k: int = 4
    context_seed: int = 0
    index: str | None = None
    saes: tuple[str, ...] = ()
    home: str | None = None

    def validate(self) -> None:
        for name, vals, allowed in (("component", self.components, COMPONENTS),
                                    ("pooling", self.poolings, pooling_names()), ("mask", self.masks, MASKS)):
            if not vals:
                raise ConfigError(f"no {name}s selected; pass at least one of {allowed}")
            for v in vals:
                if v not in allowed:
                    raise ConfigError(f"unknown {name} {v!r}; choose from {allowed}")
        if self.span not in SPANS:
            raise ConfigError(f"--span must be one of {SPANS}, not {self.span!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype must be one of {STORE_DTYPES}, not {self.store_dtype!r}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length {self.max_length} is too small; use at least 8")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.batch_tokens is not None and self.batch_tokens < self.max_length:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} is below --max-length {self.max_length}; "
                              f"use at least {self.max_length} (or leave it out for --batch-size rows)")
        if self.context_k < 0:
            raise ConfigError(f"--context-k {self.context_k} must be at least 0 (0: no demonstrations)")
        if self.index:
            index_spec(self.index)  # a bad factory string fails now, not after the forward pass
        if isinstance(self.layers, str):
            resolve_layers(self.layers, 1 << 20)  # the syntax now; the range once the model is known
        self.data.validate()  # limits, template syntax, --data path: before any file or model is read


def _pass_id(key: str, mask: str, units: list[tuple[str, int]], poolings) -> str:
    return derive_key(key, "pass", mask=mask, units=sorted(units), poolings=sorted(poolings))[:16]


def _versions() -> dict:
    import h5py
    import torch
    import transformers

    try:
        import faiss

        fv = faiss.__version__
    except ImportError:  # pragma: no cover
        fv = None
    return {"actcache": VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "faiss": fv,
            "python": platform.python_version()}


def identify(cfg: BuildConfig):
    """Load data and model; return (dataset, loaded model, key, key payload)."""
    home = default_home(cfg.home)
    ds = load_data(cfg.data, cache_dir=home / "data")
    lm = load_model(cfg.model, home)
    p = lm.provenance
    payload = {
        "model": {k: p[k] for k in ("model", "revision", "weights_sha256", "tokenizer_sha256", "dtype")},
        "device_type": p["device"],
        "data": ds.fingerprint(),
        "task": {"template": ds.task.template, "label_words": list(ds.task.label_words),
                 "instruction": ds.task.instruction, "kind": ds.task.kind},
        "span": cfg.span, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
        "store_dtype": cfg.store_dtype, "context_k": cfg.context_k, "context_seed": cfg.context_seed,
    }
    if cfg.batch_tokens is not None:  # absent otherwise: the keys of builds made before it existed
        payload["batch_tokens"] = cfg.batch_tokens
    if p.get("random_init"):  # the config and seed stand in for the weights (also in weights_sha256)
        payload["model"]["random_init"] = {"config_sha256": p["config_sha256"], "init_seed": p["init_seed"]}
    n_rot = context_rotations(ds, cfg.context_k)
    if n_rot > 1:  # one rotation: the payload (and key) of builds made before rotations existed
        payload["context_rotations"] = n_rot
    return ds, lm, canonical_key(payload), payload


def build(cfg: BuildConfig, progress: Progress | None = None, remote=None) -> Store:
    """Build (or reuse) the activation cache for `cfg` and return its Store.

    The returned store has `.report`: dict(key, path, cache_hit, computed,
    reused, forward_batches, engine, seconds). Raises ConfigError, DatasetError,
    ModelError or StoreError with what to change.

    remote: an engine that flushes the missing batches elsewhere before this
    process assembles the store (`cluster.RayEngine`); called as
    `remote.run_build(cfg, key, bdir, plan, passes, progress)` with passes
    [(mask, units, poolings)], it returns the forward batches it ran, and its
    `.provenance` is recorded in the build's provenance (never in the key).
    Without `progress`, a notebook or terminal shows tqdm bars (`display.auto_progress`).
    """
    with auto_progress(progress) as cb:
        return _build(cfg, cb, remote)


@dataclass(frozen=True)
class _Job:
    """A build resolved against its data and model: what `_build` checked before any forward pass."""

    cfg: BuildConfig
    home: Path
    ds: Dataset
    lm: LoadedModel
    key: str
    payload: dict
    saes: list[SAE]
    spec: IndexSpec | None  # the parsed --index (None: indexes are built on first use)
    wanted: list[ArrayId]

    @property
    def dir(self) -> Path:
        return self.home / "builds" / self.key


def _prepare(cfg: BuildConfig) -> _Job:
    """Validate `cfg`, load SAEs, data and model, and check what only they can
    tell (layer range, SAE layers, index training size) before any forward pass."""
    cfg.validate()
    home = check_home(default_home(cfg.home), writable=True)
    saes = [load_sae(d) for d in cfg.saes]  # once, and before the model: a bad SAE directory fails now
    set_threads()
    ds, lm, key, payload = identify(cfg)
    spec = index_spec(cfg.index) if cfg.index else None
    if spec is not None:
        need = min_vectors(spec, lm.model.config.get_text_config().hidden_size)
        if len(ds.pool) < need:  # FAISS would fail to train only after the forward passes
            raise ConfigError(f"--index {cfg.index!r} needs at least {need} pool examples to train, but the pool "
                              f"has {len(ds.pool)}; use fewer lists (e.g. IVF{max(1, len(ds.pool) // 39)},Flat), "
                              f"--index ivf (sized to the pool) or --index flat")
    n_layers = len(decoder_layers(lm.model)[1])
    layers = resolve_layers(cfg.layers, n_layers)
    for d, sae in zip(cfg.saes, saes):
        if not 0 <= sae.layer < n_layers:
            raise ConfigError(f"SAE {d} reads layer {sae.layer}, but the model has {n_layers} layers")
    wanted = [ArrayId(c, L, p, m) for m in cfg.masks for c in cfg.components for L in layers
              for p in cfg.poolings]
    return _Job(cfg, home, ds, lm, key, payload, saes, spec, wanted)


def _existing(bdir: Path) -> tuple[list[ArrayId], set]:
    """The arrays and SAE groups a finished build at `bdir` already holds; a
    damaged one is removed (with a warning) and built again from scratch."""
    if not (bdir / "acts.h5").exists():
        return [], set()
    try:
        old = Store(bdir)
        return old.arrays, set(old.sae_groups)
    except CorruptStoreError as e:
        warnings.warn(f"{e}; building it again from scratch", stacklevel=3)
        (bdir / "acts.h5").unlink()
        return [], set()


def _compute(job: _Job, missing: list[ArrayId], sae_todo: list, extend: bool, remote, progress) -> int:
    """Run every pass the missing arrays and SAE groups need (resuming from
    flushed batches), write them into the store and return the forward batches run."""
    cfg, lm, bdir = job.cfg, job.lm, job.dir
    plan = plan_rows(job.ds, lm.tokenizer, cfg)
    forward_batches = 0
    new_arrays: dict[ArrayId, np.ndarray] = {}
    new_stats: dict[tuple[str, str, int], np.ndarray] = {}
    passes = [(m, sorted({(a.component, a.layer) for a in missing if a.mask == m}),
               sorted({a.pooling for a in missing if a.mask == m}))
              for m in MASKS if any(a.mask == m for a in missing)]
    if remote is not None and passes:
        forward_batches += remote.run_build(cfg, job.key, bdir, plan, passes, progress)
    for mask, units, pools in passes:
        todo = [a for a in missing if a.mask == mask]
        arrays, stats, nb = _run_pass(lm, plan, mask, units, pools, cfg, bdir, job.key, progress)
        forward_batches += nb
        for (c, L, p), arr in arrays.items():
            if ArrayId(c, L, p, mask) in todo:
                new_arrays[ArrayId(c, L, p, mask)] = arr
        for (c, L), st in stats.items():
            new_stats[(mask, c, L)] = st
    new_sae = {}
    for sae, mask in sae_todo:
        new_sae[(sae, mask)], nb = _sae_pass(lm, sae, plan, mask, cfg, progress)
        forward_batches += nb
    _write(bdir, job.key, cfg, job.payload, lm.provenance, plan, new_arrays, new_stats, job.ds.task, extend,
           new_sae, _engine(remote), job.ds.source)
    shutil.rmtree(bdir / "partial", ignore_errors=True)
    return forward_batches


def _engine(remote) -> dict:
    """What ran the forward batches, for the provenance and the report."""
    return getattr(remote, "provenance", None) or {"kind": "local", "workers": 1}


def _build(cfg: BuildConfig, progress: Progress | None, remote) -> Store:
    t0 = time.time()
    job = _prepare(cfg)
    key, bdir = job.key, job.dir
    with build_lock(bdir):
        clean_leftovers(bdir)
        have, have_sae = _existing(bdir)
        missing = [a for a in job.wanted if a not in have]
        sae_todo = [(sae, m) for sae in job.saes for m in cfg.masks
                    if (short_sae_key(sae.key), m) not in have_sae]
        if (missing or sae_todo) and not os.access(bdir, os.W_OK):
            raise StoreError(f"build {key[:12]} lacks {len(missing) + len(sae_todo)} of the arrays asked for, "
                             f"but the store {job.home} is read-only; point --store at a writable directory "
                             f"(or ask only for what `actcache info {key[:12]}` lists)")
        forward_batches = _compute(job, missing, sae_todo, bool(have), remote, progress) if missing or sae_todo else 0
        store = Store(bdir)
        made_idx = _ensure_indexes(store, job.spec, progress) if job.spec is not None else 0
    prov = job.lm.provenance
    store.report = {
        "key": key, "path": str(bdir), "cache_hit": not missing and not made_idx and not sae_todo,
        "dtype": prov["dtype"], "dtype_requested": prov["dtype_requested"], "hardware": prov["hardware"],
        "built_on": (store.provenance.get("model", {}).get("hardware") or {}).get("class"),
        "computed": [str(a) for a in missing] + [f"sae/{short_sae_key(sae.key)}/{m}" for sae, m in sae_todo],
        "reused": [str(a) for a in job.wanted if a not in missing],
        "indexes_built": made_idx, "forward_batches": forward_batches, "engine": _engine(remote),
        "seconds": round(time.time() - t0, 2),
    }
    return store


def pass_layouts(plan: RowPlan, mask: str, units, poolings, bdir: Path, key: str, cfg: "BuildConfig") -> list[tuple]:
    """The layouts of one pass as (directory of its flushed batches, seqs, spans,
    batches): one per `RowPlan.layouts(mask)` entry. A pure function of the
    config, so any process that plans the same build flushes the same files."""
    pid = _pass_id(key, mask, units, poolings)
    layouts = plan.layouts(mask)
    out = []
    for r, (seqs, spans) in enumerate(layouts):
        pdir = bdir / "partial" / pid / f"r{r}" if len(layouts) > 1 else bdir / "partial" / pid
        lengths = [len(s) for s in seqs]
        batches = (token_batches(lengths, cfg.batch_tokens) if cfg.batch_tokens
                   else length_batches(lengths, cfg.batch_size))
        out.append((pdir, seqs, spans, batches))
    return out


def pass_capture(lm, units, poolings) -> Capture:
    """The capture of one pass: pooled units and their statistics."""
    layers = sorted({L for _, L in units})
    comps = sorted({c for c, _ in units}, key=COMPONENTS.index)
    return Capture(lm.model, layers, comps, poolings, stats=True, units=units)


def run_batch(lm, cap: Capture, seqs, spans, rows, mask: str, units, shard: Path) -> dict:
    """Forward one batch of rows, flush its pooled arrays and statistics to
    `shard` (atomic) and return them."""
    forward_rows(lm.model, lm.tokenizer, cap, seqs, spans, rows, mask)
    out = {"rows": rows}
    for (c, L, p), v in cap.pooled.items():
        if (c, L) in units:
            out[ArrayId(c, L, p, mask).name()] = v
    for (c, L), v in cap.stats.items():
        if (c, L) in units:
            out[ArrayId(c, L, "mean", mask).stats_name()] = v
    save_npz(shard, out)
    return out


def batch_file(pdir: Path, bi: int) -> Path:
    """Where batch `bi` of a layout is flushed (the one naming rule)."""
    return pdir / f"b{bi:05d}.npz"


def flushed(shard: Path, rows) -> dict | None:
    """The flushed batch at `shard` if it is whole and holds `rows`; else None (run it again)."""
    out = load_npz(shard)  # None when absent or torn by a crash
    return out if out is not None and np.array_equal(out.get("rows"), rows) else None


def _run_pass(lm, plan: RowPlan, mask, units, poolings, cfg, bdir: Path, key: str, progress):
    """Every row under `mask`: one forward pass per layout (`RowPlan.layouts`:
    one per label rotation for the in-context mask), resuming from flushed
    batches. With several rotations each row's pooled vectors and statistics
    are the mean over rotations, summed in rotation order in float64 (pooled
    arrays then float32, as one pass gives them)."""
    cap = pass_capture(lm, units, poolings)
    layouts = pass_layouts(plan, mask, units, poolings, bdir, key, cfg)
    if len(layouts) == 1:
        return _run_rows(lm, cap, layouts[0], mask, units, f"build {mask}", progress)
    ran = 0
    sums: tuple[dict, dict] = ({}, {})
    for r, layout in enumerate(layouts):
        got = _run_rows(lm, cap, layout, mask, units, f"build {mask} (rotation {r + 1}/{len(layouts)})", progress)
        ran += got[2]
        for part, total in zip(got[:2], sums):
            for k, v in part.items():
                total[k] = total[k] + v if k in total else v.astype(np.float64)
    n = len(layouts)
    arrays = {k: (v / n).astype(np.float32) for k, v in sums[0].items()}
    stats = {k: v / n for k, v in sums[1].items()}
    return arrays, stats, ran


def _run_rows(lm, cap: Capture, layout, mask, units, desc: str, progress):
    """One forward pass over every row of one layout, each batch flushed (or read back when flushed already)."""
    pdir, seqs, spans, batches = layout
    pdir.mkdir(parents=True, exist_ok=True)
    ran = 0
    n = len(seqs)
    arrays: dict = {}
    stats: dict = {}
    for bi, rows in enumerate(batches):
        shard = batch_file(pdir, bi)
        if progress:
            progress(desc, bi, len(batches))
        out = flushed(shard, rows)
        if out is None:
            out = run_batch(lm, cap, seqs, spans, rows, mask, units, shard)
            ran += 1
        for name, v in out.items():
            if name == "rows":
                continue
            a = ArrayId.parse(name)
            target = arrays if name.startswith("acts/") else stats
            k = (a.component, a.layer, a.pooling) if target is arrays else (a.component, a.layer)
            if k not in target:
                target[k] = np.empty((n, v.shape[1]), dtype=v.dtype)
            target[k][rows] = v
    if progress:
        progress(desc, len(batches), len(batches))
    return arrays, stats, ran


def _sae_pass(lm, sae, plan: RowPlan, mask, cfg, progress) -> tuple[dict, int]:
    """`sae.sae_pass` over every row under `mask`. For the in-context mask with
    several label rotations the SAE is run per rotation and the results are
    averaged: the pooled codes (mean and max pooling alike: the mean over
    rotations of each rotation's pooled code, summed in float64, kept sparse)
    and the l0 / fvu / explained statistics (mean over rotations)."""
    from scipy.sparse import csr_matrix


    layouts = plan.layouts(mask)
    outs, ran = [], 0
    for seqs, spans in layouts:
        out, nb = sae_pass(lm.model, lm.tokenizer, sae, seqs, spans, mask, cfg.batch_size, progress)
        outs.append(out)
        ran += nb
    if len(outs) == 1:
        return outs[0], ran

    def mean_csr(pooling):
        total = None
        for o in outs:
            c = o[pooling]
            m = csr_matrix((c["data"].astype(np.float64), c["indices"], c["indptr"]),
                           shape=tuple(int(x) for x in c["shape"]))
            total = m if total is None else total + m
        return to_csr(total / len(outs))

    return {"mean": mean_csr("mean"), "max": mean_csr("max"),
            "stats": np.mean([o["stats"] for o in outs], axis=0)}, ran


def _write(bdir: Path, key, cfg: BuildConfig, payload, model_prov, plan: RowPlan, arrays, stats, task,
           extend: bool, saes: dict | None = None, engine: dict | None = None, source: dict | None = None) -> None:
    """Hand the new arrays, the examples (new builds) and the provenance to `store.write_build`."""
    examples = None if extend else plan.examples(task)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prov = {
        "model": model_prov,
        "data": {"task": {**payload["task"], "stop": task.stop, "dup_field": task.dup_field, **task.delimiters()},
                 "fingerprint": payload["data"],
                 "spec": asdict(cfg.data), "n_pool": plan.splits.count("pool"),
                 "n_eval": plan.splits.count("eval"),
                 # A Hugging Face source: its path, config, revision, splits and datasets fingerprints;
                 # an lm-eval task: its name, lm-eval's version, its config and its splits.
                 **({"source": source} if source and ("hf" in source or "lm-eval" in source) else {})},
        "span": cfg.span, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
        **({"batch_tokens": cfg.batch_tokens} if cfg.batch_tokens else {}),
        "store_dtype": cfg.store_dtype, "masks": sorted({a.mask for a in arrays}),
        "sink": plan.sink,
        "in_context": {"k": cfg.context_k, "seed": cfg.context_seed, "demo_ids": plan.context_ids,
                       "self_rule": "a context demonstration is encoded with a same-label stand-in in its place",
                       "prefix": plan.context_text,
                       "rotations": [{"demo_ids": r.demo_ids, "prefix": r.prefix} for r in plan.rotations],
                       "combine": "mean over label rotations" if len(plan.rotations) > 1 else "one prefix"}
        if plan.context_ids or not extend else None,
        "poolings": sorted({a.pooling for a in arrays}),
        "versions": _versions(), "updated": now, "engine": engine,
    }
    if saes:
        prov["saes"] = {short_sae_key(sae.key): {"key": sae.key, "hook": sae.hook, "layer": sae.layer,
                                                 "kind": sae.kind, "d_sae": sae.d_sae, "k": sae.k,
                                                 "fvu_reference": fvu_reference(sae),
                                                 "training": _training_prov(sae)} for sae, _ in saes}
    write_build(bdir, key, arrays=arrays,
                saes={(short_sae_key(sae.key), m): v for (sae, m), v in (saes or {}).items()},
                sae_training={short_sae_key(sae.key): sae.training["digests"] for sae, _ in (saes or {})
                              if sae.training is not None},
                stats={ArrayId(c, L, "mean", m): st for (m, c, L), st in stats.items()},
                examples=examples, provenance=prov, config=_cfg_json(cfg), key_payload=payload,
                store_dtype=cfg.store_dtype)


def _training_prov(sae) -> dict | None:
    """What an SAE records of its training texts, for the provenance (the digests
    themselves go to sae_training/<key16>); None when it records nothing."""
    if sae.training is None:
        return None
    return {"source": sae.training.get("source"), "n_texts": sae.training.get("n_texts"),
            "n_digests": int(len(sae.training["digests"])), "rule": TEXT_DIGEST_RULE}


def _cfg_json(cfg: BuildConfig) -> dict:
    d = asdict(cfg)
    d.pop("home", None)
    if d["index"] is None:
        d.pop("index")  # lazy: keep the kind an earlier build asked for
    if d["batch_tokens"] is None:
        d.pop("batch_tokens")
    return d


def _ensure_indexes(store: Store, spec: IndexSpec, progress) -> int:
    """With --index: build every array's index of kind `spec` now (atomic per
    file), replacing any of another kind. Without it, indexes are built lazily on first use."""
    todo = [a for a in store.arrays if not store.has_index(a, spec)]
    for i, a in enumerate(todo):
        if progress:
            progress("index", i, len(todo))
        store.build_index(a, spec)
    if progress and todo:
        progress("index", len(todo), len(todo))
    return len(todo)
