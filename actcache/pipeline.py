"""`actcache evaluate` and `actcache run` as library calls: their configs (the
one place their defaults live), the study presets, `evaluate()` (quality
matrix, correlation study, selection experiment, report) and `run()` (build,
query, evaluate a preset end to end). The CLI calls exactly these.

Importing this module is cheap (no numpy, torch or faiss), so the CLI reads
its option defaults from these dataclasses."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import ConfigError

if TYPE_CHECKING:
    from .experiment import SelectionResult
    from .study import StudyResult

Progress = Callable[[str, int, int], None]

# sae-knn and sae-feature run where the build holds SAE features (`build --sae`), else are listed as skipped.
# vote-k-lm (vote-k's graph stage alone, on LM activations) is registered but run only on request.
DEFAULT_STRATEGIES = ("random", "knn", "vote-k", "k-center", "kmeans", "stat", "embed-knn", "sae-knn", "sae-feature")
QUALITY_DEFS = ("balanced", "mean")
# Subset strategies with labels taking turns ("on", the default, fixed before any data was seen:
# one rule for every subset strategy), ranked/drawn as they come ("off"), or both.
TURNS = ("on", "off", "both")
# Order of retrieved demonstrations in the prompt. KATE (Liu et al. 2022) puts the
# most similar one last, nearest the query; "shuffle" is a seeded permutation.
KNN_ORDERS = ("similar-last", "similar-first", "shuffle")


@dataclass(frozen=True)
class Preset:
    """A study set-up for `run`: the model and task, the shots `k`, the study's
    sizes, and what the build captures (context_k / context_seed: the build's
    in-context prefix; below the task's label count the in-context mask is the
    mean over label rotations, see `builder.BuildConfig`)."""

    model: str
    task: str
    k: int
    n_candidates: int
    n_probes: int
    components: tuple[str, ...]
    layers: str
    context_k: int
    max_length: int
    masks: tuple[str, ...]
    context_seed: int = 0


# Presets that reproduce the study's set-up where the weights are available.
# On this machine run them with --model gemma-3-270m (and smaller sizes).
PRESETS: dict[str, Preset] = {
    f"paper-{task}-{m}": Preset(model=model, task=task, k=1, n_candidates=1000, n_probes=100,
                                components=("mlp",), layers="all", context_k=1, max_length=1024,
                                masks=("isolated", "in-context", "label-masked", "sink-masked"))
    for task in ("boolq", "arc_challenge", "openbookqa", "gsm8k")
    for m, model in (("llama", "meta-llama/Llama-3.2-3B"), ("qwen", "Qwen/Qwen2.5-3B"))
}


@dataclass(frozen=True)
class EvalConfig:
    """What `actcache evaluate` computes. Sizes are capped by the build's splits.

    quality: "margin" (gold log-prob margin) or "correct" (0/1) per pair.
    quality_def: "balanced" (probe classes weighted equally, relative to
        same-label candidates; see correlate.label_balanced_quality) or "mean"
        (mean 1-shot score over the half's probes).
    confirm_fraction: the share of candidates in the confirmation half (probes
        are split evenly); the report prints the smallest |rho| it can detect.
    seeds: seeds of the selection experiment (10 by default; deterministic
        strategies are scored once).
    turns: "on" every subset strategy takes labels in turns (see
        select._in_turns), "off" none does, "both" runs each both ways.
        Balanced `random+turns` always runs: it is the baseline of every
        paired difference.
    allow_overlap: False refuses (OverlapError) a build whose SAE trained on the
        text of a candidate or probe (study.sae_training_overlap); True runs the
        SAE study and reports the overlap.
    """

    key: str = "last"
    home: str | None = None
    n_candidates: int = 120
    n_probes: int = 40
    n_eval: int = 100
    k: int = 4
    seeds: tuple[int, ...] = tuple(range(10))
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    knn_layers: str = "auto"
    knn_order: str = "similar-last"
    votek_budget: int = 100  # vote-k / vote-k-lm annotation set size (the paper's budgets: 18 and 100)
    turns: str = "on"
    quality: str = "margin"
    quality_def: str = "balanced"
    confirm_fraction: float = 0.5
    dtype: str = "auto"
    compare_fp32: bool = True
    batch_size: int = 16
    n_boot: int = 200
    sae_min_active: int = 10  # an SAE feature enters the study when active in this many candidates
    allow_overlap: bool = False  # run the SAE study even where an SAE trained on candidates' or probes' text
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
        if self.n_candidates < 8 or self.n_probes < 4:
            raise ConfigError("need at least 8 candidates and 4 probes (two halves of each) for a correlation")
        if self.turns not in TURNS:
            raise ConfigError(f"--turns must be one of {TURNS}, not {self.turns!r}")
        if not 0.1 <= self.confirm_fraction <= 0.9:
            raise ConfigError(f"--confirm-fraction {self.confirm_fraction} must be between 0.1 and 0.9")
        if self.k < 0:
            raise ConfigError("--k must be >= 0")
        if self.knn_order not in KNN_ORDERS:
            raise ConfigError(f"--knn-order must be one of {KNN_ORDERS}, not {self.knn_order!r}")
        if self.votek_budget < self.k:
            raise ConfigError(f"--votek-budget {self.votek_budget} is below --k {self.k}")
        for opt, v, least in (("--n-eval", self.n_eval, 1), ("--n-boot", self.n_boot, 0),
                              ("--sae-min-active", self.sae_min_active, 1),
                              ("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 8)):
            if v < least:
                raise ConfigError(f"{opt} {v} must be at least {least}")
        if not self.seeds:
            raise ConfigError("no --seeds given; pass comma-separated integers, e.g. 0,1,2")


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
    """What `evaluate` found, with the config and keys behind every number.

    config: the EvalConfig it ran; build_key, quality_key: the build and its
    quality matrix; quality_tokens: tokens computed vs in the matrix's prompts
    (None for a matrix stored before they were counted); task; model: the
    build's model provenance; quality_probe_rows, quality_cand_rows: store rows
    of the matrix; versions: library versions of the build; sizes; zero-shot
    accuracy on the probes; hardware: what evaluate, the build and the matrix ran
    on; study, selection: the two experiments; seconds; out: the report
    directory. `to_dict()` is exactly results.json.
    """

    config: EvalConfig
    build_key: str
    quality_key: str
    quality_tokens: dict | None
    task: str
    model: dict
    quality_probe_rows: list[int]
    quality_cand_rows: list[int]
    versions: dict | None
    sizes: Sizes
    zero_shot_probe_acc: float
    hardware: dict
    study: StudyResult
    selection: SelectionResult
    seconds: float
    out: str
    # Every candidate x probe score by example id, for samples/quality_pairs.jsonl.
    quality_pairs: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """results.json: every field but `out` and the per-item records."""
        return {"config": asdict(self.config), "build_key": self.build_key, "quality_key": self.quality_key,
                "quality_tokens": self.quality_tokens, "task": self.task, "model": self.model,
                "quality_probe_rows": self.quality_probe_rows, "quality_cand_rows": self.quality_cand_rows,
                "versions": self.versions, "sizes": {**asdict(self.sizes), "seeds": list(self.sizes.seeds)},
                "zero_shot_probe_acc": self.zero_shot_probe_acc, "hardware": self.hardware,
                "study": self.study.to_dict(), "selection": self.selection.to_dict(), "seconds": self.seconds}


def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> EvalResult:
    """Run the quality matrix, correlation study and selection experiment; write
    the report directory `cfg.out` (report.md, results.json = `to_dict()`, CSVs,
    plots, samples/). Returns the `EvalResult`."""
    import numpy as np

    from . import report
    from .experiment import selection_experiment
    from .models import set_threads
    from .quality import load_scoring_model, quality_matrix, study_rows
    from .store import Store
    from .study import correlation_study, sae_training_overlap

    cfg.validate()
    t0 = time.time()
    set_threads()
    store = Store.open(cfg.key, cfg.home)
    if store.sae_groups:  # the SAE study's overlap check, before minutes of scoring (it runs again there)
        rows = study_rows(store, cfg)
        sae_training_overlap(store, rows.cands, rows.probes, cfg)
    lm = load_scoring_model(store, cfg.dtype)
    q = quality_matrix(store, cfg, lm, progress)
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
        study=study, selection=selection, seconds=round(time.time() - t0, 1), out=str(Path(cfg.out)),
        quality_pairs={"cand_ids": store.ids[q.cand_rows].tolist(), "probe_ids": store.ids[q.probe_rows].tolist(),
                       "correct": q.correct.tolist(), "margin": q.margin.tolist(),
                       "cand_half": q.cand_half.tolist(), "probe_half": q.probe_half.tolist()})
    report.write(res, Path(cfg.out))
    return res


def resolve_key(key: str, home: str | None) -> str:
    """A full build key for a key, prefix, or "last"."""
    from .store import Store

    return Store.open(key, home).key


@dataclass(frozen=True)
class RunConfig:
    """`actcache run`: one study preset end to end (build, query, evaluate).

    preset: a name in PRESETS, or a Preset of your own.
    model: None runs the preset's model. dtype, device: the build's.
    limit: the build's pool cap (None: the candidate count); eval_limit: its
        eval cap (None: n_eval + n_probes, since probes and eval inputs are
        disjoint). n_candidates, n_probes, context_seed: None takes the preset's.
    n_eval, strategies, seeds, out: as in EvalConfig; home: the store root.
    """

    preset: str | Preset
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    data_dir: str | None = None
    limit: int | None = None
    eval_limit: int | None = None
    n_candidates: int | None = None
    n_probes: int | None = None
    context_seed: int | None = None
    n_eval: int = EvalConfig.n_eval
    strategies: tuple[str, ...] = EvalConfig.strategies
    seeds: tuple[int, ...] = EvalConfig.seeds
    out: str = EvalConfig.out
    home: str | None = None

    def resolve(self) -> Preset:
        """The Preset this run uses; ConfigError for an unknown name."""
        if isinstance(self.preset, Preset):
            return self.preset
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        return PRESETS[self.preset]


@dataclass(frozen=True)
class RunResult:
    """What `run` did: the build's report (key, forward_batches, cache_hit, ...),
    the neighbours file it wrote, and the evaluation."""

    build: dict
    neighbors: str
    results: EvalResult


def run(cfg: RunConfig | str, progress: Progress | None = None) -> RunResult:
    """Build, query and evaluate a study preset as `actcache run` does: the build
    (the preset's layers, components, masks, context_k, context_seed, max_length), a query of
    the eval rows (the preset's first component, k >= 1) written to
    `out/neighbors.jsonl`, then `evaluate` into `out`. A str is a preset name."""
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
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    neighbors = str(Path(cfg.out) / "neighbors.jsonl")
    write_jsonl(recs, neighbors)
    res = evaluate(EvalConfig(key=st.key, home=cfg.home, n_candidates=n_cand, n_probes=n_probes,
                              n_eval=cfg.n_eval, k=p.k, seeds=cfg.seeds, strategies=cfg.strategies,
                              out=cfg.out), progress=progress)
    return RunResult(st.report, neighbors, res)
