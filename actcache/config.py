"""Config and result types of `evaluate` and `run` (`EvalConfig`, `Preset`,
`RunConfig`; `StudyResult`, `SelectionResult`, `EvalResult`, `RunResult`): the
one place their defaults and fields live, on the ground floor so that every module of the study (quality matrix,
correlations, selection experiment, report) can read them without importing
what runs them. Cheap to import (no numpy, torch or faiss): the CLI reads its
option defaults from these dataclasses.

`MASKS` is the vocabulary of attention masks a build can capture; what each one
means (its token layout and attention rule) is `prompts.py`'s alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .display import dataframe, html_table, interval, num, short_key
from .errors import ConfigError
from .harness import lm_eval_block

VERSION = "0.1.0"  # the package version, as pyproject.toml gives it

MASKS = ("isolated", "in-context", "label-masked", "sink-masked")
# The mask retrieval, selection and the study's pair scores use unless told otherwise:
# a pool row's vector under it carries no label (see query.py).
DEFAULT_MASK = "label-masked"

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


# Presets that reproduce the study's set-up: the paper's models need their weights (a hub id or a
# local path); `--model gemma-3-270m` runs the same set-up at a size a CPU manages.
PRESETS: dict[str, Preset] = {
    f"paper-{task}-{m}": Preset(model=model, task=task, k=1, n_candidates=1000, n_probes=100,
                                components=("mlp",), layers="all", context_k=1, max_length=1024,
                                masks=MASKS)
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
    device: str = "auto"  # where the model runs: cpu, cuda, mps or auto (models.resolve_device)
    compare_fp32: bool = True
    batch_size: int = 16
    n_boot: int = 200
    sae_min_active: int = 10  # an SAE feature enters the study when active in this many candidates
    allow_overlap: bool = False  # run the SAE study even where an SAE trained on candidates' or probes' text
    pair_mask: str = DEFAULT_MASK
    max_length: int = 2048
    demos: str | None = None  # a query JSONL (from `actcache query`) to evaluate as a strategy
    out: str | None = "actcache-report"  # None: write no report, only return the EvalResult
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
class StudyResult:
    """What `correlation_study` found.

    rows: one dict per mask x component x layer x statistic (name, rho_raw,
        ci_raw_lo/hi, q_raw, rho_strat, rho_partial, q_partial, rho_len, q_len,
        mask, component, layer, stat; see correlate.candidate_correlations).
    summary: the largest raw and controlled |rho| and where (correlate.summarize).
    pairs: one dict per pair-level array and half (candidate-probe cosine vs
        1-shot score within the half's block).
    label_rho, length_rho: Spearman of the demonstration's label / length in
        tokens with its quality.
    replication: discovery and confirmation, each with its own candidates and
        its own probes (correlate.replicate with the matrix's halves).
    quality: (N,) candidate quality, as floats.
    sae: the same study over SAE features (see `sae_study`), or None when the
        build holds none.
    push: the label-push check of the quality in use (see `push_check`).
    """

    rows: list[dict]
    summary: dict
    pairs: list[dict]
    label_rho: float
    length_rho: float
    replication: dict | None
    quality: list[float]
    sae: dict | None = None
    push: dict | None = None

    def to_dict(self) -> dict:
        """The "study" object of results.json."""
        return {"rows": self.rows, "summary": self.summary, "pairs": self.pairs, "label_rho": self.label_rho,
                "length_rho": self.length_rho, "replication": self.replication, "quality": self.quality,
                "sae": self.sae, "push": self.push}

    def headline(self) -> str:
        """The largest raw and controlled |rho| and where, on one line."""
        sm = self.summary or {}
        return (f"max |rho| raw {num(sm.get('raw_max_abs_rho'))} at {sm.get('raw_max_name')}, "
                f"controlled {num(sm.get('controlled_max_abs_rho'))} at {sm.get('controlled_max_name')}")

    def __repr__(self) -> str:
        rep = self.replication or {}
        top = rep.get("top") or []
        reps = (f"{sum(t['replicates'] for t in top)}/{len(top)} of the discovery top replicate" if top
                else "no replication")
        return (f"StudyResult({len(self.quality)} candidates, {len(self.rows)} statistics; {self.headline()}; "
                f"rho(label, quality) {num(self.label_rho)}; {reps})")

    def _repr_html_(self) -> str:
        top = sorted(self.rows, key=lambda r: -abs(r["rho_raw"]) if math.isfinite(r["rho_raw"]) else 0)[:10]
        return html_table(["statistic", "raw ρ [95% CI]", "q", "partial ρ (label)", "partial ρ (label + length)"],
                          [[r["name"], interval(r["rho_raw"], r.get("ci_raw_lo"), r.get("ci_raw_hi")),
                            num(r.get("q_raw")), num(r.get("rho_partial")), num(r.get("rho_len"))] for r in top],
                          caption=f"StudyResult: {self.headline()} (top {len(top)} of {len(self.rows)} by raw |ρ|)")

    def to_pandas(self):
        """One row per statistic (`rows`): name, rho_raw with its interval, controlled rhos and q-values."""
        return dataframe(self.rows, "StudyResult")


@dataclass(frozen=True)
class SelectionResult:
    """What `selection_experiment` found.

    runs: one dict per strategy x seed (strategy, seed, accuracy with its 95 %
        Wilson interval over the eval inputs ci_lo/ci_hi, n_eval, macro_f1,
        acc_norm, tokens_computed, tokens_in_prompts, same_prompts_as_earlier_seed;
        "skipped" with the reason when an optional baseline could not run).
    summary: one dict per strategy, zero-shot first: mean accuracy with its 95 %
        interval over eval inputs and seeds (ci_lo, ci_hi; `two_way_interval`),
        std over seeds (ddof 1; nan when the prompts never change with the
        seed), n_seeds, n_distinct (distinct prompt sets scored), the paired
        difference from `baseline` with its interval (diff_vs_baseline,
        diff_lo, diff_hi), chosen (how every option behind the row was
        chosen), acc_norm for multiple choice.
    baseline: the strategy the differences are taken from (balanced random).
    eval_ids: the eval inputs, in order. flips: the float32 zero-shot
        comparison (n, flipped, acc_fp32, dtype) or None.
    k, max_length: as configured. dropped_demonstrations: per strategy, how
        many demonstrations overlong prompts dropped.
    tokens: {"computed", "in_prompts", "saved"} over every scored prompt (the
        fp32 comparison included; 0 for generative tasks, which are decoded).
    samples: per-item records per run (written to samples/, not results.json).
    """

    runs: list[dict]
    summary: list[dict]
    eval_ids: list[str]
    flips: dict | None
    k: int
    dropped_demonstrations: dict[str, int]
    max_length: int
    tokens: dict
    samples: list[dict] = field(default_factory=list, repr=False)
    baseline: str = "random+turns"

    def to_dict(self) -> dict:
        """The "selection" object of results.json (per-item samples are written beside it)."""
        return {"runs": self.runs, "summary": self.summary, "eval_ids": self.eval_ids, "flips": self.flips,
                "k": self.k, "dropped_demonstrations": self.dropped_demonstrations,
                "max_length": self.max_length, "tokens": self.tokens, "baseline": self.baseline}

    def _table(self) -> list[list[str]]:
        return [[s["strategy"], interval(s.get("mean"), s.get("ci_lo"), s.get("ci_hi")),
                 "baseline" if s["strategy"] == self.baseline else
                 interval(s.get("diff_vs_baseline"), s.get("diff_lo"), s.get("diff_hi")) if "diff_vs_baseline" in s
                 else "—", str(s.get("n_seeds", "—"))] for s in self.summary]

    def best(self) -> str:
        """The strategy with the highest mean accuracy (zero-shot aside), with its interval."""
        ok = [s for s in self.summary if s["strategy"] != "zero-shot" and math.isfinite(s.get("mean", math.nan))]
        b = max(ok, key=lambda s: s["mean"], default=None)
        return f"best {b['strategy']} {interval(b['mean'], b.get('ci_lo'), b.get('ci_hi'))}" if b else "no run"

    def __repr__(self) -> str:
        return (f"SelectionResult({len(self.summary)} strategies, {len(self.eval_ids)} eval inputs, k={self.k}; "
                f"{self.best()}; baseline {self.baseline})")

    def _repr_html_(self) -> str:
        return html_table(["strategy", f"{self.k}-shot accuracy [95% CI]", f"− {self.baseline} [95% CI]", "seeds"],
                          self._table(), caption=f"SelectionResult: {len(self.eval_ids)} eval inputs, k={self.k}")

    def to_pandas(self, what: str = "summary"):
        """One row per strategy (`summary`), or with what="runs" one per strategy x seed (`runs`)."""
        if what not in ("summary", "runs"):
            raise ConfigError(f"to_pandas(what={what!r}): choose 'summary' or 'runs'")
        return dataframe(self.summary if what == "summary" else self.runs, "SelectionResult")


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
    directory. `to_dict()` is exactly results.json; its "lm_eval" object
    (`lm_eval()`) sets the selection runs out as lm-evaluation-harness does.
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
    out: str | None
    # Every candidate x probe score by example id, for samples/quality_pairs.jsonl.
    quality_pairs: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """results.json: every field but `out` and the per-item records."""
        return {"config": asdict(self.config), "build_key": self.build_key, "quality_key": self.quality_key,
                "quality_tokens": self.quality_tokens, "task": self.task, "model": self.model,
                "quality_probe_rows": self.quality_probe_rows, "quality_cand_rows": self.quality_cand_rows,
                "versions": self.versions, "sizes": {**asdict(self.sizes), "seeds": list(self.sizes.seeds)},
                "zero_shot_probe_acc": self.zero_shot_probe_acc, "hardware": self.hardware,
                "study": self.study.to_dict(), "selection": self.selection.to_dict(), "seconds": self.seconds,
                "lm_eval": self.lm_eval()}

    def lm_eval(self) -> dict:
        """results.json's "lm_eval" object: the selection runs in lm-evaluation-harness's
        results.json shape, one harness task per run named ``<task>|<strategy>|seed<seed>``
        (see harness.lm_eval_block)."""
        m = self.model or {}
        config = {"model": "actcache", "model_args": f"pretrained={m.get('model')},dtype={m.get('dtype')}",
                  "batch_size": self.config.batch_size, "batch_sizes": [], "limit": len(self.selection.eval_ids),
                  "bootstrap_iters": 0, "num_fewshot": self.selection.k, "model_dtype": m.get("dtype"),
                  "model_sha": m.get("weights_sha256"), "build_key": self.build_key}
        return lm_eval_block(self.task, self.selection.samples, config, VERSION)

    def __repr__(self) -> str:
        m = (self.model or {}).get("model")
        z = self.sizes
        return (f"EvalResult(task={self.task!r}, model={m!r}, build={short_key(self.build_key)!r}, "
                f"{z.n_candidates} candidates x {z.n_probes} probes, {z.n_eval} eval inputs, k={z.k}, "
                f"{len(z.seeds)} seeds; zero-shot {num(self.zero_shot_probe_acc)}; "
                f"{self.selection.best()}; "
                f"{self.study.headline()}; out={self.out!r})")

    def _repr_html_(self) -> str:
        m = self.model or {}
        z = self.sizes
        about = html_table(["task", "model", "build", "candidates x probes", "eval inputs", "k", "seeds", "report"],
                           [[self.task, m.get("model"), short_key(self.build_key), f"{z.n_candidates} x {z.n_probes}",
                             z.n_eval, z.k, len(z.seeds), self.out or "(not written)"]],
                           caption=f"EvalResult: {self.study.headline()}")
        return about + self.selection._repr_html_()

    def to_pandas(self, what: str = "summary"):
        """The selection experiment per strategy (`selection.summary`); what="runs":
        per strategy x seed; what="study": one row per statistic of the correlation study."""
        if what == "study":
            return self.study.to_pandas()
        return self.selection.to_pandas(what)


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
    out: str | None = EvalConfig.out  # None: write nothing (no neighbours file, no report)
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
    neighbors: str | None
    results: EvalResult

    def __repr__(self) -> str:
        return f"RunResult(build={short_key(self.build.get('key'))!r}, neighbors={self.neighbors!r}, results={self.results!r})"

    def _repr_html_(self) -> str:
        return self.results._repr_html_()

    def to_pandas(self, what: str = "summary"):
        """As `EvalResult.to_pandas`."""
        return self.results.to_pandas(what)
