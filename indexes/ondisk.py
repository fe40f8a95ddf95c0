"""IVF indexes over pools whose vectors do not fit in RAM: built shard by
shard, their inverted lists merged into one ``.ivfdata`` file beside the index
(FAISS ``OnDiskInvertedLists``, memory-mapped when searched), and the recall
of such an index measured against exact search streamed over the same shards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Sequence, Union

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from . import io as iox
from .index import VectorIndex, _as_matrix, _check_json, _normalize_inplace, exact_search
from .io import quiet_fd
from .spec import _CHECK_DIMS, IndexSpec, default_nlist, factory_string, faiss_metric, min_vectors

IVFDATA_SUFFIX = ".ivfdata"

# A shard: an (n_i, d) float array (anything with shape and row slicing, such
# as an h5py Dataset), or a callable that returns one when called.
Shard = Union[np.ndarray, Callable[[], np.ndarray]]


def ondisk_supported(spec: IndexSpec) -> bool:
    """True when ``spec`` builds an IVF index, which :func:`build_ondisk` can shard."""
    if spec.kind == "ivf":
        return True
    if spec.kind != "factory":
        return False
    for d in _CHECK_DIMS:
        try:
            index = faiss.index_factory(d, str(spec.factory), faiss_metric(spec.metric))
        except RuntimeError:
            continue
        ivf = faiss.try_extract_index_ivf(index)
        return ivf is not None and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR)
    return False


def _load(shard: Shard, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(raw, x)``: the shard as float32 (what the source fingerprint hashes) and
    the vectors to index (the same array; normalised separately by the caller)."""
    raw = shard() if callable(shard) else shard
    arr = np.asarray(raw[:] if not isinstance(raw, np.ndarray) and hasattr(raw, "shape") else raw)
    return arr, _as_matrix(arr, f"shard {i}", normalize=False)


def _prepared(x: np.ndarray, raw: np.ndarray, cosine: bool) -> np.ndarray:
    if not cosine:
        return x
    if np.shares_memory(x, raw):
        x = x.copy()
    _normalize_inplace(x)
    return x


def shard_sizes(shards: Sequence[Shard]) -> list[int]:
    """Row count of each shard: from ``.shape`` where it has one, else by calling it."""
    out = []
    for i, s in enumerate(shards):
        shape = getattr(s, "shape", None)
        if shape is None:
            shape = _load(s, i)[1].shape
        out.append(int(shape[0]))
    return out


def _draw_sample(shards: Sequence[Shard], sizes: list[int], m: int, seed: int, cosine: bool, d: int) -> np.ndarray:
    """``m`` rows drawn uniformly without replacement across all shards (seeded),
    read one shard at a time; float32, normalised for cosine."""
    rows = np.sort(np.random.default_rng(seed).choice(sum(sizes), size=m, replace=False))
    parts, start = [], 0
    for i, (s, n) in enumerate(zip(shards, sizes)):
        local = rows[(rows >= start) & (rows < start + n)] - start
        start += n
        if local.size:
            raw, x = _load(s, i)
            _check_shape(x, i, n, d)
            parts.append(_prepared(np.ascontiguousarray(x[local]), raw, cosine))
    return np.concatenate(parts)


def _check_shape(x: np.ndarray, i: int, n: int, d: int) -> None:
    if x.shape != (n, d):
        raise ValueError(f"shard {i} has shape {x.shape}, expected ({n}, {d}); every shard must have the same "
                         f"dimension and must not change between reads")


def _trained_empty(spec: IndexSpec, n: int, d: int, sample: np.ndarray) -> tuple[Any, IndexSpec]:
    factory, spec = factory_string(spec, n)
    try:
        index = faiss.index_factory(d, factory, faiss_metric(spec.metric))
    except RuntimeError as e:
        raise ValueError(f"FAISS could not parse index factory string {factory!r}: {iox.first_line(e)}") from None
    faiss.extract_index_ivf(index).cp.seed = int(spec.seed)
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ValueError(f"FAISS could not train {factory!r} on a sample of {len(sample)} vectors: "
                         f"{iox.first_line(e)}; pass a larger sample") from None
    return index, spec


def _add_shards(shards, sizes, trained_file: str, workdir: str, cosine: bool, d: int) -> tuple[list[str], str]:
    """Fill one copy of the trained empty index per shard (ids = global row
    numbers) and write it to ``workdir``; returns the files and the source
    fingerprint (`vectors_fingerprint` of all shards stacked)."""
    h = hashlib.sha256(json.dumps([sum(sizes), d]).encode())
    files, start = [], 0
    for i, (s, n) in enumerate(zip(shards, sizes)):
        raw, x = _load(s, i)
        _check_shape(x, i, n, d)
        h.update(x.tobytes())
        x = _prepared(x, raw, cosine)
        del raw
        index = faiss.read_index(trained_file)
        index.add_with_ids(x, np.arange(start, start + n, dtype=np.int64))
        del x
        files.append(os.path.join(workdir, f"shard{i:05d}.index"))
        faiss.write_index(index, files[-1])
        del index
        start += n
    return files, h.hexdigest()


def build_ondisk(shards: Sequence[Shard], spec: IndexSpec, path: str | os.PathLike, *, sample: int | None = None,
                 seed: int | None = None, meta: dict[str, Any] | None = None, sizes: Sequence[int] | None = None,
                 queries: np.ndarray | None = None, k: int = 10) -> VectorIndex:
    """Build an IVF index over vectors given shard by shard, with its inverted
    lists in one ``path + ".ivfdata"`` file, save it with the usual sidecar
    and return it opened by :meth:`VectorIndex.load` (memory-mapped).

    Peak memory is about one shard (twice for cosine, whose normalised copy
    is indexed) plus the training sample and the coarse quantizer; the
    vectors are never all in RAM.  Every shard is read three times (size,
    sample, add) unless ``sizes`` is given or the shards have ``.shape``;
    temporary per-shard indexes (about the size of the final lists) are
    written to a hidden temp folder beside ``path`` and deleted.

    Args:
        shards: a sequence (read more than once, so not a one-shot iterator)
            of ``(n_i, d)`` float arrays or callables returning one, in row
            order: ids are global row numbers ``0 .. sum(n_i) - 1``.
        spec: ``kind="ivf"`` or an IVF factory string (IVF-PQ, IVF-SQ, ...).
            Cosine vectors are L2-normalised, as :meth:`VectorIndex.build` does.
        path: the index file; ``path + ".ivfdata"`` and ``path + ".json"`` go beside it.
        sample: training rows, drawn uniformly across shards; default
            ``max(50 * nlist, 65536, rows a PQ needs)`` capped at the total.
        seed: seeds the sample and the k-means; default ``spec.seed``.
        meta: JSON-serialisable user metadata for the sidecar.
        sizes: the shards' row counts, if known, to skip reading them for it.
        queries, k: if given, recall@k against exact search (:func:`recall_at_k`,
            another pass over the shards) is stored in ``meta["recall_at_<k>"]``.

    Raises:
        ValueError: not an IVF spec, empty or inconsistent shards, bad values.
        TypeError: ``shards`` is a one-shot iterator.
        NoSpaceError: the disk filled while writing.
    """
    if not ondisk_supported(spec):
        raise ValueError(f"an on-disk index needs an IVF spec (kind='ivf' or an IVF factory string such as "
                         f"'IVF1024,PQ32'), got kind={spec.kind!r} factory={spec.factory!r}")
    if not hasattr(shards, "__len__"):
        raise TypeError("shards must be a sequence (it is read more than once), e.g. a list of arrays or of "
                        "callables that each load one shard")
    meta = dict(meta or {})
    _check_json(meta)
    path = os.fspath(path)
    seed = int(spec.seed if seed is None else seed)
    spec = dataclasses.replace(spec, seed=seed)
    sizes = [int(n) for n in sizes] if sizes is not None else shard_sizes(shards)
    if len(sizes) != len(shards) or sum(sizes) == 0:
        raise ValueError(f"cannot build an index from {sum(sizes)} vectors in {len(shards)} shard(s) "
                         f"(sizes {sizes[:8]}); give at least one non-empty shard")
    d = _dimension(shards, sizes)
    n, cosine = sum(sizes), spec.metric == "cosine"
    nlist = spec.nlist if spec.nlist is not None else (default_nlist(n) if spec.kind == "ivf" else 1)
    m = min(n, int(sample) if sample is not None else max(50 * nlist, 65536, min_vectors(spec, d)))
    trained, spec = _trained_empty(spec, n, d, _draw_sample(shards, sizes, m, seed, cosine, d))
    workdir = iox.tmp_name(path)
    os.makedirs(workdir)
    try:
        trained_file = os.path.join(workdir, "trained.index")
        faiss.write_index(trained, trained_file)
        files, source_fp = _add_shards(shards, sizes, trained_file, workdir, cosine, d)
        data_tmp = os.path.join(workdir, "merged" + IVFDATA_SUFFIX)
        with quiet_fd(1):
            merge_ondisk(trained, files, data_tmp)
        out = VectorIndex(trained, spec, meta)
        out._source_fp = source_fp
        if queries is not None:
            meta[f"recall_at_{int(k)}"] = recall_at_k(out, shards, queries, k)
            out._meta = meta
        _commit(out, path, data_tmp, workdir)
    except OSError as e:
        if e.errno in iox.NO_SPACE:
            raise iox.no_space_error(e, path, n * d * 4) from None
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return VectorIndex.load(path)


def _dimension(shards: Sequence[Shard], sizes: list[int]) -> int:
    i = next(j for j, n in enumerate(sizes) if n)
    shape = getattr(shards[i], "shape", None)
    if shape is None:
        shape = _load(shards[i], i)[1].shape
    if len(shape) != 2 or shape[1] == 0:
        raise ValueError(f"shard {i} must be a 2-D array (n, d) with d >= 1, got shape {tuple(shape)}")
    return int(shape[1])


def _commit(out: VectorIndex, path: str, data_tmp: str, workdir: str) -> None:
    """Put the merged lists and the index beside each other at ``path``: old
    sidecar removed first, lists and index renamed in, sidecar written last, so
    a sidecar only ever describes the pair beside it (as `VectorIndex.save`)."""
    dirname = os.path.dirname(os.path.abspath(path))
    data_final = os.path.abspath(path) + IVFDATA_SUFFIX
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(out.index).invlists)
    invlists.filename = data_final  # what the index file records; loads look beside the index anyway
    index_tmp = os.path.join(workdir, "merged.index")
    faiss.write_index(out.index, index_tmp)
    for f in (data_tmp, index_tmp):
        iox.fsync_file(f)
    ivfdata = {"file": os.path.basename(data_final), "bytes": os.path.getsize(data_tmp),
               "fingerprint": iox.file_fingerprint(data_tmp)}
    size, fp = os.path.getsize(index_tmp), iox.file_fingerprint(index_tmp)
    try:
        os.unlink(path + iox.SIDECAR_SUFFIX)
    except FileNotFoundError:
        pass
    iox.fsync_dir(dirname)
    os.replace(data_tmp, data_final)
    os.replace(index_tmp, path)
    iox.fsync_dir(dirname)
    out._write_sidecar(path, size, fp, ivfdata=ivfdata)


def exact_topk(shards: Sequence[Shard], queries: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over vectors given shard by shard (float64, one shard in
    memory at a time), with :func:`exact_search`'s conventions; ids are global rows."""
    Q = np.asarray(queries)
    best_s = np.full((len(Q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(Q), 0), np.int64)
    start = 0
    for i, s in enumerate(shards):
        _, x = _load(s, i)
        if len(x):
            S, I = exact_search(x, Q, min(k, len(x)), metric)
            best_s = np.concatenate([best_s, S], axis=1)
            best_i = np.concatenate([best_i, I + start], axis=1)
            order = _rank(best_s, best_i)[:, :k]
            best_s = np.take_along_axis(best_s, order, axis=1)
            best_i = np.take_along_axis(best_i, order, axis=1)
        start += len(x)
    if best_i.shape[1] < k:
        raise ValueError(f"k={k} is larger than the number of vectors {start}")
    return best_s, best_i


def _rank(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, column order by score descending, then id ascending."""
    order = np.argsort(ids, axis=1, kind="stable")
    by_score = np.argsort(-np.take_along_axis(scores, order, axis=1), axis=1, kind="stable")
    return np.take_along_axis(order, by_score, axis=1)


def recall_at_k(index: VectorIndex, shards: Sequence[Shard], queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of ``index`` against exact search over ``shards`` (the vectors it
    was built from, in the same order): the mean fraction of each query's exact
    top-``k`` ids that the index returns in its top ``k``; float in [0, 1]."""
    q = np.asarray(queries)
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"queries must be a non-empty 2-D array (q, d), got shape {q.shape}")
    _, ref = exact_topk(shards, q, k, index.spec.metric)
    _, got = index.search(q, k)
    hits = [np.intersect1d(g[g >= 0], r).size for g, r in zip(got, ref)]
    return float(np.mean(hits) / k)
