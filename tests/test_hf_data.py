"""Hugging Face datasets as a source (`--task hf:...`), against the same rows as a JSONL `--data` file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TEXTS, write_jsonl

from actcache.data import DataSpec, load
from actcache.errors import ActcacheError, DatasetError

datasets = pytest.importorskip("datasets")

OPTS = dict(text_fields=("review",), label_field="label", id_field="id", template="Review: {review}\nSentiment:",
            label_words=(" negative", " positive"))


def _rows(texts):
    return [{"id": f"x{i}", "review": t, "label": lab} for i, (t, lab) in enumerate(texts)]


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture()
def hf_data(tmp_path):
    """TEXTS: the first 9 rows a train split, the last 3 a validation split, saved three ways."""
    rows = _rows(TEXTS)
    train, val = datasets.Dataset.from_dict(_columns(rows[:9])), datasets.Dataset.from_dict(_columns(rows[9:]))
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    train.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    val.to_parquet(str(tmp_path / "pq" / "validation.parquet"))
    ref = write_jsonl(tmp_path / "ref.jsonl", [{**r, "split": "train" if i < 9 else "eval"}
                                                for i, r in enumerate(rows)])
    return tmp_path, ref


def _same(a, b):
    assert [(e.id, e.fields, e.label) for e in a.pool] == [(e.id, e.fields, e.label) for e in b.pool]
    assert [(e.id, e.fields, e.label) for e in a.eval] == [(e.id, e.fields, e.label) for e in b.eval]
    assert [a.task.query_text(e) for e in a.eval] == [b.task.query_text(e) for e in b.eval]
    assert a.task.label_words == b.task.label_words
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("where", ["saved", "pq", "pq/train.parquet"])
def test_hf_rows_equal_the_jsonl_rows(hf_data, where):
    tmp, ref = hf_data
    want = load(DataSpec(path=str(ref), split_field="split", **OPTS))
    got = load(DataSpec(task=f"hf:{tmp / where}", **OPTS))
    if where.endswith(".parquet"):  # one file, one split: divided by a hash, as a file without --split-field
        want = load(DataSpec(path=str(write_jsonl(tmp / "train.jsonl", _rows(TEXTS[:9]))), **OPTS))
        assert got.source["eval_split"] is None
    else:
        assert got.source["split"] == "train" and got.source["eval_split"] == "validation"
        assert set(got.source["fingerprints"]) == {"train", "validation"}
    assert len(got.pool) + len(got.eval) == (9 if where.endswith(".parquet") else 12)
    _same(got, want)


def test_hf_explicit_splits_default_ids_and_class_names(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    cols = {"text": [t for t, _ in TEXTS], "label": [lab for _, lab in TEXTS]}
    d = datasets.Dataset.from_dict(cols, features=feats)
    datasets.DatasetDict({"a": d.select(range(8)), "b": d.select(range(8, 12))}).save_to_disk(str(tmp_path / "d"))
    ds = load(DataSpec(task=f"hf:{tmp_path / 'd'}", split="a", eval_split="b"))
    assert [e.id for e in ds.pool] == [f"a-{i}" for i in range(8)]
    assert [e.id for e in ds.eval] == ["b-0", "b-1", "b-2", "b-3"]
    assert ds.task.label_words == (" neg", " pos") and [e.label for e in ds.eval] == [lab for _, lab in TEXTS[8:]]
    assert ds.eval[0].fields == (("text", TEXTS[8][0]),)


def test_hf_fingerprint_follows_the_data(hf_data):
    tmp, _ = hf_data
    before = load(DataSpec(task=f"hf:{tmp / 'pq'}", **OPTS))
    again = load(DataSpec(task=f"hf:{tmp / 'pq'}", **OPTS))
    assert before.fingerprint() == again.fingerprint()
    rows = _rows(TEXTS)
    rows[2]["review"] = "a changed review"
    datasets.Dataset.from_dict(_columns(rows[:9])).to_parquet(str(tmp / "pq" / "train.parquet"))
    after = load(DataSpec(task=f"hf:{tmp / 'pq'}", **OPTS))
    assert after.fingerprint() != before.fingerprint()  # the build key's data digest
    assert after.source["fingerprints"]["train"] != before.source["fingerprints"]["train"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_columns(rows[:9])),
                          "validation": datasets.Dataset.from_dict(_columns(rows[9:]))}).save_to_disk(str(tmp / "s2"))
    saved = load(DataSpec(task=f"hf:{tmp / 'saved'}", **OPTS))
    changed = load(DataSpec(task=f"hf:{tmp / 's2'}", **OPTS))
    assert changed.fingerprint() != saved.fingerprint()
    assert changed.source["fingerprints"]["train"] != saved.source["fingerprints"]["train"]


def test_hf_errors_say_what_to_do(hf_data, monkeypatch):
    tmp, _ = hf_data
    with pytest.raises(DatasetError, match=r"no split 'nope' \(--split\).*'train', 'validation'"):
        load(DataSpec(task=f"hf:{tmp / 'saved'}", split="nope", **OPTS))
    with pytest.raises(DatasetError, match=r"no split 'test' \(--eval-split\)"):
        load(DataSpec(task=f"hf:{tmp / 'saved'}", eval_split="test", **OPTS))
    with pytest.raises(DatasetError, match="nope.*pick a config that exists"):
        load(DataSpec(task=f"hf:{tmp / 'pq'}:nope", **OPTS))
    with pytest.raises(DatasetError, match="has no configs"):
        load(DataSpec(task=f"hf:{tmp / 'saved'}:nope", **OPTS))
    with pytest.raises(ActcacheError, match="is a local path"):
        load(DataSpec(task=f"hf:{tmp / 'saved'}", revision="main", **OPTS))
    with pytest.raises(DatasetError, match="does not exist; give an existing directory"):
        load(DataSpec(task=f"hf:{tmp / 'missing'}", **OPTS))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetError, match="not in the local Hugging Face cache.*where there is network"):
        load(DataSpec(task="hf:no-such-owner/no-such-dataset", **OPTS))
    with pytest.raises(ActcacheError, match="use them with --task hf:"):
        load(DataSpec(path=str(tmp / "ref.jsonl"), split="train", **OPTS))


def test_cli_build_from_hf(tiny_model_dir, hf_data):
    tmp, _ = hf_data
    args = [sys.executable, "-m", "actcache", "build", "--model", str(tiny_model_dir["gpt2"]),
            "--task", f"hf:{tmp / 'saved'}", "--split", "train", "--eval-split", "validation",
            "--text-field", "review", "--id-field", "id", "--template", "Review: {review}\\nSentiment:",
            "--label-words", "negative,positive", "--layers", "0", "--components", "resid", "--pooling", "mean",
            "--masks", "isolated", "--store", str(tmp / "s"), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert out.returncode == 0, out.stderr
    import json

    from actcache.store import Store

    rep = json.loads(out.stdout.strip().splitlines()[-1])
    prov = Store(rep["path"]).provenance["data"]
    assert prov["n_pool"] == 9 and prov["n_eval"] == 3 and prov["task"]["template"] == "Review: {review}\nSentiment:"
    assert prov["source"]["split"] == "train" and prov["source"]["eval_split"] == "validation"
    assert set(prov["source"]["fingerprints"]) == {"train", "validation"}
    assert prov["spec"]["task"] == f"hf:{tmp / 'saved'}" and prov["spec"]["split"] == "train"
    assert "Saving" not in out.stderr and "Generating" not in out.stderr
    bad = subprocess.run(args[:6] + ["--task", f"hf:{tmp / 'missing'}"] + args[8:], capture_output=True,
                         text=True, cwd=REPO_ROOT, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
