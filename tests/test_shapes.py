"""Paper-shaped models with random weights (`--model-config`): the named shapes,
a tiny config.json built, reproducible, marked, keyed, and refused by evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_same_arrays, cfg_for

from actcache.builder import build
from actcache.errors import ConfigError, ModelError
from actcache.models import ModelSpec
from actcache.pipeline import EvalConfig, evaluate
from actcache.shapes import SHAPES, shape_config

TINY = {"model_type": "llama", "vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": True}


def _meta_params(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())  # tied embeddings counted once


def test_llama_3_2_3b_shape():
    cfg, src, sha = shape_config("llama-3.2-3b")
    assert type(cfg).__name__ == "LlamaConfig"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (28, 3072, 24, 8, 8192, 128256)
    assert cfg.rope_parameters["rope_theta"] == 500000 and cfg.tie_word_embeddings
    assert len(sha) == 64 and src == SHAPES["llama-3.2-3b"]
    n = _meta_params(cfg)
    assert 3.15e9 < n < 3.25e9, n  # 3,212,749,824


def test_qwen2_5_3b_shape():
    cfg, _, _ = shape_config("qwen2.5-3b")
    assert type(cfg).__name__ == "Qwen2Config"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (36, 2048, 16, 2, 11008, 151936)
    assert cfg.tie_word_embeddings
    n = _meta_params(cfg)
    assert 3.05e9 < n < 3.12e9, n  # 3,085,938,688


def test_unknown_shape_says_what_to_pass(tmp_path):
    with pytest.raises(ModelError, match="llama-3.2-3b"):
        shape_config("llama-9b")
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelError, match="model_type"):
        shape_config(str(tmp_path / "c.json"))


def _cfg(tmp_path, jsonl, home, config=TINY, seed=0, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    spec = ModelSpec(dtype="float32", model_config=str(path), init_seed=seed)
    return cfg_for(".", jsonl, home, model=spec, components=("mlp",), poolings=("mean",),
                   masks=("isolated",))


def test_random_build_reproducible_marked_keyed_refused(tmp_path, jsonl):
    st = build(_cfg(tmp_path, jsonl, tmp_path / "a"))
    m = st.provenance["model"]
    assert m["random_init"] is True and m["init_seed"] == 0 and m["config"] == TINY
    assert m["model_config"].endswith("config.json") and len(m["config_sha256"]) == 64
    assert m["architecture"] == "LlamaForCausalLM"
    assert st.acts("mlp", 1, "mean", "isolated").shape[1] == 32
    again = build(_cfg(tmp_path, jsonl, tmp_path / "b"))  # a fresh store
    assert again.key == st.key and not again.report["cache_hit"]
    assert_same_arrays(again, st)
    other_seed = build(_cfg(tmp_path, jsonl, tmp_path / "a", seed=1))
    assert other_seed.key != st.key
    assert not np.array_equal(other_seed.acts("mlp", 1, "mean", "isolated"), st.acts("mlp", 1, "mean", "isolated"))
    other_cfg = build(_cfg(tmp_path, jsonl, tmp_path / "a", config={**TINY, "intermediate_size": 48}, name="c2.json"))
    assert len({st.key, other_seed.key, other_cfg.key}) == 3
    with pytest.raises(ConfigError, match="randomly initialised.*real weights"):
        evaluate(EvalConfig(key=st.key, home=str(tmp_path / "a"), out=str(tmp_path / "out")))


def test_random_build_queries(tmp_path, jsonl):
    from actcache.query import QueryConfig, query

    st = build(_cfg(tmp_path, jsonl, tmp_path / "a"))
    home = str(tmp_path / "a")
    kw = dict(key=st.key, home=home, component="mlp", pooling="mean", mask="isolated", k=2)
    assert len(query(QueryConfig(**kw))) > 0  # the build's eval rows
    (tmp_path / "new.txt").write_text("a dull movie\n")
    recs = query(QueryConfig(**kw, source=str(tmp_path / "new.txt")))  # new text: the random model runs again
    assert len(recs) == 1 and len(recs[0]["neighbors"]) == 2


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, jsonl):
    with pytest.raises(ModelError, match="vocab_size of at least"):
        build(_cfg(tmp_path, jsonl, tmp_path / "a", config={**TINY, "vocab_size": 1000}))


def test_bench_scale_runs_on_cpu(tmp_path):
    """benchmarks/bench_scale.py's every part on a tiny shape: one JSON line per part."""
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ACTCACHE_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_scale.py"), "--device", "cpu",
                          "--model-config", "tiny", "--n", "16", "--batch-size", "8", "--dtype", "float32",
                          "--peak-n", "256", "--peak-reps", "3", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["part"] for x in lines] == ["peak", "forward", "capture"]
    cap = lines[-1]
    assert cap["model_config"] == "tiny" and cap["tokens_per_s"] > 0 and cap["share_of_peak"] > 0
    assert cap["class"] == lines[0]["class"] and cap["tokens"] == lines[1]["tokens"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_middle_pair_off_cpu_equals_the_cpu_path(dtype):
    """The selection CUDA runs (`_middle_pair_select`) gives the CPU path's pair, ties included."""
    from actcache.capture import _middle_pair, _middle_pair_select

    g = torch.Generator().manual_seed(0)
    for n, K, hi in ((40, 20, 5), (41, 21, 1000), (7, 7, 3), (64, 1, 2), (9, 5, 1)):
        a = torch.randint(0, hi, (6, n), generator=g).to(dtype)
        want = _middle_pair(a.clone(), K)
        got = _middle_pair_select(a.clone(), K)
        for w, x in zip(want, got):
            assert torch.equal(w, x), (n, K, hi)


def test_token_batches():
    from actcache.prompts import length_batches, token_batches

    lengths = [5, 9, 3, 9, 2, 7, 30]
    got = token_batches(lengths, 20)
    assert [b.tolist() for b in got] == [[6], [1, 3], [5, 0], [2, 4]]
    assert np.concatenate(got).tolist() == np.concatenate(length_batches(lengths, 2)).tolist()
    assert all(len(b) * lengths[b[0]] <= 20 for b in got if len(b) > 1)


def test_batch_tokens_enters_the_key(tmp_path, jsonl):
    from dataclasses import replace

    from actcache.data import load as load_data
    from actcache.prompts import plan_rows, token_batches
    from actcache.shapes import shape_tokenizer
    from actcache.store import build_command

    base = replace(_cfg(tmp_path, jsonl, tmp_path / "a"), max_length=32)
    plain = build(base)
    by_tokens = build(replace(base, batch_tokens=64))
    assert by_tokens.key != plain.key and by_tokens.config["batch_tokens"] == 64
    seqs = plan_rows(load_data(base.data), shape_tokenizer(), base).seqs["isolated"]
    assert by_tokens.report["forward_batches"] == len(token_batches([len(s) for s in seqs], 64))
    assert "batch_tokens" not in plain.config and "--batch-tokens 64" in build_command(by_tokens)
    np.testing.assert_allclose(by_tokens.acts("mlp", 1, "mean", "isolated"),
                               plain.acts("mlp", 1, "mean", "isolated"), atol=2e-3)
    with pytest.raises(ConfigError, match="--batch-tokens 100 is below --max-length"):
        build(replace(base, max_length=384, batch_tokens=100))


def test_cli_build_model_config_relative_path(tmp_path, jsonl, monkeypatch):
    """`actcache build --model-config config.json` (relative) records the absolute path, so a
    later query from elsewhere finds it; `evaluate` on the CLI says why it refuses."""
    from typer.testing import CliRunner

    from actcache_cli.main import app

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    monkeypatch.chdir(tmp_path)
    home = str(tmp_path / "store")
    r = CliRunner().invoke(app, ["build", "--model-config", "config.json", "--init-seed", "3", "--dtype", "float32",
                                 "--data", str(jsonl), "--text-field", "review", "--split-field", "split",
                                 "--id-field", "id", "--label-words", "negative,positive",
                                 "--template", "Review: {review}\\nSentiment:", "--components", "mlp",
                                 "--pooling", "mean", "--masks", "isolated", "--store", home, "--json"])
    assert r.exit_code == 0, r.output
    key = json.loads(r.output.strip().splitlines()[-1])["key"]
    from actcache.store import Store

    m = Store.open(key, home).provenance["model"]
    assert m["model_config"] == str(tmp_path / "config.json") and m["init_seed"] == 3
    r = CliRunner().invoke(app, ["evaluate", key, "--store", home, "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "real weights" in r.output
