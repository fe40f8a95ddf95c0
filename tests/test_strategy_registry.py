"""The strategy registry as a newcomer uses it: a test-only strategy, registered
in its one place (`select.strategy`), is selected by the library and the CLI and
run by the selection experiment, with its kind and typed options read from the
registry everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from actcache.builder import build
from actcache.config import EvalConfig
from actcache.errors import ConfigError
from actcache.pipeline import evaluate
from actcache.select import STRATEGIES, Selection, needs_model, select, strategy
from conftest import cfg_for


@pytest.fixture()
def first_n():
    @strategy("first-n", "subset")
    def _first_n(store, *, budget, k, seed, progress, offset=0):
        pos = np.arange(offset, offset + int(budget))
        return Selection("first-n", store.key, {"budget": int(budget), "offset": offset},
                         tuple(str(store.ids[store.pool_rows[p]]) for p in pos), tuple(int(p) for p in pos))

    yield "first-n"
    STRATEGIES.pop("first-n", None)


@pytest.fixture()
def tiny(tiny_model_dir, study_jsonl, tmp_path):
    return build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "store", layers="1",
                         masks=("label-masked",), components=("mlp",)))


def test_registry_carries_kind_and_typed_options(first_n):
    st = STRATEGIES[first_n]
    assert st.kind == "subset" and [(o.name, o.type, o.default) for o in st.options] == [("offset", int, 0)]
    assert STRATEGIES["knn"].kind == "per-input" and STRATEGIES["vote-k"].kind == "annotation"
    assert needs_model("vote-k") and not needs_model("knn") and not needs_model(first_n)
    assert {o.name: o.type for o in STRATEGIES["knn"].options}["layer"] is int


def test_a_strategy_of_ones_own_in_library_cli_and_experiment(first_n, tiny, tmp_path):
    want = [str(i) for i in tiny.ids[tiny.pool_rows[1:5]]]  # the reference: plain indexing
    assert list(select(tiny, first_n, budget=4, offset=1).ids) == want

    out = tmp_path / "sel.jsonl"
    from actcache_cli.main import app

    r = CliRunner().invoke(app, ["query", tiny.key, "--strategy", first_n, "--budget", "4", "--store",
                                 str(tiny.home), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == [str(i) for i in
                                                                             tiny.ids[tiny.pool_rows[:4]]]

    res = evaluate(EvalConfig(key=tiny.key, home=str(tiny.home), dtype="float32", n_candidates=8, n_probes=4,
                              n_eval=3, k=2, seeds=(0,), strategies=("random", first_n), n_boot=10,
                              out=str(tmp_path / "report")))
    names = {s["strategy"] for s in res.selection.summary}
    assert f"{first_n}+turns" in names  # a subset strategy: labels take turns, like every other one
    assert first_n in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("bad", [{"offset": "1"}, {"offset": True}, {"offset": 1.5}, {"start": 1}])
def test_options_are_checked_against_their_types(first_n, tiny, bad):
    with pytest.raises(ConfigError, match="offset"):
        select(tiny, first_n, budget=2, **bad)


def test_numpy_integers_are_ints(tiny):
    a = select(tiny, "k-center", budget=3, layer=np.int64(1))
    b = select(tiny, "k-center", budget=3, layer=1)
    assert a.ids == b.ids
