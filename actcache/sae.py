"""Sparse autoencoders over cached hook points: load SAELens / Gemma Scope
directories, encode per-token activations, and pool the feature activations
over the same spans as the dense arrays, kept sparse.

Layouts read:
  SAELens      `cfg.json` + `sae_weights.safetensors`: `W_enc` (d_in, d_sae), `b_enc` (d_sae,),
               `W_dec` (d_sae, d_in), `b_dec` (d_in,) and, for JumpReLU, `threshold` (d_sae,);
               the hook in cfg.json's `hook_name` (SAELens 6: `metadata.hook_name`)
  Gemma Scope  `params.safetensors` (or `params.npz`), the same names in lower case, and
               optionally `config.json` (`hf_hook_point_in`); else the hook and layer come
               from the folder names (`mlp_out/layer_9_width_16k_...`)
  sparsify     `cfg.json` (`activation: topk`, `k`) + `sae.safetensors` holding an
               nn.Linear encoder (`encoder.weight` (d_sae, d_in), `encoder.bias`), `W_dec`,
               `b_dec`; it subtracts b_dec at the input. The hook comes from the folder
               name (`layers.9.post_feedforward_layernorm`) or the caller.

Encoders (x: (n, d_in) float32; pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc):
    relu      f = max(pre, 0)
    jumprelu  f = max(pre, 0) * (pre > threshold)            (SAELens's JumpReLUSAE.encode)
    topk      f = max(pre, 0) kept at its k largest entries per row, others 0; with
              rescale_acts_by_decoder_norm the ranking and values use pre * |W_dec row|
Decoder: x_hat = f @ W_dec + b_dec (f / |W_dec row| first when rescaled).

Hook points (`HOOK_POINTS`, Gemma Scope's names): `resid_post` is the decoder
block's output, `mlp_out` the MLP's contribution as `capture.HOOKS` defines it
(Gemma: the output of post_feedforward_layernorm), `attn_out` the *input* of
the attention's output projection (`o_proj`, `c_proj` on GPT-2).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .capture import Activations, TokenActivations, decoder_layers, forward_rows
from .data import DataSpec, load, read_text, record_text, subsample
from .errors import ConfigError, MissingExtraError
from .models import ModelSpec, load_model, set_threads
from .prompts import length_batches, text_rows
from .store import Store, default_home, short_sae_key

KINDS = ("relu", "jumprelu", "topk")
HOOK_POINTS = ("resid_post", "mlp_out", "attn_out")


@dataclass(frozen=True, eq=False)
class SAE:
    """A sparse autoencoder's weights (float32 numpy) and what it reads.

    W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,),
    threshold (d_sae,) for jumprelu else None; k for topk; hook in HOOK_POINTS;
    layer the decoder layer; key the sha256 of weights and config.
    data_mean (d_in,): the mean activation of the SAE's training tokens, where its
    directory records one (`train_sae` does; SAELens and Gemma Scope do not): the
    reference mean of the per-example FVU (`pooled_codes`). Like `training` (what
    it trained on, see `training_overlap`), a statistic: neither enters the key.
    """

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    kind: str
    hook: str
    layer: int
    threshold: np.ndarray | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = False
    key: str = ""
    rescale_acts_by_decoder_norm: bool = False
    data_mean: np.ndarray | None = None
    training: dict | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Feature activations, (n, d_sae) float32, of activations x (n, d_in)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ConfigError(f"the SAE reads {self.d_in}-dim activations, got shape {x.shape}; check its hook "
                              f"point and layer ({self.hook}, layer {self.layer})")
        pre = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
        if self.kind == "jumprelu":
            # relu first, as SAELens: a negative threshold never lets a negative value through
            return np.maximum(pre, 0) * (pre > self.threshold)
        if self.kind == "topk" and self.rescale_acts_by_decoder_norm:
            pre = pre * self._decoder_norm()
        f = np.maximum(pre, 0)
        if self.kind == "topk":
            k = min(int(self.k), f.shape[1])
            drop = np.argpartition(-f, k - 1, axis=1)[:, k:]
            np.put_along_axis(f, drop, 0.0, axis=1)
        return f

    def decode(self, f: np.ndarray) -> np.ndarray:
        """Reconstruction, (n, d_in) float32, of feature activations f (n, d_sae)."""
        f = np.asarray(f, dtype=np.float32)
        if self.kind == "topk" and self.rescale_acts_by_decoder_norm:
            f = f / self._decoder_norm()
        return f @ self.W_dec + self.b_dec

    def _decoder_norm(self) -> np.ndarray:
        """(d_sae,) float32 norms of the decoder rows (SAELens clamps them at 1e-8)."""
        return np.maximum(np.linalg.norm(self.W_dec, axis=1), 1e-8).astype(np.float32)


def _pick(weights: dict, *names: str) -> np.ndarray | None:
    low = {k.lower(): v for k, v in weights.items()}
    for n in names:
        if n.lower() in low:
            return np.asarray(low[n.lower()], dtype=np.float32)
    return None


def _damaged(path: Path, e: BaseException) -> ConfigError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ConfigError(f"SAE file {path} is damaged or not what its name says ({first}); copy or download "
                       f"the SAE directory again")


def _read_cfg(d: Path) -> dict:
    """cfg.json (SAELens, sparsify), else Gemma Scope's config.json, else {}; a file
    that is not a JSON object is a ConfigError naming it."""
    for name in ("cfg.json", "config.json"):
        p = d / name
        if not p.exists():
            continue
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise _damaged(p, e) from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"SAE file {p} holds a JSON {type(cfg).__name__}, not an object; copy or "
                              f"download the SAE directory again")
        if cfg:
            return cfg
    return {}


def _check_finite(d: Path, arrays: dict) -> None:
    """ConfigError naming the first weight with a NaN or an infinity."""
    for name, a in arrays.items():
        if a is not None and not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise ConfigError(f"{d}: the SAE's {name} holds {bad} NaN or infinite values; the SAE is broken "
                              f"(diverged training or a damaged file): train or download it again")


def _read_weights(d: Path) -> dict:
    """The SAE's weights by name; ConfigError naming the file when it cannot be read."""
    for name in ("sae_weights.safetensors", "params.safetensors", "sae.safetensors", "model.safetensors"):
        if (d / name).exists():
            from safetensors import SafetensorError
            from safetensors.numpy import load_file

            try:
                return load_file(str(d / name))
            except (SafetensorError, OSError, ValueError) as e:
                raise _damaged(d / name, e) from None
    if (d / "params.npz").exists():
        try:
            with np.load(d / "params.npz", allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise _damaged(d / "params.npz", e) from None
    raise ConfigError(f"{d} holds no SAE weights (sae_weights.safetensors, params.safetensors, sae.safetensors "
                      f"or params.npz); point --sae at a SAELens, Gemma Scope or sparsify directory")


SAE_KEY_VERSION = 1


def sae_key(sae: SAE) -> str:
    """The SAE's content key: sha256 of the canonical JSON of what decides its
    codes (kind, hook, layer, k, b_dec and rescaling options, key version) and
    of every weight as encoded (float32 bytes and shape). Metadata (trainer,
    source, paths) does not enter it, so a trained SAE's directory name, its
    cfg.json "key" and the key a build records for it are one and the same."""
    cfg = {"kind": sae.kind, "hook": sae.hook, "layer": int(sae.layer), "k": sae.k,
           "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
           "rescale_acts_by_decoder_norm": bool(sae.rescale_acts_by_decoder_norm), "version": SAE_KEY_VERSION}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
               **({"threshold": sae.threshold} if sae.threshold is not None else {})}
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name], dtype=np.float32)
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# TransformerLens / SAELens names of the hook points; Gemma Scope's Hugging Face
# names. TransformerLens's hook_attn_out is o_proj's *output*, which is not
# Gemma Scope's attn_out (o_proj's input, TransformerLens's attn.hook_z).
TL_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "attn.hook_z"}
_HOOK_PATTERNS = (
    ("resid_post", r"^(hook_resid_post|output)?$"),
    ("mlp_out", r"^(hook_mlp_out|(mlp\.)?post_feedforward_layernorm(\.output)?)$"),
    ("attn_out", r"^(attn\.hook_z|(self_attn\.)?o_proj\.input)$"),
)


def hook_from_name(name: str | None) -> tuple[str | None, int | None]:
    """(hook point, layer) a hook name denotes; None where it does not say.

    'blocks.9.hook_mlp_out' -> ('mlp_out', 9); 'blocks.3.attn.hook_z' ->
    ('attn_out', 3); Gemma Scope's 'model.layers.5.self_attn.o_proj.input' ->
    ('attn_out', 5), 'model.layers.5.output' -> ('resid_post', 5); sparsify's
    'layers.7.post_feedforward_layernorm' -> ('mlp_out', 7).
    """
    import re

    m = re.search(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)", name or "")
    if m is None:
        return None, None
    rest = (name or "")[m.end():]
    hook = next((p for p, pat in _HOOK_PATTERNS if re.match(pat, rest)), None)
    return hook, int(m.group(1))


def _hook_from_folders(d: Path) -> tuple[str | None, int | None]:
    """Gemma Scope's folder names: .../mlp_out/layer_9_width_16k_l0_medium; sparsify's: .../layers.9."""
    import re

    hook, layer = hook_from_name(d.name)
    for part in reversed(d.resolve().parts):
        m = re.match(r"layer_(\d+)(?:_|$)", part)
        if layer is None and m:
            layer = int(m.group(1))
        if hook is None and part in HOOK_POINTS:
            hook = part
    return hook, layer


def _sparsify_weights(d: Path, cfg: dict, w: dict) -> dict:
    """sparsify's nn.Linear encoder as SAELens names (W_enc is encoder.weight transposed)."""
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"{d}: sparsify activation {cfg.get('activation')!r}; actcache reads topk SAEs")
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in w:
        raise ConfigError(f"{d}: a sparsify transcoder or skip connection is not an autoencoder of one hook point")
    return {"W_enc": w["encoder.weight"].T, "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}


def load_sae(path: str | Path, hook: str | None = None, layer: int | None = None) -> SAE:
    """Load an SAE directory (SAELens, Gemma Scope or sparsify layout; see the module
    docstring). `hook`/`layer` fill in or override what its files say.

    Raises ConfigError for what actcache would encode differently from the SAE's
    own library (activation normalisation, transcoders, TransformerLens's
    hook_attn_out), naming what to do instead.
    """
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ConfigError(f"SAE directory {d} does not exist")
    cfg = _read_cfg(d)
    w = _read_weights(d)
    sparsify = "encoder.weight" in w
    named = _sparsify_weights(d, cfg, w) if sparsify else w
    W_enc, b_enc = _pick(named, "W_enc", "w_enc"), _pick(named, "b_enc")
    W_dec, b_dec = _pick(named, "W_dec", "w_dec"), _pick(named, "b_dec")
    if any(a is None for a in (W_enc, b_enc, W_dec, b_dec)):
        raise ConfigError(f"{d}: the weights need W_enc, b_enc, W_dec and b_dec; found {sorted(w)}")
    threshold = _pick(w, "threshold", "log_threshold")
    if threshold is not None and "log_threshold" in {k.lower() for k in w} and "threshold" not in {k.lower() for k in w}:
        threshold = np.exp(threshold)
    _check_finite(d, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": threshold})
    for opt, ok in (("normalize_activations", ("none",)), ("reshape_activations", ("none", "hook_z"))):
        if (cfg.get(opt) or "none") not in ok:
            raise ConfigError(f"{d}: {opt}={cfg[opt]!r} is not supported; fold it into the weights with "
                              f"SAELens (e.g. sae.fold_activation_norm_scaling_factor) and save again")
    if cfg.get("hf_hook_point_out") or cfg.get("hook_name_out") or cfg.get("affine_connection") is not None:
        raise ConfigError(f"{d} is a transcoder (it reads one hook point and writes another), not an SAE")
    arch = ("topk" if sparsify
            else str(cfg.get("architecture") or cfg.get("activation_fn")
                     or ("jumprelu" if threshold is not None else "relu")))
    kind = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "jump_relu": "jumprelu",
            "topk": "topk"}.get(arch.lower())
    if kind is None:
        raise ConfigError(f"{d}: unknown SAE architecture {arch!r}; actcache reads {KINDS}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if kind == "topk" and not k:
        raise ConfigError(f"{d}: a topk SAE needs k in cfg.json")
    if kind == "jumprelu" and threshold is None:
        raise ConfigError(f"{d}: a jumprelu SAE needs a threshold weight")
    name = str(cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hf_hook_point_in") or "")
    if name.endswith("hook_attn_out") and hook is None and cfg.get("hook_point") is None:
        raise ConfigError(f"{d} reads TransformerLens's {name!r}, the attention's output after o_proj, which "
                          f"actcache does not capture (its attn_out is o_proj's input, attn.hook_z)")
    named_hook, named_layer = hook_from_name(name) if name else _hook_from_folders(d)
    if sparsify and named_hook is None:
        named_hook, named_layer = _hook_from_folders(d)
    hook = hook or cfg.get("hook_point") or named_hook
    if hook not in HOOK_POINTS:
        raise ConfigError(f"{d}: cannot tell the SAE's hook point from its files ({name or d.name!r}); "
                          f"pass one of {HOOK_POINTS}")
    if layer is None:
        layer = cfg.get("hook_layer", cfg.get("layer", named_layer))
    if layer is None:
        raise ConfigError(f"{d}: cannot tell the SAE's layer from its files; pass it")
    if W_enc.shape[0] != W_dec.shape[1] or W_enc.shape[1] != W_dec.shape[0]:
        raise ConfigError(f"{d}: W_enc {W_enc.shape} and W_dec {W_dec.shape} do not fit together")
    b_dec_in = bool(cfg.get("apply_b_dec_to_input", False)) or sparsify
    data_mean = cfg.get("data_mean")
    if data_mean is not None:
        data_mean = np.asarray(data_mean, dtype=np.float32)
        if data_mean.shape != (W_enc.shape[0],):
            raise ConfigError(f"{d}: cfg.json's data_mean has {data_mean.size} values, the SAE reads "
                              f"{W_enc.shape[0]}-dim activations; delete the entry or train the SAE again")
        _check_finite(d, {"cfg.json's data_mean": data_mean})
    sae = SAE(W_enc, b_enc, W_dec, b_dec, kind, hook, int(layer), threshold, int(k) if k else None,
              b_dec_in, "", bool(cfg.get("rescale_acts_by_decoder_norm", False)), data_mean,
              _read_training(d, cfg))
    return replace(sae, key=sae_key(sae))


def _read_training(d: Path, cfg: dict) -> dict | None:
    """cfg.json's "training_texts" (written by `train_sae`) as SAE.training: source,
    n_texts, and the digests as a sorted (m,) uint64 array; None where absent."""
    tt = cfg.get("training_texts")
    if not tt:
        return None
    if tt.get("rule") != TEXT_DIGEST_RULE:
        raise ConfigError(f"{d}: cfg.json's training_texts were digested by another rule ({tt.get('rule')!r}); "
                          f"train the SAE again with this actcache")
    try:
        digests = np.unique(np.array([int(x, 16) for x in tt.get("digests", [])], dtype=np.uint64))
    except (TypeError, ValueError):
        raise ConfigError(f"{d}: cfg.json's training_texts digests are not 16-digit hex strings; "
                          f"train the SAE again") from None
    return {"source": cfg.get("source"), "n_texts": int(tt.get("n_texts", len(digests))), "digests": digests}


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write an SAE in the SAELens layout (cfg.json + sae_weights.safetensors); the
    hook goes in as its TransformerLens name (hook_name) and as actcache's (hook_point)."""
    from safetensors.numpy import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    w = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        w["threshold"] = sae.threshold
    cfg = {"architecture": {"relu": "standard"}.get(sae.kind, sae.kind), "d_in": sae.d_in, "d_sae": sae.d_sae,
           "hook_name": f"blocks.{sae.layer}.{TL_HOOKS[sae.hook]}", "hook_point": sae.hook, "hook_layer": sae.layer,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           **({"k": sae.k} if sae.k else {}),
           **({"rescale_acts_by_decoder_norm": True} if sae.rescale_acts_by_decoder_norm else {})}
    if sae.data_mean is not None:
        cfg["data_mean"] = [float(v) for v in np.asarray(sae.data_mean, dtype=np.float32)]
    if sae.training is not None:
        cfg["source"] = sae.training.get("source")
        cfg["training_texts"] = _training_json(sae.training)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return d


# ------------------------------------------------------------------ training text vs a build's rows

TEXT_DIGEST_RULE = "sha256 of the text, whitespace runs collapsed to one space and ends stripped; first 16 hex"


def text_digest(text: str) -> str:
    """The 16-hex digest an SAE records of each text it trained on (TEXT_DIGEST_RULE)."""
    return hashlib.sha256(" ".join(str(text).split()).encode("utf-8")).hexdigest()[:16]


def _training_json(training: dict) -> dict:
    return {"rule": TEXT_DIGEST_RULE, "n_texts": int(training["n_texts"]),
            "digests": [f"{int(x):016x}" for x in np.asarray(training["digests"], dtype=np.uint64)]}


def row_digests(store, rows) -> list[set[int]]:
    """Per store row, the digests of the three texts an SAE could have seen it as:
    its demonstration text (query + answer, what `train_sae` trains on), its query
    text, and its own text without the template (`data.record_text`: a text file
    of raw sentences, or an SAE trained under another template)."""
    return [{int(text_digest(t), 16) for t in (store.demos[r], store.texts[r], record_text(store.records[r]))}
            for r in np.asarray(rows, dtype=np.int64)]


def training_overlap(store, sae: str, rows, sample: int = 10) -> dict:
    """How many of a build's `rows` an SAE of the build trained on.

    A row overlaps when the digest (`text_digest`) of its demonstration text, its
    query text or its own text (`row_digests`) is among the SAE's training-text
    digests, which the build keeps from the SAE's cfg.json (`train_sae` records
    them; `Store.sae_training_digests`).

    Args:
        store: the build; sae: the SAE's key or key prefix; rows: int store rows.

    Returns dict(sae (key16), status "checked" or "unknown" (the SAE records no
    training texts: loaded from SAELens / Gemma Scope, or trained before
    actcache recorded them), n_rows, n_overlap (None when unknown), ids: the
    first `sample` overlapping rows' example ids).
    """
    k16, _ = store.sae_group(sae)
    rows = np.asarray(rows, dtype=np.int64)
    digests = store.sae_training_digests(k16)
    if digests is None:
        return {"sae": k16, "status": "unknown", "n_rows": int(len(rows)), "n_overlap": None, "ids": []}
    seen = {int(x) for x in digests}
    hit = [int(r) for r, ds in zip(rows, row_digests(store, rows)) if ds & seen]
    return {"sae": k16, "status": "checked", "n_rows": int(len(rows)), "n_overlap": len(hit),
            "ids": [str(store.ids[r]) for r in hit[:sample]]}


FVU_REFERENCES = ("sae training mean", "pass mean")


def _pool_parts(sae: SAE, h: np.ndarray, spans, mu: np.ndarray | None) -> dict:
    """Pooled codes and the per-example sums FVU is made of: err (squared
    reconstruction error), n (tokens), and, with a reference mean `mu`, den
    (squared distance to mu); without one, ss (squared distance to the span's own
    mean) and span_mean (B, d_in), from which `_den_from_own_means` gets den once
    mu is known."""
    B = len(spans)
    mean = np.zeros((B, sae.d_sae), np.float32)
    mx = np.zeros((B, sae.d_sae), np.float32)
    l0, expl, err, n = np.zeros(B), np.zeros(B), np.zeros(B), np.zeros(B)
    den = np.zeros(B) if mu is not None else None
    ss = np.zeros(B) if mu is None else None
    span_mean = np.zeros((B, sae.d_in)) if mu is None else None
    for i, (s, e) in enumerate(spans):
        x = np.asarray(h[i, s:e], dtype=np.float32)
        f = sae.encode(x)
        r = (x - sae.decode(f)).astype(np.float64)
        x64 = x.astype(np.float64)
        mean[i], mx[i] = f.mean(0), f.max(0)
        l0[i] = (f > 0).sum(1).mean()
        err[i], n[i] = float((r ** 2).sum()), e - s
        if mu is not None:
            den[i] = float(((x64 - mu) ** 2).sum())
        else:
            span_mean[i] = x64.mean(0)
            ss[i] = float(((x64 - span_mean[i]) ** 2).sum())
        expl[i] = 1.0 - err[i] / float((x64 ** 2).sum())
    return {"mean": mean, "max": mx, "l0": l0, "explained": expl, "err": err, "n": n, "den": den, "ss": ss,
            "span_mean": span_mean}


class SAECodes(Activations):
    """A `capture.run` reader of an SAE's hook point: after each batch, `parts`
    holds `_pool_parts` of the batch's spans (pooled codes and FVU parts, with
    reference mean `mu` or None)."""

    def __init__(self, sae: SAE, mu: np.ndarray | None):
        super().__init__(sae.layer, sae.hook)
        self.sae, self.mu, self.parts = sae, mu, None

    def start(self, batch) -> None:
        super().start(batch)
        self.parts = None
        self._bounds = list(zip(batch.start.tolist(), batch.end.tolist()))

    def finish(self) -> None:
        super().finish()
        self.parts = _pool_parts(self.sae, self.h, self._bounds, self.mu)
        self.h = None


def fvu_reference(sae: SAE) -> str:
    """The mean a build's per-example FVU of `sae` is measured from (see `sae_pass`)."""
    return FVU_REFERENCES[0] if sae.data_mean is not None else FVU_REFERENCES[1]


def _finish_fvu(err: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, err / np.where(den > 0, den, 1.0), np.nan)


def _den_from_own_means(ss: np.ndarray, n: np.ndarray, span_mean: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """sum over a span's tokens of |x - mu|^2 = (sum of |x - m|^2, m the span's mean) + n |m - mu|^2."""
    return ss + n * ((np.asarray(span_mean, dtype=np.float64) - mu) ** 2).sum(1)


def pooled_codes(sae: SAE, h: np.ndarray, spans, reference: np.ndarray | None = None) -> dict:
    """Per-example pooled SAE features over token spans, and per-example statistics.

    FVU follows the convention of the SAE libraries: the squared reconstruction
    error over the squared distance to a mean of the data, per dimension, taken
    over a whole set of token activations, not over each example (eai-sparsify:
    `SparseCoder.forward` in sparsify/sparse_coder.py, fvu = sum (y - y_hat)^2 /
    sum (y - y.mean(0))^2 over the batch's tokens; SAELens:
    `SAETrainer._build_train_step_log_dict` in sae_lens/training/sae_trainer.py,
    explained_variance = 1 - mean |x - x_hat|^2 / mean |x - x.mean(0)|^2, where
    sae_lens/evals.py calls the per-token ratio "old, incorrect"; read at sparsify
    9d3b136 and SAELens 91ca16c). Per example i:

        fvu[i] = sum_{t in span i} |x_t - x_hat_t|^2 / sum_{t in span i} |x_t - mu|^2

    with one fixed mu for every example: `reference` when given, else the SAE's
    training-data mean (`SAE.data_mean`) when it records one, else the mean over
    every token of all `spans` here. A span's own mean would make its FVU grow as
    its tokens get alike (a one-token span has no variance at all) whatever the
    reconstruction does.

    Args:
        h: (B, T, d_in) float32 activations at the SAE's hook point.
        spans: B (start, end) token ranges, as the dense arrays pool.
        reference: (d_in,) the mean to measure variance from (see above).

    Returns dict: mean, max ((B, d_sae) float32, mostly zeros: store with
    `to_csr`), l0 (B,) mean active features per token, fvu (B,) as above,
    explained (B,) the fraction of the span's squared norm the reconstruction
    explains, fvu_reference: which mean ("given", or one of FVU_REFERENCES).
    """
    mu = reference if reference is not None else sae.data_mean
    mu = None if mu is None else np.asarray(mu, dtype=np.float64)
    out = _pool_parts(sae, h, spans, mu)
    if mu is None:
        n = out["n"]
        mu = (out["span_mean"] * n[:, None]).sum(0) / max(n.sum(), 1)
        den = _den_from_own_means(out["ss"], n, out["span_mean"], mu)
        where = FVU_REFERENCES[1]
    else:
        den = out["den"]
        where = "given" if reference is not None else FVU_REFERENCES[0]
    return {"mean": out["mean"], "max": out["max"], "l0": out["l0"], "fvu": _finish_fvu(out["err"], den),
            "explained": out["explained"], "fvu_reference": where}


def to_csr(dense) -> dict:
    """CSR arrays of a (n, m) matrix (numpy or scipy.sparse): data float32, indices
    int32, indptr int64, shape."""
    from scipy.sparse import csr_matrix, issparse

    m = dense.tocsr() if issparse(dense) else csr_matrix(np.asarray(dense, dtype=np.float32))
    m.sort_indices()
    return {"data": m.data.astype(np.float32), "indices": m.indices.astype(np.int32),
            "indptr": m.indptr.astype(np.int64), "shape": np.asarray(m.shape, dtype=np.int64)}


def from_csr(arrays: dict) -> np.ndarray:
    """Inverse of `to_csr`: the dense (n, m) float32 matrix."""
    from scipy.sparse import csr_matrix

    return csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                      shape=tuple(int(x) for x in arrays["shape"])).toarray().astype(np.float32)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SAETrainConfig:
    """`actcache sae train`: a TopK SAE on per-token activations at one hook point.

    Texts are the task's pool rows (query + answer, as demonstrations read) or the
    lines of `text_file`; a seeded 10 % of them is held out for FVU and L0.
    `exclude_build` (a build key, prefix or "last") leaves out every text that is
    one of that build's rows, pool and eval (`row_digests`), before the `limit`
    texts are drawn, so the SAE never trains on what a study of the build uses.
    The trainer is eai-sparsify's `SparseCoder` (its TopK encoder, decoder and
    normalisation), driven by a seeded Adam loop over cached activations.
    """

    model: str = "gemma-3-270m"
    dtype: str = "auto"
    device: str = "auto"
    task: str = "sst2"
    data_dir: str | None = None
    text_file: str | None = None
    limit: int | None = 3000
    hook: str = "mlp_out"
    layer: int = 9
    width: int = 4096
    k: int = 32
    epochs: int = 10
    batch_tokens: int = 1024
    lr: float | None = None
    max_length: int = 128
    heldout: float = 0.1
    seed: int = 0
    home: str | None = None
    exclude_build: str | None = None


def token_activations(lm, texts: list[str], layer: int, point: str, max_length: int, batch_size: int = 16,
                      progress=None) -> np.ndarray:
    """(n_tokens, d) float32 activations at `point` of `layer` for every span token
    of `texts`, each laid out by `prompts.text_rows` (a text over `max_length`
    loses its start, as every row does; BOS, or the attention sink of a tokenizer
    without one, is left out). The forward stops at the hook point: the later
    layers and the LM head (a third of Gemma-3-270m's compute per token) never run."""
    seqs, spans = text_rows(lm.tokenizer, texts, max_length)
    reader = TokenActivations(layer, point)
    out = []
    batches = length_batches([len(s) for s in seqs], batch_size)
    for bi, rows in enumerate(batches):
        if progress:
            progress("sae activations", bi, len(batches))
        forward_rows(lm.model, lm.tokenizer, reader, seqs, spans, rows, "isolated")
        out.extend(reader.tokens)
    if progress:
        progress("sae activations", len(batches), len(batches))
    return np.concatenate(out).astype(np.float32)


def _held_out(n: int, heldout: float, seed: int) -> np.ndarray:
    """(n,) bool: the seeded held-out share of n texts."""
    return np.random.default_rng(seed).random(n) < heldout


def evaluate_sae(sae: SAE, x: np.ndarray) -> dict:
    """FVU and mean L0 of `sae` on activations x (n, d).

    FVU = sum |x - x_hat|^2 / sum |x - mean(x)|^2, the mean per dimension over all
    n tokens: the convention of eai-sparsify (`SparseCoder.forward`) and SAELens
    (`explained_variance` in its trainer), with the evaluated set as the batch.
    """
    f = sae.encode(x)
    r = x - sae.decode(f)
    var = float(((x - x.mean(0)).astype(np.float64) ** 2).sum())
    return {"fvu": float((r.astype(np.float64) ** 2).sum() / var), "l0": float((f > 0).sum(1).mean()),
            "n_tokens": int(len(x))}


def _training_texts(cfg: SAETrainConfig, home: Path) -> tuple[list[str], list[str], dict]:
    """(training texts, held-out texts, the training record: source, n_texts and
    digests) of `train_sae`, with the texts of `cfg.exclude_build` left out."""
    banned: set[int] = set()
    if cfg.exclude_build:
        ex = Store.open(cfg.exclude_build, cfg.home)
        banned = set().union(*row_digests(ex, np.arange(len(ex.ids))))
    if cfg.text_file:
        lines = [ln for ln in read_text(Path(cfg.text_file)).splitlines() if ln.strip()]
        source = {"text_file": str(cfg.text_file), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
        texts = [ln for ln in lines if int(text_digest(ln), 16) not in banned]
        n_excluded = len(lines) - len(texts)
        own = [[] for _ in texts]  # what else each text is recorded as (task data: the example's own text)
    else:
        ds = load(DataSpec(task=cfg.task, data_dir=cfg.data_dir, pool_limit=None if cfg.exclude_build else cfg.limit,
                           seed=cfg.seed), cache_dir=home / "data")
        pool = ds.pool
        if cfg.exclude_build:
            forms = [(ds.task.demo_text(e), ds.task.query_text(e), record_text(e.to_record()))
                     for e in pool]
            kept = [e for e, f in zip(pool, forms) if not {int(text_digest(t), 16) for t in f} & banned]
            n_excluded = len(pool) - len(kept)
            pool = subsample(kept, cfg.limit, cfg.seed)
        else:
            n_excluded = 0
        texts = [ds.task.demo_text(e) for e in pool]
        own = [[record_text(e.to_record())] for e in pool]
        source = {"task": cfg.task, "fingerprint": ds.fingerprint(), "limit": cfg.limit}
    if cfg.exclude_build:
        source.update(exclude_build=ex.key, n_excluded=n_excluded)
    if len(texts) < 10:
        raise ConfigError(f"only {len(texts)} texts to train on"
                          f"{f' ({n_excluded} left out as rows of build {ex.key[:12]})' if n_excluded else ''}; "
                          f"give at least 10")
    held_mask = _held_out(len(texts), cfg.heldout, cfg.seed)
    train = [t for t, h in zip(texts, held_mask) if not h]
    held = [t for t, h in zip(texts, held_mask) if h]
    # What the SAE learnt from: the training texts (not the held-out ones) and, for task data, each
    # training example's own text, so a build under another template is still matched.
    learnt = [x for t, o, h in zip(texts, own, held_mask) if not h for x in (t, *o)]
    digests = np.unique(np.array([int(text_digest(x), 16) for x in learnt], dtype=np.uint64))
    return train, held, {"source": source, "n_texts": len(train), "digests": digests}


def _fit_topk(X: np.ndarray, cfg: SAETrainConfig, progress=None) -> tuple[dict, float, int]:
    """Fit eai-sparsify's TopK SparseCoder on token activations X (seeded Adam,
    decoder kept at unit norm). Returns (weights as numpy, learning rate, steps)."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(X.shape[1], SparseCoderConfig(k=cfg.k, num_latents=cfg.width))
    lr = cfg.lr or 2e-4 / (cfg.width / 2 ** 14) ** 0.5  # eai-sparsify's default scaling
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    Xt = torch.from_numpy(X)
    with torch.no_grad():  # start the decoder bias at the data's median (sparsify's trainer: the first batch's mean)
        coder.b_dec.copy_(Xt.median(0).values)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = 0
    n_batches = max(1, len(X) // cfg.batch_tokens)
    for ep in range(cfg.epochs):
        order = torch.randperm(len(X), generator=g)
        for bi in range(n_batches):
            if progress:
                progress("sae train", ep * n_batches + bi, cfg.epochs * n_batches)
            xb = Xt[order[bi * cfg.batch_tokens:(bi + 1) * cfg.batch_tokens]]
            out = coder(xb)
            opt.zero_grad()
            out.fvu.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            coder.set_decoder_norm_to_unit_norm()
            steps += 1
    if progress:
        progress("sae train", cfg.epochs * n_batches, cfg.epochs * n_batches)
    return {k: v.detach().float().numpy() for k, v in coder.state_dict().items()}, lr, steps


def train_sae(cfg: SAETrainConfig, progress=None) -> tuple[SAE, dict]:
    """Train, evaluate on held-out text and save (SAELens layout, under
    <home>/sae/<key>); returns (sae, report with train and held-out FVU and L0
    (`evaluate_sae`), source, texts, steps, seconds, path).

    cfg.json records, beside the SAELens fields: the model, the trainer and its
    settings; `source` (the task and its data fingerprint, or the text file and
    its sha256; with `exclude_build`, that build's key and how many texts it
    left out); `training_texts` (TEXT_DIGEST_RULE, the number of training texts
    and the sorted digests of every training text and, for task data, of each
    training example's own text; held-out texts are not among them), which
    `actcache build` copies into a build for `training_overlap`; and `data_mean`,
    the mean training activation, the reference of a build's per-example FVU.
    """
    import time

    import torch

    try:
        import sparsify  # noqa: F401
    except ImportError:
        raise MissingExtraError("`actcache sae train` needs eai-sparsify: pip install 'actcache[sae]' "
                                "(or pip install eai-sparsify==1.3.3)", extra="sae") from None

    if cfg.hook not in HOOK_POINTS:
        raise ConfigError(f"--hook must be one of {HOOK_POINTS}, not {cfg.hook!r}")
    if cfg.k < 1 or cfg.width < cfg.k:
        raise ConfigError(f"need 1 <= --k <= --width, got k={cfg.k}, width={cfg.width}")
    t0 = time.time()
    set_threads()
    torch.manual_seed(cfg.seed)
    home = default_home(cfg.home)
    train, held, training = _training_texts(cfg, home)
    source = training["source"]
    lm = load_model(ModelSpec(cfg.model, dtype=cfg.dtype, device=cfg.device), home)
    n_layers = len(decoder_layers(lm.model)[1])
    if not 0 <= cfg.layer < n_layers:
        raise ConfigError(f"--layer {cfg.layer} is out of range: the model has {n_layers} layers")
    X = token_activations(lm, train, cfg.layer, cfg.hook, cfg.max_length, progress=progress)
    Xh = token_activations(lm, held, cfg.layer, cfg.hook, cfg.max_length, progress=progress)
    t_act = time.time()
    W, lr, steps = _fit_topk(X, cfg, progress)
    tmp = SAE(W["encoder.weight"].T.copy(), W["encoder.bias"], W["W_dec"], W["b_dec"], "topk", cfg.hook,
              cfg.layer, None, cfg.k, True, data_mean=X.mean(0, dtype=np.float64).astype(np.float32),
              training=training)
    cfg_json = {"model": lm.provenance.get("model"), "weights_sha256": lm.provenance.get("weights_sha256"),
                "dtype": lm.provenance.get("dtype"), "trainer": "eai-sparsify 1.3.3 SparseCoder, Adam",
                "seed": cfg.seed, "epochs": cfg.epochs, "lr": lr, "tokens": int(len(X)),
                "rows": f"prompts.text_rows: BOS + text, its start dropped past max_length {cfg.max_length}"}
    key = sae_key(tmp)
    sae = replace(tmp, key=key)
    path = save_sae(sae, home / "sae" / short_sae_key(key))
    meta = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**meta, **cfg_json, "key": key}, indent=2))
    report = {"path": str(path), "key": key, "train": evaluate_sae(sae, X), "heldout": evaluate_sae(sae, Xh),
              "source": source,
              "texts": {"train": len(train), "heldout": len(held), "digests": int(len(training["digests"]))},
              "steps": steps, "tokens_seen": steps * cfg.batch_tokens, "seconds": round(time.time() - t0, 1),
              "activation_seconds": round(t_act - t0, 1), "train_seconds": round(time.time() - t_act, 1),
              "hardware": lm.provenance.get("hardware")}
    return sae, report


def sae_pass(model, tokenizer, sae: SAE, seqs, spans, mask: str, batch_size: int, progress=None) -> tuple[dict, int]:
    """One forward pass over a build's rows (token ids `seqs`, pooled `spans`) under
    `mask`, reading the SAE's hook point, stopping after its layer.

    FVU per example is `pooled_codes`'s, with one reference mean for the whole
    pass: the SAE's training-data mean when it records one, else the mean over
    every span token of this pass, known only at its end. For the latter each
    example's squared error, squared distance to its own span mean and that mean
    (float32, N x d_in) are kept and FVU finished once the pass mean is known
    (sum |x - mu|^2 = sum |x - m|^2 + n |m - mu|^2): one forward, no second pass.

    Returns ({"mean": CSR, "max": CSR (see `to_csr`), "stats": (N, 3) float64
    l0, fvu, explained, "fvu_reference": one of FVU_REFERENCES}, forward batches run).
    """
    from scipy.sparse import csr_matrix, vstack


    n = len(seqs)
    # Kept sparse batch by batch: dense (n, d_sae) pools would need 6.5 GB each for 100k rows x 16k features.
    means, maxes, order = [], [], []
    stats = np.zeros((n, 3))
    mu = None if sae.data_mean is None else np.asarray(sae.data_mean, dtype=np.float64)
    err, den, ss, n_tok = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    span_mean = np.zeros((n, sae.d_in), np.float32) if mu is None else None
    total = np.zeros(sae.d_in)  # sum of every span token (float64), for the pass mean
    batches = length_batches([len(s) for s in seqs], batch_size)
    reader = SAECodes(sae, mu)
    for bi, rows in enumerate(batches):
        if progress:
            progress(f"sae {mask}", bi, len(batches))
        forward_rows(model, tokenizer, reader, seqs, spans, rows, mask)
        out = reader.parts
        means.append(csr_matrix(out["mean"]))
        maxes.append(csr_matrix(out["max"]))
        order.extend(int(r) for r in rows)
        stats[rows, 0], stats[rows, 2] = out["l0"], out["explained"]
        err[rows], n_tok[rows] = out["err"], out["n"]
        if mu is None:
            ss[rows], span_mean[rows] = out["ss"], out["span_mean"]
            total += (out["span_mean"] * out["n"][:, None]).sum(0)
        else:
            den[rows] = out["den"]
    if progress:
        progress(f"sae {mask}", len(batches), len(batches))
    if mu is None:
        den = _den_from_own_means(ss, n_tok, span_mean, total / max(n_tok.sum(), 1))
    stats[:, 1] = _finish_fvu(err, den)
    back = np.argsort(order)  # batches run longest first: rows back in store order

    def rows_in_order(parts):
        return vstack(parts, format="csr")[back] if parts else csr_matrix((0, sae.d_sae), dtype=np.float32)

    return {"mean": to_csr(rows_in_order(means)), "max": to_csr(rows_in_order(maxes)), "stats": stats,
            "fvu_reference": fvu_reference(sae)}, len(batches)
