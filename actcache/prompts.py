"""Prompt -> token rows: the one place that turns text into the ids a model sees.

Scoring, the build and query encoding all lay prompts out through this module,
so that a stored activation, a new text's activation and a scored log-prob are
computed on exactly the same token ids.

Text layout of a k-shot prompt (`prompt_segments`)::

    [instruction + "\\n\\n"] + [demo_text(d) + "\\n\\n" for d in demos] + [query_text(x)]

Tokenization contract::

    ids(prompt) = [bos] (if the tokenizer adds one on a plain call)
                  + concat(tokenizer(seg, add_special_tokens=False).input_ids
                           for seg in prompt_segments)
    ids(text)   = tokenizer(text, add_special_tokens=False).input_ids   (options, targets, segments)

Because segments are tokenized separately, the ids of a prompt are exactly the
ids of its prefix segments followed by the ids of its last segment: scoring
reuses a prefix's KV cache on that, and query encoding rebuilds a build's
in-context prefix from its stored demonstrations on that.

Build rows (`row_layout`): prefix (BOS, or BOS + in-context demonstrations) +
input, its start dropped when too long + target. The pooled span covers the
input (and the target for ``span="full"``); without BOS the first token is the
attention sink and is left out of the span.

Light on purpose: no torch import, so `data` can re-export `prompt_segments`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, LabelWordError, MismatchError

__all__ = [
    "bos_ids",
    "encode_continuation",
    "encode_segments",
    "prefix_segments",
    "prompt_segments",
    "fit_demonstrations",
    "pad_id",
    "row_layout",
    "context_demos",
    "context_for",
    "stored_context_segments",
    "BuildPlan",
    "build_plan",
    "length_batches",
    "ScoringRequests",
    "scoring_requests",
]


# --------------------------------------------------------------------------- tokens


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer prepends BOS on a plain call, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if len(ids) > 0 and ids[0] == bos else []


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of a text with no special tokens (an option, a target, one
    prompt segment): list[int]."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_segments(tokenizer, segments: Sequence[str]) -> list[int]:
    """Token ids of a prompt given as text segments (see module docstring).

    Returns a list[int]: optional BOS followed by each segment tokenized on its
    own (``add_special_tokens=False``) and concatenated; ``[]`` segments give
    just the BOS ids.
    """
    if isinstance(segments, str):
        raise ConfigError("encode_segments expects a sequence of text segments, not a str; wrap it: [text]")
    ids = bos_ids(tokenizer)
    for seg in segments:
        ids.extend(encode_continuation(tokenizer, seg))
    return ids


def pad_id(tokenizer) -> int:
    """The id padding positions get: the pad token, else EOS, else 0.

    Padding is always masked out (right-padded causal rows for the build and
    scoring, left padding plus mask for generation), so the value only has to
    be a valid id; one rule everywhere keeps batches reproducible.
    """
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else 0


# --------------------------------------------------------------------------- text segments


def prefix_segments(instruction: str, demo_texts: Sequence[str]) -> list[str]:
    """The segments before the query: the instruction (if any) and each
    demonstration's text, each followed by a blank line."""
    segs = [instruction + "\n\n"] if instruction else []
    segs += [t + "\n\n" for t in demo_texts]
    return segs


def prompt_segments(task, demos: Sequence, query) -> list[str]:
    """Text segments of a k-shot prompt for `task` (a `data.Task`): the prefix
    segments of `demos` (`data.Example`) followed by the query's text. Token ids
    are `encode_segments` of the result."""
    return prefix_segments(task.instruction, [task.demo_text(d) for d in demos]) + [task.query_text(query)]


def fit_demonstrations(
    tokenizer, demo_segments: list[str], query: str, max_length: int, reserve: int = 0
) -> tuple[list[str], int]:
    """Drop demonstrations from the front until the prompt fits.

    The prompt ``demo_segments + [query]`` fits when its token count (contract
    above, BOS included) plus ``reserve`` (tokens kept free for the option /
    continuation) is at most ``max_length``. Returns ``(kept_segments,
    n_dropped)`` where ``kept_segments`` are the surviving demonstrations (the
    query is not included), so the caller can report ``n_dropped``.

    Raises ConfigError if even the query alone does not fit.
    """
    # Segment lengths are additive under the contract, so each is tokenized once.
    lens = [len(encode_continuation(tokenizer, s)) for s in demo_segments]
    base = len(bos_ids(tokenizer)) + len(encode_continuation(tokenizer, query)) + int(reserve)
    if base > max_length:
        raise ConfigError(
            f"the query alone needs {base} tokens (including reserve={reserve}) > max_length={max_length}; "
            "shorten the query or raise max_length"
        )
    total = base + sum(lens)
    n_drop = 0
    while total > max_length:
        total -= lens[n_drop]
        n_drop += 1
    return list(demo_segments[n_drop:]), n_drop


# --------------------------------------------------------------------------- build rows


def row_layout(pre: list[int], q: list[int], t: list[int], max_length: int, full: bool):
    """Token ids and pooled span of one build row.

    Args:
        pre: prefix ids (BOS, or BOS + in-context demonstrations; may be []).
        q: input ids; when the row is too long its *start* is dropped, keeping
            the end next to the answer.
        t: target ids ([] for eval rows and new texts).
        max_length: the row's token budget; ``max_length - len(pre) - len(t)``
            must be at least 1.
        full: the span covers the target too (``span="full"``).

    Returns:
        (ids list[int], (start, end) span over ids, number of input tokens dropped).

    With no prefix (a tokenizer without BOS, e.g. Qwen2.5) the row's first token
    is the attention sink that carries the massive activations, so it is left out
    of the span (kept only when it is the span's sole token), as BOS is elsewhere.
    """
    qq = q[-(max_length - len(pre) - len(t)):]
    s = len(pre)
    e = s + len(qq) + (len(t) if full else 0)
    if s == 0 and e > 1:
        s = 1
    return pre + qq + t, (s, e), len(q) - len(qq)


def context_demos(ds, k: int, seed: int) -> list:
    """k pool demonstrations (`data.Example`) of `ds` for the in-context mask,
    label-balanced: labels take turns in an order rotated by the seed, so that
    over seeds 0..L-1 each of L labels leads equally often (with k=1, seed s
    picks label s mod L)."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    by_label: dict[int, list] = {}
    for e in ds.pool:
        by_label.setdefault(e.label, []).append(e)
    labels = sorted(by_label)
    labels = labels[seed % len(labels):] + labels[:seed % len(labels)]
    picks: list = []
    while len(picks) < min(k, len(ds.pool)):
        for lab in labels:
            rest = [e for e in by_label[lab] if e not in picks]
            if rest and len(picks) < k:
                picks.append(rng.choice(rest))
    rng.shuffle(picks)
    return picks


def context_for(ds, ctx: list, row, seed: int) -> list:
    """The context a row is encoded under: `ctx`, except that a row which is one
    of the context demonstrations gets it replaced by a seeded stand-in of the
    same label (never itself), so no in-context row sees its own copy."""
    if row not in ctx:
        return ctx
    rng = random.Random(f"{seed}:{row.id}")
    same = [e for e in ds.pool if e.label == row.label and e not in ctx] or \
        [e for e in ds.pool if e not in ctx]
    if not same:
        return [e for e in ctx if e is not row]
    return [rng.choice(same) if e is row else e for e in ctx]


def stored_context_segments(store, task) -> list[str]:
    """The in-context prefix segments of a finished build, as the build tokenized them.

    Re-tokenizing the stored prefix string would not give the build's ids
    (segments are tokenized separately), so the segments are rebuilt from the
    stored demonstration ids and texts and checked against the stored prefix.
    Returns [] for a build without in-context demonstrations.

    Raises MismatchError when the store's record of the prefix is inconsistent.
    """
    ic = store.provenance.get("in_context") or {}
    demo_ids = list(ic.get("demo_ids") or [])
    if not demo_ids:
        if int(ic.get("k", 0) or 0) > 0:
            raise MismatchError(f"build {store.key[:12]} records no in-context demonstrations although "
                                f"context_k={ic.get('k')}; rerun `actcache build` with --masks in-context")
        return []
    row_of = {i: r for r, i in enumerate(store.ids)}
    missing = [d for d in demo_ids if d not in row_of]
    if missing:
        raise MismatchError(f"in-context demonstrations {missing} are not in build {store.key[:12]}; rebuild it")
    segs = prefix_segments(task.instruction, [str(store.demos[row_of[d]]) for d in demo_ids])
    if "".join(segs) != ic.get("prefix", ""):
        raise MismatchError(f"build {store.key[:12]}: the stored in-context prefix does not match its "
                            f"demonstrations; rebuild it")
    return segs


@dataclass
class BuildPlan:
    """Every row of a build laid out as token ids, per mask.

    rows / splits: the pool rows then the eval rows (`data.Example`, "pool"/"eval").
    seqs: mask -> list of token-id lists; spans: mask -> list of (start, end).
    n_tokens / n_target / truncated: (n,) int arrays: input tokens, target
        tokens, input tokens dropped from the start (isolated mask).
    context_ids / context_text: the in-context demonstrations' ids and prefix text.
    sink: "bos", or "first token" for tokenizers without BOS (left out of every span).
    """

    rows: list
    splits: list[str]
    seqs: dict
    spans: dict
    n_tokens: np.ndarray
    n_target: np.ndarray
    truncated: np.ndarray
    context_ids: list[str]
    context_text: str
    sink: str


def build_plan(ds, tokenizer, cfg) -> BuildPlan:
    """Lay out every row of dataset `ds` (`data.Dataset`) for a build.

    `cfg` is a `builder.BuildConfig` (uses masks, context_k, context_seed,
    max_length, span). Pool rows carry their target; eval rows do not. The
    in-context prefix is the same for every row except a context
    demonstration's own row (see `context_for`). Raises ConfigError when the
    prefix or a target leaves no room in ``max_length``.
    """
    from .capture import MASKS

    task = ds.task
    rows = list(ds.pool) + list(ds.eval)
    splits = ["pool"] * len(ds.pool) + ["eval"] * len(ds.eval)
    ctx = context_demos(ds, cfg.context_k, cfg.context_seed) if "in-context" in cfg.masks else []
    bos = bos_ids(tokenizer)
    ctx_segs = prefix_segments(task.instruction, [task.demo_text(d) for d in ctx]) if ctx else []
    ctx_ids = encode_segments(tokenizer, ctx_segs) if ctx else bos
    if len(ctx_ids) > cfg.max_length - 32:
        raise ConfigError(f"the in-context prefix is {len(ctx_ids)} tokens, leaving under 32 of "
                          f"--max-length {cfg.max_length}; lower --context-k or raise --max-length")
    seqs: dict = {m: [] for m in MASKS}
    spans: dict = {m: [] for m in MASKS}
    n_tok, n_tgt, trunc = [], [], []
    for ex, split in zip(rows, splits):
        q = encode_continuation(tokenizer, task.query_text(ex))
        t = encode_continuation(tokenizer, task.target(ex)) if split == "pool" else []
        own = context_for(ds, ctx, ex, cfg.context_seed) if split == "pool" and ex in ctx else ctx
        row_ctx = ctx_ids if own is ctx else encode_segments(tokenizer, prompt_segments(task, own, ex)[:-1])
        for mask in MASKS:
            pre = row_ctx if mask == "in-context" else bos
            if cfg.max_length - len(pre) - len(t) < 1:
                raise ConfigError(f"example {ex.id}: its target alone is {len(t)} tokens, over "
                                  f"--max-length {cfg.max_length}; raise --max-length")
            seq, span, dropped = row_layout(pre, q, t, cfg.max_length,
                                            cfg.span == "full" and mask != "label-masked")
            seqs[mask].append(seq)
            spans[mask].append(span)
            if mask == "isolated":
                trunc.append(dropped)
        n_tok.append(len(q))
        n_tgt.append(len(t))
    return BuildPlan(rows, splits, seqs, spans, np.array(n_tok), np.array(n_tgt), np.array(trunc),
                     [e.id for e in ctx], "".join(ctx_segs), "bos" if bos else "first token")


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices per batch ((b,) int64 arrays), longest rows first so memory
    peaks early; ties by row index. A pure function of its inputs, so a resumed
    build replays the same batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [np.array(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------- scoring requests


@dataclass
class ScoringRequests:
    """Token requests of a `score.score_options` call.

    prefixes / suffixes: per prompt, the ids of all segments but the last (BOS
        included) and of the last segment; their concatenation is the prompt's ids.
    n_segments: per prompt, its number of text segments.
    options: per prompt, the ids of each of its options.
    n_options: columns of the score matrix (the longest option list).
    fast: every prompt shares one list of single-token options, so one request
        per prompt reads all of them at its last position.
    requests: (prompt index, option index or -1 in the fast path, input ids,
        positions whose hidden states are read, target ids). The input is
        context + option[:-1] and the positions are those predicting the
        option's tokens: the harness's (context + continuation)[:-1].
    """

    prefixes: list[list[int]]
    suffixes: list[list[int]]
    n_segments: list[int]
    options: list[list[list[int]]]
    n_options: int
    fast: bool
    requests: list[tuple[int, int, list[int], list[int], list[int]]]


def _check_label(tokenizer, word: str, ids: list[int]) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 0:
        raise LabelWordError(
            f"label word {word!r} encodes to zero tokens; pass a non-empty label word "
            "(usually with a leading space, e.g. ' positive')"
        )
    if unk is not None and unk in ids:
        raise LabelWordError(
            f"label word {word!r} contains characters the tokenizer maps to its unknown token "
            f"{getattr(tokenizer, 'unk_token', None)!r}; pass a label word made of characters in its vocabulary"
        )


def scoring_requests(tokenizer, prompts: Sequence[Sequence[str]], options, max_length: int) -> ScoringRequests:
    """Validate and tokenize prompts (segment lists) and options for scoring.

    `options` is one shared list of strings or one list per prompt (see
    `score.score_options`). Returns a `ScoringRequests`; with no prompts its
    `requests` is empty.

    Raises:
        LabelWordError: an option encodes to no tokens or contains the unk token.
        ConfigError: malformed prompts/options, or a prompt plus its longest
            option over ``max_length`` tokens.
    """
    if isinstance(options, str):
        raise ConfigError("options must be a list of strings or a list of lists, not a str")
    prompts = list(prompts)
    options = list(options)
    shared = all(isinstance(o, str) for o in options)
    if not shared:
        if any(isinstance(o, str) for o in options):
            raise ConfigError("options mixes strings and lists; pass one shared list or one list per prompt")
        if len(options) != len(prompts):
            raise ConfigError(
                f"per-prompt options: got {len(options)} option lists for {len(prompts)} prompts"
            )
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise ConfigError(f"prompt {i} is a str; prompts are sequences of segments, e.g. [text]")

    # Options and segments repeat a lot (same labels / demos in many prompts): tokenize each once.
    opt_cache: dict[str, list[int]] = {}

    def enc_opt(word: str) -> list[int]:
        if word not in opt_cache:
            ids = encode_continuation(tokenizer, word)
            _check_label(tokenizer, word, ids)
            opt_cache[word] = ids
        return opt_cache[word]

    if shared:
        per_prompt_opts = [[enc_opt(w) for w in options]] * len(prompts)
        n_opt = len(options)
        if n_opt == 0 and prompts:
            raise ConfigError("options is empty; pass at least one option")
    else:
        per_prompt_opts = [[enc_opt(w) for w in opts] for opts in options]
        n_opt = max((len(o) for o in per_prompt_opts), default=0)
        for i, o in enumerate(per_prompt_opts):
            if len(o) == 0:
                raise ConfigError(f"prompt {i} has no options")
    if not prompts:
        return ScoringRequests([], [], [], [], n_opt, False, [])

    seg_cache: dict[str, list[int]] = {}

    def enc_seg(s: str) -> list[int]:
        if s not in seg_cache:
            seg_cache[s] = encode_continuation(tokenizer, s)
        return seg_cache[s]

    bos = bos_ids(tokenizer)
    prefixes: list[list[int]] = []
    suffixes: list[list[int]] = []
    for p in prompts:
        segs = list(p)
        pre = list(bos)
        for s in segs[:-1]:
            pre.extend(enc_seg(s))
        prefixes.append(pre)
        suffixes.append(list(enc_seg(segs[-1])) if segs else [])

    for i in range(len(prompts)):
        n = len(prefixes[i]) + len(suffixes[i])
        if n == 0:
            raise ConfigError(f"prompt {i} encodes to zero tokens (and the tokenizer adds no BOS); pass some text")
        longest = max(len(c) for c in per_prompt_opts[i])
        if n + longest - 1 > max_length:
            raise ConfigError(
                f"prompt {i} has {n} tokens + {longest} option tokens, more than max_length={max_length}; "
                "drop demonstrations first (see fit_demonstrations)"
            )

    fast = shared and all(len(c) == 1 for c in per_prompt_opts[0])
    reqs: list[tuple[int, int, list[int], list[int], list[int]]] = []
    for i in range(len(prompts)):
        ctx = prefixes[i] + suffixes[i]
        if fast:
            reqs.append((i, -1, ctx, [len(ctx) - 1], []))
        else:
            for j, c in enumerate(per_prompt_opts[i]):
                reqs.append((i, j, ctx + c[:-1], list(range(len(ctx) - 1, len(ctx) + len(c) - 1)), c))
    return ScoringRequests(prefixes, suffixes, [len(p) for p in prompts], per_prompt_opts, n_opt, fast, reqs)
