"""actcache's `evaluate` against lm-evaluation-harness's own run, on one build.

Both score the same eval docs of a build with the same prompts and the kNN
demonstrations of the same cached array:

- actcache: the selection experiment's `knn` strategy (`evaluate --strategies
  knn --knn-layers -1 --knn-order similar-first --dtype float32`);
- lm-eval 0.4.13: `simple_evaluate` with the Hugging Face backend on the
  build's own model files (float32), a task whose prompt is the build's
  template and label words, and `actcache.lmeval.knn_sampler` as its
  few-shot sampler.

Prints one JSON line per measurement: each side's accuracy with its 95 %
interval (Wilson for both, so they are comparable), how many docs got the same
demonstrations in the same order, the same prediction, and the largest
per-option log-likelihood difference. Needs `actcache[lmeval]`.

    python benchmarks/lmeval_agreement.py --key last --k 4 --n-eval 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def contexts(arguments) -> list[str]:
    """The context of each request, from actcache's `[[context, option], ...]` or lm-eval's
    logged `{"gen_args_0": {"arg_0": context, "arg_1": option}, ...}`."""
    if isinstance(arguments, dict):
        return [v["arg_0"] for _, v in sorted(arguments.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
    return [a[0] for a in arguments]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--key", default="last")
    ap.add_argument("--home", default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n-candidates", type=int, default=120)
    ap.add_argument("--n-probes", type=int, default=40)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", default=None, help="folder for both runs' per-doc records (default: none written)")
    a = ap.parse_args(argv)

    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    from actcache.config import EvalConfig
    from actcache.experiment import selection_experiment, wilson
    from actcache.models import hardware
    from actcache.lmeval import knn_sampler
    from actcache.quality import study_rows
    from actcache.store import Store

    st = Store.open(a.key, a.home)
    task = st.task()
    if task.kind != "classification":
        raise SystemExit(f"this comparison is written for classification builds; {st.task_name} is {task.kind}")
    cfg = EvalConfig(key=st.key, home=a.home, n_candidates=a.n_candidates, n_probes=a.n_probes, n_eval=a.n_eval,
                     k=a.k, seeds=(0,), strategies=("knn",), knn_layers="-1", knn_order="similar-first",
                     dtype="float32", compare_fp32=False, out="unused")
    cfg.validate()

    # actcache: the selection experiment's knn strategy, float32
    t0 = time.time()
    lm = st.load_model("float32")
    sel = selection_experiment(st, cfg, lm, None)
    knn_name = next(s["strategy"] for s in sel.summary if s["strategy"].startswith("knn"))
    ours = {r["id"]: r for run in sel.samples if run["strategy"] == knn_name for r in run["items"]}
    t_ours = time.time() - t0
    del lm

    # lm-eval: the same eval docs, the build's pool as few-shot docs, actcache's kNN sampler
    eval_rows = study_rows(st, cfg).evals
    eval_ids = [str(st.ids[r]) for r in eval_rows][: a.n_eval]
    ex = {e.id: e for e in st.examples(list(st.pool_rows) + list(eval_rows))}

    def doc(i: str) -> dict:
        e = ex[i]
        return dict(e.fields, id=e.id, label=int(e.label))

    import datasets

    evals = [doc(i) for i in eval_ids]
    pool = [doc(str(st.ids[r])) for r in st.pool_rows]
    words = [w[1:] if w.startswith(" ") else w for w in task.label_words]
    if any(not w.startswith(" ") for w in task.label_words):
        raise SystemExit("label words without a leading space need target_delimiter ''; not handled here")
    jinja = task.template
    for f in dict(ex[eval_ids[0]].fields):
        jinja = jinja.replace("{" + f + "}", "{{" + f + "}}")
    sampler = knn_sampler(st.key, home=a.home, layer=-1, component="mlp", id_field="id")
    tcfg = {"task": f"actcache_{st.task_name}_knn", "custom_dataset": lambda **_: {
        "validation": datasets.Dataset.from_list(evals)}, "validation_split": "validation",
        "output_type": "multiple_choice", "doc_to_text": jinja, "doc_to_target": "label",
        "doc_to_choice": words, "target_delimiter": " ", "fewshot_delimiter": "\n\n",
        "num_fewshot": a.k, "fewshot_config": {"sampler": sampler, "samples": pool},
        "metric_list": [{"metric": "acc"}]}
    t0 = time.time()
    model_dir = st.provenance["model"].get("resolved") or st.provenance["model"]["name"]
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=[ConfigurableTask(config=tcfg)], num_fewshot=a.k, batch_size=8,
                                  device="cpu", log_samples=True, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    t_lmeval = time.time() - t0
    name = tcfg["task"]
    theirs = {s["doc"]["id"]: s for s in res["samples"][name]}

    pool_text = {p["id"]: task.demo_text(ex[p["id"]]) + "\n\n" for p in pool}
    same_demos = same_prompt = same_pred = 0
    max_diff = 0.0
    for i in eval_ids:
        o, t = ours[i], theirs[i]
        prompt = contexts(t["arguments"])[0]  # lm-eval's context: demonstrations, then the doc
        same_prompt += int(contexts(o["arguments"]) == contexts(t["arguments"]))
        pos = [prompt.find(pool_text[d]) for d in o["demo_ids"]]
        same_demos += int(all(p >= 0 for p in pos) and pos == sorted(pos))
        ll = [float(r[0]) for r in t["filtered_resps"]]
        same_pred += int(max(range(len(ll)), key=ll.__getitem__) == o["pred"])
        max_diff = max(max_diff, max(abs(x - y) for x, y in zip(ll, o["logprobs"])))
    n = len(eval_ids)
    acc_ours = sum(int(ours[i]["pred"] == ours[i]["gold"]) for i in eval_ids)
    acc_theirs = sum(int(theirs[i]["acc"]) for i in eval_ids)
    hw = hardware("cpu")
    where = {"cpu": hw["device_name"], "cpu_class": hw["class"], "threads": hw["threads"], "model": model_dir, "build": st.key[:12],
             "task": st.task_name, "k": a.k, "n_eval": n}
    for side, k_right, secs in (("actcache_evaluate", acc_ours, t_ours), ("lm_eval_simple_evaluate", acc_theirs,
                                                                          t_lmeval)):
        lo, hi = wilson(k_right, n)
        print(json.dumps({"measure": "accuracy", "side": side, "acc": k_right / n, "ci95": [round(lo, 4),
                          round(hi, 4)], "seconds": round(secs, 1), **where}))
    print(json.dumps({"measure": "agreement", "same_demonstrations": same_demos, "same_prompt": same_prompt,
                      "same_prediction": same_pred,
                      "n": n, "max_abs_loglik_diff": max_diff, "lm_eval_acc_reported": res["results"][name]
                      ["acc,none"], "ratio_acc": (acc_theirs / acc_ours) if acc_ours else None, **where}))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "actcache_knn.jsonl", "w") as f:
            for i in eval_ids:
                f.write(json.dumps(ours[i]) + "\n")
        with open(out / "lm_eval_knn.jsonl", "w") as f:
            for i in eval_ids:
                f.write(json.dumps(theirs[i], default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
