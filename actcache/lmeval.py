"""Few-shot demonstrations for lm-evaluation-harness, drawn from an actcache build.

lm-eval builds one sampler per task with `sampler_cls(fewshot_docs, rnd=None)`
and asks it for `sample(n, eval_doc=doc)` for every evaluated doc. The
factories here return such classes (subclasses of lm-eval's `ContextSampler`),
configured for one build:

    Knn = knn_sampler(store="3f2a9c", layer=-1, id_field="id")
    Rnd = strategy_sampler(store="3f2a9c", strategy="random", seed=0)

`knn_sampler` retrieves, for each eval doc, the nearest pool examples on a
cached array (a doc that is an eval row of the build, same id and text, by its
stored vector, exactly as `actcache query` ranks eval rows; any other doc is
filled into the build's template and encoded with the build's model, or sent
to a running `actcache serve`); `strategy_sampler` runs
any registered strategy (`actcache.select.STRATEGIES`): a subset strategy gives
every doc the same demonstrations, a per-input strategy gives each eval row of
the build its own. Pool ids are mapped back to lm-eval's few-shot docs by an id
field of the docs or by their templated text.

lm_eval is imported only when a sampler class is made, so `import actcache`
does not need it (`pip install actcache[lmeval]`).
"""

from __future__ import annotations

import json

from .client import Client
from .config import DEFAULT_MASK
from .data import Example, Task
from .errors import ConfigError, DatasetError
from .extras import require
from .query import (
    QueryConfig, check_query, encode_texts, eval_inputs, parse_inputs, search_records, template_fields,
)
from .select import STRATEGIES, select
from .store import Store

KNN_OPTIONS = ("component", "layer", "pooling", "mask", "balanced", "exclude_self")
NO_EVAL_DOC = ("lm-eval passed no eval doc to the sampler: lm-eval 0.4.13 passes it only when "
               "fewshot_config.split equals test_split. Evaluate on validation_split (leaving test_split "
               "unset) and give the pool as fewshot_config.samples, or set both splits to the same name")


def _context_sampler():
    require("lmeval", "an lm-eval sampler")
    from lm_eval.api.samplers import ContextSampler  # optional dependency: actcache[lmeval]

    return ContextSampler


def _open(store, home):
    if isinstance(store, Store):
        return store
    if not store:
        raise ConfigError("give store= (a build key, unique key prefix or 'last') or url= of a running "
                          "`actcache serve` with store= naming the build there")
    return Store.open(str(store), home)


class _Docs:
    """lm-eval's few-shot docs, keyed by what a pool example is matched on."""
    def __init__(self, docs, id_field, template_fields, text_of):
        self.docs = list(docs)
        self.id_field = id_field
        self.template_fields = template_fields
        self.text_of = text_of  # templated text of an input object; None when matching by id
        self.by_key = {}
        for d in self.docs:
            self.by_key.setdefault(self.key(d), d)

    def input_object(self, doc: dict) -> dict:
        """The JSON input object of a doc for `query.parse_inputs`: its id and template fields."""
        if not isinstance(doc, dict):
            raise DatasetError(f"an lm-eval doc is a {type(doc).__name__}, not a dict; give docs as dicts")
        missing = [f for f in self.template_fields if f not in doc]
        if missing:
            raise DatasetError(f"an lm-eval doc lacks template field(s) {missing} of the build (it has "
                               f"{sorted(doc)}); process the docs so their fields match the build's template")
        obj = {f: doc[f] if isinstance(doc[f], str) else str(doc[f]) for f in self.template_fields}
        if self.id_field:
            if self.id_field not in doc:
                raise DatasetError(f"an lm-eval doc has no id field {self.id_field!r} (it has {sorted(doc)}); "
                                   f"pass id_field=None to match by text")
            obj["id"] = str(doc[self.id_field])
        return obj

    def key(self, doc: dict) -> str:
        obj = self.input_object(doc)
        return obj["id"] if self.id_field else self.text_of(obj)

    def pick(self, pool_ids, texts) -> list[dict]:
        """The docs of the pool examples with these ids (their templated texts when matching by text)."""
        keys = list(pool_ids) if self.id_field else list(texts)
        missing = [k for k in keys if k not in self.by_key]
        if missing:
            how = f"{self.id_field!r} values" if self.id_field else "templated texts"
            raise DatasetError(f"pool example(s) {missing[:3]} of the build are not among lm-eval's few-shot "
                               f"docs (matched by {how}); give the build's pool as the few-shot docs")
        return [self.by_key[k] for k in keys]


class _Build:
    """A build opened for retrieval: locally (store, model, indexes) or through a Client."""
    def __init__(self, store=None, home=None, url=None, token=None):
        self.client = None
        self.store = None
        if url:

            if not store:
                raise ConfigError("with url= give store= too: the key of the build on the server")
            self.client, self.key = Client(url, token), str(store)
        else:
            self.store = _open(store, home)
            self.key = self.store.key
        self._lm = None
        self._task = None

    def task(self):
        """The build's `data.Task` (for a served build, rebuilt from its provenance)."""
        if self._task is None:
            if self.store is not None:
                self._task = self.store.task()
            else:

                t = self.client.info(self.key)["provenance"]["data"]["task"]
                self._task = Task.from_provenance("served", t)
        return self._task

    def template_fields(self) -> list[str]:
        return template_fields(self.task().template)

    def text_of(self, obj: dict) -> str:
        """The templated text of an input object, as the build templates its rows."""
        vals = tuple((f, obj[f]) for f in self.template_fields())
        return self.task().query_text(Example(obj.get("id", "input-0"), vals, -1))

    def pool_ids(self) -> list[str]:
        if self.store is None:
            raise ConfigError("a strategy over a served build is not mapped to docs here; open the build "
                              "locally (store= without url=)")
        return [str(i) for i in self.store.ids[self.store.pool_rows]]

    def _eval_position(self, obj: dict) -> int | None:
        """The position among the build's eval rows of an input object with an eval row's id and text."""
        st = self.store
        if "id" not in obj:
            return None
        if self.__dict__.get("_eval_pos") is None:
            self._eval_pos = {str(i): n for n, i in enumerate(st.ids[st.eval_rows])}
        n = self._eval_pos.get(obj["id"])
        if n is None or str(st.texts[st.eval_rows[n]]) != self.text_of(obj):
            return None
        return n

    def neighbors(self, obj: dict, k: int, allowed, opts: dict) -> list[dict]:
        """The k nearest pool examples (records with id and text) of one input object."""
        if self.client is not None:
            body = dict(opts, k=k, filter={"ids": list(allowed)} if allowed is not None else None)
            return self.client.neighbors(self.key, inputs=[obj], **body)[0]["neighbors"]

        cfg = QueryConfig(key=self.key, k=k, ids=None if allowed is None else tuple(allowed), **opts)
        a = check_query(self.store, cfg)
        at = self._eval_position(obj)
        if at is not None:  # a build eval row: its stored vector, as `actcache query` (no --source) uses
            inputs = eval_inputs(self.store, [obj["id"]])
            Q = self.store.acts(a.component, a.layer, a.pooling, a.mask, split="eval")[at:at + 1]
        else:
            inputs = parse_inputs(self.store, [json.dumps(obj)], True, "the lm-eval doc")
            if self._lm is None:
                self._lm = self.store.load_model()
            Q, _ = encode_texts(self.store, inputs.texts, a.component, a.layer, a.pooling, a.mask, lm=self._lm)
        index = self.store.index(a.component, a.layer, a.pooling, a.mask)
        return search_records(self.store, inputs, Q, cfg, a, index)[0]["neighbors"]



class _ActcacheSampler:
    """What both samplers share: lm-eval's constructor, the build and the docs, opened on first use."""
    actcache_options: dict = {}

    def __init__(self, df=None, *, rnd=None, fewshot_indices=None, **kwargs):
        super().__init__(df, rnd=rnd, fewshot_indices=fewshot_indices, **kwargs)
        self._build = None
        self._docs = None
        self._allowed = None

    def replace_df(self, df):
        super().replace_df(df)
        self._docs = None
        return self

    def _ready(self) -> None:
        o = self.actcache_options
        if self._build is None:
            self._build = _Build(o["store"], o["home"], o.get("url"), o.get("token"))
        if self._docs is None:
            b = self._build
            self._docs = _Docs(self.fewshot_docs(), o["id_field"], b.template_fields(), b.text_of)
            self._allowed = self._pool_subset()

    def _pool_subset(self):
        """Pool ids that map to a doc (None: all of them, or not known here)."""
        st = self._build.store
        if st is None:
            return None
        rows = st.pool_rows
        keys = st.ids[rows] if self._docs.id_field else st.texts[rows]
        ids = [str(i) for i, key in zip(st.ids[rows], keys) if str(key) in self._docs.by_key]
        return None if len(ids) == len(rows) else ids

    def _start(self, n: int, df) -> bool:
        """Checks n, takes a new df; False when there is nothing to draw (n == 0)."""
        if int(n) < 0:
            raise ConfigError(f"number of few-shot examples must be at least 0, got {n}")
        if df:
            self.replace_df(df)
        if not n:
            return False
        if not self.fewshot_docs():
            raise DatasetError("lm-eval gave the sampler no few-shot docs; set fewshot_config.split or "
                               "fewshot_config.samples to the build's pool")
        self._ready()
        return True


class _KnnSampler(_ActcacheSampler):
    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        """The n nearest pool examples of `eval_doc` (best first), as lm-eval's few-shot docs."""
        if not self._start(n, df):
            return []
        if eval_doc is None:
            raise ConfigError(NO_EVAL_DOC)
        opts = {k: self.actcache_options[k] for k in KNN_OPTIONS}
        nb = self._build.neighbors(self._docs.input_object(eval_doc), int(n), self._allowed, opts)
        if len(nb) < n:
            raise DatasetError(f"only {len(nb)} pool examples may be shown with this doc, {n} were asked for; "
                               f"lower num_fewshot or give more few-shot docs")
        return self._docs.pick([x["id"] for x in nb], [x["text"] for x in nb])


class _StrategySampler(_ActcacheSampler):
    def _selection(self, n: int):
        o = self.actcache_options
        budget = o["budget"] or n
        k = o["k"] or n
        memo = self.__dict__.setdefault("_memo", {})
        if (budget, k) not in memo:
            st = self._build.store if self._allowed is None else self._build.store.with_pool(
                [r for r in self._build.store.pool_rows if str(self._build.store.ids[r]) in set(self._allowed)])
            memo[(budget, k)] = select(st, o["strategy"], budget=budget, k=k, seed=o["seed"], turns=o["turns"],
                                       **o["strategy_options"])
        return memo[(budget, k)]

    def _eval_id(self, doc) -> str:
        """The build's eval id of an lm-eval doc (by id field, or by templated text)."""
        st = self._build.store
        obj = self._docs.input_object(doc)
        rows = st.eval_rows
        if self._docs.id_field:
            if obj["id"] in {str(i) for i in st.ids[rows]}:
                return obj["id"]
        else:
            text = self._docs.text_of(obj)
            for i, t in zip(st.ids[rows], st.texts[rows]):
                if str(t) == text:
                    return str(i)
        raise DatasetError(f"an eval doc is not an eval row of build {st.key[:12]}; per-input strategies "
                           f"choose for the build's eval rows only; use knn_sampler for other docs")

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        """A subset strategy's first n picks, or a per-input strategy's n picks for `eval_doc`."""
        if not self._start(n, df):
            return []
        if self._build.store is None:
            raise ConfigError("strategy_sampler runs on a build on this machine; pass store= without url=")
        sel = self._selection(int(n))
        if sel.per_query is not None:
            if eval_doc is None:
                raise ConfigError(NO_EVAL_DOC)
            ids = list(sel.per_query[self._eval_id(eval_doc)])[:n]
        else:
            ids = list(sel.ids)[:n]
        if len(ids) < n:
            raise DatasetError(f"strategy {sel.name!r} chose {len(ids)} examples, {n} were asked for; "
                               f"raise budget= or lower num_fewshot")
        st = self._build.store
        text = {str(i): str(t) for i, t in zip(st.ids[st.pool_rows], st.texts[st.pool_rows])}
        return self._docs.pick(ids, [text[i] for i in ids])


def _sampler_class(name: str, mixin, options: dict):
    base = _context_sampler()
    return type(name, (mixin, base), {"actcache_options": options, "__module__": __name__})


def knn_sampler(store=None, *, home=None, url=None, token=None, component: str = "mlp", layer: int = -1,
                pooling: str = "mean", mask: str | None = None, exclude_self: bool = True,
                id_field: str | None = "id", name: str = "ActcacheKnnSampler"):
    """A ContextSampler class that gives each eval doc its nearest pool examples.

    Args:
        store: build key, unique prefix, "last", or an open Store; with `url`, the key on the server.
        home: the store root (None: $ACTCACHE_HOME or ~/.cache/actcache).
        url, token: a running `actcache serve` to ask instead of opening the build here.
        component, layer, pooling, mask: the cached array compared in (as `actcache query`).
        exclude_self: never return a pool example with the doc's id or templated text.
        id_field: the docs' field holding the build's ids; None matches docs by templated text.
        name: the class name.

    Returns a subclass of lm-eval's ContextSampler: give it as fewshot_config.sampler.
    The build is opened (and its model loaded) on the first `sample`.
    """

    opts = dict(store=store, home=home, url=url, token=token, component=component, layer=int(layer),
                pooling=pooling, mask=mask or DEFAULT_MASK, balanced=False, exclude_self=bool(exclude_self),
                id_field=id_field)
    return _sampler_class(name, _KnnSampler, opts)


def strategy_sampler(store=None, *, strategy: str, home=None, budget: int | None = None, k: int | None = None,
                     seed: int = 0, turns: bool = False, id_field: str | None = "id",
                     name: str = "ActcacheStrategySampler", **options):
    """A ContextSampler class that draws demonstrations with a registered strategy.

    A subset strategy (random, k-center, stat, vote-k, ...) chooses `budget`
    pool examples once (None: num_fewshot) and every doc gets its first
    num_fewshot; a per-input strategy (knn, embed-knn, sae-knn) gives each eval
    doc, which must be an eval row of the build, its own k (None: num_fewshot).
    `options` are the strategy's options (component, layer, stat, ...), checked now.

    Raises ConfigError for an unknown strategy or option.
    """

    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    STRATEGIES[strategy].check(dict(options))
    opts = dict(store=store, home=home, strategy=strategy, budget=budget, k=k, seed=int(seed), turns=bool(turns),
                id_field=id_field, strategy_options=dict(options))
    return _sampler_class(name, _StrategySampler, opts)
