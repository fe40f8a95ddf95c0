"""The work behind `actcache serve`, without HTTP: loaded builds, indexes and
models, and two lanes of work with bounded queues.

- The *lookup* lane answers what needs no model: eval ids, raw vectors, and
  strategies that run on stored arrays. It never waits behind a forward pass.
- The *model* lane runs forward passes: new texts (coalesced: requests that
  arrive within a short window are encoded in one batch, each then searched as
  the local command would) and strategies that need the model (vote-k).

Each lane holds at most `ServeLimits.queue` waiting jobs; one more is refused
(`BusyError`, queue_full) rather than queued without bound. Every job carries a
deadline; a job whose caller stopped waiting is dropped before its work starts,
and new-text work is checked between forward batches.

Indexes are read into memory (never memory-mapped, so no file change can
reach a reader) and re-validated when their file changes on disk: a damaged
index is rebuilt by the store's own rule, a rebuilt one is picked up.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from actcache_indexes import IVFDATA_SUFFIX

from .errors import BusyError, ConfigError, StoreError
from .models import set_threads
from .query import check_query, encode_texts, eval_inputs, parse_inputs, search_records, search_vectors
from .select import STRATEGIES, select
from .store import Store, find_build

MAX_REMEMBERED = 200_000  # new-text vectors kept per (build, array)
FORWARD_ROWS = 64  # texts per forward batch of coalesced requests
KEY_RE = re.compile(r"^(last|[0-9a-f]{6,64})$")
LANES = ("lookup", "model")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the service, and how much may wait.

    max_ids: eval ids per request (a request without ids asks for every eval
        row, so the build's eval split must fit too).
    max_texts / max_text_chars / max_request_chars: new inputs per request,
        characters per input, characters per request.
    max_vectors: raw query vectors per request.
    queue: jobs waiting per lane; one more is refused with 429.
    deadline_s: seconds a request may take from arrival to answer; past it the
        answer is 503 and the job is dropped.
    """

    max_ids: int = 1024
    max_texts: int = 256
    max_text_chars: int = 20_000
    max_request_chars: int = 50_000
    max_vectors: int = 1024
    queue: int = 64
    deadline_s: float = 60.0

    def check(self) -> "ServeLimits":
        for k, v in asdict(self).items():
            if not v > 0:
                raise ConfigError(f"serve limit {k} must be positive, got {v}")
        return self


@dataclass
class Job:
    key: str  # resolved build key
    kind: str  # "ids", "texts", "vectors" or "select"
    payload: dict
    deadline: float  # time.monotonic() after which nobody waits for the answer
    future: Future = field(default_factory=Future)

    def expired(self) -> bool:
        return self.future.done() or time.monotonic() > self.deadline

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """Answer the job unless its caller stopped waiting (a cancelled future)."""
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except InvalidStateError:
            pass


def _too_late(job: Job) -> BusyError:
    return BusyError("the request waited past the server's deadline before its work could start; "
                     "retry later or send less work per request", retry_after=5)


class Lane:
    """A bounded queue and the one thread that works it. `run(jobs)` gets the
    jobs taken together (after coalescing, when `window_s` is set)."""

    def __init__(self, name: str, run: Callable[[list[Job]], None], size: int, window_s: float = 0.0,
                 max_wait_s: float = 0.0):
        self.name, self.run = name, run
        self.q: queue.Queue = queue.Queue(maxsize=size)
        self.window_s, self.max_wait_s = window_s, max_wait_s
        self.busy_since: float | None = None
        self.jobs_done = 0
        self.thread = threading.Thread(target=self._loop, name=f"actcache-serve-{name}", daemon=True)
        self.thread.start()

    def put(self, job: Job) -> None:
        try:
            self.q.put_nowait(job)
        except queue.Full:
            raise BusyError(f"the {self.name} lane's queue is full ({self.q.maxsize} requests waiting); "
                            f"retry after a moment", retry_after=1, queue_full=True) from None

    def state(self) -> dict:
        busy = 0.0 if self.busy_since is None else round(time.monotonic() - self.busy_since, 3)
        full = self.q.full()
        return {"ready": self.thread.is_alive() and not full, "queued": self.q.qsize(),
                "capacity": self.q.maxsize, "busy_s": busy, "done": self.jobs_done}

    def _take(self) -> list[Job]:
        jobs = [self.q.get()]
        # Take whatever is queued already; with a window, keep collecting while requests keep
        # arriving (a gap of `window_s` ends it, `max_wait_s` caps it): a bigger forward batch
        # is the work coalescing saves.
        start = last = time.monotonic()
        while len(jobs) < 256:
            try:
                jobs.append(self.q.get_nowait())
                last = time.monotonic()
                continue
            except queue.Empty:
                pass
            left = min(last + self.window_s, start + self.max_wait_s) - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(self.q.get(timeout=left))
                last = time.monotonic()
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            self.busy_since = time.monotonic()
            live = []
            for j in jobs:
                if j.expired():
                    j.settle(error=_too_late(j))
                else:
                    live.append(j)
            try:
                if live:
                    self.run(live)
            except BaseException as e:  # every error goes back to its request; the lane lives on
                for j in live:
                    j.settle(error=e)
            finally:
                self.busy_since = None
                self.jobs_done += len(jobs)


def _file_sig(path) -> tuple | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns)


class Service:
    """The loaded state and the two lanes. `submit(...)` may be called from any
    thread; the work runs on the lanes' threads."""

    def __init__(self, home: str | None = None, limits: ServeLimits | None = None, window_s: float = 0.01,
                 max_models: int = 2, max_wait_s: float = 0.1, threads: int | None = None,
                 device: str | None = None):
        self.device = device  # where models run (None: where each build asked)
        set_threads(threads)  # the forward pass's (and FAISS's) threads: all cores unless told
        self.home = home
        self.limits = (limits or ServeLimits()).check()
        self.max_models = max_models
        self._stores: dict = {}
        self._indexes: dict = {}  # (key, array) -> (file signature, VectorIndex in memory)
        self._models: OrderedDict = OrderedDict()
        self._vecs: dict = {}  # (key, array) -> {text: (d,) float32}
        self._checked: dict = {}  # (key, query options) -> ArrayId, validated once
        self._evals: dict = {}  # (key, array) -> {eval id: (d,) float32}
        self.forward_batches = 0
        self._lock = threading.RLock()
        self.lanes = {"lookup": Lane("lookup", self._work, self.limits.queue),
                      "model": Lane("model", self._work, self.limits.queue, window_s, max_wait_s)}

    # ---------------------------------------------------------------- state
    def store(self, key: str) -> Store:
        """The build for a key, unique prefix or "last" (opened once per file version and kept)."""
        if not KEY_RE.match(key or ""):
            raise StoreError(f"no build {key!r}: a key is 6 to 64 hex characters or 'last'")
        d = find_build(key, self.home)
        sig = _file_sig(d / "acts.h5")
        with self._lock:
            cached = self._stores.get(d.name)
            if cached is not None and cached[0] == sig:
                return cached[1]
        st = Store(d)  # opened (and its examples checked) once per file version
        with self._lock:
            self._stores[st.key] = (sig, st)
            self._checked.clear()
            self._evals.clear()
            self._indexes = {k: v for k, v in self._indexes.items() if k[0] != st.key}
        return st

    def index(self, st: Store, a):
        """The index of array `a`, in memory; reloaded (validated, or rebuilt by the
        store when damaged) whenever its file on disk, or the .ivfdata lists of an
        on-disk IVF index, changed since it was read."""
        path = st.index_path(a)
        sig = lambda: (_file_sig(path), _file_sig(f"{path}{IVFDATA_SUFFIX}"))  # noqa: E731
        with self._lock:
            cached = self._indexes.get((st.key, a))
            if cached is not None and cached[0] == sig():
                return cached[1]
            idx = st.index(a.component, a.layer, a.pooling, a.mask, mmap=False)
            self._indexes[(st.key, a)] = (sig(), idx)
            return idx

    def model(self, st: Store):
        with self._lock:
            if st.key in self._models:
                self._models.move_to_end(st.key)
            else:
                self._models[st.key] = st.load_model(device=self.device)
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return self._models[st.key]

    def ready(self) -> dict:
        return {name: lane.state() for name, lane in self.lanes.items()}

    # ---------------------------------------------------------------- public call
    def submit(self, key: str, kind: str, payload: dict) -> Job:
        """Queue a job on its lane; BusyError when that lane's queue is full."""
        st = self.store(key)
        job = Job(st.key, kind, payload, time.monotonic() + self.limits.deadline_s)
        needs_model = kind == "texts" or (kind == "select" and STRATEGIES[payload["strategy"]].needs_model)
        self.lanes["model" if needs_model else "lookup"].put(job)
        return job

    # ---------------------------------------------------------------- work (lane threads)
    def _work(self, jobs: list[Job]) -> None:
        groups: dict = {}
        for j in jobs:
            if j.kind == "select":
                try:
                    self._select(j)
                except BaseException as e:
                    j.settle(error=e)
            else:
                c = j.payload["cfg"]
                groups.setdefault((j.key, c.component, c.layer, c.pooling, c.mask), []).append(j)
        for (key, *_), js in groups.items():
            try:
                self._neighbors(key, js)
            except BaseException as e:
                for j in js:
                    j.settle(error=e)

    def _prepare(self, st: Store, j: Job) -> None:
        cfg = j.payload["cfg"]
        ck = (st.key, cfg)
        if ck not in self._checked:
            if len(self._checked) > 10_000:
                self._checked.clear()  # bounded: every distinct filter is a new entry
            self._checked[ck] = check_query(st, cfg)
        j.payload["a"] = self._checked[ck]
        if j.kind == "ids":
            j.payload["inputs"] = eval_inputs(st, j.payload.get("ids"))
            if len(j.payload["inputs"].ids) > self.limits.max_ids:
                raise ConfigError(f"the request asks for {len(j.payload['inputs'].ids)} eval ids, over the "
                                  f"server's limit of {self.limits.max_ids}; send ids in smaller batches")
        elif j.kind == "texts":
            p = j.payload
            p["inputs"] = parse_inputs(st, p["lines"], p["jsonl"], p["name"], cfg.text_field)

    def _neighbors(self, key: str, jobs: list[Job]) -> None:
        st = self._stores[key][1]
        ok = []
        for j in jobs:
            try:
                self._prepare(st, j)
                ok.append(j)
            except BaseException as e:
                j.settle(error=e)
        if not ok:
            return
        a = ok[0].payload["a"]
        index = self.index(st, a)
        vecs = self._query_vectors(st, a, ok)
        # Each request is searched as its own batch, exactly as the local command would: BLAS
        # kernels differ in the last bit with the batch shape, and answers must not depend on
        # which other requests arrived in the same window. The search is the cheap part.
        for j in ok:
            if j.expired():
                j.settle(error=_too_late(j))
            elif j.kind == "vectors":
                try:
                    j.settle(search_vectors(st, np.asarray(j.payload["vectors"], dtype=np.float64),
                                            j.payload["cfg"], index))
                except BaseException as e:
                    j.settle(error=e)
            else:
                j.settle(search_records(st, j.payload["inputs"], vecs[id(j)], j.payload["cfg"], a, index))

    def _encode_missing(self, st: Store, a, jobs: list[Job], mem: dict) -> None:
        """Encode the new texts of `jobs` not yet in `mem`, one forward batch at a time,
        dropping texts whose requests have passed their deadline between batches."""
        missing = list(dict.fromkeys(t for j in jobs if j.kind == "texts" for t in j.payload["inputs"].texts
                                     if t not in mem))
        rows = max(FORWARD_ROWS, int(st.config.get("batch_size", 16)))
        for s in range(0, len(missing), rows):
            live = {t for j in jobs if j.kind == "texts" and not j.expired() for t in j.payload["inputs"].texts}
            chunk = [t for t in missing[s:s + rows] if t in live]
            if not chunk:
                continue
            V, rep = encode_texts(st, chunk, a.component, a.layer, a.pooling, a.mask, lm=self.model(st),
                                  batch_size=rows)
            self.forward_batches += rep["forward_batches"]
            mem.update(zip(chunk, V))

    def _query_vectors(self, st: Store, a, jobs: list[Job]) -> dict:
        """{id(job): (q, d) float32}: eval rows from the store, new texts from the
        per-text memory, then the CLI's cache, then forward batches for the misses."""
        mem = self._vecs.setdefault((st.key, a), {})
        if len(mem) > MAX_REMEMBERED:
            mem.clear()  # bounded: a client sending endless new texts must not grow the server
        self._encode_missing(st, a, jobs, mem)
        out = {}
        for j in jobs:
            if j.kind == "vectors":
                continue
            inp = j.payload["inputs"]
            if j.kind == "texts":
                if not j.expired():
                    out[id(j)] = np.stack([mem[t] for t in inp.texts]).astype(np.float32)
                continue
            with self._lock:
                if (st.key, a) not in self._evals:
                    self._evals[(st.key, a)] = dict(zip(st.ids[st.eval_rows],
                                                        st.acts(a.component, a.layer, a.pooling, a.mask, "eval")))
            E = self._evals[(st.key, a)]
            out[id(j)] = np.stack([E[i] for i in inp.ids]).astype(np.float32)
        return out

    def _select(self, j: Job) -> None:
        st = self._stores[j.key][1]
        p = j.payload
        lm = self.model(st) if STRATEGIES[p["strategy"]].needs_model else None  # vote-k's confidence stage
        sel = select(st, p["strategy"], budget=p.get("budget"), k=p.get("k"), seed=p.get("seed", 0), lm=lm,
                     **p["opts"])
        j.settle(sel.to_records())


__all__ = ["Service", "ServeLimits", "Lane", "Job", "LANES", "KEY_RE", "FORWARD_ROWS"]
