"""Exact (flat) top-k search through numpy's BLAS matmul, tiled to bound memory.

faiss's own IndexFlat search runs its bundled BLAS, which on some CPUs uses a
generic kernel; numpy's OpenBLAS picks the CPU's kernel at load time and ran
this search at ~90 % of a large square matmul's throughput in
``benchmarks/bench_query.py``.  faiss still owns the file format and the
approximate indexes; this module only reads the stored vectors.

Threads: the matmul runs on numpy's BLAS thread pool (OpenBLAS sizes it from
``OPENBLAS_NUM_THREADS`` / the core count when numpy is imported); the top-k
bookkeeping is single-threaded numpy and costs a small fraction of the matmul.
"""

from __future__ import annotations

import numpy as np

# 512 queries x 8192 pool rows: the matmul tile reached ~90 % of the square
# matmul peak (smaller query blocks re-stream the pool more often and fell to
# ~60 % at 128) while its float32 scores stay at 16 MiB.
QUERY_BLOCK = 512
POOL_BLOCK = 8192
# Pool columns per group whose maximum feeds the k-th-score lower bound.
GROUP = 64


def search_flat(pool: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip",
                exclude: np.ndarray | None = None, pool_sqnorms: np.ndarray | None = None,
                query_block: int = QUERY_BLOCK, pool_block: int = POOL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product or (negative squared) L2, best first.

    Ties are broken by the lower id, at every rank including the k-th, so the
    result is deterministic.

    Args:
        pool: ``(n, d)`` float32 or float64, C-contiguous (may be a read-only
            view of a faiss index's storage; never written).
        queries: ``(q, d)``, same dtype family as ``pool``.  For cosine pass
            L2-normalised pool and queries with ``metric="ip"``.
        k: results per query, ``1 <= k <= n``.
        metric: ``"ip"`` (score ``q . p``) or ``"l2"`` (score
            ``-||q - p||^2``, computed as ``2 q.p - |p|^2 - |q|^2`` and
            clamped to ``<= 0``).
        exclude: optional ``(q, m)`` int ids to drop per query; ``-1`` and
            out-of-range ids are ignored.
        pool_sqnorms: ``(n,)`` squared row norms of ``pool`` for ``l2``
            (computed here if None; pass them to avoid a pass over the pool).
        query_block, pool_block: tile shape; scores of one tile
            (``query_block x pool_block`` of the pool's dtype) are the only
            buffer proportional to ``n``.

    Returns:
        ``(scores, ids)``: ``(q, k)`` float32 and ``(q, k)`` int64.  Slots
        without a result (exclusion left fewer than ``k``) hold ``-inf`` / ``-1``.
    """
    n, d = pool.shape
    nq = queries.shape[0]
    k = int(k)
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of vectors n={n}")
    scores = np.full((nq, k), -np.inf, np.float32)
    ids = np.full((nq, k), -1, np.int64)
    if nq == 0:
        return scores, ids
    if metric == "l2" and pool_sqnorms is None:
        pool_sqnorms = np.einsum("ij,ij->i", pool, pool)

    ex_rows = ex_ids = None
    if exclude is not None and exclude.size:
        valid = (exclude >= 0) & (exclude < n)
        ex_rows, _ = np.nonzero(valid)
        ex_ids = exclude[valid].astype(np.int64)

    qb = max(1, min(nq, int(query_block)))
    pb = max(1, min(n, int(pool_block)))
    # Enough groups per tile (>= 4k) that the bound below is tight; g = 1 for
    # large k degenerates to "every score is a candidate", still exact.
    g = max(1, min(GROUP, pb // (4 * k)))
    dtype = np.result_type(pool.dtype, queries.dtype)
    buf = np.empty((qb, pb), dtype)
    # A memory-mapped faiss file stores its vectors at an odd byte offset, and
    # numpy's matmul on an unaligned operand skips BLAS (~3x slower here), so
    # such chunks are copied once into an aligned buffer.  The pool is the
    # outer loop so each chunk is read (and copied) once per search.
    chunk_buf = None if pool.flags.aligned else np.empty((pb, d), pool.dtype)

    blocks = [(a, min(nq, a + qb)) for a in range(0, nq, qb)]
    # Per block and row, the k largest group maxima seen so far: at least k
    # scores are >= the smallest of them, so that is a lower bound ``lb`` on
    # the k-th best score and anything below it is dropped at once.
    best = [np.full((e - a, k), -np.inf, dtype) for a, e in blocks]
    lbs = [None] * len(blocks)
    cands = [[] for _ in blocks]
    for s in range(0, n, pb):
        w = min(n, s + pb) - s
        chunk = pool[s:s + w]
        if chunk_buf is not None:
            chunk_buf[:w] = chunk
            chunk = chunk_buf[:w]
        for b, (a, e) in enumerate(blocks):
            m = e - a
            S = buf[:m, :w]
            np.matmul(queries[a:e], chunk.T, out=S)
            if metric == "l2":
                S *= 2
                S -= pool_sqnorms[s:s + w]
            if ex_rows is not None:
                hit = (ex_rows >= a) & (ex_rows < e) & (ex_ids >= s) & (ex_ids < s + w)
                S[ex_rows[hit] - a, ex_ids[hit] - s] = -np.inf
            best[b], lbs[b] = _tile_candidates(S, best[b], g, s, cands[b])

    for b, (a, e) in enumerate(blocks):
        bv, bi = _select(cands[b], lbs[b], e - a, k)
        if metric == "l2":
            qn = np.einsum("ij,ij->i", queries[a:e], queries[a:e])
            bv = np.minimum(bv - qn[:, None], 0)
        scores[a:e] = bv
        ids[a:e] = bi
    return scores, ids


def _tile_candidates(S: np.ndarray, best: np.ndarray, g: int, offset: int, out: list) -> tuple[np.ndarray, np.ndarray]:
    """Append ``(rows, ids, scores)`` of the (m, w) score tile ``S`` that can
    still make the top-k to ``out``; return the updated ``best`` (m, k) group
    maxima and the bound ``lb`` (m,)."""
    m, w = S.shape
    k = best.shape[1]
    G = w // g
    # Column j of the tile belongs to group j % G: the max then runs over g
    # contiguous stretches of length G (vectorised), not over tiny segments.
    gm = S[:, :G * g].reshape(m, g, G).max(axis=1)
    both = np.concatenate([best, gm], axis=1)
    best = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
    lb = best.min(axis=1)

    r, gi = np.nonzero(gm >= lb[:, None])
    cols = gi[:, None] + G * np.arange(g)
    vals = S[r[:, None], cols]
    keep = vals >= lb[r][:, None]
    out.append((np.broadcast_to(r[:, None], cols.shape)[keep], cols[keep] + offset, vals[keep]))
    if G * g < w:  # ragged tail columns, outside every group: check them one by one
        tr, tc = np.nonzero(S[:, G * g:] >= lb[:, None])
        tc += G * g
        out.append((tr, tc + offset, S[tr, tc]))
    return best, lb


def _select(cands: list, lb: np.ndarray, m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first top-k per row from candidate triples, ties to the lower id:
    ``(m, k)`` scores (candidates' dtype) and int64 ids, -inf / -1 padded."""
    r = np.concatenate([t[0] for t in cands])
    c = np.concatenate([t[1] for t in cands])
    v = np.concatenate([t[2] for t in cands])
    keep = v >= lb[r]
    r, c, v = r[keep], c[keep], v[keep]
    order = np.lexsort((c, -v, r))  # by row, then score descending, then id ascending
    r, c, v = r[order], c[order], v[order]
    counts = np.bincount(r, minlength=m)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(k)
    # Fewer than k candidates only when exclusion (or a NaN score) left fewer
    # than k finite scores; excluded ids carry -inf and become -1.
    have = rank[None, :] < counts[:, None]
    if not v.size:
        return np.full((m, k), -np.inf, v.dtype), np.full((m, k), -1, np.int64)
    pos = np.where(have, starts[:, None] + rank, 0)
    bv = np.where(have, v[pos], -np.inf)
    bi = np.where(bv > -np.inf, c[pos], -1).astype(np.int64)
    return bv, bi
