"""`actcache evaluate`: ICL scoring, the 1-shot quality matrix, the
activation-versus-quality correlation study (raw and label-controlled), and the
selection experiment, all on top of a cached build.

Quality matrix: for N pool candidates and P eval probes, the 1-shot prompt
`demo(candidate) + "\\n\\n" + query(probe)` is scored for every pair (the
candidate's demonstration is a shared prefix, so its KV cache is computed once
for all P probes). Per pair we keep correctness and the gold-label margin (gold
log-prob minus the best other option's). The zero-shot score of each probe is
kept too. The matrix is stored next to the build with its provenance and key,
and reused by later runs.

For generative tasks (gsm8k) the matrix holds the per-token log-likelihood of
the gold answer (teacher-forced); the selection experiment uses greedy decoding
and exact match on the final number.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .capture import STATS
from .data import Example, Task, prompt_segments
from .errors import ConfigError, DatasetError, MismatchError, ModelError
from .store import Store, load_npz, save_npz

Progress = Callable[[str, int, int], None]
STUDY_REF = 0.33  # the 2026 study's largest |Spearman rho|
QUALITY_CHUNK_PROMPTS = 512  # prompts per flushed chunk of the quality matrix (resume granularity)
QUALITY_DEFS = ("mean", "gain", "balanced")
# Order of retrieved demonstrations in the prompt. KATE (Liu et al. 2022) puts the
# most similar one last, nearest the query; "shuffle" is a seeded permutation.
KNN_ORDERS = ("similar-last", "similar-first", "shuffle")
DEFAULT_STRATEGIES = ("random", "knn", "vote-k", "k-center", "kmeans", "stat", "embed-knn")

# Presets that reproduce the study's set-up where the weights are available.
# On this machine run them with --model gemma-3-270m (and smaller sizes).
PRESETS: dict[str, dict] = {
    f"paper-{task}-{m}": dict(model=model, task=task, k=1, n_candidates=1000, n_probes=100,
                             components=("mlp",), layers="all", context_k=1, max_length=1024,
                             masks=("isolated", "in-context", "label-masked", "sink-masked"))
    for task in ("boolq", "arc_challenge", "openbookqa", "gsm8k")
    for m, model in (("llama", "meta-llama/Llama-3.2-3B"), ("qwen", "Qwen/Qwen2.5-3B"))
}


@dataclass(frozen=True)
class EvalConfig:
    """What `actcache evaluate` computes. Sizes are capped by the build's splits.

    quality: "margin" (gold log-prob margin) or "correct" (0/1) per pair.
    quality_def: "mean" (mean 1-shot score), "gain" (mean gain over zero-shot),
        or "balanced" (probe classes weighted equally, relative to same-label
        candidates; see correlate.label_balanced_quality).
    """

    key: str = "last"
    home: str | None = None
    n_candidates: int = 120
    n_probes: int = 40
    n_eval: int = 100
    k: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    knn_layers: str = "auto"
    knn_order: str = "similar-last"
    votek_budget: int = 100
    quality: str = "margin"
    quality_def: str = "mean"
    dtype: str = "auto"
    compare_fp32: bool = True
    batch_size: int = 16
    n_boot: int = 200
    pair_mask: str = "label-masked"
    max_length: int = 2048
    demos: str | None = None  # a query JSONL (from `actcache query`) to evaluate as a strategy
    out: str = "actcache-report"
    seed: int = 0

    def validate(self) -> None:
        if self.quality not in ("margin", "correct"):
            raise ConfigError(f"--quality must be margin or correct, not {self.quality!r}")
        if self.quality_def not in QUALITY_DEFS:
            raise ConfigError(f"--quality-def must be one of {QUALITY_DEFS}, not {self.quality_def!r}")
        if self.n_candidates < 4 or self.n_probes < 2:
            raise ConfigError("need at least 4 candidates and 2 probes for a correlation")
        if self.k < 0:
            raise ConfigError("--k must be >= 0")
        if self.knn_order not in KNN_ORDERS:
            raise ConfigError(f"--knn-order must be one of {KNN_ORDERS}, not {self.knn_order!r}")
        if self.votek_budget < self.k:
            raise ConfigError(f"--votek-budget {self.votek_budget} is below --k {self.k}")
        for opt, v, least in (("--n-eval", self.n_eval, 1), ("--n-boot", self.n_boot, 0),
                              ("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 8)):
            if v < least:
                raise ConfigError(f"{opt} {v} must be at least {least}")
        if not self.seeds:
            raise ConfigError("no --seeds given; pass comma-separated integers, e.g. 0,1,2")


def parse_seeds(spec: str | None) -> tuple[int, ...]:
    """'--seeds 0,1,2' -> (0, 1, 2). Raises ConfigError naming a non-integer entry."""
    out = []
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"bad seed {part.strip()!r} in --seeds {spec!r}; give comma-separated integers, "
                              f"e.g. 0,1,2") from None
    if not out:
        raise ConfigError(f"--seeds {spec!r} names no seed; give comma-separated integers, e.g. 0,1,2")
    return tuple(out)


def _examples(store: Store, rows) -> list[Example]:
    out = []
    for r in rows:
        rec = store.records[int(r)]
        out.append(Example(rec["id"], tuple(rec["fields"].items()), int(rec["label"]),
                           tuple(rec["choices"]), rec["answer"]))
    return out


def store_task(store: Store) -> Task:
    """The build's Task, as the build stored it (see Store.task)."""
    return store.task()


def _load_lm(store: Store, dtype: str | None):
    from .models import ModelSpec, load_model

    m = dict(store.config["model"])
    if dtype:
        m["dtype"] = dtype
    lm = load_model(ModelSpec(**m), store.home)
    if lm.provenance["weights_sha256"] != store.provenance["model"]["weights_sha256"]:
        raise MismatchError(f"the model {m['model']!r} loaded now has other weights than build "
                            f"{store.key[:12]} was made with; rebuild, or restore those weights")
    return lm


def _score(lm, task: Task, prompts, queries: list[Example], batch_size: int, options=None,
           counter=None) -> np.ndarray:
    """(n, c) option log-probs (classification / multiple choice); ``counter``
    (a score.TokenCount) accumulates tokens computed and in the prompts."""
    from .score import score_options

    opts = options if options is not None else (
        list(task.label_words) if task.kind == "classification" else [list(task.options(q)) for q in queries])
    return score_options(lm.model, lm.tokenizer, prompts, opts, batch_size=batch_size, counter=counter)


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


def _pair_scores(lm, task: Task, prompts, queries, batch_size, counter=None) -> tuple[np.ndarray, np.ndarray]:
    """(correct (n,), margin (n,)) for classification/MC; for generation the
    per-token log-likelihood of the gold answer and its sign-free value."""
    from .score import classify, margins, score_options

    if task.kind == "generation":
        ll = score_options(lm.model, lm.tokenizer, prompts, [[task.target(q)] for q in queries],
                           batch_size=batch_size, length_normalize=True, counter=counter)[:, 0]
        return np.full(len(ll), np.nan), ll
    s = byte_normalized(task, queries, _score(lm, task, prompts, queries, batch_size, counter=counter))
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


def quality_matrix(store: Store, cfg: EvalConfig, lm=None, progress: Progress | None = None) -> dict:
    """The 1-shot score of every (candidate, probe) pair, cached next to the build.

    Returns a dict with cand_rows (N,), probe_rows (P,) int64 store rows,
    correct (N, P), margin (N, P), zs_correct (P,), zs_margin (P,) float64,
    key (this matrix's key), and meta (its provenance; meta["tokens"] holds the
    tokens computed vs in the prompts when the matrix was made).
    """
    from .builder import canonical_key

    task = store_task(store)
    cand_rows, probe_rows, _ = study_rows(store, cfg)
    from .models import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.dtype or "auto", resolve_device(store.config["model"].get("device", "cpu")))
    payload = {"build": store.key, "cands": cand_rows.tolist(), "probes": probe_rows.tolist(),
               "dtype": dtype, "kind": "quality-matrix-1shot"}
    qkey = canonical_key(payload)
    path = store.dir / "quality" / f"{qkey[:24]}.npz"
    if path.exists():
        q = load_quality(store, path)
        if q is not None:
            return q
        warnings.warn(f"quality matrix {path.name} was damaged; recomputing it", stacklevel=2)
    lm = lm or _load_lm(store, cfg.dtype)
    cands, probes = _examples(store, cand_rows), _examples(store, probe_rows)
    from .score import TokenCount

    t0 = time.time()
    # Streamed: chunks of candidates are flushed (fsync + rename) to a partial
    # directory, so a run killed at any point resumes where it stopped.
    tokens = TokenCount()  # what this run computes (a resumed run skips flushed chunks)
    pdir = path.with_suffix(".partial")
    zs = load_npz(pdir / "zero_shot.npz")
    if zs is None or zs["margin"].shape != (len(probes),):
        c_, m_ = _pair_scores(lm, task, [prompt_segments(task, [], p) for p in probes], probes, cfg.batch_size,
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
                c_, m_ = _pair_scores(lm, task, prompts, probes * len(chunk), cfg.batch_size,
                                      counter=tokens)
                part["correct"][j:j + len(chunk)] = c_.reshape(len(chunk), len(probes))
                part["margin"][j:j + len(chunk)] = m_.reshape(len(chunk), len(probes))
            save_npz(pdir / f"c{ci:05d}.npz", part)
        correct[i:i + len(sub)] = part["correct"]
        margin[i:i + len(sub)] = part["margin"]
    if progress:
        progress("quality matrix", len(cands), len(cands))
    meta = {"key": qkey, "build_key": store.key, "payload": payload, "task": task.name,
            "dtype": lm.provenance["dtype"], "hardware": lm.provenance["hardware"],
            "seconds": round(time.time() - t0, 2), "n_prompts": len(cands) * len(probes) + len(probes),
            "tokens": tokens.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_npz(path, dict(cand_rows=cand_rows, probe_rows=probe_rows, correct=correct, margin=margin,
                        zs_correct=zs["correct"], zs_margin=zs["margin"], meta=np.array(json.dumps(meta))))
    shutil.rmtree(pdir, ignore_errors=True)
    return load_quality(store, path)


def load_quality(store: Store, path: Path) -> dict | None:
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
    q["meta"], q["key"], q["path"] = meta, meta["key"], str(path)
    return q


def candidate_quality(q: dict, store: Store, cfg: EvalConfig) -> np.ndarray:
    """(N,) float64 quality per candidate under cfg.quality and cfg.quality_def."""
    from .correlate import gain_quality, label_balanced_quality, mean_quality

    s = q["correct"] if cfg.quality == "correct" else q["margin"]
    zs = q["zs_correct"] if cfg.quality == "correct" else q["zs_margin"]
    if cfg.quality_def == "gain":
        return gain_quality(s, zs)
    if cfg.quality_def == "balanced":
        return label_balanced_quality(s, store.labels[q["probe_rows"]], store.labels[q["cand_rows"]])
    return mean_quality(s)


def correlation_study(store: Store, q: dict, cfg: EvalConfig, progress: Progress | None = None) -> dict:
    """Spearman (raw, within-label, partial on label) of every stored statistic
    with candidate quality, plus pair-level similarity analyses."""
    from .correlate import candidate_correlations, pair_correlations, replicate, spearman, summarize

    cand, probes = q["cand_rows"], q["probe_rows"]
    quality = candidate_quality(q, store, cfg)
    labels = store.labels[cand]
    lengths = (store.n_tokens[cand] + store.n_target[cand]).astype(np.float64)  # demonstration tokens
    stats: dict[str, np.ndarray] = {}
    units = sorted({(a.mask, a.component, a.layer) for a in store.arrays})
    for mask, comp, layer in units:
        st = store.stats(comp, layer, mask)[cand]
        for j, name in enumerate(STATS):
            stats[f"{mask}|{comp}|{layer}|{name}"] = st[:, j]
    rows = candidate_correlations(stats, quality, labels, n_boot=cfg.n_boot, seed=cfg.seed, lengths=lengths)
    replication = replicate(stats, quality, labels, lengths, top=10, n_boot=cfg.n_boot, seed=cfg.seed)
    for r in rows:
        r["mask"], r["component"], layer, r["stat"] = r["name"].split("|")
        r["layer"] = int(layer)
    label_rho = spearman(labels, quality)[0]  # how much the demonstration's label alone explains
    # Pair level: does the candidate-probe similarity at a layer predict the 1-shot score?
    pairs = []
    score = q["correct"] if cfg.quality == "correct" else q["margin"]
    pmask = cfg.pair_mask if any(a.mask == cfg.pair_mask for a in store.arrays) else store.arrays[0].mask
    comb = sorted({(a.component, a.layer) for a in store.arrays if a.mask == pmask and a.pooling == "mean"})
    for i, (comp, layer) in enumerate(comb):
        if progress:
            progress("pair level", i, len(comb))
        X = store.acts(comp, layer, "mean", pmask)
        a, b = X[cand], X[probes]
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        res = pair_correlations(a @ b.T, score, labels, store.labels[probes],
                                n_boot=max(50, cfg.n_boot // 4), seed=cfg.seed)
        pairs.append({"component": comp, "layer": layer, "mask": pmask, **res})
    if progress and comb:
        progress("pair level", len(comb), len(comb))
    return {"rows": rows, "summary": summarize(rows, ref=STUDY_REF), "pairs": pairs,
            "label_rho": label_rho, "length_rho": spearman(lengths, quality)[0], "replication": replication,
            "quality": quality.tolist()}


# --------------------------------------------------------------------------- selection


def _knn_layers(store: Store, spec: str) -> list[int]:
    layers = store.layers
    if spec == "auto":
        return sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    from .capture import resolve_layers

    return [layers[i] if i < len(layers) else i for i in resolve_layers(spec, len(layers))]


def _best_stat(study: dict | None) -> dict:
    """The statistic the `stat` strategy ranks by: the best of the discovery half
    (controlled for label and length, see correlate.replicate), with its sign.
    Chosen from the quality matrix's candidates only, never from eval inputs."""
    top = ((study or {}).get("replication") or {}).get("top")
    if not top:
        return {"stat": "kurt", "component": "mlp", "layer": None, "mask": "isolated", "order": "high"}
    best = top[0]
    mask, comp, layer, stat = best["name"].split("|")
    return {"stat": stat, "component": comp, "layer": int(layer), "mask": mask,
            "order": "high" if best["rho_discovery"] >= 0 else "low"}


def load_demos(path: str, store: Store) -> dict:
    """Demonstration ids per test id from an `actcache query` JSONL (neighbours
    best first) or a `--strategy knn` selection file."""
    per = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise DatasetError(f"cannot read demonstrations file {path}: {e.strerror}") from None
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("build_key") and rec["build_key"] != store.key:
            raise MismatchError(f"{path} was made from build {rec['build_key'][:12]}, not {store.key[:12]}; "
                                f"rerun `actcache query` on this build")
        ids = [n["id"] for n in rec["neighbors"]] if "neighbors" in rec else list(rec.get("ids", []))
        per[str(rec["test_id"])] = ids
    if not per:
        raise DatasetError(f"{path} holds no records; make it with `actcache query`")
    return per


# Strategies that give each eval input its own demonstrations; every other
# strategy picks one subset of k shared by all inputs.
PER_INPUT = ("knn", "embed-knn", "vote-k", "file")  # strategies whose demonstrations differ per input


def demo_order(chosen: dict, test_ids: list[str], seed: int, shared: bool, order: str = "shuffle"
               ) -> list[list[str]]:
    """Demonstration order in the prompt: one list of pool ids per test id.

    A shared subset is shuffled once (seeded), so every input's prompt starts
    with the same ordered demonstrations: one prefix whose KV cache
    score_options computes once for all inputs. Per-input demonstrations come
    best first from retrieval and are laid out by `order`: "similar-last" (KATE:
    the most similar nearest the query), "similar-first", or "shuffle" (seeded).
    """
    r = random.Random(seed)
    if shared and test_ids:
        ids = list(chosen[test_ids[0]])
        if any(list(chosen[t]) != ids for t in test_ids):
            raise ConfigError("a shared-subset strategy gave the eval inputs different demonstrations")
        r.shuffle(ids)
        return [ids] * len(test_ids)
    out = []
    for tid in test_ids:
        ids = list(chosen[tid])
        if order == "similar-last":
            ids.reverse()
        elif order == "shuffle":
            r.shuffle(ids)
        out.append(ids)
    return out


def choose(store: Store, name: str, k: int, seed: int, test_ids: list[str], **opts) -> dict:
    """Demonstration ids per test input: retrieval strategies give each input its
    own k; subset strategies pick a budget of k used for every input."""
    from .select import select

    if name in ("knn", "embed-knn"):
        per = select(store, name, k=k, seed=seed, **opts).per_query
        missing = [t for t in test_ids if t not in per]
        if missing:
            raise MismatchError(f"{name} returned no neighbours for {len(missing)} eval inputs")
        return {t: per[t] for t in test_ids}
    if opts.get("layer") is None:
        opts.pop("layer", None)
    if name == "vote-k":
        # As published: select an annotation set with vote-k's graph stage, then
        # each input retrieves its k most similar examples from that set.
        from .select import retrieve_within

        budget = min(opts.pop("votek_budget", 100), len(store.pool_rows))
        ann = list(select(store, name, budget=budget, seed=seed, k=min(10, len(store.pool_rows) - 1), **opts).ids)
        return retrieve_within(store, ann, test_ids, k, **opts)
    ids = list(select(store, name, budget=k, seed=seed, **opts).ids)
    return {t: ids for t in test_ids}


def selection_experiment(store: Store, cfg: EvalConfig, lm, study: dict | None = None,
                         progress: Progress | None = None) -> dict:
    """k-shot accuracy on eval inputs for zero-shot and each strategy, over seeds.

    Subset strategies use one seeded demonstration order for all eval inputs, so
    their prompts share a prefix that is computed once per run (see demo_order).
    Returns runs (one dict per strategy x seed, with its tokens computed and in
    the prompts), summary (mean/std accuracy per strategy), eval_ids, flips
    (fp32 zero-shot comparison or None), dropped_demonstrations, and tokens
    ({"computed", "in_prompts", "saved"} over every scored prompt, the fp32
    comparison included; 0 for generative tasks, which are decoded, not scored).
    """
    from .score import TokenCount, classify, exact_match, extract_number, fit_demonstrations, generate

    task = store_task(store)
    eval_rows = study_rows(store, cfg)[2]  # never a quality-matrix probe
    if len(eval_rows) == 0:
        raise DatasetError(f"the build's {len(store.eval_rows)} eval rows are all quality-matrix probes; "
                           f"rebuild with a larger --eval-limit or lower --n-probes")
    evals = _examples(store, eval_rows)
    eval_ids = [e.id for e in evals]
    pool_by_id = {store.ids[r]: ex for r, ex in zip(store.pool_rows, _examples(store, store.pool_rows))}
    gold = np.array([e.label for e in evals])

    dropped: dict[str, int] = {}
    tokens = TokenCount()

    def fit(label: str, segs: list[str]) -> list[str]:
        # Never truncate silently: drop whole demonstrations from the front and count them.
        kept, n = fit_demonstrations(lm.tokenizer, segs[:-1], segs[-1], cfg.max_length, reserve=64)
        if n:
            dropped[label] = dropped.get(label, 0) + n
        return kept + [segs[-1]]

    def run(demos_per_query: list[list[Example]], label: str = "") -> dict:
        prompts = [fit(label, prompt_segments(task, d, q)) for d, q in zip(demos_per_query, evals)]
        count = TokenCount()
        if task.kind == "generation":
            outs = generate(lm.model, lm.tokenizer, prompts, stop=(task.stop,), max_new_tokens=256,
                            batch_size=max(1, cfg.batch_size // 4))
            em = exact_match([extract_number(o) for o in outs], [extract_number(e.answer) for e in evals])
            return {"accuracy": em, "macro_f1": float("nan"), "pred": [], "tokens": count}
        s = _score(lm, task, prompts, evals, cfg.batch_size, counter=count)
        tokens.add(count)
        # Multiple choice: acc (summed log-probs) and acc_norm (by byte length), as the harness reports.
        norm = classify(byte_normalized(task, evals, s), gold)["accuracy"] if task.kind == "multiple_choice" \
            else float("nan")
        return {**classify(s, gold), "acc_norm": norm, "tokens": count, "scores": s}

    jobs: list[tuple[str, int, dict]] = [("zero-shot", 0, {})]
    best = _best_stat(study)
    for name in cfg.strategies:
        if name == "knn":
            for L in _knn_layers(store, cfg.knn_layers):
                jobs += [(f"knn@L{L}", s, {"strategy": "knn", "layer": L}) for s in cfg.seeds]
        elif name == "stat":
            jobs += [(f"stat:{best['stat']}@{best['component']}/L{best['layer']}/{best['mask']}:{best['order']}",
                      s, {"strategy": "stat", **best}) for s in cfg.seeds]
        elif name == "vote-k":
            jobs += [(name, s, {"strategy": name, "votek_budget": cfg.votek_budget}) for s in cfg.seeds]
        else:
            jobs += [(name, s, {"strategy": name}) for s in cfg.seeds]
    if cfg.demos:
        per = load_demos(cfg.demos, store)
        missing = [t for t in eval_ids if t not in per]
        if missing:
            # Evaluate the file's own test inputs when it does not cover the sampled ones.
            evals = [e for e in _examples(store, store.eval_rows) if e.id in per]
            eval_ids, gold = [e.id for e in evals], np.array([e.label for e in evals])
            if not evals:
                raise DatasetError(f"{cfg.demos} names none of build {store.key[:12]}'s eval ids; "
                                   f"make it with `actcache query {store.key[:12]}`")
        jobs += [(f"file:{Path(cfg.demos).name}", s, {"strategy": "file"}) for s in cfg.seeds]
    results = []
    samples: list[dict] = []  # per-item records, like lm-evaluation-harness's --log_samples
    done: dict = {}
    zs_pred = None
    for j, (label, seed, opts) in enumerate(jobs):
        if progress:
            progress("selection", j, len(jobs))
        if label == "zero-shot":
            demos = [[] for _ in evals]
        else:
            opts = dict(opts)
            name = opts.pop("strategy")
            try:
                chosen = per if name == "file" else choose(store, name, k=cfg.k, seed=seed,
                                                           test_ids=eval_ids, **opts)
            except ModelError as e:  # an optional baseline whose package is absent
                results.append({"strategy": label, "seed": seed, "accuracy": float("nan"),
                                "macro_f1": float("nan"), "skipped": str(e)})
                continue
            order = demo_order(chosen, eval_ids, seed, shared=name not in PER_INPUT, order=cfg.knn_order)
            demos = [[pool_by_id[i] for i in ids] for ids in order]
        key = (label, tuple(tuple(e.id for e in d) for d in demos))
        reused = key in done  # a deterministic strategy gives every seed the same prompts: score them once
        m = done[key] if reused else run(demos, label)
        done[key] = m
        if label == "zero-shot":
            zs_pred = np.asarray(m["pred"])
        results.append({"strategy": label, "seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "acc_norm": m.get("acc_norm", float("nan")),
                        "tokens_computed": 0 if reused else m["tokens"].computed,
                        "tokens_in_prompts": m["tokens"].in_prompts, "same_prompts_as_earlier_seed": reused})
        samples.append({"strategy": label, "seed": seed, "items": [
            {"id": e.id, "demo_ids": [x.id for x in d], **({"logprobs": m["scores"][i].tolist()}
                                                           if m.get("scores") is not None else {}),
             "pred": int(m["pred"][i]) if len(m["pred"]) else None, "gold": int(gold[i])}
            for i, (e, d) in enumerate(zip(evals, demos))]})
    if progress:
        progress("selection", len(jobs), len(jobs))
    flips = None
    if cfg.compare_fp32 and lm.provenance["dtype"] != "float32" and task.kind != "generation":
        lm32 = _load_lm(store, "float32")
        m32 = classify(_score(lm32, task, [prompt_segments(task, [], q) for q in evals], evals, cfg.batch_size,
                              counter=tokens), gold)
        flips = {"n": len(evals), "flipped": int((m32["pred"] != zs_pred).sum()),
                 "acc_fp32": m32["accuracy"], "dtype": lm.provenance["dtype"]}
    def mean(v):
        v = np.asarray(v, dtype=np.float64)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

    table: dict[str, list[dict]] = {}
    for r in results:
        table.setdefault(r["strategy"], []).append(r)
    summary = []
    for k, rs in table.items():
        acc = [r["accuracy"] for r in rs]
        summary.append({"strategy": k, "mean": mean(acc), "std": float(np.nanstd(acc)) if len(acc) > 1 else 0.0,
                        "n_seeds": len(acc)})
        if task.kind == "multiple_choice":
            summary[-1]["acc_norm"] = mean([r.get("acc_norm", float("nan")) for r in rs])
    return {"runs": results, "summary": summary, "eval_ids": eval_ids, "flips": flips, "k": cfg.k,
            "samples": samples,
            "dropped_demonstrations": dropped, "max_length": cfg.max_length, "tokens": tokens.as_dict()}


# --------------------------------------------------------------------------- entry point


def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> dict:
    """Run the quality matrix, correlation study and selection experiment; write
    the report directory. Returns the results dict (also saved as results.json)."""
    from . import report

    from .models import set_threads

    cfg.validate()
    t0 = time.time()
    set_threads()
    store = Store.open(cfg.key, cfg.home)
    lm = _load_lm(store, cfg.dtype)
    q = quality_matrix(store, cfg, lm, progress)
    study = correlation_study(store, q, cfg, progress)
    selection = selection_experiment(store, cfg, lm, study, progress)
    results = {
        "config": asdict(cfg), "build_key": store.key, "quality_key": q["key"],
        "quality_tokens": q["meta"].get("tokens"),  # None for a matrix stored before tokens were counted
        "task": store.task_name, "model": store.provenance["model"],
        "quality_probe_rows": q["probe_rows"].tolist(), "quality_cand_rows": q["cand_rows"].tolist(),
        "quality_pairs": {"cand_ids": store.ids[q["cand_rows"]].tolist(), "probe_ids": store.ids[q["probe_rows"]].tolist(),
                          "correct": q["correct"].tolist(), "margin": q["margin"].tolist()},
        "versions": store.provenance.get("versions"), "sizes": {
            "n_candidates": int(len(q["cand_rows"])), "n_probes": int(len(q["probe_rows"])),
            "n_eval": len(selection["eval_ids"]), "k": cfg.k, "seeds": list(cfg.seeds)},
        "zero_shot_probe_acc": float(np.nanmean(q["zs_correct"])),
        "hardware": {"dtype": lm.provenance["dtype"], "dtype_requested": lm.provenance["dtype_requested"],
                     "evaluate": lm.provenance["hardware"],
                     "build": store.provenance["model"].get("hardware"),
                     "quality_matrix": q["meta"].get("hardware")},
        "study": study, "selection": selection, "seconds": None,
    }
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out)
    report.write(results, out)
    results["out"] = str(out)
    return results


def resolve_key(key: str, home: str | None) -> str:
    """A full build key for a key, prefix, or "last"."""
    return Store.open(key, home).key


__all__ = ["EvalConfig", "PRESETS", "evaluate", "quality_matrix", "correlation_study",
           "selection_experiment", "resolve_key"]
