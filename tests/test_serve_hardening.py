"""`actcache serve` in front of other people: damaged indexes while served, bounded
work (lanes, queue, deadline), the strict contract (OpenAPI-validated answers),
the Host check and token rules, and the vector-search options against numpy.
Servers run on 127.0.0.1 at a free port, started and stopped here."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO_ROOT
from test_serve import _free_port, _post, _start, _stop, serve_build


pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

ARR = {"component": "mlp", "layer": 2, "mask": "isolated"}
TOKEN = "a-long-enough-token-0123"


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harden")
    return serve_build(tiny_model_dir, tmp), tmp


@pytest.fixture(scope="module")
def server(built):
    st, _ = built
    proc, url = _start(st.home)
    yield st, url, proc
    _stop(proc)


def _get(url, path, headers=None):
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _request(url, method, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


# --------------------------------------------------------------------------- damaged indexes


def _damage(path, how, other):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "random":
        n = os.path.getsize(path)
        with open(path, "r+b") as f:  # in place: the same inode, as a careless tool would write it
            f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    else:  # swapped: another array's index (and sidecar) renamed over this one
        for suffix in ("", ".json"):
            shutil.copy(str(other) + suffix, str(path) + suffix + ".tmp")
            os.replace(str(path) + suffix + ".tmp", str(path) + suffix)


@pytest.mark.parametrize("how", ["truncate", "random", "swap"])
def test_damaged_index_while_served_gives_503_or_correct_answers(server, how):
    from actcache.store import ArrayId

    st, url, proc = server
    body = {"ids": [str(i) for i in st.ids[st.eval_rows]], **ARR, "k": 3}
    code, ref = _post(url, f"/v1/builds/{st.key}/neighbors", body)
    assert code == 200 and all(r["neighbors"] for r in ref)
    _post(url, f"/v1/builds/{st.key}/neighbors", {**body, "layer": 1})  # the other array's index exists
    path = st.index_path(ArrayId("mlp", 2, "mean", "isolated"))
    _damage(path, how, st.index_path(ArrayId("mlp", 1, "mean", "isolated")))
    for _ in range(3):
        code, got = _post(url, f"/v1/builds/{st.key}/neighbors", body)
        assert proc.poll() is None  # never a crash
        assert code == 503 or (code == 200 and got == ref), (code, got)
    # rebuilt (by the CLI, as a user would): correct answers, no restart
    subprocess.run([sys.executable, "-m", "actcache", "query", st.key, "--component", "mlp", "--layer", "2",
                    "--mask", "isolated", "--out", os.devnull, "--store", str(st.home)], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    code, got = _post(url, f"/v1/builds/{st.key}/neighbors", body)
    assert code == 200 and got == ref


# --------------------------------------------------------------------------- bounded work (in-process server)


class InProcess:
    """The app under uvicorn on a thread (127.0.0.1, a free port), with the model
    lane's forward pass held until `release()`: the lanes' behaviour is then
    exact, not timed."""

    def __init__(self, home, monkeypatch, **limits):
        import uvicorn

        import actcache.service as service
        from actcache.serve import create_app
        from actcache.service import ServeLimits

        self.gate, self.entered = threading.Event(), threading.Event()
        real = service.encode_texts

        def held(*a, **k):
            self.entered.set()
            self.gate.wait(60)
            return real(*a, **k)

        monkeypatch.setattr(service, "encode_texts", held)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(str(home), limits=ServeLimits(**limits)),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def release(self):
        self.gate.set()

    def stop(self):
        self.gate.set()
        self.server.should_exit = True
        self.thread.join(10)


def _in_thread(fn, *a):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*a)), daemon=True)
    t.start()
    return t, out


def test_id_lookups_never_wait_behind_a_forward_pass(built, monkeypatch):
    st, _ = built
    srv = InProcess(st.home, monkeypatch)
    try:
        path = f"/v1/builds/{st.key}/neighbors"
        t, out = _in_thread(_post, srv.url, path, {"texts": [f"new text {i}" for i in range(200)], **ARR})
        assert srv.entered.wait(30)  # the model lane is inside its forward pass, held
        for i in st.ids[st.eval_rows]:
            code, recs = _post(srv.url, path, {"ids": [str(i)], **ARR, "k": 2})
            assert code == 200 and recs[0]["test_id"] == str(i)
        assert "r" not in out  # every lookup answered while the texts request still waits
        srv.release()
        t.join(60)
        assert out["r"][0] == 200 and len(out["r"][1]) == 200
    finally:
        srv.stop()


def test_a_full_queue_is_429_and_a_late_request_503_with_retry_after(built, monkeypatch):
    st, _ = built
    srv = InProcess(st.home, monkeypatch, queue=1, deadline_s=3.0)
    try:
        path = f"/v1/builds/{st.key}/neighbors"
        t1, out1 = _in_thread(_post, srv.url, path, {"texts": ["first"], **ARR})
        assert srv.entered.wait(30)  # job 1 holds the model lane
        t2, out2 = _in_thread(_request, srv.url, "POST", path, {"texts": ["second"], **ARR})
        time.sleep(0.3)  # job 2 waits in the (one-place) queue
        code, headers, body = _request(srv.url, "POST", path, {"texts": ["third"], **ARR})
        assert code == 429 and int(headers["retry-after"]) >= 1 and "queue" in json.loads(body)["error"]
        code, _, _ = _request(srv.url, "POST", path, {"ids": [str(st.ids[st.eval_rows][0])], **ARR})
        assert code == 200  # the lookup lane has its own queue
        _, ready_headers, ready = _get(srv.url, "/readyz")
        assert json.loads(ready)["lanes"]["model"]["ready"] is False
        t1.join(10)
        t2.join(10)
        assert out1["r"][0] == 503 and "deadline" in out1["r"][1]["error"]  # held past its 3 s
        assert out2["r"][0] == 503 and "retry-after" in out2["r"][1]
    finally:
        srv.stop()
    assert not srv.thread.is_alive()


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("body,msg", [
    ({"filterz": {"labels": [1]}}, "filterz"),
    ({"top_k": 3}, "top_k"),
    ({"vector": [0.1]}, "vector"),
    ({"k": "4"}, "k"),
    ({"k": True}, "k"),
    ({"layer": 2.0}, "layer"),
    ({"balanced": 1}, "balanced"),
    ({"filter": {"label": [1]}}, "filter.label"),
    ({"ids": ["0"] * 1025}, "at most 1024"),
    ({"jsonl": ["[" * 1000 + "]" * 1000]}, "nested too deeply"),
])
def test_unknown_fields_wrong_types_and_deep_nesting_are_422(server, body, msg):
    st, url, proc = server
    code, doc = _post(url, f"/v1/builds/{st.key}/neighbors", {**ARR, **body})
    assert code in (400, 422) and msg in doc["error"], doc
    assert code == 422 or "nested" in msg
    assert proc.poll() is None


def test_deeply_nested_bodies_are_4xx(server):
    st, url, proc = server
    for raw in (b'{"ids": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                ('{"inputs": [' + '{"a":' * 3000 + "1" + "}" * 3000 + "]}").encode()):
        code, doc = _post(url, f"/v1/builds/{st.key}/neighbors", None, raw=raw)
        assert 400 <= code < 500, doc
    assert proc.poll() is None


def _validate(openapi: dict, path: str, method: str, status: int, doc) -> None:
    op = openapi["paths"][path][method]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": openapi["components"]}).validate(doc)


def test_every_answer_validates_against_the_published_schema(server):
    st, url, _ = server
    code, _, raw = _get(url, "/openapi.json")
    api = json.loads(raw)
    nb, sel = "/v1/builds/{key}/neighbors", "/v1/builds/{key}/select"
    eval_ids = [str(i) for i in st.ids[st.eval_rows]]
    vec = st.acts("mlp", 2, "mean", "isolated", "eval")[:2].tolist()
    cases = [
        ("get", "/healthz", "/healthz", None, 200),
        ("get", "/readyz", "/readyz", None, 200),
        ("get", "/v1/builds", "/v1/builds", None, 200),
        ("get", "/v1/builds/{key}", f"/v1/builds/{st.key}", None, 200),
        ("get", "/v1/builds/{key}", "/v1/builds/abcdef0123", None, 404),
        ("post", nb, f"/v1/builds/{st.key}/neighbors", {"ids": eval_ids, **ARR}, 200),
        ("post", nb, f"/v1/builds/{st.key}/neighbors", {"texts": ["a new one"], **ARR, "fields": ["neighbors"]}, 200),
        ("post", nb, f"/v1/builds/{st.key}/neighbors", {"vectors": vec, **ARR, "filter": {"labels": [1]}}, 200),
        ("post", nb, f"/v1/builds/{st.key}/neighbors", {"k": "4"}, 422),
        ("post", nb, f"/v1/builds/{st.key}/neighbors", {"layer": 9, "mask": "isolated"}, 400),
        ("post", sel, f"/v1/builds/{st.key}/select", {"strategy": "random", "budget": 3}, 200),
        ("post", sel, f"/v1/builds/{st.key}/select", {"strategy": "knn", "k": 2, **ARR}, 200),
    ]
    for method, tpl, path, body, status in cases:
        code, _, raw = _request(url, method.upper(), path, body)
        assert code == status, (path, raw)
        _validate(api, tpl, method, status, json.loads(raw))
    for tpl, ops in api["paths"].items():  # every error status is documented with the one error shape
        for method, op in ops.items():
            if tpl.startswith("/v1/builds/{key}/"):
                assert {"400", "401", "404", "413", "422", "429", "503"} <= set(op["responses"]), (tpl, method)
                assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")


def test_docs_are_served_from_local_files(server):
    import re

    _, url, _ = server
    code, _, html = _get(url, "/docs")
    assert code == 200
    refs = re.findall(rb'(?:src|href)=["\']([^"\']+)', html) + re.findall(rb"url: ?'([^']+)'", html)
    assert refs and not [r for r in refs if r.startswith(b"http")], refs
    for r in re.findall(rb'(?:src|href)=["\']([^"\']+)', html):
        c, _, asset = _get(url, r.decode())
        assert c == 200 and len(asset) > 1000, r


def test_no_absolute_paths_in_answers(server):
    st, url, _ = server
    root = str(st.home.parent.parent)
    for path in ("/v1/builds", f"/v1/builds/{st.key}", "/v1/builds/abcdef0123"):
        _, _, raw = _get(url, path)
        assert root.encode() not in raw and b'"/' not in raw, raw[:400]


def test_request_ids_metrics_readiness_and_gzip(server):
    st, url, _ = server
    code, headers, body = _request(url, "POST", f"/v1/builds/{st.key}/neighbors", {"k": "4"},
                                   headers={"X-Request-ID": "abc-123"})
    assert code == 422 and headers["x-request-id"] == "abc-123" and json.loads(body)["request_id"] == "abc-123"
    assert len(_get(url, "/healthz")[1]["x-request-id"]) == 16  # one is made when none is sent
    code, _, body = _get(url, "/readyz")
    assert code == 200 and set(json.loads(body)["lanes"]) == {"lookup", "model"}
    code, _, body = _get(url, "/metrics")
    text = body.decode()
    assert code == 200 and 'route="/v1/builds/{key}/neighbors"' in text and 'status="422"' in text
    assert 'actcache_queue_depth{lane="model"}' in text and "actcache_forward_batches" in text
    ids = [str(i) for i in st.ids[st.eval_rows]]
    code, headers, body = _request(url, "POST", f"/v1/builds/{st.key}/neighbors", {"ids": ids, **ARR},
                                   headers={"Accept-Encoding": "gzip"})
    assert code == 200 and headers.get("content-encoding") == "gzip" and json.loads(gzip.decompress(body))


# --------------------------------------------------------------------------- security


def test_wrong_host_is_refused(server):
    st, url, _ = server
    port = url.rsplit(":", 1)[1]
    code, _, body = _get(url, "/v1/builds", headers={"Host": f"evil.example:{port}"})
    assert code == 400 and b"--allow-host" in body
    assert _get(url, "/v1/builds", headers={"Host": f"localhost:{port}"})[0] == 200


def test_token_rules_and_bearer_challenge(built):
    st, _ = built
    for bad in ("short", " " * 20, "has a space in the middle ok"):
        r = subprocess.run([sys.executable, "-m", "actcache", "serve", "--token", bad, "--store", str(st.home),
                            "--port", str(_free_port())], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "at least 16" in r.stderr and "Traceback" not in r.stderr
        assert "actcache serve on" not in r.stderr  # no banner for a refused start
    r = subprocess.run([sys.executable, "-m", "actcache", "serve", "--host", "0.0.0.0", "--store", str(st.home)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--token" in r.stderr.split("e.g.")[1]  # a generated token is offered
    proc, url = _start(st.home, "--token", TOKEN)
    try:
        code, headers, _ = _get(url, "/v1/builds")
        assert code == 401 and headers["www-authenticate"].startswith("Bearer")
        assert _get(url, "/v1/builds", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
        assert _get(url, "/v1/builds", headers={"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        api = json.loads(_get(url, "/openapi.json")[2])
        assert api["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert api["paths"]["/v1/builds"]["get"]["security"] == [{"bearer": []}]
    finally:
        _stop(proc)


def test_banner_only_after_a_successful_bind(built):
    import socket

    st, _ = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "actcache", "serve", "--store", str(st.home), "--port", str(port)],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot listen" in r.stderr and "actcache serve on" not in r.stderr


# --------------------------------------------------------------------------- the search options against numpy


def _numpy_neighbors(P, pool_ids, pool_labels, q, k, labels=None, offset=0, min_score=None):
    Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
    s = Pn.astype(np.float64) @ (q / np.linalg.norm(q)).astype(np.float64)
    order = [i for i in np.argsort(-s, kind="stable") if labels is None or pool_labels[i] in labels]
    out = [(pool_ids[i], s[i]) for i in order[offset:offset + k]]
    return [(i, v) for i, v in out if min_score is None or v >= min_score]


def test_filters_and_vector_queries_equal_numpy(server):
    st, url, _ = server
    P = st.acts("mlp", 2, "mean", "isolated", "pool")
    pool_ids = [str(i) for i in st.ids[st.pool_rows]]
    pool_labels = [int(x) for x in st.labels[st.pool_rows]]
    rng = np.random.default_rng(1)
    Q = rng.normal(size=(3, P.shape[1]))
    for extra, ref_kw in [({}, {}), ({"filter": {"labels": [0]}}, {"labels": {0}}),
                          ({"offset": 2}, {"offset": 2}), ({"min_score": 0.0}, {"min_score": 0.0})]:
        code, recs = _post(url, f"/v1/builds/{st.key}/neighbors", {"vectors": Q.tolist(), **ARR, "k": 3, **extra})
        assert code == 200, recs
        for q, rec in zip(Q, recs):
            ref = _numpy_neighbors(P, pool_ids, pool_labels, q, 3, **ref_kw)
            assert [n["id"] for n in rec["neighbors"]] == [i for i, _ in ref], extra
            np.testing.assert_allclose([n["score"] for n in rec["neighbors"]], [v for _, v in ref], atol=1e-5)
    code, doc = _post(url, f"/v1/builds/{st.key}/neighbors", {"vectors": [[0.1, 0.2]], **ARR})
    assert code == 400 and "d=2" in doc["error"]
