"""The report's plots: each writes its file, and what it draws is the result's
own numbers (read back from the matplotlib objects, compared with the rows)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from actcache import report  # noqa: E402
from actcache.capture import STATS  # noqa: E402


def _rows(with_len=True):
    rng = np.random.default_rng(7)
    rows = []
    for comp in ("mlp", "attn"):
        for mask in ("isolated", "label-masked"):
            for layer in (0, 3, 5):
                for stat in STATS:
                    r = {"name": f"{mask}|{comp}|{layer}|{stat}", "component": comp, "mask": mask,
                         "layer": layer, "stat": stat}
                    for key in ("rho_raw", "rho_strat", "rho_partial") + (("rho_len",) if with_len else ()):
                        r[key] = float(rng.uniform(-0.6, 0.6))
                    rows.append(r)
    if with_len:
        rows[4]["rho_len"] = float("nan")  # a statistic without a label + length value
    return rows


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report closes, kept for inspection."""
    kept = []
    close = plt.close

    def keep(fig=None):
        kept.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return kept


def test_heatmaps_show_raw_label_and_label_length_rho(tmp_path, figures):
    rows = _rows()
    files = report._heatmaps(rows, tmp_path)
    groups = sorted({(r["component"], r["mask"]) for r in rows})
    assert files == [f"heatmap_{c}_{m}.png" for c, m in groups]
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
    for fig, (comp, mask) in zip(figures, groups):
        panels = [ax for ax in fig.axes if ax.images]
        assert [ax.get_title() for ax in panels] == [t for _, t in report.RHO_PANELS]
        for ax, key in zip(panels, ("rho_raw", "rho_partial", "rho_len")):
            shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
            for r in rows:
                if (r["component"], r["mask"]) != (comp, mask):
                    continue
                v = shown[[0, 3, 5].index(r["layer"]), STATS.index(r["stat"])]
                assert (math.isnan(v) and math.isnan(r[key])) or v == r[key], (key, r["name"])


def test_heatmaps_without_length_control_have_two_panels(tmp_path, figures):
    rows = _rows(with_len=False)
    report._heatmaps(rows, tmp_path)
    assert all(len([ax for ax in fig.axes if ax.images]) == 2 for fig in figures)


def test_rho_vs_layer_plots_max_abs_rho_per_control(tmp_path, figures):
    rows = _rows()
    assert report._rho_vs_layer(rows, tmp_path) == "rho_vs_layer.png"
    assert (tmp_path / "rho_vs_layer.png").stat().st_size > 0
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 3
    for ax, key in zip(axes, ("rho_raw", "rho_partial", "rho_len")):
        lines = {ln.get_label(): ln for ln in ax.lines}
        for comp, mask in {(r["component"], r["mask"]) for r in rows}:
            ln = lines[f"{comp}/{mask}"]
            assert list(ln.get_xdata()) == [0, 3, 5]
            for L, y in zip((0, 3, 5), ln.get_ydata()):
                vals = [abs(r[key]) for r in rows if (r["component"], r["mask"], r["layer"]) == (comp, mask, L)
                        and not math.isnan(r[key])]
                assert y == max(vals)
        ref = [ln for ln in ax.lines if ln.get_label().startswith("study max")]
        assert ref and ref[0].get_ydata()[0] == report.STUDY_REF


SUMMARY = [
    {"strategy": "zero-shot", "mean": 0.55, "ci_lo": 0.45, "ci_hi": 0.65, "diff_vs_baseline": -0.163,
     "diff_lo": -0.268, "diff_hi": -0.063},
    {"strategy": "random+turns", "mean": 0.713, "ci_lo": 0.624975, "ci_hi": 0.797025},
    {"strategy": "knn@L9", "mean": 0.68, "ci_lo": 0.59, "ci_hi": 0.77, "diff_vs_baseline": -0.033,
     "diff_lo": -0.144, "diff_hi": 0.08},
    {"strategy": "k-center+turns", "mean": 0.803, "ci_lo": 0.727, "ci_hi": 0.881, "diff_vs_baseline": 0.09,
     "diff_lo": -0.009, "diff_hi": 0.194},
]


def _err_extents(eb):
    """(low, high) of each vertical error bar of an errorbar container."""
    (segs,) = [c for c in eb.lines[2]]
    return [v for s in segs.get_segments() for v in (float(min(s[:, 1])), float(max(s[:, 1])))]


def test_accuracy_plot_bars_and_intervals_are_the_summary(tmp_path, figures):
    res = SimpleNamespace(task="sst2", sizes=SimpleNamespace(k=4),
                          selection=SimpleNamespace(summary=SUMMARY, baseline="random+turns"))
    assert report._accuracy_plot(res, tmp_path) == "accuracy_by_strategy.png"
    assert (tmp_path / "accuracy_by_strategy.png").stat().st_size > 0
    (fig,) = figures
    acc_ax, diff_ax = fig.axes[:2]
    assert [b.get_height() for b in acc_ax.patches] == pytest.approx([s["mean"] for s in SUMMARY], abs=1e-12)
    assert [t.get_text() for t in acc_ax.get_xticklabels()] == [s["strategy"] for s in SUMMARY]
    assert _err_extents(acc_ax.containers[1]) == pytest.approx([v for s in SUMMARY for v in (s["ci_lo"], s["ci_hi"])],
                                                                abs=1e-12)
    diffs = [s for s in SUMMARY if "diff_vs_baseline" in s]
    assert [b.get_height() for b in diff_ax.patches] == pytest.approx([s["diff_vs_baseline"] for s in diffs],
                                                                       abs=1e-12)
    assert [t.get_text() for t in diff_ax.get_xticklabels()] == [s["strategy"] for s in diffs]
    assert _err_extents(diff_ax.containers[1]) == pytest.approx([v for s in diffs for v in (s["diff_lo"], s["diff_hi"])],
                                                                 abs=1e-12)


def test_accuracy_bars_reads_the_summary_unchanged():
    d = report.accuracy_bars(SUMMARY)
    assert d["mean"] == [s["mean"] for s in SUMMARY]
    assert d["ci_lo"] == [s["ci_lo"] for s in SUMMARY] and d["ci_hi"] == [s["ci_hi"] for s in SUMMARY]
    assert d["diff_strategy"] == ["zero-shot", "knn@L9", "k-center+turns"]
    assert d["diff_hi"] == [-0.063, 0.08, 0.194]
