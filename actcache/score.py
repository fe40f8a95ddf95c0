"""Log-likelihood scoring of label words / answer options, and greedy generation.

Correctness reference: what lm-evaluation-harness computes for ``loglikelihood``
requests, i.e. an unbatched forward over ``context + continuation`` with a
full-vocabulary log-softmax, summing the log-probs of the continuation tokens.
Everything here reproduces that number (within fp32 round-off) while doing less
work: right-padded length-sorted batches, the LM head applied only at the rows
that are actually scored, and an optional KV cache shared by prompts with a
common prefix.

Tokenization contract (other modules rely on it)::

    ids(prompt) = [bos] (if the tokenizer adds one)
                  + concat(tokenizer(seg, add_special_tokens=False).input_ids
                           for seg in prompt_segments)
    ids(option) = tokenizer(option, add_special_tokens=False).input_ids

Because segments are tokenized separately, the ids of a prompt are exactly the
ids of its prefix segments followed by the ids of its last segment, which is what
makes prefix KV reuse exact.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria

from .capture import right_pad
from .data import Example, Task
from .errors import ConfigError
from .prompts import option_ids, pad_id, prompt_ids, prompt_rows

__all__ = [
    "score_options",
    "TokenCount",
    "classify",
    "margins",
    "score_prompts",
    "length_normalized",
    "pair_scores",
    "generate",
    "extract_number",
    "exact_match",
]

# Rows of the output embedding multiplied at once when computing the full-vocab
# logsumexp: bounds the (rows x chunk) logits buffer independently of vocab size.
_VOCAB_CHUNK = 32768
# Hidden rows sent through the vocab chunks at once (256 x 32k fp32 = 32 MiB).
_ROW_CHUNK = 256


# --------------------------------------------------------------------------- #
# Tokenization
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Model plumbing
# --------------------------------------------------------------------------- #


def _body(model) -> torch.nn.Module:
    """The transformer body (model.model / model.transformer) returning final-normed hidden states."""
    body = model.base_model
    if body is model:
        raise ConfigError(
            f"{type(model).__name__} has no separate base model; pass a *ForCausalLM model with an LM head"
        )
    return body


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


class _Head:
    """The output projection of a causal LM, applied to selected rows only.

    Reproduces ``model.forward``'s logits post-processing (bias, Gemma-2/3
    final-logit soft-capping, Cohere/Granite logit scaling) so that log-probs
    equal those from ``model(...).logits``.
    """

    def __init__(self, model):
        lm = model.get_output_embeddings()
        if lm is None or not hasattr(lm, "weight"):
            raise ConfigError(f"{type(model).__name__} has no output embedding (LM head) to score with")
        self.weight = lm.weight  # (V, H)
        self.bias = getattr(lm, "bias", None)
        cfg = _text_config(model)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        # Cohere multiplies the logits by the module attribute; Granite divides by the config value.
        self.mul = float(getattr(model, "logit_scale", 1.0)) if hasattr(model, "logit_scale") else 1.0
        self.div = float(getattr(cfg, "logits_scaling", 1.0) or 1.0)
        self.vocab = self.weight.shape[0]

    def _post(self, logits: torch.Tensor) -> torch.Tensor:
        # The model's own forward applies these in its dtype; upcasting first only
        # reduces round-off, and the log-softmax must be float32 anyway for bf16.
        logits = logits.float()
        if self.mul != 1.0:
            logits = logits * self.mul
        if self.div != 1.0:
            logits = logits / self.div
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits_rows(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits of tokens ``ids`` (C,) for every row of ``h`` (N, H) -> (N, C) float32."""
        w = self.weight[ids]
        out = h.to(w.dtype) @ w.T
        if self.bias is not None:
            out = out + self.bias[ids]
        return self._post(out)

    def logits_pointwise(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logit of token ``ids[i]`` for row ``h[i]``: (N, H), (N,) -> (N,) float32."""
        w = self.weight[ids]
        out = (h.to(w.dtype) * w).sum(-1)
        if self.bias is not None:
            out = out + self.bias[ids]
        return self._post(out)

    def logsumexp(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logsumexp for each row of ``h`` (N, H) -> (N,) float32.

        Chunked over rows and vocab so that no (N, V) buffer is ever materialized.
        """
        outs = []
        for r0 in range(0, h.shape[0], _ROW_CHUNK):
            hr = h[r0 : r0 + _ROW_CHUNK].to(self.weight.dtype)
            acc = None
            for v0 in range(0, self.vocab, _VOCAB_CHUNK):
                w = self.weight[v0 : v0 + _VOCAB_CHUNK]
                lg = hr @ w.T
                if self.bias is not None:
                    lg = lg + self.bias[v0 : v0 + _VOCAB_CHUNK]
                part = torch.logsumexp(self._post(lg), dim=-1)
                acc = part if acc is None else torch.logaddexp(acc, part)
            outs.append(acc)
        return torch.cat(outs) if outs else h.new_zeros(0, dtype=torch.float32)


def _cache_kwarg(body) -> str | None:
    """Name of the KV-cache argument of ``body.forward`` ("cache" in transformers 5.24+)."""
    params = inspect.signature(body.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _supports_prefix_reuse(model, body) -> bool:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False) or getattr(model, "_is_stateful", False):
        return False
    return _cache_kwarg(body) is not None


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` -> (input_ids (B, L) long, mask (B, L) long)."""
    return right_pad(seqs, pad_id)


def _collect_hidden(
    body,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    prefix: list[int] | None = None,
    cache_kw: str | None = None,
    model_config=None,
) -> list[torch.Tensor]:
    """Final hidden states at requested positions.

    ``requests[k] = (input_ids, positions)``: the sequence fed (after ``prefix``
    if given) and the positions within it whose hidden states are wanted.
    Returns one tensor (len(positions), H) per request, in request order.

    Batches are built right-padded in descending length order: with causal
    attention, real tokens never see the padding after them, so positions are
    plain ``arange`` and no dependence on the tokenizer's padding side exists.
    With ``prefix``, its KV cache is computed once and a copy, repeated to the
    batch size, is extended by each batch (forward mutates the cache in place).
    """
    out: list[torch.Tensor | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][0]))
    P = 0
    prefix_cache = None
    if prefix is not None:
        from transformers import DynamicCache

        P = len(prefix)
        prefix_cache = DynamicCache(config=model_config)
        ids = torch.tensor([prefix], dtype=torch.long, device=device)
        body(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(P, device=device)[None],
            use_cache=True,
            **{cache_kw: prefix_cache},
        )
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        ids, mask = _right_pad([requests[k][0] for k in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        B, L = ids.shape
        pos = (torch.arange(L, device=device) + P)[None].expand(B, L)
        kw: dict[str, Any] = {"use_cache": False}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
            # The 2D mask spans prefix + suffix: mask utilities index it by absolute kv position.
            mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=device), mask], dim=1)
            kw = {"use_cache": True, cache_kw: cache}
        hs = body(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).last_hidden_state
        for row, k in enumerate(idx):
            p = torch.tensor(requests[k][1], dtype=torch.long, device=device)
            out[k] = hs[row, p]
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


@dataclass
class TokenCount:
    """Token totals that ``score_options`` adds to when passed as ``counter``.

    computed: real (non-padding) tokens sent through the transformer body; a
        reused prefix counts once per ``score_options`` call.
    in_prompts: tokens of every scored sequence as a harness-style scorer feeds
        them (context, plus option[:-1] for multi-token options), i.e. what
        ``computed`` would be without prefix reuse.
    """

    computed: int = 0
    in_prompts: int = 0

    def add(self, other: "TokenCount") -> None:
        self.computed += other.computed
        self.in_prompts += other.in_prompts

    def as_dict(self) -> dict:
        """``{"computed", "in_prompts", "saved"}`` (ints; saved = in_prompts - computed)."""
        return {"computed": self.computed, "in_prompts": self.in_prompts,
                "saved": self.in_prompts - self.computed}


def _default_max_length(model) -> int:
    cfg = _text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


@torch.inference_mode()
def score_options(
    model,
    tokenizer,
    prompts: Sequence[Sequence[str]],
    options: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    length_normalize: bool = False,
    reuse_prefix: bool = True,
    normalize: str = "vocab",
    max_length: int | None = None,
    counter: TokenCount | None = None,
) -> np.ndarray:
    """Log-likelihood of each option given each prompt.

    Args:
        prompts: n prompts, each a sequence of text segments (e.g. demos + query).
        options: one shared list of option strings (classification label words)
            or one list per prompt (multiple choice; may be ragged).
        batch_size: sequences per forward pass.
        length_normalize: divide each option's summed log-prob by its token count.
        reuse_prefix: compute the KV cache of ``segments[:-1]`` once for all
            prompts sharing it (needs >= 2 segments and a non-empty last segment);
            results are unchanged.
        normalize: "vocab" -> true log p(option | prompt) (log-softmax over the
            full vocabulary, as lm-evaluation-harness); "labels" -> additionally
            log-softmax-normalized over the prompt's options (for single-token
            options this is a log-softmax over the label set; differences between
            options are identical to "vocab").
        max_length: longest sequence the model may see (default: the model's
            maximum positions, else 2048). Never truncated here: a prompt whose
            ``len(prompt) + len(option) - 1`` tokens exceed it raises ConfigError.
        counter: if given, this call's tokens computed and tokens in the
            prompts are added to it (see TokenCount).

    Returns:
        float64 array (n_prompts, n_options); ragged per-prompt options are padded
        with -inf. Empty ``prompts`` -> shape (0, n_options).

    Raises:
        LabelWordError: an option encodes to no tokens or contains the unk token.
        ConfigError: bad arguments or an over-long prompt.
    """
    if normalize not in ("vocab", "labels"):
        raise ConfigError(f"normalize must be 'vocab' or 'labels', got {normalize!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    max_len = int(max_length) if max_length is not None else _default_max_length(model)
    req = build_requests(tokenizer, prompts, options, max_len)
    if not req.prompts:
        return np.zeros((0, req.n_opt), dtype=np.float64)
    body = _body(model)
    can_reuse = reuse_prefix and _supports_prefix_reuse(model, body)
    groups, plain = group_by_prefix(req, can_reuse)
    hidden, count = request_hidden(model, body, req, groups, plain, batch_size, pad_id(tokenizer),
                                   _cache_kwarg(body) if reuse_prefix else None)
    if counter is not None:
        counter.add(count)
    return option_logprobs(_Head(model), hidden, req, normalize, length_normalize)


@dataclass
class Requests:
    """Scoring requests of `score_options`, tokenized and checked.

    prompts: the prompts (segment lists); per_prompt_opts: option token ids per
    prompt; n_opt: columns of the result; prefixes/suffixes: token ids of each
    prompt's segments[:-1] (with BOS) and last segment; fast: one shared list of
    single-token options (one request per prompt, every label read at once);
    reqs: (prompt index, option index or -1 in the fast path, input ids,
    positions to read, target ids).
    """

    prompts: list
    per_prompt_opts: list[list[list[int]]]
    n_opt: int
    prefixes: list[list[int]]
    suffixes: list[list[int]]
    fast: bool
    reqs: list[tuple[int, int, list[int], list[int], list[int]]]


def build_requests(tokenizer, prompts, options, max_len: int) -> Requests:
    """Validate and tokenize prompts and options into `Requests` (no model needed).

    Feeding context + option[:-1] and reading positions len(context)-1 ... is the
    harness's (context + continuation)[:-1] with logits at the continuation slots.
    Raises ConfigError / LabelWordError for bad arguments or over-long prompts.
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

    opt_cache: dict[str, list[int]] = {}  # each distinct option tokenized and checked once

    def enc_opt(word: str) -> list[int]:
        if word not in opt_cache:
            opt_cache[word] = option_ids(tokenizer, word)
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
        return Requests(prompts, per_prompt_opts, n_opt, [], [], False, [])

    prefixes, suffixes = prompt_rows(tokenizer, prompts)

    for i in range(len(prompts)):
        n = len(prefixes[i]) + len(suffixes[i])
        if n == 0:
            raise ConfigError(f"prompt {i} encodes to zero tokens (and the tokenizer adds no BOS); pass some text")
        longest = max(len(c) for c in per_prompt_opts[i])
        if n + longest - 1 > max_len:
            raise ConfigError(
                f"prompt {i} has {n} tokens + {longest} option tokens, more than max_length={max_len}; "
                "drop demonstrations first (see prompts.fit_demonstrations)"
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
    return Requests(prompts, per_prompt_opts, n_opt, prefixes, suffixes, fast, reqs)


def group_by_prefix(req: Requests, can_reuse: bool) -> tuple[dict[tuple[int, ...], list[int]], list[int]]:
    """Requests sharing a prompt prefix (segments[:-1]), for KV reuse: ({prefix ids:
    request indices}, requests run whole). A group needs two requests (several
    prompts, or the options of one multiple-choice prompt) and a non-empty
    suffix, since the first scored position must lie after the cached prefix."""
    groups: dict[tuple[int, ...], list[int]] = {}
    plain: list[int] = []
    for k, r in enumerate(req.reqs):
        i = r[0]
        if can_reuse and len(req.prompts[i]) >= 2 and len(req.suffixes[i]) > 0:
            groups.setdefault(tuple(req.prefixes[i]), []).append(k)
        else:
            plain.append(k)
    for key in [key for key, ks in groups.items() if len(ks) < 2]:
        plain.extend(groups.pop(key))
    return groups, plain


def request_hidden(model, body, req: Requests, groups, plain, batch_size: int, pad: int,
                   cache_kw: str | None) -> tuple[list[torch.Tensor], TokenCount]:
    """Final hidden states at every request's read positions (one (positions,
    hidden) tensor per request), and the tokens computed vs in the prompts."""
    reqs = req.reqs
    device = model.get_input_embeddings().weight.device  # inputs go where the embedding lives
    hidden: list[torch.Tensor | None] = [None] * len(reqs)
    count = TokenCount(in_prompts=sum(len(r[2]) for r in reqs))
    if plain:
        hs = _collect_hidden(body, [(reqs[k][2], reqs[k][3]) for k in plain], batch_size, pad, device)
        count.computed += sum(len(reqs[k][2]) for k in plain)
        for k, h in zip(plain, hs):
            hidden[k] = h
    for key, ks in groups.items():
        P = len(key)
        sub = [(reqs[k][2][P:], [p - P for p in reqs[k][3]]) for k in ks]
        try:
            hs = _collect_hidden(
                body, sub, batch_size, pad, device,
                prefix=list(key), cache_kw=cache_kw, model_config=model.config,
            )
            count.computed += P + sum(len(r[0]) for r in sub)
        except (TypeError, NotImplementedError, AttributeError):
            # Architecture without a usable DynamicCache path: same numbers, no reuse.
            hs = _collect_hidden(body, [(reqs[k][2], reqs[k][3]) for k in ks], batch_size, pad, device)
            count.computed += sum(len(reqs[k][2]) for k in ks)
        for k, h in zip(ks, hs):
            hidden[k] = h
    return hidden, count


def option_logprobs(head: "_Head", hidden, req: Requests, normalize: str, length_normalize: bool) -> np.ndarray:
    """(n_prompts, n_opt) float64 option log-probs from the requests' hidden states
    (full-vocabulary log-softmax; "labels" renormalises over each prompt's options)."""
    hdev = head.weight.device
    if req.fast:
        label_ids = torch.tensor([c[0] for c in req.per_prompt_opts[0]], dtype=torch.long, device=hdev)
        H = torch.cat([h.to(hdev) for h in hidden], dim=0)  # (n_prompts, hidden); request k == prompt k
        lp = head.logits_rows(H, label_ids)
        if normalize == "labels":
            lp = torch.log_softmax(lp, dim=-1)
        else:
            lp = lp - head.logsumexp(H)[:, None]
        return lp.double().cpu().numpy()

    scores = np.full((len(req.prompts), req.n_opt), -np.inf, dtype=np.float64)
    H = torch.cat([h.to(hdev) for h in hidden], dim=0)  # (total option tokens, hidden)
    tgt = torch.tensor([t for r in req.reqs for t in r[4]], dtype=torch.long, device=hdev)
    tok_lp = (head.logits_pointwise(H, tgt) - head.logsumexp(H)).double().cpu().numpy()
    off = 0
    for i, j, _, _, c in req.reqs:
        s = tok_lp[off : off + len(c)].sum()
        off += len(c)
        scores[i, j] = s / len(c) if length_normalize else s
    if normalize == "labels":
        finite = np.isfinite(scores)
        lse = np.log(np.sum(np.where(finite, np.exp(scores - scores.max(1, keepdims=True)), 0.0), axis=1))
        scores = np.where(finite, scores - scores.max(1, keepdims=True) - lse[:, None], -np.inf)
    return scores


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def classify(scores: np.ndarray, gold: Sequence[int] | np.ndarray) -> dict:
    """Predictions and metrics from option scores.

    Args:
        scores: (n, c) float array; argmax per row is the prediction (ties -> lowest index).
        gold: (n,) int array of gold option indices.

    Returns:
        dict with ``accuracy`` (float), ``macro_f1`` (float; mean F1 over the
        classes present in gold or pred, as sklearn's ``average="macro"``),
        ``pred`` ((n,) int64).
    """
    scores = np.asarray(scores, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    if scores.ndim != 2 or gold.shape != (scores.shape[0],):
        raise ConfigError(f"classify needs scores (n, c) and gold (n,), got {scores.shape} and {gold.shape}")
    n = scores.shape[0]
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "pred": np.zeros(0, dtype=np.int64)}
    pred = scores.argmax(axis=1).astype(np.int64)
    acc = float((pred == gold).mean())
    f1s = []
    for c in np.union1d(gold, pred):
        tp = np.sum((pred == c) & (gold == c))
        fp = np.sum((pred == c) & (gold != c))
        fn = np.sum((pred != c) & (gold == c))
        denom = 2 * tp + fp + fn
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)), "pred": pred}


def margins(scores: np.ndarray, gold: Sequence[int] | np.ndarray) -> np.ndarray:
    """Gold score minus the best other option's score: (n, c), (n,) -> (n,) float64.

    Positive means correct with that much room. -inf padding is never the best other.
    """
    scores = np.asarray(scores, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    n = scores.shape[0]
    rows = np.arange(n)
    g = scores[rows, gold]
    other = scores.copy()
    other[rows, gold] = -np.inf
    return g - other.max(axis=1) if scores.shape[1] > 0 else np.zeros(0)


# --------------------------------------------------------------------------- #
# Generation
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# A task's prompts scored
# --------------------------------------------------------------------------- #


def score_prompts(lm, task: Task, prompts, queries: list[Example], batch_size: int, options=None,
           counter=None, length_normalize: bool = False) -> np.ndarray:
    """(n, c) option log-probs (classification / multiple choice), summed over each
    option's tokens (averaged with `length_normalize`); ``counter`` (a
    score.TokenCount) accumulates tokens computed and in the prompts."""
    opts = options if options is not None else (
        list(task.label_words) if task.kind == "classification" else [list(task.options(q)) for q in queries])
    return score_options(lm.model, lm.tokenizer, prompts, opts, batch_size=batch_size, counter=counter,
                         length_normalize=length_normalize)


def length_normalized(task: Task, queries: list[Example], s: np.ndarray) -> np.ndarray:
    """lm-evaluation-harness's acc_norm scores: each option's summed log-prob
    divided by the length in characters of the choice as `doc_to_choice` gives
    it, without the target delimiter (lm-eval's `process_results`:
    ``completion_len = np.array([float(len(i)) for i in choices])``), for
    multiple choice; other tasks as is. (n, c) float64; padded option slots stay -inf."""
    if task.kind != "multiple_choice":
        return s
    out = np.array(s, dtype=np.float64, copy=True)
    for i, q in enumerate(queries):
        for j, c in enumerate(q.choices):
            out[i, j] /= max(1, len(c))
    return out


def pair_scores(lm, task: Task, prompts, queries, batch_size, counter=None) -> tuple[np.ndarray, np.ndarray]:
    """(correct (n,), margin (n,)) for classification/MC; for generation the
    per-token log-likelihood of the gold answer and its sign-free value."""
    if task.kind == "generation":
        ll = score_options(lm.model, lm.tokenizer, prompts, [[task.target(q)] for q in queries],
                           batch_size=batch_size, length_normalize=True, counter=counter)[:, 0]
        return np.full(len(ll), np.nan), ll
    s = length_normalized(task, queries, score_prompts(lm, task, prompts, queries, batch_size, counter=counter))
    gold = np.array([q.label for q in queries])
    return (classify(s, gold)["pred"] == gold).astype(np.float64), margins(s, gold)


class _StopInGenerated(StoppingCriteria):
    """Stopping criterion: a row is done once its *generated* text contains a stop string.

    transformers' built-in ``stop_strings`` (StopStringCriteria) matches the end
    of the whole sequence, prompt included: a prompt ending in "\n" stops at the
    first generated "\n" when the stop is "\n\n". Looking only past the prompt
    avoids that premature stop.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[str]],
    *,
    max_new_tokens: int = 128,
    stop: Sequence[str] = ("\n\n",),
    batch_size: int = 4,
) -> list[str]:
    """Greedy continuations of prompts (segment lists), cut at the first stop string.

    Prompts are tokenized with the contract above and left-padded explicitly
    (generation appends on the right, so real tokens must end every row);
    ``generate`` derives position ids from the attention mask. A row stops once
    its generated text (prompt excluded) contains a stop string, at EOS, or
    after ``max_new_tokens``. Returns one str per prompt, in input order, cut
    before the first stop string (so never containing one).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    prompts = list(prompts)
    if not prompts:
        return []
    if isinstance(stop, str):
        stop = (stop,)
    stop = [s for s in stop if s]
    device = model.get_input_embeddings().weight.device
    enc = prompt_ids(tokenizer, prompts)
    pad = pad_id(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    # A fresh config: the model's may carry sampling settings (top_k, temperature)
    # that only produce warnings under greedy decoding.
    gcfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )
    out: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda k: -len(enc[k]))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        L = max(len(enc[k]) for k in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, k in enumerate(idx):
            ids[r, L - len(enc[k]) :] = torch.tensor(enc[k], dtype=torch.long)
            mask[r, L - len(enc[k]) :] = 1
        criteria = StoppingCriteriaList([_StopInGenerated(tokenizer, stop, L)] if stop else [])
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=gcfg,
            stopping_criteria=criteria,
        )
        for r, k in enumerate(idx):
            text = tokenizer.decode(gen[r, L:], skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            out[k] = text[:cut] if cut >= 0 else text
    return out  # type: ignore[return-value]


_HASH_NUM = re.compile(r"####\s*\$?\s*(-?[\d.,]*\d[\d.,]*)")
_ANY_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _clean_number(s: str) -> str:
    return s.replace(",", "").rstrip(".")


def extract_number(text: str) -> str | None:
    """GSM8K answer: the number after '####' if present, else the last number.

    Commas and a trailing '.' are stripped ("#### 1,234" -> "1234",
    "so the answer is 42." -> "42"). None if there is no number.
    """
    if text is None:
        return None
    m = _HASH_NUM.search(text)
    if m:
        return _clean_number(m.group(1))
    nums = _ANY_NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def exact_match(preds: Sequence[str | None], golds: Sequence[str]) -> float:
    """Fraction of ``preds[i] == golds[i]`` after stripping whitespace (None never matches)."""
    if len(preds) != len(golds):
        raise ConfigError(f"exact_match: {len(preds)} predictions for {len(golds)} golds")
    if not golds:
        return float("nan")
    hits = sum(p is not None and p.strip() == str(g).strip() for p, g in zip(preds, golds))
    return hits / len(golds)
