"""Records in lm-evaluation-harness's shapes (0.4.x), so the selection
experiment's numbers can be set beside a harness run.

`sample_fields` gives one eval input's fields of a ``--log_samples`` record
(doc_id, doc, target, arguments, resps, filtered_resps, filter, metrics, the
three hashes, and the metric values); `lm_eval_block` gives the ``"lm_eval"``
object of results.json (results, n-samples, config, versions) with one
harness "task" per selection run, named ``<task>|<strategy>|seed<seed>``.

Loglikelihood responses are ``[loglik, is_greedy]`` per option, as the harness
writes them; actcache never computes the vocabulary argmax, so ``is_greedy``
is null. Cheap to import (standard library only).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Sequence

FILTER = "none"  # the harness's filter name when a task defines no filters


def hash_string(text: str) -> str:
    """sha256 hex digest, as the harness hashes docs, prompts and targets."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mean_stderr(values: Sequence[float]) -> float | str:
    """Standard error of a mean as the harness reports it: the sample standard
    deviation (n - 1) over sqrt(n); "N/A" for fewer than two values."""
    n = len(values)
    if n < 2:
        return "N/A"
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def run_key(task: str, strategy: str, seed: int) -> str:
    """The harness task name of one selection run."""
    return f"{task}|{strategy}|seed{seed}"


def sample_fields(doc_id: int, doc: dict, target, context: str, options: Sequence[str] | None,
                  logliks: Sequence[float] | None, metrics: dict, generated: str | None = None,
                  until: Sequence[str] = ()) -> dict:
    """One eval input's record fields in the harness's shape.

    Scored tasks (``options`` given): one ``[context, option]`` loglikelihood
    request per option, ``resps`` ``[[[loglik, null]], ...]`` and
    ``filtered_resps`` ``[[loglik, null], ...]`` (one per option). Generative
    tasks: one ``[context, {"until": [...]}]`` request and the generated text.
    ``metrics`` maps metric names to this input's values.
    """
    if options is not None:
        args = [[context, o] for o in options]
        filtered = [[float(x), None] for x in logliks]
        resps = [[r] for r in filtered]
    else:
        args = [[context, {"until": list(until)}]]
        filtered = [generated]
        resps = [[generated]]
    return {"doc_id": doc_id, "doc": doc, "target": target, "arguments": args, "resps": resps,
            "filtered_resps": filtered, "filter": FILTER, "metrics": list(metrics),
            "doc_hash": hash_string(json.dumps(doc, indent=2, default=str, ensure_ascii=False)),
            "prompt_hash": hash_string(context), "target_hash": hash_string(str(target)), **metrics}


def _run_results(key: str, items: list[dict]) -> dict:
    """One run's results entry: every metric's mean and stderr, and the alias."""
    names = items[0]["metrics"] if items else []
    out: dict = {"alias": key}
    for name in names:
        vals = [float(it[name]) for it in items]
        out[f"{name},{FILTER}"] = sum(vals) / len(vals)
        out[f"{name}_stderr,{FILTER}"] = mean_stderr(vals)
    return out


def lm_eval_block(task: str, samples: list[dict], config: dict, version: str) -> dict:
    """results.json's ``"lm_eval"`` object from the selection's per-run samples
    (``{"strategy", "seed", "items"}`` each): the harness's results, n-samples,
    config and versions, one harness task per run (see `run_key`)."""
    results, n, versions = {}, {}, {}
    for run in samples:
        key = run_key(task, run["strategy"], run["seed"])
        results[key] = _run_results(key, run["items"])
        n[key] = {"original": len(run["items"]), "effective": len(run["items"])}
        versions[key] = version
    return {"results": results, "n-samples": n, "config": config, "versions": versions}
