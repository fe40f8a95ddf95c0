"""Store housekeeping: how much disk each build takes, and plans that remove
builds (`plan_rm`) or what nothing needs any more (`plan_gc`).

A plan is a list of `Removal`s (a path, its size on disk, why); nothing is
touched until `remove(plan)`. Everything a build owns (acts.h5, every kind in
`store.DERIVED`, resume data, its lock) lives under `<home>/builds/<key>/`, so
removing a build removes what was derived from it with it.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, StoreError
from .files import check_home, default_home, file_lock
from .store import DERIVED, dead_writers_tmp, find_build, stale_leftovers

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Removal:
    """One path a plan removes: its size on disk (bytes), why, and the build it belongs to."""

    path: Path
    bytes: int
    reason: str
    key: str | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "reason": self.reason, "key": self.key}


def parse_size(text: str) -> int:
    """'500M', '10G', '1.5GiB', '2048' (bytes) -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--max-size {text!r} is not a size; give e.g. 500M, 10G or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_age(text: str) -> float:
    """'30d', '12h', '2w', '90m', '45s' or a plain number of days -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--older-than {text!r} is not an age; give e.g. 30d, 12h, 2w or a number of days")
    return float(m.group(1)) * _AGES[m.group(2) or "d"]


def human(n: int) -> str:
    """Bytes in binary units, du -h style: 0B, 812K, 3.4M, 12G."""
    x = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if x < 1024 or unit == "T":
            return f"{x:.0f}{unit}" if unit == "B" or x >= 10 else f"{x:.1f}{unit}"
        x /= 1024
    return f"{n}B"  # pragma: no cover


def disk_usage(path: Path) -> int:
    """Bytes `path` takes on disk, like `du -s -B1`: allocated blocks of every
    file under it, each hard-linked file once, symlinks not followed."""
    seen: set = set()
    total = 0
    paths = [path] if not path.is_dir() or path.is_symlink() else [path, *path.rglob("*")]
    for p in paths:
        try:
            st = p.lstat()
        except OSError:
            continue  # removed meanwhile
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        blocks = getattr(st, "st_blocks", None)  # allocated 512-byte blocks (POSIX); else the size
        total += blocks * 512 if blocks is not None else st.st_size
    return total


def last_used(build_dir: Path) -> float:
    """When a build was last read or written: the latest access or modification
    time of any file under it (reads update access times as the mount allows)."""
    t = 0.0
    for p in [build_dir, *build_dir.rglob("*")]:
        try:
            st = p.stat()
        except OSError:
            continue
        t = max(t, st.st_mtime, st.st_atime if p.is_file() else 0.0)
    return t


def _root(home) -> Path:
    return check_home(default_home(home)) / "builds"


def build_usage(home=None) -> list[dict]:
    """Every build folder with its size on disk: {"key", "path", "bytes",
    "last_used", "derived": {kind: bytes} (each `DERIVED` kind and the resume
    data under partial/)}. Reads only."""
    root = _root(home)
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        kinds = {k: disk_usage(d / k) for k in (*DERIVED, "partial") if (d / k).exists()}
        out.append({"key": d.name, "path": str(d), "bytes": disk_usage(d), "last_used": last_used(d),
                    "derived": kinds})
    return out


def plan_rm(keys, home=None) -> list[Removal]:
    """The build folders of `keys` (keys, unique prefixes or 'last'), each with
    everything derived from it. StoreError for a key that names no build."""
    if not keys:
        raise ConfigError("give at least one build key (or 'last'); `actcache ls` lists them")
    plan, seen = [], set()
    for k in keys:
        d = find_build(k, home)
        if d not in seen:
            seen.add(d)
            plan.append(Removal(d, disk_usage(d), "build and everything derived from it", d.name))
    return plan


def leftovers(home=None) -> list[Removal]:
    """What nothing will use: each build's `stale_leftovers` (temp files of dead
    writers, resume data of finished passes), quality-matrix resume folders whose
    matrix is finished, build folders holding neither a build nor resume data
    (a build that failed before flushing anything), and temp files of dead
    writers elsewhere in the store (model conversions, the weights memo)."""
    home = default_home(home)
    root = _root(home)
    out: list[Removal] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        has_build = (d / "acts.h5").exists()
        if not has_build and not any((d / "partial").rglob("*.npz")) and not any((d / "quality").rglob("*.npz")):
            out.append(Removal(d, disk_usage(d), "build folder without a build or resume data", d.name))
            continue
        stale = stale_leftovers(d)
        stale += [p for p in sorted((d / "quality").glob("*.partial"))
                  if p.is_dir() and p.with_suffix(DERIVED["quality"]).exists() and p not in stale]
        out += [Removal(p, disk_usage(p), "leftover of an interrupted or finished writer", d.name) for p in stale]
    if home.is_dir():
        for p in sorted(home.rglob("*.tmp")):
            if root in p.parents or not dead_writers_tmp(p):
                continue
            if not any(p == q or q in p.parents for q in (r.path for r in out)):
                out.append(Removal(p, disk_usage(p), "temp file of a writer that is no longer running"))
    return out


def plan_gc(home=None, older_than: float | None = None, max_size: int | None = None,
            now: float | None = None) -> list[Removal]:
    """What `gc` removes: `leftovers`, then builds unused for `older_than`
    seconds, then least-recently-used builds until the builds left take at most
    `max_size` bytes."""
    if older_than is not None and older_than < 0:
        raise ConfigError("--older-than must not be negative")
    if max_size is not None and max_size < 0:
        raise ConfigError("--max-size must not be negative")
    now = time.time() if now is None else now
    plan = leftovers(home)
    gone_dirs = {r.path for r in plan}
    builds = [b for b in build_usage(home) if Path(b["path"]) not in gone_dirs]
    left = []
    for b in sorted(builds, key=lambda b: b["last_used"]):
        age = now - b["last_used"]
        if older_than is not None and age > older_than:
            plan.append(Removal(Path(b["path"]), b["bytes"], f"unused for {age / 86400:.1f} days", b["key"]))
        else:
            left.append(b)
    if max_size is not None:
        # the leftovers inside kept builds are gone too; count what stays
        build_dirs = {Path(b["path"]) for b in builds}
        inner = {r.key: 0 for r in plan}
        for r in plan:
            if r.key is not None and Path(r.path) not in build_dirs:
                inner[r.key] += r.bytes
        total = sum(b["bytes"] - inner.get(b["key"], 0) for b in left)
        for b in left:  # least recently used first
            if total <= max_size:
                break
            size = b["bytes"] - inner.get(b["key"], 0)
            plan = [r for r in plan if r.key != b["key"]]
            plan.append(Removal(Path(b["path"]), b["bytes"], f"least recently used (store over "
                                f"{human(max_size)})", b["key"]))
            total -= size
    return plan


def remove(plan: list[Removal]) -> int:
    """Delete every path of `plan` (a build folder only while no process holds
    its lock). Returns the bytes freed. StoreError when a path cannot be removed."""
    freed = 0
    for r in plan:
        p = Path(r.path)
        if not p.exists() and not p.is_symlink():
            continue
        try:
            if p.is_dir() and (p / "lock").exists() and p.parent.name == "builds":
                with file_lock(p / "lock", timeout=0):  # a build running now keeps its folder
                    shutil.rmtree(p)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            raise StoreError(f"cannot remove {p} ({e.strerror}); check its permissions") from None
        freed += r.bytes
    return freed
