"""`actcache serve`: the retrieval of `actcache query` and `select` as a local
HTTP service (FastAPI + uvicorn), for harnesses and notebooks that want
demonstrations per input without paying a process start, a model load and an
index load each time.

One worker thread does all the work: requests are queued, and those that
arrive within a short window are coalesced, so new texts for one build and
array are encoded in one forward batch (each then searched as the local command
would), and two forward passes never compete for the same cores. Builds, indexes and
models stay loaded (models in a small LRU); query vectors of new texts are kept
per text, and the store's query cache is used as the CLI uses it. The store is
never written except that cache.
"""


import asyncio
import hmac
import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .errors import ActcacheError, ConfigError, CorruptStoreError, DatasetError, MismatchError, StoreError
from .query import QueryConfig, check_query, encode_texts, eval_inputs, parse_inputs, search_records
from .select import STRATEGIES, needs_model, select
from .store import Store, find_build, list_builds

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_BODY = 1 << 20  # bytes per request
MAX_TEXTS = 1024  # inputs per request
MAX_TEXT_CHARS = 20_000
MAX_REMEMBERED = 200_000  # new-text vectors kept per (build, array)
FORWARD_ROWS = 64  # texts per forward batch of coalesced requests
KEY_RE = re.compile(r"^(last|[0-9a-f]{6,64})$")


def status_of(e: BaseException) -> int:
    """The HTTP status of a library error: the one place errors map to codes."""
    if isinstance(e, CorruptStoreError):
        return 503
    if isinstance(e, MismatchError):
        return 409
    if isinstance(e, StoreError):
        msg = str(e)
        return 404 if ("no build" in msg or "no finished build" in msg or "matches" in msg) else 400
    if isinstance(e, (ConfigError, DatasetError)):
        return 400
    return 400 if isinstance(e, ActcacheError) else 500


def error_body(msg: str) -> bytes:
    """The JSON error document, ASCII-escaped so that any message can be sent."""
    import json

    return json.dumps({"error": msg}).encode()


def check_text(value) -> None:
    """Raise ValueError if a request string (nested in lists/dicts) holds a lone
    surrogate: JSON can escape one ("\\ud800"), but it is no text, and it cannot
    be hashed for the query cache, encoded or written back."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text; "
                                 "send valid Unicode") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_text(v)


class Limits:
    """ASGI wrapper in front of the app: the bearer token (every route but
    /healthz) and the body cap, counted on the bytes actually received, so a
    chunked upload with no Content-Length is cut off at `max_body` as well."""

    def __init__(self, app, token: str | None = None, max_body: int = MAX_BODY):
        self.app = app
        self.state = app.state
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body = max_body

    async def _refuse(self, send, status: int, msg: str) -> None:
        body = error_body(msg)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and scope.get("path") != "/healthz":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await self._refuse(send, 401, "missing or wrong bearer token; send "
                                                     "Authorization: Bearer <token>")
        n = headers.get(b"content-length")
        too_big = f"request body over {self.max_body} bytes; send fewer or shorter inputs"
        if n is not None and (not n.isdigit() or int(n) > self.max_body):
            return await self._refuse(send, 413, too_big)
        from starlette.exceptions import HTTPException

        got = 0

        async def counted():
            nonlocal got
            msg = await receive()
            if msg.get("type") == "http.request":
                got += len(msg.get("body", b""))
                if got > self.max_body:
                    # An HTTPException is what FastAPI lets through from reading the body.
                    raise HTTPException(413, too_big)
            return msg

        return await self.app(scope, counted, send)


def deadline_protocol(read_timeout_s: float):
    """uvicorn's HTTP protocol class, plus a deadline: a connection has
    `read_timeout_s` from its start, or from its previous response, to deliver a
    whole request. Without it a client that sends half a request and stalls holds
    its connection forever, and enough of them use up the server's connections.
    A request head (line and headers) over MAX_BODY bytes closes the connection."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class DeadlineProtocol(AutoHTTPProtocol):
        _deadline = None

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(read_timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            c = self.cycle
            if c is not None and not c.more_body and not c.response_complete:
                return  # the whole request arrived; it is being answered
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            self._head = 0
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            c = self.cycle
            if c is None or c.response_complete:  # bytes of a request's head: cap them (httptools has no cap)
                self._head += len(data)
                if self._head > MAX_BODY:
                    self.transport.close()
                    return
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._head = 0
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    return DeadlineProtocol


@dataclass
class _Job:
    key: str  # resolved build key
    kind: str  # "ids" or "texts" or "select"
    payload: dict
    future: Future = field(default_factory=Future)


class Service:
    """The loaded state and the single worker. `neighbors(...)` and `select(...)`
    may be called from any thread; the work runs on the worker thread."""

    def __init__(self, home: str | None = None, window_s: float = 0.01, max_models: int = 2,
                 max_wait_s: float = 0.1):
        self.home = home
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.max_models = max_models
        self.q: queue.Queue = queue.Queue()
        self._stores: dict = {}
        self._indexes: dict = {}
        self._models: OrderedDict = OrderedDict()
        self._vecs: dict = {}  # (key, array) -> {text: (d,) float32}
        self._checked: dict = {}  # (key, query options) -> ArrayId, validated once
        self._evals: dict = {}  # (key, array) -> {eval id: (d,) float32}
        self.forward_batches = 0
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._loop, name="actcache-serve-worker", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- state
    def store(self, key: str):
        """The build for a key, unique prefix or "last" (opened once and kept)."""
        if not KEY_RE.match(key or ""):
            raise StoreError(f"no build {key!r}: a key is 6 to 64 hex characters or 'last'")
        d = find_build(key, self.home)
        mtime = (d / "acts.h5").stat().st_mtime_ns if (d / "acts.h5").exists() else None
        with self._lock:
            cached = self._stores.get(d.name)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        st = Store(d)  # opened (and its examples checked) once per file version
        with self._lock:
            self._stores[st.key] = (mtime, st)
            self._checked.clear()
            self._evals.clear()
        return st

    def _index(self, st, a):
        k = (st.key, a)
        if k not in self._indexes:
            self._indexes[k] = st.index(a.component, a.layer, a.pooling, a.mask)
        return self._indexes[k]

    def _model(self, st):
        if st.key in self._models:
            self._models.move_to_end(st.key)
        else:
            self._models[st.key] = st.load_model()
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return self._models[st.key]

    # ---------------------------------------------------------------- public calls
    def submit(self, key: str, kind: str, payload: dict) -> Future:
        st = self.store(key)
        job = _Job(st.key, kind, payload)
        self.q.put(job)
        return job.future

    # ---------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            jobs = [self.q.get()]
            # Take whatever is queued already. When a forward pass is coming (new texts), keep
            # collecting while requests keep arriving (a gap of `window_s` ends it, `max_wait_s`
            # caps it), since a bigger forward batch is the work coalescing saves.
            start = last = time.monotonic()
            while len(jobs) < 256:
                try:
                    jobs.append(self.q.get_nowait())
                    last = time.monotonic()
                    continue
                except queue.Empty:
                    pass
                now = time.monotonic()
                left = min(last + self.window_s, start + self.max_wait_s) - now
                if left <= 0 or not any(j.kind == "texts" for j in jobs):
                    break
                try:
                    jobs.append(self.q.get(timeout=left))
                    last = time.monotonic()
                except queue.Empty:
                    break
            groups: dict = {}
            for j in jobs:
                if j.kind == "select":
                    self._run(lambda j=j: self._select(j), [j])
                else:
                    groups.setdefault((j.key, self._array_key(j)), []).append(j)
            for (key, _), js in groups.items():
                self._run(lambda key=key, js=js: self._neighbors(key, js), js)

    @staticmethod
    def _array_key(j: _Job) -> tuple:
        c = j.payload["cfg"]
        return (c.component, c.layer, c.pooling, c.mask)

    @staticmethod
    def _run(fn, jobs) -> None:
        try:
            fn()
        except BaseException as e:  # every error goes back to its request; the worker lives on
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)

    def _neighbors(self, key: str, jobs: list[_Job]) -> None:
        st = self._stores[key][1]
        ok = []
        for j in jobs:
            try:
                cfg = j.payload["cfg"]
                ck = (key, cfg.component, cfg.layer, cfg.pooling, cfg.mask, cfg.k, cfg.balanced)
                if ck not in self._checked:
                    self._checked[ck] = check_query(st, cfg)
                j.payload["a"] = self._checked[ck]
                if j.kind == "ids":
                    j.payload["inputs"] = eval_inputs(st, j.payload.get("ids"))
                else:
                    lines, is_jsonl = j.payload["lines"], j.payload["jsonl"]
                    j.payload["inputs"] = parse_inputs(st, lines, is_jsonl, j.payload["name"], cfg.text_field)
                ok.append(j)
            except BaseException as e:
                j.future.set_exception(e)
        if not ok:
            return
        a = ok[0].payload["a"]
        index = self._index(st, a)
        vec = self._query_vectors(st, a, ok)
        # Each request is searched as its own batch, exactly as the local command would: BLAS
        # kernels differ in the last bit with the batch shape, and answers must not depend on
        # which other requests arrived in the same window. The search is the cheap part.
        for j, Q in zip(ok, vec):
            j.future.set_result(search_records(st, j.payload["inputs"], Q, j.payload["cfg"], a, index))

    def _query_vectors(self, st, a, jobs: list[_Job]) -> list[np.ndarray]:
        """(q, d) float32 per job: eval rows from the store, new texts from the
        per-text memory, then the CLI's cache, then one forward batch for all misses."""
        mem = self._vecs.setdefault((st.key, a), {})
        if len(mem) > MAX_REMEMBERED:
            mem.clear()  # bounded: a client sending endless new texts must not grow the server
        missing = []
        for j in jobs:
            if j.kind == "texts":
                missing += [t for t in j.payload["inputs"].texts if t not in mem and t not in missing]
        if missing:
            lm = self._model(st)
            V, rep = encode_texts(st, missing, a.component, a.layer, a.pooling, a.mask, lm=lm,
                                  batch_size=max(FORWARD_ROWS, int(st.config.get("batch_size", 16))))
            self.forward_batches += rep["forward_batches"]
            for t, v in zip(missing, V):
                mem[t] = v
        out = []
        for j in jobs:
            inp = j.payload["inputs"]
            if j.kind == "texts":
                out.append(np.stack([mem[t] for t in inp.texts]).astype(np.float32))
            else:
                if (st.key, a) not in self._evals:
                    self._evals[(st.key, a)] = dict(zip(st.ids[st.eval_rows],
                                                        st.acts(a.component, a.layer, a.pooling, a.mask, "eval")))
                E = self._evals[(st.key, a)]
                out.append(np.stack([E[i] for i in inp.ids]).astype(np.float32))
        return out

    def _select(self, j: _Job) -> None:
        st = self._stores[j.key][1]
        p = j.payload
        lm = self._model(st) if needs_model(p["strategy"]) else None  # vote-k's confidence stage
        sel = select(st, p["strategy"], budget=p.get("budget"), k=p.get("k"), seed=p.get("seed", 0), lm=lm,
                     **p["opts"])
        j.future.set_result(sel.to_records())


def _request_models():
    """(Neighbors, Select): the request bodies, made on first use so that importing
    this module does not load pydantic."""
    from pydantic import BaseModel, Field, model_validator

    class Checked(BaseModel):
        @model_validator(mode="after")
        def _text(self):
            check_text(self.__dict__)
            return self

    class Neighbors(Checked):
        ids: list[str] | None = Field(None, description="Eval-row ids of the build (default: every eval row).")
        texts: list[str] | None = Field(None, description="New input texts (filled into the build's template).",
                                        max_length=MAX_TEXTS)
        inputs: list[dict] | None = Field(None, description="New inputs as JSON objects (template fields, "
                                                             "optional id), as lines of a JSONL --input.",
                                          max_length=MAX_TEXTS)
        jsonl: list[str] | None = Field(None, description="Lines of a JSONL input file, parsed as `actcache "
                                                          "query --input` parses them (messages name `source`).",
                                        max_length=MAX_TEXTS)
        component: str = QueryConfig.component
        layer: int = QueryConfig.layer
        pooling: str = QueryConfig.pooling
        mask: str = QueryConfig.mask
        k: int = Field(QueryConfig.k, ge=1, le=10_000)
        balanced: bool = QueryConfig.balanced
        exclude_self: bool = QueryConfig.exclude_self
        text_field: str = QueryConfig.text_field
        source: str = Field("request", description="Echoed in each record's config (the CLI client sends "
                                                   "its --input name, so records equal the local command's).")

    class Select(Checked):
        strategy: str
        budget: int | None = Field(None, ge=1, le=1_000_000)
        k: int | None = Field(None, ge=1, le=10_000)
        seed: int = 0
        # None: the strategy's own default (as `actcache.select.select`)
        component: str | None = None
        layer: int | None = None
        pooling: str | None = None
        mask: str | None = None
        stat: str | None = None
        order: str | None = None
        feature: int | None = Field(None, ge=0, description="sae-feature: the feature to rank by.")
        sae: str | None = Field(None, max_length=64, description="sae-knn / sae-feature: the SAE's key prefix.")

    return Neighbors, Select


def _error_handlers(app, err) -> None:
    """Every error becomes one JSON line (`error_body`) with its status: library
    errors by `status_of`, HTTP and validation errors by theirs, anything else 500."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(Exception)
    async def last_resort(request, e: Exception):  # pragma: no cover - never expected; one line, no traceback
        return err(500, f"internal error: {type(e).__name__}: {str(e)[:200]}")

    @app.exception_handler(ActcacheError)
    async def actcache_error(request, e: ActcacheError):
        return err(status_of(e), str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return err(e.status_code, f"{e.detail}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return err(422, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed JSON')}")


def _texts_payload(req, cfg: QueryConfig) -> dict:
    """The service job for new inputs of a neighbors request: its lines, as the
    CLI's --input would give them, whether they are JSONL, and the name messages use."""
    import json

    if req.texts is not None:
        if any(len(t) > MAX_TEXT_CHARS or not t.strip() for t in req.texts):
            raise DatasetError(f"every text must be non-empty and at most {MAX_TEXT_CHARS} characters")
        return {"cfg": cfg, "lines": [t.replace("\n", " ") for t in req.texts], "jsonl": False,
                "name": "the request"}
    if req.inputs is not None:
        return {"cfg": cfg, "lines": [json.dumps(o, ensure_ascii=False) for o in req.inputs], "jsonl": True,
                "name": "the request"}
    return {"cfg": cfg, "lines": req.jsonl, "jsonl": True, "name": req.source}


def create_app(home: str | None = None, token: str | None = None, window_s: float = 0.01):
    """The FastAPI app over the store at `home`. With `token`, every route but
    /healthz needs `Authorization: Bearer <token>`."""
    import json

    from fastapi import Body, FastAPI
    from fastapi.responses import Response

    svc = Service(home, window_s=window_s)
    app = FastAPI(title="actcache", version="1",
                  description="Nearest demonstrations and selection strategies over cached activation builds. "
                              "Records are those of `actcache query` (JSONL), one per input.")
    app.state.service = svc

    Neighbors, Select = _request_models()

    def err(status: int, msg: str) -> Response:
        return Response(error_body(msg), status_code=status, media_type="application/json")

    _error_handlers(app, err)

    def raw_json(obj) -> Response:
        # The records are plain JSON already; skip FastAPI's per-field encoder.
        return Response(json.dumps(obj, ensure_ascii=False).encode(), media_type="application/json")

    async def wait(fut: Future):
        return await asyncio.wrap_future(fut)

    @app.get("/healthz")
    async def healthz():
        """Liveness, and the forward batches this server has run (0 while every text is cached)."""
        return {"ok": True, "forward_batches": svc.forward_batches}

    @app.get("/builds")
    async def builds():
        """Every build of the store (as `actcache ls --json`)."""
        rows = await asyncio.to_thread(list_builds, home)
        return [{k: v for k, v in r.items() if k not in ("provenance", "config")} for r in rows]

    @app.get("/builds/{key}")
    async def build_info(key: str):
        """One build (as `actcache info`): key, unique prefix or 'last'."""
        st = await asyncio.to_thread(svc.store, key)
        return json.loads(json.dumps(st.info(), default=str))

    @app.post("/builds/{key}/neighbors")
    async def neighbors(key: str, req: Neighbors = Body(...)):
        """The k nearest pool examples of each input: eval ids, new texts or JSON inputs."""
        new = [x for x in (req.texts, req.inputs, req.jsonl) if x is not None]
        if len(new) + (req.ids is not None) > 1:
            raise ConfigError("give one of ids, texts, inputs or jsonl")
        cfg = QueryConfig(key=key, component=req.component, layer=req.layer, pooling=req.pooling, mask=req.mask,
                          k=req.k, balanced=req.balanced, exclude_self=req.exclude_self,
                          source=req.source if new else "eval", text_field=req.text_field)
        if new:
            if not new[0]:
                raise DatasetError("the input list is empty; give at least one text")
            fut = svc.submit(key, "texts", _texts_payload(req, cfg))  # cheap once the build is open: no thread hop
        else:
            fut = svc.submit(key, "ids", {"cfg": cfg, "ids": req.ids})
        return raw_json(await wait(fut))

    @app.post("/builds/{key}/select")
    async def select_route(key: str, req: Select = Body(...)):
        """Run a registered selection strategy (random, knn, vote-k, vote-k-lm, k-center, kmeans, stat,
        embed-knn, sae-knn, sae-feature). vote-k runs the build's model (loaded once and kept)."""
        st = STRATEGIES.get(req.strategy)
        if st is None:
            raise ConfigError(f"unknown strategy {req.strategy!r}; choose from {sorted(STRATEGIES)}")
        opts = st.pick({n: getattr(req, n) for n in ("component", "layer", "pooling", "mask", "stat", "order",
                                                       "feature", "sae")})
        fut = await asyncio.to_thread(svc.submit, key, "select",
                                      {"strategy": req.strategy, "budget": req.budget, "k": req.k,
                                       "seed": req.seed, "opts": opts})
        return raw_json(await wait(fut))

    return Limits(app, token)


def serve(home: str | None = None, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          read_timeout_s: float = 10.0) -> None:
    """Run the service until interrupted. Off loopback a bearer `token` is required.
    A client gets `read_timeout_s` seconds to send each whole request."""
    import uvicorn

    if host not in LOOPBACK and not token:
        raise ConfigError(f"--host {host} exposes the store beyond this machine; pass --token SECRET "
                          f"(clients send Authorization: Bearer SECRET), or keep --host 127.0.0.1")
    if not read_timeout_s > 0:
        raise ConfigError(f"--read-timeout must be positive, got {read_timeout_s}")
    # No limit_concurrency: over it uvicorn answers 503 even to /healthz, and idle or stalled
    # connections cost an asyncio loop little; the read deadline closes stalled ones.
    uvicorn.run(create_app(home, token), host=host, port=port, log_level="warning",
                http=deadline_protocol(read_timeout_s), timeout_keep_alive=5,
                h11_max_incomplete_event_size=64 * 1024)


__all__ = ["Service", "Limits", "create_app", "serve", "status_of", "check_text", "deadline_protocol"]
