"""The evaluation report of an `EvalResult`: report.md, results.json (its
`to_dict()`), CSVs of every number, per-item samples, and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict
from pathlib import Path


import numpy as np

from .capture import STATS
from .config import EvalResult
from .display import num
from .store import shown_sae_key
from .study import STUDY_REF, Signal


def headline(res: EvalResult) -> list[list[str]]:
    """Rows of the printed table: strategy, mean accuracy with its 95 % interval
    over eval inputs and seeds, the std over seeds, the paired difference from
    balanced random with its interval, and how many seeds gave distinct prompts."""
    summ = res.selection.summary
    mc = any("acc_norm" in s for s in summ)  # multiple choice: the harness's acc and acc_norm side by side
    base = getattr(res.selection, "baseline", "random+turns")
    rows = [["strategy", f"{res.sizes.k}-shot {'acc' if mc else 'accuracy'} [95% CI]", "std over seeds",
             f"− {base} [95% CI]"] + (["acc_norm"] if mc else []) + ["seeds (distinct)"]]
    for s in summ:
        diff = "baseline" if s["strategy"] == base else (
            f"{s['diff_vs_baseline']:+.3f} [{s['diff_lo']:+.3f}, {s['diff_hi']:+.3f}]"
            if "diff_vs_baseline" in s else "—")
        std = "—" if s["n_seeds"] == 1 else "deterministic" if s.get("n_distinct") == 1 else num(s["std"])
        rows.append([s["strategy"], f"{num(s['mean'])} [{num(s.get('ci_lo'))}, {num(s.get('ci_hi'))}]", std, diff]
                    + ([num(s.get("acc_norm"))] if mc else []) + [f"{s['n_seeds']} ({s.get('n_distinct', '—')})"])
    return rows


def token_lines(res: EvalResult) -> list[str]:
    """Forward tokens computed vs tokens in the prompts, for the selection
    experiment and (when the results carry it) the quality matrix."""
    lines = []
    for name, t in (("quality matrix", res.quality_tokens), ("selection", res.selection.tokens)):
        if t and t.get("in_prompts"):
            lines.append(f"{name} tokens: {t['computed']:,} computed of {t['in_prompts']:,} in prompts "
                         f"({t['computed'] / t['in_prompts']:.1%}; the rest reused as cached KV prefixes)")
    return lines


def summary_lines(res: EvalResult) -> list[str]:
    """The summary: raw and controlled maximum |rho| beside the study's 0.33."""
    sm = res.study.summary
    ref = STUDY_REF
    lines = [
        f"max |rho| raw        = {num(sm.get('raw_max_abs_rho'))}  at {sm.get('raw_max_name')}",
        f"max |rho| controlled = {num(sm.get('controlled_max_abs_rho'))}  at {sm.get('controlled_max_name')} "
        f"({sm.get('controlled_max_measure')})",
        f"   within-label      = {num(sm.get('strat_max_abs_rho'))}  at {sm.get('strat_max_name')}",
        f"   partial on label  = {num(sm.get('partial_max_abs_rho'))}  at {sm.get('partial_max_name')}",
        f"   label + log length= {num(sm.get('len_max_abs_rho'))}  at {sm.get('len_max_name')}",
        f"study reference      = {ref}   rho(demo label, quality) = {num(res.study.label_rho)}"
        f"   rho(demo length, quality) = {num(res.study.length_rho)}",
    ]
    rep = res.study.replication
    if rep and rep["top"]:
        n_ok = sum(t["replicates"] for t in rep["top"])
        b = rep["top"][0]
        lines.append(f"replication: {n_ok}/{len(rep['top'])} of the discovery top {len(rep['top'])} replicate on "
                     f"the confirmation half (own candidates and own probes; n={rep['n_discovery']}/"
                     f"{rep['n_confirmation']}); best {b['name']} rho {num(b['rho_discovery'])} -> "
                     f"{num(b['rho_confirmation'])}")
        if "mde" in rep:
            lines.append(f"confirmation power: detects |rho| >= {num(rep['mde'])} with {rep['power']:.0%} power at "
                         f"alpha {rep['alpha']}/{len(rep['top'])}; the discovery best needs n >= {rep['n_needed']}")
    push = getattr(res.study, "push", None)
    if push:
        lines.append(f"label push: within-label rho(push, quality) = {num(push['rho_within_label'])} under "
                     f"quality '{push['quality_def']}'; probe labels {push['probe_labels']}")
    why = {r["strategy"]: r["skipped"] for r in res.selection.runs if "skipped" in r}
    lines += [f"skipped {name}: {reason}" for name, reason in why.items()]
    sae = res.study.sae
    if sae:
        ss, rep = sae["summary"], sae["replication"]
        lines.append(f"SAE features ({len(sae['rows'])} signals): max |rho| raw = {num(ss.get('raw_max_abs_rho'))}, "
                     f"label + log length = {num(ss.get('len_max_abs_rho'))} at {ss.get('len_max_name')}; "
                     f"{sum(t['replicates'] for t in rep['top'])}/{len(rep['top'])} of the discovery top replicate")
        lines += overlap_lines(sae.get("training_overlap") or [], clean=False)
    dr = res.selection.dropped_demonstrations
    if dr:
        lines.append(f"prompts over {res.selection.max_length} tokens dropped demonstrations: {dr}")
    fl = res.selection.flips
    if fl:
        lines.append(f"{fl['dtype']} vs float32 zero-shot: {fl['flipped']}/{fl['n']} predictions flip")
    return lines + token_lines(res)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# The correlations each plot shows, side by side: (row key, panel title).  The
# label + length control is the one the discovery half ranks by.
RHO_PANELS = (("rho_raw", "raw ρ"), ("rho_partial", "controlled on label (partial)"),
              ("rho_len", "controlled on label + log length (partial)"))


def _panels(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """The panels of RHO_PANELS the rows hold (a study without lengths has no
    label + length column)."""
    return tuple(p for p in RHO_PANELS if any(p[0] in r for r in rows))


def heatmap_matrices(rows: list[dict], keys) -> dict[tuple[str, str], tuple[list[int], dict[str, np.ndarray]]]:
    """Per (component, mask): its layers and, per key, the (layers × STATS)
    matrix of that ρ as the study's rows hold it (NaN where a row is absent)."""
    out = {}
    for comp, mask in sorted({(r["component"], r["mask"]) for r in rows}):
        sub = [r for r in rows if r["component"] == comp and r["mask"] == mask]
        layers = sorted({r["layer"] for r in sub})
        mats = {}
        for key in keys:
            M = np.full((len(layers), len(STATS)), np.nan)
            for r in sub:
                M[layers.index(r["layer"]), STATS.index(r["stat"])] = r.get(key, np.nan)
            mats[key] = M
        out[(comp, mask)] = (layers, mats)
    return out


def max_abs_by_layer(rows: list[dict], keys) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Per key and `component/mask`: layers and the largest |ρ| over the
    statistics at each layer, read from the rows."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for key in keys:
        out[key] = {}
        for comp, mask in sorted({(r["component"], r["mask"]) for r in rows}):
            sub = [r for r in rows if r["component"] == comp and r["mask"] == mask]
            layers = sorted({r["layer"] for r in sub})
            vals = []
            for L in layers:
                xs = [abs(r[key]) for r in sub if r["layer"] == L and key in r and math.isfinite(r[key])]
                vals.append(max(xs) if xs else float("nan"))
            out[key][f"{comp}/{mask}"] = (layers, vals)
    return out


def _heatmaps(rows: list[dict], out: Path) -> list[str]:
    import matplotlib  # here: plotting is optional work, kept out of import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: after the Agg backend is chosen

    files = []
    panels = _panels(rows)
    for (comp, mask), (layers, mats) in heatmap_matrices(rows, [k for k, _ in panels]).items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), max(2.5, 0.22 * len(layers) + 1.5)),
                                 sharey=True, squeeze=False)
        axes = axes[0]
        for ax, (key, title) in zip(axes, panels):
            im = ax.imshow(mats[key], vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
            ax.set_xticks(range(len(STATS)), STATS, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), layers)
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("layer")
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="Spearman ρ")
        fig.suptitle(f"{comp} / {mask}: statistic vs candidate quality")
        name = f"heatmap_{comp}_{mask}.png"
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def _rho_vs_layer(rows: list[dict], out: Path) -> str:
    import matplotlib  # here: plotting is optional work, kept out of import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: after the Agg backend is chosen

    panels = _panels(rows)
    data = max_abs_by_layer(rows, [k for k, _ in panels])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        for label, (layers, best) in data[key].items():
            ax.plot(layers, best, marker=".", label=label)
        ax.axhline(STUDY_REF, color="k", ls="--", lw=1, label=f"study max {STUDY_REF}")
        ax.set_xlabel("layer")
        ax.set_title(f"max |ρ| over statistics: {title}", fontsize=9)
    axes[0].set_ylabel("|Spearman ρ|")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.savefig(out / "rho_vs_layer.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "rho_vs_layer.png"


def _bars(ax, labels: list[str], est: list[float], lo: list[float], hi: list[float], colors):
    """Bars at `est` with error bars reaching exactly `lo` and `hi` (none where
    an interval is missing); returns matplotlib's bar and errorbar containers."""
    x = np.arange(len(labels))
    est_a, lo_a, hi_a = (np.array(v, dtype=np.float64) for v in (est, lo, hi))
    err = np.nan_to_num(np.array([est_a - lo_a, hi_a - est_a]))
    bars = ax.bar(x, est_a, color=colors)
    eb = ax.errorbar(x, est_a, yerr=err, fmt="none", ecolor="k", capsize=4, lw=1)
    ax.set_xticks(x, labels, rotation=40, ha="right", fontsize=8)
    return bars, eb


def accuracy_bars(summary: list[dict]) -> dict[str, list]:
    """The accuracy plot's numbers, as the selection summary holds them: per
    strategy its accuracy and 95 % interval, and (all but the baseline) the
    paired difference from balanced random with its interval."""
    diffs = [s for s in summary if "diff_vs_baseline" in s]
    return {"strategy": [s["strategy"] for s in summary], "mean": [s["mean"] for s in summary],
            "ci_lo": [s.get("ci_lo", s["mean"]) for s in summary], "ci_hi": [s.get("ci_hi", s["mean"]) for s in summary],
            "diff_strategy": [s["strategy"] for s in diffs], "diff": [s["diff_vs_baseline"] for s in diffs],
            "diff_lo": [s.get("diff_lo", s["diff_vs_baseline"]) for s in diffs],
            "diff_hi": [s.get("diff_hi", s["diff_vs_baseline"]) for s in diffs]}


def draw_accuracy(axes, summary: list[dict], k: int, baseline: str) -> dict[str, tuple]:
    """Draw the accuracy bars (95 % intervals over inputs and seeds) on
    `axes[0]` and the paired differences from balanced random on `axes[1]`;
    returns the (bars, errorbar) containers of each panel."""
    d = accuracy_bars(summary)
    colors = ["#888" if s == "zero-shot" else "#37a" if s == baseline else "#3a7" for s in d["strategy"]]
    drawn = {"accuracy": _bars(axes[0], d["strategy"], d["mean"], d["ci_lo"], d["ci_hi"], colors)}
    axes[0].set_ylabel(f"{k}-shot accuracy (95% CI over inputs and seeds)")
    axes[0].set_ylim(0, 1)
    if d["diff_strategy"]:
        drawn["diff"] = _bars(axes[1], d["diff_strategy"], d["diff"], d["diff_lo"], d["diff_hi"], "#a73")
        axes[1].axhline(0, color="k", lw=1)
        axes[1].set_ylabel(f"− {baseline} (paired, 95% CI)")
    else:
        axes[1].set_axis_off()
    return drawn


def _accuracy_plot(res: EvalResult, out: Path) -> str:
    import matplotlib  # here: plotting is optional work, kept out of import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: after the Agg backend is chosen

    sm = res.selection.summary
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(6, 0.6 * len(sm) + 2), 4))
    draw_accuracy(axes, sm, res.sizes.k, res.selection.baseline)
    fig.suptitle(f"{res.task}: accuracy by selection strategy")
    fig.savefig(out / "accuracy_by_strategy.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "accuracy_by_strategy.png"


def _family_row(label: str, rows: list[dict], rep: dict | None) -> list[str]:
    """One line of the family comparison: tests, max |rho| raw and controlled, BH hits, replication."""
    def top(k):
        v = [abs(r[f"rho_{k}"]) for r in rows if math.isfinite(r.get(f"rho_{k}", float("nan")))]
        return num(max(v)) if v else "nan"

    hits = sum(1 for r in rows if r.get("q_len", 1.0) < 0.05)
    t = (rep or {}).get("top") or []
    best = max((x["rho_confirmation"] for x in t if x["replicates"]), key=abs, default=None)
    return [label, str(len(rows)), top("raw"), top("strat"), top("partial"), top("len"), str(hits),
            f"{sum(x['replicates'] for x in t)}/{len(t)}", num(best)]


def _sae_md(res: EvalResult) -> list[str]:
    """The SAE-feature study beside the moment statistics, and its top features with the pool
    examples that activate them most."""
    sae = res.study.sae
    if not sae:
        return []
    fam = [["signals", "tests", "max raw |ρ|", "within-label", "partial (label)", "partial (label + log length)",
            "q < 0.05 (label + length)", "replicate of top 10", "best replicated ρ (confirmation)"],
           _family_row("moment statistics", res.study.rows, res.study.replication),
           _family_row("SAE features + SAE statistics", sae["rows"], sae["replication"])]
    tested = [["SAE", "hook", "layer", "mask", "pooling", "width", "ever active",
               f"tested (active in ≥ {sae['min_active']})", "FVU reference mean"]]
    tested += [[shown_sae_key(t["sae"]), str(t.get("hook")), str(t.get("layer")), t["mask"], t["pooling"],
                str(t["d_sae"]), str(t["ever_active"]), str(t["tested"]),
                t.get("fvu_reference") or "each span's own (older build)"]
               for t in sae["saes"]]
    feats = [["feature", "active in", "raw ρ", "partial ρ (label + length)", "q", "confirmation ρ", "replicates",
              "most-activating pool examples (label, activation)"]]
    for f in sae["features"]:
        ex = "<br>".join(f"{e['label']}, {e['activation']:.2f}: {_md_cell(e['text'][:120])}" for e in f["examples"])
        feats.append([f"{shown_sae_key(f['sae'])}/{f['mask']}/{f['pooling']}/**{f['feature']}**",
                      str(f["n_active"]), num(f["rho_raw"]), num(f["rho_len"]), num(f["q_len"]),
                      num(f["rho_confirmation"]),
                      {True: "yes", False: "no", None: "—"}[f["replicates"]], ex])
    return ["## SAE features beside the moment statistics", "",
            "Each family has its own Benjamini–Hochberg correction and its own discovery/confirmation split "
            "(same halves). An SAE feature is tested when its pooled activation is non-zero in at least "
            f"{sae['min_active']} candidates (`--sae-min-active`).", "",
            *_md_table(fam), "", *_md_table(tested), "", *_overlap_md(sae.get("training_overlap") or []),
            f"### Top {len(sae['features'])} SAE features by |partial ρ| on label + log length", "",
            "Chosen on all candidates, so these ρ are biased upward; the confirmation ρ is the estimate.", "",
            *_md_table(feats), "", *_replication_md(sae["replication"], "SAE features: discovery and confirmation")]


def overlap_lines(overlap: list[dict], clean: bool = True) -> list[str]:
    """One line per SAE: how many candidates and probes it trained on
    (study.sae_training_overlap); `clean` False leaves out SAEs that trained on none."""
    lines = []
    for o in overlap:
        c, p, key = o["candidates"], o["probes"], shown_sae_key(o["sae"])
        if o["status"] == "unknown":
            lines.append(f"SAE {key} records no training texts (loaded from SAELens / Gemma Scope, or trained "
                         f"before actcache recorded them): whether it trained on the candidates or probes is unknown")
        elif c["n_overlap"] or p["n_overlap"]:
            ids = ", ".join((c["ids"] + p["ids"])[:5])
            lines.append(f"SAE {key} trained on the text of {c['n_overlap']} of {c['n_rows']} candidates and "
                         f"{p['n_overlap']} of {p['n_rows']} probes (run with --allow-overlap; e.g. {ids})")
        elif clean:
            lines.append(f"SAE {key} trained on none of the {c['n_rows']} candidates and {p['n_rows']} probes")
    return lines


def _overlap_md(overlap: list[dict]) -> list[str]:
    if not overlap:
        return []
    return ["**Training text.** An SAE's features read on the examples it learnt from are not a held-out "
            "measurement; `actcache sae train --exclude-build KEY` trains one without a build's rows.", "",
            *[f"- {_md_cell(line)}" for line in overlap_lines(overlap)], ""]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _replication_md(rep: dict | None, title: str = "Discovery and confirmation") -> list[str]:
    if not rep or not rep["top"]:
        return []
    power = (f" At n = {rep['n_confirmation']} the confirmation detects |ρ| ≥ {num(rep['mde'])} with "
             f"{rep['power']:.0%} power (two-sided, α = {rep['alpha']}/{len(rep['top'])}, the strictest BH step; label "
             f"and log length partialled out); the discovery best would need n ≥ {rep['n_needed']} (discovery "
             "maxima are inflated, so that is a lower bound). *powered*: |ρ discovery| ≥ that bound."
             if "mde" in rep else "")
    return [f"## {title}", "",
            f"Discovery (n={rep['n_discovery']} candidates) and confirmation (n={rep['n_confirmation']}) each have "
            "their own candidates and their own label-balanced probes, with no near-duplicate key shared: a "
            "signal that tracks what one probe set rewards cannot replicate by construction. The top "
            f"{len(rep['top'])} statistics by |partial ρ| on label + log length are chosen on discovery and "
            "re-tested on confirmation: they *replicate* with the same sign, a 95 % bootstrap CI excluding 0, "
            "and BH q < 0.05 within the confirmation family." + power, "",
            *_md_table([["statistic", "ρ discovery", "ρ confirmation", "95% CI", "q", "replicates", "powered"]] + [
                [Signal.parse(t["name"]).format("/"), num(t["rho_discovery"]), num(t["rho_confirmation"]),
                 f"[{num(t['ci_lo'])}, {num(t['ci_hi'])}]", num(t["q"]), "yes" if t["replicates"] else "no",
                 {True: "yes", False: "no", None: "—"}[t.get("powered")]]
                for t in rep["top"]]), ""]


def hardware_lines(hw: dict | None) -> list[str]:
    """Markdown lines: what this evaluation ran on, and a note for every cached
    artifact (the build's arrays, the quality matrix) computed on another
    capability class (bf16 on AMX vs fp32 elsewhere gives slightly other numbers)."""
    if not hw:
        return []
    here = hw["evaluate"]
    out = [f"- ran on: {here.get('class')} ({here.get('device_name')}), {here.get('threads')} threads, "
           f"dtype {hw['dtype']} ({'auto' if hw.get('dtype_requested') == 'auto' else 'as asked'})"]
    for what in ("build", "quality_matrix"):
        other = hw.get(what) or {}
        if other.get("class") and other["class"] != here.get("class"):
            out.append(f"- note: the cached {what.replace('_', ' ')} was computed on {other['class']} "
                       f"({other.get('device_name')}), not on this machine's {here.get('class')}")
    return out


def _jsonl(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def _write_samples(res: EvalResult, out: Path) -> list[str]:
    """Per-item records, like lm-evaluation-harness's --log_samples:
    samples/<strategy>_seed<s>.jsonl (eval id, demonstration ids in prompt order,
    per-option log-probs, prediction, gold) and samples/quality_pairs.jsonl (the
    quality matrix, one line per candidate x probe pair)."""
    d = out / "samples"
    d.mkdir(exist_ok=True)
    names = []
    for run in res.selection.samples:
        name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{run['strategy']}_seed{run['seed']}") + ".jsonl"
        _jsonl(d / name, ({"strategy": run["strategy"], "seed": run["seed"], **it} for it in run["items"]))
        names.append(name)
    qp = res.quality_pairs
    if qp:
        _jsonl(d / "quality_pairs.jsonl", (
            {"candidate_id": c, "probe_id": p, "half": ("discovery", "confirmation")[qp["cand_half"][i]],
             "correct": qp["correct"][i][j], "margin": qp["margin"][i][j]}
            for i, c in enumerate(qp["cand_ids"]) for j, p in enumerate(qp["probe_ids"])
            if qp["cand_half"][i] == qp["probe_half"][j]))  # pairs across halves are not scored
        names.append("quality_pairs.jsonl")
    return names


def write(res: EvalResult, out: Path) -> dict:
    """Write report.md, results.json (`res.to_dict()`), CSVs, samples/ and PNGs
    into `out`; returns the file names of the plots and samples."""
    out.mkdir(parents=True, exist_ok=True)
    doc = res.to_dict()
    rows = res.study.rows
    files = {"plots": _heatmaps(rows, out) + [_rho_vs_layer(rows, out), _accuracy_plot(res, out)]}
    _write_csv(out / "correlations.csv", rows)
    _write_csv(out / "pairs.csv", res.study.pairs)
    if res.study.sae:
        _write_csv(out / "sae_correlations.csv", res.study.sae["rows"])
    _write_csv(out / "selection.csv", res.selection.runs)
    files["samples"] = _write_samples(res, out)
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    top = sorted(rows, key=lambda r: -abs(r["rho_raw"]) if math.isfinite(r["rho_raw"]) else 0)[:10]
    md = [f"# actcache evaluation: {res.task}", "",
          f"- build key: `{res.build_key}`", f"- quality matrix key: `{res.quality_key}`",
          f"- model: `{res.model.get('model')}` ({res.model.get('dtype')}, weights sha256 "
          f"`{str(res.model.get('weights_sha256'))[:16]}…`)",
          *hardware_lines(res.hardware),
          f"- sizes: {doc['sizes']}", f"- versions: {res.versions}",
          f"- config: `{json.dumps(asdict(res.config), default=str)}`", "",
          "## Selection experiment", "",
          f"{len(res.selection.eval_ids)} eval inputs, none a probe or a probe's near-duplicate; subset strategies "
          "never pick a near-duplicate of an eval input. Accuracy: mean over seeds and eval inputs with a 95 % "
          "two-way bootstrap interval (inputs and seeds resampled); the difference from balanced random is paired "
          "on inputs. How each strategy's options were chosen:", "",
          *[f"- `{s['strategy']}`: {s.get('chosen', '')}" for s in res.selection.summary], "",
          *_md_table(headline(res)), "",
          "## Correlation summary", "", "```", *summary_lines(res), "```", "",
          "Controlled ρ: *within-label* is the Fisher-z pooled Spearman within each demonstration label "
          "(weights n−3); *partial* is the Spearman partial correlation on the label (rank residualisation). "
          "Benjamini–Hochberg q-values cover every raw and controlled test together.", "",
          "## Top 10 statistics by raw |ρ|: raw, label-controlled, label + length-controlled", "",
          *_md_table([["statistic", "raw ρ", "95% CI", "q", "within-label ρ", "partial ρ (label)", "q",
                       "partial ρ (label + log length)", "q"]] + [
              [Signal.parse(r["name"]).format("/"), num(r["rho_raw"]),
               f"[{num(r['ci_raw_lo'])}, {num(r['ci_raw_hi'])}]",
               num(r["q_raw"]), num(r["rho_strat"]), num(r["rho_partial"]), num(r["q_partial"]),
               num(r.get("rho_len")), num(r.get("q_len"))] for r in top]),
          "", *_replication_md(res.study.replication), *_sae_md(res),
          "", "## Pair level (candidate–probe cosine similarity vs 1-shot score)", "",
          *_md_table([["array", "half", "mean ρ per probe", "partial (label, match)", "pooled partial ρ"]] + [
              [f"{p['component']}/L{p['layer']}/{p['mask']}", p.get("half", "—"), num(p.get("probe_raw_mean")),
               num(p.get("probe_partial_mean")), num(p.get("pooled_partial_rho"))] for p in res.study.pairs]),
          "", "## Plots", "", *[f"![{p}]({p})" for p in files["plots"]], ""]
    (out / "report.md").write_text("\n".join(md))
    return files


def _md_table(rows: list[list[str]]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
