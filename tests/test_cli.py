"""The command line as researchers' tools behave: --version, -h everywhere, shell
completion, choices checked while parsing (before any data or model is
touched), --device auto, 'last' as the default key, --json documents, and
--quiet / --verbose."""

from __future__ import annotations

import json
import re

import pytest
import typer.main
from typer.testing import CliRunner

from conftest import cfg_for

import actcache
from actcache.builder import build
from actcache.capture import COMPONENTS, SPANS, STORE_DTYPES, pooling_names
from actcache.config import MASKS
from actcache.errors import ConfigError
from actcache.models import DEVICES, DTYPE_CHOICES
from actcache.pipeline import EvalConfig
from actcache_cli.main import app

COMMAND = typer.main.get_command(app)


def _commands(group=COMMAND, path=()):
    """Every command path, e.g. ("build",), ("sae", "train")."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name)


def _param(path, name):
    cmd = COMMAND
    for p in path:
        cmd = cmd.commands[p]
    return next(p for p in cmd.params if p.name == name)


def _cli(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def test_version():
    r = _cli("--version")
    assert r.exit_code == 0 and r.stdout == f"actcache {actcache.__version__}\n"


@pytest.mark.parametrize("path", [(), *_commands(), ("sae",)])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flags_on_every_command(path, flag):
    r = _cli(*path, flag)
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.stdout


def test_completion_is_on_and_completes_commands():
    names = [p.name for p in COMMAND.params]
    assert "install_completion" in names and "show_completion" in names
    env = {"_ACTCACHE_COMPLETE": "complete_bash", "COMP_WORDS": "actcache ver", "COMP_CWORD": "1"}
    r = _cli(env=env, prog_name="actcache")
    assert r.exit_code == 0 and r.stdout.split() == ["verify"]
    # The script `--show-completion` prints (its shell argument depends on whether the parent shell
    # can be detected, so the script is asked for the way the installed script sources it).
    script = _cli(env={"_ACTCACHE_COMPLETE": "source_bash"}, prog_name="actcache")
    assert script.exit_code == 0 and "_ACTCACHE_COMPLETE=complete_bash" in script.stdout
    env = {"_ACTCACHE_COMPLETE": "complete_bash", "COMP_WORDS": "actcache query --mask ", "COMP_CWORD": "3"}
    assert _cli(env=env, prog_name="actcache").stdout.split() == list(MASKS)


@pytest.mark.parametrize("path,name,values", [
    (("build",), "device", DEVICES), (("build",), "dtype", DTYPE_CHOICES), (("query",), "mask", MASKS),
    (("query",), "component", COMPONENTS),
    (("evaluate",), "device", DEVICES), (("sae", "train"), "device", DEVICES), (("serve",), "device", DEVICES),
    (("build",), "engine", ("local", "ray")), (("build",), "span", SPANS), (("build",), "store_dtype", STORE_DTYPES),
])
def test_choices_come_from_the_library(path, name, values):
    from typing import get_args

    assert get_args(_param(path, name).type_descriptor.annotation) == tuple(values)


@pytest.fixture()
def no_work(monkeypatch):
    """Loading data or a model, or opening the store, fails the test."""
    import actcache.builder as builder
    import actcache.data as data
    import actcache.hf as hf
    import actcache.models as models
    import actcache.store as store

    def boom(*a, **k):
        raise AssertionError("work started before the options were checked")

    for mod, name in ((data, "load"), (data, "rotten_tomatoes_file"), (hf, "open_dataset"), (builder, "load_data"), (models, "load_model"), (builder, "load_model"),
                      (store, "find_build"), (models, "resolve_model"), (models, "default_model_gguf")):
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("args,words", [
    (["build", "--device", "gpu"], ["--device", "cpu", "cuda", "mps", "auto"]),
    (["build", "--dtype", "float8"], ["--dtype", *DTYPE_CHOICES]),
    (["build", "--masks", "isolated,nope"], ["nope", *MASKS]),
    (["build", "--components", "mlp,ffn"], ["ffn", *COMPONENTS]),
    (["build", "--pooling", "median"], ["median", *pooling_names()]),
    (["build", "--engine", "spark"], ["--engine", "local", "ray"]),
    (["query", "--mask", "x"], ["--mask", *MASKS]),
    (["query", "--component", "x"], ["--component", *COMPONENTS]),
    (["query", "--strategy", "nearest"], ["nearest"]),
    (["evaluate", "--strategies", "knn,bogus"], ["bogus"]),
    (["evaluate", "--device", "tpu"], ["--device"]),
    (["run", "--preset", "paper-boolq-llama", "--strategies", "best"], ["best"]),
    (["serve", "--device", "gpu"], ["--device"]),
    (["sae", "train", "--device", "gpu"], ["--device"]),
])
def test_invalid_choices_are_usage_errors_before_any_work(no_work, tmp_path, args, words):
    r = _cli(*args, "--store", tmp_path / "s", env={"COLUMNS": "400"})
    assert r.exit_code == 2, r.output
    text = " ".join(r.stderr.replace("│", " ").split())
    assert all(w in text for w in words), text
    assert not (tmp_path / "s").exists()


def test_unknown_strategy_lists_the_registry(no_work):
    from actcache.select import STRATEGIES

    r = _cli("evaluate", "--strategies", "knn,bogus", env={"COLUMNS": "400"})
    text = " ".join(r.stderr.replace("│", " ").split())
    assert r.exit_code == 2 and all(name in text for name in STRATEGIES)


def test_strategies_help_names_exactly_the_defaults_that_run():
    for path in (("evaluate",), ("run",)):
        help_text = _param(path, "strategies").help
        listed = re.search(r"default: ([^)]*)\)", help_text).group(1).split(", ")
        assert tuple(listed) == EvalConfig().strategies


@pytest.mark.parametrize("path", [("build",), ("run",), ("query",), ("serve",), ("sae", "train"), ("evaluate",)])
def test_device_defaults_to_auto(path):
    assert _param(path, "device").default == "auto"


@pytest.mark.parametrize("path", [("query",), ("info",), ("evaluate",)])
def test_key_defaults_to_last(path):
    assert _param(path, "key").default == "last"


def test_device_reaches_evaluate(monkeypatch):
    from actcache import pipeline

    seen = []

    def capture(cfg, progress=None, remote=None):
        seen.append(cfg)
        raise ConfigError("captured")

    monkeypatch.setattr(pipeline, "resolve_key", lambda key, home: "k" * 64)
    monkeypatch.setattr(pipeline, "evaluate", capture)
    assert _cli("evaluate", "--device", "cpu", "--store", "/s").exit_code == 2
    assert seen[-1].device == "cpu"
    assert _cli("evaluate", "--store", "/s").exit_code == 2
    assert seen[-1].device == "auto"


def test_quiet_and_verbose_together_are_refused():
    r = _cli("-q", "-v", "presets")
    assert r.exit_code == 2 and "not both" in r.stderr


# ----------------------------------------------------------------------------- on a real (tiny) build


@pytest.fixture()
def built(tiny_model_dir, study_jsonl, tmp_path):
    return build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "s", layers="1,2", components=("mlp",),
                         masks=("isolated", "label-masked")))


def test_json_documents(built, tmp_path):
    home = str(built.home)
    rows = json.loads(_cli("ls", "--store", home, "--json").stdout)
    assert [r["key"] for r in rows] == [built.key] and rows[0]["bytes"] > 0
    doc = json.loads(_cli("info", "--store", home, "--json").stdout)  # 'last'
    assert doc["key"] == built.key and doc["n_pool"] == len(built.pool_rows)
    r = _cli("verify", "--store", home, "--json")
    v = json.loads(r.stdout)
    assert r.exit_code == 0 and v["ok"] and v["builds"][0]["key"] == built.key and v["builds"][0]["checked"] > 0
    out = tmp_path / "n.jsonl"
    r = _cli("query", "--store", home, "--layer", "1", "--mask", "isolated", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert q["records"] == len(recs) == len(built.eval_rows) and q["out"] == str(out) and q["key"] == built.key
    r = _cli("query", "--store", home, "--out", "-", "--json")
    assert r.exit_code == 2 and "--out" in r.stderr


def test_evaluate_json_summary(built, tmp_path):
    out = tmp_path / "rep"
    r = _cli("evaluate", "--store", built.home, "--n-candidates", 8, "--n-probes", 4, "--n-eval", 4, "--k", 1,
             "--seeds", 0, "--strategies", "random,knn", "--n-boot", 0, "--votek-budget", 2, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    full = json.loads((out / "results.json").read_text())
    assert doc["build_key"] == built.key == full["build_key"] and doc["report"] == f"{out}/report.md"
    assert doc["table"] and doc["sizes"]["n_eval"] == full["sizes"]["n_eval"]


def test_quiet_verbose_and_default_output(built, tmp_path):
    home = str(built.home)
    out = tmp_path / "n.jsonl"
    base = ["query", "--store", home, "--layer", "1", "--mask", "isolated", "--out", out, "--input", "-"]
    normal = _cli(*base, input="a fine day\n")
    assert normal.exit_code == 0 and "wrote 1 records" in normal.stdout and "loading model" not in normal.stderr
    quiet = _cli("--quiet", *base, input="a fine day\n")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    assert len(out.read_text().splitlines()) == 1  # the records are still written
    verbose = _cli("--verbose", *base, input="another fine day\n")
    assert verbose.exit_code == 0 and "loading model" in verbose.stderr and "loaded model" in verbose.stderr


def test_model_download_progress_is_reported_not_printed(monkeypatch, capsys):
    """The hub's byte bars (driven as snapshot_download drives them) become
    (desc, done, total) reports or log records; nothing is drawn."""
    import logging

    import huggingface_hub
    import huggingface_hub.constants

    from actcache import models

    def fake_snapshot(repo, revision=None, allow_patterns=None, tqdm_class=None):
        assert "model.safetensors" in allow_patterns and "*.safetensors" not in allow_patterns
        files = tqdm_class(desc="Fetching 2 files", total=2)
        transfer = tqdm_class(desc="Downloading bytes", total=0, unit="B", name="huggingface_hub.snapshot_download.transfer")
        written = tqdm_class(desc="Reconstructing", total=0, unit="B", name="huggingface_hub.snapshot_download")
        written.total = transfer.total = 3 * 2**20
        for _ in range(3):
            transfer.update(2**20)
            written.update(2**20)
        files.update(2)
        for b in (files, transfer, written):
            b.close()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    seen = []
    models.download("org/model", report=lambda *a: seen.append(a))
    assert seen == [("download org/model", i * 2**20, 3 * 2**20) for i in (1, 2, 3)]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    models.log.addHandler(handler)
    old = models.log.level
    models.log.setLevel(logging.INFO)
    try:
        models.download("org/model")
    finally:
        models.log.removeHandler(handler)
        models.log.setLevel(old)
    msgs = [r.getMessage() for r in records]
    assert msgs[0] == "downloading org/model: 1 MiB of 3 MiB (33%)" and msgs[-1].endswith("(100%)")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    models.download("org/model", report=lambda *a: seen.append("offline"))
    assert "offline" not in seen
