"""The correlation study: do a demonstration's own activation statistics predict
its 1-shot quality? Spearman raw, within label, and partial on label and length,
with bootstrap CIs, BH over the family, a discovery/confirmation split, and
pair-level similarity analyses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .capture import STATS
from .store import Store

if TYPE_CHECKING:
    from .pipeline import EvalConfig
    from .quality import QualityMatrix

Progress = Callable[[str, int, int], None]

STUDY_REF = 0.33  # the 2026 study's largest |Spearman rho|


@dataclass(frozen=True)
class StudyResult:
    """What `correlation_study` found.

    rows: one dict per mask x component x layer x statistic (name, rho_raw,
        ci_raw_lo/hi, q_raw, rho_strat, rho_partial, q_partial, rho_len, q_len,
        mask, component, layer, stat; see correlate.candidate_correlations).
    summary: the largest raw and controlled |rho| and where (correlate.summarize).
    pairs: one dict per pair-level array (candidate-probe cosine vs 1-shot score).
    label_rho, length_rho: Spearman of the demonstration's label / length in
        tokens with its quality.
    replication: the discovery/confirmation split (correlate.replicate).
    quality: (N,) candidate quality, as floats.
    """

    rows: list[dict]
    summary: dict
    pairs: list[dict]
    label_rho: float
    length_rho: float
    replication: dict | None
    quality: list[float]

    def to_dict(self) -> dict:
        """The "study" object of results.json."""
        return {"rows": self.rows, "summary": self.summary, "pairs": self.pairs, "label_rho": self.label_rho,
                "length_rho": self.length_rho, "replication": self.replication, "quality": self.quality}


def candidate_quality(q: QualityMatrix, store: Store, cfg: EvalConfig) -> np.ndarray:
    """(N,) float64 quality per candidate under cfg.quality and cfg.quality_def."""
    from .correlate import gain_quality, label_balanced_quality, mean_quality

    s, zs = q.scores(cfg.quality)
    if cfg.quality_def == "gain":
        return gain_quality(s, zs)
    if cfg.quality_def == "balanced":
        return label_balanced_quality(s, store.labels[q.probe_rows], store.labels[q.cand_rows])
    return mean_quality(s)


def correlation_study(store: Store, q: QualityMatrix, cfg: EvalConfig,
                      progress: Progress | None = None) -> StudyResult:
    """Spearman (raw, within-label, partial on label) of every stored statistic
    with candidate quality, plus pair-level similarity analyses."""
    from .correlate import candidate_correlations, pair_correlations, replicate, spearman, summarize

    cand, probes = q.cand_rows, q.probe_rows
    quality = candidate_quality(q, store, cfg)
    labels = store.labels[cand]
    lengths = (store.n_tokens[cand] + store.n_target[cand]).astype(np.float64)  # demonstration tokens
    stats: dict[str, np.ndarray] = {}
    units = sorted({(a.mask, a.component, a.layer) for a in store.arrays})
    for mask, comp, layer in units:
        st = store.stats(comp, layer, mask)[cand]
        for j, name in enumerate(STATS):
            stats[f"{mask}|{comp}|{layer}|{name}"] = st[:, j]
    rows = candidate_correlations(stats, quality, labels, n_boot=cfg.n_boot, seed=cfg.seed, lengths=lengths)
    replication = replicate(stats, quality, labels, lengths, top=10, n_boot=cfg.n_boot, seed=cfg.seed)
    for r in rows:
        r["mask"], r["component"], layer, r["stat"] = r["name"].split("|")
        r["layer"] = int(layer)
    label_rho = spearman(labels, quality)[0]  # how much the demonstration's label alone explains
    # Pair level: does the candidate-probe similarity at a layer predict the 1-shot score?
    pairs = []
    score = q.scores(cfg.quality)[0]
    pmask = cfg.pair_mask if any(a.mask == cfg.pair_mask for a in store.arrays) else store.arrays[0].mask
    comb = sorted({(a.component, a.layer) for a in store.arrays if a.mask == pmask and a.pooling == "mean"})
    for i, (comp, layer) in enumerate(comb):
        if progress:
            progress("pair level", i, len(comb))
        X = store.acts(comp, layer, "mean", pmask)
        a, b = X[cand], X[probes]
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        res = pair_correlations(a @ b.T, score, labels, store.labels[probes],
                                n_boot=max(50, cfg.n_boot // 4), seed=cfg.seed)
        pairs.append({"component": comp, "layer": layer, "mask": pmask, **res})
    if progress and comb:
        progress("pair level", len(comb), len(comb))
    return StudyResult(rows=rows, summary=summarize(rows, ref=STUDY_REF), pairs=pairs, label_rho=label_rho,
                       length_rho=spearman(lengths, quality)[0], replication=replication,
                       quality=quality.tolist())


