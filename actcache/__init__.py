"""actcache: language-model activations as a build artifact.

    import actcache
    store = actcache.build(actcache.BuildConfig())       # or Store.open(key)
    X = store.acts("mlp", 12, "mean", "isolated", split="pool")   # (n_pool, d) float32

Heavy libraries (torch, transformers, faiss) are imported inside functions so
that importing actcache, and `actcache --help`, stay fast.
"""

from .config import VERSION as __version__  # noqa: F401
from .errors import (
    ActcacheError, ConfigError, CorruptStoreError, DatasetError, LabelWordError, MismatchError,
    ModelError, OverlapError, StoreError,
)


def __getattr__(name):
    # Lazy public API: keeps `import actcache` free of torch/faiss.
    if name in ("build", "BuildConfig", "canonical_key"):
        from . import builder as _b

        return {"build": _b.build, "BuildConfig": _b.BuildConfig, "canonical_key": _b.canonical_key}[name]
    if name in ("Store", "list_builds", "default_home"):
        from . import store as _s

        return getattr(_s, name)
    if name in ("DataSpec", "TASKS"):
        from . import data as _d

        return getattr(_d, name)
    if name in ("EvalConfig", "evaluate", "RunConfig", "run", "PRESETS"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ModelSpec":
        from .models import ModelSpec

        return ModelSpec
    raise AttributeError(f"module 'actcache' has no attribute {name!r}")


__all__ = [
    "ActcacheError", "BuildConfig", "ConfigError", "CorruptStoreError", "DataSpec", "DatasetError",
    "LabelWordError", "MismatchError", "ModelError", "ModelSpec", "OverlapError", "Store", "StoreError", "TASKS",
    "build", "canonical_key", "default_home", "list_builds", "EvalConfig", "evaluate", "RunConfig", "run",
    "PRESETS",
]
