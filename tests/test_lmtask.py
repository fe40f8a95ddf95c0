"""`--task lm-eval:NAME`: the docs, prompts, options and labels of an lm-eval task
equal lm-eval's own (`doc_to_text`, `fewshot_context`, `doc_to_choice`,
`doc_to_target`), for a user's task YAML over local JSON files (offline)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

pytest.importorskip("lm_eval")

from conftest import TEXTS
from typer.testing import CliRunner

from actcache import lmtask
from actcache.builder import BuildConfig, identify
from actcache.data import DataSpec, load
from actcache.errors import ConfigError, DatasetError, MissingExtraError
from actcache.models import ModelSpec
from actcache.prompts import prompt_segments
from actcache.store import Store

QUESTIONS = [
    ("What colour is the sky?", ["blue", "green", "red"], 0),
    ("Which one barks?", ["a cat", "a dog"], 1),
    ("What is 2 + {two}?", ["3", "4", "5", "22"], 1),  # braces in a value stay as they are
    ("Where do fish live?", ["in trees", "in water"], 1),
    ("Which is a fruit?", ["an apple", "a chair", "a shoe"], 0),
    ("What do bees make?", ["milk", "honey"], 1),
    ("How many legs has a spider?", ["six", "eight", "ten"], 1),
    ("Which is cold?", ["ice", "fire"], 0),
]

CLS_YAML = """task: tiny_reviews
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/reviews_train.json
    validation: {root}/reviews_val.json
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "Review: {{{{review}}}}\\nSentiment:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
description: "Say whether each review is positive or negative.\\n\\n"
metric_list:
  - metric: acc
"""

MC_YAML = """task: tiny_quiz
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/quiz_train.json
    validation: {root}/quiz_val.json
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
target_delimiter: "  "
fewshot_delimiter: "\\n###\\n"
description: "A quiz.\\n###\\n"
metric_list:
  - metric: acc
"""

GEN_YAML = """task: tiny_quiz_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/quiz_train.json
    validation: {root}/quiz_val.json
output_type: generate_until
training_split: train
validation_split: validation
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
metric_list:
  - metric: exact_match
"""

ROLLING_YAML = """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/reviews_train.json
    validation: {root}/reviews_val.json
output_type: loglikelihood_rolling
training_split: train
validation_split: validation
doc_to_text: ""
doc_to_target: "{{{{review}}}}"
metric_list:
  - metric: word_perplexity
"""


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _reviews():
    rows = [{"review": t, "label": lab} for t, lab in TEXTS]
    return rows[:8], rows[8:]


def _quiz():
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    return rows[:5], rows[5:]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmtask")
    (root / "tasks").mkdir()
    for name, rows in (("reviews", _reviews()), ("quiz", _quiz())):
        _write(root / f"{name}_train.json", rows[0])
        _write(root / f"{name}_val.json", rows[1])
    for name, text in (("reviews", CLS_YAML), ("quiz", MC_YAML), ("quiz_gen", GEN_YAML),
                       ("rolling", ROLLING_YAML)):
        (root / "tasks" / f"{name}.yaml").write_text(text.format(root=root))
    return root


@pytest.fixture(scope="module")
def reference(tasks_dir):
    """lm-eval's own task objects, straight from its registry."""
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict(["tiny_reviews", "tiny_quiz", "tiny_quiz_gen"],
                         TaskManager(include_path=str(tasks_dir / "tasks")))


def _spec(tasks_dir, name, **kw):
    return DataSpec(task=f"lm-eval:{name}", include_path=str(tasks_dir / "tasks"), **kw)


def _fewshot_context(task, doc, demos):
    """lm-eval's prompt for `doc` with these demonstrations (its sampler returns them)."""
    task.sampler.sample = lambda n, eval_doc=None, **kw: list(demos)[:n]
    return task.fewshot_context(doc, num_fewshot=len(demos))


@pytest.mark.parametrize("name,kind", [("tiny_reviews", "classification"), ("tiny_quiz", "multiple_choice"),
                                       ("tiny_quiz_gen", "generation")])
def test_prompts_options_and_labels_are_lm_evals(tasks_dir, reference, name, kind):
    ref = reference[name]
    ds = load(_spec(tasks_dir, name))
    t = ds.task
    assert t.kind == kind
    pool_docs, eval_docs = list(ref.training_docs()), list(ref.validation_docs())
    assert [e.id for e in ds.pool] == [f"train-{i}" for i in range(len(pool_docs))]
    assert [e.id for e in ds.eval] == [f"validation-{i}" for i in range(len(eval_docs))]
    for ex, doc in zip(ds.pool + ds.eval, pool_docs + eval_docs):
        assert t.query_text(ex) == ref.doc_to_text(doc)
        if kind == "generation":
            assert t.target(ex) == ref.config.target_delimiter + ref.doc_to_target(doc)
            continue
        choices = ref.doc_to_choice(doc)
        assert t.options(ex) == tuple(ref.config.target_delimiter + c for c in choices)
        assert ex.label == ref.doc_to_target(doc)
        assert t.target(ex) == ref.config.target_delimiter + choices[ref.doc_to_target(doc)]
    for i, (ex, doc) in enumerate(zip(ds.eval, eval_docs)):
        # zero-shot: the description and the query
        assert "".join(prompt_segments(t, [], ex)) == ref.fewshot_context(doc, num_fewshot=0)
        # k-shot: the same demonstrations in the same order
        picks = [(i + 3) % len(pool_docs), i % len(pool_docs), (i + 1) % len(pool_docs)]
        want = _fewshot_context(ref, doc, [pool_docs[j] for j in picks])
        assert "".join(prompt_segments(t, [ds.pool[j] for j in picks], ex)) == want
    if name == "tiny_quiz":
        assert "{two}" in t.query_text(ds.pool[2]) and t.fewshot_delimiter == "\n###\n"
        assert t.instruction == "A quiz."
    if name == "tiny_quiz_gen":
        assert t.stop == "\n" and ds.source["until"] == ["\n", "Q:"]


def test_source_records_the_task(tasks_dir):
    ds = load(_spec(tasks_dir, "tiny_reviews"))
    src = ds.source
    import lm_eval

    assert src["lm-eval"] == "tiny_reviews" and src["lm_eval_version"] == lm_eval.__version__ == "0.4.13"
    assert src["split"] == "train" and src["eval_split"] == "validation"
    assert src["config"]["doc_to_text"] == "Review: {{review}}\nSentiment:"
    assert set(src["fingerprints"]) == {"train", "validation"}


def test_split_options_choose_other_splits(tasks_dir):
    ds = load(_spec(tasks_dir, "tiny_reviews", split="validation", eval_split="train"))
    assert ds.pool[0].id == "validation-0" and ds.eval[0].id == "train-0"
    with pytest.raises(DatasetError, match="no split 'dev'"):
        load(_spec(tasks_dir, "tiny_reviews", eval_split="dev"))
    with pytest.raises(DatasetError, match="--split and --eval-split"):
        load(_spec(tasks_dir, "tiny_reviews", split="validation"))


def test_what_cannot_be_mapped_is_refused(tasks_dir, monkeypatch):
    with pytest.raises(DatasetError, match="loglikelihood_rolling"):
        load(_spec(tasks_dir, "tiny_rolling"))
    with pytest.raises(DatasetError, match="--include-path"):
        load(_spec(tasks_dir, "no_such_task"))
    with pytest.raises(ConfigError, match="--template"):
        DataSpec(task="lm-eval:tiny_reviews", template="{review}").validate()
    with pytest.raises(ConfigError, match="lm-eval:<task>"):
        DataSpec(task="sst2", include_path=str(tasks_dir)).validate()
    with pytest.raises(ConfigError, match="needs a task name"):
        DataSpec(task="lm-eval:").validate()
    lmtask._manager.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm_eval were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'actcache\[lmeval\]'"):
        load(_spec(tasks_dir, "tiny_reviews"))
    lmtask._manager.cache_clear()


def test_build_with_an_lm_eval_task(tasks_dir, tiny_model_dir, tmp_path):
    from actcache_cli.main import app

    home = tmp_path / "store"
    inc = str(tasks_dir / "tasks")
    res = CliRunner().invoke(app, ["build", "--model", str(tiny_model_dir["llama"]), "--dtype", "float32",
                                   "--task", "lm-eval:tiny_quiz", "--include-path", inc, "--layers", "-1",
                                   "--components", "mlp", "--batch-size", "3", "--context-k", "2",
                                   "--store", str(home), "--json"])
    assert res.exit_code == 0, res.output
    key = json.loads(res.output.strip().splitlines()[-1])["key"]
    st = Store.open(key, str(home))
    ds = load(_spec(tasks_dir, "tiny_quiz"))
    # the delimiters and the instruction come back from the build
    assert dataclasses.replace(st.task(), name=ds.task.name, description=ds.task.description) == ds.task
    assert st.provenance["data"]["source"]["lm-eval"] == "tiny_quiz"
    ic = st.provenance["in_context"]
    demos = {e.id: e for e in ds.pool}
    assert ic["prefix"] == "".join(prompt_segments(ds.task, [demos[i] for i in ic["demo_ids"]], ds.pool[0])[:-1])
    cfg = BuildConfig(model=ModelSpec(str(tiny_model_dir["llama"]), dtype="float32"),
                      data=_spec(tasks_dir, "tiny_quiz"), layers="-1", components=("mlp",), batch_size=3,
                      context_k=2, home=str(home))
    assert identify(cfg)[2] == key
    # one doc changed: another key
    train, val = _quiz()
    val[0] = {**val[0], "question": val[0]["question"] + " (really)"}
    _write(tasks_dir / "quiz_val.json", val)
    try:
        assert identify(cfg)[2] != key
    finally:
        _write(tasks_dir / "quiz_val.json", _quiz()[1])
