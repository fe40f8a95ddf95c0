"""The 1-shot quality matrix and its cache.

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
from typing import Callable

import numpy as np

from .config import EvalConfig
from .errors import DatasetError, MismatchError
from .models import resolve_device, resolve_dtype
from .prompts import prompt_segments
from . import score
from .score import TokenCount
from .store import Store, derive_key, load_npz, try_save_npz

Progress = Callable[[str, int, int], None]

QUALITY_CHUNK_PROMPTS = 512  # prompts per flushed chunk of the quality matrix (resume granularity)


@dataclass(frozen=True)
class QualityMatrix:
    """The 1-shot score of every candidate on every probe of its half.

    cand_rows (N,), probe_rows (P,): int64 store rows; cand_half (N,),
        probe_half (P,): int8, 0 discovery, 1 confirmation (see `StudyRows`).
    correct (N, P), margin (N, P): float64 per pair (margin is the gold-label
        log-prob margin; for generation the gold answer's per-token
        log-likelihood, and correct is NaN). Pairs across halves are not
        scored and hold NaN.
    zs_correct (P,), zs_margin (P,): float64 zero-shot scores of the probes.
    key: the matrix's derive_key; path: its file ("" when a read-only store
        could not keep it); meta: its provenance (meta["tokens"] holds the
        tokens computed vs in the prompts).
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
    cand_half: np.ndarray = None
    probe_half: np.ndarray = None

    def block(self, h: int, quality: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate positions, probe positions, (n_h, p_h) scores) of half h."""
        ci, pj = np.flatnonzero(self.cand_half == h), np.flatnonzero(self.probe_half == h)
        return ci, pj, self.scores(quality)[0][np.ix_(ci, pj)]

    def scores(self, quality: str) -> tuple[np.ndarray, np.ndarray]:
        """((N, P), (P,)) float64: the pair and zero-shot scores under
        quality "correct" (0/1) or "margin"."""
        if quality == "correct":
            return self.correct, self.zs_correct
        return self.margin, self.zs_margin


@dataclass(frozen=True)
class StudyRows:
    """The rows `evaluate` draws (seeded), as int64 store rows.

    cands (N,), cand_half (N,): candidates and their half (0 discovery,
        1 confirmation); probes (P,), probe_half (P,): the same for probes.
        A candidate is scored on the probes of its own half only, so the
        confirmation re-tests a discovery finding on other candidates *and*
        other probes.
    evals: the selection experiment's eval inputs.
    labels_left_out: probe labels too rare in the eval split to balance.

    Disjoint by construction: no row is in two roles; no two probes, and no
    candidate and probe, share a near-duplicate key (a BoolQ passage, a test
    stem that also sits in train); candidates sharing a key fall in one half;
    no eval input shares a key with a probe. Probes are stratified by label:
    every kept label has the same count in each half.
    """

    cands: np.ndarray
    cand_half: np.ndarray
    probes: np.ndarray
    probe_half: np.ndarray
    evals: np.ndarray
    labels_left_out: tuple = ()

    def half(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(candidate rows, probe rows) of half h (0 discovery, 1 confirmation)."""
        return self.cands[self.cand_half == h], self.probes[self.probe_half == h]


def _balanced_probes(store: Store, n_probes: int, rng: random.Random) -> tuple[list, list, tuple]:
    """(probe rows, their halves, labels left out): the same even count m of
    probes for every label, half of each label's probes in each half, no two
    sharing a near-duplicate key. m = n_probes // labels, capped by the rarest
    label; a label with fewer than half of n_probes // labels usable rows is left
    out (and reported) rather than shrinking every other label to its size."""
    by: dict = {}
    for r in store.eval_rows:
        by.setdefault(int(store.labels[r]), []).append(int(r))
    for rows in by.values():
        rng.shuffle(rows)
    taken: set = set()
    usable: dict = {}
    for g in sorted(by):  # distinct near-duplicate keys within and across labels
        keep = []
        for r in by[g]:
            if store.dups[r] not in taken:
                keep.append(r)
                taken.add(store.dups[r])
        usable[g] = keep
    want = max(1, n_probes // max(1, len(usable)))
    kept = {g: v for g, v in usable.items() if len(v) >= max(2, want // 2)}
    if not kept:
        raise DatasetError("the eval split has no label with 2 or more usable rows for probes; rebuild with a "
                           "larger --eval-limit")
    m = min(n_probes // len(kept), *(len(v) for v in kept.values()))
    m -= m % 2  # each half gets m / 2 of every label
    if m < 2:
        raise DatasetError(f"--n-probes {n_probes} leaves under 2 probes per label for {len(kept)} labels; "
                           f"use --n-probes {2 * len(kept)} or more (and a build with enough eval rows)")
    probes, halves = [], []
    for g in sorted(kept):
        probes += kept[g][:m]
        halves += [0] * (m // 2) + [1] * (m // 2)
    return probes, halves, tuple(sorted(set(usable) - set(kept)))


def _split_candidates(store: Store, cands: list, confirm_fraction: float, rng: random.Random) -> np.ndarray:
    """(N,) int8 halves of sorted candidate rows: per label, groups of rows that
    share a near-duplicate key go to one half; each label's confirmation share is
    round(count * confirm_fraction)."""
    half = np.zeros(len(cands), dtype=np.int8)
    pos = {r: i for i, r in enumerate(cands)}
    by: dict = {}
    for r in cands:
        by.setdefault(int(store.labels[r]), {}).setdefault(store.dups[r], []).append(r)
    for g in sorted(by):
        groups = list(by[g].values())
        rng.shuffle(groups)
        target = round(sum(len(x) for x in groups) * confirm_fraction)
        n_conf = 0
        for grp in groups:
            if n_conf + len(grp) <= target:
                for r in grp:
                    half[pos[r]] = 1
                n_conf += len(grp)
    return half


def study_rows(store: Store, cfg: EvalConfig) -> StudyRows:
    """The candidates, probes (each split into discovery and confirmation halves)
    and selection-eval inputs of `cfg`, seeded by `cfg.seed`; see `StudyRows`."""
    rng = random.Random(cfg.seed)
    probes, phalf, left_out = _balanced_probes(store, cfg.n_probes, rng) if cfg.n_probes else ([], [], ())
    taken = set(store.dups[probes])
    pool = [int(r) for r in store.pool_rows if store.dups[r] not in taken]
    if not pool:
        raise DatasetError("the build's pool is empty (or every row duplicates a probe); rebuild with a larger --limit")
    cands = sorted(rng.sample(pool, min(cfg.n_candidates, len(pool))))
    order = np.argsort(probes, kind="stable")
    probes_s = np.array(probes, dtype=np.int64)[order]
    is_probe = set(probes)
    rest = sorted(int(r) for r in store.eval_rows if r not in is_probe and store.dups[r] not in taken)
    evals = sorted(random.Random(cfg.seed + 7).sample(rest, min(cfg.n_eval, len(rest))))
    return StudyRows(np.array(cands, dtype=np.int64), _split_candidates(store, cands, cfg.confirm_fraction, rng),
                     probes_s, np.array(phalf, dtype=np.int8)[order], np.array(evals, dtype=np.int64), left_out)


@dataclass(frozen=True)
class Part:
    """One flushed unit of the matrix: the zero-shot scores of the probes
    (`cand_rows` empty), or some candidates of one half on that half's probes.
    cand_pos / probe_pos: their positions in the matrix; path: the flushed file."""

    path: Path
    cand_rows: np.ndarray
    probe_rows: np.ndarray
    cand_pos: np.ndarray
    probe_pos: np.ndarray


def quality_parts(store: Store, rows: "StudyRows", qkey: str, pdir: Path) -> tuple[Part, list[Part]]:
    """(zero-shot part, candidate parts) of the matrix: a pure function of the
    study rows, so every process that plans it flushes the same files."""
    zs = Part(pdir / f"{derive_key(qkey, 'quality-part', part='zero-shot')[:32]}.npz", rows.cands[:0], rows.probes,
              np.arange(0), np.arange(len(rows.probes)))
    parts = []
    for h in (0, 1):
        ci_rows = np.flatnonzero(rows.cand_half == h)
        pj = np.flatnonzero(rows.probe_half == h)
        per_chunk = max(1, QUALITY_CHUNK_PROMPTS // max(1, len(pj)))
        for i in range(0, len(ci_rows), per_chunk):
            pos = ci_rows[i:i + per_chunk]
            ids = [str(store.ids[r]) for r in rows.cands[pos]]
            parts.append(Part(pdir / f"{derive_key(qkey, 'quality-part', half=h, cands=ids)[:32]}.npz",
                              rows.cands[pos], rows.probes[pj], pos, pj))
    return zs, parts


def flushed_part(part: Part) -> dict | None:
    """The part's flushed scores if whole and of the right shape, else None."""
    got = load_npz(part.path)
    shape = (len(part.probe_rows),) if len(part.cand_rows) == 0 else (len(part.cand_rows), len(part.probe_rows))
    return got if got is not None and got.get("margin") is not None and got["margin"].shape == shape else None


def compute_part(lm, task, store: Store, part: Part, batch_size: int, tokens: TokenCount) -> dict:
    """Score one part and flush it (when the store can be written)."""
    probes = store.examples(part.probe_rows)
    if len(part.cand_rows) == 0:
        c_, m_ = score.pair_scores(lm, task, [prompt_segments(task, [], p) for p in probes], probes, batch_size,
                                   counter=tokens)
        out = {"correct": c_, "margin": m_}
    else:
        cands = store.examples(part.cand_rows)
        out = {"correct": np.empty((len(cands), len(probes))), "margin": np.empty((len(cands), len(probes)))}
        # One candidate's prompts share its demonstration as a prefix: a few
        # candidates per call keep batches full while the prefix KV is reused.
        step = max(1, 64 // len(probes))
        for j in range(0, len(cands), step):
            chunk = cands[j:j + step]
            prompts = [prompt_segments(task, [c], p) for c in chunk for p in probes]
            c_, m_ = score.pair_scores(lm, task, prompts, probes * len(chunk), batch_size, counter=tokens)
            out["correct"][j:j + len(chunk)] = c_.reshape(len(chunk), len(probes))
            out["margin"][j:j + len(chunk)] = m_.reshape(len(chunk), len(probes))
    try_save_npz(part.path, out)
    return out


def quality_matrix(store: Store, cfg: EvalConfig, lm=None, progress: Progress | None = None,
                   remote=None) -> QualityMatrix:
    """The 1-shot score of every candidate on every probe of its own half,
    cached next to the build under its derive_key and reused; see `QualityMatrix`.
    A store that cannot be written (read-only) gets the matrix computed in memory.

    remote: an engine that flushes the missing parts elsewhere first
    (`cluster.RayEngine.run_quality(store, cfg, parts, progress)`, returning the
    TokenCount it computed); this process then assembles the matrix."""
    task = store.task()
    rows = study_rows(store, cfg)

    device = resolve_device(cfg.device or store.config["model"].get("device", "cpu"))
    dtype = resolve_dtype(cfg.dtype or "auto", device)
    params = {"cands": rows.cands.tolist(), "cand_half": rows.cand_half.tolist(), "probes": rows.probes.tolist(),
              "probe_half": rows.probe_half.tolist(), "dtype": dtype, "shots": 1, "design": "halves"}
    qkey = derive_key(store.key, "quality", **params)
    path = store.derived_path("quality", **params)
    if path.exists():
        q = load_quality(store, path)
        if q is not None:
            return q
        warnings.warn(f"quality matrix {path.name} was damaged; recomputing it", stacklevel=2)
    lm = lm or store.load_model(cfg.dtype, cfg.device)
    pdir = path.with_suffix(".partial")

    t0 = time.time()
    # Streamed: chunks of candidates are flushed (fsync + rename) to a partial
    # directory, so a run killed at any point resumes where it stopped.
    tokens = TokenCount()  # what this run computes (a resumed run skips flushed chunks)
    zs_part, parts = quality_parts(store, rows, qkey, pdir)
    if remote is not None:
        tokens.add(remote.run_quality(store, cfg, [zs_part, *parts], progress))
    zs = flushed_part(zs_part) or compute_part(lm, task, store, zs_part, cfg.batch_size, tokens)
    correct = np.full((len(rows.cands), len(rows.probes)), np.nan)
    margin = np.full_like(correct, np.nan)
    done, total = 0, len(rows.cands)  # progress counts candidates
    for part in parts:
        if progress:
            progress("quality matrix", done, total)
        done += len(part.cand_rows)
        got = flushed_part(part) or compute_part(lm, task, store, part, cfg.batch_size, tokens)
        correct[np.ix_(part.cand_pos, part.probe_pos)] = got["correct"]
        margin[np.ix_(part.cand_pos, part.probe_pos)] = got["margin"]
    if progress:
        progress("quality matrix", total, total)
    n_prompts = int(np.isfinite(margin).sum()) + len(rows.probes)
    meta = {"key": qkey, "build_key": store.key, "kind": "quality", "params": params, "task": task.name,
            "dtype": lm.provenance["dtype"], "hardware": lm.provenance["hardware"],
            "seconds": round(time.time() - t0, 2), "n_prompts": n_prompts, "tokens": tokens.as_dict(),
            "labels_left_out": list(rows.labels_left_out),
            "engine": getattr(remote, "provenance", None) or {"kind": "local", "workers": 1},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    arrays = dict(cand_rows=rows.cands, probe_rows=rows.probes, cand_half=rows.cand_half,
                  probe_half=rows.probe_half, correct=correct, margin=margin,
                  zs_correct=zs["correct"], zs_margin=zs["margin"])
    if not try_save_npz(path, {**arrays, "meta": np.array(json.dumps(meta))}):
        return _matrix(arrays, meta, "")  # a read-only store: in memory only
    shutil.rmtree(pdir, ignore_errors=True)
    return load_quality(store, path)


def load_quality(store: Store, path: Path) -> QualityMatrix | None:
    """Load a stored quality matrix; None if the file is damaged (recompute it),
    MismatchError if it belongs to another build."""
    q = load_npz(path)
    need = {"cand_rows", "probe_rows", "cand_half", "probe_half", "correct", "margin", "zs_correct", "zs_margin",
            "meta"}
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
    if (q["cand_rows"].max(initial=0) >= n or q["probe_rows"].max(initial=0) >= n
            or q["margin"].shape != (len(q["cand_rows"]), len(q["probe_rows"]))):
        raise MismatchError(f"quality matrix {path.name} does not fit build {store.key[:12]}; recompute it")
    return _matrix(q, meta, str(path))


def _matrix(q: dict, meta: dict, path: str) -> QualityMatrix:
    return QualityMatrix(q["cand_rows"], q["probe_rows"], q["correct"], q["margin"], q["zs_correct"],
                         q["zs_margin"], key=meta["key"], path=path, meta=meta,
                         cand_half=q["cand_half"].astype(np.int8), probe_half=q["probe_half"].astype(np.int8))


