"""The store: one HDF5 file per build, plus its FAISS indexes. `Store` is the one
type the rest of actcache passes around.

Layout of `<home>/builds/<key>/`:

    acts.h5                  the finished build (only ever replaced atomically)
    indexes/<array>.faiss    one FAISS index per pooled array, over the pool rows
    partial/<pass>/*.npz     flushed batches of a build in progress (resume data)
    lock                     flock-ed while a process builds this key

Inside acts.h5:

    attrs: format="actcache", format_version, key, provenance (JSON), config (JSON)
    /examples/{id,split,label,text,demo,dup,n_tokens,n_target,truncated,record}
    /acts/<mask>/<component>/L<layer>/<pooling>   (N, d) float16 (float32 on request
                                                  or where float16 would overflow)
    /stats/<mask>/<component>/L<layer>            (N, 6) float64, columns = STATS
"""

from __future__ import annotations

import fcntl
import json
import os
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from .capture import STATS
from .errors import ConfigError, CorruptStoreError, MismatchError, StoreError

FORMAT = "actcache"
FORMAT_VERSION = 2  # 2: no-BOS sink left out of spans; context rows never see themselves


def default_home(explicit: str | os.PathLike | None = None) -> Path:
    """The store root: `--store`, else $ACTCACHE_HOME, else ~/.cache/actcache."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("ACTCACHE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "actcache"


def array_name(mask: str, component: str, layer: int, pooling: str) -> str:
    return f"acts/{mask}/{component}/L{layer:02d}/{pooling}"


def stats_name(mask: str, component: str, layer: int) -> str:
    return f"stats/{mask}/{component}/L{layer:02d}"


def index_filename(mask: str, component: str, layer: int, pooling: str) -> str:
    return f"{mask}__{component}__L{layer:02d}__{pooling}.faiss"


@dataclass(frozen=True)
class ArrayId:
    """One pooled array: (component, layer, pooling, mask)."""

    component: str
    layer: int
    pooling: str
    mask: str

    def __str__(self) -> str:
        return f"{self.component}/L{self.layer}/{self.pooling}/{self.mask}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file that readers (and a resuming process) can trust: `write(f)`
    fills a temp file beside `path` (binary), which is fsynced, then renamed into
    place, and the directory entry fsynced. A crash leaves the old file or none,
    never a torn one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every filesystem can fsync a directory
    return path


def save_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """np.savez through `atomic_write`."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_npz(path: str | os.PathLike) -> dict | None:
    """Every array of an .npz file, or None when it is missing or damaged (a
    derived file: the caller recomputes it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed), released on exit
    or when the process dies, so a killed holder never leaves it stuck."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Exclusive flock on <build>/lock. A second builder of the same key waits,
    then finds the first one's result and reuses it."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(build_dir / "lock"):
        yield


def index_spec(kind: str | None):
    """An `indexes.IndexSpec` for --index: flat (exact cosine; also for None),
    ivf, hnsw, or a FAISS factory string."""
    from indexes import IndexSpec

    kind = kind or "flat"
    return IndexSpec(kind=kind) if kind in ("flat", "ivf", "hnsw") else IndexSpec(kind="factory", factory=kind)


def _open_h5(path: Path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{path} is not a readable HDF5 file ({e}); delete "
                                f"{path.parent} and run the build again") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CorruptStoreError(f"{path} is not an actcache build (no format attribute); "
                                f"point --store at an actcache store")
    if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
        v = f.attrs.get("format_version")
        f.close()
        raise CorruptStoreError(f"{path} has format version {v}, this actcache reads "
                                f"{FORMAT_VERSION}; rebuild it with this version")
    return f


class Store:
    """A finished build: its HDF5 file and FAISS indexes.

    Open with `Store.open(key)`; `actcache.build(config)` returns one too.
    Arrays are read on demand; nothing large stays in memory.
    """

    def __init__(self, build_dir: str | os.PathLike):
        self.dir = Path(build_dir)
        self.h5_path = self.dir / "acts.h5"
        if not self.h5_path.exists():
            partial = self.dir / "partial"
            if partial.exists() and any(partial.iterdir()):
                raise StoreError(f"build {self.dir.name} is incomplete (it was interrupted); "
                                 f"rerun the same `actcache build` command to resume it")
            raise StoreError(f"no finished build at {self.dir}; run `actcache build` first "
                             f"(`actcache ls` lists builds)")
        with _open_h5(self.h5_path) as f:
            self.key: str = str(f.attrs["key"])
            self.provenance: dict = json.loads(f.attrs["provenance"])
            self.config: dict = json.loads(f.attrs["config"])
            ex = f["examples"]
            self.ids = ex["id"].asstr()[:]
            self.splits = ex["split"].asstr()[:]
            self.labels = ex["label"][:]
            self.texts = ex["text"].asstr()[:]
            self.demos = ex["demo"].asstr()[:]
            self.dups = ex["dup"].asstr()[:]  # near-duplicate keys (data.Task.dup_key)
            self.n_tokens = ex["n_tokens"][:]
            self.n_target = ex["n_target"][:]
            self.records = [json.loads(r) for r in ex["record"].asstr()[:]]
            arrays = []
            f["acts"].visititems(lambda name, obj: arrays.append(name) if hasattr(obj, "shape") else None)
        self.arrays: list[ArrayId] = sorted(
            (ArrayId(c, int(L[1:]), p, m) for m, c, L, p in (a.split("/") for a in arrays)),
            key=lambda a: (a.mask, a.component, a.layer, a.pooling))
        self.pool_rows = np.flatnonzero(self.splits == "pool")
        self.eval_rows = np.flatnonzero(self.splits == "eval")

    # ------------------------------------------------------------------ lookup
    @classmethod
    def open(cls, key: str, home: str | os.PathLike | None = None) -> "Store":
        """Open a finished build by key, unique key prefix (at least 6 characters),
        or "last" (the most recently finished build)."""
        root = default_home(home) / "builds"
        if key == "last":
            done = [p for p in root.glob("*/acts.h5")] if root.exists() else []
            if not done:
                raise StoreError(f"no finished build in {root}; run `actcache build` first")
            return cls(max(done, key=lambda p: p.stat().st_mtime).parent)
        if (root / key).is_dir():
            return cls(root / key)
        matches = [p for p in root.glob(f"{key}*") if p.is_dir()] if len(key) >= 6 else []
        if len(matches) == 1:
            return cls(matches[0])
        if len(matches) > 1:
            raise StoreError(f"key prefix {key!r} matches {len(matches)} builds; give more characters")
        raise StoreError(f"no build {key!r} in {root}; `actcache ls` lists the builds there")

    def _rows(self, split: str | None) -> np.ndarray | slice:
        if split is None:
            return slice(None)
        if split not in ("pool", "eval"):
            raise ConfigError(f"split must be 'pool' or 'eval', not {split!r}")
        return self.pool_rows if split == "pool" else self.eval_rows

    def _check(self, a: ArrayId) -> None:
        if a in self.arrays:
            return
        have = lambda attr: sorted({getattr(x, attr) for x in self.arrays})  # noqa: E731
        for attr in ("component", "layer", "pooling", "mask"):
            if getattr(a, attr) not in have(attr):
                raise StoreError(f"build {self.key[:12]} has no {attr} {getattr(a, attr)!r} "
                                 f"(it has {have(attr)}); rebuild with it added, e.g. "
                                 f"`actcache build ... --{attr}s ...` computes only what is missing")
        raise StoreError(f"build {self.key[:12]} has no array {a}; rebuild with it added")

    def acts(self, component: str, layer: int, pooling: str = "mean", mask: str = "isolated",
             split: str | None = None) -> np.ndarray:
        """Pooled activations, (n, d) float32 for the rows of `split` (None = all)."""
        a = ArrayId(component, int(layer), pooling, mask)
        self._check(a)
        with _open_h5(self.h5_path) as f:
            arr = f[array_name(mask, component, int(layer), pooling)][:]
        return np.asarray(arr[self._rows(split)], dtype=np.float32)

    def array_dtype(self, a: ArrayId) -> np.dtype:
        """The dtype the array `a` is stored in (float16 by default, float32 where
        float16 would overflow or the build asked for it). Raises StoreError
        when the build lacks `a`."""
        self._check(a)
        with _open_h5(self.h5_path) as f:
            return f[array_name(a.mask, a.component, a.layer, a.pooling)].dtype

    def stats(self, component: str, layer: int, mask: str = "isolated",
              split: str | None = None) -> np.ndarray:
        """Per-example statistics, (n, 6) float64 with columns `STATS`."""
        name = stats_name(mask, component, int(layer))
        with _open_h5(self.h5_path) as f:
            if name not in f:
                self._check(ArrayId(component, int(layer), "mean", mask))
                raise StoreError(f"build {self.key[:12]} holds no statistics for {name}")
            arr = f[name][:]
        return arr[self._rows(split)]

    def stat(self, name: str, component: str, layer: int, mask: str = "isolated",
             split: str | None = None) -> np.ndarray:
        """One statistic column, (n,) float64; `name` is one of STATS."""
        if name not in STATS:
            raise ConfigError(f"unknown statistic {name!r}; choose from {STATS}")
        return self.stats(component, layer, mask, split)[:, STATS.index(name)]

    @property
    def home(self) -> Path:
        """The store root this build lives in (<home>/builds/<key>)."""
        return self.dir.parent.parent

    @property
    def layers(self) -> list[int]:
        return sorted({a.layer for a in self.arrays})

    def index_path(self, a: ArrayId) -> Path:
        return self.dir / "indexes" / index_filename(a.mask, a.component, a.layer, a.pooling)

    def index(self, component: str, layer: int, pooling: str = "mean", mask: str = "isolated",
              mmap: bool = True):
        """The FAISS index over the pool rows of one array (an `indexes.VectorIndex`).

        Indexes are derived artifacts: a build writes HDF5 only, and the index
        is built here on first use (flat unless the build asked for another
        kind), persisted atomically, and memory-mapped. One that is missing,
        damaged, or made for another build is rebuilt from the array.
        """
        a = ArrayId(component, int(layer), pooling, mask)
        self._check(a)
        try:
            return self._load_index(a, mmap)
        except StoreError:
            return self.build_index(a, mmap=mmap)

    def _load_index(self, a: ArrayId, mmap: bool = True, spec=None):
        from indexes import IndexFileError, IndexMismatchError, VectorIndex

        path = self.index_path(a)
        expect = {"d": self.dim(a), "ntotal": len(self.pool_rows), "key": self.key}
        if spec is not None:
            expect.update({k: v for k, v in spec.to_dict().items() if k in ("kind", "factory", "metric")})
        try:
            return VectorIndex.load(str(path), mmap=mmap, expect=expect)
        except IndexMismatchError as e:
            raise MismatchError(f"{path.name} does not match build {self.key[:12]}: {e}") from None
        except IndexFileError as e:
            raise StoreError(f"index {path.name} is missing or unreadable ({e})") from None

    def has_index(self, a: ArrayId, spec=None) -> bool:
        """True when a valid index of `a` (of `spec`'s kind, if given) is on disk."""
        try:
            self._load_index(a, mmap=True, spec=spec)
            return True
        except StoreError:
            return False

    def build_index(self, a: ArrayId, spec=None, mmap: bool = True):
        """Build, persist (atomically, under a lock) and return the index of `a`.

        `spec` defaults to the kind the build asked for (`--index`, else flat).
        A store that cannot be written (read-only) gets the index in memory.
        """
        from indexes import VectorIndex

        spec = spec or index_spec(self.config.get("index"))
        idir = self.dir / "indexes"
        with ExitStack() as stack:
            try:
                idir.mkdir(exist_ok=True)
                stack.enter_context(file_lock(idir / ".lock"))
                writable = True
            except OSError:
                writable = False
            if writable:
                try:
                    return self._load_index(a, mmap, spec)  # another process built it while we waited
                except StoreError:
                    pass
            vecs = self.acts(a.component, a.layer, a.pooling, a.mask, split="pool")
            idx = VectorIndex.build(vecs, spec, meta={"key": self.key, "array": str(a),
                                                      "file": self.index_path(a).name})
            if not writable:
                return idx
            try:
                idx.save(str(self.index_path(a)))
            except OSError:
                return idx  # unwritable store: serve from memory
            return self._load_index(a, mmap)

    def dim(self, a: ArrayId) -> int:
        with _open_h5(self.h5_path) as f:
            return int(f[array_name(a.mask, a.component, a.layer, a.pooling)].shape[1])

    def task(self):
        """The build's `data.Task`, rebuilt from what the build stored (never from
        the original data file, which may have moved)."""
        from .data import TASKS, Task

        t = self.provenance["data"]["task"]
        d = self.config.get("data", {})
        base = None if d.get("path") else TASKS.get(str(d.get("task")))
        return Task(self.task_name, t["kind"], t["template"], tuple(t["label_words"]), t.get("instruction", ""),
                    t.get("stop", base.stop if base else "\n\n"),
                    dup_field=t.get("dup_field", base.dup_field if base else None))

    @property
    def task_name(self) -> str:
        d = self.config.get("data", {})
        return Path(d["path"]).stem if d.get("path") else str(d.get("task"))

    def info(self) -> dict:
        """A JSON-able summary: key, task, model, sizes, arrays and provenance."""
        return {
            "key": self.key,
            "path": str(self.dir),
            "task": self.task_name,
            "model": self.provenance.get("model", {}).get("model"),
            "dtype": self.provenance.get("model", {}).get("dtype"),
            "hardware": (self.provenance.get("model", {}).get("hardware") or {}).get("class"),
            "n_pool": int(len(self.pool_rows)),
            "n_eval": int(len(self.eval_rows)),
            "components": sorted({a.component for a in self.arrays}),
            "layers": self.layers,
            "poolings": sorted({a.pooling for a in self.arrays}),
            "masks": sorted({a.mask for a in self.arrays}),
            "n_arrays": len(self.arrays),
            "n_indexes": len(list((self.dir / "indexes").glob("*.faiss"))),
            "size_mb": round(sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file()) / 2**20, 2),
            "provenance": self.provenance,
            "config": self.config,
        }


def list_builds(home: str | os.PathLike | None = None) -> list[dict]:
    """Every build under the store root: finished ones with a summary, others marked."""
    root = default_home(home) / "builds"
    out = []
    for d in sorted(root.glob("*")) if root.exists() else []:
        if not d.is_dir():
            continue
        try:
            info = Store(d).info()
            info["status"] = "done"
        except CorruptStoreError as e:
            info = {"key": d.name, "status": "corrupt", "error": str(e)}
        except StoreError:
            if not any((d / "partial").rglob("*.npz")):
                continue  # a build that failed before flushing anything left only its lock
            info = {"key": d.name, "status": "incomplete"}
        out.append(info)
    return out


def check_matches(store: Store, meta: dict, what: str) -> None:
    """Raise MismatchError unless `meta` (an artifact's provenance) names this build."""
    if meta.get("key") != store.key:
        raise MismatchError(f"{what} was made from build {str(meta.get('key'))[:12]}, not "
                            f"{store.key[:12]}; recompute it for this build")
