"""The store: one HDF5 file per build, plus what is derived from it. `Store` is
the one type the rest of actcache passes around, and this module is the only
one that reads or writes the build format.

Layout of `<home>/builds/<key>/`:

    acts.h5                  the finished build (only ever replaced atomically)
    indexes/<key>.faiss      one FAISS index per pooled array, over the pool rows,
                             built on first use (derived; rebuilt when damaged)
    queries/<key>.npz        activations of new query texts (derived)
    quality/<key>.npz        quality matrices of `evaluate` (derived; streamed
                             through quality/<key>.partial/<chunk key>.npz)
    embed/<key>.npz          sentence embeddings for embed-knn (derived)
    partial/<pass>/*.npz     flushed batches of a build in progress (resume data)
    lock                     held while a process builds this key

Inside acts.h5 (every numeric dataset chunked with a fletcher32 checksum, so a
damaged chunk fails to read instead of returning other numbers):

    attrs: format="actcache", format_version, key, provenance (JSON), config (JSON),
           key_payload (JSON), examples_sha256 (digest of /examples)
    /examples/{id,split,label,text,demo,dup,n_tokens,n_target,truncated,record}
    /acts/<mask>/<component>/L<layer>/<pooling>   (N, d) float16 (float32 on request
                                                  or where float16 would overflow);
                                                  attrs: fingerprint of the pool rows
    /stats/<mask>/<component>/L<layer>            (N, 6) float64, columns = STATS

Every derived artifact is named by `derive_key(build key, kind, **params)`
(`Store.derived_path`), and every kind is registered once in `DERIVED` (its
folder and suffix), which is what `verify` checks and `info` counts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from actcache_indexes import (
    IVFDATA_SUFFIX, IndexFileError, IndexMismatchError, IndexSpec, VectorIndex, build_ondisk, check_factory,
    ondisk_supported, tmp_owner, vectors_fingerprint,
)
from actcache_indexes.io import NO_SPACE

from .capture import STATS
from .config import DEFAULT_MASK
from .data import Example, Task
from .display import dataframe, html_table
from .errors import ConfigError, CorruptStoreError, MismatchError, StoreError
from .files import (  # noqa: F401  (re-exported: the store's callers read them here)
    FORMAT_VERSION, atomic_write, build_lock, canonical_key, check_home, default_home, derive_key, file_lock,
    MANIFEST, Manifest, load_npz, lock_timeout, os_errno, read_only, save_npz, try_save_npz,
)
from .models import ModelSpec, load_model

FORMAT = "actcache"
EXAMPLE_COLUMNS = ("id", "split", "label", "text", "demo", "dup", "n_tokens", "n_target", "truncated", "record")
_TEXT_COLUMNS = ("id", "split", "text", "demo", "dup", "record")
# Derived artifacts: kind (its folder under the build) -> file suffix. A new
# store-backed artifact registers here (`register_derived`) and is then named,
# verified and counted like the others. Indexes are checked against their
# array by `verify` besides.
DERIVED: dict[str, str] = {"indexes": ".faiss", "queries": ".npz", "quality": ".npz", "embed": ".npz"}
# An IVF index over a pool array larger than this (bytes as float32) is built
# shard by shard from the HDF5 file into an on-disk index (indexes.build_ondisk)
# instead of reading the whole array; ACTCACHE_INDEX_SHARD_BYTES overrides it.
INDEX_SHARD_BYTES = 2 << 30
# Most pool rows per shard of such a build (fewer when a shard would pass the threshold).
INDEX_SHARD_ROWS = 50_000


def register_derived(kind: str, suffix: str = ".npz") -> None:
    """Register a kind of derived artifact (a folder name under each build)."""
    if not kind.replace("-", "_").isidentifier():
        raise ConfigError(f"derived kind {kind!r} must be a plain folder name")
    if DERIVED.get(kind, suffix) != suffix:
        raise ConfigError(f"derived kind {kind!r} is registered with suffix {DERIVED[kind]!r}")
    DERIVED[kind] = suffix
SAE_STATS = ("l0", "fvu", "explained")
SAE_KEY_LEN = 16  # characters of an SAE's key that name it in a build and in the store's sae/ folder
SAE_KEY_SHOWN = 8  # characters of an SAE's key in study signal names, reports and messages


def short_sae_key(key: str) -> str:
    """The SAE's stored id: the first SAE_KEY_LEN characters of its key (or of a prefix)."""
    return key[:SAE_KEY_LEN]


def shown_sae_key(key: str) -> str:
    """The SAE's key as signal names, reports and messages show it (SAE_KEY_SHOWN characters)."""
    return key[:SAE_KEY_SHOWN]



@dataclass(frozen=True)
class ArrayId:
    """One pooled array: (component, layer, pooling, mask). Its one spelling per
    use: `name()` in HDF5 and shards, `str()` for people, JSON records and the
    parameters of derived artifacts; `parse()` reads back either."""

    component: str
    layer: int
    pooling: str
    mask: str

    def __str__(self) -> str:
        return f"{self.component}/L{self.layer}/{self.pooling}/{self.mask}"

    def name(self) -> str:
        """The HDF5 dataset path: acts/<mask>/<component>/L<layer>/<pooling>."""
        return f"acts/{self.mask}/{self.component}/L{self.layer:02d}/{self.pooling}"

    def stats_name(self) -> str:
        """The HDF5 path of the statistics of this array's (mask, component, layer)."""
        return f"stats/{self.mask}/{self.component}/L{self.layer:02d}"

    @classmethod
    def parse(cls, text: str) -> "ArrayId":
        """Inverse of `str()` and `name()`; a stats name gives pooling "mean"."""
        t = text
        if t.startswith("acts/"):
            _, m, c, L, p = t.split("/")
        elif t.startswith("stats/"):
            _, m, c, L = t.split("/")
            p = "mean"
        else:
            c, L, p, m = t.split("/")
        if not L.startswith("L") or not L[1:].lstrip("-").isdigit():
            raise ConfigError(f"{text!r} is not an array id (component/L<layer>/pooling/mask)")
        return cls(c, int(L[1:]), p, m)


def index_spec(kind: str | None):
    """An `indexes.IndexSpec` for --index: flat (exact cosine; also for None),
    ivf, hnsw, or a FAISS factory string (checked now, so a bad one fails
    before any work)."""
    kind = kind or "flat"
    spec = IndexSpec(kind=kind) if kind in ("flat", "ivf", "hnsw") else IndexSpec(kind="factory", factory=kind)
    try:
        check_factory(spec)
    except ValueError as e:
        raise ConfigError(f"--index {kind!r}: {e}; use flat, ivf, hnsw or a valid FAISS factory string "
                          f"such as IVF64,Flat") from None
    return spec


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _damaged(path: Path, what: str, e: BaseException) -> CorruptStoreError:
    key = path.parent.name
    return CorruptStoreError(f"build {key[:12]}: {what} is damaged ({_first_line(e)}); run "
                             f"`actcache verify {key[:12]}` to see what else is, then delete {path.parent} "
                             f"and run the build again")


_H5_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def _open_h5(path: Path):
    import h5py

    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"{path} is not a readable HDF5 file ({_first_line(e)}); delete "
                                f"{path.parent} and run the build again") from None
    try:
        fmt, version = f.attrs.get("format"), f.attrs.get("format_version", -1)
    except _H5_ERRORS as e:
        f.close()
        raise _damaged(path, "the file header", e) from None
    if fmt != FORMAT:
        f.close()
        raise CorruptStoreError(f"{path} is not an actcache build (no format attribute); "
                                f"point --store at an actcache store")
    if int(version) != FORMAT_VERSION:
        f.close()
        raise CorruptStoreError(f"{path} has format version {version}, this actcache reads "
                                f"{FORMAT_VERSION}; rebuild it with this version (same `actcache build` command)")
    return f


def _h5_dataset(f, name: str, data, **kw):
    """Every numeric dataset chunked with a fletcher32 checksum."""
    arr = np.asarray(data)
    return f.create_dataset(name, data=arr, chunks=kw.pop("chunks", True), fletcher32=True, **kw)


def examples_digest(columns: dict) -> str:
    """sha256 of the /examples columns as canonical JSON (the vlen strings are not
    covered by fletcher32, so this digest is what detects damage to them)."""
    h = hashlib.sha256()
    for name in EXAMPLE_COLUMNS:
        vals = columns[name]
        vals = [str(v) for v in vals] if name in _TEXT_COLUMNS else [int(v) for v in vals]
        h.update(json.dumps([name, vals], ensure_ascii=False, separators=(",", ":")).encode())
    return h.hexdigest()


def _pool_fingerprint(arr: np.ndarray, pool: np.ndarray) -> str:
    """`indexes.vectors_fingerprint` of the pool rows as stored (the index's source)."""
    return vectors_fingerprint(np.asarray(arr[pool], dtype=np.float32))


def write_build(build_dir: Path, key: str, *, arrays: dict, stats: dict, examples: dict | None,
                provenance: dict, config: dict, key_payload: dict, store_dtype: str = "float16",
                versions: dict | None = None, saes: dict | None = None,
                sae_training: dict | None = None) -> None:
    """Write (or extend) a build's acts.h5 atomically: old + new arrays are
    assembled in memory, written to a temp file beside it, fsynced, then renamed
    into place (`atomic_write`). No space or a file-size limit: StoreError.

    Args:
        arrays: {ArrayId: (N, d) float32} new pooled arrays.
        stats: {ArrayId: (N, 6) float64} statistics of each array's (mask, component, layer).
        examples: {column: (N,) values} for a new file (EXAMPLE_COLUMNS); None when
            extending a file that has them.
        provenance: merged over the old provenance; its "masks" and "poolings" are
            unioned with the old ones, "created" is kept, an "in_context" of None
            keeps the old one.
        config: merged over the old config.
        saes: {(sae key16, mask): sae.sae_pass output}: pooled SAE features kept
            as CSR under sae/<key16>/<mask>/<pooling>/, statistics under .../stats.
        sae_training: {sae key16: (m,) uint64 sorted digests of the SAE's training
            texts (sae.training_overlap)}, under sae_training/<key16>.
        store_dtype: "float16" (float32 where float16 would overflow) or "float32".
    """
    import io

    import h5py

    final = build_dir / "acts.h5"
    nbytes = sum(a.nbytes for a in arrays.values()) // (2 if store_dtype == "float16" else 1)
    # HDF5 is assembled in memory and written by plain file I/O: h5py crashes the
    # process (SIGSEGV in its dealloc) when HDF5's own write to a file fails on a
    # full disk or a file-size limit. The image costs the file's size in memory.
    image = io.BytesIO()
    try:
        with h5py.File(image, "w") as f:
            old_prov, old_cfg, digest, splits = _start_image(f, final, examples)
            _write_arrays(f, key, arrays, stats, np.flatnonzero(splits == "pool"), store_dtype)
            _write_saes(f, saes or {}, sae_training or {})
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["key"] = key
            f.attrs["examples_sha256"] = digest
            f.attrs["provenance"] = json.dumps(_merged_provenance(old_prov, provenance), default=str)
            f.attrs["config"] = json.dumps({**old_cfg, **config}, default=str)
            f.attrs["key_payload"] = json.dumps(key_payload, sort_keys=True, default=str)
        buf = image.getbuffer()
        nbytes = buf.nbytes
        atomic_write(final, lambda fh: fh.write(buf), nbytes=nbytes)  # fsynced, renamed, dir fsynced
    except Exception as e:
        if os_errno(e) in NO_SPACE:
            raise StoreError(f"cannot write {final}: no space left (or a file-size limit) while writing "
                             f"about {nbytes / 2**20:.1f} MiB (new arrays plus the existing ones); free "
                             f"space or point --store at a disk with room") from None
        if read_only(e):
            raise StoreError(f"cannot write {final}: the store is read-only; point --store at a "
                             f"writable directory") from None
        raise


def _start_image(f, final: Path, examples: dict | None) -> tuple[dict, dict, str, np.ndarray]:
    """Fill a new HDF5 image `f` with what `final` already holds (examples,
    arrays, statistics, SAE groups), or with the new `examples` table.
    Returns (old provenance, old config, examples digest, splits)."""
    import h5py

    if final.exists():
        with _open_h5(final) as old:
            for name in ("examples", "acts", "stats", "sae", "sae_training"):
                if name in old:
                    old.copy(old[name], f, name=name)
            return (json.loads(old.attrs["provenance"]), json.loads(old.attrs["config"]),
                    str(old.attrs["examples_sha256"]), old["examples/split"].asstr()[:])
    ex = f.create_group("examples")
    for name in EXAMPLE_COLUMNS:
        if name in _TEXT_COLUMNS:
            ex.create_dataset(name, data=[str(v) for v in examples[name]], dtype=h5py.string_dtype("utf-8"))
        else:
            _h5_dataset(ex, name, np.asarray(examples[name], dtype=np.int64))
    return {}, {}, examples_digest(examples), np.asarray(examples["split"])


def _write_arrays(f, key: str, arrays: dict, stats: dict, pool: np.ndarray, store_dtype: str) -> None:
    """New pooled arrays (float16 unless that overflows, or float32), each with
    its derive_key and the fingerprint of its pool rows, and their statistics."""
    for a, arr in arrays.items():
        dt = np.float16 if store_dtype == "float16" else np.float32
        if dt == np.float16 and np.abs(arr).max() > np.finfo(np.float16).max:
            dt = np.float32  # massive activations would overflow float16 to inf
        stored = arr.astype(dt)
        ds = _h5_dataset(f, a.name(), stored, chunks=(min(len(arr), 4096), arr.shape[1]))
        ds.attrs["key"] = derive_key(key, "array", array=str(a))
        ds.attrs["fingerprint"] = _pool_fingerprint(stored, pool)
    for a, st in stats.items():
        if a.stats_name() not in f:
            _h5_dataset(f, a.stats_name(), st.astype(np.float64)).attrs["columns"] = json.dumps(STATS)


def _write_saes(f, saes: dict, sae_training: dict) -> None:
    """Pooled SAE features (CSR parts) and statistics per (key16, mask), and the
    training-text digests per SAE."""
    for (k16, mask), v in saes.items():
        g = f"sae/{k16}/{mask}"
        for pooling in ("mean", "max"):
            for part, arr in v[pooling].items():
                _h5_dataset(f, f"{g}/{pooling}/{part}", arr)
        _h5_dataset(f, f"{g}/stats", v["stats"]).attrs["columns"] = json.dumps(SAE_STATS)
    for k16, digests in sae_training.items():
        name = f"sae_training/{k16}"
        if name in f:
            del f[name]
        arr = np.asarray(digests, dtype=np.uint64)
        if arr.size:
            _h5_dataset(f, name, arr)
        else:  # HDF5 cannot chunk an empty dataset
            f.create_dataset(name, data=arr)


def _merged_provenance(old_prov: dict, provenance: dict) -> dict:
    """The new provenance over the old: SAEs, masks and poolings accumulate, an
    in_context of None keeps the old one, "created" is the first build's."""
    prov = {**old_prov, **provenance}
    if old_prov.get("saes") or provenance.get("saes"):  # an added SAE keeps the others
        prov["saes"] = {**old_prov.get("saes", {}), **provenance.get("saes", {})}
    for k in ("masks", "poolings"):
        prov[k] = sorted(set(old_prov.get(k, [])) | set(provenance.get(k, [])))
    if provenance.get("in_context") is None and "in_context" in old_prov:
        prov["in_context"] = old_prov["in_context"]
    prov["created"] = old_prov.get("created", provenance.get("updated"))
    prov["format_version"] = FORMAT_VERSION
    return prov


def dead_writers_tmp(p: Path) -> bool:
    """Whether `p` is a temp file (named by `indexes.io.tmp_name`) whose writer is
    no longer alive; a live writer's, this process's or another name's: False."""
    pid = tmp_owner(p.name)
    return pid is not None and pid != os.getpid() and not _alive(pid)


def stale_leftovers(build_dir: Path) -> list[Path]:
    """Leftovers nothing will use: temp files of writers that are no longer alive
    (`.<name>.<pid>.<hex>.tmp` anywhere under the build) and `partial/<pass>`
    folders whose arrays the finished acts.h5 already holds."""
    out = [p for p in build_dir.rglob(".*.tmp") if dead_writers_tmp(p)]
    partial = build_dir / "partial"
    if not partial.is_dir() or not (build_dir / "acts.h5").exists():
        return out
    try:
        with _open_h5(build_dir / "acts.h5") as f:
            held = set()
            f.visititems(lambda n, obj: held.add(n) if hasattr(obj, "shape") else None)
    except (CorruptStoreError, *_H5_ERRORS):
        return out  # a damaged file: its resume data may be all that is left
    for pdir in sorted(partial.iterdir()):
        shards = sorted(pdir.glob("b*.npz")) if pdir.is_dir() else []
        # a pass's shards all name the same arrays; torn ones (a crash) hold nothing to resume
        first = next((z for z in map(load_npz, shards) if z is not None), None)
        if first is None or set(first) - {"rows"} <= held:
            out.append(pdir)
    return out


def clean_leftovers(build_dir: Path) -> list[Path]:
    """Delete `stale_leftovers` (best effort: a read-only store keeps them).
    Returns what was deleted."""
    import shutil

    gone = []
    for p in stale_leftovers(build_dir):
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            gone.append(p)
        except OSError:
            pass
    partial = build_dir / "partial"
    try:
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
    except OSError:
        pass
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A finished build: its HDF5 file and what is derived from it.

    Open with `Store.open(key)`; `actcache.build(config)` returns one too.
    Arrays are read on demand; nothing large stays in memory. Any read error
    (a damaged file fails its checksums) raises CorruptStoreError naming what.
    """

    def __init__(self, build_dir: str | os.PathLike):
        self.dir = Path(build_dir)
        self.h5_path = self.dir / "acts.h5"
        self._dtypes: dict = {}
        if not self.h5_path.exists():
            partial = self.dir / "partial"
            if partial.exists() and any(partial.iterdir()):
                raise StoreError(f"build {self.dir.name} is incomplete (it was interrupted); "
                                 f"rerun the same `actcache build` command to resume it")
            raise StoreError(f"no finished build at {self.dir}; run `actcache build` first "
                             f"(`actcache ls` lists builds)")
        with _open_h5(self.h5_path) as f:
            try:
                self.key: str = str(f.attrs["key"])
                self.provenance: dict = json.loads(f.attrs["provenance"])
                self.config: dict = json.loads(f.attrs["config"])
                digest = str(f.attrs["examples_sha256"])
                ex = f["examples"]
                cols = {name: (ex[name].asstr()[:] if name in _TEXT_COLUMNS else ex[name][:])
                        for name in EXAMPLE_COLUMNS}
                arrays = []
                f["acts"].visititems(lambda name, obj: arrays.append(name) if hasattr(obj, "shape") else None)
                self.sae_groups = sorted((k16, m) for k16 in f.get("sae", {}) for m in f["sae"][k16])
            except _H5_ERRORS as e:
                raise _damaged(self.h5_path, "the examples table or its attributes", e) from None
        if self.key != self.dir.name:
            raise CorruptStoreError(f"{self.h5_path} holds build {self.key[:12]}, not {self.dir.name[:12]} "
                                    f"(copied from another build?); delete {self.dir} and run the build again")
        if examples_digest(cols) != digest:
            raise _damaged(self.h5_path, "the examples table", ValueError("its digest does not match"))
        self.ids, self.splits, self.texts = cols["id"], cols["split"], cols["text"]
        self.labels, self.demos = cols["label"], cols["demo"]
        self.dups = cols["dup"]  # near-duplicate keys (data.Task.dup_key)
        self.n_tokens, self.n_target = cols["n_tokens"], cols["n_target"]
        self.records = [json.loads(r) for r in cols["record"]]
        self.arrays: list[ArrayId] = sorted((ArrayId.parse("acts/" + a) for a in arrays),
                                            key=lambda a: (a.mask, a.component, a.layer, a.pooling))
        self.pool_rows = np.flatnonzero(self.splits == "pool")
        self.eval_rows = np.flatnonzero(self.splits == "eval")

    # ------------------------------------------------------------------ display
    def _about(self) -> dict:
        m = self.provenance.get("model", {})
        return {"key": self.key[:12], "task": self.task_name, "model": m.get("model"), "dtype": m.get("dtype"),
                "n_pool": int(len(self.pool_rows)), "n_eval": int(len(self.eval_rows)),
                "components": sorted({a.component for a in self.arrays}), "layers": self.layers,
                "masks": sorted({a.mask for a in self.arrays}), "arrays": len(self.arrays)}

    def __repr__(self) -> str:
        d = self._about()
        return (f"Store(key={d['key']!r}, task={d['task']!r}, model={d['model']!r}, dtype={d['dtype']!r}, "
                f"pool={d['n_pool']}, eval={d['n_eval']}, arrays={d['arrays']} "
                f"(components {','.join(d['components'])}; layers {_span(d['layers'])}; masks {','.join(d['masks'])}))")

    def _repr_html_(self) -> str:
        d = self._about()
        return html_table(["key", "task", "model", "dtype", "pool", "eval", "components", "layers", "masks",
                           "arrays"],
                          [[d["key"], d["task"], d["model"], d["dtype"], d["n_pool"], d["n_eval"],
                            ", ".join(d["components"]), _span(d["layers"]), ", ".join(d["masks"]), d["arrays"]]],
                          caption=f"Store {self.dir}")

    def to_pandas(self):
        """One row per stored array: component, layer, pooling, mask, and the name `acts()` reads."""
        return dataframe([{"component": a.component, "layer": a.layer, "pooling": a.pooling, "mask": a.mask,
                           "name": str(a)} for a in self.arrays], "Store",
                         columns=["component", "layer", "pooling", "mask", "name"])

    # ------------------------------------------------------------------ lookup
    @classmethod
    def open(cls, key: str, home: str | os.PathLike | None = None) -> "Store":
        """Open a finished build by key, unique key prefix (at least 6 characters),
        or "last" (the most recently finished build)."""
        return cls(find_build(key, home))

    def with_pool(self, rows) -> "Store":
        """A read-only view of this build whose pool is `rows` (store rows, a subset
        of `pool_rows`): every `split="pool"` read and every subset strategy then see
        only those rows. Used to run a strategy within one label, or away from the
        near-duplicates of the eval inputs. Indexes stay those of the full pool."""
        rows = np.asarray(rows, dtype=np.int64)
        if not np.isin(rows, self.pool_rows).all():
            raise ConfigError("with_pool takes pool rows of this build only")
        view = copy.copy(self)
        view.pool_rows = np.sort(rows)
        return view

    def rows(self, split: str | None) -> np.ndarray | slice:
        """Row positions of `split` ("pool", "eval"; None = every row)."""
        if split is None:
            return slice(None)
        if split not in ("pool", "eval"):
            raise ConfigError(f"split must be 'pool' or 'eval', not {split!r}")
        return self.pool_rows if split == "pool" else self.eval_rows

    def check(self, a: ArrayId) -> None:
        """Raise StoreError naming the flag to add when the build lacks array `a`."""
        if a in self.arrays:
            return
        have = lambda attr: sorted({getattr(x, attr) for x in self.arrays})  # noqa: E731
        flags = {"component": "--components", "layer": "--layers", "pooling": "--pooling", "mask": "--masks"}
        for attr in ("component", "layer", "pooling", "mask"):
            if getattr(a, attr) not in have(attr):
                raise StoreError(f"build {self.key[:12]} has no {attr} {getattr(a, attr)!r} "
                                 f"(it has {have(attr)}); rebuild with it added, e.g. "
                                 f"`actcache build ... {flags[attr]} ...` computes only what is missing")
        raise StoreError(f"build {self.key[:12]} has no array {a}; rebuild with it added")

    @contextmanager
    def _reading(self, what: str) -> Iterator:
        """The open HDF5 file; any read error becomes CorruptStoreError naming `what`."""
        with _open_h5(self.h5_path) as f:
            try:
                yield f
            except _H5_ERRORS as e:
                raise _damaged(self.h5_path, what, e) from None

    def acts(self, component: str, layer: int, pooling: str = "mean", mask: str = "isolated",
             split: str | None = None) -> np.ndarray:
        """Pooled activations, (n, d) float32 for the rows of `split` (None = all)."""
        a = ArrayId(component, int(layer), pooling, mask)
        self.check(a)
        with self._reading(f"array {a}") as f:
            arr = f[a.name()][:]
        return np.asarray(arr[self.rows(split)], dtype=np.float32)

    def stats(self, component: str, layer: int, mask: str = "isolated",
              split: str | None = None) -> np.ndarray:
        """Per-example statistics, (n, 6) float64 with columns `STATS`."""
        a = ArrayId(component, int(layer), "mean", mask)
        with self._reading(f"statistics {a.stats_name()}") as f:
            if a.stats_name() not in f:
                self.check(a)
                raise StoreError(f"build {self.key[:12]} holds no statistics for {a.stats_name()}")
            arr = f[a.stats_name()][:]
        return arr[self.rows(split)]

    def stat(self, name: str, component: str, layer: int, mask: str = "isolated",
             split: str | None = None) -> np.ndarray:
        """One statistic column, (n,) float64; `name` is one of STATS."""
        if name not in STATS:
            raise ConfigError(f"unknown statistic {name!r}; choose from {STATS}")
        return self.stats(component, layer, mask, split)[:, STATS.index(name)]

    def sae_group(self, sae: str | None = None, mask: str | None = None) -> tuple[str, str]:
        """(SAE key16, mask) of the build's SAE features: `sae` a key or prefix (None:
        the build's only SAE), `mask` None for DEFAULT_MASK where captured, else the
        first. Raises ConfigError naming what the build holds."""
        keys = sorted({k for k, _ in self.sae_groups if sae is None or k.startswith(short_sae_key(sae))})
        if not keys:
            raise ConfigError(f"build {self.key[:12]} holds no SAE features{'' if sae is None else f' for {sae!r}'}; "
                              f"add them with `actcache build ... --sae DIR`")
        if len(keys) > 1:
            raise ConfigError(f"build {self.key[:12]} holds {len(keys)} SAEs ({[shown_sae_key(k) for k in keys]}); "
                              f"pick one with sae=<key prefix>")
        masks = [m for k, m in self.sae_groups if k == keys[0]]
        if mask is None:
            mask = DEFAULT_MASK if DEFAULT_MASK in masks else masks[0]
        if mask not in masks:
            raise ConfigError(f"SAE {shown_sae_key(keys[0])} was captured under masks {masks}, not {mask!r}")
        return keys[0], mask

    def sae_codes(self, sae: str, pooling: str = "mean", mask: str = "isolated",
                  split: str | None = None) -> np.ndarray:
        """Pooled SAE features, (n, d_sae) float32 (stored sparse). `sae`: its key or a prefix."""
        from scipy.sparse import csr_matrix

        g = "sae/{}/{}/{}".format(*self.sae_group(sae, mask), pooling)
        with self._reading(f"SAE features {g}") as f:
            parts = {p: f[f"{g}/{p}"][:] for p in ("data", "indices", "indptr", "shape")}
        m = csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=tuple(parts["shape"]))
        return m[self.rows(split)].toarray().astype(np.float32)

    def sae_stats(self, sae: str, mask: str = "isolated", split: str | None = None) -> np.ndarray:
        """Per-example SAE statistics, (n, 3) float64 with columns SAE_STATS (l0, fvu, explained)."""
        g = "sae/{}/{}".format(*self.sae_group(sae, mask))
        with self._reading(f"SAE statistics {g}") as f:
            arr = f[f"{g}/stats"][:]
        return arr[self.rows(split)]

    def sae_training_digests(self, sae: str) -> np.ndarray | None:
        """The sorted (m,) uint64 digests of an SAE's training texts as its cfg.json
        recorded them (`sae.training_overlap`); None when it recorded none."""
        k16, _ = self.sae_group(sae)
        with self._reading(f"SAE training digests of {k16}") as f:
            name = f"sae_training/{k16}"
            return f[name][:] if name in f else None

    def array_dtype(self, a: ArrayId) -> np.dtype:
        """The dtype an array is stored in (float16 or float32)."""
        self.check(a)
        if a not in self._dtypes:  # asked per query by the service; the file's arrays do not change
            with self._reading(f"array {a}") as f:
                self._dtypes[a] = f[a.name()].dtype
        return self._dtypes[a]

    def dim(self, a: ArrayId) -> int:
        with self._reading(f"array {a}") as f:
            return int(f[a.name()].shape[1])

    def fingerprint(self, a: ArrayId) -> str | None:
        """The recorded `indexes.vectors_fingerprint` of the array's pool rows."""
        with self._reading(f"array {a}") as f:
            fp = f[a.name()].attrs.get("fingerprint")
        return None if fp is None else str(fp)

    @property
    def home(self) -> Path:
        """The store root this build lives in (<home>/builds/<key>)."""
        return self.dir.parent.parent

    @property
    def layers(self) -> list[int]:
        return sorted({a.layer for a in self.arrays})

    def derived_path(self, kind: str, **params) -> Path:
        """Where a derived artifact of this build lives: <build>/<kind>/<derive_key>
        plus the kind's suffix (`DERIVED`); `params` are everything that decides its bytes."""
        if kind not in DERIVED:
            raise ConfigError(f"unknown derived kind {kind!r}; register it with store.register_derived")
        return self.dir / kind / f"{derive_key(self.key, kind, **params)[:32]}{DERIVED[kind]}"

    # ------------------------------------------------------------------ indexes
    def index_path(self, a: ArrayId) -> Path:
        """The index of array `a` (its kind and parameters are in its sidecar, checked on load)."""
        return self.derived_path("indexes", array=str(a))

    def index(self, component: str, layer: int, pooling: str = "mean", mask: str = "isolated",
              mmap: bool = True):
        """The FAISS index over the pool rows of one array (an `indexes.VectorIndex`).

        Indexes are derived artifacts: a build writes HDF5 only, and the index
        is built here on first use (flat unless the build asked for another
        kind), persisted atomically, and memory-mapped. One that is missing,
        damaged, or made from other vectors (checked by content hash and by
        the fingerprint of the array it was built from) is rebuilt.
        """
        a = ArrayId(component, int(layer), pooling, mask)
        self.check(a)
        try:
            return self._load_index(a, mmap)
        except StoreError:
            return self.build_index(a, mmap=mmap)

    def _load_index(self, a: ArrayId, mmap: bool = True, spec=None):
        path = self.index_path(a)
        expect = {"d": self.dim(a), "ntotal": len(self.pool_rows), "key": self.key, "array": str(a),
                  "source_fingerprint": self.fingerprint(a)}
        if spec is not None:
            expect.update({k: v for k, v in spec.to_dict().items() if k in ("kind", "factory", "metric")})
        try:
            return VectorIndex.load(str(path), mmap=mmap, expect=expect)
        except IndexMismatchError as e:
            raise MismatchError(f"{path.name} does not match build {self.key[:12]}: {e}") from None
        except (IndexFileError, OSError, RuntimeError, ValueError) as e:
            raise StoreError(f"index {path.name} is missing or unreadable ({_first_line(e)})") from None

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
        spec = spec or index_spec(self.config.get("index"))
        idir = self.dir / "indexes"
        with ExitStack() as stack:
            try:
                idir.mkdir(exist_ok=True)
                stack.enter_context(file_lock(idir / ".lock"))
                writable = os.access(idir, os.W_OK)
            except (OSError, StoreError):
                writable = False
            if writable:
                try:
                    return self._load_index(a, mmap, spec)  # another process built it while we waited
                except StoreError:
                    pass
            meta = {"key": self.key, "array": str(a), "file": self.index_path(a).name}
            if writable and ondisk_supported(spec) and self._pool_bytes(a) > index_shard_bytes():
                return self._build_index_ondisk(a, spec, meta)
            vecs = self.acts(a.component, a.layer, a.pooling, a.mask, split="pool")
            idx = VectorIndex.build(vecs, spec, meta=meta)
            if not writable:
                return idx
            try:
                idx.save(str(self.index_path(a)))
            except OSError as e:
                if read_only(e):
                    return idx  # unwritable store: serve from memory
                raise StoreError(f"cannot save index of {a} ({idx.ntotal} vectors of "
                                 f"{idx.d}): {_first_line(e)}; free space or point --store at a disk "
                                 f"with room") from None
            return self._load_index(a, mmap)

    def _pool_bytes(self, a: ArrayId) -> int:
        return len(self.pool_rows) * self.dim(a) * 4

    def _pool_shards(self, a: ArrayId) -> tuple[list, list[int]]:
        """Loaders (and row counts) of the pool rows of `a` in consecutive chunks, each read from the
        HDF5 file only when called (one contiguous slice, then the pool rows in it)."""
        row_bytes = self.dim(a) * 4
        step = max(1, min(INDEX_SHARD_ROWS, index_shard_bytes() // row_bytes))
        chunks = [self.pool_rows[i: i + step] for i in range(0, len(self.pool_rows), step)]

        def load(rows: np.ndarray) -> np.ndarray:
            with self._reading(f"array {a}") as f:
                block = f[a.name()][int(rows[0]): int(rows[-1]) + 1]
            return np.asarray(block[rows - rows[0]], dtype=np.float32)

        return [lambda rows=rows: load(rows) for rows in chunks], [len(rows) for rows in chunks]

    def _build_index_ondisk(self, a: ArrayId, spec, meta: dict):
        """An IVF index of a pool too large to read whole, built shard by shard
        with its lists in an .ivfdata file beside it (the caller holds the lock)."""
        path = self.index_path(a)
        shards, sizes = self._pool_shards(a)
        try:
            build_ondisk(shards, spec, path, meta=meta, sizes=sizes)
        except OSError as e:
            raise StoreError(f"cannot save index of {a} ({len(self.pool_rows)} vectors of {self.dim(a)}): "
                             f"{_first_line(e)}; free space or point --store at a disk with room") from None
        return self._load_index(a)

    def indexes_to_rebuild(self) -> list[ArrayId]:
        """Arrays whose index the build promised (`--index`) but which are missing or damaged."""
        kind = self.config.get("index")
        if not kind:
            return [a for a in self.arrays if self.index_path(a).exists() and not self.has_index(a)]
        spec = index_spec(kind)
        return [a for a in self.arrays if not self.has_index(a, spec)]

    def load_model(self, dtype: str | None = None, device: str | None = None):
        """The build's model and tokenizer (a `models.LoadedModel`), in `dtype` on
        `device` (None: as the build asked), checked to have the weights and tokenizer the build was made with."""
        m = dict(self.config["model"])
        if dtype:
            m["dtype"] = dtype
        if device:
            m["device"] = device
        lm = load_model(ModelSpec(**m), self.home)
        built = self.provenance.get("model", {})
        for name in ("weights_sha256", "tokenizer_sha256"):
            if built.get(name) and lm.provenance.get(name) != built.get(name):
                raise MismatchError(f"model {built.get('model')!r} now has {name} "
                                    f"{str(lm.provenance.get(name))[:12]}, but build {self.key[:12]} was made "
                                    f"with {str(built.get(name))[:12]}; restore the original model files or "
                                    f"build again with this model")
        return lm

    # ------------------------------------------------------------------ task and summary
    def task(self) -> Task:
        """The build's `data.Task`, rebuilt from what the build stored (never from
        the original data file, which may have moved)."""
        t = self.provenance["data"]["task"]
        return Task.from_provenance(self.task_name, t)

    def examples(self, rows) -> list[Example]:
        """The build's examples at store rows `rows`, rebuilt from the stored records."""
        return [Example.from_record(self.records[int(r)]) for r in rows]

    @property
    def task_name(self) -> str:
        d = self.config.get("data", {})
        return Path(d["path"]).stem if d.get("path") else str(d.get("task"))

    def info(self) -> dict:
        """A JSON-able summary: key, task, model, sizes, arrays, derived files per kind and provenance."""
        derived = {kind: len(list((self.dir / kind).glob(f"*{suffix}"))) for kind, suffix in DERIVED.items()}
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
            "n_indexes": derived["indexes"],
            "derived": derived,
            "size_mb": round(sum(p.stat().st_size for p in self.dir.rglob("*") if p.is_file()) / 2**20, 2),
            "provenance": self.provenance,
            "config": self.config,
        }


def _span(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for L in layers:
        if out and out[-1].split("-")[-1] == str(L - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{L}"
        else:
            out.append(str(L))
    return ",".join(out)


def index_shard_bytes() -> int:
    """`INDEX_SHARD_BYTES`, or ACTCACHE_INDEX_SHARD_BYTES when set."""
    text = os.environ.get("ACTCACHE_INDEX_SHARD_BYTES")
    if text is None:
        return INDEX_SHARD_BYTES
    try:
        value = int(text)
        if value < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"ACTCACHE_INDEX_SHARD_BYTES={text!r} is not a positive byte count; "
                          f"set it to e.g. 2147483648 or unset it") from None
    return value


def find_build(key: str, home: str | os.PathLike | None = None) -> Path:
    """The directory of a build by key, unique key prefix (at least 6 characters) or
    "last" (the most recently finished build), without opening it."""
    root = check_home(default_home(home)) / "builds"
    if key == "last":
        done = [p for p in root.glob("*/acts.h5")] if root.exists() else []
        if not done:
            raise StoreError(f"no finished build in {root}; run `actcache build` first")
        return max(done, key=lambda p: p.stat().st_mtime).parent
    if not key or "/" in key or "\\" in key or key.startswith(".") or any(c in key for c in "*?[]"):
        raise StoreError(f"{key!r} is not a build key; `actcache ls` lists the builds in {root}")
    if (root / key).is_dir():
        return root / key
    matches = [p for p in root.glob(f"{key}*") if p.is_dir()] if len(key) >= 6 else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise StoreError(f"key prefix {key!r} matches {len(matches)} builds; give more characters")
    raise StoreError(f"no build {key!r} in {root}; `actcache ls` lists the builds there")


def build_dirs(home: str | os.PathLike | None = None) -> list[Path]:
    """The directory of every build under the store root, for `verify --all`.
    StoreError when the root is a file, does not exist, or holds no build."""
    home = default_home(home)
    root = check_home(home) / "builds"
    if not home.exists():
        raise StoreError(f"store {home} does not exist; point --store (or ACTCACHE_HOME) at the store to check")
    dirs = sorted(d for d in root.glob("*") if d.is_dir()) if root.is_dir() else []
    if not dirs:
        raise StoreError(f"store {home} holds no builds (nothing under {root}); point --store (or "
                         f"ACTCACHE_HOME) at the store to check")
    return dirs


def list_builds(home: str | os.PathLike | None = None) -> list[dict]:
    """Every build under the store root with its status: "done", "done, N indexes
    to rebuild" (an `--index` build whose indexes are missing or damaged),
    "incomplete" (interrupted; rerun to resume) or "corrupt" (with the error).
    Reads only: leftovers are `admin.plan_gc`'s to remove."""
    root = check_home(default_home(home)) / "builds"
    out = []
    for d in sorted(root.glob("*")) if root.exists() else []:
        if not d.is_dir():
            continue
        try:
            st = Store(d)
            info = st.info()
            todo = len(st.indexes_to_rebuild())
            info["status"] = f"done, {todo} indexes to rebuild" if todo else "done"
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


# --------------------------------------------------------------------------- verify


@dataclass
class Finding:
    """One problem `verify` found: what, where, and whether it was repaired."""

    what: str
    path: str
    message: str
    repairable: bool
    repaired: bool = False


@dataclass
class VerifyReport:
    """What `verify` checked in one build and what it found."""

    key: str
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong, or everything wrong was repaired."""
        return all(f.repaired for f in self.findings)


def _verify_units(bdir: Path, rep: "VerifyReport", repair: bool) -> None:
    """The flushed units of unfinished work (a build's `partial/`, a quality
    matrix's `.partial/`): each must read whole (zip CRCs) and, where a
    distributed run's manifest lists it, match its sha256. With `repair` a bad
    unit is deleted (and dropped from the manifest): the rerun recomputes it."""
    for d in [bdir / "partial", *(bdir / "quality").glob("*.partial")]:
        if not d.is_dir():
            continue
        manifests = {m.parent: Manifest(m) for m in d.rglob(MANIFEST)}
        for f in sorted(d.rglob("*.npz")):
            rep.checked += 1
            man = next((m for parent, m in manifests.items() if str(f) in m.rows), None)
            if load_npz(f) is not None and (man is None or man.trusts(f)):
                continue
            fd = Finding("unit", str(f), f"flushed unit {f.relative_to(bdir)} is damaged"
                         f"{' or differs from its manifest' if man is not None else ''}; the rerun recomputes "
                         f"it once it is deleted (verify --repair does)", repairable=True)
            if repair:
                f.unlink(missing_ok=True)
                if man is not None:
                    man.drop(f)
                fd.repaired = True
            rep.findings.append(fd)


def verify(build_dir: str | os.PathLike, repair: bool = False) -> VerifyReport:
    """Check every part of a build: the flushed units of unfinished work, each
    array and statistics dataset read in full (fletcher32 checksums), the examples digest, every index on disk (and
    those an `--index` build promised) against its array, every derived cache
    file (query activations, quality matrices, embeddings), and leftovers of
    dead writers and finished builds.

    With `repair`, indexes are rebuilt, damaged derived files and leftovers
    deleted (they are recomputed on next use). Damaged arrays cannot be
    derived: the finding says to rebuild.
    """
    bdir = Path(build_dir)
    rep = VerifyReport(bdir.name)
    _verify_units(bdir, rep, repair)
    if not (bdir / "acts.h5").exists() and (bdir / "partial").exists():
        return rep  # an unfinished build: its flushed units are all there is to check
    try:
        st = Store(bdir)
    except StoreError as e:
        rep.findings.append(Finding("build", str(bdir / "acts.h5"), str(e), repairable=False))
        return rep
    names = [a.name() for a in st.arrays] + sorted({a.stats_name() for a in st.arrays})
    with _open_h5(st.h5_path) as f:
        for top in ("sae", "sae_training"):
            if top in f:
                f[top].visititems(lambda n, obj, t=top: names.append(f"{t}/{n}") if hasattr(obj, "shape") else None)
        for name in names:
            rep.checked += 1
            try:
                if name in f:
                    f[name][:]
            except _H5_ERRORS as e:
                rep.findings.append(Finding("array", name, f"{name} fails its checksum ({_first_line(e)}); "
                                            f"it cannot be derived: delete {bdir} and run "
                                            f"`{build_command(st)}` again", repairable=False))
    damaged_arrays = {x.path for x in rep.findings}
    for a in st.arrays:
        p = st.index_path(a)
        promised = bool(st.config.get("index"))
        if not p.exists() and not promised:
            continue
        rep.checked += 1
        spec = index_spec(st.config.get("index")) if promised else None
        if a.name() in damaged_arrays or st.has_index(a, spec):
            continue
        fd = Finding("index", str(p), f"index {p.name} is {'missing' if not p.exists() else 'damaged or stale'}",
                     repairable=True)
        if repair:
            for q in (p, Path(f"{p}.json"), Path(f"{p}{IVFDATA_SUFFIX}")):
                q.unlink(missing_ok=True)
            st.build_index(a, spec)
            fd.repaired = True
        rep.findings.append(fd)
    _verify_derived(st, rep, repair)
    for p in stale_leftovers(bdir):
        fd = Finding("leftover", str(p), f"{p.relative_to(bdir)} is left over from an interrupted writer",
                     repairable=True)
        if repair:
            import shutil

            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            fd.repaired = True
        rep.findings.append(fd)
    return rep


def _verify_derived(st: Store, rep: VerifyReport, repair: bool) -> None:
    """Every derived cache file but indexes (checked against their arrays): damaged
    ones, and ones whose recorded key says they belong to another build or other
    parameters (a file copied from elsewhere), are findings; `repair` deletes them."""
    bdir = st.dir
    for sub in (kind for kind in DERIVED if kind != "indexes"):
        for p in sorted((bdir / sub).rglob("*")) if (bdir / sub).exists() else []:
            if not p.is_file() or p.suffix not in (".npz", ".npy") or p.name.startswith("."):
                continue
            rep.checked += 1
            z = load_npz(p) if p.suffix == ".npz" else None
            if (z is None) if p.suffix == ".npz" else not _npy_ok(p):
                why = "is damaged"
            else:
                why = _derived_mismatch(st, p, z) if z is not None else None
                if why is None:
                    continue
            fd = Finding("cache", str(p), f"{p.relative_to(bdir)} {why}; delete it (verify --repair does) and "
                                          f"it is recomputed on next use", repairable=True)
            if repair:
                p.unlink(missing_ok=True)
                fd.repaired = True
            rep.findings.append(fd)


def _derived_mismatch(st: Store, p: Path, z: dict) -> str | None:
    """Why a readable derived file does not belong at `p` of this build, from the
    provenance it records (a quality matrix's meta, an embeddings file's key);
    None when it fits or records nothing to check."""
    if "meta" in z:
        try:
            meta = json.loads(str(z["meta"]))
        except ValueError:
            return "has unreadable provenance"
        if not isinstance(meta, dict):
            return "has unreadable provenance"
        built_for = meta.get("build_key")
        if built_for is not None and built_for != st.key:
            return f"was computed for build {str(built_for)[:12]}, not {st.key[:12]} (copied from another build)"
        key = meta.get("key")
    else:
        key = str(z["key"]) if "key" in z and z["key"].ndim == 0 else None
    if key is not None and not p.name.startswith(str(key)[:32]):
        return f"records key {str(key)[:12]}, not the one its name says (copied from another build or file)"
    return None


def build_command(store: "Store") -> str:
    """The `actcache build` command line that makes this build again (the same key
    and every array it holds): its model (in the dtype the build resolved), data
    and data options, capture options, index kind, SAEs and store root, from the
    config and provenance the build recorded."""
    import shlex

    cfg = store.config
    m, d = cfg.get("model", {}), cfg.get("data", {})
    parts = ["actcache", "build", "--model", str(m.get("model"))]
    parts += ["--data", str(d["path"])] if d.get("path") else ["--task", str(d.get("task"))]
    for flag, attr in (("--components", "component"), ("--layers", "layer"), ("--pooling", "pooling"),
                       ("--masks", "mask")):
        parts += [flag, ",".join(str(v) for v in sorted({getattr(a, attr) for a in store.arrays}))]
    parts += ["--dtype", str(store.provenance.get("model", {}).get("dtype") or m.get("dtype", "auto"))]
    parts += _options(m, ("revision", "device"))
    if m.get("model_config"):
        parts += _options(m, ("model_config", "init_seed"))
    if d.get("path"):
        words = [str(w).strip() for w in d.get("label_words") or ()]
        template = d.get("template")
        parts += _options({**d, "label_words": words, "template": template and template.replace("\n", "\\n")},
                          ("text_fields", "label_field", "label_values", "label_words", "template", "split_field",
                           "id_field"), {"text_fields": "--text-field"})
    parts += _options(d, ("data_dir", "pool_limit", "eval_limit", "seed"), {"pool_limit": "--limit"})
    parts += _options(cfg, ("span", "max_length", "batch_size", "batch_tokens", "store_dtype", "context_k", "context_seed",
                            "index", "saes"), {"saes": "--sae"})
    parts += ["--store", str(store.home)]
    return " ".join(shlex.quote(x) for x in parts)


def _options(values: dict, names: tuple, flags: dict | None = None) -> list[str]:
    """`--flag value` for each of `names` set in `values` (lists comma-joined)."""
    out = []
    for n in names:
        v = values.get(n)
        if v is None or v == [] or v == () or v == "":
            continue
        flag = (flags or {}).get(n, "--" + n.replace("_", "-"))
        out += [flag, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def _npy_ok(path: Path) -> bool:
    try:
        np.load(path, allow_pickle=False)
        return True
    except (OSError, ValueError, EOFError):
        return False
