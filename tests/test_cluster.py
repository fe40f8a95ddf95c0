"""`--engine ray`: the build and the quality matrix on a local Ray instance
(2 CPUs, 2 workers, tiny models), against the same work done locally."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_same_arrays, cfg_for

from actcache.builder import build

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _engine():
    from actcache.cluster import RayEngine

    return RayEngine(workers=2)


KW = dict(layers="0,1", store_dtype="float32", masks=("isolated", "in-context"), batch_size=2)


def test_ray_build_equals_local_bit_for_bit(local_ray, tiny_model_dir, study_jsonl, tmp_path):
    local = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "local", **KW))
    remote = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "ray", **KW), remote=_engine())
    assert remote.key == local.key
    assert sorted(map(str, remote.arrays)) == sorted(map(str, local.arrays))
    assert_same_arrays(remote, local)
    assert remote.report["engine"]["kind"] == "ray" and remote.provenance["engine"]["workers"] == 2
    assert local.provenance["engine"] == {"kind": "local", "workers": 1}
    # the driver computed nothing itself: every batch came from the workers
    assert remote.report["forward_batches"] == local.report["forward_batches"]
    assert not (remote.dir / "partial").exists()


def test_ray_quality_matrix_equals_local(local_ray, tiny_model_dir, study_jsonl, tmp_path):
    from actcache.config import EvalConfig
    from actcache.quality import quality_matrix

    st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "q", layers="0", store_dtype="float32",
                       masks=("isolated",)))
    cfg = EvalConfig(key=st.key, home=str(st.home), dtype="float32", n_candidates=8, n_probes=4)
    local = quality_matrix(st, cfg)
    for p in (st.dir / "quality").glob("*.npz"):
        p.unlink()
    remote = quality_matrix(st, cfg, remote=_engine())
    for k in ("cand_rows", "probe_rows", "correct", "margin", "zs_correct", "zs_margin"):
        np.testing.assert_array_equal(getattr(remote, k), getattr(local, k))
    assert remote.key == local.key
    assert remote.meta["tokens"]["computed"] == local.meta["tokens"]["computed"] > 0


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import ray
    from conftest import cfg_for
    from actcache.builder import build
    from actcache.cluster import RayEngine
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    def progress(desc, done, total):
        if desc == "build (ray)" and done == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    build(cfg_for({model!r}, {data!r}, {home!r}, layers="0,1", store_dtype="float32",
                  masks=("isolated", "in-context"), batch_size=2), progress=progress, remote=RayEngine(workers=2))
""")


def test_killed_driver_resumes_computing_only_what_the_manifest_lacks(local_ray, tiny_model_dir, study_jsonl,
                                                                     tmp_path):
    from actcache.cluster import MANIFEST

    clean = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "clean", **KW))
    home = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER.format(tests=str(REPO_ROOT / "tests"),
                                                                  model=str(tiny_model_dir["llama"]),
                                                                  data=str(study_jsonl), home=str(home))],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    (bdir,) = (home / "builds").iterdir()
    lines = [json.loads(x) for x in (bdir / "partial" / MANIFEST).read_text().splitlines()]
    assert len(lines) == 3
    # a flushed batch that does not match the manifest (damaged after the fact) is recomputed too
    damaged = lines[0]["file"]
    with open(damaged, "r+b") as f:
        f.seek(40)
        f.write(b"\x00" * 16)
    cli = [sys.executable, "-m", "actcache", "verify", bdir.name[:12], "--store", str(home)]
    r = subprocess.run(cli, cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "flushed unit" in r.stdout and "1 problems" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*cli, "--repair"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert "1 repaired" in r.stdout and not Path(damaged).exists(), r.stdout + r.stderr
    assert len((bdir / "partial" / MANIFEST).read_text().splitlines()) == 2
    resumed = build(cfg_for(tiny_model_dir["llama"], study_jsonl, home, **KW), remote=_engine())
    assert resumed.key == clean.key
    assert resumed.report["forward_batches"] == clean.report["forward_batches"] - 2
    assert_same_arrays(resumed, clean)


def test_killed_worker_still_gives_the_clean_result(local_ray, tiny_model_dir, study_jsonl, tmp_path):
    """A worker process killed mid-build: Ray restarts the actor and retries its batch (or a rerun
    completes it); the store equals a clean local build."""
    import threading
    import time

    psutil = pytest.importorskip("psutil")
    clean = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "clean", **KW))
    home = tmp_path / "k"
    killed = []

    def killer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for p in psutil.process_iter(["cmdline"]):
                if any("BuildWorker" in c for c in (p.info["cmdline"] or [])):
                    parts = list(home.rglob("b*.npz"))
                    if parts:
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, home, **KW), remote=_engine())
    except Exception:  # the pipeline gave up on the dead actor: a rerun resumes
        st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, home, **KW), remote=_engine())
    t.join(5)
    assert killed, "no worker process was found to kill"
    assert st.key == clean.key
    assert_same_arrays(st, clean)


def test_cli_engine_ray_equals_local(tiny_model_dir, study_jsonl, tmp_path):
    """`actcache build --engine ray` (a local Ray instance the command starts itself) makes the local store."""
    from actcache.store import Store

    args = ["--model", str(tiny_model_dir["llama"]), "--dtype", "float32", "--data", str(study_jsonl),
            "--text-field", "review", "--split-field", "split", "--id-field", "id", "--template",
            "Review: {review}\\nSentiment:", "--label-words", "negative,positive", "--layers", "0,1",
            "--components", "mlp", "--pooling", "mean", "--masks", "isolated", "--batch-size", "2",
            "--store-dtype", "float32", "--json"]
    keys = []
    for engine, home in (("local", tmp_path / "a"), ("ray", tmp_path / "b")):
        r = subprocess.run([sys.executable, "-m", "actcache", "build", *args, "--store", str(home), "--engine", engine,
                            "--workers", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "WARNING" not in r.stderr and "core_worker" not in r.stderr, r.stderr[-2000:]  # Ray kept quiet
        rep = json.loads(r.stdout.strip().splitlines()[-1])
        assert rep["engine"]["kind"] == engine
        keys.append(rep["key"])
    assert keys[0] == keys[1]
    assert_same_arrays(Store.open(keys[1], str(tmp_path / "b")), Store.open(keys[0], str(tmp_path / "a")))
