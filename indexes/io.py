"""Index files on disk: the JSON sidecar, atomic writes, content fingerprints
and the checks a loaded index must pass. Also the one atomic-write helper the
rest of actcache uses for every file a later run trusts."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

import faiss
import numpy as np

# Bumped when the sidecar layout changes incompatibly (2: full-content hash,
# source fingerprint; 3: that hash is sha256, not blake2b).
SIDECAR_FORMAT = "actcache.indexes/3"
SIDECAR_SUFFIX = ".json"

REBUILD_ADVICE = "delete the index file and its .json sidecar and rebuild it (actcache rebuilds it on next use)"


class IndexMismatchError(ValueError):
    """An index (or query) does not match what the caller expected."""


class IndexFileError(OSError):
    """An index file or its sidecar is missing, corrupt, torn or not ours."""


class NoSpaceError(OSError):
    """A write failed for lack of space (ENOSPC, EDQUOT) or a file-size limit (EFBIG)."""


NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def fsync_dir(dirname: str | os.PathLike) -> None:
    """Make a rename in ``dirname`` durable (not possible on every OS/filesystem)."""
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


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: str | os.PathLike) -> str:
    """A unique hidden temp name next to ``path``: ``.<name>.<pid>.<hex>.tmp``.

    Not ``tempfile.mkstemp``: that creates the file 0600, and the rename would
    then give the file those permissions instead of the usual umask ones. The
    pid lets a cleaner tell a dead writer's leftovers from a live one's.
    """
    dirname, base = os.path.split(os.path.abspath(path))
    return os.path.join(dirname, f".{base}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def tmp_owner(name: str) -> int | None:
    """The writer pid in a name made by `tmp_name`, or None."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None


def no_space_error(e: OSError, path: str | os.PathLike, nbytes: int | None = None,
                   at_least: bool = False) -> NoSpaceError:
    """The clear error for a write that ran out of space (or hit a file-size limit).

    ``nbytes`` is the size quoted in the message: the size of the whole write,
    or with ``at_least`` what had been written when it failed.
    """
    size = f"{nbytes / 2**20:.1f} MiB" if nbytes and nbytes >= 2**20 else f"{nbytes} bytes"
    need = f" ({'at least' if at_least else 'about'} {size} to write)" if nbytes else ""
    why = "a file-size limit was hit" if e.errno == errno.EFBIG else "the disk is full"
    return NoSpaceError(e.errno, f"cannot write {path}: {why}{need}; free space there or point "
                                 f"--store/ACTCACHE_HOME at a disk with room")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], nbytes: int | None = None) -> Path:
    """Write a file that readers (and a resuming process) can trust.

    ``write(f)`` fills a temp file beside ``path`` (binary), which is flushed,
    fsynced, ``os.replace``d into place, and the directory fsynced. A crash or
    an exception leaves the old file or none, never a torn one, and no temp
    file. Running out of space (ENOSPC, EDQUOT) or a file-size limit (EFBIG),
    also when reported late by the flush or fsync, raises `NoSpaceError`
    naming the path and ``nbytes`` (if given; else the bytes written when it
    failed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        no_space = isinstance(e, OSError) and e.errno in NO_SPACE
        written = None
        if no_space and nbytes is None:
            try:
                written = os.path.getsize(tmp)  # what reached the temp file before it failed
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if no_space:
            raise no_space_error(e, path, nbytes if nbytes is not None else written, at_least=nbytes is None) from None
        raise
    fsync_dir(path.parent)
    return path


_VERIFIED: dict[tuple, str] = {}
_VERIFIED_LOCK = threading.Lock()


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the file's whole content (hex), read in 4 MiB chunks.

    sha256, not blake2b: with the SHA extensions that current x86 and ARM
    CPUs have, hashlib's sha256 ran 1.7x faster here (a 244 MiB index: 0.17 s
    against 0.28 s), and a load pays this once per file and process.

    Each (inode, size, mtime) is hashed once per process: a file is only ever
    replaced by rename (a new inode), so a later load trusts the earlier
    hash. A file garbled in place keeps its inode but not its mtime.
    """
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return _VERIFIED[key]
    h = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    fp = h.hexdigest()
    with _VERIFIED_LOCK:
        _VERIFIED[key] = fp
    return fp


def vectors_fingerprint(vectors: Any) -> str:
    """sha256 (hex) of a float matrix as float32 C-order bytes plus its shape:
    ties an index to the exact vectors it was built from.

    Args:
        vectors: ``(n, d)`` (any ``ndim >= 1``) float16/float32/float64 array,
            or anything with ``shape``, ``dtype`` and row slicing (an h5py
            Dataset), which is read ~16 MiB of rows at a time instead of whole.

    Returns:
        64 hex characters: sha256 of ``json.dumps(list(shape))`` followed by the
        native float32 bytes.  Equal values give equal fingerprints whatever
        the input dtype, byte order or memory layout; any changed value (also
        ``0.0`` vs ``-0.0``) or shape gives another.
    """
    if not (hasattr(vectors, "shape") and hasattr(vectors, "dtype")):
        vectors = np.asarray(vectors)
    shape = [int(s) for s in vectors.shape]
    h = hashlib.sha256(json.dumps(shape).encode())
    if not shape:  # a scalar: one value, no rows to step over
        h.update(np.asarray(vectors, dtype=np.float32).tobytes())
        return h.hexdigest()
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, (16 << 20) // max(1, row_bytes))
    for i in range(0, shape[0], step):
        h.update(np.ascontiguousarray(vectors[i: i + step], dtype=np.float32).tobytes())
    return h.hexdigest()


def mapped_ranges(path: str) -> set[str] | None:
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


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def check_expect(expect: dict[str, Any] | None, sources: dict[str, Any], meta: dict[str, Any], where: str, path: str) -> None:
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


# What FAISS (and the OS under it) raise for a file it cannot read or map.
READ_ERRORS = (RuntimeError, OSError, ValueError, MemoryError)


def read_index(path: str, mmap: bool) -> tuple[Any, str, bool]:
    """Read with zero-copy mmap if asked and possible; report what happened."""
    if mmap:
        before = mapped_ranges(path)
        try:
            index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        except READ_ERRORS:
            index = None  # e.g. filesystem without mmap; a plain read may still work
        if index is not None:
            after = mapped_ranges(path)
            # /proc tells the truth on Linux; elsewhere trust that the flag took.
            mapped = True if before is None or after is None else bool(after - before)
            return index, ("mmap" if mapped else "read"), mapped
    try:
        index = faiss.read_index(path)
    except READ_ERRORS as e:
        raise IndexFileError(f"FAISS could not read index file {path!r} ({first_line(e)}); {REBUILD_ADVICE}") from None
    return index, "read", False


@contextlib.contextmanager
def quiet_fd(fd: int = 1):
    """Discard what C code writes to file descriptor `fd` meanwhile (1: FAISS's
    on-disk lists announce every resize and every file they reopen on stdout;
    2: native libraries' start-up log lines), so a command's output stays clean
    (e.g. JSON output)."""
    libc = ctypes.CDLL(None)
    (sys.stdout if fd == 1 else sys.stderr).flush()
    libc.fflush(None)
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


def read_ondisk_index(path: str) -> Any:
    """Read an index whose inverted lists are an ``.ivfdata`` file beside it
    (FAISS maps that file read-only; the small index file itself is read)."""
    flags = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR
    try:
        with quiet_fd(1):
            return faiss.read_index(os.path.abspath(path), flags)
    except READ_ERRORS as e:
        raise IndexFileError(f"FAISS could not read index file {path!r} ({first_line(e)}); {REBUILD_ADVICE}") from None
