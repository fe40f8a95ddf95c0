"""actcache.lmeval: lm-eval samplers equal actcache's own retrieval and selection."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from conftest import cfg_for, review_rows, write_jsonl

from actcache.builder import build
from actcache.errors import ConfigError
from actcache.lmeval import knn_sampler, strategy_sampler
from actcache.query import QueryConfig, query
from actcache.select import select


_rows = review_rows


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    data = write_jsonl(root / "reviews.jsonl", _rows())
    home = root / "store"
    st = build(cfg_for(tiny_model_dir["llama"], data, home, layers="-1", store_dtype="float32",
                       components=("mlp",)))
    pool = [r for r in _rows() if r["split"] == "train"]
    evals = [r for r in _rows() if r["split"] == "eval"]
    return st, home, root, pool, evals


def _reference(st, home, root, doc, k):
    src = write_jsonl(root / "ref.jsonl", [{"id": doc["id"], "review": doc["review"]}])
    rec = query(QueryConfig(key=st.key, home=str(home), k=k, source=str(src), component="mlp", layer=-1))
    return [n["id"] for n in rec[0]["neighbors"]]


@pytest.mark.parametrize("id_field", ["id", None])
def test_knn_sampler_returns_actcache_neighbours_in_order(built, id_field):
    from lm_eval.api.samplers import ContextSampler

    st, home, root, pool, evals = built
    cls = knn_sampler(st.key, home=str(home), component="mlp", layer=-1, id_field=id_field)
    assert issubclass(cls, ContextSampler)
    sampler = cls(pool, rnd=None)  # as lm_eval.api.task constructs it
    for doc in evals:
        got = sampler.sample(3, eval_doc=doc)
        assert [d["id"] for d in got] == _reference(st, home, root, doc, 3)
        assert all(d in pool for d in got)
    # A new text (no id in the build) is encoded with the build's model.
    new = {"id": "new-1", "review": "a slow and dull day", "label": 0}
    assert [d["id"] for d in sampler.sample(4, eval_doc=new)] == _reference(st, home, root, new, 4)
    assert sampler.sample(0, eval_doc=new) == []


def test_knn_sampler_uses_stored_vectors_for_build_eval_rows(built, monkeypatch):
    """A doc that is an eval row of the build (same id, same text) is ranked by its
    stored vector, exactly as `actcache query` ranks the build's eval rows; no forward pass."""
    import actcache.lmeval as lmeval

    st, home, root, pool, evals = built
    ref = query(QueryConfig(key=st.key, home=str(home), k=3, component="mlp", layer=-1))
    by_id = {r["test_id"]: [n["id"] for n in r["neighbors"]] for r in ref}
    sampler = knn_sampler(st.key, home=str(home), component="mlp", layer=-1)(pool, rnd=None)
    monkeypatch.setattr(lmeval, "encode_texts", lambda *a, **k: pytest.fail("an eval row was re-encoded"))
    for doc in evals:
        assert [d["id"] for d in sampler.sample(3, eval_doc=doc)] == by_id[doc["id"]]
    # Same id, other text: not the stored row, so it is encoded.
    with pytest.raises(BaseException, match="re-encoded"):
        sampler.sample(3, eval_doc=dict(evals[0], review=evals[0]["review"] + " indeed"))


def test_knn_sampler_only_returns_given_docs(built):
    st, home, root, pool, evals = built
    part = pool[:4]
    sampler = knn_sampler(st.key, home=str(home), layer=-1)(part, rnd=None)
    got = sampler.sample(2, eval_doc=evals[0])
    assert all(d in part for d in got) and len(got) == 2
    src = write_jsonl(root / "ref2.jsonl", [{"id": evals[0]["id"], "review": evals[0]["review"]}])
    ref = query(QueryConfig(key=st.key, home=str(home), k=2, source=str(src), layer=-1,
                            ids=tuple(d["id"] for d in part)))
    assert [d["id"] for d in got] == [n["id"] for n in ref[0]["neighbors"]]


def test_knn_sampler_without_eval_doc_says_what_to_do(built):
    st, home, _, pool, _ = built
    sampler = knn_sampler(st.key, home=str(home))(pool, rnd=None)
    with pytest.raises(ConfigError, match="validation_split"):
        sampler.sample(2)


def test_random_strategy_equals_select(built):
    st, home, _, pool, evals = built
    sampler = strategy_sampler(st.key, home=str(home), strategy="random", seed=7, budget=5)(pool, rnd=None)
    want = list(select(st, "random", budget=5, seed=7).ids)
    for doc in evals[:2]:
        assert [d["id"] for d in sampler.sample(3, eval_doc=doc)] == want[:3]
    assert [d["id"] for d in sampler.sample(5)] == want


def test_per_input_strategy_equals_select(built):
    st, home, _, pool, evals = built
    sampler = strategy_sampler(st.key, home=str(home), strategy="knn", layer=-1)(pool, rnd=None)
    want = select(st, "knn", k=2, layer=-1).per_query
    for doc in evals:
        assert [d["id"] for d in sampler.sample(2, eval_doc=doc)] == list(want[doc["id"]])[:2]


def test_unknown_strategy_option_fails_at_construction():
    with pytest.raises(ConfigError):
        strategy_sampler("whatever", strategy="random", no_such_option=1)
    with pytest.raises(ConfigError):
        strategy_sampler("whatever", strategy="no-such-strategy")


def test_lm_eval_task_uses_the_sampler(built):
    """lm-eval's own ConfigurableTask builds the sampler from fewshot_config and
    puts the neighbours, best first, into the prompt (no model, offline data)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    st, home, root, pool, evals = built
    cls = knn_sampler(st.key, home=str(home), layer=-1)
    cfg = {"task": "actcache_reviews", "custom_dataset": lambda **_: {"validation": datasets.Dataset.from_list(evals)},
           "validation_split": "validation", "output_type": "multiple_choice",
           "doc_to_text": "Review: {{review}}\nSentiment:", "doc_to_target": "label",
           "doc_to_choice": ["negative", "positive"], "num_fewshot": 2,
           "fewshot_config": {"sampler": cls, "samples": pool}}
    task = ConfigurableTask(config=cfg)
    assert isinstance(task.sampler, cls)
    doc = task.validation_docs()[0]
    prompt = task.fewshot_context(doc, num_fewshot=2)
    shown = [d["review"] for d in cls(pool).sample(2, eval_doc=dict(doc))]
    want = [next(r["review"] for r in pool if r["id"] == i) for i in _reference(st, home, root, doc, 2)]
    assert shown == want
    positions = [prompt.index(f"Review: {t}\n") for t in want]
    assert positions == sorted(positions) and prompt.rstrip().endswith(f"Review: {doc['review']}\nSentiment:")


SAMPLER_PY = """from actcache.lmeval import knn_sampler

Knn = knn_sampler({key!r}, home={home!r}, component="mlp", layer=-1)
"""

REVIEWS_YAML = """task: actcache_reviews_knn
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/pool.json
    validation: {root}/eval.json
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "Review: {{{{review}}}}\\nSentiment:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
fewshot_config:
  sampler: !function samplers.Knn
metric_list:
  - metric: acc
"""


def test_simple_evaluate_shows_actcache_neighbours(built, tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval's own evaluation loop (simple_evaluate, the tiny model on the CPU) puts
    exactly `actcache query`'s neighbours, best first, before each doc."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    st, home, root, pool, evals = built
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, rows in (("pool", pool), ("eval", evals)):
        (tmp_path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "samplers.py").write_text(SAMPLER_PY.format(key=st.key, home=str(home)))
    (tasks / "reviews.yaml").write_text(REVIEWS_YAML.format(root=tmp_path))
    k = 3
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir['llama']},dtype=float32",
                                  tasks=["actcache_reviews_knn"], task_manager=TaskManager(include_path=str(tasks)),
                                  num_fewshot=k, log_samples=True, limit=len(evals), device="cpu", batch_size=1)
    samples = out["samples"]["actcache_reviews_knn"]
    assert len(samples) == len(evals)
    words = ["negative", "positive"]
    by_id = {r["id"]: r for r in pool}
    for s in samples:
        doc = s["doc"]
        demos = [by_id[i] for i in _reference(st, home, root, doc, k)]
        want = "".join(f"Review: {d['review']}\nSentiment: {words[d['label']]}\n\n" for d in demos)
        want += f"Review: {doc['review']}\nSentiment:"
        contexts = {a["gen_args_0"]["arg_0"] for a in s["arguments"].values()} if isinstance(s["arguments"], dict) \
            else {a[0] for a in s["arguments"]}
        assert contexts == {want}
