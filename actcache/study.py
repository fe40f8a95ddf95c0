"""The correlation study: do a demonstration's own activation statistics predict
its 1-shot quality? Spearman raw, within label, and partial on label and length,
with bootstrap CIs, BH over the family, a discovery/confirmation split, and
pair-level similarity analyses."""

from __future__ import annotations


from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .capture import STATS
from .config import EvalConfig, StudyResult
from .correlate import (
    candidate_correlations, label_balanced_quality, label_push, mean_quality, pair_correlations, replicate, spearman,
    stratified_spearman, summarize,
)
from .data import record_text
from .errors import ConfigError, OverlapError
from .sae import training_overlap
from .store import SAE_STATS, Store, shown_sae_key

if TYPE_CHECKING:
    from .quality import QualityMatrix

Progress = Callable[[str, int, int], None]

STUDY_REF = 0.33  # the 2026 study's largest |Spearman rho|
SAE_TOP = 10  # SAE features listed with their most-activating pool examples
SAE_EXAMPLES = 5  # pool examples shown per listed feature


SIGNAL_KINDS = ("stat", "sae-feature", "sae-stat")
_SIGNAL_FORMS = ("'<mask>|<component>|<layer>|<stat>' (a moment statistic), "
                 "'sae|<key>|<mask>|<pooling>|<feature>' (an SAE feature) or "
                 "'sae|<key>|<mask>|stat|<l0, fvu or explained>' (an SAE statistic)")


@dataclass(frozen=True)
class Signal:
    """One signal of the correlation study, named as its rows name it.

    kind: "stat" (a moment statistic of one stored array), "sae-feature" (one
        SAE feature's pooled activation) or "sae-stat" (a per-example SAE
        statistic, one of store.SAE_STATS).
    mask: the capture mask.
    component, layer: the array of a moment statistic (None for SAE signals).
    stat: the statistic's name (capture.STATS, or SAE_STATS for "sae-stat").
    sae: the SAE's key as names show it (store.shown_sae_key; SAE signals only).
    pooling: "mean" or "max" (SAE features only).
    feature: the SAE feature's index (SAE features only).

    `str(signal)` is the name: "<mask>|<component>|<layer>|<stat>",
    "sae|<key>|<mask>|<pooling>|<feature>" or "sae|<key>|<mask>|stat|<stat>";
    `Signal.parse` reads one back.
    """

    kind: str
    mask: str
    component: str | None = None
    layer: int | None = None
    stat: str | None = None
    sae: str | None = None
    pooling: str | None = None
    feature: int | None = None

    @classmethod
    def moment(cls, mask: str, component: str, layer: int, stat: str) -> Signal:
        """A moment statistic of the array (component, layer) under `mask`."""
        return cls("stat", mask, component=component, layer=int(layer), stat=stat)

    @classmethod
    def sae_feature(cls, sae: str, mask: str, pooling: str, feature: int) -> Signal:
        """SAE `sae`'s feature `feature`, pooled by `pooling`, under `mask`."""
        return cls("sae-feature", mask, sae=shown_sae_key(sae), pooling=pooling, feature=int(feature))

    @classmethod
    def sae_stat(cls, sae: str, mask: str, stat: str) -> Signal:
        """A per-example statistic of SAE `sae` (one of SAE_STATS) under `mask`."""
        return cls("sae-stat", mask, sae=shown_sae_key(sae), stat=stat)

    @property
    def is_stat(self) -> bool:
        """A moment statistic of a stored array."""
        return self.kind == "stat"

    @property
    def is_sae(self) -> bool:
        """An SAE signal: a feature or a per-example SAE statistic."""
        return self.kind in ("sae-feature", "sae-stat")

    @property
    def is_sae_feature(self) -> bool:
        return self.kind == "sae-feature"

    @property
    def is_sae_stat(self) -> bool:
        return self.kind == "sae-stat"

    def format(self, sep: str = "|") -> str:
        """The signal's name, its parts joined by `sep` (reports show them with "/")."""
        if self.kind == "stat":
            parts = (self.mask, self.component, self.layer, self.stat)
        elif self.kind == "sae-feature":
            parts = ("sae", self.sae, self.mask, self.pooling, self.feature)
        else:
            parts = ("sae", self.sae, self.mask, "stat", self.stat)
        return sep.join(str(p) for p in parts)

    def __str__(self) -> str:
        return self.format()

    def columns(self) -> dict:
        """The columns a study row carries beside its name: mask, component, stat,
        layer for a moment statistic; sae, mask, pooling, feature for an SAE
        signal (pooling "stat" and the statistic's name as feature for an SAE
        statistic; the feature as text)."""
        if self.kind == "stat":
            return {"mask": self.mask, "component": self.component, "stat": self.stat, "layer": self.layer}
        if self.kind == "sae-feature":
            return {"sae": self.sae, "mask": self.mask, "pooling": self.pooling, "feature": str(self.feature)}
        return {"sae": self.sae, "mask": self.mask, "pooling": "stat", "feature": self.stat}

    @classmethod
    def parse(cls, text: str) -> Signal:
        """The signal a study row's name stands for. Raises ConfigError for a name
        of no known form."""
        parts = str(text).split("|")

        def bad(why: str) -> ConfigError:
            return ConfigError(f"signal name {text!r} {why}; a signal name reads {_SIGNAL_FORMS}, as the "
                               f"correlation study's rows name them (results.json study.rows[].name)")

        if any(not p for p in parts):
            raise bad("has an empty part")
        if len(parts) == 5 and parts[0] == "sae":
            _, key, mask, pooling, last = parts
            if pooling == "stat":
                if last not in SAE_STATS:
                    raise bad(f"names no SAE statistic ({last!r} is not one of {SAE_STATS})")
                return cls("sae-stat", mask, sae=key, stat=last)
            if not last.isdigit():
                raise bad(f"names no SAE feature ({last!r} is not a feature index)")
            return cls("sae-feature", mask, sae=key, pooling=pooling, feature=int(last))
        if len(parts) == 4:
            mask, component, layer, stat = parts
            try:
                return cls("stat", mask, component=component, layer=int(layer), stat=stat)
            except ValueError:
                raise bad(f"has no integer layer ({layer!r})") from None
        raise bad(f"has {len(parts)} parts")


def candidate_quality(q: QualityMatrix, store: Store, cfg: EvalConfig) -> np.ndarray:
    """(N,) float64 quality per candidate under cfg.quality and cfg.quality_def,
    each candidate scored on the probes of its own half (see quality.StudyRows)."""
    out = np.full(len(q.cand_rows), np.nan)
    for h in (0, 1):
        ci, pj, s = q.block(h, cfg.quality)
        if len(ci) and len(pj):
            out[ci] = (label_balanced_quality(s, store.labels[q.probe_rows[pj]], store.labels[q.cand_rows[ci]])
                       if cfg.quality_def == "balanced" else mean_quality(s))
    return out


def push_check(q: QualityMatrix, store: Store, cfg: EvalConfig, quality: np.ndarray) -> dict:
    """How much of the quality in use is the demonstration's label push: the
    within-label Spearman of `correlate.label_push` (own-label minus other-label
    score, on the candidate's own half's probes) with quality, and the probe
    label counts of each half. Near 0 means the quality no longer rewards a
    demonstration for pushing the model toward its own label."""
    push = np.full(len(q.cand_rows), np.nan)
    counts = {}
    for h in (0, 1):
        ci, pj, s = q.block(h, cfg.quality)
        pl = store.labels[q.probe_rows[pj]]
        counts[("discovery", "confirmation")[h]] = {str(int(g)): int((pl == g).sum()) for g in np.unique(pl)}
        if len(ci) and len(pj):
            push[ci] = label_push(s, pl, store.labels[q.cand_rows[ci]])
    rho, p = stratified_spearman(push, quality, store.labels[q.cand_rows])
    return {"quality_def": cfg.quality_def, "rho_within_label": rho, "p": p, "probe_labels": counts}


def correlation_study(store: Store, q: QualityMatrix, cfg: EvalConfig,
                      progress: Progress | None = None) -> StudyResult:
    """Spearman (raw, within-label, partial on label) of every stored statistic
    with candidate quality, plus pair-level similarity analyses."""
    cand, probes = q.cand_rows, q.probe_rows
    quality = candidate_quality(q, store, cfg)
    labels = store.labels[cand]
    lengths = (store.n_tokens[cand] + store.n_target[cand]).astype(np.float64)  # demonstration tokens
    stats: dict[str, np.ndarray] = {}
    units = sorted({(a.mask, a.component, a.layer) for a in store.arrays})
    for mask, comp, layer in units:
        st = store.stats(comp, layer, mask)[cand]
        for j, name in enumerate(STATS):
            stats[str(Signal.moment(mask, comp, layer, name))] = st[:, j]
    rows = candidate_correlations(stats, quality, labels, n_boot=cfg.n_boot, seed=cfg.seed, lengths=lengths)
    halves = (np.flatnonzero(q.cand_half == 0), np.flatnonzero(q.cand_half == 1))
    replication = replicate(stats, quality, labels, lengths, top=10, n_boot=cfg.n_boot, seed=cfg.seed,
                            halves=halves)
    for r in rows:
        r.update(Signal.parse(r["name"]).columns())
    label_rho = spearman(labels, quality)[0]  # how much the demonstration's label alone explains
    # Pair level: does the candidate-probe similarity at a layer predict the 1-shot score?
    # Each half's block on its own (pairs across halves are not scored).
    pairs = []
    pmask = cfg.pair_mask if any(a.mask == cfg.pair_mask for a in store.arrays) else store.arrays[0].mask
    comb = sorted({(a.component, a.layer) for a in store.arrays if a.mask == pmask and a.pooling == "mean"})
    for i, (comp, layer) in enumerate(comb):
        if progress:
            progress("pair level", i, len(comb))
        X = store.acts(comp, layer, "mean", pmask)
        for h, half in enumerate(("discovery", "confirmation")):
            ci, pj, score = q.block(h, cfg.quality)
            a, b = X[cand[ci]], X[probes[pj]]
            a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
            b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
            res = pair_correlations(a @ b.T, score, labels[ci], store.labels[probes[pj]],
                                    n_boot=max(50, cfg.n_boot // 4), seed=cfg.seed)
            pairs.append({"component": comp, "layer": layer, "mask": pmask, "half": half, **res})
    if progress and comb:
        progress("pair level", len(comb), len(comb))
    return StudyResult(rows=rows, summary=summarize(rows, ref=STUDY_REF), pairs=pairs, label_rho=label_rho,
                       length_rho=spearman(lengths, quality)[0], replication=replication,
                       quality=quality.tolist(),
                       sae=sae_study(store, cand, quality, labels, lengths, cfg, progress, halves, probes=probes),
                       push=push_check(q, store, cfg, quality))


def sae_training_overlap(store: Store, cand: np.ndarray, probes: np.ndarray | None, cfg: EvalConfig) -> list[dict]:
    """Per SAE of the build, how many candidates and probes it trained on
    (`sae.training_overlap`): dict(sae, status "checked" | "unknown",
    candidates, probes: each dict(n_rows, n_overlap, ids)).

    Raises OverlapError when an SAE trained on the text of any candidate or probe
    and `cfg.allow_overlap` is False: its features would be read on the very
    examples it learnt from.
    """
    out = []
    for k16 in sorted({k for k, _ in store.sae_groups}):
        parts = {"candidates": training_overlap(store, k16, cand),
                 "probes": training_overlap(store, k16, probes if probes is not None else [])}
        out.append({"sae": k16, "status": parts["candidates"]["status"],
                    **{name: {k: v for k, v in o.items() if k in ("n_rows", "n_overlap", "ids")}
                       for name, o in parts.items()}})
    bad = [o for o in out if o["candidates"]["n_overlap"] or o["probes"]["n_overlap"]]
    if bad and not cfg.allow_overlap:
        what = "; ".join(f"SAE {shown_sae_key(o['sae'])} trained on the text of {o['candidates']['n_overlap']} of "
                         f"{o['candidates']['n_rows']} candidates and {o['probes']['n_overlap']} of "
                         f"{o['probes']['n_rows']} probes (e.g. ids "
                         f"{', '.join((o['candidates']['ids'] + o['probes']['ids'])[:3])})" for o in bad)
        raise OverlapError(f"{what}: the SAE study would read its features on examples it learnt from. Train an "
                           f"SAE without this build's rows (`actcache sae train ... --exclude-build "
                           f"{store.key[:12]}`) and add it (`actcache build ... --sae DIR`), or pass "
                           f"--allow-overlap (EvalConfig.allow_overlap=True) to run anyway with the overlap reported")
    return out


def _feature_entry(store: Store, r: dict, C, cand: np.ndarray, rep: dict | None) -> dict:
    """One listed SAE feature of `sae_study`: its correlations, its confirmation
    result `rep` (None when it was not in the discovery top), and the SAE_EXAMPLES
    pool examples whose pooled activation `C` ((rows, d_sae)) is highest."""
    f = int(r["feature"])
    pool = store.pool_rows
    col = C[pool, f]
    top = [i for i in np.argsort(-col, kind="stable")[:SAE_EXAMPLES] if col[i] > 0]
    return {"name": r["name"], "sae": r["sae"], "mask": r["mask"], "pooling": r["pooling"], "feature": f,
            "n_active": int((C[cand, f] > 0).sum()), "rho_raw": r["rho_raw"], "rho_partial": r["rho_partial"],
            "rho_len": r["rho_len"], "q_len": r["q_len"],
            "rho_confirmation": rep["rho_confirmation"] if rep else None,
            "replicates": rep["replicates"] if rep else None,
            "examples": [{"id": str(store.ids[pool[i]]), "label": int(store.labels[pool[i]]),
                          "activation": float(col[i]), "text": record_text(store.records[pool[i]])[:300]}
                         for i in top]}


def sae_study(store: Store, cand: np.ndarray, quality: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
              cfg: EvalConfig, progress: Progress | None = None, halves=None,
              probes: np.ndarray | None = None) -> dict | None:
    """The correlation study over the build's SAE features, as a family of its own.

    Signals, per SAE and mask: every feature whose pooled activation (mean and
    max pooling separately) is non-zero in at least `cfg.sae_min_active`
    candidates, plus the per-example L0, FVU and explained norm. Each gets the
    raw, within-label, label-partial and label + log-length partial Spearman with
    candidate quality (`correlate.candidate_correlations`), with Benjamini-Hochberg
    over this family; bootstrap CIs for the SAE statistics and the listed
    features (nan for the rest); the discovery/confirmation split re-tests the
    discovery top 10 (`correlate.replicate`).

    First each SAE's training texts are checked against the candidates and
    probes (`sae_training_overlap`): an SAE that trained on any of them raises
    OverlapError unless `cfg.allow_overlap`.

    Args:
        cand: (N,) int64 store rows of the candidates; quality, labels, lengths:
            (N,) per candidate, as the moment study uses them.
        probes: int64 store rows of the quality matrix's probes (checked for
            overlap only).

    Returns None when the build holds no SAE features, else dict(min_active,
    training_overlap (see `sae_training_overlap`), saes: one dict per SAE x mask
    x pooling with the features tested and the FVU reference its build recorded
    (None: a build from before per-example FVU used one), rows:
    candidate_correlations rows plus sae, mask, pooling, feature ("l0", "fvu",
    "explained" for the statistics), summary, replication, features: the
    SAE_TOP features by |rho| on label + log length, each with its
    SAE_EXAMPLES most-activating pool examples (id, label, activation, text)).
    Names read "sae|<key>|<mask>|<pooling or stat>|<feature>" (see `Signal`).
    """
    if not store.sae_groups:
        return None
    overlap = sae_training_overlap(store, cand, probes, cfg)
    signals: dict[str, np.ndarray] = {}
    tested, codes = [], {}
    for k16, mask in store.sae_groups:
        st = store.sae_stats(k16, mask)[cand]
        for j, name in enumerate(SAE_STATS):
            signals[str(Signal.sae_stat(k16, mask, name))] = st[:, j]
        for pooling in ("mean", "max"):
            C = store.sae_codes(k16, pooling, mask)  # (rows, d_sae) float32
            Cc = C[cand]
            active = (Cc > 0).sum(0)
            feats = np.flatnonzero(active >= cfg.sae_min_active)
            for f in feats:
                signals[str(Signal.sae_feature(k16, mask, pooling, f))] = Cc[:, f].astype(np.float64)
            codes[(shown_sae_key(k16), mask, pooling)] = C
            tested.append({"sae": k16, "mask": mask, "pooling": pooling, "d_sae": int(C.shape[1]),
                           "ever_active": int((active > 0).sum()), "tested": int(len(feats)),
                           **{k: v for k, v in (store.provenance.get("saes") or {}).get(k16, {}).items()
                              if k in ("hook", "layer", "kind", "fvu_reference")}})
    # p-values and BH over every signal; bootstrap CIs (n_boot resamples each, 60 ms per signal
    # at 1,000 candidates) only for the SAE statistics and the listed features: thousands of
    # features would take most of an hour for intervals nobody reads.
    def stage(desc):
        return (lambda _d, done, total: progress(desc, done, total)) if progress else None

    rows = candidate_correlations(signals, quality, labels, n_boot=0, seed=cfg.seed, lengths=lengths,
                                  progress=stage("SAE study"))
    for r in rows:
        r.update(Signal.parse(r["name"]).columns())
    replication = replicate(signals, quality, labels, lengths, top=10, n_boot=cfg.n_boot, seed=cfg.seed,
                            progress=stage("SAE discovery half"), halves=halves)
    confirmed = {t["name"]: t for t in replication["top"]}
    ranked = sorted((r for r in rows if r["pooling"] != "stat" and np.isfinite(r["rho_len"])),
                    key=lambda r: -abs(r["rho_len"]))[:SAE_TOP]
    with_ci = {r["name"] for r in ranked} | {r["name"] for r in rows if r["pooling"] == "stat"}
    cis = candidate_correlations({n: signals[n] for n in with_ci}, quality, labels, n_boot=cfg.n_boot,
                                 seed=cfg.seed, lengths=lengths)
    by_name = {r["name"]: r for r in rows}
    for c in cis:
        by_name[c["name"]].update({k: v for k, v in c.items() if k.startswith("ci_")})
    features = [_feature_entry(store, r, codes[(r["sae"], r["mask"], r["pooling"])], cand, confirmed.get(r["name"]))
                for r in ranked]
    return {"min_active": cfg.sae_min_active, "training_overlap": overlap, "saes": tested, "rows": rows,
            "summary": summarize(rows, ref=STUDY_REF),
            "replication": replication, "features": features}


