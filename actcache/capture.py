"""Hooked forward passes: per-layer pooled activations and per-example statistics.

Components (per decoder layer), each taken where it joins the residual stream
(see HOOKS, the one table of hook points per architecture):
  resid  the block output (the residual stream after the layer)
  mlp    the MLP's contribution to the residual stream
  attn   the attention's contribution (after the output projection)

Hooks pool and summarise inside the forward pass, so only (batch, d_model)
vectors and (batch, n_stats) statistics ever leave a hook; the (batch, tokens,
d_model) activations are never copied. The forward stops right after the last
requested layer and never reaches the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import ConfigError

COMPONENTS = ("resid", "mlp", "attn")
POOLINGS = ("mean", "last")
MASKS = ("isolated", "in-context", "label-masked", "sink-masked")
STATS = ("mean", "var", "skew", "kurt", "max_abs", "max_over_median")

# Hook points: decoder-layer class prefix -> component -> submodule names tried
# in order (the output of the first that exists is captured). Gemma 2/3 wrap
# each sublayer in a "sandwich" norm, so their contribution to the residual
# stream is the output of post_feedforward_layernorm / post_attention_layernorm
# (Gemma Scope's mlp_out is the former). In Llama and Qwen2,
# post_attention_layernorm is the *pre*-MLP norm and must not be used.
HOOKS: dict[str, dict[str, tuple[str, ...]]] = {
    "Gemma2": {"mlp": ("post_feedforward_layernorm",), "attn": ("post_attention_layernorm",)},
    "Gemma3": {"mlp": ("post_feedforward_layernorm",), "attn": ("post_attention_layernorm",)},
    "": {"mlp": ("mlp", "feed_forward", "ffn"), "attn": ("self_attn", "attn", "attention", "self_attention")},
}


def hook_names(layer, component: str) -> tuple[str, ...]:
    """The submodule names HOOKS gives for this decoder layer's class."""
    cls = type(layer).__name__
    prefix = max((p for p in HOOKS if cls.startswith(p)), key=len)
    return HOOKS[prefix][component]


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


def component_module(layer, component: str):
    if component == "resid":
        return layer
    names = hook_names(layer, component)
    for n in names:
        mod = getattr(layer, n, None)
        if mod is not None:
            return mod
    raise ConfigError(f"{type(layer).__name__} has no {component} submodule "
                      f"(looked for {names}); drop {component!r} from --components")


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
        self.keep = span.double()  # (B, T) weights of the token partials
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
    lo = torch.kthvalue(a, K, dim=1).values
    return lo, (torch.kthvalue(a, K + 1, dim=1).values if K < N else lo)


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
    pooled = {}
    if "mean" in poolings:
        pooled["mean"] = s1 / sp.tokens[:, None]
    if "last" in poolings:
        pooled["last"] = x[sp.rows, sp.last]
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


class Capture:
    """Registers hooks that pool activations and compute statistics in the forward.

    Args:
        model: a transformers causal LM.
        layers: decoder layer indices (non-negative, sorted).
        components: subset of COMPONENTS.
        poolings: subset of POOLINGS.
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
            if p not in POOLINGS:
                raise ConfigError(f"unknown pooling {p!r}; choose from {POOLINGS}")
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

    def _hook(self, component, layer):
        def fn(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            if self._spans is None:
                self._spans = _spans_for(h, self._batch.start, self._batch.end)
            self._out.append((component, layer, *_summarise(h, self._spans, self.poolings, self.want_stats,
                                                            self._scratch)))
        return fn

    def run(self, batch: Batch, attention_mask=None) -> None:
        """Forward `batch` through the base model up to the last requested layer."""
        import torch

        self.pooled, self.stats, self._batch, self._spans, self._out = {}, {}, batch, None, []
        handles = []
        try:
            for layer in self.layers:
                for comp in self.units[layer]:
                    mod = component_module(self.blocks[layer], comp)
                    handles.append(mod.register_forward_hook(self._hook(comp, layer)))

            def stop(_m, _i, _o):
                raise _Stop

            handles.append(self.blocks[self.layers[-1]].register_forward_hook(stop))
            with torch.inference_mode():
                try:
                    self.base(input_ids=batch.input_ids,
                              attention_mask=batch.attention_mask if attention_mask is None else attention_mask,
                              use_cache=False)
                except _Stop:
                    pass
                self._collect()
        finally:
            for h in handles:
                h.remove()
            self._batch, self._spans, self._out = None, None, []
            self._scratch = {}  # a long-lived Capture should not pin a large batch's buffers

    def _collect(self) -> None:
        """Move every result to the host in one transfer per kind."""
        import torch

        keys = [(c, L) for c, L, _, _ in self._out]
        for p in self.poolings:
            host = torch.stack([pooled[p] for _, _, pooled, _ in self._out]).cpu().numpy()
            self.pooled.update({(c, L, p): host[i] for i, (c, L) in enumerate(keys)})
        if self.want_stats:
            host = torch.stack([st for *_, st in self._out]).cpu().numpy()
            self.stats.update({k: host[i] for i, k in enumerate(keys)})


def forward_rows(model, tokenizer, cap: "Capture", seqs, spans, rows, mask: str) -> None:
    """Run `cap` on the given rows (indices into `seqs`/`spans`) as one
    right-padded batch, under the attention of `mask`."""
    from .prompts import pad_id

    batch = make_batch([seqs[i] for i in rows], [spans[i] for i in rows], pad_id(tokenizer),
                       next(model.parameters()).device)
    attn = sink_masks(model, batch.attention_mask, model.dtype) if mask == "sink-masked" else None
    cap.run(batch, attention_mask=attn)


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
