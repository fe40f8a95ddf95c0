"""Store housekeeping: `ls` only reads, `rm` and `gc` remove exactly what they
report (and only with --yes). Every check compares the store's files before and
after with an independent listing (os.walk, sha256 of every file, `du`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import cfg_for

from actcache.admin import parse_age, parse_size, plan_gc
from actcache.builder import build
from actcache.errors import ConfigError
from actcache.store import Store
from actcache_cli.main import app

DEAD_PID = 999999999  # above any pid_max: no process owns the temp files named with it


def _files(home: Path) -> dict[str, str]:
    """Every file under `home` (relative path -> sha256 of its bytes)."""
    out = {}
    for root, _, names in os.walk(home):
        for n in names:
            p = Path(root) / n
            out[str(p.relative_to(home))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _under(files, home: Path, paths) -> set[str]:
    """The files of `files` at or under any of `paths`."""
    rel = [str(Path(p).relative_to(home)) for p in paths]
    return {f for f in files if any(f == r or f.startswith(r + os.sep) for r in rel)}


@pytest.fixture()
def store(tiny_model_dir, jsonl, tmp_path):
    """Two builds (a with a cached query file, b) and leftovers: a dead writer's temp
    file inside build a, a build folder holding only its lock, and a dead writer's
    temp file under models/."""
    home = tmp_path / "s"
    a = build(cfg_for(tiny_model_dir["llama"], jsonl, home, layers="1", components=("mlp",), masks=("isolated",)))
    b = build(cfg_for(tiny_model_dir["llama"], jsonl, home, layers="1", components=("mlp",), masks=("isolated",),
                      batch_size=4))
    assert a.key != b.key
    (a.dir / "queries").mkdir(exist_ok=True)
    np_file = a.dir / "queries" / "cached.npz"
    np_file.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: a derived file of build a
    tmp_in_a = a.dir / "indexes" / f".x.faiss.{DEAD_PID}.abc.tmp"
    tmp_in_a.parent.mkdir(exist_ok=True)
    tmp_in_a.write_bytes(b"x" * 5000)
    empty = home / "builds" / ("f" * 64)
    empty.mkdir()
    (empty / "lock").write_text("")
    tmp_models = home / "models" / f".m-safetensors.{DEAD_PID}.abc.tmp"
    tmp_models.mkdir(parents=True)
    (tmp_models / "model.safetensors").write_bytes(b"y" * 3000)
    return {"home": home, "a": a, "b": b, "leftovers": {tmp_in_a, empty, tmp_models}}


def _cli(*args):
    r = CliRunner().invoke(app, [*args])
    return r


def test_ls_reads_only_and_reports_sizes(store):
    home = store["home"]
    before = _files(home)
    stat_before = {p: os.stat(home / p).st_mtime_ns for p in before}
    r = _cli("ls", "--store", str(home))
    assert r.exit_code == 0, r.output
    rj = _cli("ls", "--store", str(home), "--json")
    assert rj.exit_code == 0, rj.output
    assert _files(home) == before  # byte for byte, and no file added or removed (leftovers stay)
    assert {p: os.stat(home / p).st_mtime_ns for p in before} == stat_before
    rows = {row["key"]: row for row in json.loads(rj.stdout)}
    assert set(rows) == {store["a"].key, store["b"].key}
    if shutil.which("du"):
        for key in rows:
            du = int(subprocess.run(["du", "-s", "-B1", str(home / "builds" / key)], capture_output=True,
                                    text=True, check=True).stdout.split()[0])
            assert rows[key]["bytes"] == du
    assert "2 builds" in r.stdout and "in total" in r.stdout
    assert store["a"].key[:16] in r.stdout


def test_rm_dry_run_then_removes_exactly_what_it_listed(store):
    home, a = store["home"], store["a"]
    before = _files(home)
    dry = _cli("rm", a.key[:12], "--store", str(home), "--json")
    assert dry.exit_code == 0, dry.output
    assert _files(home) == before  # a dry run touches nothing
    listed = json.loads(dry.stdout)
    assert listed["dry_run"] and [x["path"] for x in listed["would_remove"]] == [str(a.dir)]
    r = _cli("rm", a.key[:12], "--store", str(home), "--yes")
    assert r.exit_code == 0, r.output
    after = _files(home)
    gone = set(before) - set(after)
    assert gone == _under(before, home, [a.dir])  # the build with its derived files, nothing else
    assert "queries/cached.npz" in " ".join(gone) and all(after[f] == before[f] for f in after)
    Store(store["b"].dir)  # the other build still opens


def test_rm_unknown_key_is_a_store_error(store):
    r = _cli("rm", "abcdef0123", "--store", str(store["home"]), "--yes")
    assert r.exit_code == 5 and "no build" in r.output


def test_gc_removes_exactly_the_leftovers_it_reports(store):
    home = store["home"]
    before = _files(home)
    dry = _cli("gc", "--store", str(home), "--json")
    assert dry.exit_code == 0, dry.output
    assert _files(home) == before
    listed = {Path(x["path"]) for x in json.loads(dry.stdout)["would_remove"]}
    assert listed == store["leftovers"]
    text = _cli("gc", "--store", str(home))
    assert "would remove" in text.stdout and "--yes" in text.stdout
    r = _cli("gc", "--store", str(home), "--yes", "--json")
    assert r.exit_code == 0, r.output
    assert {Path(x["path"]) for x in json.loads(r.stdout)["removed"]} == listed
    after = _files(home)
    assert set(before) - set(after) == _under(before, home, listed)
    assert all(after[f] == before[f] for f in after)
    assert not (home / "builds" / ("f" * 64)).exists()
    assert json.loads(_cli("gc", "--store", str(home), "--json").stdout)["would_remove"] == []


def _age(build_dir: Path, seconds: float) -> None:
    t = time.time() - seconds
    for p in [build_dir, *build_dir.rglob("*")]:
        os.utime(p, (t, t))


def test_gc_older_than_and_max_size_pick_the_least_recently_used(store):
    home, a, b = store["home"], store["a"], store["b"]
    _age(a.dir, 10 * 86400)
    _age(b.dir, 2 * 86400)
    plan = plan_gc(home, older_than=parse_age("5d"))
    assert {r.path for r in plan} == store["leftovers"] | {a.dir}
    plan = plan_gc(home, older_than=parse_age("1d"))
    assert {r.path for r in plan} >= {a.dir, b.dir}
    b_size = int(subprocess.run(["du", "-s", "-B1", str(b.dir)], capture_output=True, text=True,
                                check=True).stdout.split()[0]) if shutil.which("du") else None
    plan = plan_gc(home, max_size=b_size or parse_size("1G"))
    removed = {r.path for r in plan}
    if b_size:
        assert a.dir in removed and b.dir not in removed  # a, used longest ago, goes first
    before = _files(home)  # reading files marks them used: age them again
    _age(a.dir, 10 * 86400)
    _age(b.dir, 2 * 86400)
    r = _cli("gc", "--store", str(home), "--older-than", "5d", "--yes")
    assert r.exit_code == 0, r.output
    assert set(before) - set(_files(home)) == _under(before, home, store["leftovers"] | {a.dir})
    Store(b.dir)


@pytest.mark.parametrize("text,want", [("500M", 500 * 2**20), ("10G", 10 * 2**30), ("1.5GiB", int(1.5 * 2**30)),
                                       ("2048", 2048), ("3k", 3072)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text,want", [("30d", 30 * 86400), ("12h", 12 * 3600), ("2w", 14 * 86400), ("90m", 5400),
                                       ("3", 3 * 86400)])
def test_parse_age(text, want):
    assert parse_age(text) == want


def test_bad_sizes_are_usage_errors(tmp_path):
    with pytest.raises(ConfigError):
        parse_size("lots")
    r = _cli("gc", "--store", str(tmp_path), "--older-than", "soon")
    assert r.exit_code == 2 and "--older-than" in r.output
