"""`VectorIndex`: a FAISS index plus its spec and metadata; batched search
(exact flat search on numpy's BLAS, FAISS for the approximate kinds), save and
verified load."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from typing import Any, Callable

import faiss
import numpy as np

from . import io as iox
from .flat import search_flat
from .io import (
    REBUILD_ADVICE, SIDECAR_FORMAT, SIDECAR_SUFFIX, IndexFileError, IndexMismatchError, check_expect, first_line,
    read_index, vectors_fingerprint,
)
from .spec import METRICS, IndexSpec, default_nprobe, factory_string, faiss_metric


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
    if (type(sub) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2)
            and sub.metric_type in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2)):
        return sub
    return None


def _check_json(meta: dict[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"index meta must be JSON-serialisable (it is stored in the .json sidecar): {e}") from None


def _short_of_space(dirname: str, need: int) -> bool:
    """True when a failed write of ``need`` bytes is explained by a full disk or a file-size limit."""
    try:
        if shutil.disk_usage(dirname).free < need:
            return True
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return soft != resource.RLIM_INFINITY and soft < need
    except (ImportError, OSError, ValueError):
        return False


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
        self._source_fp: str | None = None
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

        factory, spec = factory_string(spec, n)

        try:
            index = faiss.index_factory(d, factory, faiss_metric(spec.metric))
        except RuntimeError as e:
            raise ValueError(f"FAISS could not parse index factory string {factory!r}: {first_line(e)}") from None

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
            raise ValueError(f"FAISS could not train/fill {factory!r} with n={n} vectors of d={d}: {first_line(e)}") from None

        out = cls(index, spec, meta)
        out._source_fp = vectors_fingerprint(arr)
        return out

    # ---- properties

    @property
    def source_fingerprint(self) -> str | None:
        """`vectors_fingerprint` of the vectors this index was built from (kept
        through save and load), or None for a wrapped bare faiss index."""
        return self._source_fp

    @property
    def ondisk(self) -> bool:
        """True when the inverted lists live in an ``.ivfdata`` file (see
        :func:`indexes.build_ondisk`), which is memory-mapped."""
        if self._ivf is None:
            return False
        return isinstance(faiss.downcast_InvertedLists(self._ivf.invlists), faiss.OnDiskInvertedLists)

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
        full-content fingerprint, so a pair torn by concurrent writers or a
        reader racing a save is detected too.
        """
        path = os.fspath(path)
        sidecar = path + SIDECAR_SUFFIX
        dirname = os.path.dirname(os.path.abspath(path))
        if self.ondisk:
            raise ValueError("an on-disk IVF index (inverted lists in an .ivfdata file) cannot be saved again; "
                             "build it where it should live with indexes.build_ondisk")
        if not os.path.isdir(dirname):
            raise IndexFileError(f"cannot save index: directory {dirname!r} does not exist; create it first")

        tmp = iox.tmp_name(path)
        try:
            try:
                faiss.write_index(self._index, tmp)
            except RuntimeError as e:
                need = self.ntotal * self.d * 4
                # FAISS reports a failed fwrite as RuntimeError; its text may carry strerror.
                if _short_of_space(dirname, need) or any(os.strerror(n) in str(e) for n in iox.NO_SPACE):
                    raise iox.no_space_error(OSError(errno.ENOSPC, str(e)), path, need) from None
                raise
            iox.fsync_file(tmp)
            size = os.path.getsize(tmp)
            fp = iox.file_fingerprint(tmp)
            try:
                os.unlink(sidecar)
            except FileNotFoundError:
                pass
            else:
                iox.fsync_dir(dirname)  # the unlink must reach disk before the rename does
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        iox.fsync_dir(dirname)
        self._write_sidecar(path, size, fp)

    def _write_sidecar(self, path: str, size: int, fp: str, ivfdata: dict[str, Any] | None = None) -> None:
        """Write ``path + ".json"`` (atomically) describing the index file of
        ``size`` bytes and content hash ``fp`` (and its on-disk lists, if any)."""
        doc = {
            "format": SIDECAR_FORMAT,
            "spec": self._spec.to_dict(),
            "d": self.d,
            "ntotal": self.ntotal,
            "index_type": type(faiss.downcast_index(self._index)).__name__,
            "faiss_version": faiss.__version__,
            "file_bytes": size,
            "file_fingerprint": fp,
            "source_fingerprint": self._source_fp,
            "meta": self._meta,
        }
        if ivfdata is not None:
            doc["ivfdata"] = ivfdata
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        iox.atomic_write(path + SIDECAR_SUFFIX, lambda f: f.write(text.encode("utf-8")))
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, expect: dict[str, Any] | None = None) -> "VectorIndex":
        """Open an index written by :meth:`save`.

        Args:
            path: the index file; its sidecar ``path + ".json"`` must exist.
            mmap: map the index data from disk instead of reading it into RAM
                (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``).  Falls back to a
                plain read if FAISS refuses; ``.mmapped`` / ``.load_mode``
                say what happened.  An on-disk IVF index (``build_ondisk``)
                always maps its ``.ivfdata`` lists, which are first checked
                against the size and sha256 its sidecar recorded.
            expect: fields that must match, e.g. ``{"d": 640, "ntotal": 1000,
                "key": "abc"}``.  ``d``/``ntotal`` are checked against both the
                sidecar and the index itself, ``source_fingerprint`` against
                the `vectors_fingerprint` recorded at build time, other names
                against the spec fields (``kind``, ``metric``, ...) and then
                the user meta.

        Raises:
            IndexFileError: missing, truncated, garbled (content hash differs
                from the sidecar's), unreadable or foreign file, or a sidecar
                that does not belong to the index file.  Any FAISS/OS error
                while reading becomes this, with advice to rebuild.
            IndexMismatchError: an ``expect`` field differs (message names the
                field, expected and found values); checked before the content
                hash, so a sidecar of other vectors is reported as this.
        """
        path = os.fspath(path)
        sidecar = path + SIDECAR_SUFFIX
        if not os.path.exists(path):
            raise IndexFileError(f"index file {path!r} does not exist; build it first (e.g. `actcache build ...`)")
        if not os.path.exists(sidecar):
            raise IndexFileError(
                f"index sidecar {sidecar!r} is missing (an interrupted save, or not an actcache index); {REBUILD_ADVICE}")
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
            raise IndexFileError(f"index sidecar {sidecar!r} is corrupt or foreign ({first_line(e)}); {REBUILD_ADVICE}") from None

        # The size first: a truncated file must never reach the (mmap) reader.
        size = _read_or_refuse(os.path.getsize, path)
        if size != doc.get("file_bytes"):
            raise IndexFileError(
                f"index file {path!r} has {size} bytes but its sidecar recorded {doc.get('file_bytes')} "
                f"(truncated, or overwritten by another save); {REBUILD_ADVICE}")

        # Expectations before the content hash: a sidecar that describes other
        # vectors (copied from another array's index) is a mismatch with what
        # the caller asked for, not merely a damaged file.
        sources = {"d": side_d, "ntotal": side_n, "source_fingerprint": doc.get("source_fingerprint"),
                   **spec.to_dict()}
        check_expect(expect, sources, meta, where="sidecar", path=path)

        if _read_or_refuse(iox.file_fingerprint, path) != doc.get("file_fingerprint"):
            raise IndexFileError(
                f"index file {path!r} does not match its sidecar's fingerprint (corrupt, or written by a different "
                f"save); {REBUILD_ADVICE}")

        if doc.get("ivfdata") is not None:
            _check_ivfdata(path, doc["ivfdata"])
            index, mode, mapped = iox.read_ondisk_index(path), "mmap", True
        else:
            index, mode, mapped = read_index(path, mmap)
        if int(index.d) != side_d or int(index.ntotal) != side_n:
            raise IndexFileError(
                f"index file {path!r} holds d={index.d}, ntotal={index.ntotal} but its sidecar says d={side_d}, "
                f"ntotal={side_n}; {REBUILD_ADVICE}")
        check_expect({k: v for k, v in (expect or {}).items() if k in ("d", "ntotal")},
                      {"d": int(index.d), "ntotal": int(index.ntotal)}, {}, where="index file", path=path)

        out = cls(index, spec, meta)
        out._source_fp = doc.get("source_fingerprint")
        out.mmapped = mapped
        out.load_mode = mode
        out.path = path
        return out


def _check_ivfdata(path: str, rec: Any) -> None:
    """The ``.ivfdata`` file beside ``path`` must exist with the size and
    content hash its sidecar recorded (a short file would crash FAISS on search)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or os.sep in rec["file"]:
        raise IndexFileError(f"index sidecar {path + SIDECAR_SUFFIX!r} has a corrupt ivfdata record; {REBUILD_ADVICE}")
    data = os.path.join(os.path.dirname(os.path.abspath(path)), rec["file"])
    if not os.path.exists(data):
        raise IndexFileError(f"the inverted lists {data!r} of index {path!r} are missing; {REBUILD_ADVICE}")
    size = _read_or_refuse(os.path.getsize, data)
    if size != rec.get("bytes"):
        raise IndexFileError(f"inverted lists {data!r} have {size} bytes but the sidecar recorded "
                             f"{rec.get('bytes')} (truncated or replaced); {REBUILD_ADVICE}")
    if _read_or_refuse(iox.file_fingerprint, data) != rec.get("fingerprint"):
        raise IndexFileError(f"inverted lists {data!r} do not match the sidecar's fingerprint (corrupt, or "
                             f"written by another build); {REBUILD_ADVICE}")


def _read_or_refuse(read: Callable[[str], Any], path: str) -> Any:
    """``read(path)``, with an OS error (permissions, I/O) turned into IndexFileError."""
    try:
        return read(path)
    except OSError as e:
        raise IndexFileError(f"index file {path!r} is unreadable ({first_line(e)}); {REBUILD_ADVICE}") from None


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
