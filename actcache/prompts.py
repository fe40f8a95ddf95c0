"""Prompt layout: the one place that turns a task, demonstrations and a query
into token ids and pooled spans. Build, query encoding, scoring and the
benchmarks all go through it, so one example always becomes the same tokens.

Segments::

    [instruction + "\\n\\n"] + [demo_text(d) + "\\n\\n" for d in demos] + [query_text(x)]

Token contract::

    ids(prompt) = [bos] (if the tokenizer adds one)
                  + concat(tokenizer(seg, add_special_tokens=False).input_ids for seg in segments)
    ids(option) = tokenizer(option, add_special_tokens=False).input_ids

Because segments are tokenized separately, the ids of a prompt are exactly the
ids of its prefix segments followed by the ids of its last segment, which is
what makes prefix KV reuse in scoring exact, and lets a query text be encoded
exactly as the builder encoded an eval row.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import DEFAULT_MASK, MASKS  # noqa: F401  (the names; what each mask means is here)
from .data import Dataset, Example, Task
from .errors import ConfigError, LabelWordError, MismatchError

ATTENTION_RULES = ("causal", "sink")


def attention_rule(mask: str) -> str:
    """How a row laid out under `mask` attends: "sink" (causal, with attention to
    position 0 removed from every later position) for the sink-masked mask, else
    "causal". The one place that says what a mask means to the forward pass."""
    if mask not in MASKS:
        raise ConfigError(f"unknown mask {mask!r}; choose from {MASKS}")
    return "sink" if mask == "sink-masked" else "causal"


def prefix_segments(instruction: str, demo_texts: Sequence[str], delimiter: str = "\n\n") -> list[str]:
    """The segments before the query: the instruction (if any), then each
    demonstration's text, each followed by `delimiter` (the task's
    fewshot_delimiter: a blank line unless an lm-eval task says otherwise). The
    build and the query side's reconstruction from a store
    (`stored_context_segments`) both lay the in-context prefix out through this."""
    segs = [instruction + delimiter] if instruction else []
    segs += [t + delimiter for t in demo_texts]
    return segs


def prompt_segments(task: Task, demos: Sequence[Example], query: Example) -> list[str]:
    """Text segments of a k-shot prompt; token ids are the concatenation of each
    segment tokenized on its own (see `encode_segments`)."""
    return (prefix_segments(task.instruction, [task.demo_text(d) for d in demos], task.fewshot_delimiter)
            + [task.query_text(query)])


def bos_ids(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer prepends BOS on a plain call, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if len(ids) > 0 and ids[0] == bos else []


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a text with no special tokens, list[int]."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_segments(tokenizer, segments: Sequence[str]) -> list[int]:
    """Token ids of a prompt given as text segments (see module docstring).

    Returns a list[int]: optional BOS followed by each segment tokenized on its
    own (``add_special_tokens=False``) and concatenated.
    """
    if isinstance(segments, str):
        raise ConfigError("encode_segments expects a sequence of text segments, not a str; wrap it: [text]")
    ids = bos_ids(tokenizer)
    for seg in segments:
        ids.extend(encode_text(tokenizer, seg))
    return ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of an option / continuation (no special tokens), list[int]."""
    return encode_text(tokenizer, text)


def option_ids(tokenizer, word: str) -> list[int]:
    """Token ids of one answer option (contract above), checked: raises
    LabelWordError if it encodes to no token or to the tokenizer's unknown token."""
    ids = encode_continuation(tokenizer, word)
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
    return ids


def prompt_rows(tokenizer, prompts: Sequence[Sequence[str]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prefix ids, suffix ids) of each prompt given as segments: the prefix is
    BOS (if any) and every segment but the last, the suffix the last segment
    (empty for a prompt of no segments); prefix + suffix is `encode_segments`.
    Segments repeat a lot (the same demonstrations in many prompts), so each
    distinct one is tokenized once."""
    cache: dict[str, list[int]] = {}

    def enc(seg: str) -> list[int]:
        if seg not in cache:
            cache[seg] = encode_text(tokenizer, seg)
        return cache[seg]

    bos = bos_ids(tokenizer)
    prefixes: list[list[int]] = []
    suffixes: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            raise ConfigError("a prompt is a sequence of text segments, not a str; wrap it: [text]")
        segs = list(p)
        pre = list(bos)
        for seg in segs[:-1]:
            pre.extend(enc(seg))
        prefixes.append(pre)
        suffixes.append(list(enc(segs[-1])) if segs else [])
    return prefixes, suffixes


def prompt_ids(tokenizer, prompts: Sequence[Sequence[str]]) -> list[list[int]]:
    """Token ids of each prompt given as segments (`encode_segments` of each)."""
    prefixes, suffixes = prompt_rows(tokenizer, prompts)
    return [p + s for p, s in zip(prefixes, suffixes)]


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
    lens = [len(encode_text(tokenizer, s)) for s in demo_segments]
    base = len(bos_ids(tokenizer)) + len(encode_text(tokenizer, query)) + int(reserve)
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


def pad_id(tokenizer) -> int:
    """The id right padding uses: the tokenizer's pad id, else EOS, else 0 (padded
    positions are masked out, so the choice never changes a result)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


@dataclass
class Rotation:
    """One in-context prefix of a build: its demonstrations, its text, and every
    row laid out under it (the in-context mask's token ids and pooled spans)."""

    demo_ids: list[str]
    prefix: str
    seqs: list  # list[list[int]], one per row
    spans: list  # list[(start, end)], one per row


@dataclass
class RowPlan:
    """Every row of a build laid out for each mask: token ids, pooled spans, and what was cut.

    The in-context mask has one layout per label rotation (`rotations`, see
    `context_rotations`); `seqs["in-context"]`/`spans["in-context"]`,
    `context_ids` and `context_text` are rotation 0's."""

    rows: list[Example]
    splits: list[str]
    seqs: dict  # mask -> list[list[int]]
    spans: dict  # mask -> list[(start, end)]
    n_tokens: np.ndarray
    n_target: np.ndarray
    truncated: np.ndarray
    context_ids: list[str]
    context_text: str
    sink: str  # "bos", or "first token" for tokenizers without BOS (left out of every span)
    rotations: list[Rotation] = field(default_factory=list)

    def examples(self, task: Task) -> dict:
        """The build's examples table (`store.EXAMPLE_COLUMNS`), one entry per row:
        id, split, label, the query text and demonstration text as laid out here,
        the near-duplicate key, token counts, whether the input was cut, and the
        example's record (`data.Example.to_record`)."""
        rows = self.rows
        return {"id": [e.id for e in rows], "split": self.splits, "label": [e.label for e in rows],
                "text": [task.query_text(e) for e in rows], "demo": [task.demo_text(e) for e in rows],
                "dup": [task.dup_key(e) for e in rows], "n_tokens": self.n_tokens, "n_target": self.n_target,
                "truncated": self.truncated,
                "record": [json.dumps(e.to_record(), ensure_ascii=False) for e in rows]}

    def layouts(self, mask: str) -> list[tuple[list, list]]:
        """(seqs, spans) of each forward pass `mask` needs: one per rotation for
        the in-context mask, else one. The mask's arrays are their mean."""
        if mask == "in-context" and self.rotations:
            return [(r.seqs, r.spans) for r in self.rotations]
        return [(self.seqs[mask], self.spans[mask])]


def n_labels(ds: Dataset) -> int:
    """The labels the pool holds (those `context_demos` takes turns over)."""
    return len({e.label for e in ds.pool})


def context_rotations(ds: Dataset, k: int) -> int:
    """How many label rotations the in-context mask runs: L (the pool's number of
    labels) when the prefix of 0 < k < L demonstrations cannot hold every label,
    so each rotation r uses `context_demos(ds, k, seed + r)` and every label leads
    exactly once; else 1 (k = 0, or k >= L: one fixed label-balanced prefix)."""
    L = n_labels(ds)
    return L if 0 < k < L else 1


def context_demos(ds: Dataset, k: int, seed: int) -> list[Example]:
    """k pool demonstrations for the in-context mask, label-balanced: labels take
    turns in an order rotated by the seed, so that over seeds 0..L-1 each of L
    labels leads equally often (with k=1, seed s picks label s mod L)."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for e in ds.pool:
        by_label.setdefault(e.label, []).append(e)
    labels = sorted(by_label)
    labels = labels[seed % len(labels):] + labels[:seed % len(labels)]
    picks: list[Example] = []
    while len(picks) < min(k, len(ds.pool)):
        for lab in labels:
            rest = [e for e in by_label[lab] if e not in picks]
            if rest and len(picks) < k:
                picks.append(rng.choice(rest))
    rng.shuffle(picks)
    return picks


def context_for(ds: Dataset, ctx: list[Example], row: Example, seed: int) -> list[Example]:
    """The context a row is encoded under: `ctx`, except that a row which is one
    of the context demonstrations gets it replaced by a seeded stand-in of the
    same label (never itself), so no in-context row sees its own copy."""
    if row not in ctx:
        return ctx
    rng = random.Random(f"{seed}:{row.id}")
    same = ([e for e in ds.pool if e.label == row.label and e not in ctx]
            or [e for e in ds.pool if e not in ctx])
    if not same:
        return [e for e in ctx if e is not row]
    return [rng.choice(same) if e is row else e for e in ctx]


def plan_rows(ds: Dataset, tok, cfg) -> RowPlan:
    """Lay out every pool and eval row of `ds` under every mask (MASKS) for a
    build config `cfg` (its masks, context_k, context_seed, max_length, span).
    The in-context mask is laid out once per label rotation (`context_rotations`):
    rotation r's prefix is `context_demos(ds, k, context_seed + r)`, and a row
    that is one of its demonstrations gets `context_for(..., context_seed + r)`.
    A pure function of its inputs, so a resumed build sees the same batches."""
    task = ds.task
    rows = list(ds.pool) + list(ds.eval)
    splits = ["pool"] * len(ds.pool) + ["eval"] * len(ds.eval)
    in_ctx = "in-context" in cfg.masks
    n_rot = context_rotations(ds, cfg.context_k) if in_ctx else 1
    seeds = [cfg.context_seed + r for r in range(n_rot)]
    ctxs = [context_demos(ds, cfg.context_k, s) if in_ctx else [] for s in seeds]
    bos = encode_segments(tok, [])
    ctx_ids = [encode_segments(tok, prompt_segments(task, ctx, ds.pool[0])[:-1]) if ctx else bos for ctx in ctxs]
    for ids in ctx_ids:
        if len(ids) > cfg.max_length - 32:
            raise ConfigError(f"the in-context prefix is {len(ids)} tokens, leaving under 32 of "
                              f"--max-length {cfg.max_length}; lower --context-k or raise --max-length")
    seqs: dict = {m: [] for m in MASKS}
    spans: dict = {m: [] for m in MASKS}
    rots = [Rotation([e.id for e in ctx], "".join(prompt_segments(task, ctx, ds.pool[0])[:-1]) if ctx else "",
                     [], []) for ctx in ctxs]
    n_tok, n_tgt, trunc = [], [], []
    for ex, split in zip(rows, splits):
        q = encode_continuation(tok, task.query_text(ex))
        t = encode_continuation(tok, task.target(ex)) if split == "pool" else []
        full = cfg.span == "full"
        for mask in MASKS:
            if mask == "in-context":
                pres = []
                for ctx, ids, s in zip(ctxs, ctx_ids, seeds):
                    own = context_for(ds, ctx, ex, s) if split == "pool" and ex in ctx else ctx
                    pres.append(ids if own is ctx else encode_segments(tok, prompt_segments(task, own, ex)[:-1]))
            else:
                pres = [bos]
            for r, pre in enumerate(pres):
                if cfg.max_length - len(pre) - len(t) < 1:
                    raise ConfigError(f"example {ex.id}: its target alone is {len(t)} tokens, over "
                                      f"--max-length {cfg.max_length}; raise --max-length")
                # the label-masked mask's span never holds the label, whatever the span rule
                seq, span, dropped = row_layout(pre, q, t, cfg.max_length, full and mask != "label-masked")
                if mask == "in-context":
                    rots[r].seqs.append(seq)
                    rots[r].spans.append(span)
                else:
                    seqs[mask].append(seq)
                    spans[mask].append(span)
                if mask == "isolated":
                    trunc.append(dropped)
        n_tok.append(len(q))
        n_tgt.append(len(t))
    seqs["in-context"], spans["in-context"] = rots[0].seqs, rots[0].spans
    return RowPlan(rows, splits, seqs, spans, np.array(n_tok), np.array(n_tgt), np.array(trunc),
                   rots[0].demo_ids, rots[0].prefix, "bos" if bos else "first token", rots)


def row_layout(pre: list[int], q: list[int], t: list[int], max_length: int, full: bool):
    """Token ids and pooled span of one row: prefix + input (its start dropped if
    too long, keeping the end next to the answer) + target. The span covers the
    input, plus the target when `full`. Returns (ids, (start, end), input tokens dropped).

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


def text_rows(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list, list]:
    """(seqs, spans) of plain texts, each laid out as a row with no prefix but BOS
    and no target (`row_layout`): a text too long loses its start, and the span
    leaves out BOS (or, without one, the attention sink of the first token)."""
    bos = bos_ids(tokenizer)
    seqs, spans = [], []
    for t in texts:
        seq, span, _ = row_layout(bos, encode_text(tokenizer, t), [], max_length, False)
        seqs.append(seq)
        spans.append(span)
    return seqs, spans


def query_layouts(tokenizer, store, task, texts: Sequence[str], mask: str, max_length: int) -> list[tuple[list, list]]:
    """(seqs, spans) of new query texts under `mask` of a stored build, one per
    forward pass it needs: one per label rotation of the in-context mask (its
    prefixes rebuilt by `stored_context_segments`), else one. Each row is laid
    out exactly as `plan_rows` lays out an eval row (no target)."""
    bos = encode_segments(tokenizer, [])
    prefixes = [encode_segments(tokenizer, segs) if segs else bos
                for segs in stored_context_segments(store, task)] if mask == "in-context" else [bos]
    ids = [encode_continuation(tokenizer, t) for t in texts]
    out = []
    for pre in prefixes:
        seqs, spans = [], []
        for q in ids:
            seq, span, _ = row_layout(pre, q, [], max_length, False)
            seqs.append(seq)
            spans.append(span)
        out.append((seqs, spans))
    return out


def length_batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Row indices per batch, longest first so memory peaks early; ties by row."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [np.array(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]


def token_batches(lengths: list[int], batch_tokens: int) -> list[np.ndarray]:
    """Row indices per batch in `length_batches`' order (longest first, ties by
    row), each batch as many rows as fit `batch_tokens` padded tokens (rows x
    its longest row); a row longer than that is a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
            out.append(np.array(cur))
            cur = []
        cur.append(i)
    if cur:
        out.append(np.array(cur))
    return out


def stored_context_segments(store, task) -> list[list[str]]:
    """The in-context prefix of each label rotation as the builder tokenized it:
    one list of segments per rotation (one segment per demo; `[[]]` for a build
    without demonstrations). The in-context arrays are the mean over these.

    The builder tokenizes segments separately, so re-tokenizing a stored prefix
    string would not give the same ids; the segments are rebuilt from the
    stored demo ids and checked against the stored prefix text. A build that
    records no "rotations" (made before they existed) has one: its "demo_ids"
    and "prefix".
    """
    ic = store.provenance.get("in_context") or {}
    rots = ic.get("rotations") or [{"demo_ids": ic.get("demo_ids"), "prefix": ic.get("prefix", "")}]
    if not any(r.get("demo_ids") for r in rots):
        if int(ic.get("k", 0) or 0) > 0:
            raise MismatchError(f"build {store.key[:12]} records no in-context demonstrations although "
                                f"context_k={ic.get('k')}; rerun `actcache build` with --masks in-context")
        return [[]]
    row_of = {i: r for r, i in enumerate(store.ids)}
    out = []
    for rot in rots:
        demo_ids = list(rot.get("demo_ids") or [])
        missing = [d for d in demo_ids if d not in row_of]
        if missing:
            raise MismatchError(f"in-context demonstrations {missing} are not in build {store.key[:12]}; rebuild it")
        segs = (prefix_segments(task.instruction, [str(store.demos[row_of[d]]) for d in demo_ids],
                                task.fewshot_delimiter) if demo_ids else [])
        if "".join(segs) != rot.get("prefix", ""):
            raise MismatchError(f"build {store.key[:12]}: the stored in-context prefix does not match its "
                                f"demonstrations; rebuild it")
        out.append(segs)
    return out
