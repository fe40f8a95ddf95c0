"""The task registry reads the real benchmark files in ../shared/data."""

import pytest

from conftest import shared_data_dir

from actcache.data import TASKS, DataSpec, load
from actcache.prompts import prompt_segments

EXPECTED = {  # (pool rows, eval rows) before subsampling, from ../shared/data/README.md
    "sst2": (6920, 872), "rte": (2490, 277), "gsm8k": (7473, 1319),
    "openbookqa": (4957, 500), "arc_challenge": (1119, 1172),
}


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data not present")
@pytest.mark.parametrize("task", [t for t in TASKS if t != "rotten_tomatoes"])
def test_named_tasks_load(task):
    ds = load(DataSpec(task=task, data_dir=str(shared_data_dir())))
    if task in EXPECTED:
        # ARC/OBQA drop the rare item whose answer key is not among its choices.
        assert abs(len(ds.pool) - EXPECTED[task][0]) <= 5 and abs(len(ds.eval) - EXPECTED[task][1]) <= 5
    ex = ds.pool[0]
    text = "".join(prompt_segments(ds.task, [ds.pool[1]], ex))
    assert ds.task.query_text(ex) in text and ds.task.target(ds.pool[1]) in text
    if ds.task.kind == "classification":
        assert {e.label for e in ds.pool} == set(range(len(ds.task.label_words)))
    if ds.task.kind == "multiple_choice":
        assert all(0 <= e.label < len(e.choices) for e in ds.pool)
    small = load(DataSpec(task=task, data_dir=str(shared_data_dir()), pool_limit=10, eval_limit=5, seed=3))
    again = load(DataSpec(task=task, data_dir=str(shared_data_dir()), pool_limit=10, eval_limit=5, seed=3))
    assert [e.id for e in small.pool] == [e.id for e in again.pool] and len(small.pool) == 10
    assert small.fingerprint() == again.fingerprint()
    other = load(DataSpec(task=task, data_dir=str(shared_data_dir()), pool_limit=10, eval_limit=5, seed=4))
    assert [e.id for e in other.pool] != [e.id for e in small.pool]


@pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data not present")
def test_sst2_first_dev_line_parsed():
    ds = load(DataSpec(task="sst2", data_dir=str(shared_data_dir())))
    first = ds.eval[0]
    assert first.label == 0 and first.get("text") == "one long string of cliches ."
