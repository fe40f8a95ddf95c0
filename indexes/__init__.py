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

Files
-----
* ``spec.py``: :class:`IndexSpec`, factory strings, IVF defaults.
* ``index.py``: :class:`VectorIndex` (build, search, save, verified load) and
  the float64 reference :func:`exact_search`.
* ``flat.py``: exact search on numpy's BLAS.
* ``ondisk.py``: :func:`build_ondisk` (an IVF index built shard by shard,
  its inverted lists merged into one memory-mapped ``.ivfdata`` file) and
  :func:`recall_at_k` against exact search streamed over the shards.
* ``io.py``: the sidecar, content fingerprints, ``atomic_write`` (the one
  temp-fsync-rename helper actcache uses everywhere), ``NoSpaceError``.
"""

from __future__ import annotations

import os

import faiss

from .flat import search_flat
from .index import VectorIndex, exact_search
from .ondisk import IVFDATA_SUFFIX, build_ondisk, exact_topk, ondisk_supported, recall_at_k
from .io import (
    SIDECAR_FORMAT, SIDECAR_SUFFIX, IndexFileError, IndexMismatchError, NoSpaceError, atomic_write, file_fingerprint,
    fsync_dir, tmp_owner, vectors_fingerprint,
)
from .spec import KINDS, METRICS, IndexSpec, check_factory, default_nlist, default_nprobe, min_vectors

__all__ = [
    "IndexFileError",
    "IndexMismatchError",
    "NoSpaceError",
    "IndexSpec",
    "VectorIndex",
    "atomic_write",
    "build_ondisk",
    "exact_topk",
    "check_factory",
    "default_nlist",
    "default_nprobe",
    "exact_search",
    "file_fingerprint",
    "fsync_dir",
    "min_vectors",
    "ondisk_supported",
    "recall_at_k",
    "search_flat",
    "set_threads",
    "tmp_owner",
    "vectors_fingerprint",
    "IVFDATA_SUFFIX",
    "KINDS",
    "METRICS",
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
]


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
