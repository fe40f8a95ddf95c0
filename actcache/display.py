"""How results show in a notebook or a REPL: short text reprs, small HTML
tables (`_repr_html_`), `to_pandas()` tables, and progress bars through
`tqdm.auto` when nobody passed a progress callback.

Cheap to import (standard library only); pandas and tqdm are optional and
imported where used.
"""

from __future__ import annotations

import html
import math
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .extras import require

Progress = Callable[[str, int, int], None]


def num(x, nd: int = 3) -> str:
    """A number for a repr: `nd` decimals, "nan" for NaN, "—" for None."""
    if x is None:
        return "—"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def interval(mean, lo, hi, nd: int = 3) -> str:
    """"0.512 [0.431, 0.600]"; just the mean when the interval is missing."""
    if lo is None or hi is None:
        return num(mean, nd)
    return f"{num(mean, nd)} [{num(lo, nd)}, {num(hi, nd)}]"


def short_key(key: str | None) -> str:
    return (key or "")[:12]


def html_table(header: Sequence[str], rows: Sequence[Sequence], caption: str = "") -> str:
    """A small escaped HTML table (what Jupyter shows for `_repr_html_`)."""
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def dataframe(rows: Sequence[dict], what: str, columns: Sequence[str] | None = None):
    """A pandas DataFrame of `rows` (one row each); MissingExtraError naming
    `pip install 'actcache[notebook]'` when pandas is not installed."""
    require("notebook", f"{what}.to_pandas()")
    import pandas as pd  # optional: only `to_pandas()` needs it

    return pd.DataFrame(list(rows), columns=list(columns) if columns is not None else None)


def interactive() -> bool:
    """True in a Jupyter kernel or when stderr is a terminal: where a progress bar is welcome."""
    shell = sys.modules.get("IPython")
    if shell is not None and "ipykernel" in sys.modules:
        ip = getattr(shell, "get_ipython", lambda: None)()
        if ip is not None and getattr(ip, "kernel", None) is not None:
            return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


class TqdmProgress:
    """A (desc, done, total) callback drawing one `tqdm.auto` bar per step."""

    def __init__(self, tqdm):
        self._tqdm = tqdm
        self._bars: dict = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        bar = self._bars.get(desc)
        if bar is None:
            bar = self._bars[desc] = self._tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total and done >= total:
            self.close(desc)

    def close(self, desc: str | None = None) -> None:
        for d in [desc] if desc is not None else list(self._bars):
            bar = self._bars.pop(d, None)
            if bar is not None:
                bar.close()


def tqdm_progress() -> TqdmProgress | None:
    """A tqdm.auto progress callback, or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm  # optional: comes with transformers; without it, no bars
    except ImportError:
        return None
    return TqdmProgress(tqdm)


@contextmanager
def auto_progress(progress: Progress | None) -> Iterator[Progress | None]:
    """`progress` itself when given; else, in a notebook or a terminal with tqdm
    installed, tqdm bars (closed on exit); else None (nothing is shown).
    ACTCACHE_PROGRESS=0 turns the bars off."""
    if progress is not None or os.environ.get("ACTCACHE_PROGRESS") == "0" or not interactive():
        yield progress
        return
    cb = tqdm_progress()
    try:
        yield cb
    finally:
        if cb is not None:
            cb.close()
