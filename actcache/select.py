"""Demonstration selection over a build's pool: a registry of seeded strategies.

    from actcache.select import select
    sel = select(store, "vote-k", budget=100, lm=lm)          # sel.ids: 100 pool ids, in pick order
    sel = select(store, "knn", k=4)                           # sel.per_query: test id -> 4 pool ids

Two kinds of strategy:

* subset strategies pick `budget` pool examples once, for every test input
  (`Selection.ids`, in pick order): `random`, `vote-k` (Su et al. 2022 as
  published: sentence embeddings, degree-150 graph, LM-confidence stage; it
  runs the build's LM), `vote-k-lm` (vote-k's graph stage alone on the LM's
  activations), `k-center`, `kmeans`, `stat`, `sae-feature`;
* retrieval strategies pick `k` pool examples per test input
  (`Selection.per_query`): `knn` (KATE, on cached activations), `sae-knn` (KATE
  on pooled SAE features) and `embed-knn` (KATE on an external sentence
  encoder, all-MiniLM-L6-v2).

Every strategy is deterministic for a given seed (a numpy Generator made from
it, or FAISS's own seed). The array-level algorithms (`knn_graph`, `vote_k`,
`vote_k_buckets`, `k_center`, `kmeans_select`) take plain numpy arrays, so they
can be tested and reused without a build. Vectors are compared by cosine unless
said otherwise (k-center and k-means work on L2-normalised vectors), like the
build's indexes.

Memory: vote-k and vote-k-lm keep the kNN graph as (n, k) index arrays plus its
transpose in CSR form, and k-center keeps one (n,) distance array: O(n*k) and
O(n) beyond the (n, d) vectors themselves; neither ever forms an n x n matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import numpy as np

from .data import record_text
from .errors import ConfigError, ModelError
from . import score
from .score import TokenCount
from .store import ArrayId, Store, derive_key, load_npz, try_save_npz
from .query import QueryConfig, exclusion_matrix, load_inputs, query, resolve_layer, write_jsonl
from actcache_indexes import VectorIndex
from .models import quiet_transformers
from .prompts import fit_demonstrations, prompt_segments
from .shapes import encoder_dir

Progress = Callable[[str, int, int], None]

__all__ = ["Selection", "STRATEGIES", "strategy", "select", "needs_model", "knn_graph", "vote_k",
           "vote_k_first_size", "vote_k_buckets", "vote_k_confidence", "votek_vectors", "retrieve_within",
           "k_center", "kmeans_select", "embed_texts", "store_embeddings", "write_selection", "EMBED_MODEL",
           "VOTEK_DEGREE", "VOTEK_RHO"]

EMBED_MODEL = "all-MiniLM-L6-v2"
VOTEK_DEGREE = 150  # Su et al. 2022: each example's 150 nearest neighbours
VOTEK_RHO = 10.0  # and a vote discounted tenfold per chosen neighbour
CONFIDENCE_CHUNK = 256  # prompts per scoring call of the confidence stage (one progress step)


@dataclass(frozen=True)
class Selection:
    """The result of a strategy.

    name: the strategy's registry name.
    build_key: the build it selected from.
    params: every parameter that decided the result (JSON-able), seed included.
    ids: chosen pool ids, in pick order (subset strategies), else ().
    positions: the same as positions in `store.pool_rows`, (len(ids),) order.
    per_query: retrieval strategies: test id -> pool ids, best first; else None.
    """

    name: str
    build_key: str
    params: dict = field(default_factory=dict, hash=False)
    ids: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    per_query: dict | None = field(default=None, hash=False)

    def to_records(self) -> list[dict]:
        """JSON-able lines: one per chosen id, or one per test input for retrieval."""
        common = {"strategy": self.name, "build_key": self.build_key, "config": self.params}
        if self.per_query is not None:
            return [{"test_id": t, "ids": list(v), **common} for t, v in self.per_query.items()]
        return [{"rank": i, "id": x, "pool_position": int(p), **common}
                for i, (x, p) in enumerate(zip(self.ids, self.positions))]


KINDS = ("per-input", "subset", "annotation")
_RUNTIME = ("store", "budget", "k", "seed", "progress", "lm")  # what `select` passes; never an option


@dataclass(frozen=True)
class Option:
    """One option of a strategy: its name, type (int, float, str or bool) and default."""

    name: str
    type: type
    default: object = None

    def check(self, strategy: str, value):
        """`value` as this option's type; ConfigError when it is not one (no coercion
        from strings or between bool and numbers)."""
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)):
            ok = self.type is bool
        elif self.type is int:
            ok = isinstance(value, (int, np.integer))
        elif self.type is float:
            ok = isinstance(value, (int, float, np.integer, np.floating))
        else:
            ok = isinstance(value, self.type)
        if ok:
            return self.type(value)
        raise ConfigError(f"strategy {strategy!r}: option {self.name} must be {self.type.__name__}, not {value!r}")


@dataclass(frozen=True)
class Strategy:
    """A registered selection strategy.

    kind: "per-input" (each test input retrieves its own k: knn, embed-knn,
        sae-knn), "subset" (one set of `budget` pool examples shared by every
        input; labels can take turns) or "annotation" (a subset from which each
        input then retrieves its k: vote-k, vote-k-lm).
    options: its typed options, read once from the function's keyword defaults
        at registration (types given where a default is None).
    needs_model: it runs the build's LM (it takes an `lm`).
    """

    name: str
    fn: Callable[..., Selection]
    kind: str
    options: tuple[Option, ...]
    needs_model: bool

    def check(self, opts: dict) -> dict:
        """The options, each checked against its type; ConfigError naming the
        strategy's options for an unknown one."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise ConfigError(f"strategy {self.name!r} takes no option(s) {unknown}; its options are "
                              f"{list(known)}")
        return {n: known[n].check(self.name, v) for n, v in opts.items()}

    def pick(self, wanted: dict) -> dict:
        """The entries of `wanted` (e.g. every option a CLI or request offers) that are
        options of this strategy and not None."""
        names = {o.name for o in self.options}
        return {n: v for n, v in wanted.items() if n in names and v is not None}


STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str, kind: str, types: dict | None = None):
    """Register `fn(store, *, budget, k, seed, progress, **opts) -> Selection` under
    `name`, of `kind` (KINDS). Its options are its keyword parameters beyond
    `_RUNTIME`, typed by their defaults or by `types` (for a default of None)."""
    import inspect  # at registration only: the registry is what everyone reads later

    if kind not in KINDS:
        raise ValueError(f"strategy kind must be one of {KINDS}, not {kind!r}")

    def deco(fn):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        opts = []
        for p in params.values():
            if p.name in _RUNTIME:
                continue
            t = (types or {}).get(p.name) or (type(p.default) if p.default not in (None, p.empty) else None)
            if t not in (int, float, str, bool):
                raise ValueError(f"strategy {name!r}: give the type of option {p.name!r} in types=")
            opts.append(Option(p.name, t, None if p.default is p.empty else p.default))
        STRATEGIES[name] = Strategy(name, fn, kind, tuple(opts), "lm" in params)
        fn.strategy_name = name
        return fn

    return deco


def needs_model(name: str) -> bool:
    """Whether strategy `name` runs the build's LM (it takes an `lm`): vote-k's confidence stage."""
    return name in STRATEGIES and STRATEGIES[name].needs_model


def select(store: Store, name: str, budget: int | None = None, k: int | None = None, seed: int = 0,
           progress: Progress | None = None, turns: bool = False, lm=None, **opts) -> Selection:
    """Run the strategy `name` on `store`'s pool.

    Args:
        store: an open build.
        name: a key of STRATEGIES.
        budget: how many pool examples subset strategies pick.
        k: neighbours per test input (knn, embed-knn) or graph degree (vote-k, vote-k-lm).
        seed: seeds every random choice; same seed, same result.
        progress: optional (desc, done, total) callback.
        turns: subset strategies only: labels take turns (see `_in_turns`).
        lm: the build's loaded model (`store.load_model(dtype)`) for a strategy that
            runs it (`needs_model`: vote-k); None lets it load the build's own.
            Other strategies ignore it.
        **opts: strategy options, e.g. component/layer/pooling/mask, stat/order.

    Raises ConfigError for an unknown strategy or option or a bad budget, k or seed.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    st = STRATEGIES[name]
    fn = st.fn
    opts = st.check(opts)
    if k is not None and int(k) < 1:  # the strategies read k=0 as "use the default"
        raise ConfigError(f"--k {k} must be at least 1 (neighbours per input; vote-k-lm: graph degree), "
                          f"or left out for the default")
    if not 0 <= int(seed) < 2**31:  # numpy refuses negative seeds, FAISS takes a C int
        raise ConfigError(f"--seed must be between 0 and {2**31 - 1}, got {seed}")
    if needs_model(name):
        opts["lm"] = lm
    if turns:
        return _in_turns(store, fn, name, budget, k, int(seed), progress, opts)
    return fn(store, budget=budget, k=k, seed=int(seed), progress=progress, **opts)


def _in_turns(store: Store, fn, name: str, budget, k, seed: int, progress, opts: dict) -> Selection:
    """A subset strategy with labels taking turns: the strategy runs on each label's
    part of the pool with an equal share of the budget (ceil(budget / labels), capped
    by what the label has), and the picks interleave, labels in sorted order, each
    label's picks in the strategy's own order. One rule for every subset strategy,
    so a balanced `random` is the fair baseline of a balanced `stat` or `k-center`."""
    b = _need_budget(budget, len(store.pool_rows), name)
    labels = store.labels[store.pool_rows]
    groups = [store.pool_rows[labels == g] for g in np.unique(labels)]
    share = -(-b // len(groups))
    picks = []
    for rows in groups:
        sel = fn(store.with_pool(rows), budget=min(share, len(rows)), k=k, seed=seed, progress=progress, **opts)
        if sel.per_query is not None:
            raise ConfigError(f"strategy {name!r} gives each input its own neighbours; labels take turns "
                              f"only in subset strategies")
        picks.append(list(sel.ids))
    ids = tuple(i for group in zip_longest(*picks) for i in group if i is not None)[:b]
    row = {str(store.ids[r]): p for p, r in enumerate(store.pool_rows)}
    params = {**sel.params, "budget": b, "turns": True}
    return Selection(name, store.key, params, ids, tuple(row[i] for i in ids), None)


# --------------------------------------------------------------------------- helpers


def _need_budget(budget, n: int, name: str) -> int:
    if budget is None:
        raise ConfigError(f"strategy {name!r} needs a budget: pass --budget B (1..{n})")
    b = int(budget)
    if not 1 <= b <= n:
        raise ConfigError(f"--budget {b} is out of range: the pool has {n} examples; use 1..{n}")
    return b


def _array(store: Store, component: str, layer: int, pooling: str, mask: str) -> ArrayId:
    a = ArrayId(component, resolve_layer(store, layer), pooling, mask)
    store.check(a)
    return a


def _pool_vectors(store: Store, name: str, budget, component, layer, pooling, mask):
    """(array id, checked budget, pool vectors (n_pool, d) float32) for a subset strategy."""
    a = _array(store, component, layer, pooling, mask)
    b = _need_budget(budget, len(store.pool_rows), name)
    return a, b, store.acts(a.component, a.layer, a.pooling, a.mask, split="pool")


def _normalized(X: np.ndarray) -> np.ndarray:
    """C-contiguous float32 copy with unit rows (zero rows stay zero)."""
    Y = np.array(X, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(Y, axis=1, keepdims=True)
    np.maximum(norms, np.finfo(np.float32).tiny, out=norms)
    Y /= norms
    return Y


def _subset(store: Store, name: str, positions, params: dict) -> Selection:
    pos = tuple(int(p) for p in positions)
    ids = tuple(str(store.ids[store.pool_rows[p]]) for p in pos)
    return Selection(name, store.key, params, ids, pos, None)


# --------------------------------------------------------------------------- array-level algorithms


def knn_graph(X: np.ndarray, k: int, index=None, chunk: int = 16384,
              progress: Progress | None = None) -> np.ndarray:
    """Each row's k nearest other rows (cosine), by batched index search.

    Args:
        X: (n, d) float vectors; row i has id i in `index`.
        k: neighbours per row, 1 <= k < n (a row is never its own neighbour).
        index: an `indexes.VectorIndex` over X (e.g. the build's); None builds an
            exact flat cosine one.
        chunk: rows searched per batched call (bounds the (chunk, k+1) buffers).

    Returns:
        (n, k) int64 neighbour ids, best first; -1 where the index found fewer.
    """
    n = len(X)
    if not 1 <= k < n:
        raise ConfigError(f"graph degree k={k} must be between 1 and n-1={n - 1}")
    if index is None:
        index = VectorIndex.build(X)
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        if progress:
            progress("knn graph", s, n)
        e = min(n, s + chunk)
        _, I = index.search(X[s:e], k, exclude=np.arange(s, e, dtype=np.int64)[:, None])
        out[s:e] = I
    if progress:
        progress("knn graph", n, n)
    return out


def _in_neighbors(nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kNN graph transposed, in CSR form: (indptr (n+1,), in_src); the rows v
    with u among their neighbours are in_src[indptr[u]:indptr[u+1]], ascending."""
    n, k = nbr.shape
    valid = nbr >= 0
    src = np.repeat(np.arange(n, dtype=np.int64), k)[valid.ravel()]
    dst = nbr.ravel()[valid.ravel()]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=indptr[1:])
    return indptr, src[np.argsort(dst, kind="stable")]


def vote_k(neighbors: np.ndarray, budget: int, rho: float = 10.0) -> np.ndarray:
    """Graph stage of vote-k (Su et al. 2022, Algorithm 1): greedy, diverse, representative.

    The graph has an edge (v, u) when u is among v's k nearest neighbours
    (`neighbors[v]`). With L the selected set, each step picks

        argmax_{u not in L}  sum_{v: (v,u) in E, v not in L}  s(v),
        s(v) = rho ** -|{l in L : (v,l) in E}|,

    i.e. u collects a vote from every unselected v that has u as a neighbour,
    and a vote is discounted by rho for each of v's neighbours already chosen.
    This is the graph stage alone; `vote_k_buckets` is the paper's second
    (LM-confidence) stage. Ties go to the lowest position.

    Incremental and exact: scores are kept and updated only where a pick
    changes them (the pick's out-neighbours, and the out-neighbours of its
    in-neighbours), O(k + indeg * k) per step. With an integer rho the scores
    are integers (s(v) scaled by rho**C, C = min(k, budget), the most chosen
    neighbours any v can have), so the choice equals a naive recomputation
    exactly; a non-integer rho, or rho**C * max in-degree beyond int64, falls
    back to float64.

    Args:
        neighbors: (n, k) int array, -1 for missing neighbours.
        budget: picks, 1 <= budget <= n.
        rho: discount base (> 1; the paper uses 10).

    Returns:
        (budget,) int64 row positions in pick order.
    """
    nbr = np.ascontiguousarray(neighbors, dtype=np.int64)
    if nbr.ndim != 2:
        raise ConfigError(f"neighbors must be (n, k), got shape {nbr.shape}")
    n, k = nbr.shape
    budget = int(budget)
    if not 1 <= budget <= n:
        raise ConfigError(f"budget {budget} is out of range for {n} examples; use 1..{n}")
    if not rho > 1:
        raise ConfigError(f"rho must be > 1 (the paper uses 10), got {rho}")
    indptr, in_src = _in_neighbors(nbr)
    indeg = np.diff(indptr)
    C = min(k, budget)  # c(v) = |N(v) & L| never exceeds it
    int_mode = float(rho).is_integer() and int(indeg.max(initial=0)) * int(rho) ** C < 2 ** 62
    r = int(rho) if int_mode else 0
    if int_mode:
        s = np.full(n, r ** C, dtype=np.int64)  # s(v) * rho**C = rho**(C - c(v)), exact
        score = indeg * np.int64(r ** C)
        gone = np.int64(-1)  # scores only ever decrease, so a picked row stays below 0
    else:
        s = np.ones(n, dtype=np.float64)
        score = indeg.astype(np.float64)
        gone = -np.inf
    selected = np.zeros(n, dtype=bool)
    picks = np.empty(budget, dtype=np.int64)
    for step in range(budget):
        w = int(np.argmax(score))
        picks[step] = w
        selected[w] = True
        # w is now in L: its own votes stop counting.
        outs = nbr[w][nbr[w] >= 0]
        np.subtract.at(score, outs, s[w])
        s[w] = 0
        score[w] = gone
        # Every unselected v with w as a neighbour has one more chosen neighbour.
        vs = in_src[indptr[w]:indptr[w + 1]]
        vs = vs[~selected[vs]]
        if len(vs):
            new = s[vs] // r if int_mode else s[vs] / rho
            delta = new - s[vs]
            s[vs] = new
            tgt = nbr[vs]
            m = tgt >= 0
            np.add.at(score, tgt[m], np.broadcast_to(delta[:, None], tgt.shape)[m])
    return picks


def vote_k_first_size(budget: int) -> int:
    """Picks of vote-k's graph stage for an annotation budget M: M/10, rounded
    down, at least 1 (Su et al. 2022, Algorithm 1: 10 of M = 100)."""
    return max(1, int(budget) // 10)


def vote_k_buckets(neighbors: np.ndarray, confidence: np.ndarray, first, budget: int, rho: float = 10.0,
                   seed: int = 0) -> tuple[np.ndarray, int]:
    """Second stage of vote-k (Su et al. 2022, Algorithm 1): the rest of the
    annotation budget, one pick per confidence bucket.

    The pool is ranked by the LM's confidence, least confident first, with the
    graph-stage picks `first` last (never ranked among the unlabeled). With
    n rows and R = budget - len(first) picks left, the ranking is cut into
    consecutive buckets of floor(0.9 * n / R) rows (at least 1): R buckets
    cover the least confident 90% of the pool, so the most confident tenth is
    left out. From each bucket in turn the unselected row with the highest
    vote-k score is picked (the score of `vote_k`, discounted by every pick so
    far, graph-stage picks included, as Algorithm 1 grows L; the authors'
    script keeps the graph-stage discount through this stage); ties go to the
    less confident row. Buckets are taken until the budget is met; were they
    to run out, the rest is drawn at random (seeded), as the authors' code does.

    Args:
        neighbors: (n, k) int kNN graph, -1 for missing neighbours.
        confidence: (n,) float, the LM's confidence per row (rows in `first`
            are ignored).
        first: the graph-stage picks, in pick order.
        budget: the whole annotation budget M, len(first) <= M <= n.
        rho: discount base (> 1; the paper uses 10).
        seed: seeds the random fill.

    Returns:
        ((budget,) int64 row positions in pick order, `first` leading; how many
        were drawn at random).
    """
    nbr = np.ascontiguousarray(neighbors, dtype=np.int64)
    if nbr.ndim != 2:
        raise ConfigError(f"neighbors must be (n, k), got shape {nbr.shape}")
    n = len(nbr)
    conf = np.asarray(confidence, dtype=np.float64)
    if conf.shape != (n,):
        raise ConfigError(f"confidence must have one value per row ({n}), got shape {conf.shape}")
    first = [int(f) for f in first]
    budget = int(budget)
    if len(set(first)) != len(first) or any(not 0 <= f < n for f in first):
        raise ConfigError(f"the graph-stage picks must be distinct rows in 0..{n - 1}")
    if not len(first) <= budget <= n:
        raise ConfigError(f"budget {budget} is out of range: {len(first)} graph-stage picks, {n} examples; "
                          f"use {len(first)}..{n}")
    if not rho > 1:
        raise ConfigError(f"rho must be > 1 (the paper uses 10), got {rho}")
    picks = list(first)
    left = budget - len(first)
    if left == 0:
        return np.array(picks, dtype=np.int64), 0
    indptr, in_src = _in_neighbors(nbr)
    selected = np.zeros(n, dtype=bool)
    selected[first] = True
    valid = nbr >= 0
    chosen = (selected[np.where(valid, nbr, 0)] & valid).sum(axis=1).astype(np.int64)  # c(v) = |N(v) & L|
    key = conf.copy()
    key[first] = np.inf
    ranked = np.argsort(key, kind="stable")  # least confident first; ties (and NaN last) by position
    size = max(1, (9 * n) // (10 * left))
    for start in range(0, n, size):
        if len(picks) == budget:
            break
        cand = ranked[start:start + size]
        cand = cand[~selected[cand]]
        if not len(cand):
            continue
        w = int(cand[_best_voted(cand, indptr, in_src, selected, chosen, rho)])
        picks.append(w)
        selected[w] = True
        chosen[in_src[indptr[w]:indptr[w + 1]]] += 1
    filled = budget - len(picks)
    if filled:
        rest = np.flatnonzero(~selected)
        picks += np.random.default_rng(seed).choice(rest, size=filled, replace=False).tolist()
    return np.array(picks, dtype=np.int64), filled


def _best_voted(cand: np.ndarray, indptr, in_src, selected, chosen, rho: float) -> int:
    """Index into `cand` of the highest vote-k score, the first on ties. Exact for an
    integer rho (Python integers: each vote is rho**(J - c(v)) for J the largest c(v) met)."""
    counts = indptr[cand + 1] - indptr[cand]
    owner = np.repeat(np.arange(len(cand)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    voters = in_src[np.repeat(indptr[cand], counts) + offsets]
    keep = ~selected[voters]
    owner, c = owner[keep], chosen[voters[keep]]
    if float(rho).is_integer():
        J = int(c.max(initial=0))
        hist = np.zeros((len(cand), J + 1), dtype=np.int64)
        np.add.at(hist, (owner, c), 1)
        weights = np.array([int(rho) ** (J - j) for j in range(J + 1)], dtype=object)
        scores = list(hist.astype(object) @ weights)
    else:
        scores = np.zeros(len(cand))
        np.add.at(scores, owner, float(rho) ** -c.astype(np.float64))
        scores = scores.tolist()
    return max(range(len(cand)), key=scores.__getitem__)


def k_center(X: np.ndarray, budget: int, seed: int = 0, normalize: bool = True) -> np.ndarray:
    """Greedy k-center (farthest-point) core-set selection.

    Starts from a seeded random row, then repeatedly adds the row farthest
    (squared Euclidean; on L2-normalised rows when `normalize`, i.e. cosine
    geometry) from its nearest chosen center. Keeps one (n,) min-distance array;
    each step is one (n, d) x (d,) product.

    Returns (budget,) int64 row positions in pick order.
    """
    n = len(X)
    budget = int(budget)
    if not 1 <= budget <= n:
        raise ConfigError(f"budget {budget} is out of range for {n} examples; use 1..{n}")
    Y = _normalized(X) if normalize else np.ascontiguousarray(X, dtype=np.float32)
    sq = np.einsum("ij,ij->i", Y, Y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = np.empty(budget, dtype=np.int64)
    picks[0] = int(rng.integers(n))
    mind = np.full(n, np.inf)
    for step in range(1, budget + 1):
        c = int(picks[step - 1])
        d = sq + sq[c] - 2.0 * (Y @ Y[c]).astype(np.float64)
        np.minimum(mind, d, out=mind)
        mind[c] = -np.inf  # chosen: never again (minimum with -inf keeps it)
        if step < budget:
            picks[step] = int(np.argmax(mind))
    return picks


def kmeans_select(X: np.ndarray, budget: int, seed: int = 0, niter: int = 20,
                  normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k-means with `budget` centroids (faiss.Kmeans, seeded), then the member
    nearest each centroid.

    Deduplicated in centroid order: when two centroids share a nearest member,
    the later centroid takes its nearest member not yet taken, so exactly
    `budget` distinct rows come back. On L2-normalised rows (spherical k-means)
    when `normalize`.

    Returns ((budget,) int64 row positions in centroid order, (budget, d)
    float32 centroids).
    """
    import faiss

    n = len(X)
    budget = int(budget)
    if not 1 <= budget <= n:
        raise ConfigError(f"budget {budget} is out of range for {n} examples; use 1..{n}")
    Y = _normalized(X) if normalize else np.ascontiguousarray(X, dtype=np.float32)
    d = Y.shape[1]
    # min_points_per_centroid=1: FAISS would otherwise warn on stderr for small pools.
    km = faiss.Kmeans(d, budget, niter=int(niter), seed=int(seed), spherical=normalize, verbose=False,
                      min_points_per_centroid=1)
    km.train(Y)
    C = np.ascontiguousarray(km.centroids, dtype=np.float32)
    flat = faiss.IndexFlatL2(d)
    flat.add(Y)
    _, I = flat.search(C, min(n, budget))
    taken = np.zeros(n, dtype=bool)
    picks = np.empty(budget, dtype=np.int64)
    for b in range(budget):
        row = I[b]
        j = int(row[np.argmax(~taken[row])])  # first member of b's list not yet taken
        picks[b] = j
        taken[j] = True
    return picks, C


# --------------------------------------------------------------------------- external encoder


def _embed_model_dir() -> Path:
    return encoder_dir("embed-knn")


def embed_texts(texts, batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers.

    The model's sentence-transformers recipe: tokenise (truncate at 256 tokens),
    mean-pool the last hidden state over real tokens, L2-normalise.

    Returns (n, 384) float32, unit rows.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer


    quiet_transformers()
    path = _embed_model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    texts = [str(t) for t in texts]
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    nb = (len(texts) + batch_size - 1) // batch_size
    for b in range(nb):
        if progress:
            progress("embed", b, nb)
        chunk = texts[b * batch_size:(b + 1) * batch_size]
        enc = tok(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        v = torch.nn.functional.normalize(v, p=2, dim=1)
        out[b * batch_size:b * batch_size + len(chunk)] = v.float().numpy()
    if progress:
        progress("embed", nb, nb)
    return out


def store_embeddings(store: Store, progress: Progress | None = None) -> np.ndarray:
    """(N, 384) float32 embeddings of every row of the build (store order), cached in
    `<build>/embed/<derive_key>.npz`, which holds its key (recomputed when it
    differs, is damaged, or the store is read-only and never kept it)."""
    key = derive_key(store.key, "embed", model=EMBED_MODEL, texts="records")
    path = store.derived_path("embed", model=EMBED_MODEL, texts="records")
    z = load_npz(path)
    if z is not None and str(z.get("key")) == key and z["E"].shape[0] == len(store.ids):
        return z["E"]
    E = embed_texts([record_text(r) for r in store.records], progress=progress)
    try_save_npz(path, {"E": E, "key": np.array(key)})  # a read-only store keeps them in memory
    return E


def votek_vectors(store: Store, center: bool = True, progress: Progress | None = None) -> np.ndarray:
    """(N, 384) float32 unit rows, one per store row: the sentence embeddings of
    `store_embeddings`, minus their mean over the pool when `center` (the
    authors' code centres its Sentence-BERT embeddings before every cosine),
    L2-normalised. What vote-k's graph and its per-input retrieval compare."""
    E = store_embeddings(store, progress).astype(np.float64)
    if center:
        E = E - E[store.pool_rows].mean(axis=0, keepdims=True)
    return _normalized(E)


def vote_k_confidence(lm, task, demos, queries, batch_size: int = 16, max_length: int = 2048,
                      counter=None, progress: Progress | None = None) -> np.ndarray:
    """The LM's confidence in its own prediction for each of `queries` with `demos`
    (labelled examples) as its in-context demonstrations: the mean log-probability
    per token of the predicted output (Su et al. 2022, Section 2.1).

    Classification and multiple choice: the highest per-token-averaged option
    log-prob (the prediction is that option). Generation: the greedy answer
    (cut at the task's stop string, at most 256 new tokens), scored per token;
    an empty answer gets -inf (least confident).

    The demonstrations, in the order given, are every prompt's shared prefix, so
    its KV cache is computed once per batch of `CONFIDENCE_CHUNK` prompts. A
    prompt over `max_length` drops demonstrations from the front, as `evaluate`
    does. `counter` (a score.TokenCount) collects the tokens run.

    Returns (len(queries),) float64.
    """
    max_length = min(int(max_length), score._default_max_length(lm.model))

    def fit(segs):
        kept, _ = fit_demonstrations(lm.tokenizer, segs[:-1], segs[-1], max_length, reserve=64)
        return kept + [segs[-1]]

    out = np.empty(len(queries), dtype=np.float64)
    for s in range(0, len(queries), CONFIDENCE_CHUNK):
        if progress:
            progress("vote-k confidence", s, len(queries))
        qs = queries[s:s + CONFIDENCE_CHUNK]
        prompts = [fit(prompt_segments(task, demos, q)) for q in qs]
        if task.kind == "generation":
            answers = score.generate(lm.model, lm.tokenizer, prompts, stop=(task.stop,), max_new_tokens=256,
                               batch_size=max(1, batch_size // 4))
            conf = np.full(len(qs), -np.inf)
            said = [i for i, a in enumerate(answers) if a.strip()]
            if said:
                conf[said] = score.score_options(lm.model, lm.tokenizer, [prompts[i] for i in said],
                                           [[answers[i]] for i in said], batch_size=batch_size,
                                           length_normalize=True, max_length=max_length, counter=counter)[:, 0]
        else:
            conf = score.score_prompts(lm, task, prompts, qs, batch_size, counter=counter,
                                 length_normalize=True).max(axis=1)
        out[s:s + len(qs)] = conf
    if progress:
        progress("vote-k confidence", len(queries), len(queries))
    return out


# --------------------------------------------------------------------------- strategies


@strategy("random", "subset")
def _random(store: Store, *, budget, k, seed, progress):
    """`budget` pool examples uniformly without replacement."""
    n = len(store.pool_rows)
    b = _need_budget(budget, n, "random")
    pos = np.random.default_rng(seed).choice(n, size=b, replace=False)
    return _subset(store, "random", pos, {"budget": b, "seed": seed})


@strategy("knn", "per-input")
def _knn(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
         mask="label-masked", balanced=False, exclude_self=True, source="eval", text_field="text"):
    """KATE: the k nearest pool examples of each test input in one cached array."""
    cfg = QueryConfig(key=store.key, home=str(store.home), component=component, layer=layer,
                      pooling=pooling, mask=mask, k=int(k or 4), balanced=balanced,
                      exclude_self=exclude_self, source=source, text_field=text_field)
    recs = query(cfg, progress=progress)
    per = {r["test_id"]: [n["id"] for n in r["neighbors"]] for r in recs}
    params = {**cfg.to_json(), "array": recs.report["array"], "seed": seed,
              "forward_batches": recs.report["forward_batches"]}
    params.pop("key", None)
    params.pop("out", None)
    return Selection("knn", store.key, params, per_query=per)


@strategy("vote-k", "annotation", types={"first": int})
def _vote_k(store: Store, *, budget, k, seed, progress, lm=None, rho=VOTEK_RHO, first=None, center=True,
            batch_size=16, max_length=2048):
    """Vote-k as published: Su et al. 2022, "Selective Annotation Makes Language
    Models Better Few-Shot Learners" (ICLR 2023, arXiv 2209.01975), Section 2.1,
    Algorithm 1, checked against the authors' code (HKUNLP/icl-selective-annotation,
    two_steps.py). Selects an annotation set of M = `budget` pool examples
    (the paper's budgets: 18 and 100):

    1. Embed every example with a sentence encoder. The paper uses Sentence-BERT
       (paraphrase-mpnet-base-v2 in the authors' code); all-MiniLM-L6-v2, the
       packaged encoder of `embed-knn`, stands in for it. The embeddings are
       centred on the pool mean (`center`), as in the authors' code.
    2. Build the directed cosine kNN graph of degree min(150, n - 1) (`k`
       overrides it; the paper uses 150).
    3. Graph stage: the first M/10 picks (`vote_k_first_size`; `first`
       overrides it) by greedy vote-k score with rho = 10 (`vote_k`).
    4. Confidence stage: the LM (`lm`; None loads the build's model) labels
       every other pool example with the M/10 annotated picks as its in-context
       demonstrations; confidence is the mean per-token log-prob of its
       prediction (`vote_k_confidence`). The authors order each example's
       demonstrations by similarity, most similar last; here they keep pick
       order for every example, one shared prefix, so the stage is cheap.
    5. The remaining 9M/10 picks: one per confidence bucket (`vote_k_buckets`).

    Per-input retrieval from the set (the paper's prompt retrieval, by the same
    embeddings) is done by `evaluate` (experiment.choose); `retrieve_within`
    with `vectors=votek_vectors(store)` does it for any inputs. The seed only
    matters if the buckets run out (a seeded random fill).
    """
    n = len(store.pool_rows)
    if n < 2:
        raise ConfigError(f"vote-k needs a pool of at least 2 examples, the build has {n}; "
                          f"rebuild with a larger --limit")
    b = _need_budget(budget, n, "vote-k")
    kk = int(k or min(VOTEK_DEGREE, n - 1))
    if not 1 <= kk < n:
        raise ConfigError(f"vote-k graph degree --k {kk} must be between 1 and {n - 1} (the pool has {n})")
    m1 = vote_k_first_size(b) if first is None else int(first)
    if not 1 <= m1 <= b:
        raise ConfigError(f"vote-k first={m1}: the graph stage picks 1..{b} (the budget); leave it out for M/10")
    V = votek_vectors(store, center, progress)[store.pool_rows]
    nbr = knn_graph(V, kk, progress=progress)
    stage1 = vote_k(nbr, m1, rho)
    conf = np.full(n, np.nan)
    tokens = TokenCount()
    dtype = None
    if b > m1:  # the confidence stage; a budget the graph stage fills runs no LM
        if lm is None:
            lm = store.load_model()
        dtype = lm.provenance.get("dtype")
        rest = np.setdiff1d(np.arange(n), stage1)
        conf[rest] = vote_k_confidence(lm, store.task(), store.examples(store.pool_rows[stage1]),
                                       store.examples(store.pool_rows[rest]), batch_size, max_length,
                                       counter=tokens, progress=progress)
    pos, filled = vote_k_buckets(nbr, conf, stage1, b, rho, seed)
    return _subset(store, "vote-k", pos, {
        "budget": b, "k": kk, "rho": float(rho), "first": m1, "seed": seed, "model": EMBED_MODEL,
        "center": bool(center), "stage": "graph+confidence", "lm_dtype": dtype,
        "bucket": max(1, (9 * n) // (10 * (b - m1))) if b > m1 else 0, "random_fill": int(filled),
        "max_length": int(max_length), "confidence_tokens": tokens.as_dict()})


@strategy("vote-k-lm", "annotation")
def _vote_k_lm(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
               mask="label-masked", rho=10.0):
    """Vote-k's graph stage on the build's LM activations: a cosine kNN graph of
    degree k (default 10) over one cached array, searched with the build's index,
    then `vote_k`; no confidence stage. Not the published method (that is
    `vote-k`, on sentence embeddings with degree 150 and an LM-confidence stage).
    Seed is unused (deterministic)."""
    a, b, X = _pool_vectors(store, "vote-k-lm", budget, component, layer, pooling, mask)
    n = len(X)
    kk = int(k or 10)
    if not 1 <= kk < n:
        raise ConfigError(f"vote-k-lm graph degree --k {kk} must be between 1 and {n - 1} (the pool has {n})")
    index = store.index(a.component, a.layer, a.pooling, a.mask)
    nbr = knn_graph(X, kk, index=index, progress=progress)
    pos = vote_k(nbr, b, rho)
    return _subset(store, "vote-k-lm", pos, {"budget": b, "k": kk, "rho": float(rho), "seed": seed,
                                             "array": str(a), "stage": "graph"})


def retrieve_within(store: Store, pool_ids, test_ids, k: int, component: str = "mlp", layer: int = -1,
                    pooling: str = "mean", mask: str = "label-masked",
                    vectors: np.ndarray | None = None) -> dict[str, list[str]]:
    """The k most cosine-similar of `pool_ids` for each eval id in `test_ids`,
    best first, never a near-duplicate of the input (same `dup` key). This is
    the retrieval stage of vote-k and vote-k-lm: inputs retrieve from the
    selected annotation set. Compared on one cached activation array, or on
    `vectors` ((rows, d), one per store row, e.g. `votek_vectors(store)`) when
    given. Returns {test id: [pool ids]}."""
    if vectors is None:
        a = _array(store, component, layer, pooling, mask)
        X = store.acts(a.component, a.layer, a.pooling, a.mask)
    else:
        X = np.asarray(vectors)
        if X.ndim != 2 or len(X) != len(store.ids):
            raise ConfigError(f"vectors must be (rows, d) with one row per store row ({len(store.ids)}), "
                              f"got shape {X.shape}")
    row = {i: r for r, i in enumerate(store.ids)}
    P = np.array([row[i] for i in pool_ids], dtype=np.int64)
    T = np.array([row[i] for i in test_ids], dtype=np.int64)
    S = _normalized(X[T]).astype(np.float64) @ _normalized(X[P]).astype(np.float64).T  # (q, m)
    S[store.dups[T][:, None] == store.dups[P][None, :]] = -np.inf
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return {t: [str(store.ids[P[j]]) for j in o if np.isfinite(S[i, j])] for i, (t, o) in enumerate(zip(test_ids, order))}


@strategy("k-center", "subset")
def _k_center(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
              mask="label-masked"):
    """Greedy farthest-point core-set (see `k_center`)."""
    a, b, X = _pool_vectors(store, "k-center", budget, component, layer, pooling, mask)
    return _subset(store, "k-center", k_center(X, b, seed), {"budget": b, "seed": seed, "array": str(a)})


@strategy("kmeans", "subset")
def _kmeans(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
            mask="label-masked", niter=20):
    """Pool examples nearest the centroids of a seeded k-means (see `kmeans_select`)."""
    a, b, X = _pool_vectors(store, "kmeans", budget, component, layer, pooling, mask)
    pos, _ = kmeans_select(X, b, seed, niter)
    return _subset(store, "kmeans", pos, {"budget": b, "seed": seed, "niter": int(niter), "array": str(a)})


def _ranked(store: Store, values: np.ndarray, order: str, balanced: bool) -> np.ndarray:
    """Pool positions by `values` ((n_pool,) float), highest or lowest first (stable: ties
    keep pool order; NaN last). With `balanced` the labels take turns (each label's next
    best, labels in sorted order), so a signal that tracks the label cannot fill a prompt
    with one label."""
    if order not in ("high", "low"):
        raise ConfigError(f"order must be 'high' or 'low', not {order!r}")
    ranked = np.argsort(-values if order == "high" else values, kind="stable")
    if not balanced:
        return ranked
    labels = store.labels[store.pool_rows][ranked]
    turns = [list(ranked[labels == g]) for g in np.unique(labels)]
    return np.array([r for group in zip_longest(*turns) for r in group if r is not None], dtype=np.int64)


@strategy("stat", "subset")
def _stat(store: Store, *, budget, k, seed, progress, stat="kurt", order="high", component="mlp", layer=-1,
          mask="label-masked", balanced=False):
    """Pool examples ranked by a stored statistic (e.g. MLP kurtosis), highest or lowest
    first; `balanced`: labels take turns (see `_ranked`)."""
    L = resolve_layer(store, layer)
    s = store.stat(stat, component, L, mask, split="pool")
    b = _need_budget(budget, len(s), "stat")
    ranked = _ranked(store, s, order, balanced)[:b]
    return _subset(store, "stat", ranked, {"budget": b, "seed": seed, "stat": stat, "order": order,
                                           "component": component, "layer": L, "mask": mask,
                                           "balanced": bool(balanced)})


def _retrieve(store: Store, V: np.ndarray, k, exclude_self: bool) -> tuple[int, dict]:
    """(k, {eval id: k pool ids, best first}): cosine kNN of every eval row among
    the pool rows of `V` ((rows, d) float32, one per store row)."""
    kk = int(k or 4)
    n = len(store.pool_rows)
    if not 1 <= kk <= n:
        raise ConfigError(f"--k {kk} is larger than the pool of {n} examples; use --k {n} or less")
    inputs = load_inputs(store, "eval")
    index = VectorIndex.build(np.ascontiguousarray(V[store.pool_rows], dtype=np.float32))
    ex = exclusion_matrix(store, inputs) if exclude_self else None
    _, I = index.search(np.ascontiguousarray(V[store.eval_rows], dtype=np.float32), kk, exclude=ex)
    return kk, {str(t): [str(store.ids[store.pool_rows[p]]) for p in row if p >= 0] for t, row in zip(inputs.ids, I)}


@strategy("embed-knn", "per-input")
def _embed_knn(store: Store, *, budget, k, seed, progress, exclude_self=True):
    """KATE with an external sentence encoder (all-MiniLM-L6-v2) instead of the LM's activations."""
    kk, per = _retrieve(store, store_embeddings(store, progress), k, exclude_self)
    return Selection("embed-knn", store.key, {"k": kk, "seed": seed, "model": EMBED_MODEL,
                                              "exclude_self": bool(exclude_self)}, per_query=per)


@strategy("sae-knn", "per-input", types={"sae": str, "mask": str})
def _sae_knn(store: Store, *, budget, k, seed, progress, sae=None, pooling="mean", mask=None, exclude_self=True):
    """KATE on pooled SAE features (cosine over the (rows, d_sae) codes) instead of dense activations."""
    key16, mask = store.sae_group(sae, mask)
    kk, per = _retrieve(store, store.sae_codes(key16, pooling, mask), k, exclude_self)
    return Selection("sae-knn", store.key, {"k": kk, "seed": seed, "sae": key16, "pooling": pooling, "mask": mask,
                                            "exclude_self": bool(exclude_self)}, per_query=per)


@strategy("sae-feature", "subset", types={"feature": int, "sae": str, "mask": str})
def _sae_feature(store: Store, *, budget, k, seed, progress, feature=None, sae=None, pooling="max", mask=None,
                 order="high", balanced=False):
    """Pool examples ranked by one SAE feature's pooled activation, highest (or lowest)
    first; `balanced`: labels take turns (see `_ranked`). Ties keep pool order, so with
    order="high" inactive examples come last."""
    key16, mask = store.sae_group(sae, mask)
    C = store.sae_codes(key16, pooling, mask, split="pool")
    if feature is None or not 0 <= int(feature) < C.shape[1]:
        raise ConfigError(f"sae-feature needs feature=F with 0 <= F < {C.shape[1]} (the SAE's width)")
    col = C[:, int(feature)]
    b = _need_budget(budget, len(col), "sae-feature")
    ranked = _ranked(store, col, order, balanced)[:b]
    return _subset(store, "sae-feature", ranked, {"budget": b, "seed": seed, "sae": key16,
                                                  "feature": int(feature), "pooling": pooling, "mask": mask,
                                                  "order": order, "balanced": bool(balanced)})


def write_selection(sel: Selection, path) -> int:
    """Write `sel.to_records()` as JSONL (atomic for a path); returns the line count."""
    recs = sel.to_records()
    write_jsonl(recs, path)
    return len(recs)

