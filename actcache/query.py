"""`actcache query`: k nearest pool examples of test inputs, from a finished build.

Test inputs are either the build's own eval rows (`source="eval"`: their stored
vectors are used, no model is loaded) or new texts from a file or stdin, which
are encoded with the build's exact model, tokenizer, template, mask, pooling,
dtype and device, and cached under `<build>/queries/` so that asking again runs
no forward pass.

Why `mask="label-masked"` by default: a pool row's vector under the isolated mask
pools over its label tokens too (`span="full"`), while a test input has no label.
Under `label-masked` both are pooled over the input tokens only, so a test
vector and a pool vector are computed the same way and comparable.

Output format (one JSON object per line, one line per test input, UTF-8)::

    {
      "test_id":    "x0",                 # eval id; the "id" field of a JSONL input;
                                          # else "input-<line number from 0>"
      "test_text":  "Review: ...\\nSentiment:",   # the templated prompt the model saw
      "test_label": 1,                    # int class of an eval row; null for new texts
      "neighbors": [                      # best first; at most k (k per class if balanced)
        {"id": "x7", "score": 0.93, "text": "Review: ...\\nSentiment:", "label": 0, "rank": 0},
        ...
      ],
      "metric":     "cosine",             # scores: higher is more similar
      "array":      "mlp/L17/mean/label-masked",   # component/L<layer>/pooling/mask
      "build_key":  "3f2a...",            # full key of the build queried
      "config":     {...},                # the QueryConfig (minus `home`), as JSON
      "k":          4
    }

Neighbours are pool examples only. With `exclude_self` (default) a pool example
whose id, or whose exact templated text, equals the test input's is never
returned (eval and pool can share texts under different ids; a new-text file
may repeat pool texts). Fewer than k neighbours are listed only when
exclusion leaves fewer than k candidates.

Options of a vector-search API (all off by default; a record's `config` names
only those that are set): `labels`, `ids` and `exclude_ids` restrict which pool
examples may be returned, exactly (the k best among the rows that pass, not a
filtered fixed top-k); `min_score` drops neighbours scoring below it; `offset`
pages (ranks offset..offset+k-1); `fields` keeps only the named record keys.
`search_vectors` queries with raw vectors instead of texts. The build keeps no
source split of its examples (every pool row is split "pool"), so there is no
split filter.
"""

from __future__ import annotations

import io
import json
import string
import sys
import time
import types
from dataclasses import asdict, dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Callable

import numpy as np

from .config import DEFAULT_MASK
from .display import auto_progress, dataframe
from .errors import ConfigError, DatasetError, StoreError
from .store import ArrayId, Store, atomic_write, load_npz, try_save_npz
from .data import Example, field_value, normalize_text, read_text
from .capture import Capture, forward_rows
from .prompts import length_batches, query_layouts
from actcache_indexes import IndexSpec, VectorIndex
from .models import set_threads

Progress = Callable[[str, int, int], None]

__all__ = ["QueryConfig", "QueryRecords", "Inputs", "query", "write_jsonl", "resolve_layer",
           "load_inputs", "encode_texts", "exclusion_matrix", "knn_search", "search_vectors", "select_fields",
           "pool_filter", "RECORD_FIELDS"]

# The top-level keys of a query record, in order (see the module docstring).
RECORD_FIELDS = ("test_id", "test_text", "test_label", "neighbors", "metric", "array", "build_key", "config", "k")


@dataclass(frozen=True)
class QueryConfig:
    """What `query` does. Frozen; `to_json()` is what every output record carries.

    key: build key or unique prefix (>= 6 characters).
    home: store root (None: $ACTCACHE_HOME or ~/.cache/actcache).
    component/layer/pooling/mask: the pooled array to compare in. `layer` is a
        model layer number; negatives count from the end of the build's layers
        (-1 = the deepest layer the build holds).
    k: neighbours per test input (per class when `balanced`).
    balanced: k neighbours from every pool class, merged best first.
    exclude_self: drop pool items whose id or exact templated text equals the input's.
    source: "eval" (the build's eval rows), a path to a text file (one input per
        line) or JSONL file (objects), or "-" for stdin (JSONL if its first
        non-blank line starts with "{", else one text per line).
    text_field: JSONL field holding the text, for a single-field template.
        Multi-field templates need every template field in each JSONL object.
    out: where `query` writes the JSONL records (None: only return them).
    labels: pool classes that may be returned (None: every class).
    ids: pool ids that may be returned (None: every pool example).
    exclude_ids: pool ids that are never returned.
    min_score: drop neighbours whose score is below it; scores are higher-is-better
        in every metric (cosine, inner product, negative squared L2 distance), so
        this keeps neighbours at least this similar.
    offset: skip the first `offset` ranked neighbours (per class when `balanced`):
        k is the page size, ranks offset..offset+k-1 are returned, and `rank`
        counts from offset.
    fields: the record keys to keep (None: all, see RECORD_FIELDS).
    device: where the model runs for new texts (cpu, cuda, mps or auto).
    """

    key: str
    home: str | None = None
    component: str = "mlp"
    layer: int = -1
    pooling: str = "mean"
    mask: str = DEFAULT_MASK
    k: int = 4
    balanced: bool = False
    exclude_self: bool = True
    source: str = "eval"
    text_field: str = "text"
    out: str | None = None
    labels: tuple[int, ...] | None = None
    ids: tuple[str, ...] | None = None
    exclude_ids: tuple[str, ...] = ()
    min_score: float | None = None
    offset: int = 0
    fields: tuple[str, ...] | None = None
    device: str = "auto"

    def __post_init__(self):
        # Lists (JSON, CLI) become tuples so the config stays hashable; a lone string is one item.
        for name in ("labels", "ids", "exclude_ids", "fields"):
            v = getattr(self, name)
            if isinstance(v, (str, int, np.integer)):
                object.__setattr__(self, name, (v,))
            elif isinstance(v, np.ndarray):
                object.__setattr__(self, name, tuple(v.tolist()))
            elif v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("home", None)  # machine-specific; the build key identifies the data
        d.pop("device", None)  # where new texts ran; the build fixes their activations' dtype
        for name in _SEARCH_OPTIONS:  # named only when set, so records without them stay as they were
            if d[name] == _DEFAULTS[name]:
                d.pop(name)
            elif isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d


_SEARCH_OPTIONS = ("labels", "ids", "exclude_ids", "min_score", "offset", "fields")
_DEFAULTS = {f.name: f.default for f in dataclass_fields(QueryConfig)}


class QueryRecords(list):
    """The list of output records, plus `.report`: dict(build_key, array, n_queries,
    forward_batches, cache_hit, out, seconds)."""

    report: dict

    def to_pandas(self):
        """One row per test input and neighbour: test_id, test_label, rank, id, score, label, text."""
        return dataframe([{"test_id": r["test_id"], "test_label": r.get("test_label"), "rank": n.get("rank", i),
                           "id": n["id"], "score": n["score"], "label": n.get("label"), "text": n.get("text")}
                          for r in self for i, n in enumerate(r["neighbors"])], "QueryRecords",
                         columns=["test_id", "test_label", "rank", "id", "score", "label", "text"])


@dataclass(frozen=True)
class Inputs:
    """Test inputs. `texts` are templated prompts (what the model sees), (q,) object array."""

    ids: np.ndarray  # (q,) object, str
    texts: np.ndarray  # (q,) object, str
    labels: list  # int or None per input
    ids_given: bool  # whether ids came from the user/build (then they take part in exclusion)
    new: bool  # True: texts not in the build, they must be encoded
    vectors: bool = False  # True: raw query vectors, no texts (texts are None; nothing to exclude)


# --------------------------------------------------------------------------- layers, inputs


def _model_n_layers(store: Store) -> int | None:
    """Decoder layer count from the resolved model directory's config.json, if on disk."""
    resolved = store.provenance.get("model", {}).get("resolved")
    if not resolved:
        return None
    cfg_path = Path(resolved) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c.get(name), int):
                return int(c[name])
    return None


def resolve_layer(store: Store, layer: int) -> int:
    """A non-negative model layer number for `layer`.

    Non-negative: used as is. Negative: counts from the end of the build's
    layers (`store.layers[layer]`), so -1 is the deepest layer the build holds;
    for a build of all layers this is the same as counting from the model's end.
    Raises StoreError (what to build) when the layer is not in the build.
    """
    layer = int(layer)
    have = store.layers
    if layer < 0:
        if -layer > len(have):
            raise StoreError(f"layer {layer} does not exist: build {store.key[:12]} holds "
                             f"{len(have)} layers {have}; pass one of them or rebuild with more --layers")
        return have[layer]
    if layer not in have:
        n = _model_n_layers(store)
        extra = f" (the model has {n} layers)" if n else ""
        raise StoreError(f"build {store.key[:12]} has no layer {layer}{extra}; it holds {have}. Rebuild "
                         f"with it added, e.g. `actcache build ... --layers {layer}` computes only what is missing")
    return layer


def template_fields(template: str) -> list[str]:
    """Field names of a str.format template, in order, without repeats."""
    out: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in out:
            out.append(name)
    return out


def read_source(source: str) -> tuple[list[str], bool, str]:
    """Lines of the input, whether they are JSONL, and a name for messages."""
    if source == "-":
        text = sys.stdin.read()
        lines = text.splitlines()
        first = next((ln for ln in lines if ln.strip()), "")
        return lines, first.lstrip().startswith("{"), "stdin"
    path = Path(source).expanduser()
    if not path.is_file():
        raise DatasetError(f"input file {path} does not exist; pass --input FILE (.txt or .jsonl), "
                           f"'-' for stdin, or leave it out to query the build's eval rows")

    lines = read_text(path).splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    is_jsonl = path.suffix in (".jsonl", ".json", ".ndjson") or first.lstrip().startswith("{")
    return lines, is_jsonl, str(path)


def load_inputs(store: Store, source: str = "eval", text_field: str = "text") -> Inputs:
    """The test inputs of a query: the build's eval rows or new texts, templated.

    New texts fill the build's template: a one-field template takes each plain
    text line, or a JSONL object's `text_field` (or that template field); a
    multi-field template needs a JSONL object with all its fields. A JSONL
    "id" becomes the test id (and excludes the pool item of that id).

    Raises DatasetError for a missing or empty input, or missing fields.
    """
    if source == "eval":
        return eval_inputs(store)
    lines, is_jsonl, name = read_source(source)
    return parse_inputs(store, lines, is_jsonl, name, text_field)


def eval_inputs(store: Store, ids=None) -> Inputs:
    """The build's eval rows as test inputs: all of them, or those with the given ids (in that order)."""
    rows = store.eval_rows
    if ids is not None:
        pos = {str(i): r for i, r in zip(store.ids[rows], rows)}
        unknown = [i for i in ids if str(i) not in pos]
        if unknown:
            raise DatasetError(f"ids {unknown[:5]} are not eval rows of build {store.key[:12]}; give eval ids "
                               f"(`actcache info` sizes them) or texts")
        if not ids:
            raise DatasetError("the id list is empty; give at least one id")
        rows = np.asarray([pos[str(i)] for i in ids], dtype=np.int64)
    return Inputs(np.asarray(store.ids[rows], dtype=object), np.asarray(store.texts[rows], dtype=object),
                  [int(x) for x in store.labels[rows]], True, False)


def parse_inputs(store: Store, lines: list[str], is_jsonl: bool, name: str, text_field: str = "text") -> Inputs:
    """New test inputs from text lines (plain, or JSONL objects), templated with the
    build's template (see `load_inputs`)."""
    task = store.task()
    fields = template_fields(task.template)
    ids, texts, given = [], [], False
    n = 0
    for lineno, line in enumerate(lines):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{name} line {lineno + 1} is not valid JSON ({e.msg}); "
                                   f"give one JSON object per line") from None
            except RecursionError:
                raise DatasetError(f"{name} line {lineno + 1} is nested too deeply to read; give flat "
                                   f"JSON objects (template fields holding text)") from None
            if isinstance(obj, str):
                obj = {text_field: obj}
            if not isinstance(obj, dict):
                raise DatasetError(f"{name} line {lineno + 1} is not a JSON object; give one object per line")
            where = f"{name} line {lineno + 1}"
            nulls = [f for f in (text_field, *fields) if f in obj and obj[f] is None]
            if nulls:
                raise DatasetError(f"{name} line {lineno + 1}: field {nulls[0]!r} is null; give it a text")
            if len(fields) == 1:
                f0 = fields[0]
                if text_field in obj:
                    vals = {f0: field_value(obj, text_field, where)}
                elif f0 in obj:
                    vals = {f0: field_value(obj, f0, where)}
                else:
                    raise DatasetError(f"{name} line {lineno + 1} has no field {text_field!r} (nor the "
                                       f"template's {f0!r}); available: {sorted(obj)}. Pass --text-field")
            else:
                missing = [f for f in fields if f not in obj]
                if missing:
                    raise DatasetError(f"{name} line {lineno + 1} lacks template field(s) {missing}; the "
                                       f"build's template {task.template!r} needs {fields} in every object")
                vals = {f: field_value(obj, f, where) for f in fields}
            if "id" in obj:
                given = True
            ids.append(str(obj["id"]) if "id" in obj else f"input-{n}")
        else:
            if len(fields) != 1:
                raise DatasetError(f"the build's template {task.template!r} has fields {fields}; plain text "
                                   f"lines can fill only one. Pass a JSONL file with those fields per object")
            vals = {fields[0]: line}
            ids.append(f"input-{n}")
        texts.append(task.query_text(Example(ids[-1], tuple(vals.items()), -1)))
        n += 1
    if not texts:
        raise DatasetError(f"{name} holds no inputs; give at least one non-empty line")
    if len(set(ids)) != len(ids) and given:
        raise DatasetError(f"{name}: the 'id' values are not unique; give each input its own id")
    return Inputs(np.asarray(ids, dtype=object), np.asarray(texts, dtype=object), [None] * len(texts),
                  given, True)


# --------------------------------------------------------------------------- encoding new texts


def _cache_path(store: Store, texts, a: ArrayId) -> Path:
    return store.derived_path("queries", array=str(a), texts=list(texts))


def encode_texts(store: Store, texts, component: str, layer: int, pooling: str, mask: str,
                 progress: Progress | None = None, lm=None,
                 batch_size: int | None = None, device: str | None = None) -> tuple[np.ndarray, dict]:
    """Pooled activations of new texts, computed exactly as the build computed eval rows.

    Args:
        store: the build whose model, tokenizer, max_length, batch size, context
            prefix, dtype and device are used.
        texts: (q,) templated prompts (see `load_inputs`).
        component, layer, pooling, mask: the array (layer non-negative).
        lm: the build's model, already loaded by `Store.load_model` (None: loaded here,
            on `device`; None: where the build asked).
        batch_size: rows per forward batch (None: the build's). The service uses
            bigger ones: a forward of 64 short rows does 5x the work of one row
            per second on 2 cores, where the build's 16 do 4x.

    Returns:
        ((q, d) float32, report) where the values are rounded through the stored
        array's dtype (float16 by default) so that they compare like stored rows,
        and report = dict(forward_batches, cache_hit, cache).

    Raises MismatchError if the loaded model or tokenizer differs from the build's.
    """
    a = ArrayId(component, int(layer), pooling, mask)
    store.check(a)
    texts = [str(t) for t in texts]
    path = _cache_path(store, texts, a)
    cached = load_npz(path)  # None when missing or damaged: recompute and overwrite it
    if cached is not None and "acts" in cached and cached["acts"].shape[0] == len(texts):
        return cached["acts"].astype(np.float32, copy=False), {"forward_batches": 0, "cache_hit": True,
                                                               "cache": str(path)}

    lm = lm or store.load_model(device=device)
    tok, model = lm.tokenizer, lm.model
    task = store.task()
    max_length = int(store.config.get("max_length", store.provenance.get("max_length", 256)))
    batch_size = int(batch_size or store.config.get("batch_size", 16))
    # One layout per label rotation of the in-context mask (one for every other mask);
    # the vectors are the mean over rotations, summed in float64 as the build does.
    layouts = query_layouts(tok, store, task, texts, mask, max_length)
    cap = Capture(model, [int(layer)], [component], [pooling], stats=False)
    total, n_batches = None, 0
    for r, (seqs, spans) in enumerate(layouts):
        batches = length_batches([len(s) for s in seqs], batch_size)
        n_batches += len(batches)
        desc = "query encode" if len(layouts) == 1 else f"query encode (rotation {r + 1}/{len(layouts)})"
        out = None
        for bi, rows in enumerate(batches):
            if progress:
                progress(desc, bi, len(batches))
            forward_rows(model, tok, cap, seqs, spans, rows, mask)
            v = cap.pooled[(component, int(layer), pooling)]
            if out is None:
                out = np.empty((len(texts), v.shape[1]), dtype=np.float32)
            out[rows] = v
        if progress:
            progress(desc, len(batches), len(batches))
        if len(layouts) > 1:
            total = out.astype(np.float64) if total is None else total + out
    if total is not None:
        out = (total / len(layouts)).astype(np.float32)
    stored_dt = store.array_dtype(a)
    if stored_dt == np.float16 and np.abs(out).max() <= np.finfo(np.float16).max:
        out = out.astype(np.float16).astype(np.float32)  # compare like the stored rows
    try_save_npz(path, {"acts": out})  # a read-only store keeps it in memory only
    return out, {"forward_batches": n_batches, "cache_hit": False, "cache": str(path)}


# --------------------------------------------------------------------------- exclusion and search


def _match_matrix(pool_keys: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
    """(q, m) int64: for each query, every pool position whose key equals it, padded -1.

    Vectorised: both key sets share integer codes from one np.unique, pool
    positions are grouped by code with a stable argsort, and each query's
    group is found with searchsorted; no Python loop over queries.
    """
    n, q = len(pool_keys), len(query_keys)
    if n == 0 or q == 0:
        return np.full((q, 0), -1, dtype=np.int64)
    allk = np.concatenate([np.asarray(pool_keys, dtype=object), np.asarray(query_keys, dtype=object)])
    _, inv = np.unique(allk, return_inverse=True)
    inv = inv.reshape(-1)
    pcode, qcode = inv[:n], inv[n:]
    order = np.argsort(pcode, kind="stable")
    sc = pcode[order]
    lo = np.searchsorted(sc, qcode, side="left")
    cnt = np.searchsorted(sc, qcode, side="right") - lo
    m = int(cnt.max())
    if m == 0:
        return np.full((q, 0), -1, dtype=np.int64)
    cols = np.arange(m)
    take = np.minimum(lo[:, None] + cols, n - 1)
    return np.where(cols < cnt[:, None], order[take], -1).astype(np.int64)


def exclusion_matrix(store: Store, inputs: Inputs) -> np.ndarray:
    """(q, m) int64 pool positions (indices into `store.pool_rows`) to exclude per
    input: same id (when ids are given), identical templated text, or the same
    near-duplicate key (an eval row's stored key; a new text's normalised text); -1 padded."""
    rows = store.pool_rows
    pos = {i: r for r, i in enumerate(store.ids)}
    keys = [store.dups[pos[i]] if inputs.ids_given and i in pos else normalize_text(t)
            for i, t in zip(inputs.ids, inputs.texts)]
    parts = [_match_matrix(store.texts[rows], inputs.texts), _match_matrix(store.dups[rows], np.array(keys, dtype=object))]
    if inputs.ids_given:
        parts.append(_match_matrix(store.ids[rows], inputs.ids))
    return np.concatenate(parts, axis=1) if parts else np.full((len(inputs.texts), 0), -1, np.int64)


def knn_search(index, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               labels: np.ndarray | None = None, pool_vectors: np.ndarray | None = None,
               allowed: np.ndarray | None = None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Batched top-k over the pool, optionally k per class, among allowed rows, paged.

    Args:
        index: a `indexes.VectorIndex` over the pool (ids = pool positions).
        queries: (q, d) float32.
        k: results per query (per class when `labels` is given).
        exclude: (q, m) int64 pool positions to drop per query, -1 padded.
        labels: (n_pool,) int; when given, search each class's pool subset
            exactly (a flat sub-index per class, one batched search each) and
            merge best first.
        pool_vectors: (n_pool, d) vectors for the per-class and filtered sub-indexes.
        allowed: (n_pool,) bool; only these pool positions may be returned. The
            search runs exactly over the allowed rows (a flat sub-index of them),
            so the k returned are the k best that pass.
        offset: skip the first `offset` ranks (per class): ranks offset..offset+k-1
            of the search with k + offset.

    Returns:
        (scores (q, K) float32, positions (q, K) int64), best first; -1 / -inf
        where exclusion, the filter or the offset left fewer candidates.
        K = k, or k * (classes searched).
    """
    if labels is None and allowed is None:
        S, I = index.search(queries, min(k + offset, index.ntotal), exclude=exclude)
        return _page(S, I, offset, k)
    n = index.ntotal if pool_vectors is None else len(pool_vectors)
    ok = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    groups = ([np.flatnonzero(ok)] if labels is None
              else [np.flatnonzero(ok & (labels == c)) for c in np.unique(labels[ok])])
    all_s, all_i = [], []
    for sub in groups:
        s, i = _subset_search(queries, sub, pool_vectors, index.spec.metric, k + offset, exclude, n)
        s, i = _page(s, i, offset, k)
        all_s.append(s)
        all_i.append(i)
    S = np.concatenate(all_s, axis=1)
    I = np.concatenate(all_i, axis=1)
    # Best first across classes; ties keep class order (stable).
    order = np.argsort(-S, axis=1, kind="stable")
    return np.take_along_axis(S, order, axis=1), np.take_along_axis(I, order, axis=1)


def _subset_search(queries, sub: np.ndarray, pool_vectors: np.ndarray, metric: str, k: int,
                   exclude: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over the pool positions `sub` (a flat sub-index); positions are pool positions."""
    nq = len(queries)
    if len(sub) == 0:
        return np.full((nq, 0), -np.inf, np.float32), np.full((nq, 0), -1, np.int64)
    sub_idx = VectorIndex.build(pool_vectors[sub], IndexSpec(kind="flat", metric=metric))
    ex = None
    if exclude is not None and exclude.size:
        g2l = np.full(n + 1, -1, dtype=np.int64)  # slot n absorbs the -1 padding
        g2l[sub] = np.arange(len(sub))
        ex = g2l[np.where(exclude >= 0, exclude, n)]
    s, i = sub_idx.search(queries, min(k, len(sub)), exclude=ex)
    return s, np.where(i >= 0, sub[np.maximum(i, 0)], -1)


def _page(S: np.ndarray, I: np.ndarray, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns offset..offset+k-1 of best-first results, padded to k with -inf / -1."""
    S, I = S[:, offset:offset + k], I[:, offset:offset + k]
    if S.shape[1] < k:
        pad = k - S.shape[1]
        S = np.concatenate([S, np.full((len(S), pad), -np.inf, np.float32)], axis=1)
        I = np.concatenate([I, np.full((len(I), pad), -1, np.int64)], axis=1)
    return np.ascontiguousarray(S), np.ascontiguousarray(I)


# --------------------------------------------------------------------------- query


def check_query(store: Store, cfg: QueryConfig) -> ArrayId:
    """Validate a query against its build (array present, k within the pool or
    each class, the search options); the array id with its layer resolved."""
    if int(cfg.k) < 1:
        raise ConfigError(f"--k must be at least 1, got {cfg.k}")
    a = ArrayId(cfg.component, resolve_layer(store, cfg.layer), cfg.pooling, cfg.mask)
    store.check(a)
    allowed = check_search_options(store, cfg)
    labels = store.labels[store.pool_rows]
    n_pool = len(store.pool_rows)
    if cfg.balanced:
        classes, counts = np.unique(labels if cfg.labels is None else labels[np.isin(labels, cfg.labels)],
                                    return_counts=True)
        if cfg.k > counts.min():
            c = int(classes[np.argmin(counts)])
            raise ConfigError(f"--k {cfg.k} per class is larger than class {c}'s {int(counts.min())} pool "
                              f"examples; use --k {int(counts.min())} or less, or drop --balanced")
    elif cfg.k > n_pool:
        raise ConfigError(f"--k {cfg.k} is larger than the pool of {n_pool} examples; use --k {n_pool} or less")
    if allowed is not None and not allowed.any():
        raise ConfigError("the label and id filters leave no pool example to return; loosen --label, --id "
                          "or --exclude-id")
    return a


def check_search_options(store: Store, cfg: QueryConfig) -> np.ndarray | None:
    """Validate labels, ids, exclude_ids, min_score, offset and fields; the pool filter (`pool_filter`)."""
    if isinstance(cfg.offset, bool) or not isinstance(cfg.offset, (int, np.integer)) or cfg.offset < 0:
        raise ConfigError(f"--offset must be a whole number >= 0 (ranks to skip), got {cfg.offset!r}")
    if cfg.min_score is not None:
        ok = isinstance(cfg.min_score, (int, float, np.floating)) and not isinstance(cfg.min_score, bool)
        if not ok or not np.isfinite(cfg.min_score):
            raise ConfigError(f"--min-score must be a finite number (scores are higher-is-better), "
                              f"got {cfg.min_score!r}")
    if cfg.fields is not None:
        _check_fields(cfg.fields)
    labels = store.labels[store.pool_rows]
    if cfg.labels is not None:
        have = sorted({int(x) for x in labels})
        bad = [x for x in cfg.labels if isinstance(x, bool) or not isinstance(x, (int, np.integer))
               or int(x) not in have]
        if bad or not cfg.labels:
            raise ConfigError(f"--label {bad[0] if bad else '(none)'!r} is not a pool class of build "
                              f"{store.key[:12]}; give one or more of {have}, or leave --label out")
    pool_ids = {str(i) for i in store.ids[store.pool_rows]}
    for opt, vals in (("--id", cfg.ids), ("--exclude-id", cfg.exclude_ids)):
        if vals is None:
            continue
        if opt == "--id" and not vals:
            raise ConfigError("--id list is empty; give at least one pool id, or leave --id out")
        bad = [v for v in vals if not isinstance(v, str) or v not in pool_ids]
        if bad:
            raise ConfigError(f"{opt} {bad[0]!r} is not a pool example id of build {store.key[:12]} "
                              f"({len(bad)} such); give ids of pool rows (eval rows are never returned)")
    return pool_filter(store, cfg)


def pool_filter(store: Store, cfg: QueryConfig) -> np.ndarray | None:
    """(n_pool,) bool: the pool positions that `labels`, `ids` and `exclude_ids`
    allow; None when no filter is set."""
    if cfg.labels is None and cfg.ids is None and not cfg.exclude_ids:
        return None
    rows = store.pool_rows
    ok = np.ones(len(rows), dtype=bool)
    if cfg.labels is not None:
        ok &= np.isin(store.labels[rows], np.asarray([int(x) for x in cfg.labels]))
    pool_ids = np.asarray([str(i) for i in store.ids[rows]], dtype=object)
    if cfg.ids is not None:
        ok &= np.isin(pool_ids, np.asarray(cfg.ids, dtype=object))
    if cfg.exclude_ids:
        ok &= ~np.isin(pool_ids, np.asarray(cfg.exclude_ids, dtype=object))
    return ok


def _check_fields(names) -> None:
    bad = [f for f in names if f not in RECORD_FIELDS]
    if bad or not names:
        raise ConfigError(f"unknown record field {bad[0] if bad else '(none)'!r}; --fields takes one or more "
                          f"of {', '.join(RECORD_FIELDS)}")


def select_fields(records: list[dict], fields) -> list[dict]:
    """Each record with only the top-level keys `fields` (in RECORD_FIELDS order);
    None keeps records as they are. Raises ConfigError for an unknown name."""
    if fields is None:
        return records
    if isinstance(fields, str):
        fields = (fields,)
    _check_fields(list(fields))
    keep = [f for f in RECORD_FIELDS if f in set(fields)]
    return [{f: r[f] for f in keep if f in r} for r in records]


def search_records(store: Store, inputs: Inputs, Q: np.ndarray, cfg: QueryConfig, a: ArrayId, index) -> list[dict]:
    """The output records of `inputs` with query vectors `Q` ((q, d) float32):
    one batched search (one per class when balanced), self/duplicate exclusion,
    the pool filter, paging, the score threshold and the field selection."""
    ex = exclusion_matrix(store, inputs) if cfg.exclude_self and not inputs.vectors else None
    allowed = pool_filter(store, cfg)
    P = None
    if cfg.balanced or allowed is not None:
        P = store.acts(a.component, a.layer, a.pooling, a.mask, split="pool")
    labels = store.labels[store.pool_rows] if cfg.balanced else None
    S, I = knn_search(index, Q, cfg.k, ex, labels=labels, pool_vectors=P, allowed=allowed, offset=int(cfg.offset))
    if cfg.min_score is not None:
        I = np.where(S >= cfg.min_score, I, -1)
    return select_fields(records(store, inputs, S, I, a, cfg, index.spec.metric), cfg.fields)


def search_vectors(store: Store, vectors, cfg: QueryConfig, index=None) -> list[dict]:
    """Records for raw query vectors, one per row of `vectors`.

    `vectors` is (n, d) float in the space of cfg's array (d = the array's width,
    e.g. rows of `store.acts(...)`), unnormalised: the index normalises queries
    exactly as it does stored rows (L2, for cosine). Test ids are "vector-<row>",
    `test_text` and `test_label` are null, and nothing is excluded as "self"
    (a vector has no id or text); every other option applies.

    Raises DatasetError for a wrong shape or width or non-finite values, and
    what `check_query` raises for the options.
    """
    a = check_query(store, cfg)
    index = index or store.index(a.component, a.layer, a.pooling, a.mask)
    Q = np.asarray(vectors)
    if Q.ndim != 2 or Q.shape[0] == 0:
        raise DatasetError(f"query vectors must be a non-empty 2-D array (n, {index.d}), got shape {Q.shape}; "
                           f"wrap one vector as [vector]")
    if not (np.issubdtype(Q.dtype, np.floating) or np.issubdtype(Q.dtype, np.integer)):
        raise DatasetError(f"query vectors must be numbers, got dtype {Q.dtype}")
    if Q.shape[1] != index.d:
        raise DatasetError(f"query vectors have d={Q.shape[1]} but array {a} has d={index.d}; give vectors "
                           f"of that array (same component, layer, pooling and mask)")
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(Q).all(axis=1))
    if bad.size:
        raise DatasetError(f"query vector row(s) {bad[:5].tolist()} hold NaN or inf; give finite values")
    n = len(Q)
    inputs = Inputs(np.asarray([f"vector-{i}" for i in range(n)], dtype=object), np.full(n, None, dtype=object),
                    [None] * n, False, False, vectors=True)
    return search_records(store, inputs, Q, cfg, a, index)


def query(cfg: QueryConfig, progress: Progress | None = None) -> QueryRecords:
    """Nearest pool examples of every test input (see the module docstring for the records).

    All inputs go through one batched index search (one per class when
    `balanced`). New texts are encoded once and cached; `.report` on the
    result says how many forward batches ran (0 on a repeat).

    Raises StoreError (missing build, layer or component, or index), MismatchError
    (index or model not of this build), ConfigError (k too large, bad option),
    DatasetError (missing/empty input).
    """
    t0 = time.time()
    set_threads()
    store = Store.open(cfg.key, cfg.home)
    a = check_query(store, cfg)  # validates k too
    index = store.index(a.component, a.layer, a.pooling, a.mask)
    inputs = load_inputs(store, cfg.source, cfg.text_field)
    enc = {"forward_batches": 0, "cache_hit": None}
    if inputs.new:
        Q, enc = encode_texts(store, inputs.texts, a.component, a.layer, a.pooling, a.mask, progress,
                              device=cfg.device)
    else:
        Q = store.acts(a.component, a.layer, a.pooling, a.mask, split="eval")
    if progress:
        progress("query search", 0, 1)
    recs = QueryRecords(search_records(store, inputs, Q, cfg, a, index))
    if progress:
        progress("query search", 1, 1)
    recs.report = {"build_key": store.key, "array": str(a), "n_queries": len(recs),
                   "forward_batches": enc["forward_batches"], "cache_hit": enc["cache_hit"],
                   "out": None, "seconds": None}
    if cfg.out:
        write_jsonl(recs, cfg.out)
        recs.report["out"] = str(cfg.out)
    recs.report["seconds"] = round(time.time() - t0, 3)
    return recs


def records(store: Store, inputs: Inputs, S, I, a: ArrayId, cfg: QueryConfig, metric: str) -> list[dict]:
    """One JSON record per input: its neighbours (id, score, text, label, rank from
    cfg.offset; positions -1 are skipped), the metric, the array, the build key and
    the query config."""
    rows = store.pool_rows
    conf = cfg.to_json()
    offset = int(cfg.offset)
    out = []
    for qi in range(len(inputs.texts)):
        nb = []
        for pos, sc in zip(I[qi], S[qi]):
            if pos < 0:
                continue
            r = int(rows[pos])
            nb.append({"id": str(store.ids[r]), "score": float(sc), "text": str(store.texts[r]),
                       "label": int(store.labels[r]), "rank": offset + len(nb)})
        text = inputs.texts[qi]
        out.append({"test_id": str(inputs.ids[qi]), "test_text": None if text is None else str(text),
                    "test_label": inputs.labels[qi], "neighbors": nb, "metric": metric,
                    "array": str(a), "build_key": store.key, "config": conf, "k": int(cfg.k)})
    return out


def write_jsonl(records, path) -> None:
    """Write records as JSON lines; a path is written atomically (temp file +
    rename), a file object (e.g. sys.stdout) directly."""
    if isinstance(path, io.IOBase) or hasattr(path, "write"):
        for r in records:
            path.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    atomic_write(path, lambda f: f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in records))


class _QueryModule(types.ModuleType):
    """This module, callable: `actcache.query(QueryConfig(key="last"))` runs `query`
    (with tqdm bars in a notebook or terminal when no `progress` is given), while
    `import actcache.query` and `from actcache.query import query, QueryConfig`
    keep working as for any module."""

    def __call__(self, cfg: QueryConfig, progress: Progress | None = None) -> QueryRecords:
        with auto_progress(progress) as cb:
            return query(cfg, cb)


sys.modules[__name__].__class__ = _QueryModule
