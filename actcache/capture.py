"""Hooked forward passes: one runner (`run`) with pluggable readers.

Every point a forward is read at, in every architecture, is in HOOKS, the one
table of hook points: the components (per decoder layer), each taken where it
joins the residual stream,
  resid  the block output (the residual stream after the layer)
  mlp    the MLP's contribution to the residual stream
  attn   the attention's contribution (after the output projection)
and the SAE hook points (resid_post, mlp_out, attn_out; see `sae`).

`run` hooks each reader at the (layer, point)s it names and stops the forward
once the last of them has been read, so the later layers and the LM head never
run. Readers: `Capture` pools and summarises inside the hook, so only (batch,
d_model) vectors and (batch, n_stats) statistics ever leave it and the (batch,
tokens, d_model) activations are never copied; `Activations` keeps a point's
activations (SAE codes pool them); `TokenActivations` keeps every span token's
(SAE training). Poolings are a registry (`register_pooling`): a build, its
store and a query accept every registered name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import ConfigError
from .prompts import attention_rule, pad_id

COMPONENTS = ("resid", "mlp", "attn")
# What a row's vector pools over: every token of input and label ("full"), or the input's alone.
SPANS = ("full", "input")
# The dtypes pooled arrays are stored in (statistics are always float32).
STORE_DTYPES = ("float16", "float32")
POOLINGS = ("mean", "last")  # the poolings a build stores by default (any of `pooling_names()`)
STATS = ("mean", "var", "skew", "kurt", "max_abs", "max_over_median")

# Hook points: decoder-layer class prefix -> point -> (submodule paths tried in
# order, "output" | "input": which of the first existing one's tensors is read).
# A path is dotted ("self_attn.o_proj"); "" is the decoder layer itself. Points:
# the components (resid, mlp, attn), each where it joins the residual stream,
# and the SAE hook points (resid_post, mlp_out, attn_out). Gemma 2/3 wrap each
# sublayer in a "sandwich" norm, so their contribution to the residual stream is
# the output of post_feedforward_layernorm / post_attention_layernorm (Gemma
# Scope's mlp_out is the former). In Llama and Qwen2, post_attention_layernorm is
# the *pre*-MLP norm and must not be used. attn_out is the input of the
# attention's output projection, in every architecture.
_MLP = ("mlp", "feed_forward", "ffn")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ = ("o_proj", "c_proj", "out_proj", "dense")
_DEFAULT_HOOKS = {
    "resid": (("",), "output"),
    "resid_post": (("",), "output"),
    "mlp": (_MLP, "output"),
    "mlp_out": (_MLP, "output"),
    "attn": (_ATTN, "output"),
    "attn_out": (tuple(f"{a}.{p}" for a in _ATTN for p in _OUT_PROJ), "input"),
}
_GEMMA_HOOKS = {
    "mlp": (("post_feedforward_layernorm",), "output"),
    "mlp_out": (("post_feedforward_layernorm",), "output"),
    "attn": (("post_attention_layernorm",), "output"),
}
HOOKS: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "Gemma2": {**_DEFAULT_HOOKS, **_GEMMA_HOOKS},
    "Gemma3": {**_DEFAULT_HOOKS, **_GEMMA_HOOKS},
    "": _DEFAULT_HOOKS,
}
READ_POINTS = tuple(_DEFAULT_HOOKS)


def _hook_entry(layer, point: str) -> tuple[tuple[str, ...], str]:
    cls = type(layer).__name__
    prefix = max((p for p in HOOKS if cls.startswith(p)), key=len)
    if point not in HOOKS[prefix]:
        raise ConfigError(f"unknown hook point {point!r}; choose from {READ_POINTS}")
    return HOOKS[prefix][point]


def hook_names(layer, point: str) -> tuple[str, ...]:
    """The submodule paths HOOKS gives for `point` of this decoder layer's class."""
    return _hook_entry(layer, point)[0]


def _submodule(layer, path: str):
    mod = layer
    for name in path.split(".") if path else ():
        mod = getattr(mod, name, None)
        if mod is None:
            return None
    return mod


def hook_module(layer, point: str):
    """(module, "output" | "input") where `point` (a component or an SAE hook
    point, see HOOKS) is read in one decoder layer."""
    paths, where = _hook_entry(layer, point)
    for path in paths:
        mod = _submodule(layer, path)
        if mod is not None:
            return mod, where
    if point in COMPONENTS:
        raise ConfigError(f"{type(layer).__name__} has no {point} submodule "
                          f"(looked for {paths}); drop {point!r} from --components")
    raise ConfigError(f"{type(layer).__name__} has no submodule for {point} (looked for {paths}); "
                      f"this model's {point} cannot be read")


def component_module(layer, component: str):
    """The module whose output is `component` (see HOOKS) in one decoder layer."""
    return hook_module(layer, component)[0]


class _Stop(Exception):
    """Raised by the last requested layer's hook to end the forward early."""


def decoder_layers(model):
    """(base_model, ModuleList of decoder blocks) for Llama/Qwen2/Gemma3/GPT-2-style models."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if layers is not None and hasattr(layers, "__len__"):
            return base, layers
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; supported: "
                      f"models whose base model has .layers (Llama, Qwen2, Gemma3) or .h (GPT-2)")


def resolve_layers(spec: str | Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """Parse '--layers': None/'all', '3', '0,5,-1', '2:8' (Python slice), negatives allowed."""
    if spec is None or spec == "all":
        return tuple(range(n_layers))
    out: list[int] = []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    for part in parts:
        if isinstance(part, str) and ":" in part:
            try:
                bits = [int(b) if b.strip() else None for b in part.split(":")]
                out.extend(range(n_layers)[slice(*bits)])
            except (ValueError, TypeError):
                raise ConfigError(f"bad layer slice {part!r} in --layers; use start:stop[:step] with integers "
                                  f"and a non-zero step, e.g. '2:10' or '0:18:3'") from None
            continue
        try:
            i = int(part)
        except ValueError:
            raise ConfigError(f"bad layer {part!r} in --layers; use e.g. 'all', '0,6,-1' or '2:10'") from None
        if not -n_layers <= i < n_layers:
            raise ConfigError(f"layer {i} is out of range: the model has {n_layers} layers "
                              f"(valid: 0..{n_layers - 1} or -{n_layers}..-1)")
        out.append(i % n_layers)
    if not out:
        raise ConfigError(f"--layers {spec!r} selects no layer of the {n_layers}")
    return tuple(sorted(set(out)))


@dataclass
class Batch:
    """A right-padded batch. `start`/`end` bound each example's pooled span."""

    input_ids: "object"  # (B, T) int64 tensor
    attention_mask: "object"  # (B, T) int64 tensor, 1 = real token
    start: "object"  # (B,) int64 tensor
    end: "object"  # (B,) int64 tensor, exclusive


def right_pad(seqs: list[list[int]], pad_id: int):
    """Right-pad token id lists -> (input_ids (B, T) int64, attention_mask (B, T) int64).
    The padding side is fixed here, whatever the tokenizer's default (Gemma pads left)."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        am[i, : len(s)] = 1
    return ids, am


def make_batch(seqs: list[list[int]], spans: list[tuple[int, int]], pad_id: int, device="cpu") -> Batch:
    """A right-padded Batch whose pooled span for row i is tokens [spans[i][0], spans[i][1])."""
    import torch

    ids, am = right_pad(seqs, pad_id)
    st = torch.tensor([a for a, _ in spans], dtype=torch.long)
    en = torch.tensor([b for _, b in spans], dtype=torch.long)
    return Batch(ids.to(device), am.to(device), st.to(device), en.to(device))


def sink_masks(model, attention_mask, dtype):
    """Additive 4D masks (B, 1, T, T) that are causal, hide padding, and remove
    attention to position 0 from every later position (the attention sink that
    carries massive activations). Returns a dict per layer type for models that
    mix sliding-window and full layers (Gemma3), else one tensor."""
    import torch

    B, T = attention_mask.shape
    dev = attention_mask.device
    q = torch.arange(T, device=dev)[:, None]
    k = torch.arange(T, device=dev)[None, :]
    causal = k <= q
    keep = causal & (attention_mask[:, None, :].bool() | (k == q))  # pad rows see themselves: no NaN
    keep = keep & ~((k == 0) & (q > 0))
    neg = torch.finfo(dtype).min

    def additive(allowed):
        m = torch.zeros((B, 1, T, T), dtype=dtype, device=dev)
        return m.masked_fill(~allowed[:, None], neg)

    layer_types = getattr(model.config, "layer_types", None)
    window = getattr(model.config, "sliding_window", None)
    if layer_types and window and "sliding_attention" in layer_types:
        # Keep a sink-removed row non-empty: within the window it still sees itself.
        sliding = keep & ((q - k) < window)
        return {"full_attention": additive(keep), "sliding_attention": additive(sliding)}
    return additive(keep)


class _Spans:
    """Per-batch index tensors shared by every hook of one forward.

    The median's padded layout: row i holds n_i = tokens_i * d span values among
    N = T * d slots; its lower middle value is the k_i-th smallest, k_i =
    (n_i + 1) // 2. Filling q_i = K - k_i padding slots with 0 (not above any
    |a|: a tie at 0 moves no rank's value) and the rest above every value,
    K = max k_i, puts that value at rank K in every row, so one selection at a
    common rank serves the whole batch. q_i <= N - n_i always holds: the fill
    fits. Filling runs per token, with at most one token per row split between
    low and high slots.

    Args:
        start, end: (B,) int64, the span is tokens [start, end).
        T, d: padded length and width of the activations.
        bits: a 16-bit float dtype: the median then runs on its int16 bit
            patterns (sign cleared), else on float32 values.
    """

    def __init__(self, start, end, T: int, d: int, bits=None):
        import torch

        dev = start.device
        pos = torch.arange(T, device=dev)[None, :]
        span = (pos >= start[:, None]) & (pos < end[:, None])  # (B, T)
        self.span = span  # (B, T) bool
        self.keep = span.double()  # (B, T) weights of the token partials
        self.sums = None  # the current unit's (B, d) float32 span sums, set by `_summarise`
        self.tokens = span.sum(1)  # (B,) int64
        self.last = end - 1
        self.rows = torch.arange(len(start), device=dev)
        self.n = (self.tokens * d).double()
        k = (self.tokens * d + 1) // 2
        self.K = int(k.max())
        self.even = (self.tokens * d) % 2 == 0
        pad = ~span
        # Low (0) slots left in each padding token, taken in token order.
        first_slot = (torch.cumsum(pad, 1) - 1) * d
        n_low = ((self.K - k)[:, None] - first_slot).clamp(0, d) * pad  # (B, T)
        high = pad & (n_low == 0)
        self.edge_b, self.edge_t = (pad & (n_low > 0) & (n_low < d)).nonzero(as_tuple=True)
        edge_low = torch.arange(d, device=dev)[None, :] < n_low[self.edge_b, self.edge_t][:, None]  # (e, d)
        self.bits = bits
        if bits is None:  # |a| * keep + lift: 0 on low padding, inf on high
            self.keep_a = span[..., None].float()
            top = torch.tensor(torch.inf, device=dev)
            self.lift = torch.where(high, top, 0.0)[..., None]
        else:  # (bits & keep) | lift: 0x7FFF is above every finite value's and inf's pattern
            top = torch.tensor(0x7FFF, dtype=torch.int16, device=dev)
            self.keep_a = torch.where(span, top, 0)[..., None].to(torch.int16)
            self.lift = torch.where(high, top, 0)[..., None].to(torch.int16)
        self.edge_fill = torch.where(edge_low, torch.zeros_like(top), top)  # (e, d)


def _spans_for(h, start, end) -> _Spans:
    B, T, d = h.shape
    sixteen = h.dtype.itemsize == 2 and h.device.type == "cpu"
    return _Spans(start.to(h.device), end.to(h.device), T, d, bits=h.dtype if sixteen else None)


def _buffer(scratch: dict, name: str, shape, dtype, device):
    """A reusable scratch tensor: fresh multi-MB allocations page-fault on every
    first touch, which costs as much as the arithmetic here."""
    import torch

    t = scratch.get(name)
    if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
        t = scratch[name] = torch.empty(shape, dtype=dtype, device=device)
    return t


def _middle_pair(a, K: int):
    """(K-th, (K+1)-th) smallest per row of a (R, N) tensor, same dtype, shape (R,).

    Reorders `a` in place. On CPU numpy's AVX-512 introselect with a single rank
    runs at about 1 ns a float32 and 0.3 ns an int16, 4x faster than
    torch.kthvalue and 10x faster than np.median (whose two ranks take numpy's
    scalar path); the (K+1)-th is then the minimum of the upper part."""
    import torch

    N = a.shape[1]
    if a.device.type == "cpu":
        an = a.numpy()
        an.partition(K - 1, axis=1)
        lo = torch.from_numpy(an[:, K - 1].copy())
        return lo, (torch.from_numpy(an[:, K:].min(1)) if K < N else lo)
    return _middle_pair_select(a, K)


def _middle_pair_select(a, K: int):
    """`_middle_pair` off the CPU, on `a`'s device: one selection for the K-th;
    the (K+1)-th is the K-th itself when more than K values are at most it,
    else the smallest value above it (found by masking `a` in place)."""
    import torch

    lo = torch.kthvalue(a, K, dim=1).values
    if K >= a.shape[1]:
        return lo, lo
    at_most = a <= lo[:, None]
    ties = at_most.sum(1) > K
    top = torch.inf if a.dtype.is_floating_point else torch.iinfo(a.dtype).max
    return lo, torch.where(ties, lo, a.masked_fill_(at_most, top).amin(1))


def _mean(x, sp: "_Spans"):
    return sp.sums / sp.tokens[:, None]


def _last(x, sp: "_Spans"):
    return x[sp.rows, sp.last]


# Pooling name -> fn(x, sp) -> (B, d) float32: x is the unit's (B, T, d) float32
# activations (padding not zeroed; reused after the call, so the result must not
# alias it), sp the batch's `_Spans` (span, tokens, last, rows, and sums: the
# unit's (B, d) span sums). The one place a pooling is defined: a build, its
# store and a query accept every name registered here.
_POOLINGS: dict = {"mean": _mean, "last": _last}


def register_pooling(name: str, fn) -> None:
    """Make `name` a pooling every build, store and query accepts (see `_POOLINGS`)."""
    if name in _POOLINGS:
        raise ConfigError(f"pooling {name!r} is already registered; pick another name")
    _POOLINGS[name] = fn


def unregister_pooling(name: str) -> None:
    """Remove a pooling `register_pooling` added (mean and last stay)."""
    if name in POOLINGS:
        raise ConfigError(f"pooling {name!r} is built in and cannot be removed")
    _POOLINGS.pop(name, None)


def pooling_names() -> tuple[str, ...]:
    """Every registered pooling, built-ins first."""
    return tuple(_POOLINGS)


def _summarise(h, sp: _Spans, poolings, want_stats: bool, scratch: dict):
    """Pool one unit's activations and summarise them in whole-tensor passes.

    Args:
        h: (B, T, d) activations of any float dtype; read only.
        sp: the batch's spans (`_spans_for`).
        scratch: reusable buffers (see `_buffer`); results never alias them.

    Returns:
        ({pooling: (B, d) float32}, (B, len(STATS)) float64 or None).

    Padding is never zeroed: reductions run per token over d in float32, and
    the (B, T) token partials are combined with the span weights in float64.
    Moments: float32 element work on values shifted by the float32 span mean,
    corrected exactly in float64 for the shift's rounding (raw moments about a
    point -> central moments), so a large mean loses no precision to
    cancellation. Median: exact, numpy's definition (the mean of the two middle
    values), by one selection over the layout of `_Spans`.
    """
    import torch

    B, T, d = h.shape
    dev = h.device
    if h.dtype == torch.float32:
        x = h
    else:  # one float32 copy, centred in place below
        x = _buffer(scratch, "x", (B, T, d), torch.float32, dev).copy_(h)
    s1 = torch.bmm(sp.keep.float()[:, None, :], x)[:, 0]  # (B, d) span sums
    sp.sums = s1
    pooled = {p: _POOLINGS[p](x, sp) for p in poolings}
    if not want_stats:
        return pooled, None
    mean = s1.double().sum(1) / sp.n  # (B,)
    shift = mean.float()

    # |a| for the median, padding at 0 (so max |a| needs no mask), then lifted.
    # A 16-bit float's bit pattern with the sign cleared orders like its value
    # and selects 3x faster than float32.
    if sp.bits is None:
        a = torch.abs(h, out=_buffer(scratch, "a", (B, T, d), torch.float32, dev)).mul_(sp.keep_a)
        max_abs = a.amax((1, 2)).double()
        a.add_(sp.lift)
    else:
        a = torch.bitwise_and(h.view(torch.int16), sp.keep_a, out=_buffer(scratch, "a", (B, T, d), torch.int16, dev))
        max_abs = a.amax((1, 2)).view(sp.bits).double()
        a.bitwise_or_(sp.lift)
    a[sp.edge_b, sp.edge_t] = sp.edge_fill
    lo, hi = _middle_pair(a.view(B, T * d), sp.K)
    if sp.bits is not None:
        lo, hi = lo.view(sp.bits), hi.view(sp.bits)
    lo, hi = lo.double().to(dev), hi.double().to(dev)
    med = torch.where(sp.even, (lo + hi) / 2, lo)

    if x is h:
        c = torch.sub(h, shift[:, None, None], out=_buffer(scratch, "x", (B, T, d), torch.float32, dev))
    else:
        c = x.sub_(shift[:, None, None])
    c2 = torch.mul(c, c, out=_buffer(scratch, "c2", (B, T, d), torch.float32, dev))

    def span_mean(tok):  # (B, T) float32 token partials -> (B,) float64 mean over the span
        return (tok.double() * sp.keep).sum(1) / sp.n

    e2 = span_mean(c2.sum(-1))
    e4 = span_mean(torch.linalg.vector_norm(c2, dim=-1) ** 2)
    e3 = span_mean(c2.mul_(c).sum(-1))
    e1 = mean - shift.double()  # the shifted values' mean, exactly: the shift's rounding
    m2 = e2 - e1 ** 2
    m3 = e3 - 3 * e1 * e2 + 2 * e1 ** 3
    m4 = e4 - 4 * e1 * e3 + 6 * e1 ** 2 * e2 - 3 * e1 ** 4
    safe = m2 > 0
    skew = torch.where(safe, m3 / m2.clamp_min(1e-300) ** 1.5, torch.zeros_like(m2))
    kurt = torch.where(safe, m4 / m2.clamp_min(1e-300) ** 2 - 3.0, torch.zeros_like(m2))
    ratio = torch.where(med > 0, max_abs / med.clamp_min(1e-300), torch.full_like(med, float("inf")))
    return pooled, torch.stack([mean, m2, skew, kurt, max_abs, ratio], 1)


class Reader:
    """What `run` drives: a reader names the (layer, point)s it reads (`points`,
    see HOOKS), is told of each batch (`start`), is handed the activations at
    each of its points inside the forward (`read`), and ends the batch once the
    forward stops (`finish`, still in inference mode); `release` frees what it
    holds whether the forward succeeded or not."""

    def points(self) -> list[tuple[int, str]]:
        raise NotImplementedError

    def start(self, batch: Batch) -> None:
        pass

    def read(self, layer: int, point: str, h) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def release(self) -> None:
        pass


def attention_for(model, batch: Batch, rule: str):
    """The attention mask argument of a forward of `batch` under an attention
    rule (`prompts.attention_rule`): the padding mask for "causal", `sink_masks`
    for "sink"."""
    if rule == "causal":
        return batch.attention_mask
    if rule == "sink":
        return sink_masks(model, batch.attention_mask, model.dtype)
    raise ConfigError(f"unknown attention rule {rule!r}; choose 'causal' or 'sink'")


def _register(mod, where: str, on):
    if where == "input":
        return mod.register_forward_pre_hook(lambda _m, args: on(args[0]))
    return mod.register_forward_hook(lambda _m, _a, out: on(out[0] if isinstance(out, tuple) else out))


def run(model, batch: Batch, readers, attention: str = "causal", attention_mask=None) -> None:
    """Forward `batch` through the base model with every reader's hooks in place,
    stopping as soon as the last hook has read (one `_Stop`): the layers after it
    and the LM head never run. `attention` is an attention rule (see
    `attention_for`); an explicit `attention_mask` overrides it."""
    import torch

    base, blocks = decoder_layers(model)
    reads = [(r, L, p) for r in readers for L, p in r.points()]
    if not reads:
        raise ConfigError("no reader asks for a layer; name at least one layer and component to read")
    mods = [hook_module(blocks[L], p) for _, L, p in reads]
    mask = attention_for(model, batch, attention) if attention_mask is None else attention_mask
    pending = [len(reads)]

    def hook(reader, layer, point):
        def on(h):
            reader.read(layer, point, h)
            pending[0] -= 1
            if pending[0] == 0:
                raise _Stop
        return on

    handles = []
    try:
        for r in readers:
            r.start(batch)
        for (r, L, p), (mod, where) in zip(reads, mods):
            handles.append(_register(mod, where, hook(r, L, p)))
        with torch.inference_mode():
            try:
                base(input_ids=batch.input_ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            for r in readers:
                r.finish()
    finally:
        for h in handles:
            h.remove()
        for r in readers:
            r.release()


class Capture(Reader):
    """Pools activations and computes statistics inside the forward.

    Args:
        model: a transformers causal LM.
        layers: decoder layer indices (non-negative, sorted).
        components: subset of COMPONENTS.
        poolings: registered poolings (`pooling_names()`).
        stats: compute STATS per captured (component, layer) when True.
        units: the (component, layer) pairs to capture; default every pair of
            `layers` x `components`.

    After `run(batch)`: `pooled[(component, layer, pooling)]` is a (B, d) float32
    numpy array and `stats[(component, layer)]` a (B, len(STATS)) float64 array.

    Each unit is summarised in its own hook, while its output is still in cache;
    results stay on the device until the forward ends, then move in one transfer.
    """

    def __init__(self, model, layers, components, poolings, stats=True, units=None):
        self.model = model
        self.base, self.blocks = decoder_layers(model)
        n = len(self.blocks)
        for i in layers:
            if not 0 <= i < n:
                raise ConfigError(f"layer {i} out of range for a model with {n} layers")
        for c in components:
            if c not in COMPONENTS:
                raise ConfigError(f"unknown component {c!r}; choose from {COMPONENTS}")
        for p in poolings:
            if p not in _POOLINGS:
                raise ConfigError(f"unknown pooling {p!r}; choose from {pooling_names()}")
        units = {(c, L) for L in layers for c in components} if units is None else set(units)
        for c, L in units:
            if c not in components or L not in layers:
                raise ConfigError(f"unit ({c!r}, {L}) is outside components {tuple(components)} "
                                  f"x layers {tuple(layers)}")
        self.layers = tuple(sorted({L for _, L in units}))
        self.components = tuple(components)
        self.units = {L: tuple(c for c in COMPONENTS if (c, L) in units) for L in self.layers}
        self.poolings = tuple(poolings)
        self.want_stats = stats
        self.pooled: dict = {}
        self.stats: dict = {}
        self._batch: Batch | None = None
        self._spans: _Spans | None = None
        self._scratch: dict = {}
        self._out: list = []

    def points(self) -> list[tuple[int, str]]:
        return [(L, c) for L in self.layers for c in self.units[L]]

    def start(self, batch: Batch) -> None:
        self.pooled, self.stats, self._batch, self._spans, self._out = {}, {}, batch, None, []

    def read(self, layer: int, component: str, h) -> None:
        if self._spans is None:
            self._spans = _spans_for(h, self._batch.start, self._batch.end)
        self._out.append((component, layer, *_summarise(h, self._spans, self.poolings, self.want_stats,
                                                        self._scratch)))

    def finish(self) -> None:
        """Move every result to the host in one transfer per kind."""
        import torch

        keys = [(c, L) for c, L, _, _ in self._out]
        for p in self.poolings:
            host = torch.stack([pooled[p] for _, _, pooled, _ in self._out]).cpu().numpy()
            self.pooled.update({(c, L, p): host[i] for i, (c, L) in enumerate(keys)})
        if self.want_stats:
            host = torch.stack([st for *_, st in self._out]).cpu().numpy()
            self.stats.update({k: host[i] for i, k in enumerate(keys)})

    def release(self) -> None:
        self._batch, self._spans, self._out = None, None, []
        self._scratch = {}  # a long-lived Capture should not pin a large batch's buffers

    def run(self, batch: Batch, attention_mask=None) -> None:
        """Forward `batch` through the base model up to the last requested unit."""
        run(self.model, batch, [self], attention_mask=attention_mask)


class Activations(Reader):
    """The (B, T, d) activations at one (layer, point), as float32 numpy on the
    host in `h` after each batch."""

    def __init__(self, layer: int, point: str):
        self.layer, self.point = int(layer), point
        self.h = None
        self._seen = None

    def points(self) -> list[tuple[int, str]]:
        return [(self.layer, self.point)]

    def start(self, batch: Batch) -> None:
        self.h, self._seen = None, None

    def read(self, layer: int, point: str, h) -> None:
        self._seen = h

    def finish(self) -> None:
        self.h = self._seen.float().cpu().numpy()

    def release(self) -> None:
        self._seen = None


class TokenActivations(Activations):
    """Every span token's activations at one (layer, point): after each batch,
    `tokens` holds one (tokens_i, d) float32 array per row of the batch."""

    def start(self, batch: Batch) -> None:
        super().start(batch)
        self.tokens: list = []
        self._bounds = list(zip(batch.start.tolist(), batch.end.tolist()))

    def finish(self) -> None:
        super().finish()
        self.tokens = [self.h[j, s:e] for j, (s, e) in enumerate(self._bounds)]
        self.h = None


def forward_rows(model, tokenizer, readers, seqs, spans, rows, mask: str) -> None:
    """Run `readers` (one Reader or a list) on the given rows (indices into
    `seqs`/`spans`) as one right-padded batch, under the attention of `mask`
    (`prompts.attention_rule`)."""
    batch = make_batch([seqs[i] for i in rows], [spans[i] for i in rows], pad_id(tokenizer),
                       next(model.parameters()).device)
    run(model, batch, readers if isinstance(readers, (list, tuple)) else [readers], attention_rule(mask))


def span_stats(h, start, end) -> np.ndarray:
    """Statistics over the token-by-dimension values of each example's span.

    Args:
        h: (B, T, d) activations of any float dtype.
        start, end: (B,) int tensors; the span is tokens [start, end).

    Returns:
        (B, 6) float64: mean, variance, skewness, excess kurtosis (population
        moments, as scipy.stats with bias=True), max |a|, and max |a| / median |a|
        (the exact median, as numpy's: the mean of the two middle values).
    """
    _, st = _summarise(h, _spans_for(h, start, end), (), True, {})
    return st.cpu().numpy()
