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

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .capture import (
    COMPONENTS, MASKS, POOLINGS, STATS, Capture, decoder_layers, make_batch, resolve_layers, sink_masks,
)
from .data import DataSpec, load as load_data
from .errors import ConfigError
from .models import ModelSpec, load_model, set_threads
from .prompts import BuildPlan, build_plan, length_batches, pad_id
from .store import (
    FORMAT, FORMAT_VERSION, ArrayId, Store, array_name, build_lock, default_home, index_spec, load_npz, save_npz,
    stats_name,
)

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuildConfig:
    """Everything `actcache build` needs. Frozen; `key()` fingerprints it.

    layers: "all", "0,6,-1", "2:10" or a tuple of ints (negatives count from the end).
    span: "full" pools a pool example's tokens including its label/answer;
          "input" stops before it. Eval rows never carry a label.
    store_dtype: "float16" (default) or "float32" for the pooled arrays.
    context_k / context_seed: the fixed demonstrations of the in-context mask.
    index: None (default) builds no index: each is built on first use (query,
           select, evaluate), flat (exact cosine) unless the build asked for
           another kind. flat, ivf, hnsw or a FAISS factory string builds
           every array's index of that kind now.
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
    store_dtype: str = "float16"
    context_k: int = 4
    context_seed: int = 0
    index: str | None = None
    home: str | None = None

    def validate(self) -> None:
        for name, vals, allowed in (("component", self.components, COMPONENTS),
                                    ("pooling", self.poolings, POOLINGS), ("mask", self.masks, MASKS)):
            if not vals:
                raise ConfigError(f"no {name}s selected; pass at least one of {allowed}")
            for v in vals:
                if v not in allowed:
                    raise ConfigError(f"unknown {name} {v!r}; choose from {allowed}")
        if self.span not in ("full", "input"):
            raise ConfigError(f"--span must be 'full' or 'input', not {self.span!r}")
        if self.store_dtype not in ("float16", "float32"):
            raise ConfigError(f"--store-dtype must be float16 or float32, not {self.store_dtype!r}")
        if self.max_length < 8:
            raise ConfigError(f"--max-length {self.max_length} is too small; use at least 8")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")


def canonical_key(payload: dict) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace) plus the format version."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **payload}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def forward_rows(lm, cap: Capture, seqs, spans, rows, mask: str) -> None:
    """Run `cap` on the given rows (indices into `seqs`/`spans`, as laid out by
    `prompts.row_layout`) as one right-padded batch under `mask`."""
    model = lm.model
    batch = make_batch([seqs[i] for i in rows], [spans[i] for i in rows], pad_id(lm.tokenizer),
                       next(model.parameters()).device)
    attn = sink_masks(model, batch.attention_mask, model.dtype) if mask == "sink-masked" else None
    cap.run(batch, attention_mask=attn)


def _pass_id(key: str, mask: str, units: list[tuple[str, int]], poolings) -> str:
    return canonical_key({"key": key, "mask": mask, "units": sorted(units), "poolings": sorted(poolings)})[:16]


def _versions() -> dict:
    import h5py
    import torch
    import transformers

    try:
        import faiss

        fv = faiss.__version__
    except ImportError:  # pragma: no cover
        fv = None
    from . import __version__

    return {"actcache": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
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
    return ds, lm, canonical_key(payload), payload


def build(cfg: BuildConfig, progress: Progress | None = None) -> Store:
    """Build (or reuse) the activation cache for `cfg` and return its Store.

    The returned store has `.report`: dict(key, path, cache_hit, computed,
    reused, forward_batches, seconds). Raises ConfigError, DatasetError,
    ModelError or StoreError with what to change.
    """
    cfg.validate()
    t0 = time.time()
    home = default_home(cfg.home)
    set_threads()
    ds, lm, key, payload = identify(cfg)
    n_layers = len(decoder_layers(lm.model)[1])
    layers = resolve_layers(cfg.layers, n_layers)
    wanted = [ArrayId(c, L, p, m) for m in cfg.masks for c in cfg.components for L in layers
              for p in cfg.poolings]
    bdir = home / "builds" / key
    forward_batches = 0
    with build_lock(bdir):
        have: list[ArrayId] = []
        if (bdir / "acts.h5").exists():
            have = Store(bdir).arrays
        missing = [a for a in wanted if a not in have]
        plan = build_plan(ds, lm.tokenizer, cfg) if missing else None
        new_arrays: dict[ArrayId, np.ndarray] = {}
        new_stats: dict[tuple[str, str, int], np.ndarray] = {}
        for mask in [m for m in MASKS if any(a.mask == m for a in missing)]:
            todo = [a for a in missing if a.mask == mask]
            units = sorted({(a.component, a.layer) for a in todo})
            pools = sorted({a.pooling for a in todo})
            arrays, stats, nb = _run_pass(lm, plan, mask, units, pools, cfg, bdir, key, progress)
            forward_batches += nb
            for (c, L, p), arr in arrays.items():
                if ArrayId(c, L, p, mask) in todo:
                    new_arrays[ArrayId(c, L, p, mask)] = arr
            for (c, L), st in stats.items():
                new_stats[(mask, c, L)] = st
        if missing:
            _write_h5(bdir, key, cfg, payload, lm.provenance, plan, new_arrays, new_stats, ds.task)
            shutil.rmtree(bdir / "partial", ignore_errors=True)
        store = Store(bdir)
        made_idx = _ensure_indexes(store, cfg, progress) if cfg.index else 0
    built_on = store.provenance.get("model", {}).get("hardware") or {}
    here = lm.provenance["hardware"]
    store.report = {
        "key": key, "path": str(bdir), "cache_hit": not missing and not made_idx,
        "dtype": lm.provenance["dtype"], "dtype_requested": lm.provenance["dtype_requested"], "hardware": here,
        "built_on": built_on.get("class"),
        "computed": [str(a) for a in missing], "reused": [str(a) for a in wanted if a not in missing],
        "indexes_built": made_idx, "forward_batches": forward_batches,
        "seconds": round(time.time() - t0, 2),
    }
    return store


def _run_pass(lm, plan: BuildPlan, mask, units, poolings, cfg, bdir: Path, key: str, progress):
    """One forward pass over every row under `mask`, resuming from flushed batches."""
    pid = _pass_id(key, mask, units, poolings)
    pdir = bdir / "partial" / pid
    pdir.mkdir(parents=True, exist_ok=True)
    seqs, spans = plan.seqs[mask], plan.spans[mask]
    batches = length_batches([len(s) for s in seqs], cfg.batch_size)
    layers = sorted({L for _, L in units})
    comps = sorted({c for c, _ in units}, key=COMPONENTS.index)
    cap = Capture(lm.model, layers, comps, poolings, stats=True, units=units)
    desc = f"build {mask}"
    ran = 0
    n = len(seqs)
    arrays: dict = {}
    stats: dict = {}
    for bi, rows in enumerate(batches):
        shard = pdir / f"b{bi:05d}.npz"
        if progress:
            progress(desc, bi, len(batches))
        out = load_npz(shard)  # a flushed batch; None when absent or torn by a crash: run it again
        if out is None or not np.array_equal(out.get("rows"), rows):
            forward_rows(lm, cap, seqs, spans, rows, mask)
            ran += 1
            out = {"rows": rows}
            for (c, L, p), v in cap.pooled.items():
                if (c, L) in units:
                    out[f"a|{c}|{L}|{p}"] = v
            for (c, L), v in cap.stats.items():
                if (c, L) in units:
                    out[f"s|{c}|{L}"] = v
            save_npz(shard, out)
        for name, v in out.items():
            if name == "rows":
                continue
            kind, c, L, *rest = name.split("|")
            target = arrays if kind == "a" else stats
            k = (c, int(L), rest[0]) if kind == "a" else (c, int(L))
            if k not in target:
                target[k] = np.empty((n, v.shape[1]), dtype=v.dtype)
            target[k][rows] = v
    if progress:
        progress(desc, len(batches), len(batches))
    return arrays, stats, ran


def _write_h5(bdir: Path, key, cfg: BuildConfig, payload, model_prov, plan: BuildPlan, arrays, stats, task):
    """Assemble old + new arrays into a temporary HDF5 file, then rename it into place."""
    import h5py

    final = bdir / "acts.h5"
    tmp = bdir / f"acts.h5.{os.getpid()}.tmp"
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w") as f:
        if final.exists():
            with h5py.File(final, "r") as old:
                for name in ("examples", "acts", "stats"):
                    if name in old:
                        old.copy(old[name], f, name=name)
                old_prov = json.loads(old.attrs["provenance"])
                old_cfg = json.loads(old.attrs["config"])
        else:
            old_prov, old_cfg = {}, {}
            ex = f.create_group("examples")
            ex.create_dataset("id", data=[e.id for e in plan.rows], dtype=str_dt)
            ex.create_dataset("split", data=plan.splits, dtype=str_dt)
            ex.create_dataset("label", data=np.array([e.label for e in plan.rows], dtype=np.int64))
            ex.create_dataset("text", data=[task.query_text(e) for e in plan.rows], dtype=str_dt)
            ex.create_dataset("demo", data=[task.demo_text(e) for e in plan.rows], dtype=str_dt)
            ex.create_dataset("dup", data=[task.dup_key(e) for e in plan.rows], dtype=str_dt)
            ex.create_dataset("n_tokens", data=plan.n_tokens.astype(np.int64))
            ex.create_dataset("n_target", data=plan.n_target.astype(np.int64))
            ex.create_dataset("truncated", data=plan.truncated.astype(np.int64))
            ex.create_dataset("record", dtype=str_dt, data=[json.dumps(
                {"id": e.id, "fields": dict(e.fields), "label": e.label, "choices": list(e.choices),
                 "answer": e.answer}, ensure_ascii=False) for e in plan.rows])
        for a, arr in arrays.items():
            dt = np.float16 if cfg.store_dtype == "float16" else np.float32
            if dt == np.float16 and np.abs(arr).max() > np.finfo(np.float16).max:
                dt = np.float32  # massive activations would overflow float16 to inf
            ds = f.create_dataset(array_name(a.mask, a.component, a.layer, a.pooling), data=arr.astype(dt),
                                  chunks=(min(len(arr), 4096), arr.shape[1]))
            ds.attrs["key"] = canonical_key({"build": key, "array": str(a)})
        for (mask, c, L), st in stats.items():
            name = stats_name(mask, c, L)
            if name not in f:
                f.create_dataset(name, data=st.astype(np.float64)).attrs["columns"] = json.dumps(STATS)
        masks = sorted(set(old_prov.get("masks", [])) | {a.mask for a in arrays})
        prov = {
            **old_prov,
            "model": model_prov,
            "data": {"task": {**payload["task"], "stop": task.stop, "dup_field": task.dup_field},
                     "fingerprint": payload["data"],
                     "spec": asdict(cfg.data), "n_pool": plan.splits.count("pool"),
                     "n_eval": plan.splits.count("eval")},
            "span": cfg.span, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
            "store_dtype": cfg.store_dtype, "masks": masks,
            "sink": plan.sink,
            "in_context": {"k": cfg.context_k, "seed": cfg.context_seed, "demo_ids": plan.context_ids,
                           "self_rule": "a context demonstration is encoded with a same-label stand-in in its place",
                           "prefix": plan.context_text} if plan.context_ids or "in_context" not in old_prov else old_prov["in_context"],
            "poolings": sorted(set(old_prov.get("poolings", [])) | {a.pooling for a in arrays}),
            "versions": _versions(), "format_version": FORMAT_VERSION,
            "created": old_prov.get("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["key"] = key
        f.attrs["provenance"] = json.dumps(prov, default=str)
        f.attrs["config"] = json.dumps({**old_cfg, **_cfg_json(cfg)}, default=str)
        f.attrs["key_payload"] = json.dumps(payload, sort_keys=True, default=str)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def _cfg_json(cfg: BuildConfig) -> dict:
    d = asdict(cfg)
    d.pop("home", None)
    if d["index"] is None:
        d.pop("index")  # lazy: keep the kind an earlier build asked for
    return d


def _ensure_indexes(store: Store, cfg: BuildConfig, progress) -> int:
    """With --index: build every array's index now (atomic per file), replacing
    any of another kind. Without it, indexes are built lazily on first use."""
    spec = index_spec(cfg.index)
    todo = [a for a in store.arrays if not store.has_index(a, spec)]
    for i, a in enumerate(todo):
        if progress:
            progress("index", i, len(todo))
        store.build_index(a, spec)
    if progress and todo:
        progress("index", len(todo), len(todo))
    return len(todo)
