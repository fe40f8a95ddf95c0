"""Vector indexes over cached activations: a thin, careful layer over FAISS.

This package depends only on numpy, faiss and the standard library, so that it
can be used (and tested) without torch or the rest of actcache.

Conventions
-----------
* Vectors are rows of a 2-D array ``(n, d)``; float16/float32/float64 input is
  accepted and converted to C-contiguous float32, which is what FAISS needs.
* Ids are row numbers ``0 .. ntotal-1`` in the order vectors were given.
* Scores are always "higher is better":

  - ``cosine``: inner product of L2-normalised vectors (in [-1, 1]);
  - ``ip``: raw inner product;
  - ``l2``: the *negative squared* Euclidean distance.

* Missing results (only when fewer than ``k`` candidates exist, e.g. after
  exclusion or when an IVF index probes too few lists) are id ``-1`` with
  score ``-inf``.
* Exact (``flat``) search does not go through FAISS: it reads the vectors
  stored in the faiss IndexFlat (zero-copy, memory-mapped when loaded so) and
  runs numpy's BLAS matmul with a tiled top-k (:mod:`indexes.flat`); equal
  scores rank the lower id first.  FAISS keeps the file format and runs the
  IVF / HNSW / factory indexes.

FAISS behaviour this module relies on (checked against faiss-cpu 1.15.1)
------------------------------------------------------------------------
* Memory mapping: ``IO_FLAG_MMAP`` (the historical flag) only maps the inverted
  lists of IVF indexes; for Flat and HNSW it is silently ignored and the whole
  file is read into RAM.  ``IO_FLAG_MMAP_IFC`` maps the codes zero-copy for
  Flat, HNSW (vectors mapped; the graph itself is still copied), IVF, PQ and
  SQ indexes, so that is the flag used here.  Combining the two flags makes
  IVF loading fail, and an IVF index loaded with ``IO_FLAG_MMAP`` and written
  again produces a small file that only *references* the original's inverted
  lists; searching that copy segfaulted in testing.
* HNSW may return fewer than ``k`` results (padded with -1) when
  ``efSearch < k``; it does not raise ``efSearch`` to ``k`` by itself, so
  search raises it to the pool size.
* IVF k-means is seeded through ``index.cp.seed`` (FAISS default 1234), so
  IVF builds are reproducible (tested).  HNSW insertion is parallel with
  per-node locks; FAISS does not promise identical graphs across runs, though
  1- and 2-thread builds of a 20k x 32 set came out identical here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .flat import search_flat

__all__ = [
    "IndexFileError",
    "IndexMismatchError",
    "IndexSpec",
    "VectorIndex",
    "check_factory",
    "exact_search",
    "set_threads",
    "KINDS",
    "METRICS",
]

KINDS = ("flat", "ivf", "hnsw", "factory")
METRICS = ("cosine", "ip", "l2")

# Bumped when the sidecar layout changes incompatibly.
SIDECAR_FORMAT = "actcache.indexes/1"
SIDECAR_SUFFIX = ".json"

_REBUILD_ADVICE = "delete the index file and its .json sidecar and rebuild it (e.g. with `actcache build ...`)"


class IndexMismatchError(ValueError):
    """An index (or query) does not match what the caller expected."""


class IndexFileError(OSError):
    """An index file or its sidecar is missing, corrupt, torn or not ours."""


# --------------------------------------------------------------------------- threads


def set_threads(n: int | None = None) -> int:
    """Set the number of OpenMP threads FAISS uses, deliberately.

    Why this exists: torch and faiss-cpu each ship their *own* OpenMP runtime
    (on Linux wheels, ``torch/lib/libgomp.so.1`` and
    ``faiss_cpu.libs/libgomp-*.so``; FAISS's OpenBLAS is the OpenMP build
    too), so one process that runs a model forward pass and an index search
    holds two independent thread pools.  Left to their defaults each sizes
    itself to every core, which oversubscribes the CPU (each pool spins
    waiting for cores the other holds: large slowdowns), and mixing runtimes
    has been a known source of hangs and crashes.  actcache therefore sets
    both explicitly: this function for FAISS, ``torch.set_num_threads`` for
    torch (done by the caller; this package must not import torch).

    Exact (flat) search does not use these threads: it runs numpy's BLAS,
    whose own pool (OpenBLAS: pthreads) is sized when numpy is imported, from
    ``OPENBLAS_NUM_THREADS`` or the core count.  Set that variable before
    starting the process to bound it; numpy and the standard library offer no
    portable way to resize it afterwards.

    Args:
        n: number of threads, ``>= 1``.  ``None`` means ``os.cpu_count()``.

    Returns:
        The thread count that was set (int).
    """
    if n is None:
        n = os.cpu_count() or 1
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)
    return n


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class IndexSpec:
    """How to build (and search) a :class:`VectorIndex`.

    Attributes:
        kind: ``"flat"`` (exact; the default), ``"ivf"`` (IVF-Flat),
            ``"hnsw"`` (HNSW-Flat) or ``"factory"`` (any FAISS index-factory
            string given in ``factory``).
        metric: ``"cosine"`` (L2-normalise vectors and queries, then inner
            product), ``"ip"`` (inner product) or ``"l2"`` (scores are negative
            squared distances, so higher is better).
        factory: FAISS index-factory string, required iff ``kind == "factory"``
            (e.g. ``"IVF64,Flat"``, ``"HNSW16"``, ``"IVF256,PQ32"``).
        nlist: IVF list count.  ``None``: ``4 * sqrt(n)`` clamped to
            ``[1, n // 39]`` (FAISS wants >= 39 training points per centroid).
        nprobe: IVF lists probed per query.  ``None``: ``max(16, nlist // 16)``
            capped at ``nlist`` (see :func:`default_nprobe` for the
            measurements).  Also applied to IVF factory indexes, whose FAISS
            default of 1 is far too low.
        hnsw_m: HNSW graph degree (ignored for factory strings, which carry it).
        ef_construction: HNSW build beam width (also applied to factory HNSW).
        ef_search: HNSW search beam width (raised to the pool size at search
            time, because FAISS HNSW returns at most ~efSearch results).
        seed: k-means seed for IVF training, so builds are reproducible.
    """

    kind: str = "flat"
    metric: str = "cosine"
    factory: str | None = None
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"IndexSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"IndexSpec.metric must be one of {METRICS}, got {self.metric!r}")
        if self.kind == "factory" and not self.factory:
            raise ValueError('IndexSpec(kind="factory") needs a FAISS factory string, e.g. factory="IVF64,Flat"')
        if self.kind != "factory" and self.factory is not None:
            raise ValueError(f'IndexSpec.factory is only used with kind="factory" (kind is {self.kind!r})')
        for name in ("nlist", "nprobe"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"IndexSpec.{name} must be >= 1 or None, got {v}")
        for name in ("hnsw_m", "ef_construction", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"IndexSpec.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.hnsw_m) < 2:  # FAISS crashes the process on an HNSW graph of degree 1
            raise ValueError(f"IndexSpec.hnsw_m must be >= 2, got {self.hnsw_m}")
        if self.kind == "factory":
            check_factory(str(self.factory), self.metric)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IndexSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise ValueError(f"unknown IndexSpec fields {sorted(extra)}")
        return cls(**d)


# Factory strings are checked at these dimensions: the first that parses wins, so
# that sub-quantizers which must divide d (PQ48, ...) are not refused for the
# small one alone. 3840 = 2**8 * 15 is divisible by every common PQ M.
_CHECK_DIMS = (64, 3840)


def check_factory(factory: str, metric: str = "cosine") -> None:
    """Refuse a FAISS index-factory string before any vectors exist.

    Parses ``factory`` at a small dimension (creating an empty index costs
    microseconds), then rejects what FAISS accepts but cannot use: an IVF with
    0 lists (every search fails) and an HNSW graph of degree below 2 (FAISS
    aborts or segfaults the whole process while adding vectors).

    Raises:
        ValueError: saying what is wrong with the string.
    """
    err = None
    for d in _CHECK_DIMS:
        try:
            index = faiss.index_factory(d, factory, _faiss_metric(metric))
            break
        except RuntimeError as e:
            err = err or e
    else:
        why = re.sub(r"^Error in .*?\.cpp:\d+: ", "", _first_line(err))  # FAISS's C++ location: noise here
        raise ValueError(f"FAISS could not parse index factory string {factory!r}: {why}")
    subs = list(_unwrap(index))
    ivf = _find_ivf(index)
    if ivf is not None:
        if ivf.nlist < 1:
            raise ValueError(f"index factory string {factory!r} asks for an IVF with {ivf.nlist} lists; "
                             f"give at least 1, e.g. 'IVF64,Flat'")
        subs += list(_unwrap(ivf.quantizer))
    for sub in subs:
        # Level 0 of an HNSW graph of degree M holds 2 * M neighbours; M = 1
        # leaves no levels at all.
        if hasattr(sub, "hnsw") and (sub.hnsw.cum_nneighbor_per_level.size() < 2 or sub.hnsw.nb_neighbors(0) < 4):
            raise ValueError(f"index factory string {factory!r} asks for an HNSW graph of degree below 2; "
                             f"give at least 2, e.g. 'HNSW32'")


def default_nlist(n: int) -> int:
    """``4 * sqrt(n)`` clamped to ``[1, n // 39]`` (int)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def default_nprobe(nlist: int) -> int:
    """``max(16, nlist // 16)`` capped at ``nlist`` (int).

    Measured on 100k x 640 (nlist 1265, 1000 held-out queries): nprobe 64
    already gives recall@10 >= 0.999 on clustered and on anisotropic
    (power-law spectrum) data, and nlist // 8 bought nothing there but halved
    the speed.  On weakly clustered or isotropic data no practical nprobe
    reaches 0.95 (IVF degrades to the fraction of lists probed); use
    ``kind="flat"`` for such data.
    """
    return max(1, min(nlist, max(16, nlist // 16)))


# --------------------------------------------------------------------------- helpers


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _as_matrix(x: Any, what: str, normalize: bool) -> np.ndarray:
    """C-contiguous float32 (n, d) copy-if-needed of ``x``; never mutates ``x``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be a floating-point array (float16/float32), got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        # FAISS would silently return garbage neighbours for NaN/inf rows.
        bad = int((~np.isfinite(out).all(axis=1)).sum())
        raise ValueError(f"{what} contains NaN or inf in {bad} row(s); fix the activations before indexing")
    if normalize:
        if np.shares_memory(out, arr):
            out = out.copy()
        _normalize_inplace(out)
    return out


def _normalize_inplace(x: np.ndarray) -> None:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # Zero rows stay zero (score 0 against everything) instead of becoming NaN.
    np.maximum(norms, np.finfo(x.dtype).tiny, out=norms)
    x /= norms


def _unwrap(index: Any):
    """Yield ``index`` and every index it wraps (pre-transforms, refine, IDMap)."""
    seen = 0
    while index is not None and seen < 16:
        index = faiss.downcast_index(index)
        yield index
        seen += 1
        nxt = None
        for attr in ("index", "base_index"):
            sub = getattr(index, attr, None)
            if sub is not None and isinstance(sub, faiss.Index):
                nxt = sub
                break
        index = nxt


def _find_hnsw(index: Any):
    for sub in _unwrap(index):
        if hasattr(sub, "hnsw"):
            return sub
    return None


def _find_ivf(index: Any):
    return faiss.try_extract_index_ivf(index)


def _find_flat(index: Any):
    """The index itself if it is a plain float32 IndexFlat (IP or L2), else None."""
    sub = faiss.downcast_index(index)
    if type(sub) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2) and \
            sub.metric_type in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
        return sub
    return None


def _check_json(meta: dict[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"index meta must be JSON-serialisable (it is stored in the .json sidecar): {e}") from None


def _fsync_dir(dirname: str) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem.
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FP_BLOCK = 1 << 16
_FP_BLOCKS = 16


def _fingerprint(path: str) -> str:
    """Cheap content fingerprint: blake2b over size + up to 16 sampled 64 KiB blocks.

    Full hashing would read the whole file on every load and defeat mmap; a
    sample (head, tail and evenly spaced blocks) is enough to tell apart an
    index from a *different* build that was paired with this sidecar by a
    crash or a concurrent writer.  It is not a check against bit rot.
    """
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FP_BLOCK * _FP_BLOCKS:
            h.update(f.read())
        else:
            last = size - _FP_BLOCK
            for i in range(_FP_BLOCKS):
                f.seek(last * i // (_FP_BLOCKS - 1))
                h.update(f.read(_FP_BLOCK))
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    """A unique hidden temp name next to ``path``.

    Not ``tempfile.mkstemp``: that creates the file 0600, and the rename would
    then give the index those permissions instead of the usual umask ones.
    """
    dirname, base = os.path.split(os.path.abspath(path))
    return os.path.join(dirname, f".{base}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` then fsync and ``os.replace`` onto ``path``.

    The temp file lives in the same directory so the rename is atomic (same
    filesystem).  Readers therefore see either the old file or the complete new
    one, and a process that has the old file memory-mapped keeps its (old)
    inode instead of getting SIGBUS from an in-place truncate.
    """
    dirname = os.path.dirname(os.path.abspath(path))
    tmp = _tmp_name(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(dirname)


def _mapped_ranges(path: str) -> set[str] | None:
    """Address ranges at which ``path`` is mapped in this process; None if unknowable."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    out = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5] == real:
            out.add(parts[0])
    return out


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# --------------------------------------------------------------------------- index


class VectorIndex:
    """A FAISS index plus its :class:`IndexSpec` and a user metadata dict.

    Build with :meth:`build`, persist with :meth:`save`, reopen with
    :meth:`load`.  ``nprobe`` and ``ef_search`` can be changed between
    searches; they are applied at search time (not thread-safe if several
    threads search one object with different settings).

    Attributes:
        mmapped: True if the loaded index's data is memory-mapped from disk,
            False if it lives in RAM (built here, or read normally).
        load_mode: ``"built"``, ``"mmap"`` (``IO_FLAG_MMAP_IFC``, zero-copy)
            or ``"read"`` (plain read, used when mmap is off or failed).
        path: the file it was loaded from or last saved to, else None.
    """

    def __init__(self, index: Any, spec: IndexSpec, meta: dict[str, Any] | None = None) -> None:
        self._index = index
        self._spec = spec
        self._meta = dict(meta or {})
        _check_json(self._meta)
        self.mmapped = False
        self.load_mode = "built"
        self.path: str | None = None
        self._ivf = _find_ivf(index)
        self._hnsw = _find_hnsw(index)
        self._flat = _find_flat(index)
        self._sqnorms: tuple[int, int, np.ndarray] | None = None
        if self._ivf is not None and spec.nprobe is None:
            self._spec = dataclasses.replace(spec, nprobe=default_nprobe(int(self._ivf.nlist)))

    # ---- construction

    @classmethod
    def build(cls, vectors: np.ndarray, spec: IndexSpec | None = None, meta: dict[str, Any] | None = None) -> "VectorIndex":
        """Build an index over ``vectors``.

        Args:
            vectors: ``(n, d)`` float16/float32 (float64 accepted), finite.
                Not modified; for cosine a normalised float32 copy is indexed.
            spec: how to build; default ``IndexSpec()`` (exact cosine).
            meta: JSON-serialisable dict stored with the index (e.g. a build
                key, model name, layer) and checked by ``load(expect=...)``.

        Returns:
            The index, with ``spec`` resolved (``nlist``/``nprobe`` filled in).

        Raises:
            ValueError: empty input, bad shape/dtype/values, invalid factory
                string, or too few vectors to train the requested index.
        """
        spec = spec or IndexSpec()
        meta = dict(meta or {})
        _check_json(meta)
        arr = np.asarray(vectors)
        if arr.ndim == 2 and arr.shape[0] == 0:
            raise ValueError("cannot build an index from 0 vectors; cache some activations first")
        x = _as_matrix(arr, "vectors", normalize=spec.metric == "cosine")
        n, d = x.shape
        if d == 0:
            raise ValueError("vectors have dimension 0")

        if spec.kind == "flat":
            factory = "Flat"
        elif spec.kind == "ivf":
            nlist = spec.nlist if spec.nlist is not None else default_nlist(n)
            if nlist > n:
                raise ValueError(f"nlist={nlist} exceeds the number of vectors n={n}; use a smaller nlist (or kind='flat')")
            spec = dataclasses.replace(spec, nlist=int(nlist))
            factory = f"IVF{nlist},Flat"
        elif spec.kind == "hnsw":
            factory = f"HNSW{spec.hnsw_m},Flat"
        else:
            factory = str(spec.factory)

        try:
            index = faiss.index_factory(d, factory, _faiss_metric(spec.metric))
        except RuntimeError as e:
            raise ValueError(f"FAISS could not parse index factory string {factory!r}: {_first_line(e)}") from None

        ivf = _find_ivf(index)
        if ivf is not None:
            ivf.cp.seed = int(spec.seed)
        hnsw = _find_hnsw(index)
        if hnsw is not None:
            hnsw.hnsw.efConstruction = int(spec.ef_construction)

        try:
            if not index.is_trained:
                index.train(x)
            if any(isinstance(s, (faiss.IndexIDMap, faiss.IndexIDMap2)) for s in _unwrap(index)):
                index.add_with_ids(x, np.arange(n, dtype=np.int64))
            else:
                index.add(x)
        except RuntimeError as e:
            raise ValueError(f"FAISS could not train/fill {factory!r} with n={n} vectors of d={d}: {_first_line(e)}") from None

        return cls(index, spec, meta)

    # ---- properties

    @property
    def index(self) -> Any:
        """The underlying faiss index (do not mutate a memory-mapped one)."""
        return self._index

    @property
    def d(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def spec(self) -> IndexSpec:
        """The resolved spec, including the current nprobe / ef_search."""
        return self._spec

    @property
    def meta(self) -> dict[str, Any]:
        """User metadata (a copy; pass ``meta=`` to build to set it)."""
        return dict(self._meta)

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query, or None for non-IVF indexes."""
        return self._spec.nprobe if self._ivf is not None else None

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if self._ivf is None:
            if value is None:
                return
            raise ValueError(f"nprobe only applies to IVF indexes; this index is {type(faiss.downcast_index(self._index)).__name__}")
        if value is None:
            value = default_nprobe(int(self._ivf.nlist))
        value = int(value)
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._spec = dataclasses.replace(self._spec, nprobe=value)

    @property
    def ef_search(self) -> int | None:
        """HNSW search beam width, or None for non-HNSW indexes."""
        return self._spec.ef_search if self._hnsw is not None else None

    @ef_search.setter
    def ef_search(self, value: int | None) -> None:
        if self._hnsw is None:
            if value is None:
                return
            raise ValueError(f"ef_search only applies to HNSW indexes; this index is {type(faiss.downcast_index(self._index)).__name__}")
        if value is None:
            value = IndexSpec.ef_search
        value = int(value)
        if value < 1:
            raise ValueError(f"ef_search must be >= 1, got {value}")
        self._spec = dataclasses.replace(self._spec, ef_search=value)

    def __repr__(self) -> str:
        return (f"VectorIndex(kind={self._spec.kind!r}, metric={self._spec.metric!r}, d={self.d}, "
                f"ntotal={self.ntotal}, load_mode={self.load_mode!r})")

    # ---- search

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours of every query, batched.

        Flat indexes run :func:`indexes.flat.search_flat` (numpy BLAS over the
        stored vectors; equal scores rank the lower id first); the others run
        one FAISS search call.

        Args:
            queries: ``(q, d)`` float16/float32 (float64 accepted).
                Normalised (on a copy) for cosine indexes.
            k: results per query, ``1 <= k <= ntotal``.
            exclude: optional ``(q, m)`` integer array of ids to drop per
                query (e.g. the query's own id), padded with ``-1``.  Each row
                still gets ``k`` results while the pool allows it (flat:
                excluded scores are masked; others: the index is searched for
                ``k + m`` and filtered).

        Returns:
            ``(scores, ids)``: ``(q, k)`` float32 (higher is better; negative
            squared distance for l2) and ``(q, k)`` int64, best first.  Slots
            with no result hold id -1 and score -inf.

        Raises:
            IndexMismatchError: query dimension differs from the index's.
            ValueError: bad k, shapes or dtypes.
        """
        q_arr = np.asarray(queries)
        if q_arr.ndim != 2:
            raise ValueError(f"queries must be a 2-D array (q, d), got shape {q_arr.shape}")
        if q_arr.shape[1] != self.d:
            raise IndexMismatchError(
                f"query dimension {q_arr.shape[1]} != index dimension {self.d}; query with vectors from the same "
                f"model/layer the index was built from, or rebuild the index")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > self.ntotal:
            raise ValueError(f"k={k} is larger than the number of indexed vectors ntotal={self.ntotal}; use k <= {self.ntotal}")
        nq = q_arr.shape[0]

        ex = None
        if exclude is not None:
            ex = np.asarray(exclude)
            if ex.ndim != 2 or ex.shape[0] != nq:
                raise ValueError(f"exclude must have shape (q, m) = ({nq}, m), got {ex.shape}")
            if ex.size and not np.issubdtype(ex.dtype, np.integer):
                raise ValueError(f"exclude must be an integer array of ids, got dtype {ex.dtype}")
            ex = ex.astype(np.int64, copy=False)
            if ex.shape[1] == 0:
                ex = None

        if nq == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)

        x = _as_matrix(q_arr, "queries", normalize=self._spec.metric == "cosine")
        if self._flat is not None:
            vectors = self._stored_vectors()
            l2 = self._flat.metric_type == faiss.METRIC_L2
            return search_flat(vectors, x, k, "l2" if l2 else "ip", exclude=ex,
                               pool_sqnorms=self._pool_sqnorms(vectors) if l2 else None)
        pool = min(k + (ex.shape[1] if ex is not None else 0), self.ntotal)
        self._apply_search_params(pool)
        D, I = self._index.search(x, pool)
        D = np.asarray(D, dtype=np.float32)
        I = np.asarray(I, dtype=np.int64)
        if self._spec.metric == "l2":
            D = -D
        D[I < 0] = -np.inf

        if ex is None:
            return np.ascontiguousarray(D[:, :k]), np.ascontiguousarray(I[:, :k])
        return _drop_excluded(D, I, ex, k, self.ntotal)

    def _stored_vectors(self) -> np.ndarray:
        """Read-only ``(ntotal, d)`` float32 view of the flat index's storage.

        Made afresh per search, never kept: the view does not own the memory,
        and the faiss vector behind it may move if the index is mutated.
        """
        codes = self._flat.codes
        v = faiss.rev_swig_ptr(codes.c_ptr, codes.c_size).view(np.float32).reshape(self.ntotal, self.d)
        v.flags.writeable = False
        return v

    def _pool_sqnorms(self, vectors: np.ndarray) -> np.ndarray:
        """``(ntotal,)`` squared norms for l2, cached per storage address and size."""
        key = (vectors.ctypes.data, vectors.shape[0])
        if self._sqnorms is None or self._sqnorms[:2] != key:
            self._sqnorms = (*key, np.einsum("ij,ij->i", vectors, vectors))
        return self._sqnorms[2]

    def _apply_search_params(self, pool: int) -> None:
        if self._ivf is not None:
            self._ivf.nprobe = int(self._spec.nprobe)
        if self._hnsw is not None:
            self._hnsw.hnsw.efSearch = max(int(self._spec.ef_search), pool)

    # ---- persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` and its JSON sidecar to ``path + ".json"``.

        Crash safety.  Both files are written to a temp file in the same
        directory, fsynced, and ``os.replace``d into place.  The order is:

        1. write the new index to a temp file (an error here leaves the old
           index and sidecar untouched and usable);
        2. delete the old sidecar;
        3. rename the new index into place;
        4. write the new sidecar (temp + rename) *last*.

        A sidecar therefore only ever exists next to the index it describes:
        after a crash between 2 and 4 there is an index without a sidecar,
        which :meth:`load` refuses (``IndexFileError``: rebuild), rather than
        a new index paired with stale metadata (wrong build key accepted) or
        vice versa.  The sidecar also records the index file's size and a
        sampled content fingerprint, so a pair torn by concurrent writers or
        a reader racing a save is detected too.
        """
        path = os.fspath(path)
        sidecar = path + SIDECAR_SUFFIX
        dirname = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(dirname):
            raise IndexFileError(f"cannot save index: directory {dirname!r} does not exist; create it first")

        tmp = _tmp_name(path)
        try:
            faiss.write_index(self._index, tmp)
            _fsync_file(tmp)
            size = os.path.getsize(tmp)
            fp = _fingerprint(tmp)
            try:
                os.unlink(sidecar)
            except FileNotFoundError:
                pass
            else:
                _fsync_dir(dirname)  # the unlink must reach disk before the rename does
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(dirname)

        doc = {
            "format": SIDECAR_FORMAT,
            "spec": self._spec.to_dict(),
            "d": self.d,
            "ntotal": self.ntotal,
            "index_type": type(faiss.downcast_index(self._index)).__name__,
            "faiss_version": faiss.__version__,
            "file_bytes": size,
            "file_fingerprint": fp,
            "meta": self._meta,
        }
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"

        def _write(tmp_path: str) -> None:
            with open(tmp_path, "x", encoding="utf-8") as f:
                f.write(text)

        _atomic_write(sidecar, _write)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, expect: dict[str, Any] | None = None) -> "VectorIndex":
        """Open an index written by :meth:`save`.

        Args:
            path: the index file; its sidecar ``path + ".json"`` must exist.
            mmap: map the index data from disk instead of reading it into RAM
                (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``).  Falls back to a
                plain read if FAISS refuses; ``.mmapped`` / ``.load_mode``
                say what happened.
            expect: fields that must match, e.g. ``{"d": 640, "ntotal": 1000,
                "key": "abc"}``.  ``d``/``ntotal`` are checked against both the
                sidecar and the index itself, other names against the spec
                fields (``kind``, ``metric``, ...) and then the user meta.

        Raises:
            IndexFileError: missing, truncated, corrupt or foreign file, or a
                sidecar that does not belong to the index file.
            IndexMismatchError: an ``expect`` field differs (message names the
                field, expected and found values).
        """
        path = os.fspath(path)
        sidecar = path + SIDECAR_SUFFIX
        if not os.path.exists(path):
            raise IndexFileError(f"index file {path!r} does not exist; build it first (e.g. `actcache build ...`)")
        if not os.path.exists(sidecar):
            raise IndexFileError(
                f"index sidecar {sidecar!r} is missing (an interrupted save, or not an actcache index); {_REBUILD_ADVICE}")
        try:
            with open(sidecar, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
                raise ValueError(f"format is {doc.get('format') if isinstance(doc, dict) else None!r}, "
                                 f"expected {SIDECAR_FORMAT!r}")
            spec = IndexSpec.from_dict(doc["spec"])
            side_d, side_n = int(doc["d"]), int(doc["ntotal"])
            meta = doc.get("meta") or {}
            if not isinstance(meta, dict):
                raise ValueError("meta is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"index sidecar {sidecar!r} is corrupt or foreign ({_first_line(e)}); {_REBUILD_ADVICE}") from None

        # Check the pair before handing the file to FAISS: a truncated file
        # must never reach the (mmap) reader.
        size = os.path.getsize(path)
        if size != doc.get("file_bytes"):
            raise IndexFileError(
                f"index file {path!r} has {size} bytes but its sidecar recorded {doc.get('file_bytes')} "
                f"(truncated, or overwritten by another save); {_REBUILD_ADVICE}")
        if _fingerprint(path) != doc.get("file_fingerprint"):
            raise IndexFileError(
                f"index file {path!r} does not match its sidecar's fingerprint (corrupt, or written by a different "
                f"save); {_REBUILD_ADVICE}")

        sources = {"d": side_d, "ntotal": side_n, **spec.to_dict()}
        _check_expect(expect, sources, meta, where="sidecar", path=path)

        index, mode, mapped = _read_index(path, mmap)
        if int(index.d) != side_d or int(index.ntotal) != side_n:
            raise IndexFileError(
                f"index file {path!r} holds d={index.d}, ntotal={index.ntotal} but its sidecar says d={side_d}, "
                f"ntotal={side_n}; {_REBUILD_ADVICE}")
        _check_expect({k: v for k, v in (expect or {}).items() if k in ("d", "ntotal")},
                      {"d": int(index.d), "ntotal": int(index.ntotal)}, {}, where="index file", path=path)

        out = cls(index, spec, meta)
        out.mmapped = mapped
        out.load_mode = mode
        out.path = path
        return out


def _check_expect(expect: dict[str, Any] | None, sources: dict[str, Any], meta: dict[str, Any], where: str, path: str) -> None:
    for field, want in (expect or {}).items():
        # Stored values went through JSON (tuples became lists), so compare like with like.
        try:
            want_cmp = json.loads(json.dumps(want))
        except (TypeError, ValueError):
            want_cmp = want
        if field in sources:
            found, present = sources[field], True
        elif field in meta:
            found, present = meta[field], True
        else:
            found, present = None, False
        if not present:
            raise IndexMismatchError(
                f"index {path!r}: field {field!r} expected {want!r} but the {where} has no such field; "
                f"rebuild the index (e.g. `actcache build ...`)")
        if found != want_cmp:
            raise IndexMismatchError(
                f"index {path!r}: field {field!r} differs: expected {want!r}, found {found!r} in the {where}; "
                f"rebuild the index for these inputs (e.g. `actcache build ...`) or point at the right file")


def _read_index(path: str, mmap: bool) -> tuple[Any, str, bool]:
    """Read with zero-copy mmap if asked and possible; report what happened."""
    if mmap:
        before = _mapped_ranges(path)
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            index = None  # e.g. filesystem without mmap; a plain read may still work
        if index is not None:
            after = _mapped_ranges(path)
            # /proc tells the truth on Linux; elsewhere trust that the flag took.
            mapped = True if before is None or after is None else bool(after - before)
            return index, ("mmap" if mapped else "read"), mapped
    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        raise IndexFileError(f"FAISS could not read index file {path!r} ({_first_line(e)}); {_REBUILD_ADVICE}") from None
    return index, "read", False


def _drop_excluded(D: np.ndarray, I: np.ndarray, ex: np.ndarray, k: int, ntotal: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``ex`` ids per row and keep the first ``k`` survivors, vectorised.

    Each (row, id) pair is encoded as one int64 key ``row * (ntotal + 1) + id``
    so a single ``np.isin`` tests membership for all rows at once.  Ids are
    ``0 .. ntotal-1`` by construction; out-of-range exclude ids (padding -1, or
    ids that cannot occur) are dropped first so keys cannot collide.
    """
    nq = I.shape[0]
    stride = np.int64(ntotal + 1)
    rows = np.arange(nq, dtype=np.int64)[:, None]
    valid = (ex >= 0) & (ex < ntotal)
    ex_keys = (rows * stride + np.where(valid, ex, 0))[valid]
    keep = (I >= 0) & ~np.isin(rows * stride + I, ex_keys)
    # Stable sort of "not kept" moves survivors to the front in rank order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    Dk = np.take_along_axis(D, order, axis=1)
    Ik = np.take_along_axis(I, order, axis=1)
    kept = np.take_along_axis(keep, order, axis=1)
    Dk[~kept] = -np.inf
    Ik[~kept] = -1
    return np.ascontiguousarray(Dk, dtype=np.float32), np.ascontiguousarray(Ik, dtype=np.int64)


# --------------------------------------------------------------------------- reference


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` in float64 numpy: the reference the approximate indexes are tested against.

    Same conventions as :meth:`VectorIndex.search` (cosine / ip / negative
    squared l2; higher is better) and the same tiled top-k
    (:func:`indexes.flat.search_flat`), run on float64 copies.  Results are
    sorted by score descending, then id ascending, so equal scores (also at
    the k-th place) come out lowest id first.

    Args:
        vectors: ``(n, d)`` float array.
        queries: ``(q, d)`` float array.
        k: ``1 <= k <= n``.
        metric: ``"cosine"``, ``"ip"`` or ``"l2"``.

    Returns:
        ``(scores, ids)``: ``(q, k)`` float32 and ``(q, k)`` int64.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    V = np.ascontiguousarray(vectors, dtype=np.float64)
    Q = np.ascontiguousarray(queries, dtype=np.float64)
    if V.ndim != 2 or Q.ndim != 2:
        raise ValueError(f"vectors and queries must be 2-D, got {V.shape} and {Q.shape}")
    if V.shape[1] != Q.shape[1]:
        raise IndexMismatchError(f"query dimension {Q.shape[1]} != vector dimension {V.shape[1]}")
    n = V.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of vectors n={n}")
    if metric == "cosine":
        V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), np.finfo(np.float64).tiny)
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return search_flat(V, Q, k, "l2" if metric == "l2" else "ip")
