"""Each default is written once: the CLI's option defaults equal the library's
dataclass defaults (an option left as None takes the dataclass's value)."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from actcache_cli.main import app


def _params(name: str) -> dict:
    cmd = typer.main.get_command(app).commands[name]
    return {p.name: p.default for p in cmd.params}


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("command,cls,renames", [
    ("build", "actcache.builder:BuildConfig", {"pooling": "poolings"}),
    ("query", "actcache.query:QueryConfig", {}),
    ("evaluate", "actcache.pipeline:EvalConfig", {}),
    ("run", "actcache.pipeline:RunConfig", {"store": "home"}),
])
def test_cli_defaults_equal_library_defaults(command, cls, renames):
    import importlib

    mod, name = cls.split(":")
    lib = _defaults(getattr(importlib.import_module(mod), name))
    checked = 0
    for opt, val in _params(command).items():
        field = renames.get(opt, opt)
        if field not in lib or val is None:
            continue  # None: the dataclass supplies the value
        want = lib[field]
        if isinstance(want, tuple):
            val = tuple(type(want[0])(x) for x in str(val).split(",")) if want else ()
        assert val == want, f"{command} --{opt} defaults to {val!r}, the library to {want!r}"
        checked += 1
    assert checked >= 2


def test_model_spec_defaults():
    from actcache.models import ModelSpec

    p, m = _params("build"), _defaults(ModelSpec)
    assert (p["model"], p["dtype"], p["device"]) == (m["model"], m["dtype"], m["device"])
