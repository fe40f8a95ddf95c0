"""The ground floor: where the store lives, keys, atomic writes and locks.

Everything here is small, depends on nothing else of actcache but its errors,
and is used by the store, the data and model loaders and every derived cache:

- `default_home` / `check_home`: the store root (`--store`, $ACTCACHE_HOME,
  ~/.cache/actcache);
- `canonical_key` / `derive_key`: the one key rule (sha256 of canonical JSON
  plus `FORMAT_VERSION`) for builds and every artifact derived from one;
- `save_npz` / `load_npz` / `try_save_npz`: derived arrays, written through
  `atomic_write` (the one temp-fsync-rename helper, `indexes.io.atomic_write`);
- `file_lock` / `build_lock`: exclusive locks that name their holder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import StoreError

# The version of the stored bytes (HDF5 layout, derived files); part of every key.
# 2: no-BOS sink left out of spans; context rows never see themselves.
# 3: fletcher32 on every dataset, an examples digest and per-array fingerprints, so damage is detected.
FORMAT_VERSION = 3

__all__ = ["FORMAT_VERSION", "atomic_write", "default_home", "check_home", "canonical_key", "derive_key",
           "save_npz", "load_npz", "try_save_npz", "os_errno", "read_only", "lock_timeout", "file_lock",
           "build_lock", "MANIFEST", "Manifest", "file_sha256"]


def atomic_write(path: str | os.PathLike, write, nbytes: int | None = None) -> Path:
    """`indexes.io.atomic_write`: `write(f)` into a temp file beside `path`, fsync,
    rename, fsync the directory. Imported on first use because `indexes` loads
    FAISS, and this module is imported by `actcache --help`."""
    from actcache_indexes.io import atomic_write as write_atomically  # loads FAISS: kept out of `actcache --help`

    return write_atomically(path, write, nbytes=nbytes)


def default_home(explicit: str | os.PathLike | None = None) -> Path:
    """The store root: `--store`, else $ACTCACHE_HOME, else ~/.cache/actcache."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("ACTCACHE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "actcache"


def check_home(home: Path, writable: bool = False) -> Path:
    """Raise a clear StoreError when the store root cannot be a directory (it or
    a parent is a file) or, with `writable`, when builds cannot be written under
    it (it is created if missing)."""
    for p in (home, *home.parents):
        if p.exists() and not p.is_dir():
            at = "" if p == home else f" (its parent {p} is a file)"
            raise StoreError(f"store {home} is a file, not a directory{at}; point --store (or ACTCACHE_HOME) "
                             f"at a directory")
    if writable:
        import tempfile

        try:
            (home / "builds").mkdir(parents=True, exist_ok=True)
            # root passes os.access whatever the mode; only a real write tells
            with tempfile.TemporaryFile(dir=home / "builds"):
                pass
        except OSError as e:
            raise StoreError(f"store {home} is not writable ({e.strerror or e}); point --store (or "
                             f"ACTCACHE_HOME) at a directory you can write") from None
    return home


def canonical_json(obj) -> str:
    """The one canonical JSON of the project's keys: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_key(payload: dict) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace) plus the format version."""
    return hashlib.sha256(canonical_json({"format_version": FORMAT_VERSION, **payload}).encode()).hexdigest()


def derive_key(parent_key: str, kind: str, **params) -> str:
    """The key of an artifact derived from a build (an index, a query cache, a
    quality matrix, embeddings, a build pass): sha256 of the canonical JSON of
    the parent key, the kind and every parameter that changes its bytes, plus
    the format version."""
    return canonical_key({"parent": parent_key, "kind": kind, "params": params})


def save_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """np.savez through `atomic_write` (fsynced before its rename: a resume trusts it).
    Out of space: StoreError naming the path and the size."""
    from actcache_indexes.io import NoSpaceError  # loads FAISS: see atomic_write
    try:
        return atomic_write(path, lambda f: np.savez(f, **arrays),
                            nbytes=sum(np.asarray(v).nbytes for v in arrays.values()))
    except NoSpaceError as e:
        raise StoreError(e.strerror or str(e)) from None


def load_npz(path: str | os.PathLike) -> dict | None:
    """Every array of an .npz file, or None when it is missing or damaged (a
    derived file: the caller recomputes it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_errno(e: BaseException) -> int | None:
    """The errno behind `e`: its own, or the one HDF5 quotes in h5py's message
    ("errno = 28"), since h5py raises write failures without setting it."""
    n = getattr(e, "errno", None)
    if n:
        return int(n)
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def read_only(e: BaseException) -> bool:
    """True when `e` says the store cannot be written (a read-only mount, no permission)."""
    return os_errno(e) in _READ_ONLY


def try_save_npz(path: str | os.PathLike, arrays: dict) -> bool:
    """`save_npz` for a cache that may live on a read-only store: False (and
    nothing written) when the store cannot be written; out-of-space errors still raise."""
    try:
        save_npz(path, arrays)
        return True
    except OSError as e:
        if read_only(e):
            return False
        raise


def lock_timeout() -> float:
    """Seconds to wait for a lock: $ACTCACHE_LOCK_TIMEOUT, default 600."""
    return float(os.environ.get("ACTCACHE_LOCK_TIMEOUT", "600"))


@contextmanager
def file_lock(path: Path, timeout: float | None = None) -> Iterator[None]:
    """An exclusive lock on `path` (a `filelock.FileLock`: released when the holder
    exits or dies). Waits up to `timeout` seconds (`lock_timeout()`), then raises a
    StoreError naming the holder (pid, host, command), recorded in `<path>.holder`."""
    from filelock import FileLock, Timeout

    timeout = lock_timeout() if timeout is None else timeout
    lock = FileLock(str(path), timeout=timeout)
    holder = Path(f"{path}.holder")
    try:
        lock.acquire()
    except Timeout:
        try:
            who = holder.read_text().strip()
        except OSError:
            who = "an unknown process"
        raise StoreError(f"{path} has been locked for {timeout:.0f} s by {who}; wait for it to finish "
                         f"(or stop it), or raise ACTCACHE_LOCK_TIMEOUT") from None
    except OSError as e:
        if not read_only(e):
            raise StoreError(f"cannot lock {path} ({e.strerror or e}); check the store directory") from None
        lock = None  # a read-only store has no writer to exclude; a write attempted here fails on its own
    try:
        if lock is not None:
            try:
                holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})\n")
            except OSError:
                pass
        yield
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Exclusive lock on <build>/lock. A second builder of the same key waits,
    then finds the first one's result and reuses it."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {build_dir} ({e.strerror}); point --store (or ACTCACHE_HOME) "
                         f"at a writable directory") from None
    with file_lock(build_dir / "lock"):
        yield


MANIFEST = "manifest.jsonl"  # the file a distributed run keeps beside its flushed units


class Manifest:
    """The units of work flushed so far (one JSON line each: file, rows, sha256,
    worker), appended and fsynced by the process that collects them. A unit is
    trusted only while its file's sha256 matches its line; `drop` forgets one."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                    self.rows[r["file"]] = r
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash: its unit is recomputed

    def trusts(self, f: Path) -> bool:
        r = self.rows.get(str(f))
        return r is not None and f.exists() and file_sha256(f) == r["sha256"]

    def drop(self, f: Path) -> None:
        """Forget `f` (its unit is recomputed), rewriting the manifest atomically."""
        self.rows.pop(str(f), None)
        text = "".join(json.dumps(r) + "\n" for r in self.rows.values())
        atomic_write(self.path, lambda fh: fh.write(text.encode()))

    def add(self, row: dict) -> None:
        self.rows[row["file"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def file_sha256(path: Path) -> str:
    """`indexes.io.file_fingerprint`: the sha256 of a file's content, hashed once
    per (inode, size, mtime) and process."""
    from actcache_indexes.io import file_fingerprint  # loads FAISS: kept out of `actcache --help`

    return file_fingerprint(path)
