"""Hooked forward passes: per-layer pooled activations and per-example statistics.

Components (per decoder layer):
  resid  the block output (the residual stream after the layer)
  mlp    the MLP module's output, before it is added to the residual stream
  attn   the attention module's output (after the output projection)

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

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


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


def _component_module(layer, component: str):
    if component == "resid":
        return layer
    names = _ATTN_NAMES if component == "attn" else _MLP_NAMES
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
            bits = [int(b) if b.strip() else None for b in part.split(":")]
            out.extend(range(n_layers)[slice(*bits)])
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


class Capture:
    """Registers hooks that pool activations and compute statistics in the forward.

    Args:
        model: a transformers causal LM.
        layers: decoder layer indices (non-negative, sorted).
        components: subset of COMPONENTS.
        poolings: subset of POOLINGS.
        stats: compute STATS per (component, layer) when True.

    After `run(batch)`: `pooled[(component, layer, pooling)]` is a (B, d) float32
    numpy array and `stats[(component, layer)]` a (B, len(STATS)) float64 array.
    """

    def __init__(self, model, layers, components, poolings, stats=True):
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
        self.layers = tuple(sorted(layers))
        self.components = tuple(components)
        self.poolings = tuple(poolings)
        self.want_stats = stats
        self.pooled: dict = {}
        self.stats: dict = {}
        self._batch: Batch | None = None

    def _hook(self, component, layer):
        def fn(_module, _inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            self._reduce(component, layer, h)
        return fn

    def _reduce(self, component, layer, h):
        import torch

        b = self._batch
        B, T, _ = h.shape
        pos = torch.arange(T, device=h.device)[None, :]
        span = (pos >= b.start[:, None]) & (pos < b.end[:, None])  # (B, T)
        cnt = span.sum(1)
        hs = h.float()
        if "mean" in self.poolings:
            m = (hs * span[..., None]).sum(1) / cnt[:, None]
            self.pooled[(component, layer, "mean")] = m.cpu().numpy()
        if "last" in self.poolings:
            last = hs[torch.arange(B, device=h.device), b.end - 1]
            self.pooled[(component, layer, "last")] = last.cpu().numpy()
        if self.want_stats:
            self.stats[(component, layer)] = span_stats(h, b.start, b.end)

    def run(self, batch: Batch, attention_mask=None) -> None:
        """Forward `batch` through the base model up to the last requested layer."""
        import torch

        self.pooled, self.stats, self._batch = {}, {}, batch
        handles = []
        try:
            for layer in self.layers:
                for comp in self.components:
                    mod = _component_module(self.blocks[layer], comp)
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
        finally:
            for h in handles:
                h.remove()
            self._batch = None


def span_stats(h, start, end) -> np.ndarray:
    """Statistics over the token-by-dimension values of each example's span.

    Args:
        h: (B, T, d) activations of any float dtype.
        start, end: (B,) int tensors; the span is tokens [start, end).

    Returns:
        (B, 6) float64: mean, variance, skewness, excess kurtosis (population
        moments, as scipy.stats with bias=True), max |a|, and max |a| / median |a|
        (median as numpy's, interpolating between the middle two values).
    """
    import torch

    B, T, d = h.shape
    pos = torch.arange(T, device=h.device)[None, :]
    span = ((pos >= start[:, None]) & (pos < end[:, None]))[..., None]  # (B, T, 1)
    n = (span.sum((1, 2)) * d).double()
    f64 = torch.float64

    def total(t):
        # Sum over tokens in float32 (at most max_length terms), then over
        # dimensions in float64: ~1e-6 relative, 10x cheaper than an all-float64 sum.
        return t.sum(1).double().sum(1)

    x = h.float() * span
    mu = total(x) / n
    c = (x - mu.float()[:, None, None]) * span
    c2 = c * c
    m2 = total(c2) / n
    m3 = total(c2 * c) / n
    m4 = total(c2 * c2) / n
    a = x.abs()
    mx = a.amax((1, 2)).double()
    # numpy's median (mean of the two middle values) by introselect on a
    # zero-copy view: 20x faster than torch.kthvalue or a batched sort here.
    med = torch.empty(B, dtype=f64)
    a_cpu = a if a.device.type == "cpu" else a.cpu()
    for i in range(B):
        med[i] = float(np.median(a_cpu[i, int(start[i]): int(end[i])].numpy()))
    med = med.to(h.device)
    safe = m2 > 0
    skew = torch.where(safe, m3 / m2.clamp_min(1e-300) ** 1.5, torch.zeros_like(m2))
    kurt = torch.where(safe, m4 / m2.clamp_min(1e-300) ** 2 - 3.0, torch.zeros_like(m2))
    ratio = torch.where(med > 0, mx / med.clamp_min(1e-300), torch.full_like(mx, float("inf")))
    return torch.stack([mu, m2, skew, kurt, mx, ratio], 1).cpu().numpy()
