"""Files: atomic writes, fingerprints, and the index + JSON sidecar pair.

:func:`atomic_write` and :func:`fsync_dir` are generic (actcache uses them for
its own files too); :func:`save_index` / :func:`load_index` are the persistence
behind :meth:`indexes.VectorIndex.save` / :meth:`~indexes.VectorIndex.load`.

What a loaded index is checked against
--------------------------------------
The sidecar records the index file's size and the sha256 of its full content,
and (for an index built from vectors) :func:`vectors_fingerprint` of those
vectors.  :func:`load_index` checks, cheapest first: the sidecar parses; the
file size matches (a truncated file never reaches FAISS's mmap reader); every
``expect`` field matches the sidecar (so a sidecar copied from another array's
index is a mismatch, not trusted); the file's sha256 matches (same-size
garbling, or an index paired with another save's sidecar); FAISS reads it; its
``d``/``ntotal`` match.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import faiss
import numpy as np

from .spec import IndexSpec

# Bumped when the sidecar layout changes incompatibly.  2: file_fingerprint is
# the sha256 of the whole file (1 sampled blocks); source_fingerprint added.
SIDECAR_FORMAT = "actcache.indexes/2"
SIDECAR_SUFFIX = ".json"

REBUILD_ADVICE = ("delete the index file and its .json sidecar and rebuild it "
                  "(actcache rebuilds a missing or damaged index by itself on next use)")

# errno values that mean "the disk (or quota, or file size limit) is full".
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# FAISS reports failed fwrite()s as RuntimeError whose text carries strerror.
_NO_SPACE_TEXT = {os.strerror(e): e for e in _NO_SPACE}

_CHUNK = 1 << 22  # 4 MiB: large enough that hashing runs at sha256 speed


class IndexMismatchError(ValueError):
    """An index (or query) does not match what the caller expected."""


class IndexFileError(OSError):
    """An index file or its sidecar is missing, corrupt, torn or not ours."""


class NoSpaceError(OSError):
    """A write failed because the disk, quota or file size limit is full.

    ``errno`` is the original one (``ENOSPC``, ``EDQUOT`` or ``EFBIG``);
    ``path`` is the file that was being written and ``nbytes`` how many bytes
    the writer had tried to write when it failed.
    """

    def __init__(self, err: int, path: str, nbytes: int) -> None:
        self.path = path
        self.nbytes = nbytes
        super().__init__(err, f"{os.strerror(err)} while writing {path!r} ({nbytes} bytes attempted); "
                              f"free disk space (or raise the quota / file size limit) and retry")

    def __str__(self) -> str:
        return self.strerror


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (FAISS errors span several)."""
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# --------------------------------------------------------------------------- atomic writes


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync the directory ``path`` so a rename or unlink in it is durable.

    Silently does nothing where directories cannot be opened or fsynced
    (some OSes and filesystems); the data itself is already fsynced by then.
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _CountingWriter:
    """Wraps a binary file, counting the bytes handed to ``write`` (for NoSpaceError)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.attempted = 0

    def write(self, b: Any) -> int:
        self.attempted += memoryview(b).nbytes
        return self._f.write(b)

    def writelines(self, lines: Any) -> None:
        for b in lines:
            self.write(b)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _open_temp(path: Path) -> tuple[Path, BinaryIO]:
    """Create ``.{name}.{pid}.tmp`` beside ``path`` (a random suffix if taken).

    Not ``tempfile.mkstemp``: that creates the file 0600, and the rename would
    then give the target those permissions instead of the usual umask ones.
    The name carries the pid so a leftover is traceable to its writer; it is
    taken only if another thread of this process writes the same path.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        return tmp, open(tmp, "xb")
    except FileExistsError:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        return tmp, open(tmp, "xb")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write a file so that readers see either the old file or the complete new one.

    ``write(f)`` fills a temp file ``.{name}.{pid}.tmp`` in the same
    directory (so the rename is atomic: same filesystem); it is then flushed,
    fsynced, ``os.replace``d onto ``path``, and the directory is fsynced.  A
    process that has the old file memory-mapped keeps its (old) inode instead
    of getting SIGBUS from an in-place truncate.  On any exception (also
    KeyboardInterrupt) the temp file is removed and ``path`` is untouched.

    Args:
        path: the target file; its directory must exist.
        write: called once with the temp file opened ``"xb"``.  A writer that
            needs a file name (FAISS, h5py) may write to ``f.name`` instead.
        before_replace: optional, called with the temp path after its fsync
            and before the rename (e.g. to hash what reached the disk, or to
            remove a file that must not outlive the old ``path``).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        NoSpaceError: the disk, quota or file size limit was full (ENOSPC,
            EDQUOT, EFBIG); the message names ``path`` and the bytes attempted.
        Anything ``write`` or ``before_replace`` raises, unchanged.
    """
    path = Path(path)
    tmp, f = _open_temp(path)
    counter = _CountingWriter(f)
    try:
        try:
            with f:
                write(counter)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(tmp)
            os.replace(tmp, path)
        except OSError as e:
            if e.errno not in _NO_SPACE or isinstance(e, NoSpaceError):
                raise
            try:
                on_disk = os.path.getsize(tmp)
            except OSError:
                on_disk = 0
            raise NoSpaceError(e.errno, str(path), max(counter.attempted, on_disk)) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------- fingerprints


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's full content, read in 4 MiB chunks.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def vectors_fingerprint(vectors: Any) -> str:
    """Deterministic sha256 (hex) of a float array's shape and float32 values.

    The hash covers the shape and the little-endian float32 bytes of the
    values, so a float16 array and its exact float32 conversion agree, as do
    C- and Fortran-ordered copies; any changed value changes it (``0.0`` and
    ``-0.0`` too: they differ in bytes).  Read in row blocks of ~16 MiB, so an
    h5py Dataset (anything with ``shape``, ``dtype`` and row slicing) is not
    loaded whole.

    Args:
        vectors: ``(n, d)`` (any ``ndim >= 1``) float16/float32/float64 array.

    Returns:
        64 hex characters.

    Raises:
        ValueError: not a floating-point array, or 0-d.
    """
    if not (hasattr(vectors, "shape") and hasattr(vectors, "dtype")):
        vectors = np.asarray(vectors)
    shape = tuple(int(s) for s in vectors.shape)
    if not shape:
        raise ValueError("vectors_fingerprint needs an array with at least one dimension, got a scalar")
    if not np.issubdtype(np.dtype(vectors.dtype), np.floating):
        raise ValueError(f"vectors_fingerprint needs a floating-point array, got dtype {vectors.dtype}")
    h = hashlib.sha256()
    h.update(json.dumps({"dtype": "<f4", "shape": shape}).encode())
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, (16 << 20) // max(1, row_bytes))
    for i in range(0, shape[0], step):
        block = np.ascontiguousarray(vectors[i:i + step], dtype="<f4")
        h.update(memoryview(block).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------- index + sidecar


@dataclass(frozen=True)
class LoadedIndex:
    """What :func:`load_index` read: the FAISS index and its sidecar's contents."""

    index: Any
    spec: IndexSpec
    meta: dict[str, Any]
    source_fingerprint: str | None
    load_mode: str
    mmapped: bool


def _raise_if_no_space(e: RuntimeError) -> None:
    for text, err in _NO_SPACE_TEXT.items():
        if text in str(e):
            raise OSError(err, text) from None


def _write_sidecar(sidecar: Path, doc: dict[str, Any]) -> None:
    text = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(sidecar, lambda f: f.write(text))


def save_index(index: Any, spec: IndexSpec, meta: dict[str, Any], path: str | os.PathLike,
               source_fingerprint: str | None = None) -> str:
    """Write a FAISS index to ``path`` and its JSON sidecar to ``path + ".json"``.

    Crash safety.  Both files go through :func:`atomic_write`, in this order:

    1. write the new index to a temp file and hash it (an error here leaves
       the old index and sidecar untouched and usable);
    2. delete the old sidecar;
    3. rename the new index into place;
    4. write the new sidecar (temp + rename) *last*.

    A sidecar therefore only ever exists next to the index it describes:
    after a crash between 2 and 4 there is an index without a sidecar, which
    :func:`load_index` refuses (``IndexFileError``: rebuild), rather than a new
    index paired with stale metadata.  The sidecar records the file's size and
    full sha256, so a pair torn by concurrent writers is detected too.

    Args:
        index: a faiss index.
        spec: the resolved spec, stored in the sidecar.
        meta: JSON-serialisable user metadata (checked by ``expect``).
        path: the index file.
        source_fingerprint: :func:`vectors_fingerprint` of the vectors it was
            built from, or None if unknown.

    Returns:
        ``path`` as a str.

    Raises:
        IndexFileError: the directory does not exist.
        NoSpaceError: the disk is full (old files untouched).
        RuntimeError: FAISS failed to write (old files untouched).
    """
    path = os.fspath(path)
    sidecar = Path(path + SIDECAR_SUFFIX)
    dirname = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(dirname):
        raise IndexFileError(f"cannot save index: directory {dirname!r} does not exist; create it first")

    def write(f: BinaryIO) -> None:
        # faiss.write_index takes a file name; it writes the same inode that
        # atomic_write fsyncs through ``f``.
        try:
            faiss.write_index(index, f.name)
        except RuntimeError as e:
            _raise_if_no_space(e)
            raise

    written: dict[str, Any] = {}

    def before_replace(tmp: Path) -> None:
        written["file_bytes"] = os.path.getsize(tmp)
        written["file_fingerprint"] = file_fingerprint(tmp)
        try:
            os.unlink(sidecar)
        except FileNotFoundError:
            pass
        else:
            fsync_dir(dirname)  # the unlink must reach disk before the rename does

    atomic_write(path, write, before_replace)
    doc = {
        "format": SIDECAR_FORMAT,
        "spec": spec.to_dict(),
        "d": int(index.d),
        "ntotal": int(index.ntotal),
        "index_type": type(faiss.downcast_index(index)).__name__,
        "faiss_version": faiss.__version__,
        "source_fingerprint": source_fingerprint,
        "meta": meta,
        **written,
    }
    _write_sidecar(sidecar, doc)
    return path


def load_index(path: str | os.PathLike, mmap: bool = True, expect: dict[str, Any] | None = None,
               verify: bool = True) -> LoadedIndex:
    """Read and check an index written by :func:`save_index`.

    Args:
        path: the index file; its sidecar ``path + ".json"`` must exist.
        mmap: map the index data from disk instead of reading it into RAM
            (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``), falling back to a
            plain read if FAISS refuses.
        expect: fields that must match, e.g. ``{"d": 640, "ntotal": 1000,
            "key": "abc", "array": "...", "source_fingerprint": "..."}``.
            ``d``/``ntotal`` are checked against the sidecar and the index
            itself; ``source_fingerprint`` and the spec fields (``kind``,
            ``metric``, ...) against the sidecar; other names against the user
            meta.  A field the sidecar lacks is a mismatch.
        verify: hash the whole file and compare with the sidecar (catches
            same-size corruption).  ``False`` skips only that hash, for a
            caller that verified this file earlier in the process; the size
            is always checked.

    Raises:
        IndexFileError: missing, truncated, garbled or unreadable file, a
            sidecar that is corrupt or does not belong to the file.
        IndexMismatchError: an ``expect`` field differs (the message names the
            field, expected and found values).
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
        source_fp = doc.get("source_fingerprint")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexFileError(f"index sidecar {sidecar!r} is corrupt or foreign ({error_line(e)}); {REBUILD_ADVICE}") from None

    # The size first: a truncated file must never reach the (mmap) reader.
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise IndexFileError(f"index file {path!r} is unreadable ({error_line(e)}); {REBUILD_ADVICE}") from None
    if size != doc.get("file_bytes"):
        raise IndexFileError(
            f"index file {path!r} has {size} bytes but its sidecar recorded {doc.get('file_bytes')} "
            f"(truncated, or overwritten by another save); {REBUILD_ADVICE}")

    # Expectations before the hash: a sidecar describing another array is a
    # mismatch (the caller built the wrong thing), not a damaged file.
    sources = {"d": side_d, "ntotal": side_n, **spec.to_dict()}
    if source_fp is not None:
        sources["source_fingerprint"] = source_fp
    _check_expect(expect, sources, meta, where="sidecar", path=path)

    if verify:
        try:
            digest = file_fingerprint(path)
        except OSError as e:
            raise IndexFileError(f"index file {path!r} is unreadable ({error_line(e)}); {REBUILD_ADVICE}") from None
        if digest != doc.get("file_fingerprint"):
            raise IndexFileError(
                f"index file {path!r} does not match its sidecar's fingerprint (corrupt, or written by a different "
                f"save); {REBUILD_ADVICE}")

    index, mode, mapped = _read_index(path, mmap)
    if int(index.d) != side_d or int(index.ntotal) != side_n:
        raise IndexFileError(
            f"index file {path!r} holds d={index.d}, ntotal={index.ntotal} but its sidecar says d={side_d}, "
            f"ntotal={side_n}; {REBUILD_ADVICE}")
    _check_expect({k: v for k, v in (expect or {}).items() if k in ("d", "ntotal")},
                  {"d": int(index.d), "ntotal": int(index.ntotal)}, {}, where="index file", path=path)
    return LoadedIndex(index, spec, meta, source_fp, mode, mapped)


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


# What FAISS (and the OS under it) raise for a file it cannot read.
_READ_ERRORS = (RuntimeError, OSError, ValueError, MemoryError)


def _read_index(path: str, mmap: bool) -> tuple[Any, str, bool]:
    """Read with zero-copy mmap if asked and possible; report what happened."""
    if mmap:
        before = _mapped_ranges(path)
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        except _READ_ERRORS:
            index = None  # e.g. filesystem without mmap; a plain read may still work
        if index is not None:
            after = _mapped_ranges(path)
            # /proc tells the truth on Linux; elsewhere trust that the flag took.
            mapped = True if before is None or after is None else bool(after - before)
            return index, ("mmap" if mapped else "read"), mapped
    try:
        index = faiss.read_index(path)
    except _READ_ERRORS as e:
        raise IndexFileError(f"FAISS could not read index file {path!r} ({error_line(e)}); {REBUILD_ADVICE}") from None
    return index, "read", False
