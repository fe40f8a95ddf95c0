"""Hugging Face datasets as a data source: `--task hf:<path>[:<config>]`.

`<path>` is a dataset on the hub (read from the local Hugging Face cache when
HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), a local .parquet/.json/.jsonl/.csv
file, a directory of such files, or a directory written by `save_to_disk`.
Every split is turned into the row dicts the JSONL/CSV reader produces, so the
rows go through the one code path of `--data` (`data.rows_task`).

Pool and eval rows:

- the pool is `--split` (default: `train`, or the only split there is);
- the eval set is `--eval-split` when given; otherwise `validation`, else
  `test`, when the dataset has one; otherwise the pool split is divided by a
  hash of each row's text, as a `--data` file without `--split-field` is;
- with `--split-field`, the rows of `--split` are divided by that field, as
  for `--data`, and no eval split is read.

Rows without `--id-field` get the id `<split>-<row>` (row numbers from 0).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DatasetError

PREFIX = "hf:"
EVAL_SPLITS = ("validation", "test")
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".ndjson": "json",
                 ".csv": "csv", ".tsv": "csv", ".txt": "text", ".arrow": "arrow"}


def is_hf(task: str) -> bool:
    return task.startswith(PREFIX)


@dataclass(frozen=True)
class HFSource:
    """A parsed `hf:<path>[:<config>]`."""

    path: str
    config: str | None = None

    @classmethod
    def parse(cls, task: str) -> "HFSource":
        """`hf:<path>[:<config>]`; a local path that exists is taken whole (it may hold a colon)."""
        rest = task[len(PREFIX):]
        if not rest:
            raise ConfigError("--task hf: needs a dataset, e.g. hf:stanfordnlp/sst2, hf:glue:sst2 or "
                              "hf:./my_dataset_dir")
        if ":" in rest and not Path(rest).expanduser().exists():
            path, config = rest.rsplit(":", 1)
            return cls(path, config or None)
        return cls(rest)

    @property
    def name(self) -> str:
        base = Path(self.path).name or self.path
        return f"{base}:{self.config}" if self.config else base

    def is_local(self) -> bool:
        p = self.path
        return (Path(p).expanduser().exists() or p.startswith(("/", "./", "../", "~"))
                or Path(p).suffix in FILE_BUILDERS)


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def _quiet():
    """Without datasets' progress bars: the library never prints."""
    from datasets import utils as hf_utils
    from datasets.utils import logging as hf_logging

    was_off = hf_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_utils.disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not was_off:
            hf_utils.enable_progress_bars()


def _is_saved(p: Path) -> bool:
    """Whether `p` is a directory written by Dataset/DatasetDict.save_to_disk."""
    return p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists())


def open_dataset(src: HFSource, revision: str | None = None) -> dict:
    """{split name: datasets.Dataset} for `src`. Raises DatasetError saying what to do."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("--task hf: needs the datasets package: pip install datasets") from None
    local = src.is_local()
    p = Path(src.path).expanduser()
    if local and not p.exists():
        raise DatasetError(f"--task hf:{src.path}: {p} does not exist; give an existing directory written by "
                           f"save_to_disk, a directory of parquet/JSON/CSV files, or one such file")
    if local and revision:
        raise ConfigError(f"--data-revision picks a revision of a hub dataset; {src.path} is a local path")
    if local and src.config and (_is_saved(p) or p.is_file()):
        raise DatasetError(f"--task hf:{src.path}:{src.config}: {p} has no configs; drop ':{src.config}'")
    try:
        with _quiet():
            if local and _is_saved(p):
                out = datasets.load_from_disk(str(p))
            elif local and p.is_file():
                builder = FILE_BUILDERS.get(p.suffix)
                if builder is None:
                    raise DatasetError(f"--task hf:{src.path}: unknown file type {p.suffix!r}; use one of "
                                       f"{sorted(FILE_BUILDERS)}")
                out = datasets.load_dataset(builder, data_files=str(p),
                                            **({"delimiter": "\t"} if p.suffix == ".tsv" else {}))
            else:
                out = datasets.load_dataset(str(p) if local else src.path, src.config, revision=revision)
    except DatasetError:
        raise
    except (ConnectionError, FileNotFoundError) as e:
        raise DatasetError(_missing(src, e)) from None
    except ValueError as e:
        raise DatasetError(f"--task hf:{src.path}{':' + src.config if src.config else ''}: {e}; pick a config "
                           f"that exists (hf:<path>:<config>)") from None
    except Exception as e:  # datasets raises its own errors for a missing hub dataset or a bad file
        if type(e).__name__ in ("DatasetNotFoundError", "EmptyDatasetError"):
            raise DatasetError(_missing(src, e)) from None
        raise DatasetError(f"--task hf:{src.path}: could not load it ({type(e).__name__}: {e})") from None
    if isinstance(out, datasets.Dataset):
        return {"train": out}
    return dict(out)


def _missing(src: HFSource, e: Exception) -> str:
    where = ("it is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE/"
             "HF_DATASETS_OFFLINE)" if _offline() else "it could not be found or reached")
    return (f"--task hf:{src.path}: {where} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Load it once where there is network (datasets.load_dataset({src.path!r}"
            f"{', ' + repr(src.config) if src.config else ''})) to fill the cache, or save it with "
            f"save_to_disk / to_parquet and pass hf:<that local path>")


def choose_splits(splits: list[str], split: str | None, eval_split: str | None,
                  split_field: str | None, where: str) -> tuple[str, str | None]:
    """(pool split, eval split or None for a hash split or --split-field)."""
    def need(name: str, opt: str) -> str:
        if name not in splits:
            raise DatasetError(f"{where} has no split {name!r} ({opt}); its splits: {splits}")
        return name

    if split is not None:
        pool = need(split, "--split")
    elif "train" in splits or len(splits) != 1:
        pool = need("train", "the default --split; pass --split")
    else:
        pool = splits[0]
    if split_field:
        if eval_split is not None:
            raise ConfigError("pass either --eval-split or --split-field, not both")
        return pool, None
    if eval_split is not None:
        if eval_split == pool:
            raise ConfigError(f"--eval-split {eval_split!r} is the pool split too; pick another split, or "
                              f"leave --eval-split out to divide {pool!r} by a hash")
        return pool, need(eval_split, "--eval-split")
    return pool, next((s for s in EVAL_SPLITS if s in splits and s != pool), None)


def label_names(dset, label_field: str) -> tuple[str, ...]:
    """The class names of a ClassLabel label column; () for any other column."""
    feat = dset.features.get(label_field)
    return tuple(getattr(feat, "names", None) or ())


def split_rows(dset, split: str) -> list[tuple[str, dict, str]]:
    """(location, row, default id) for each row of one split."""
    return [(f"{split} row {i}", row, f"{split}-{i}") for i, row in enumerate(dset)]
