"""actcache: language-model activations as a build artifact.

    import actcache
    store = actcache.build(actcache.BuildConfig())       # or Store.open(key)
    X = store.acts("mlp", 12, "mean", "isolated", split="pool")   # (n_pool, d) float32
    recs = actcache.query(actcache.QueryConfig(key=store.key, k=4))   # neighbours of the eval rows
    res = actcache.evaluate(actcache.EvalConfig(key=store.key, out=None))   # out=None: write no report
    res.to_pandas()                                      # one row per selection strategy

Heavy libraries (torch, transformers, faiss) are imported inside functions so
that importing actcache, and `actcache --help`, stay fast. `actcache.query` is
the `actcache.query` module, callable as its `query` function.
"""

from .config import VERSION as __version__  # noqa: F401
from .errors import (
    ActcacheError, ConfigError, CorruptStoreError, DatasetError, LabelWordError, MismatchError,
    MissingExtraError, MissingModelError, ModelError, OverlapError, StoreError,
)

# name -> the module (relative to actcache) it is read from on first use.
_LAZY = {
    "build": "builder", "BuildConfig": "builder", "canonical_key": "builder",
    "Store": "store", "list_builds": "store", "default_home": "store",
    "DataSpec": "data", "TASKS": "data",
    "EvalConfig": "pipeline", "evaluate": "pipeline", "RunConfig": "pipeline", "run": "pipeline",
    "PRESETS": "pipeline", "Preset": "config",
    "EvalResult": "config", "StudyResult": "config", "SelectionResult": "config", "RunResult": "config",
    "Sizes": "config",
    "ModelSpec": "models",
    "QueryConfig": "query", "QueryRecords": "query",
}


def __getattr__(name):
    # Lazy public API: keeps `import actcache` free of torch/faiss.
    import importlib  # here, not at the top: only a first use of the lazy API needs it

    if name == "query":  # the submodule, callable as its `query` function
        return importlib.import_module(".query", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    raise AttributeError(f"module 'actcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ActcacheError", "BuildConfig", "ConfigError", "CorruptStoreError", "DataSpec", "DatasetError",
    "LabelWordError", "MismatchError", "MissingExtraError", "MissingModelError", "ModelError", "ModelSpec",
    "OverlapError", "Store", "StoreError", "TASKS", "build", "canonical_key", "default_home", "list_builds",
    "EvalConfig", "evaluate", "RunConfig", "run", "PRESETS", "Preset", "EvalResult", "StudyResult",
    "SelectionResult", "RunResult", "Sizes", "QueryConfig", "QueryRecords", "query",
]
