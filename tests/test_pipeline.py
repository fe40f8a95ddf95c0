"""The library pipeline: `run()` from Python equals `actcache run`; results.json
keeps its keys; CLI options with no value give the library's default configs."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from typer.testing import CliRunner

from conftest import cfg_for, shared_data_dir

from actcache import pipeline
from actcache.builder import build
from actcache.errors import ConfigError
from actcache.pipeline import PRESETS, EvalConfig, EvalResult, Preset, RunConfig, evaluate, run
from actcache_cli.main import app

# results.json's top-level keys in order, and the keys of the objects this project defines.
RESULTS_KEYS = ["config", "build_key", "quality_key", "quality_tokens", "task", "model", "quality_probe_rows",
                "quality_cand_rows", "versions", "sizes", "zero_shot_probe_acc", "hardware", "study", "selection",
                "seconds", "lm_eval"]
NESTED_KEYS = {
    "config": ["allow_overlap", "batch_size", "compare_fp32", "confirm_fraction", "demos", "device", "dtype", "home", "k", "key",
               "knn_layers", "knn_order", "max_length", "n_boot", "n_candidates", "n_eval", "n_probes", "out", "pair_mask",
               "quality", "quality_def", "sae_min_active", "seed", "seeds", "strategies", "turns", "votek_budget"],
    "quality_tokens": ["computed", "in_prompts", "saved"],
    "sizes": ["k", "n_candidates", "n_eval", "n_probes", "seeds"],
    "hardware": ["build", "dtype", "dtype_requested", "evaluate", "quality_matrix"],
    "study": ["label_rho", "length_rho", "pairs", "push", "quality", "replication", "rows", "sae", "summary"],
    "lm_eval": ["config", "n-samples", "results", "versions"],
    "selection": ["baseline", "dropped_demonstrations", "eval_ids", "flips", "k", "max_length", "runs", "summary",
                  "tokens"],
}


def _canon(doc: dict) -> str:
    # NaN != NaN, so compare the JSON text (NaN written as NaN), keys sorted.
    return json.dumps(doc, sort_keys=True, default=str)


def test_results_json_keys_unchanged(tiny_model_dir, study_jsonl, tmp_path):
    st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "store", layers="0,-1", store_dtype="float32"))
    out = tmp_path / "r"
    res = evaluate(EvalConfig(key=st.key, dtype="float32", home=str(st.home), n_candidates=8, n_probes=4, n_eval=3,
                              k=1, seeds=(0,), strategies=("random", "stat"), n_boot=10, out=str(out)))
    assert isinstance(res, EvalResult)
    data = json.loads((out / "results.json").read_text())
    assert list(data) == RESULTS_KEYS
    for k, keys in NESTED_KEYS.items():
        assert sorted(data[k]) == keys, k
    assert data["sizes"]["seeds"] == [0] and data["config"]["seeds"] == [0]
    assert _canon(data) == _canon(json.loads(json.dumps(res.to_dict(), default=str)))
    assert res.selection.samples and "samples" not in data["selection"] and "quality_pairs" not in data


def _check_harness_sample(it: dict, n_opt: int) -> None:
    # lm-evaluation-harness's --log_samples fields, one loglikelihood request and response per option.
    assert isinstance(it["doc_id"], int) and isinstance(it["doc"], dict) and isinstance(it["target"], int)
    assert len(it["arguments"]) == len(it["resps"]) == len(it["filtered_resps"]) == n_opt
    for (ctx, cont), resp, filt in zip(it["arguments"], it["resps"], it["filtered_resps"]):
        assert isinstance(ctx, str) and isinstance(cont, str) and ctx.endswith("Sentiment:")
        assert resp == [filt] and len(filt) == 2 and isinstance(filt[0], float) and filt[1] is None
    assert [f[0] for f in it["filtered_resps"]] == it["logprobs"]  # the scores behind the prediction
    lls = [f[0] for f in it["filtered_resps"]]
    assert lls.index(max(lls)) == it["pred"] and it["acc"] == float(it["pred"] == it["gold"] == it["target"])
    assert it["metrics"] == ["acc"] and it["filter"] == "none" and len(it["prompt_hash"]) == 64


def test_samples_and_results_json_in_lm_eval_shape(tiny_model_dir, study_jsonl, tmp_path):
    from lm_eval.api.metrics import mean_stderr

    st = build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "store", layers="0,-1", store_dtype="float32"))
    out = tmp_path / "r"
    evaluate(EvalConfig(key=st.key, dtype="float32", home=str(st.home), n_candidates=8, n_probes=4, n_eval=6,
                        k=2, seeds=(0, 1), strategies=("random",), n_boot=10, out=str(out)))
    data = json.loads((out / "results.json").read_text())
    block = data["lm_eval"]
    runs = [r for r in data["selection"]["runs"] if "skipped" not in r]
    assert len(block["results"]) == len(runs) == len(block["n-samples"]) == len(block["versions"])
    for run in runs:
        key = f"{data['task']}|{run['strategy']}|seed{run['seed']}"
        name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", f"{run['strategy']}_seed{run['seed']}") + ".jsonl"
        items = [json.loads(x) for x in (out / "samples" / name).read_text().splitlines()]
        for it in items:
            assert it["strategy"] == run["strategy"] and it["seed"] == run["seed"] and "demo_ids" in it
            _check_harness_sample(it, 2)
        assert [it["doc_id"] for it in items] == list(range(len(items)))
        acc = [it["acc"] for it in items]
        r = block["results"][key]
        assert r["alias"] == key and r["acc,none"] == pytest.approx(run["accuracy"])
        assert r["acc_stderr,none"] == pytest.approx(mean_stderr(acc))
        assert block["n-samples"][key] == {"original": len(items), "effective": len(items)} and len(items) == 6
    assert block["config"]["num_fewshot"] == 2 and block["config"]["model_dtype"] == "float32"


def test_run_from_python_equals_the_cli(tiny_model_dir, tmp_path):
    d = shared_data_dir()
    if d is None or not (d / "arc").exists():
        pytest.skip("the shared arc data is not here")
    home = tmp_path / "store"
    args = ["--preset", "paper-arc_challenge-llama", "--model", str(tiny_model_dir["llama"]), "--dtype", "float32",
            "--device", "cpu", "--data-dir", str(d), "--limit", "12", "--n-candidates", "8", "--n-probes", "4",
            "--n-eval", "3", "--strategies", "random,stat", "--seeds", "0,1", "--store", str(home)]
    cli = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    r = run(RunConfig(preset="paper-arc_challenge-llama", model=str(tiny_model_dir["llama"]), dtype="float32",
                      device="cpu", data_dir=str(d), limit=12, n_candidates=8, n_probes=4, n_eval=3, strategies=("random", "stat"),
                      seeds=(0, 1), out=str(tmp_path / "py"), home=str(home)))
    assert r.build["cache_hit"] and r.neighbors == str(tmp_path / "py" / "neighbors.jsonl")
    assert (tmp_path / "py" / "neighbors.jsonl").read_text() == (tmp_path / "cli" / "neighbors.jsonl").read_text()
    data = json.loads((tmp_path / "cli" / "results.json").read_text())
    doc = json.loads(json.dumps(r.results.to_dict(), default=str))
    for x in (data, doc):
        x.pop("seconds")
        x["config"].pop("out")
    assert _canon(doc) == _canon(data)
    assert data["sizes"] == {"n_candidates": 8, "n_probes": 4, "n_eval": 3, "k": 1, "seeds": [0, 1]}
    assert r.results.sizes.k == PRESETS["paper-arc_challenge-llama"].k and r.results.task == "arc_challenge"
    assert f"build {r.build['key'][:16]}" in cli.stdout and "report:" in cli.stdout


def test_run_accepts_a_preset_name_or_object():
    with pytest.raises(ConfigError, match="unknown preset"):
        run("no-such-preset")
    p = Preset(model="m", task="sst2", k=2, n_candidates=8, n_probes=4, components=("mlp",), layers="0",
               context_k=0, max_length=128, masks=("isolated",))
    assert RunConfig(preset=p).resolve() is p and RunConfig(preset="paper-gsm8k-qwen").resolve().task == "gsm8k"


def test_cli_options_left_out_give_the_library_defaults(monkeypatch):
    """An option the user does not give ends up as the dataclass's default in
    the config the command hands to the library."""
    seen = {}

    def capture(name):
        def fn(cfg, progress=None, remote=None):
            seen[name] = cfg
            raise ConfigError("captured")
        return fn

    monkeypatch.setattr(pipeline, "resolve_key", lambda key, home: "k" * 64)
    monkeypatch.setattr(pipeline, "evaluate", capture("evaluate"))
    monkeypatch.setattr(pipeline, "run", capture("run"))
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "abc", "--store", "/s"])
    assert res.exit_code == ConfigError.exit_code and "captured" in res.stderr
    assert seen["evaluate"] == EvalConfig(key="k" * 64, home="/s")
    res = runner.invoke(app, ["run", "--preset", "paper-boolq-llama", "--store", "/s"], env={"ACTCACHE_DATA_DIR": ""})
    assert res.exit_code == ConfigError.exit_code
    assert seen["run"] == dataclasses.replace(RunConfig(preset="paper-boolq-llama", home="/s"),
                                              data_dir=seen["run"].data_dir)
    assert seen["run"].strategies == pipeline.DEFAULT_STRATEGIES  # run's list had drifted (no embed-knn)


def test_presets_command_lists_the_library_presets():
    res = CliRunner().invoke(app, ["presets"])
    assert res.exit_code == 0
    lines = res.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(PRESETS)
    p = PRESETS["paper-arc_challenge-qwen"]
    assert any(ln.split()[1:3] == [p.model, p.task] for ln in lines)


def test_context_seed_reaches_the_build(monkeypatch):
    """`build --context-seed`, `run --context-seed` and RunConfig/Preset.context_seed
    end up in the BuildConfig handed to the builder (None: the preset's)."""
    from actcache import builder

    seen = []

    def capture(cfg, progress=None, remote=None):
        seen.append(cfg)
        raise ConfigError("captured")

    monkeypatch.setattr(builder, "build", capture)
    runner = CliRunner()
    res = runner.invoke(app, ["build", "--context-k", "1", "--context-seed", "3", "--store", "/s"])
    assert res.exit_code == ConfigError.exit_code and (seen[-1].context_k, seen[-1].context_seed) == (1, 3)
    res = runner.invoke(app, ["run", "--preset", "paper-boolq-llama", "--context-seed", "2", "--store", "/s"])
    assert res.exit_code == ConfigError.exit_code and seen[-1].context_seed == 2
    assert seen[-1].context_k == PRESETS["paper-boolq-llama"].context_k == 1
    p = dataclasses.replace(PRESETS["paper-boolq-llama"], context_seed=5)
    with pytest.raises(ConfigError, match="captured"):
        run(RunConfig(preset=p, home="/s"))
    assert seen[-1].context_seed == 5
    with pytest.raises(ConfigError, match="captured"):
        run(RunConfig(preset=p, context_seed=0, home="/s"))
    assert seen[-1].context_seed == 0
