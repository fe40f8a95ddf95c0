"""Correlation statistics for "does an activation statistic predict demo quality?".

Why this module exists
----------------------
In a 1-shot in-context study a demonstration's own label strongly drives its
measured quality (on a balanced probe set the model is pushed toward the demo's
label).  Any activation statistic that differs by label therefore correlates
with quality *through the label alone*.  We report raw correlations and
label-controlled correlations side by side:

* ``spearman``             -- raw rank correlation.
* ``stratified_spearman``  -- within-label Spearman, pooled across labels by
  Fisher z with weights ``n_g - 3``.
* ``partial_spearman``     -- partial rank correlation: ranks residualised on
  ``[1, covariates]`` by least squares, Pearson of the residuals.

Conventions
-----------
* Inputs are array-likes; statistics are cast to ``float64``.  Label/group
  arrays may have any dtype that ``np.unique`` can sort (ints, strings, bools).
* Rows with a non-finite value in any numeric input are dropped before a
  correlation is computed (complete-case analysis).
* Degenerate cases (fewer than 3 usable rows, constant input, no usable group,
  nothing left after residualising) give ``nan`` rather than a warning or an
  exception: these functions run inside bootstrap loops and over many
  statistics, where one degenerate cell must not abort the whole table.
* Invalid arguments (shape mismatches, p-values outside [0, 1], ...) raise
  :class:`actcache.errors.ConfigError`.
* The library never prints.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _st

from .errors import ConfigError

__all__ = [
    "spearman",
    "stratified_spearman",
    "partial_spearman",
    "bootstrap_ci",
    "benjamini_hochberg",
    "label_balanced_quality",
    "mean_quality",
    "label_push",
    "min_detectable_rho",
    "candidate_correlations",
    "pair_correlations",
    "summarize",
    "split_halves",
    "replicate",
]

# |rho| is clipped to 1 - _CLIP before arctanh so a perfect within-group rank
# correlation gives a large but finite Fisher z instead of inf (which would
# swamp the pooled mean and turn it into nan when signs disagree).
_CLIP = 1e-12
# A residual vector whose sum of squares is below _DEGEN times the sum of
# squares of the centred ranks it came from is "nothing left": the variable is
# (numerically) a linear function of the covariates, so its partial
# correlation is undefined.  lstsq leaves ~1e-13 relative noise there.
_DEGEN = 1e-10
# Smallest group that stratified_spearman uses: the Fisher-z weight n_g - 3
# must be positive.
_MIN_GROUP = 4


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def _as_1d(name: str, a: Any, n: int | None = None) -> np.ndarray:
    """``np.asarray(a)`` checked to be 1-D (and of length ``n`` when given)."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {arr.shape}; pass one value per row.")
    if n is not None and arr.shape[0] != n:
        raise ConfigError(
            f"{name} has {arr.shape[0]} rows but {n} were expected; pass arrays of equal length."
        )
    return arr


def _as_float_1d(name: str, a: Any, n: int | None = None) -> np.ndarray:
    arr = _as_1d(name, a, n)
    try:
        return arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be numeric; got dtype {arr.dtype}.") from exc


def _isfinite_any(a: np.ndarray) -> np.ndarray:
    """Row mask of usable values: finite for floats, not-None/not-nan otherwise."""
    if a.dtype.kind in "fc":
        return np.isfinite(a)
    if a.dtype.kind == "O":
        return np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in a],
                        dtype=bool)
    return np.ones(a.shape[0], dtype=bool)


def _fisher_z(r: np.ndarray | float) -> np.ndarray | float:
    """arctanh with |r| clipped to 1 - _CLIP (see _CLIP)."""
    return np.arctanh(np.clip(r, -1.0 + _CLIP, 1.0 - _CLIP))


def _first(v: Any) -> float:
    """A statistic function may return a scalar or a (stat, p) tuple: take the stat."""
    if isinstance(v, (tuple, list)) or (isinstance(v, np.ndarray) and v.ndim > 0):
        v = v[0]
    return float(v)


# --------------------------------------------------------------------------
# 1. Spearman
# --------------------------------------------------------------------------
def spearman(x: Any, y: Any) -> tuple[float, float]:
    """Spearman rank correlation with its two-sided p-value.

    Parameters
    ----------
    x, y : array-like, shape (N,), numeric (cast to float64)
        Paired observations.  Pairs with a non-finite value are dropped.

    Returns
    -------
    (rho, p) : tuple of float
        ``scipy.stats.spearmanr`` on the complete pairs (average ranks for
        ties; p from the t distribution with n - 2 df).  ``(nan, nan)`` when
        fewer than 3 complete pairs remain or either input is constant --
        scipy would warn (``ConstantInputWarning``) and return nan; we check
        first and also silence that warning deliberately, because this runs
        inside bootstrap loops where constant resamples are expected.
    """
    xa = _as_float_1d("x", x)
    ya = _as_float_1d("y", y, xa.shape[0])
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if xa.shape[0] < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _st.ConstantInputWarning)
        res = _st.spearmanr(xa, ya)
    return float(res.statistic), float(res.pvalue)


# --------------------------------------------------------------------------
# 2. stratified (within-group) Spearman
# --------------------------------------------------------------------------
def stratified_spearman(x: Any, y: Any, groups: Any) -> tuple[float, float]:
    """Within-group Spearman correlation pooled across groups (meta-analysis).

    Parameters
    ----------
    x, y : array-like, shape (N,), numeric
    groups : array-like, shape (N,), any sortable dtype (e.g. labels)

    Returns
    -------
    (rho, p) : tuple of float

    Weighting (document this in reports)
    ------------------------------------
    For every group g with complete pairs, ``rho_g = spearman(x_g, y_g)`` is
    computed on ranks *within* the group, so between-group differences (e.g. a
    label shifting both x and y) cannot contribute.  Groups with
    ``n_g < 4`` or a constant x or y are skipped.  The usable groups are pooled
    by Fisher z with inverse-variance weights ``w_g = n_g - 3`` (standard
    meta-analytic pooling; Var(arctanh r) ~ 1/(n - 3))::

        z_pooled = sum_g w_g * arctanh(rho_g) / sum_g w_g
        rho      = tanh(z_pooled)
        p        = 2 * (1 - Phi(|z_pooled| * sqrt(sum_g w_g)))

    (|rho_g| is clipped to 1 - 1e-12 before arctanh.)  The 1/(n - 3) variance
    is the Pearson approximation; for Spearman the true variance is slightly
    larger (Fieller et al. use 1.06/(n - 3)), so this p is mildly liberal.
    ``(nan, nan)`` when no group is usable.
    """
    xa = _as_float_1d("x", x)
    n = xa.shape[0]
    ya = _as_float_1d("y", y, n)
    g = _as_1d("groups", groups, n)
    ok = np.isfinite(xa) & np.isfinite(ya) & _isfinite_any(g)
    xa, ya, g = xa[ok], ya[ok], g[ok]
    if xa.shape[0] == 0:
        return float("nan"), float("nan")
    _, inv = np.unique(g, return_inverse=True)
    num = 0.0
    den = 0.0
    for k in range(int(inv.max()) + 1):
        sel = inv == k
        n_g = int(sel.sum())
        if n_g < _MIN_GROUP:
            continue
        r, _ = spearman(xa[sel], ya[sel])
        if not np.isfinite(r):
            continue
        w = n_g - 3
        num += w * float(_fisher_z(r))
        den += w
    if den <= 0:
        return float("nan"), float("nan")
    z = num / den
    stat = z * np.sqrt(den)
    p = 2.0 * _st.norm.sf(abs(stat))
    return float(np.tanh(z)), float(p)


# --------------------------------------------------------------------------
# 3. partial Spearman
# --------------------------------------------------------------------------
def _covariate_columns(covariates: Any, n: int) -> list[np.ndarray]:
    """Split covariates into 1-D columns of length n.

    None -> no columns; 1-D array -> one column; 2-D array -> its columns
    (axis 1); list/tuple -> each element is one column (lets columns have
    different dtypes, e.g. a string label and a float score).
    """
    if covariates is None:
        return []
    if isinstance(covariates, (list, tuple)):
        return [_as_1d(f"covariates[{i}]", c, n) for i, c in enumerate(covariates)]
    arr = np.asarray(covariates)
    if arr.ndim == 1:
        return [_as_1d("covariates", arr, n)]
    if arr.ndim == 2:
        if arr.shape[0] != n:
            raise ConfigError(
                f"covariates has {arr.shape[0]} rows but {n} were expected; "
                "pass covariates with shape (N,) or (N, c)."
            )
        return [arr[:, j] for j in range(arr.shape[1])]
    raise ConfigError(f"covariates must be (N,) or (N, c); got shape {arr.shape}.")


def _categorical_flags(cols: list[np.ndarray], categorical: Any) -> list[bool]:
    if categorical is None:
        # Auto: integer / bool / string / object columns are labels
        # (one-hot); float columns are numeric (rank-transformed).
        return [c.dtype.kind in "biuUSO" for c in cols]
    if isinstance(categorical, (bool, np.bool_)):
        return [bool(categorical)] * len(cols)
    flags = [bool(f) for f in categorical]
    if len(flags) != len(cols):
        raise ConfigError(
            f"categorical has {len(flags)} entries but there are {len(cols)} covariate columns; "
            "pass one flag per column or a single bool."
        )
    return flags


def _one_hot_drop_first(col: np.ndarray) -> np.ndarray:
    """(n, L-1) float dummies for the L levels of col, first (sorted) level dropped."""
    _, inv = np.unique(col, return_inverse=True)
    n_lev = int(inv.max()) + 1 if inv.size else 0
    out = np.zeros((col.shape[0], max(n_lev - 1, 0)))
    if n_lev > 1:
        rows = np.flatnonzero(inv > 0)
        out[rows, inv[rows] - 1] = 1.0
    return out


def _demean_within(a: np.ndarray, inv: np.ndarray, n_lev: int) -> np.ndarray:
    """Subtract per-group means along axis 0 (a is (n,) or (n, k))."""
    counts = np.bincount(inv, minlength=n_lev).astype(np.float64)
    if a.ndim == 1:
        means = np.bincount(inv, weights=a, minlength=n_lev) / counts
        return a - means[inv]
    out = np.empty_like(a)
    for j in range(a.shape[1]):
        means = np.bincount(inv, weights=a[:, j], minlength=n_lev) / counts
        out[:, j] = a[:, j] - means[inv]
    return out


def partial_spearman(
    x: Any,
    y: Any,
    covariates: Any = None,
    *,
    categorical: bool | Sequence[bool] | None = None,
    absorb: Any = None,
) -> tuple[float, float]:
    """Partial Spearman correlation of x and y controlling for covariates.

    Parameters
    ----------
    x, y : array-like, shape (N,), numeric
    covariates : None, array-like (N,) or (N, c), or a list of (N,) columns
        A list lets columns have different dtypes.
    categorical : None, bool, or one bool per column
        Which covariate columns are categorical.  None = auto: integer, bool,
        string and object columns are categorical (labels), float columns are
        numeric.  Pass ``categorical=False`` for an integer-valued numeric
        covariate (e.g. a count).
    absorb : None or array-like (N,), any sortable dtype
        Optional fixed effects absorbed by within-group demeaning (see below);
        exactly equivalent to adding the group's one-hot dummies to the
        covariates, but O(N) instead of an (N, G) design matrix.

    Returns
    -------
    (rho, p) : tuple of float

    Method (document this in reports)
    ---------------------------------
    1. Drop rows with a non-finite x, y or numeric covariate.
    2. Rank-transform x, y and numeric covariates (average ranks).
       Categorical covariates are one-hot encoded dropping the first sorted
       level (the intercept carries it).
    3. Regress rank(x) and rank(y) on ``[1, covariates]`` by least squares
       (``np.linalg.lstsq``) and take residuals e_x, e_y.  With ``absorb``,
       ranks and covariate columns are first demeaned within absorb groups
       (Frisch-Waugh-Lovell), then regressed on the demeaned covariates.
    4. rho = Pearson(e_x, e_y);  t = rho * sqrt(df / (1 - rho^2)),
       df = n - 2 - c, p two-sided from Student t(df).  c is the *effective*
       number of covariate regressors: rank([1, covariates]) - 1 (plus
       G - 1 for G absorb groups), so collinear covariates (e.g. a label and a
       label-match indicator within one probe) are not double-counted.

    ``(nan, nan)`` when df < 1 or either residual is (numerically) zero,
    i.e. x or y is a linear function of the covariates.  With no covariates
    this equals ``spearman`` (same rho and p).
    """
    xa = _as_float_1d("x", x)
    n = xa.shape[0]
    ya = _as_float_1d("y", y, n)
    cols = _covariate_columns(covariates, n)
    flags = _categorical_flags(cols, categorical)
    ab = None if absorb is None else _as_1d("absorb", absorb, n)
    ok = _complete_rows(xa, ya, cols, flags, ab)
    m = int(ok.sum())
    if m < 3:
        return float("nan"), float("nan")
    rx = _st.rankdata(xa[ok])
    ry = _st.rankdata(ya[ok])
    cov = _ranked_covariates(cols, flags, ok)
    resid, c_eff = _residuals(rx, ry, cov, None if ab is None else ab[ok])
    return _residual_correlation(resid, rx, ry, m - 2 - c_eff)


def _complete_rows(xa: np.ndarray, ya: np.ndarray, cols: list, flags: list, ab) -> np.ndarray:
    """(N,) bool: rows whose x, y, covariates and absorb group are all finite
    (step 1 of `partial_spearman`)."""
    ok = np.isfinite(xa) & np.isfinite(ya)
    for c, is_cat in zip(cols, flags):
        if is_cat:
            ok &= _isfinite_any(c)
            continue
        try:
            cf = c.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a numeric covariate has dtype {c.dtype}; mark it categorical=True.") from exc
        ok &= np.isfinite(cf)
    if ab is not None:
        ok &= _isfinite_any(ab)
    return ok


def _ranked_covariates(cols: list, flags: list, ok: np.ndarray) -> np.ndarray:
    """(m, c) design columns of the kept rows: ranks of numeric covariates,
    one-hot (first level dropped) categorical ones (step 2)."""
    num_cols = [_one_hot_drop_first(c[ok]) if is_cat else _st.rankdata(c[ok].astype(np.float64))[:, None]
                for c, is_cat in zip(cols, flags)]
    return np.hstack(num_cols) if num_cols else np.zeros((int(ok.sum()), 0))


def _residuals(rx: np.ndarray, ry: np.ndarray, cov: np.ndarray, groups) -> tuple[np.ndarray, int]:
    """((m, 2) residuals of rank(x), rank(y) on [1, cov], effective covariate
    count); with `groups`, demeaned within them first (step 3)."""
    if groups is None:
        m = len(rx)
        design = np.hstack([np.ones((m, 1)), cov])
        coef, _, rank, _ = np.linalg.lstsq(design, np.column_stack([rx, ry]), rcond=None)
        return np.column_stack([rx, ry]) - design @ coef, int(rank) - 1
    _, inv = np.unique(groups, return_inverse=True)
    n_lev = int(inv.max()) + 1
    rxy = _demean_within(np.column_stack([rx, ry]), inv, n_lev)
    if not cov.shape[1]:
        return rxy, n_lev - 1
    cov_d = _demean_within(cov, inv, n_lev)
    coef, _, rank, _ = np.linalg.lstsq(cov_d, rxy, rcond=None)
    return rxy - cov_d @ coef, (n_lev - 1) + int(rank)


def _residual_correlation(resid: np.ndarray, rx: np.ndarray, ry: np.ndarray, df: int) -> tuple[float, float]:
    """(rho, p) of the residuals with a Student t(df) test (step 4); nan where
    df < 1 or a residual is numerically zero."""
    ex = resid[:, 0] - resid[:, 0].mean()
    ey = resid[:, 1] - resid[:, 1].mean()
    sxx, syy = float(ex @ ex), float(ey @ ey)
    tx = float(((rx - rx.mean()) ** 2).sum())
    ty = float(((ry - ry.mean()) ** 2).sum())
    if df < 1 or sxx <= _DEGEN * tx or syy <= _DEGEN * ty:
        return float("nan"), float("nan")
    r = float(np.clip((ex @ ey) / np.sqrt(sxx * syy), -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * np.sqrt(df / (1.0 - r * r))
    p = 2.0 * _st.t.sf(abs(t), df)
    return r, float(p)


# --------------------------------------------------------------------------
# 4. bootstrap
# --------------------------------------------------------------------------
def _boot_indices(
    n: int, n_boot: int, rng: np.random.Generator, strata: np.ndarray | None
) -> np.ndarray:
    """(n_boot, n) int index matrix of bootstrap resamples.

    Stratified: position i of every resample is filled with a row drawn from
    the same stratum as row i, so each resample's strata array equals the
    original one exactly (each label keeps its count and its positions).
    """
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    idx = np.empty((n_boot, n), dtype=np.intp)
    _, inv = np.unique(strata, return_inverse=True)
    for k in range(int(inv.max()) + 1 if n else 0):
        pos = np.flatnonzero(inv == k)
        idx[:, pos] = pos[rng.integers(0, pos.shape[0], size=(n_boot, pos.shape[0]))]
    return idx


def bootstrap_ci(
    fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    strata: Any = None,
    vectorized: bool = False,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``fn(*arrays)``.

    Parameters
    ----------
    fn : callable
        Statistic of the arrays.  May return a scalar or a tuple whose first
        element is the statistic (so ``spearman`` etc. can be passed as is).
        With ``vectorized=True`` it is called once with every array carrying a
        leading resample axis, shape (n_boot, N, ...), and must return
        (n_boot,) values.
    *arrays : array-like, each with N rows (axis 0); any dtype
        Rows are resampled jointly (the same row indices for every array).
    n_boot : int >= 1
    alpha : float in (0, 1)
        Two-sided level: returns the alpha/2 and 1 - alpha/2 percentiles.
    seed : int
        Seeds a fresh ``np.random.default_rng(seed)``: same inputs, same seed
        -> same interval.
    strata : None or array-like (N,)
        When given, rows are resampled within strata so every resample keeps
        each stratum's count (see ``_boot_indices``).

    Returns
    -------
    (lo, hi) : tuple of float
        Percentiles of the finite replicates; nan replicates (degenerate
        resamples) are ignored.  ``(nan, nan)`` if no replicate is finite.
    """
    if not arrays:
        raise ConfigError("bootstrap_ci needs at least one array to resample.")
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}.")
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}.")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    for i, a in enumerate(arrs):
        if a.ndim == 0 or a.shape[0] != n:
            raise ConfigError(
                f"array {i} has shape {a.shape}; every array must have the same number "
                f"of rows ({n})."
            )
    st = None if strata is None else _as_1d("strata", strata, n)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = _boot_indices(n, int(n_boot), rng, st)
    if vectorized:
        # Fancy-indexing each array with the whole (n_boot, N) matrix builds
        # all resamples at once; the statistic then works on rows.
        vals = np.asarray(fn(*[a[idx] for a in arrs]), dtype=np.float64).reshape(-1)
        if vals.shape[0] != idx.shape[0]:
            raise ConfigError(
                f"a vectorized fn must return one value per resample ({idx.shape[0]}), "
                f"got {vals.shape[0]}."
            )
    else:
        vals = np.empty(idx.shape[0])
        for b in range(idx.shape[0]):
            vals[b] = _first(fn(*[a[idx[b]] for a in arrs]))
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# Row-wise (batched) versions of the three correlations, used with
# bootstrap_ci(vectorized=True).  They assume finite inputs (callers drop
# incomplete rows first).  The grouped ones require the group array to be the
# same in every resample, which label-stratified resampling guarantees.
def _dense_codes(a: np.ndarray) -> np.ndarray:
    """Dense integer codes 0..K-1 preserving order and ties (np.unique inverse).

    Ranks are invariant under this map, so rank statistics of the codes equal
    those of the values, and rows of codes can be ranked by counting.
    """
    return np.unique(a, return_inverse=True)[1].astype(np.intp).reshape(-1)


def _rank_rows(A: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged) along the last axis of a 2-D array.

    Small non-negative integer codes (see _dense_codes) are ranked by counting
    -- O(B * (n + K)) with no sort, ~10x faster than rankdata on bootstrap
    matrices; anything else goes to scipy.stats.rankdata.  Both give identical
    ranks: a value k occurring c_k times after cum_k values <= k gets
    cum_k - (c_k - 1) / 2.
    """
    A = np.asarray(A)
    if A.ndim == 2 and A.size and A.dtype.kind in "iu":
        B, n = A.shape
        K = int(A.max()) + 1
        if int(A.min()) >= 0 and K <= 4 * n + 16:
            off = (np.arange(B, dtype=np.intp)[:, None] * K + A).reshape(-1)
            cnt = np.bincount(off, minlength=B * K).reshape(B, K).astype(np.float64)
            avg = np.cumsum(cnt, axis=1) - (cnt - 1.0) / 2.0
            return np.take_along_axis(avg, A.astype(np.intp, copy=False), axis=1)
    return _st.rankdata(np.asarray(A, dtype=np.float64), axis=-1)


def _spearman_rows(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman per row of X, Y (B, n) -> (B,); nan for constant rows or n < 3."""
    if X.shape[-1] < 3:
        return np.full(X.shape[:-1], np.nan)
    rx = _rank_rows(X)
    ry = _rank_rows(Y)
    const = (np.ptp(rx, axis=-1) == 0) | (np.ptp(ry, axis=-1) == 0)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rx * ry).sum(-1) / np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    r = np.clip(r, -1.0, 1.0)
    r[const] = np.nan
    return r


def _fixed_groups(G: np.ndarray) -> np.ndarray:
    G = np.asarray(G)
    if G.ndim != 2 or not np.all(G == G[:1]):
        raise ConfigError(
            "batched grouped statistics need the same groups in every resample; "
            "bootstrap with strata=<the groups>."
        )
    return G[0]


def _stratified_rows(X: np.ndarray, Y: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Row-wise stratified_spearman (same pooling) for fixed groups -> (B,)."""
    g = _fixed_groups(G)
    _, inv = np.unique(g, return_inverse=True)
    B = X.shape[0]
    num = np.zeros(B)
    den = np.zeros(B)
    for k in range(int(inv.max()) + 1):
        pos = np.flatnonzero(inv == k)
        if pos.shape[0] < _MIN_GROUP:
            continue
        r = _spearman_rows(X[:, pos], Y[:, pos])
        ok = np.isfinite(r)
        w = pos.shape[0] - 3
        num += np.where(ok, w * _fisher_z(np.where(ok, r, 0.0)), 0.0)
        den += np.where(ok, w, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.tanh(num / den)
    out[den <= 0] = np.nan
    return out


def _partial_label_rows(X: np.ndarray, Y: np.ndarray, G: np.ndarray, C: np.ndarray | None = None) -> np.ndarray:
    """Row-wise partial_spearman(x, y, [groups, c], categorical=[True, False])
    for fixed groups (without `C`: on the groups alone).

    Regressing on [1, one-hot(groups)] is the same projection as subtracting
    group means, so residuals are the within-group-demeaned global ranks; a
    numeric covariate is then projected out of those (Frisch-Waugh-Lovell).
    """
    g = _fixed_groups(G)
    _, inv = np.unique(g, return_inverse=True)
    n_lev = int(inv.max()) + 1
    n = X.shape[1]
    if n - 2 - (n_lev - 1) - (C is not None) < 1:
        return np.full(X.shape[0], np.nan)
    rx = _rank_rows(X)
    ry = _rank_rows(Y)
    tx = ((rx - rx.mean(-1, keepdims=True)) ** 2).sum(-1)
    ty = ((ry - ry.mean(-1, keepdims=True)) ** 2).sum(-1)
    ex = rx.copy()
    ey = ry.copy()
    ec = _rank_rows(C) if C is not None else None
    for k in range(n_lev):
        pos = np.flatnonzero(inv == k)
        for e in (ex, ey) if ec is None else (ex, ey, ec):
            e[:, pos] -= e[:, pos].mean(-1, keepdims=True)
    if ec is not None:
        cc = (ec * ec).sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            bx = np.where(cc > 0, (ex * ec).sum(-1, keepdims=True) / cc, 0.0)
            by = np.where(cc > 0, (ey * ec).sum(-1, keepdims=True) / cc, 0.0)
        ex -= bx * ec
        ey -= by * ec
    ex -= ex.mean(-1, keepdims=True)
    ey -= ey.mean(-1, keepdims=True)
    sxx = (ex * ex).sum(-1)
    syy = (ey * ey).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((ex * ey).sum(-1) / np.sqrt(sxx * syy), -1.0, 1.0)
    r[(sxx <= _DEGEN * tx) | (syy <= _DEGEN * ty)] = np.nan
    return r


# --------------------------------------------------------------------------
# 5. Benjamini-Hochberg
# --------------------------------------------------------------------------
def benjamini_hochberg(pvals: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), nan-aware.

    Parameters
    ----------
    pvals : array-like of float in [0, 1], any shape; nan allowed

    Returns
    -------
    qvals : float64 ndarray, same shape
        ``q_(i) = min_{j >= i} p_(j) * m / j`` clipped to 1, where m counts
        only the non-nan p-values; nan entries stay nan.  On nan-free input
        this equals ``scipy.stats.false_discovery_control(p, method='bh')``.
    """
    p = np.asarray(pvals, dtype=np.float64)
    flat = p.reshape(-1)
    q = np.full(flat.shape, np.nan)
    ok = ~np.isnan(flat)
    v = flat[ok]
    if v.size and (np.any(v < 0) or np.any(v > 1)):
        raise ConfigError("p-values must lie in [0, 1] (nan allowed); check the inputs.")
    m = v.size
    if m:
        order = np.argsort(v, kind="stable")
        adj = v[order] * m / np.arange(1, m + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.clip(adj, 0.0, 1.0)
        q[ok] = out
    return q.reshape(p.shape)


# --------------------------------------------------------------------------
# 6. quality definitions
# --------------------------------------------------------------------------
def _scores_2d(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ConfigError(f"scores must be (N candidates, P probes); got shape {s.shape}.")
    return s


def mean_quality(scores: Any) -> np.ndarray:
    """Mean score over probes: ``scores (N, P) -> (N,)`` float64."""
    return _scores_2d(scores).mean(axis=1)


def label_balanced_quality(scores: Any, probe_labels: Any, cand_labels: Any) -> np.ndarray:
    """Label-balanced, peer-relative candidate quality.

    Parameters
    ----------
    scores : array-like (N, P), float
        Score of candidate demonstration n on probe p.
    probe_labels : array-like (P,), any sortable dtype
        Gold label of each probe.
    cand_labels : array-like (N,), any sortable dtype
        Label of each candidate demonstration.

    Returns
    -------
    quality : float64 ndarray (N,)
        1. ``v_n = mean_k mean_{p: probe_labels[p] == k} scores[n, p]`` --
           average within each probe class, then classes equally, so an
           unbalanced probe set does not favour demos of the majority label.
        2. ``quality_n = v_n - mean_{m: cand_labels[m] == cand_labels[n]} v_m``
           -- relative to same-label peers (the mean includes n itself), which
           removes the "demo label pushes the prediction" effect.
        A nan score makes that candidate's value nan; the peer mean ignores
        nan peers (a group of only nan peers stays nan).
    """
    s = _scores_2d(scores)
    n, p = s.shape
    pl = _as_1d("probe_labels", probe_labels, p)
    cl = _as_1d("cand_labels", cand_labels, n)
    if p == 0:
        raise ConfigError("scores has no probes; need at least one probe column.")
    _, pinv = np.unique(pl, return_inverse=True)
    n_cls = int(pinv.max()) + 1
    per_class = np.stack([s[:, pinv == k].mean(axis=1) for k in range(n_cls)], axis=1)
    v = per_class.mean(axis=1)
    _, cinv = np.unique(cl, return_inverse=True)
    out = np.empty(n)
    for k in range(int(cinv.max()) + 1 if n else 0):
        sel = cinv == k
        vals = v[sel]
        fin = np.isfinite(vals)
        peer = vals[fin].mean() if fin.any() else np.nan
        out[sel] = vals - peer
    return out


def label_push(scores: Any, probe_labels: Any, cand_labels: Any) -> np.ndarray:
    """How far each demonstration pushes the model toward its own label.

    ``push_n = mean_{p: probe_labels[p] == cand_labels[n]} scores[n, p]
    - mean_k mean_{p: probe_labels[p] == k} scores[n, p]`` over the other
    classes k: the score on probes of the demonstration's own label minus the
    class-balanced score on the others. A quality that still carries this term
    within a label rewards the push, not the demonstration. (N,) float64; nan
    where a candidate's label has no probes or there is one probe class only.
    """
    s = _scores_2d(scores)
    n, p = s.shape
    pl = _as_1d("probe_labels", probe_labels, p)
    cl = _as_1d("cand_labels", cand_labels, n)
    classes = np.unique(pl)
    out = np.full(n, np.nan)
    if len(classes) < 2:
        return out
    per_class = np.stack([s[:, pl == k].mean(axis=1) for k in classes], axis=1)  # (N, K)
    for i in range(n):
        own = np.flatnonzero(classes == cl[i])
        if own.size:
            others = np.delete(per_class[i], own[0])
            out[i] = per_class[i, own[0]] - others.mean()
    return out


def min_detectable_rho(n: int, alpha: float = 0.05, power: float = 0.8, n_covariates: int = 0) -> float:
    """The smallest |Spearman rho| a two-sided test at level `alpha` detects with
    probability `power` from n observations after partialling out `n_covariates`:
    ``tanh((z_{1-alpha/2} + z_power) * sqrt(1.06 / (n - 3 - n_covariates)))``,
    the Fisher-z normal approximation with the Fieller-Hartley-Pearson (1957)
    variance 1.06 / (n - 3) of Spearman's z. nan when n is too small."""
    df = n - 3 - n_covariates
    if df <= 0:
        return float("nan")
    z = _st.norm.ppf(1 - alpha / 2) + _st.norm.ppf(power)
    return float(np.tanh(z * np.sqrt(1.06 / df)))


def n_for_rho(rho: float, alpha: float = 0.05, power: float = 0.8, n_covariates: int = 0) -> int:
    """The n at which `min_detectable_rho` reaches |rho| (inverse of it)."""
    r = abs(float(rho))
    if not np.isfinite(r) or r <= 0 or r >= 1:
        return -1
    z = _st.norm.ppf(1 - alpha / 2) + _st.norm.ppf(power)
    return int(np.ceil(1.06 * (z / np.arctanh(r)) ** 2 + 3 + n_covariates))


# --------------------------------------------------------------------------
# 7. candidate-level table
# --------------------------------------------------------------------------
def candidate_correlations(
    stats: Mapping[str, Any],
    quality: Any,
    labels: Any,
    n_boot: int = 1000,
    seed: int = 0,
    lengths: Any = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Raw, label-controlled and label+length-controlled correlations of each
    statistic with quality.

    Parameters
    ----------
    stats : mapping name -> array-like (N,), float
        One value per candidate demonstration for every statistic.
    quality : array-like (N,), float
    labels : array-like (N,), any sortable dtype
        Candidate labels; always treated as categorical.
    n_boot : int
        Bootstrap resamples per CI; 0 skips the bootstrap (CIs are nan).
    seed : int
        The same seed is used for every statistic (common random numbers, so
        CIs of different statistics come from the same resamples).
    lengths : None or array-like (N,), float
        Demonstration lengths (tokens). When given, also the partial Spearman
        on the label and log length (a second confound: long demonstrations
        have other moments and other effects), keys ``*_len``.
    progress : None or callable (desc, done, total)
        Called every 500 statistics (an SAE family has tens of thousands).

    Returns
    -------
    rows : list of dict, one per statistic in ``stats`` order, with keys
        name (str), n (int, complete cases: finite statistic and quality),
        rho_raw, p_raw, ci_raw_lo, ci_raw_hi            -- spearman
        rho_strat, p_strat, ci_strat_lo, ci_strat_hi    -- stratified_spearman by label
        rho_partial, p_partial, ci_partial_lo, ci_partial_hi
                                                        -- partial_spearman on one-hot label
        rho_len, p_len, ci_len_lo, ci_len_hi             -- partial_spearman on label + log length
                                                            (only with ``lengths``)
        q_raw, q_strat, q_partial (, q_len)              -- BH q-values
    CIs: percentile bootstrap (``1 - 0.05`` level).  The raw CI resamples
    candidates freely; the controlled CIs resample within label (every
    resample keeps each label's count).  BH is applied once to *all*
    p-values of all rows (raw, strat and partial tests in one family);
    nan p-values are excluded from the family size.
    """
    q = _as_float_1d("quality", quality)
    n = q.shape[0]
    lab = _as_1d("labels", labels, n)
    loglen = None if lengths is None else np.log(np.maximum(_as_float_1d("lengths", lengths, n), 1.0))
    kinds = ("raw", "strat", "partial") + (("len",) if loglen is not None else ())
    rows: list[dict[str, Any]] = []
    for i, (name, vals) in enumerate(stats.items()):
        if progress and i % 500 == 0:
            progress("correlations", i, len(stats))
        rows.append(_statistic_row(str(name), _as_float_1d(f"stats[{name!r}]", vals, n), q, lab, loglen,
                                   n_boot, seed))

    if progress:
        progress("correlations", len(stats), len(stats))
    pv = np.array([[r[f"p_{k}"] for k in kinds] for r in rows], dtype=np.float64).reshape(-1, len(kinds))
    qv = benjamini_hochberg(pv)
    for r, qrow in zip(rows, qv):
        for k, qq in zip(kinds, qrow):
            r[f"q_{k}"] = float(qq)
    # Fixed key order, so tables built from these rows have stable columns.
    order = ["name", "n"] + [
        f"{a}_{k}" for k in kinds for a in ("rho", "p", "q")
    ] + [f"ci_{k}_{e}" for k in kinds for e in ("lo", "hi")]
    return [{key: r[key] for key in order} for r in rows]


def _statistic_row(name: str, s: np.ndarray, q: np.ndarray, lab: np.ndarray, loglen, n_boot: int,
                   seed: int) -> dict[str, Any]:
    """One row of `candidate_correlations` before BH: n, rho and p of each test,
    and their bootstrap CIs, over the complete cases of statistic `s`."""
    ok = np.isfinite(s) & np.isfinite(q) & _isfinite_any(lab)
    if loglen is not None:
        ok &= np.isfinite(loglen)
    xs, ys, gs = s[ok], q[ok], lab[ok]
    row: dict[str, Any] = {"name": name, "n": int(ok.sum())}
    row["rho_raw"], row["p_raw"] = spearman(xs, ys)
    row["rho_strat"], row["p_strat"] = stratified_spearman(xs, ys, gs)
    row["rho_partial"], row["p_partial"] = partial_spearman(xs, ys, gs, categorical=True)
    ls = None if loglen is None else loglen[ok]
    if ls is not None:
        row["rho_len"], row["p_len"] = partial_spearman(xs, ys, [gs, ls], categorical=[True, False])
    nan2 = (float("nan"), float("nan"))
    if n_boot and xs.shape[0] >= 3:
        # Batched statistics over all resamples at once instead of n_boot
        # scipy calls (identical values to the scalar versions).  They get
        # dense integer codes, which have the same ranks as the values and
        # can be ranked by counting (see _rank_rows).
        cx, cy, cg = _dense_codes(xs), _dense_codes(ys), _dense_codes(gs)
        ci_raw = bootstrap_ci(_spearman_rows, cx, cy, n_boot=n_boot, seed=seed, vectorized=True)
        ci_strat = bootstrap_ci(_stratified_rows, cx, cy, cg, n_boot=n_boot, seed=seed, strata=cg, vectorized=True)
        ci_part = bootstrap_ci(_partial_label_rows, cx, cy, cg, n_boot=n_boot, seed=seed, strata=cg,
                               vectorized=True)
        ci_len = bootstrap_ci(_partial_label_rows, cx, cy, cg, _dense_codes(ls), n_boot=n_boot, seed=seed,
                              strata=cg, vectorized=True) if ls is not None else nan2
    else:
        ci_raw = ci_strat = ci_part = ci_len = nan2
    row["ci_raw_lo"], row["ci_raw_hi"] = ci_raw
    row["ci_strat_lo"], row["ci_strat_hi"] = ci_strat
    row["ci_partial_lo"], row["ci_partial_hi"] = ci_part
    row["ci_len_lo"], row["ci_len_hi"] = ci_len
    return row


# --------------------------------------------------------------------------
# 8. pair-level analysis
# --------------------------------------------------------------------------
def _aggregate_probe_rhos(prefix: str, rhos: np.ndarray, pvals: np.ndarray, n_boot: int,
                          seed: int, alpha: float = 0.05) -> dict[str, float]:
    ok = np.isfinite(rhos)
    r = rhos[ok]
    out: dict[str, float] = {f"{prefix}_n_probes": int(r.size)}
    nan = float("nan")
    if r.size == 0:
        out.update({f"{prefix}_{k}": nan for k in (
            "mean", "fz_mean", "mean_ci_lo", "mean_ci_hi", "fz_ci_lo", "fz_ci_hi", "p",
            "frac_pos")})
        out[f"{prefix}_n_sig_bh"] = 0
        return out
    z = _fisher_z(r)
    out[f"{prefix}_mean"] = float(r.mean())
    out[f"{prefix}_fz_mean"] = float(np.tanh(z.mean()))
    if n_boot:
        out[f"{prefix}_mean_ci_lo"], out[f"{prefix}_mean_ci_hi"] = bootstrap_ci(
            lambda R: R.mean(axis=1), r, n_boot=n_boot, seed=seed, alpha=alpha, vectorized=True)
        out[f"{prefix}_fz_ci_lo"], out[f"{prefix}_fz_ci_hi"] = bootstrap_ci(
            lambda Z: np.tanh(Z.mean(axis=1)), z, n_boot=n_boot, seed=seed, alpha=alpha,
            vectorized=True)
    else:
        for k in ("mean_ci_lo", "mean_ci_hi", "fz_ci_lo", "fz_ci_hi"):
            out[f"{prefix}_{k}"] = nan
    if r.size >= 2 and np.ptp(z) > 0:
        out[f"{prefix}_p"] = float(_st.ttest_1samp(z, 0.0).pvalue)
    else:
        out[f"{prefix}_p"] = nan
    out[f"{prefix}_frac_pos"] = float((r > 0).mean())
    qv = benjamini_hochberg(pvals[ok])
    out[f"{prefix}_n_sig_bh"] = int(np.sum(qv < 0.05))
    return out


def pair_correlations(
    sim: Any,
    score: Any,
    cand_labels: Any,
    probe_labels: Any,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Pair-level correlations of a (candidate, probe) similarity with the score.

    Parameters
    ----------
    sim : array-like (N, P), float
        Statistic of each (candidate demonstration, probe) pair, e.g. the
        activation similarity between demo n and probe p.
    score : array-like (N, P), float
        Score of the model on probe p when demo n is the 1-shot demonstration.
    cand_labels : array-like (N,), any sortable dtype
    probe_labels : array-like (P,), same label vocabulary (gold labels)
    n_boot, seed : bootstrap over probes (0 skips it)

    Returns
    -------
    dict of numbers.  Counts: ``n_cand``, ``n_probe``, ``n_pairs``.

    Per-probe analyses (for each probe p, across the N candidates), for
    ``<m>`` in ``raw`` (spearman), ``strat`` (stratified_spearman by candidate
    label) and ``partial`` (partial_spearman on [one-hot candidate label,
    match = (cand_label == probe gold label)]), keys ``probe_<m>_...``:
      n_probes (probes with a finite rho), mean (mean rho), fz_mean
      (tanh of mean Fisher z), mean_ci_lo/hi and fz_ci_lo/hi (percentile
      bootstrap over probes), p (one-sample t-test of the probes' Fisher z
      against 0 -- treats probes as independent although they share
      candidates, so it is optimistic), frac_pos (share of probes with rho >
      0), n_sig_bh (probes with BH q < 0.05 within that measure).
    Within one probe the match indicator is the indicator of one candidate
    label level, so it lies in the span of the one-hot label; the effective-
    rank df of ``partial_spearman`` accounts for this, and per probe the
    partial is the same as controlling for the candidate label alone.  The
    match effect is only separable from the label effect across probes,
    hence the pooled analysis.

    Pooled analysis over all N*P pairs (keys ``pooled_...``):
      pooled_raw_rho / pooled_raw_p -- Spearman of all pairs;
      pooled_partial_rho / pooled_partial_p -- partial Spearman with ranks
      taken over all pairs, controlling for one-hot candidate label, the
      match indicator and probe fixed effects.  Probe fixed effects are
      absorbed by demeaning the global ranks (and the other covariates)
      within each probe, which is exactly equivalent to adding P - 1 probe
      dummies to the least-squares design (Frisch-Waugh-Lovell); df counts
      them (df = n_pairs - 2 - (P - 1) - rank(other covariates)).
      Pairs are not independent (every candidate and every probe recurs), so
      pooled p-values are anti-conservative; use them descriptively and rely
      on the probe-level CIs for inference.
    """
    S = np.asarray(sim, dtype=np.float64)
    Y = np.asarray(score, dtype=np.float64)
    if S.ndim != 2 or S.shape != Y.shape:
        raise ConfigError(
            f"sim and score must both be (N candidates, P probes); got {S.shape} and {Y.shape}."
        )
    n, p = S.shape
    cl = _as_1d("cand_labels", cand_labels, n)
    pl = _as_1d("probe_labels", probe_labels, p)

    res: dict[str, float] = {"n_cand": int(n), "n_probe": int(p), "n_pairs": int(n * p)}
    per = {m: (np.full(p, np.nan), np.full(p, np.nan)) for m in ("raw", "strat", "partial")}
    for j in range(p):
        x, y = S[:, j], Y[:, j]
        match = (cl == pl[j]).astype(np.float64)
        for m, (r, pv) in zip(
            ("raw", "strat", "partial"),
            (spearman(x, y), stratified_spearman(x, y, cl),
             partial_spearman(x, y, [cl, match], categorical=[True, False])),
        ):
            per[m][0][j], per[m][1][j] = r, pv
    for m in ("raw", "strat", "partial"):
        res.update(_aggregate_probe_rhos(f"probe_{m}", per[m][0], per[m][1], n_boot, seed))

    # Pooled over pairs: row order is candidate-major (n * P + j).
    xs, ys = S.reshape(-1), Y.reshape(-1)
    cand_rep = np.repeat(cl, p)
    probe_id = np.tile(np.arange(p), n)
    match_all = (cand_rep == np.tile(pl, n)).astype(np.float64)
    res["pooled_raw_rho"], res["pooled_raw_p"] = spearman(xs, ys)
    res["pooled_partial_rho"], res["pooled_partial_p"] = partial_spearman(
        xs, ys, [cand_rep, match_all], categorical=[True, False], absorb=probe_id)
    return res


# --------------------------------------------------------------------------
# 9. summary
# --------------------------------------------------------------------------
def summarize(rows: Sequence[Mapping[str, Any]], ref: float = 0.33) -> dict[str, Any]:
    """Headline numbers of a ``candidate_correlations`` table.

    Parameters
    ----------
    rows : sequence of row dicts (keys name, rho_raw, rho_strat, rho_partial)
    ref : float
        Reference |rho| (default 0.33) the maxima are compared with.

    Returns
    -------
    dict with
      ref;
      raw_max_abs_rho, raw_max_rho (signed), raw_max_name, raw_exceeds_ref;
      strat_max_abs_rho, strat_max_name; partial_max_abs_rho, partial_max_name;
      len_max_abs_rho, len_max_name (label + log length; nan/None without it);
      controlled_max_abs_rho, controlled_max_rho, controlled_max_name,
      controlled_max_measure ('strat' or 'partial'), controlled_exceeds_ref.
    "exceeds" means |rho| > ref (strict).  nan rhos are ignored; with none
    finite the maxima are nan, names None and exceeds False.
    """
    def best(keys: tuple[str, ...]) -> tuple[float, float, str | None, str | None]:
        top = (float("nan"), float("nan"), None, None)
        for r in rows:
            for k in keys:
                v = float(r.get(f"rho_{k}", float("nan")))
                if np.isfinite(v) and not (abs(v) <= top[0]):
                    top = (abs(v), v, str(r.get("name")), k)
        return top

    out: dict[str, Any] = {"ref": float(ref)}
    a, v, nm, _ = best(("raw",))
    out.update(raw_max_abs_rho=a, raw_max_rho=v, raw_max_name=nm,
               raw_exceeds_ref=bool(np.isfinite(a) and a > ref))
    for k in ("strat", "partial", "len"):
        a, _, nm, _ = best((k,))
        out[f"{k}_max_abs_rho"], out[f"{k}_max_name"] = a, nm
    a, v, nm, meas = best(("strat", "partial"))
    out.update(controlled_max_abs_rho=a, controlled_max_rho=v, controlled_max_name=nm,
               controlled_max_measure=meas,
               controlled_exceeds_ref=bool(np.isfinite(a) and a > ref))
    return out


# --------------------------------------------------------------------------
# 10. discovery / confirmation
# --------------------------------------------------------------------------
def split_halves(labels: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded discovery / confirmation split of N candidates, stratified by label.

    Returns two sorted int64 index arrays whose union is ``0..N-1``; within each
    label the rows are shuffled and dealt alternately (the discovery half gets
    the extra row of an odd label), so both halves keep the label mix.
    """
    lab = _as_1d("labels", labels)
    rng = np.random.default_rng(seed)
    disc, conf = [], []
    for g in np.unique(lab):
        pos = rng.permutation(np.flatnonzero(lab == g))
        disc.append(pos[0::2])
        conf.append(pos[1::2])
    return np.sort(np.concatenate(disc)).astype(np.int64), np.sort(np.concatenate(conf)).astype(np.int64)


def replicate(
    stats: Mapping[str, Any],
    quality: Any,
    labels: Any,
    lengths: Any,
    top: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    measure: str = "len",
    progress: Any = None,
    halves: tuple[Any, Any] | None = None,
    power: float = 0.8,
) -> dict[str, Any]:
    """Choose on a discovery half, re-test on the confirmation half.

    ``halves``: (discovery, confirmation) index arrays into the N candidates;
    None splits them here (`split_halves`). Pass the halves whose quality was
    measured on separate probes: a split of the candidates alone re-tests a
    finding on the very probes that produced it.

    The ``top`` statistics by |rho| of ``measure`` ("raw", "strat", "partial" or
    "len": label + log length) on the discovery half (no bootstrap: ranking only)
    are re-tested on the held-out confirmation half with a bootstrap CI; a
    statistic *replicates* when its confirmation rho has the discovery sign, its
    CI excludes 0, and its Benjamini-Hochberg q within the ``top`` confirmation
    tests is below ``alpha``. Everything chosen by looking at the data (maxima,
    the ``stat`` strategy's statistic) should come from here, since the maximum
    of thousands of tests is biased upward (winner's curse).

    Returns dict(measure, n_discovery, n_confirmation, split_seed, mde (the
    smallest |rho| the confirmation detects with probability `power` at the
    strictest BH threshold alpha / top, label and length partialled out),
    power, n_needed (the confirmation size that detects the discovery best's
    |rho|; discovery maxima are inflated, so read it as a lower bound), top:
    list of dict(name, rho_discovery, rho_confirmation, ci_lo, ci_hi, p, q,
    replicates, powered: |rho_discovery| >= mde)), best first.
    """
    q = _as_float_1d("quality", quality)
    lab = _as_1d("labels", labels, q.shape[0])
    ln = _as_float_1d("lengths", lengths, q.shape[0])
    d, c = split_halves(lab, seed) if halves is None else (np.asarray(halves[0]), np.asarray(halves[1]))
    pick = {name: np.asarray(v, dtype=np.float64) for name, v in stats.items()}
    disc = candidate_correlations({k: v[d] for k, v in pick.items()}, q[d], lab[d], n_boot=0, seed=seed,
                                  lengths=ln[d], progress=progress)
    key = f"rho_{measure}"
    ranked = sorted((r for r in disc if np.isfinite(r[key])), key=lambda r: -abs(r[key]))[:top]
    conf = candidate_correlations({r["name"]: pick[r["name"]][c] for r in ranked}, q[c], lab[c],
                                  n_boot=n_boot, seed=seed, lengths=ln[c])
    pv = np.array([r[f"p_{measure}"] for r in conf], dtype=np.float64)
    qv = benjamini_hochberg(pv) if len(pv) else pv
    n_cov = {"raw": 0, "strat": 0, "partial": len(np.unique(lab)) - 1, "len": len(np.unique(lab))}[measure]
    mde = min_detectable_rho(len(c), alpha / max(1, top), power, n_cov)
    out = []
    for r, cr, qq in zip(ranked, conf, qv):
        rc, lo, hi = cr[key], cr[f"ci_{measure}_lo"], cr[f"ci_{measure}_hi"]
        same = bool(np.isfinite(rc) and np.sign(rc) == np.sign(r[key]))
        excl = bool(np.isfinite(lo) and (lo > 0 or hi < 0))
        out.append({"name": r["name"], "rho_discovery": float(r[key]), "rho_confirmation": float(rc),
                    "ci_lo": float(lo), "ci_hi": float(hi), "p": float(cr[f"p_{measure}"]), "q": float(qq),
                    "replicates": bool(same and excl and qq < alpha), "powered": bool(abs(r[key]) >= mde)})
    return {"measure": measure, "n_discovery": int(len(d)), "n_confirmation": int(len(c)), "split_seed": seed,
            "mde": mde, "power": power, "alpha": alpha,
            "n_needed": n_for_rho(out[0]["rho_discovery"], alpha / max(1, top), power, n_cov) if out else -1,
            "top": out}
