"""The 1-shot quality matrix and its cache, and the scoring helpers of `evaluate`.

For N pool candidates and P eval probes, the 1-shot prompt
`demo(candidate) + "\\n\\n" + query(probe)` is scored for every pair (the
candidate's demonstration is a shared prefix, so its KV cache is computed once
for all P probes). Per pair we keep correctness and the gold-label margin (gold
log-prob minus the best other option's). The zero-shot score of each probe is
kept too. The matrix is stored next to the build under its `derive_key`, with
its provenance, streamed in chunks so that a killed run resumes, and reused by
later runs.

For generative tasks (gsm8k) the matrix holds the per-token log-likelihood of
the gold answer (teacher-forced).
"""

from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .data import Example, Task
from .errors import DatasetError, MismatchError
from .prompts import prompt_segments
from .store import Store, derive_key, load_npz, save_npz

if TYPE_CHECKING:
    from .pipeline import EvalConfig

Progress = Callable[[str, int, int], None]

QUALITY_CHUNK_PROMPTS = 512  # prompts per flushed chunk of the quality matrix (resume granularity)


@dataclass(frozen=True)
class QualityMatrix:
    """The 1-shot score of every (candidate, probe) pair of a build.

    cand_rows (N,), probe_rows (P,): int64 store rows.
    correct (N, P), margin (N, P): float64 per pair (margin is the gold-label
        log-prob margin; for generation the gold answer's per-token
        log-likelihood, and correct is NaN).
    zs_correct (P,), zs_margin (P,): float64 zero-shot scores of the probes.
    key: the matrix's derive_key; path: its file; meta: its provenance
        (meta["tokens"] holds the tokens computed vs in the prompts).
    """

    cand_rows: np.ndarray
    probe_rows: np.ndarray
    correct: np.ndarray
    margin: np.ndarray
    zs_correct: np.ndarray
    zs_margin: np.ndarray
    key: str
    path: str
    meta: dict

    def scores(self, quality: str) -> tuple[np.ndarray, np.ndarray]:
        """((N, P), (P,)) float64: the pair and zero-shot scores under
        quality "correct" (0/1) or "margin"."""
        if quality == "correct":
            return self.correct, self.zs_correct
        return self.margin, self.zs_margin


def examples_at(store: Store, rows) -> list[Example]:
    """The build's examples at store rows `rows`, rebuilt from the stored records."""
    out = []
    for r in rows:
        rec = store.records[int(r)]
        out.append(Example(rec["id"], tuple(rec["fields"].items()), int(rec["label"]),
                           tuple(rec["choices"]), rec["answer"]))
    return out


def store_task(store: Store) -> Task:
    """The build's Task, as the build stored it (see Store.task)."""
    return store.task()


def load_scoring_model(store: Store, dtype: str | None):
    """The build's model for scoring, in `dtype` (None: the build's); see `Store.load_model`."""
    return store.load_model(dtype)


def score_prompts(lm, task: Task, prompts, queries: list[Example], batch_size: int, options=None,
           counter=None, length_normalize: bool = False) -> np.ndarray:
    """(n, c) option log-probs (classification / multiple choice), summed over each
    option's tokens (averaged with `length_normalize`); ``counter`` (a
    score.TokenCount) accumulates tokens computed and in the prompts."""
    from .score import score_options

    opts = options if options is not None else (
        list(task.label_words) if task.kind == "classification" else [list(task.options(q)) for q in queries])
    return score_options(lm.model, lm.tokenizer, prompts, opts, batch_size=batch_size, counter=counter,
                         length_normalize=length_normalize)


def byte_normalized(task: Task, queries: list[Example], s: np.ndarray) -> np.ndarray:
    """lm-evaluation-harness's acc_norm scores: each option's summed log-prob
    divided by its length in UTF-8 bytes (multiple choice); other tasks as is.
    (n, c) float64; padded option slots stay -inf."""
    if task.kind != "multiple_choice":
        return s
    out = np.array(s, dtype=np.float64, copy=True)
    for i, q in enumerate(queries):
        for j, o in enumerate(task.options(q)):
            out[i, j] /= max(1, len(o.encode("utf-8")))
    return out


def pair_scores(lm, task: Task, prompts, queries, batch_size, counter=None) -> tuple[np.ndarray, np.ndarray]:
    """(correct (n,), margin (n,)) for classification/MC; for generation the
    per-token log-likelihood of the gold answer and its sign-free value."""
    from .score import classify, margins, score_options

    if task.kind == "generation":
        ll = score_options(lm.model, lm.tokenizer, prompts, [[task.target(q)] for q in queries],
                           batch_size=batch_size, length_normalize=True, counter=counter)[:, 0]
        return np.full(len(ll), np.nan), ll
    s = byte_normalized(task, queries, score_prompts(lm, task, prompts, queries, batch_size, counter=counter))
    gold = np.array([q.label for q in queries])
    return (classify(s, gold)["pred"] == gold).astype(np.float64), margins(s, gold)


def study_rows(store: Store, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate rows, probe rows, selection-eval rows), int64 store rows, seeded.

    Disjoint by construction: the selection experiment's eval inputs never
    include a probe (statistics are chosen on the probes' quality matrix, so
    testing on them would reuse what chose them), and no candidate shares a
    near-duplicate key with a probe (e.g. a BoolQ passage, or a test stem that
    also sits in train). The eval set is capped at what the probes leave.
    """
    rng = random.Random(cfg.seed)
    probes = sorted(rng.sample(list(store.eval_rows), min(cfg.n_probes, len(store.eval_rows))))
    taken = set(store.dups[probes])
    pool = [r for r in store.pool_rows if store.dups[r] not in taken]
    if not pool:
        raise DatasetError("the build's pool is empty (or every row duplicates a probe); rebuild with a larger --limit")
    cands = sorted(rng.sample(pool, min(cfg.n_candidates, len(pool))))
    rest = sorted(set(store.eval_rows.tolist()) - set(probes))
    evals = sorted(random.Random(cfg.seed + 7).sample(rest, min(cfg.n_eval, len(rest))))
    return (np.array(cands, dtype=np.int64), np.array(probes, dtype=np.int64), np.array(evals, dtype=np.int64))


def quality_matrix(store: Store, cfg: EvalConfig, lm=None, progress: Progress | None = None) -> QualityMatrix:
    """The 1-shot score of every (candidate, probe) pair, cached next to the
    build under its derive_key and reused; see `QualityMatrix`."""
    task = store_task(store)
    cand_rows, probe_rows, _ = study_rows(store, cfg)
    from .models import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.dtype or "auto", resolve_device(store.config["model"].get("device", "cpu")))
    params = {"cands": cand_rows.tolist(), "probes": probe_rows.tolist(), "dtype": dtype, "shots": 1}
    qkey = derive_key(store.key, "quality", **params)
    path = store.derived_path("quality", ".npz", **params)
    if path.exists():
        q = load_quality(store, path)
        if q is not None:
            return q
        warnings.warn(f"quality matrix {path.name} was damaged; recomputing it", stacklevel=2)
    lm = lm or load_scoring_model(store, cfg.dtype)
    cands, probes = examples_at(store, cand_rows), examples_at(store, probe_rows)
    from .score import TokenCount

    t0 = time.time()
    # Streamed: chunks of candidates are flushed (fsync + rename) to a partial
    # directory, so a run killed at any point resumes where it stopped.
    tokens = TokenCount()  # what this run computes (a resumed run skips flushed chunks)
    pdir = path.with_suffix(".partial")
    zs = load_npz(pdir / "zero_shot.npz")
    if zs is None or zs["margin"].shape != (len(probes),):
        c_, m_ = pair_scores(lm, task, [prompt_segments(task, [], p) for p in probes], probes, cfg.batch_size,
                              counter=tokens)
        zs = {"correct": c_, "margin": m_}
        save_npz(pdir / "zero_shot.npz", zs)
    correct = np.empty((len(cands), len(probes)))
    margin = np.empty_like(correct)
    per_chunk = max(1, QUALITY_CHUNK_PROMPTS // len(probes))
    # One candidate's P prompts share its demonstration as a prefix: a few
    # candidates per call keep batches full while the prefix KV is reused.
    step = max(1, 64 // len(probes))
    for ci, i in enumerate(range(0, len(cands), per_chunk)):
        if progress:
            progress("quality matrix", i, len(cands))
        sub = cands[i:i + per_chunk]
        part = load_npz(pdir / f"c{ci:05d}.npz")
        if part is None or part["margin"].shape != (len(sub), len(probes)):
            part = {"correct": np.empty((len(sub), len(probes))), "margin": np.empty((len(sub), len(probes)))}
            for j in range(0, len(sub), step):
                chunk = sub[j:j + step]
                prompts = [prompt_segments(task, [c], p) for c in chunk for p in probes]
                c_, m_ = pair_scores(lm, task, prompts, probes * len(chunk), cfg.batch_size,
                                      counter=tokens)
                part["correct"][j:j + len(chunk)] = c_.reshape(len(chunk), len(probes))
                part["margin"][j:j + len(chunk)] = m_.reshape(len(chunk), len(probes))
            save_npz(pdir / f"c{ci:05d}.npz", part)
        correct[i:i + len(sub)] = part["correct"]
        margin[i:i + len(sub)] = part["margin"]
    if progress:
        progress("quality matrix", len(cands), len(cands))
    meta = {"key": qkey, "build_key": store.key, "kind": "quality", "params": params, "task": task.name,
            "dtype": lm.provenance["dtype"], "hardware": lm.provenance["hardware"],
            "seconds": round(time.time() - t0, 2), "n_prompts": len(cands) * len(probes) + len(probes),
            "tokens": tokens.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_npz(path, dict(cand_rows=cand_rows, probe_rows=probe_rows, correct=correct, margin=margin,
                        zs_correct=zs["correct"], zs_margin=zs["margin"], meta=np.array(json.dumps(meta))))
    shutil.rmtree(pdir, ignore_errors=True)
    return load_quality(store, path)


def load_quality(store: Store, path: Path) -> QualityMatrix | None:
    """Load a stored quality matrix; None if the file is damaged (recompute it),
    MismatchError if it belongs to another build."""
    q = load_npz(path)
    need = {"cand_rows", "probe_rows", "correct", "margin", "zs_correct", "zs_margin", "meta"}
    if q is None or not need <= set(q):
        return None
    try:
        meta = json.loads(str(q.pop("meta")))
    except ValueError:
        return None
    if meta.get("build_key") != store.key:
        raise MismatchError(f"quality matrix {path.name} was computed for build "
                            f"{str(meta.get('build_key'))[:12]}, not {store.key[:12]}; recompute it")
    n = len(store.ids)
    if q["cand_rows"].max(initial=0) >= n or q["probe_rows"].max(initial=0) >= n or \
            q["margin"].shape != (len(q["cand_rows"]), len(q["probe_rows"])):
        raise MismatchError(f"quality matrix {path.name} does not fit build {store.key[:12]}; recompute it")
    return QualityMatrix(q["cand_rows"], q["probe_rows"], q["correct"], q["margin"], q["zs_correct"],
                         q["zs_margin"], key=meta["key"], path=str(path), meta=meta)


