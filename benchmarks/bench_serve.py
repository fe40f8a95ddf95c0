"""`actcache serve` throughput and latency, on loopback only, bounded in requests and time.

For id queries (eval rows) and new-text queries at 1, 8 and 32 concurrent
clients: requests/s and p50/p99 latency, plus the same work done by calling the
CLI per request and by one in-process `query()` per request, measured in the
same run. `--faults N` sends N malformed or hostile requests and checks the
server still answers /healthz, with no 5xx and nothing written outside the
query cache. One JSON line per measurement.

    python benchmarks/bench_serve.py                     # default model, a 200-row build
    python benchmarks/bench_serve.py --model tiny        # a tiny random Llama (fast)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def emit(**kw) -> None:
    from actcache.models import hardware

    print(json.dumps({**kw, "hardware": hardware()}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(d: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    m = make_model("llama", len(tok))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def make_build(home: Path, model: str, limit: int):
    from actcache.builder import BuildConfig, build
    from actcache.data import DataSpec
    from actcache.models import ModelSpec

    return build(BuildConfig(model=ModelSpec(model), data=DataSpec(task="sst2", pool_limit=limit, eval_limit=limit),
                             layers="-1", components=("mlp",), masks=("label-masked", "isolated"),
                             home=str(home)))


class Conn:
    """One keep-alive HTTP connection (one per client thread)."""

    def __init__(self, port: int):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = self.c.getresponse()
        return r.status, r.read()


def load(port: int, path: str, bodies: list[bytes], clients: int, max_s: float) -> dict:
    """Send `bodies` from `clients` threads (each takes the next body), at most `max_s` seconds."""
    lat: list[float] = []
    codes: list[int] = []
    it = iter(bodies)
    lock = threading.Lock()
    t_end = time.monotonic() + max_s

    def worker():
        conn = Conn(port)
        while time.monotonic() < t_end:
            with lock:
                b = next(it, None)
            if b is None:
                return
            t = time.perf_counter()
            code, _ = conn.post(path, b)
            with lock:
                lat.append(time.perf_counter() - t)
                codes.append(code)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "rps": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
            "non_200": sum(c != 200 for c in codes)}


def cli_per_request(home: Path, key: str, arg_sets: list[list[str]]) -> float:
    """Median seconds of `actcache query` run as a new process per request (one per argument set)."""
    times = []
    for args in arg_sets:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "actcache", "query", key, *args, "--out", os.devnull,
                        "--store", str(home)], check=True, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inproc_per_request(home: Path, key: str, sources: list[str]) -> float:
    """Median seconds of one in-process `query()` call per request (store, index and model opened each time)."""
    from actcache.query import QueryConfig, query

    times = []
    for src in sources:
        t = time.perf_counter()
        query(QueryConfig(key=key, home=str(home), k=4, source=src))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_ceiling(home: Path, key: str, n: int = 32, reps: int = 3) -> dict:
    """What batching alone can give: texts/s of in-process `encode_texts` for one
    text at a time and for `n` texts in one forward batch (the service's batch
    size), same model and array, median of `reps`. The service's coalescing
    ratio cannot exceed this ratio by more than its per-request overheads."""
    from actcache.query import QueryConfig, encode_texts
    from actcache.service import FORWARD_ROWS
    from actcache.store import ArrayId, Store, find_build

    st = Store(find_build(key, str(home)))
    c = QueryConfig(key=key)
    a = ArrayId(c.component, st.layers[-1], c.pooling, c.mask)
    lm = st.load_model()
    rate = {}
    for size in (1, n):
        ts = []
        for r in range(reps + 1):
            texts = [f"ceiling text {size}-{r}-{i}, {random.random()}" for i in range(size)]
            t = time.perf_counter()
            encode_texts(st, texts, a.component, a.layer, a.pooling, a.mask, lm=lm, batch_size=FORWARD_ROWS)
            ts.append(time.perf_counter() - t)
        rate[size] = size / statistics.median(ts[1:])  # the first call warms up
    return {"texts_per_s_1": round(rate[1], 1), f"texts_per_s_{n}": round(rate[n], 1),
            f"ceiling_{n}_over_1": round(rate[n] / rate[1], 2)}


def _raw(port: int, head: bytes, chunks=(), timeout: float = 30) -> int | str:
    """Send a hand-made request (head, then body chunks); the status, or "closed"
    when the server cut the connection (what it does to an oversize head or upload)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(head)
            for c in chunks:
                s.sendall(c)
            line = s.makefile("rb").readline()
        return int(line.split()[1]) if line.startswith(b"HTTP/") else "closed"
    except OSError:
        return "closed"


def faults(port: int, n: int, key: str, stalled: int = 50, read_timeout_s: float = 10.0) -> dict:
    """Send n malformed or hostile requests (one at a time), with `stalled` clients
    holding half-sent requests meanwhile; report the status codes, whether
    /healthz answered throughout and after, and whether the stalled connections
    were closed once their read deadline passed."""
    rng = random.Random(0)
    nb = f"/v1/builds/{key}/neighbors"
    mb = b"x" * (1 << 20)
    chunked = (f"POST {nb} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n").encode()
    bad = [
        lambda: ("POST", nb, b"{not json"),
        lambda: ("POST", nb, json.dumps({"k": 10**9}).encode()),
        lambda: ("POST", "/builds/..%2F..%2Fetc%2Fpasswd/neighbors", b"{}"),
        lambda: ("POST", "/builds/../../etc/passwd/neighbors", b"{}"),
        lambda: ("POST", nb, b"x" * (10 << 20)),
        lambda: ("POST", nb, json.dumps({"texts": [""] * 3}).encode()),
        lambda: ("POST", nb, json.dumps({"layer": 10**6}).encode()),
        lambda: ("POST", f"/v1/builds/{key}/select", json.dumps({"strategy": "rm -rf /"}).encode()),
        lambda: ("GET", "/builds/%00", b""),
        lambda: ("POST", nb, bytes(rng.getrandbits(8) for _ in range(256))),
        lambda: ("POST", nb, b'{"texts": ["\\ud800"]}'),
        lambda: ("POST", f"/v1/builds/{key}/select", json.dumps({"strategy": "random", "budget": 2, "seed": -1}).encode()),
        lambda: ("POST", nb, json.dumps({"jsonl": ["{bad"]}).encode()),
        lambda: ("RAW", chunked, [b"%x\r\n" % len(mb) + mb + b"\r\n"] * 10 + [b"0\r\n\r\n"]),
        lambda: ("RAW", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * (4 << 20) + b"\r\n\r\n", []),
        lambda: ("POST", nb, json.dumps({"jsonl": ["[" * 1000 + "]" * 1000]}).encode()),
        lambda: ("POST", nb, ('{"inputs": [' + '{"a":' * 2000 + '1' + '}' * 2000 + ']}').encode()),
        lambda: ("POST", nb, b'{"ids": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        lambda: ("POST", nb, json.dumps({"ids": ["0"], "filter": {"label": 1}, "top_k": 3}).encode()),
        lambda: ("POST", nb, json.dumps({"k": "4"}).encode()),
        lambda: ("POST", nb, json.dumps({"k": True}).encode()),
        lambda: ("POST", nb, json.dumps({"ids": [str(i) for i in range(5000)]}).encode()),
        lambda: ("RAW", "GET /v1/builds HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode(), []),
    ]
    held = []
    for _ in range(stalled):  # slow clients: half a request each, then nothing
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(f"POST {nb} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{{".encode())
        held.append(c)
    t_held = time.monotonic()
    codes: dict = {}
    for i in range(n):
        method, path, body = bad[i % len(bad)]()
        if method == "RAW":
            code = _raw(port, path, body)
        else:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request(method, path, body=body or None, headers={"Content-Type": "application/json"})
                code = c.getresponse().status
            except (OSError, http.client.HTTPException):
                code = "closed"  # the server may close a connection sending 10 MB
        codes[code] = codes.get(code, 0) + 1

    def healthy() -> bool:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/healthz")
        return c.getresponse().status == 200

    alive_while_stalled = healthy()
    time.sleep(max(0.0, t_held + read_timeout_s + 1.0 - time.monotonic()))
    still_open = 0
    for c in held:
        c.settimeout(2)
        try:
            still_open += c.recv(1) != b""
        except socket.timeout:
            still_open += 1
        except OSError:
            pass
        c.close()
    return {"codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
            "healthz_while_stalled": alive_while_stalled, "healthz_after": healthy(),
            "stalled_clients": stalled, "stalled_still_open_after_deadline": still_open,
            "n_5xx": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500)}


def _p(lat: list[float], q: float) -> float:
    lat = sorted(lat)
    return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2)


def lookups_under_load(port: int, path: str, eval_ids: list[str], n: int, max_texts: int, text_chars: int) -> dict:
    """Id-lookup latency (n sequential one-id requests) idle, then while another
    client keeps sending maximal new-text requests (`max_texts` fresh texts of
    `text_chars` characters each, so every one runs forward passes)."""
    def lookups() -> list[float]:
        conn, lat = Conn(port), []
        for i in range(n):
            body = json.dumps({"ids": [eval_ids[i % len(eval_ids)]], "k": 4}).encode()
            t = time.perf_counter()
            code, _ = conn.post(path, body)
            lat.append(time.perf_counter() - t)
            assert code == 200, code
        return lat

    idle = lookups()
    stop, sent, codes, took = threading.Event(), [0], [], []

    def flood():
        conn = Conn(port)
        while not stop.is_set():
            word = f"{random.random():.12f} "
            texts = [(f"load {sent[0]}-{i} " + word * text_chars)[:text_chars] for i in range(max_texts)]
            t = time.perf_counter()
            code, _ = conn.post(path, json.dumps({"texts": texts, "k": 4}).encode())
            codes.append(code)
            took.append(time.perf_counter() - t)
            sent[0] += 1

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    time.sleep(1.0)  # the model lane is busy
    busy = lookups()
    stop.set()
    th.join(600)
    return {"lookups": n, "idle_p50_ms": _p(idle, 0.5), "idle_p99_ms": _p(idle, 0.99),
            "busy_p50_ms": _p(busy, 0.5), "busy_p99_ms": _p(busy, 0.99),
            "p99_busy_over_idle": round(_p(busy, 0.99) / _p(idle, 0.99), 2), "goal": 2.0,
            "text_requests": sent[0], "text_request_codes": sorted(set(codes)),
            "text_request_s": [round(x, 1) for x in took],
            "texts_per_request": max_texts, "chars_per_text": text_chars}


def index_faults(port: int, home: Path, key: str, alive, n: int = 20) -> dict:
    """Damage the served index in place (truncated, random bytes) and by rename
    (another array's index), n id requests after each; then rebuild it as the CLI
    would and ask again. Counts crashes, 5xx other than 503, empty 200s and 200s
    that differ from the answer before the damage."""
    import shutil

    import numpy as np

    from actcache.store import ArrayId, Store, find_build

    st = Store(find_build(key, str(home)))
    layer = st.layers[-1]
    path = f"/v1/builds/{key}/neighbors"
    body = json.dumps({"ids": [str(i) for i in st.ids[st.eval_rows][:50]], "k": 4, "layer": layer}).encode()
    conn = Conn(port)
    code, ref = conn.post(path, body)
    assert code == 200
    a = ArrayId("mlp", layer, "mean", "label-masked")
    other = ArrayId("mlp", layer, "mean", "isolated") if "isolated" in st.config["masks"] else None
    out = {"crashes": 0, "other_5xx": 0, "empty_200": 0, "wrong_200": 0, "503": 0, "correct_200": 0}

    def ask(k: int) -> None:
        for _ in range(k):
            try:
                code, got = Conn(port).post(path, body)
            except OSError:
                out["crashes"] += 1
                return
            if not alive():
                out["crashes"] += 1
                return
            if code == 503:
                out["503"] += 1
            elif code >= 500:
                out["other_5xx"] += 1
            elif code == 200 and all(not r["neighbors"] for r in json.loads(got)):
                out["empty_200"] += 1
            elif code == 200:
                out["correct_200" if got == ref else "wrong_200"] += 1

    for how in ("truncate", "random", "swap"):
        f = st.index_path(a)
        if how == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
        elif how == "random":
            size = os.path.getsize(f)
            with open(f, "r+b") as fh:
                fh.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
        elif other is not None:
            st.index(other.component, other.layer, other.pooling, other.mask)
            for suffix in ("", ".json"):
                shutil.copy(str(st.index_path(other)) + suffix, str(f) + suffix + ".tmp")
                os.replace(str(f) + suffix + ".tmp", str(f) + suffix)
        ask(n)
        Store(st.dir).index(a.component, a.layer, a.pooling, a.mask)  # rebuilt, as the CLI's next query would
        ask(n)
    return out


def snapshot(home: Path) -> set:
    return {(str(p), p.stat().st_size) for p in home.rglob("*") if p.is_file() and "queries" not in p.parts}


def throughput(args, home: Path, st, port: int, path: str, eval_ids: list[str], tmp: Path) -> None:
    """Requests/s and latency at 1, 8 and 32 clients for id and new-text queries,
    against the CLI per request and one in-process query() per request."""
    base = {}
    base["cli_ids_s"] = cli_per_request(home, st.key, [["--k", "4"]] * args.baseline_n)
    src = []
    for i in range(args.baseline_n):
        f = tmp / f"in{i}.txt"
        f.write_text(f"baseline review number {i} with words {random.random()}\n")
        src.append(str(f))
    # a new text per call, as a harness asking about each new input would
    base["cli_text_s"] = cli_per_request(home, st.key, [["--k", "4", "--input", x] for x in src])
    base["inproc_ids_s"] = inproc_per_request(home, st.key, ["eval"] * args.baseline_n)
    for i in range(args.baseline_n):
        Path(src[i]).write_text(f"another baseline review {i} {random.random()}\n")
    base["inproc_text_s"] = inproc_per_request(home, st.key, src)
    emit(measure="baselines", **{k: round(v, 4) for k, v in base.items()}, n=args.baseline_n,
         model=args.model, key=st.key[:16])
    rates = {}
    for kind in ("ids", "texts"):
        for clients in (1, 8, 32):
            if kind == "ids":
                bodies = [json.dumps({"ids": [eval_ids[i % len(eval_ids)]], "k": 4}).encode()
                          for i in range(args.ids)]
            else:
                bodies = [json.dumps({"texts": [f"a fresh review {clients}-{i}, {random.random()}"],
                                      "k": 4}).encode() for i in range(args.texts)]
            r = load(port, path, bodies, clients, args.max_s)
            rates[(kind, clients)] = r["rps"]
            per_req = base["cli_ids_s"] if kind == "ids" else base["cli_text_s"]
            inproc = base["inproc_ids_s"] if kind == "ids" else base["inproc_text_s"]
            emit(measure=f"serve_{kind}", clients=clients, **r,
                 ratio_vs_cli_per_request=round(r["rps"] * per_req, 1),
                 ratio_vs_inprocess_query=round(r["rps"] * inproc, 1), model=args.model)
    ratio = rates[("texts", 32)] / rates[("texts", 1)]
    ceil = forward_ceiling(home, st.key)  # the server is idle now; it shares the cores otherwise
    emit(measure="coalescing", texts_rps_32_over_1=round(ratio, 2), ids_rps_8=rates[("ids", 8)],
         **ceil, share_of_ceiling=round(ratio / ceil["ceiling_32_over_1"], 2), model=args.model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m", help="model id, or 'tiny' for a tiny random Llama")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--ids", type=int, default=2000, help="id requests per level (bounded)")
    ap.add_argument("--texts", type=int, default=96, help="new-text requests per level (bounded)")
    ap.add_argument("--max-s", type=float, default=60.0, help="seconds per level at most")
    ap.add_argument("--baseline-n", type=int, default=3)
    ap.add_argument("--faults", type=int, default=1000)
    ap.add_argument("--home", default=None, help="store to build in and reuse (default: a new temp dir)")
    ap.add_argument("--parts", default="throughput,lanes,faults",
                    help="comma-separated: throughput (levels and baselines), lanes (id lookups under "
                         "new-text load), faults (hostile requests and damaged indexes)")
    ap.add_argument("--lookups", type=int, default=200, help="id lookups per phase of the lanes part")
    ap.add_argument("--server-threads", type=int, default=None, help="the server's --threads (default: every core)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    home = Path(args.home) if args.home else tmp / "store"
    model = tiny_model(tmp / "tiny") if args.model == "tiny" else args.model
    st = make_build(home, model, args.limit)
    st.index("mlp", st.layers[-1], "mean", "label-masked")
    port = free_port()
    log = open(tmp / "serve.log", "w")  # a file, not a pipe nobody reads: a full pipe would stall the server
    threads = [] if args.server_threads is None else ["--threads", str(args.server_threads)]
    proc = subprocess.Popen([sys.executable, "-m", "actcache", "serve", "--store", str(home), "--port", str(port),
                             *threads],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(600):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.1)
        path = f"/v1/builds/{st.key}/neighbors"
        eval_ids = [str(i) for i in st.ids[st.eval_rows]]
        Conn(port).post(path, json.dumps({"texts": ["warm up the model"], "k": 4}).encode())
        parts = set(args.parts.split(","))
        if "throughput" in parts:
            throughput(args, home, st, port, path, eval_ids, tmp)
        if "lanes" in parts:
            from actcache.service import ServeLimits

            lim = ServeLimits()  # a maximal request under the default limits
            r = lookups_under_load(port, path, eval_ids, args.lookups, max_texts=lim.max_texts,
                                   text_chars=lim.max_request_chars // lim.max_texts)
            emit(measure="lookups_under_load", **r, model=args.model, server_threads=args.server_threads or
                 os.cpu_count())
        if "faults" in parts and args.faults:
            before = snapshot(home)
            f = faults(port, args.faults, st.key)
            after = snapshot(home)
            emit(measure="faults", n=args.faults, **f, store_unchanged_outside_query_cache=before == after)
            d = index_faults(port, home, st.key, alive=lambda: proc.poll() is None)
            emit(measure="index_faults", **d, model=args.model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if proc.returncode not in (0, -15):
            print((tmp / "serve.log").read_text()[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
