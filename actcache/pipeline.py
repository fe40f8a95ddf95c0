"""`actcache evaluate` and `actcache run` as library calls: the evaluation
config, the study presets, `evaluate()` (quality matrix, correlation study,
selection experiment, report) and `run()` (build, query, evaluate a preset end
to end). The CLI calls exactly these."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ConfigError
from .experiment import KNN_ORDERS, selection_experiment
from .quality import load_scoring_model, quality_matrix
from .store import Store
from .study import QUALITY_DEFS, correlation_study

Progress = Callable[[str, int, int], None]

DEFAULT_STRATEGIES = ("random", "knn", "vote-k", "k-center", "kmeans", "stat", "embed-knn")

# Presets that reproduce the study's set-up where the weights are available.
# On this machine run them with --model gemma-3-270m (and smaller sizes).
PRESETS: dict[str, dict] = {
    f"paper-{task}-{m}": dict(model=model, task=task, k=1, n_candidates=1000, n_probes=100,
                             components=("mlp",), layers="all", context_k=1, max_length=1024,
                             masks=("isolated", "in-context", "label-masked", "sink-masked"))
    for task in ("boolq", "arc_challenge", "openbookqa", "gsm8k")
    for m, model in (("llama", "meta-llama/Llama-3.2-3B"), ("qwen", "Qwen/Qwen2.5-3B"))
}


@dataclass(frozen=True)
class EvalConfig:
    """What `actcache evaluate` computes. Sizes are capped by the build's splits.

    quality: "margin" (gold log-prob margin) or "correct" (0/1) per pair.
    quality_def: "mean" (mean 1-shot score), "gain" (mean gain over zero-shot),
        or "balanced" (probe classes weighted equally, relative to same-label
        candidates; see correlate.label_balanced_quality).
    """

    key: str = "last"
    home: str | None = None
    n_candidates: int = 120
    n_probes: int = 40
    n_eval: int = 100
    k: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    knn_layers: str = "auto"
    knn_order: str = "similar-last"
    votek_budget: int = 100
    quality: str = "margin"
    quality_def: str = "mean"
    dtype: str = "auto"
    compare_fp32: bool = True
    batch_size: int = 16
    n_boot: int = 200
    pair_mask: str = "label-masked"
    max_length: int = 2048
    demos: str | None = None  # a query JSONL (from `actcache query`) to evaluate as a strategy
    out: str = "actcache-report"
    seed: int = 0

    def validate(self) -> None:
        if self.quality not in ("margin", "correct"):
            raise ConfigError(f"--quality must be margin or correct, not {self.quality!r}")
        if self.quality_def not in QUALITY_DEFS:
            raise ConfigError(f"--quality-def must be one of {QUALITY_DEFS}, not {self.quality_def!r}")
        if self.n_candidates < 4 or self.n_probes < 2:
            raise ConfigError("need at least 4 candidates and 2 probes for a correlation")
        if self.k < 0:
            raise ConfigError("--k must be >= 0")
        if self.knn_order not in KNN_ORDERS:
            raise ConfigError(f"--knn-order must be one of {KNN_ORDERS}, not {self.knn_order!r}")
        if self.votek_budget < self.k:
            raise ConfigError(f"--votek-budget {self.votek_budget} is below --k {self.k}")


@dataclass(frozen=True)
class Sizes:
    """How much `evaluate` looked at (after capping by the build's splits)."""

    n_candidates: int
    n_probes: int
    n_eval: int
    k: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` found. The study and selection parts are the JSON documents
    report.py renders; `to_dict()` is exactly results.json (plus "out")."""

    config: EvalConfig
    build_key: str
    quality_key: str
    task: str
    sizes: Sizes
    zero_shot_probe_acc: float
    study: dict
    selection: dict
    hardware: dict
    seconds: float
    out: str
    document: dict = field(repr=False)

    def to_dict(self) -> dict:
        return self.document


def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> EvalResult:
    """Run the quality matrix, correlation study and selection experiment; write
    the report directory. Returns an `EvalResult` (its `to_dict()` is results.json)."""
    from . import report

    from .models import set_threads

    cfg.validate()
    t0 = time.time()
    set_threads()
    store = Store.open(cfg.key, cfg.home)
    lm = load_scoring_model(store, cfg.dtype)
    q = quality_matrix(store, cfg, lm, progress)
    study = correlation_study(store, q, cfg, progress)
    selection = selection_experiment(store, cfg, lm, study, progress)
    results = {
        "config": asdict(cfg), "build_key": store.key, "quality_key": q["key"],
        "quality_tokens": q["meta"].get("tokens"),  # None for a matrix stored before tokens were counted
        "task": store.task_name, "model": store.provenance["model"],
        "quality_probe_rows": q["probe_rows"].tolist(), "quality_cand_rows": q["cand_rows"].tolist(),
        "quality_pairs": {"cand_ids": store.ids[q["cand_rows"]].tolist(), "probe_ids": store.ids[q["probe_rows"]].tolist(),
                          "correct": q["correct"].tolist(), "margin": q["margin"].tolist()},
        "versions": store.provenance.get("versions"), "sizes": {
            "n_candidates": int(len(q["cand_rows"])), "n_probes": int(len(q["probe_rows"])),
            "n_eval": len(selection["eval_ids"]), "k": cfg.k, "seeds": list(cfg.seeds)},
        "zero_shot_probe_acc": float(np.nanmean(q["zs_correct"])),
        "hardware": {"dtype": lm.provenance["dtype"], "dtype_requested": lm.provenance["dtype_requested"],
                     "evaluate": lm.provenance["hardware"],
                     "build": store.provenance["model"].get("hardware"),
                     "quality_matrix": q["meta"].get("hardware")},
        "study": study, "selection": selection, "seconds": None,
    }
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out)
    report.write(results, out)
    results["out"] = str(out)
    sz = results["sizes"]
    return EvalResult(cfg, store.key, q["key"], store.task_name,
                      Sizes(sz["n_candidates"], sz["n_probes"], sz["n_eval"], sz["k"], tuple(sz["seeds"])),
                      results["zero_shot_probe_acc"], study, selection, results["hardware"], results["seconds"],
                      str(out), results)


def resolve_key(key: str, home: str | None) -> str:
    """A full build key for a key, prefix, or "last"."""
    return Store.open(key, home).key




@dataclass(frozen=True)
class RunConfig:
    """`actcache run`: one study preset end to end (build, query, evaluate).
    None means the preset's value (or, for limits, one derived from it)."""

    preset: str
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    limit: int | None = None
    eval_limit: int | None = None
    n_candidates: int | None = None
    n_probes: int | None = None
    n_eval: int = EvalConfig.n_eval
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    seeds: tuple[int, ...] = EvalConfig.seeds
    out: str = EvalConfig.out
    home: str | None = None


@dataclass
class RunResult:
    """What `run` did: the build's report, the neighbours file and the evaluation results."""

    build: dict
    neighbors: str
    results: EvalResult


def run(cfg: RunConfig, progress: Progress | None = None) -> RunResult:
    """Build, query and evaluate a study preset (`PRESETS`) as the CLI's `run` does."""
    from .builder import BuildConfig, build
    from .data import DataSpec
    from .models import ModelSpec
    from .query import QueryConfig, query, write_jsonl

    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[cfg.preset]
    n_cand = cfg.n_candidates or p["n_candidates"]
    n_probes = cfg.n_probes or p["n_probes"]
    bcfg = BuildConfig(model=ModelSpec(cfg.model or p["model"], None, cfg.dtype, cfg.device),
                       data=DataSpec(task=p["task"], data_dir=cfg.data_dir, pool_limit=cfg.limit or n_cand,
                                     # probes and eval inputs are disjoint, so the eval split holds both
                                     eval_limit=cfg.eval_limit or cfg.n_eval + n_probes),
                       layers=p["layers"], components=p["components"], masks=p["masks"],
                       context_k=p["context_k"], max_length=p["max_length"], home=cfg.home)
    st = build(bcfg, progress=progress)
    recs = query(QueryConfig(key=st.key, home=cfg.home, component=p["components"][0], k=max(1, p["k"])),
                 progress=progress)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    neighbors = str(Path(cfg.out) / "neighbors.jsonl")
    write_jsonl(recs, neighbors)
    res = evaluate(EvalConfig(key=st.key, home=cfg.home, n_candidates=n_cand, n_probes=n_probes,
                              n_eval=cfg.n_eval, k=p["k"], seeds=cfg.seeds, strategies=cfg.strategies,
                              out=cfg.out), progress=progress)
    return RunResult(st.report, neighbors, res)
