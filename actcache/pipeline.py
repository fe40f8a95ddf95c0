"""`actcache evaluate` and `actcache run` as library calls: `evaluate()` (quality
matrix, correlation study, selection experiment, report) and `run()` (build,
query, evaluate a preset end to end). The CLI calls exactly these. Their
configs, results and the study presets live in `config.py`.

Importing this module is cheap (no numpy, torch or faiss): the heavy modules
are imported inside `evaluate` and `run`, which keeps `actcache --help` light."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .display import auto_progress
from .config import (  # noqa: F401  (re-exported: the CLI and callers read them here)
    DEFAULT_STRATEGIES, KNN_ORDERS, PRESETS, QUALITY_DEFS, TURNS, EvalConfig, EvalResult, Preset, RunConfig,
    RunResult, Sizes,
)

Progress = Callable[[str, int, int], None]


def evaluate(cfg: EvalConfig, progress: Progress | None = None, remote=None) -> EvalResult:
    """Run the quality matrix, correlation study and selection experiment; write
    the report directory `cfg.out` (report.md, results.json = `to_dict()`, CSVs,
    plots, samples/), or nothing when `cfg.out` is None. Returns the `EvalResult`.
    `remote` (e.g. a `cluster.RayEngine`) computes the quality matrix's missing
    parts. Without `progress`, a notebook or terminal shows tqdm bars (`display.auto_progress`)."""

    with auto_progress(progress) as cb:
        return _evaluate(cfg, cb, remote)


def _evaluate(cfg: EvalConfig, progress: Progress | None, remote) -> EvalResult:
    import numpy as np

    from . import report
    from .experiment import selection_experiment
    from .models import set_threads
    from .quality import quality_matrix, study_rows
    from .store import Store
    from .study import correlation_study, sae_training_overlap

    cfg.validate()
    t0 = time.time()
    set_threads()
    store = Store.open(cfg.key, cfg.home)
    refuse_random_weights(store)
    if store.sae_groups:  # the SAE study's overlap check, before minutes of scoring (it runs again there)
        rows = study_rows(store, cfg)
        sae_training_overlap(store, rows.cands, rows.probes, cfg)
    lm = store.load_model(cfg.dtype, cfg.device)
    q = quality_matrix(store, cfg, lm, progress, remote=remote)
    study = correlation_study(store, q, cfg, progress)
    selection = selection_experiment(store, cfg, lm, study, progress)
    res = EvalResult(
        config=cfg, build_key=store.key, quality_key=q.key, quality_tokens=q.meta.get("tokens"),
        task=store.task_name, model=store.provenance["model"],
        quality_probe_rows=q.probe_rows.tolist(), quality_cand_rows=q.cand_rows.tolist(),
        versions=store.provenance.get("versions"),
        sizes=Sizes(int(len(q.cand_rows)), int(len(q.probe_rows)), len(selection.eval_ids), cfg.k, cfg.seeds),
        zero_shot_probe_acc=float(np.nanmean(q.zs_correct)) if np.isfinite(q.zs_correct).any() else float("nan"),
        hardware={"dtype": lm.provenance["dtype"], "dtype_requested": lm.provenance["dtype_requested"],
                  "evaluate": lm.provenance["hardware"], "build": store.provenance["model"].get("hardware"),
                  "quality_matrix": q.meta.get("hardware")},
        study=study, selection=selection, seconds=round(time.time() - t0, 1),
        out=None if cfg.out is None else str(Path(cfg.out)),
        quality_pairs={"cand_ids": store.ids[q.cand_rows].tolist(), "probe_ids": store.ids[q.probe_rows].tolist(),
                       "correct": q.correct.tolist(), "margin": q.margin.tolist(),
                       "cand_half": q.cand_half.tolist(), "probe_half": q.probe_half.tolist()})
    if cfg.out is not None:
        report.write(res, Path(cfg.out))
    return res


def refuse_random_weights(store) -> None:
    """ConfigError for a build made from randomly initialised weights (`--model-config`)."""
    from .errors import ConfigError

    m = store.provenance.get("model") or {}
    if m.get("random_init"):
        raise ConfigError(f"build {store.key[:12]} was made from randomly initialised weights "
                          f"(--model-config {m.get('model_config')!r}), which have no in-context learning; "
                          f"evaluate a build made from real weights (actcache build --model ...)")


def resolve_key(key: str, home: str | None) -> str:
    """A full build key for a key, prefix, or "last"."""
    from .store import Store

    return Store.open(key, home).key


def run(cfg: RunConfig | str, progress: Progress | None = None) -> RunResult:
    """Build, query and evaluate a study preset as `actcache run` does: the build
    (the preset's layers, components, masks, context_k, context_seed, max_length), a query of
    the eval rows (the preset's first component, k >= 1) written to
    `out/neighbors.jsonl`, then `evaluate` into `out` (out None: nothing is written).
    A str is a preset name. Without `progress`, a notebook or terminal shows tqdm bars."""

    with auto_progress(progress) as cb:
        return _run(cfg, cb)


def _run(cfg: RunConfig | str, progress: Progress | None) -> RunResult:
    from .builder import BuildConfig, build
    from .data import DataSpec
    from .models import ModelSpec
    from .query import QueryConfig, query, write_jsonl

    cfg = RunConfig(preset=cfg) if isinstance(cfg, str) else cfg
    p = cfg.resolve()
    n_cand = cfg.n_candidates or p.n_candidates
    n_probes = cfg.n_probes or p.n_probes
    bcfg = BuildConfig(model=ModelSpec(cfg.model or p.model, None, cfg.dtype, cfg.device),
                       data=DataSpec(task=p.task, data_dir=cfg.data_dir, pool_limit=cfg.limit or n_cand,
                                     # probes and eval inputs are disjoint, so the eval split holds both
                                     eval_limit=cfg.eval_limit or cfg.n_eval + n_probes),
                       layers=p.layers, components=p.components, masks=p.masks,
                       context_k=p.context_k,
                       context_seed=p.context_seed if cfg.context_seed is None else cfg.context_seed,
                       max_length=p.max_length, home=cfg.home)
    st = build(bcfg, progress=progress)
    recs = query(QueryConfig(key=st.key, home=cfg.home, component=p.components[0], k=max(1, p.k)),
                 progress=progress)
    neighbors = None
    if cfg.out is not None:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        neighbors = str(Path(cfg.out) / "neighbors.jsonl")
        write_jsonl(recs, neighbors)
    res = evaluate(EvalConfig(key=st.key, home=cfg.home, n_candidates=n_cand, n_probes=n_probes,
                              n_eval=cfg.n_eval, k=p.k, seeds=cfg.seeds, strategies=cfg.strategies,
                              device=cfg.device, out=cfg.out), progress=progress)
    return RunResult(st.report, neighbors, res)
