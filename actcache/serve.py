"""`actcache serve`: the retrieval of `actcache query` and `select` as a local
HTTP service (FastAPI + uvicorn), for harnesses and notebooks that want
demonstrations per input without paying a process start, a model load and an
index load each time. The work itself is `service.Service`; this module is
the HTTP around it: routes under `/v1/`, request and response models (the
OpenAPI schema at /openapi.json, docs at /docs served from local files), and
a gate in front of every request (allowed Host names, the bearer token, the
body cap, a request id, the access log and the metrics at /metrics).

What the service writes to the store: an index the first time an array is
queried (or when its file is damaged or stale, rebuilt as `query` would), the
query cache of new texts' vectors, and lock files beside both. Nothing else.
"""


import asyncio
import hmac
import logging
import re
import secrets
import time
import uuid

from .errors import ActcacheError, BusyError, ConfigError, CorruptStoreError, DatasetError, MismatchError, StoreError
from .extras import require

require("serve", "actcache serve")  # before .api, which imports pydantic: a clear message instead of ImportError

from .api import Error, Health, Ready, BuildRow, NeighborsRecord, SelectRecord, check_text, request_models
from .query import QueryConfig
from .select import STRATEGIES
from .service import Service, ServeLimits
from .store import list_builds

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_BODY = 1 << 20  # bytes per request (body, and separately the request head)
MIN_TOKEN = 16  # characters of a bearer token
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json")  # no token needed
DOCS_ASSETS = "/docs-assets"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ACCESS_LOG = logging.getLogger("actcache.serve.access")
ERROR_STATUSES = {400: "Bad request: an option or input the build cannot take (the message says which), "
                       "or a Host header the server does not answer for.",
                  401: "Missing or wrong bearer token.",
                  404: "No such build or route.",
                  409: "An artifact does not belong to the build (e.g. an index of other vectors).",
                  413: "Request body over the server's cap.",
                  422: "Invalid request: unknown field, wrong type, or over a per-request limit.",
                  429: "The lane's queue is full; retry after `Retry-After` seconds.",
                  503: "Damaged store file, or the request ran past the server's deadline; `Retry-After` "
                       "is set for the latter."}


def status_of(e: BaseException) -> int:
    """The HTTP status of a library error: the one place errors map to codes."""
    if isinstance(e, BusyError):
        return 429 if e.queue_full else 503
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


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"():,/]+/)+([^\s'\"():,/]+)")


def redact(value):
    """`value` with every absolute path cut to its last component: answers and
    error messages never show where the store, models or data live."""
    if isinstance(value, str):
        return _ABS_PATH.sub(r"\1", value)
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    return value


def error_body(msg: str, request_id: str | None = None) -> bytes:
    """The JSON error document (`Error`), ASCII-escaped so that any message can be sent."""
    import json

    doc = {"error": redact(msg)}
    if request_id:
        doc["request_id"] = request_id
    return json.dumps(doc).encode()


def check_token(host: str, token: str | None) -> None:
    """ConfigError unless `token` is usable: at least MIN_TOKEN characters with
    no whitespace, and given whenever `host` is not loopback."""
    offer = f"e.g. --token {secrets.token_urlsafe(24)} (clients send Authorization: Bearer <token>)"
    if token is not None and (len(token) < MIN_TOKEN or any(c.isspace() for c in token)):
        raise ConfigError(f"--token must be at least {MIN_TOKEN} characters with no whitespace; {offer}")
    if host not in LOOPBACK and not token:
        raise ConfigError(f"--host {host} exposes the store beyond this machine; pass a --token, {offer}, "
                          f"or keep --host 127.0.0.1")


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port ("[::1]:80" -> "::1")."""
    h = header.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Gate:
    """ASGI wrapper in front of the app, for every request: a request id (the
    client's `X-Request-ID` if well formed, else a new one; echoed), the Host
    check (DNS rebinding), the bearer token (every route but OPEN_PATHS), the
    body cap counted on the bytes actually received (a chunked upload with no
    Content-Length is cut off at `max_body` too), metrics and the access log."""

    def __init__(self, app, metrics, token: str | None = None, hosts=LOOPBACK, max_body: int = MAX_BODY):
        self.app, self.metrics, self.token = app, metrics, token
        self.expected = bytes(token, "utf-8") if token else b""
        self.state = app.state
        self.hosts = None if "*" in hosts else {h.lower() for h in hosts}
        self.max_body = max_body
        self.too_big = f"request body over {max_body} bytes; send fewer or shorter inputs"

    def _refusal(self, scope, headers: dict) -> tuple[int, str, list] | None:
        if self.hosts is not None and host_name(headers.get(b"host", b"")) not in self.hosts:
            return 400, ("the Host header names no host this server answers for; use http://127.0.0.1:<port>, "
                         "or start it with --allow-host NAME"), []
        path = scope.get("path", "")
        if self.token is not None and path not in OPEN_PATHS and not path.startswith(DOCS_ASSETS):
            scheme, _, cred = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(cred.strip(), self.expected):
                return (401, "missing or wrong bearer token; send Authorization: Bearer <token>",
                        [(b"www-authenticate", b'Bearer realm="actcache"')])
        n = headers.get(b"content-length")
        if n is not None and (not n.isdigit() or int(n) > self.max_body):
            return 413, self.too_big, []
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or ())
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID_RE.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = [500]

        async def tagged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            await send(msg)

        refusal = self._refusal(scope, headers)
        try:
            if refusal is not None:
                await self._refuse(tagged, *refusal, rid)
            else:
                await self.app(scope, self._counted(receive), tagged)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched" if refusal is None else "refused")
            dt = time.perf_counter() - t0
            self.metrics.observe(route, scope.get("method", ""), status[0], dt)
            ACCESS_LOG.info("%s %s %s %s %d %.1fms", rid, (scope.get("client") or ("-",))[0], scope.get("method"),
                            scope.get("path"), status[0], dt * 1000)

    def _counted(self, receive):
        from starlette.exceptions import HTTPException

        got = 0

        async def counted():
            nonlocal got
            msg = await receive()
            if msg.get("type") == "http.request":
                got += len(msg.get("body", b""))
                if got > self.max_body:
                    # An HTTPException is what FastAPI lets through from reading the body.
                    raise HTTPException(413, self.too_big)
            return msg

        return counted

    @staticmethod
    async def _refuse(send, status: int, msg: str, extra: list, rid: str) -> None:
        body = error_body(msg, rid)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *extra]})
        await send({"type": "http.response.body", "body": body})


class Metrics:
    """Prometheus metrics of one app (its own registry): requests by route,
    method and status, latency by route, each lane's queue depth, forward batches."""

    def __init__(self, svc: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("actcache_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("actcache_request_seconds", "Seconds from request to answer, by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        depth = Gauge("actcache_queue_depth", "Jobs waiting per lane", ["lane"], registry=self.registry)
        for name, lane in svc.lanes.items():
            depth.labels(name).set_function(lane.q.qsize)
        batches = Gauge("actcache_forward_batches", "Forward batches run since start", registry=self.registry)
        batches.set_function(lambda: svc.forward_batches)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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


def _error_handlers(app, err) -> None:
    """Every error becomes one JSON line (`Error`) with its status: library
    errors by `status_of`, HTTP and validation errors by theirs, anything else 500."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(Exception)
    async def last_resort(request, e: Exception):  # pragma: no cover - never expected; one line, no traceback
        return err(request, 500, f"internal error: {type(e).__name__}: {str(e)[:200]}")

    @app.exception_handler(RecursionError)
    async def too_deep(request, e: RecursionError):
        return err(request, 422, "invalid request: JSON nested too deeply; send flat objects")

    @app.exception_handler(ActcacheError)
    async def actcache_error(request, e: ActcacheError):
        extra = {"Retry-After": str(e.retry_after)} if isinstance(e, BusyError) else None
        return err(request, status_of(e), str(e), extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return err(request, e.status_code, f"{e.detail}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return err(request, 422, f"invalid request: {where + ': ' if where else ''}"
                                 f"{first.get('msg', 'malformed JSON')}")


def _texts_payload(req, cfg: QueryConfig) -> dict:
    """The service job for new inputs of a neighbors request: its lines, as the
    CLI's --input would give them, whether they are JSONL, and the name messages use."""
    import json

    if req.texts is not None:
        if any(not t.strip() for t in req.texts):
            raise DatasetError("every text must be non-empty")
        return {"cfg": cfg, "lines": [t.replace("\n", " ") for t in req.texts], "jsonl": False,
                "name": "the request"}
    if req.inputs is not None:
        return {"cfg": cfg, "lines": [json.dumps(o, ensure_ascii=False) for o in req.inputs], "jsonl": True,
                "name": "the request"}
    return {"cfg": cfg, "lines": req.jsonl, "jsonl": True, "name": req.source}


def _openapi(app, token: bool):
    """The app's OpenAPI document, with the bearer scheme declared when a token is required."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if token:
                doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in doc["paths"].items():
                    if path not in OPEN_PATHS:
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def _responses(*codes: int) -> dict:
    return {c: {"model": Error, "description": ERROR_STATUSES[c]} for c in codes}


class _Versioned:
    """Registers each API route at /v1/<path>, and at /<path> as an alias hidden from the schema."""

    def __init__(self, app):
        self.app = app

    def _add(self, method: str, path: str, **kw):
        def register(fn):
            self.app.add_api_route("/v1" + path, fn, methods=[method], **kw)
            self.app.add_api_route(path, fn, methods=[method], include_in_schema=False, **kw)
            return fn

        return register

    def get(self, path: str, **kw):
        return self._add("GET", path, **kw)

    def post(self, path: str, **kw):
        return self._add("POST", path, **kw)


def _routes(app, svc: Service, limits: ServeLimits, home: str | None) -> None:
    """The API's routes, at /v1/<path> and (aliases, hidden from the schema) at /<path>."""
    import json

    from fastapi import Body
    from fastapi.responses import Response

    Neighbors, Select = request_models(limits)
    router = _Versioned(app)
    common = (400, 401, 404, 409, 413, 422, 429, 503)

    def raw_json(obj) -> Response:
        # The records are plain JSON already; skip FastAPI's per-field encoder.
        return Response(json.dumps(obj, ensure_ascii=False).encode(), media_type="application/json")

    async def answer(job):
        try:
            return raw_json(await asyncio.wait_for(asyncio.wrap_future(job.future),
                                                   max(0.0, job.deadline - time.monotonic())))
        except asyncio.TimeoutError:
            raise BusyError(f"the request did not finish within the server's deadline of {limits.deadline_s:g} s; "
                            f"send less work per request or retry later", retry_after=5) from None

    @router.get("/builds", response_model=list[BuildRow], responses=_responses(401))
    async def builds():
        """Every build of the store (as `actcache ls --json`)."""
        rows = await asyncio.to_thread(list_builds, home)
        return raw_json(redact([{k: v for k, v in r.items() if k not in ("provenance", "config")} for r in rows]))

    @router.get("/builds/{key}", response_model=dict, responses=_responses(400, 401, 404, 503))
    async def build_info(key: str):
        """One build (as `actcache info`): key, unique prefix or 'last'."""
        st = await asyncio.to_thread(svc.store, key)
        return raw_json(redact(json.loads(json.dumps(st.info(), default=str))))

    @router.post("/builds/{key}/neighbors", response_model=list[NeighborsRecord], responses=_responses(*common))
    async def neighbors(key: str, req: Neighbors = Body(...)):
        """The k nearest pool examples of each input: eval ids, new texts, JSON inputs or raw vectors;
        optionally filtered, paged (offset), thresholded (min_score) and cut to some fields."""
        new = [x for x in (req.texts, req.inputs, req.jsonl) if x is not None]
        if len(new) + (req.ids is not None) + (req.vectors is not None) > 1:
            raise ConfigError("give one of ids, texts, inputs, jsonl or vectors")
        f = req.filter
        cfg = QueryConfig(key=key, component=req.component, layer=req.layer, pooling=req.pooling, mask=req.mask,
                          k=req.k, balanced=req.balanced, exclude_self=req.exclude_self,
                          source=req.source if new else "eval", text_field=req.text_field,
                          labels=f and f.labels, ids=f and f.ids, exclude_ids=tuple(f.exclude_ids or ()) if f else (),
                          min_score=req.min_score, offset=req.offset, fields=req.fields)
        if new:
            if not new[0]:
                raise DatasetError("the input list is empty; give at least one text")
            job = svc.submit(key, "texts", _texts_payload(req, cfg))  # cheap once the build is open: no thread hop
        elif req.vectors is not None:
            job = svc.submit(key, "vectors", {"cfg": cfg, "vectors": req.vectors})
        else:
            job = svc.submit(key, "ids", {"cfg": cfg, "ids": req.ids})
        return await answer(job)

    @router.post("/builds/{key}/select", response_model=list[SelectRecord], responses=_responses(*common))
    async def select_route(key: str, req: Select = Body(...)):
        """Run a registered selection strategy (the options of `actcache query --strategy`); strategies
        that run the build's model (vote-k) use the model lane."""
        st = STRATEGIES.get(req.strategy)
        if st is None:
            raise ConfigError(f"unknown strategy {req.strategy!r}; choose from {sorted(STRATEGIES)}")
        opts = st.pick({n: getattr(req, n) for n in ("component", "layer", "pooling", "mask", "balanced",
                                                       "exclude_self", "stat", "order", "feature", "sae")})
        job = await asyncio.to_thread(svc.submit, key, "select", {"strategy": req.strategy, "budget": req.budget,
                                                                   "k": req.k, "seed": req.seed, "opts": opts})
        return await answer(job)


def create_app(home: str | None = None, token: str | None = None, window_s: float = 0.01,
               limits: ServeLimits | None = None, hosts=LOOPBACK, threads: int | None = None,
               device: str | None = None):
    """The ASGI app over the store at `home`: the API under /v1 (and at the same
    paths without it, kept as aliases), /healthz, /readyz, /metrics, /docs. With
    `token`, every route but OPEN_PATHS needs `Authorization: Bearer <token>`;
    requests whose Host header names none of `hosts` ("*": any) are refused."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from fastapi_offline import FastAPIOffline
    from starlette.middleware.gzip import GZipMiddleware

    limits = (limits or ServeLimits()).check()
    svc = Service(home, limits, window_s=window_s, threads=threads, device=device)
    app: FastAPI = FastAPIOffline(
        title="actcache", version="1", redoc_url=None, static_url=DOCS_ASSETS,
        description="Nearest demonstrations and selection strategies over cached activation builds. Records are "
                    "those of `actcache query` (JSONL), one per input. Every error is one JSON object `Error`.")
    app.state.service = svc
    metrics = Metrics(svc)

    def err(request, status: int, msg: str, headers: dict | None = None) -> Response:
        rid = request.scope.get("state", {}).get("request_id")
        return Response(error_body(msg, rid), status_code=status, media_type="application/json", headers=headers)

    _error_handlers(app, err)
    _routes(app, svc, limits, home)

    @app.get("/healthz", response_model=Health)
    async def healthz():
        """Liveness, and the forward batches this server has run (0 while every text is cached)."""
        return {"ok": True, "forward_batches": svc.forward_batches}

    @app.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "A lane is full."}})
    async def readyz(request: Request):
        """Whether each lane (lookup: ids and stored arrays; model: new texts and vote-k) can take a request now."""
        lanes = svc.ready()
        ok = all(v["ready"] for v in lanes.values())
        return Response(Ready(ready=ok, lanes=lanes).model_dump_json(), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/metrics", response_class=Response, responses=_responses(401))
    async def metrics_route():
        """Prometheus metrics: requests by route and status, latency, queue depth per lane, forward batches."""
        body, ctype = metrics.text()
        return Response(body, media_type=ctype)

    app.openapi = _openapi(app, token is not None)
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    return Gate(app, metrics, token, hosts)


def serve(home: str | None = None, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          read_timeout_s: float = 10.0, limits: ServeLimits | None = None, allow_hosts=(),
          on_ready=None, threads: int | None = None, device: str | None = None) -> None:
    """Run the service until interrupted. Off loopback a bearer `token` is
    required. A client gets `read_timeout_s` seconds to send each whole request.
    Requests must name this server in their Host header: a loopback name, `host`,
    or one of `allow_hosts` ("*": any). `on_ready(url)` is called once the port is bound.
    `threads`: the forward pass's threads (None: $ACTCACHE_THREADS, else every core)."""
    import socket

    import uvicorn

    check_token(host, token)
    if not read_timeout_s > 0:
        raise ConfigError(f"--read-timeout must be positive, got {read_timeout_s}")
    hosts = (*LOOPBACK, *([host] if host not in ("0.0.0.0", "::") else []), *allow_hosts)
    app = create_app(home, token, limits=limits, hosts=hosts, threads=threads, device=device)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    # No limit_concurrency: over it uvicorn answers 503 even to /healthz, and idle or stalled
    # connections cost an asyncio loop little; the read deadline closes stalled ones.
    config = uvicorn.Config(app, log_level="warning", http=deadline_protocol(read_timeout_s), timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024)
    if on_ready is not None:
        on_ready(f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}")
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["Gate", "Metrics", "create_app", "serve", "status_of", "check_text", "check_token", "redact",
           "deadline_protocol", "MAX_BODY"]
