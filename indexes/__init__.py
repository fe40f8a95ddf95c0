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

Layout: :mod:`indexes.spec` (IndexSpec, defaults, factory strings),
:mod:`indexes.index` (VectorIndex build/search, exact_search, set_threads),
:mod:`indexes.io` (atomic writes, fingerprints, the index + sidecar pair and
its verification), :mod:`indexes.flat` (exact BLAS search).  This module only
re-exports the public API.

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


from .index import VectorIndex, exact_search, set_threads
from .io import (
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    IndexFileError,
    IndexMismatchError,
    NoSpaceError,
    atomic_write,
    file_fingerprint,
    fsync_dir,
    load_index,
    save_index,
    vectors_fingerprint,
)
from .spec import KINDS, METRICS, IndexSpec, default_nlist, default_nprobe, factory_string

__all__ = [
    "IndexFileError",
    "IndexMismatchError",
    "NoSpaceError",
    "IndexSpec",
    "VectorIndex",
    "exact_search",
    "set_threads",
    "KINDS",
    "METRICS",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "atomic_write",
    "default_nlist",
    "default_nprobe",
    "factory_string",
    "file_fingerprint",
    "fsync_dir",
    "load_index",
    "save_index",
    "vectors_fingerprint",
]

# The name the index-file fingerprint had when this package was one module.
_fingerprint = file_fingerprint
