"""lm-evaluation-harness tasks as a data source: `--task lm-eval:<task name>`.

The task is looked up in lm-eval's task registry (`lm_eval.tasks.TaskManager`,
with `--include-path DIR` for a user's task YAMLs) and loaded with
`get_task_dict`, so its dataset, `process_docs`, prompt and answers are
lm-eval's own. Each doc becomes an `Example` whose one field, `doc_to_text`,
holds lm-eval's rendered `doc_to_text(doc)`; the task's template is
`{doc_to_text}`, so a prompt with demonstrations is, character for character,
lm-eval's `fewshot_context` for that doc with the same demonstrations:

    description + (doc_to_text(d) + target_delimiter + answer(d) + fewshot_delimiter for d in demos)
                + doc_to_text(doc)

What is mapped:

- `multiple_choice` whose `doc_to_choice` gives every doc the same choices:
  a classification task, label words `target_delimiter + choice`;
- `multiple_choice` with choices per doc: a multiple-choice task, options
  `target_delimiter + choice`;
- `generate_until`: a generation task, the answer `doc_to_target(doc)` and the
  stop string the first entry of `generation_kwargs.until`;
- `description` (the same for every doc, ending with `fewshot_delimiter`):
  the instruction.

Refused: `loglikelihood` and `loglikelihood_rolling` tasks, several targets
per doc, several inputs per doc (`doc_to_text` giving a choice index),
`gen_prefix`, a `fewshot_config` with its own prompt, and a description that
changes per doc.

Pool and eval docs: the pool is lm-eval's few-shot source (`fewshot_config.split`,
else `training_split`, else `validation_split`, else `test_split`), the eval set
the split lm-eval evaluates (`test_split`, else `validation_split`); `--split`
and `--eval-split` name other splits of the task's dataset. Ids are
`<split>-<doc number>` (from 0).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from pathlib import Path

from . import hf
from .errors import ConfigError, DatasetError
from .extras import require

PREFIX = "lm-eval:"
FIELD = "doc_to_text"
TEMPLATE = "{" + FIELD + "}"


def is_lmeval(task: str) -> bool:
    return task.startswith(PREFIX)


def task_name(task: str) -> str:
    name = task[len(PREFIX):].strip()
    if not name:
        raise ConfigError("--task lm-eval: needs a task name, e.g. lm-eval:arc_easy, or the `task:` of a YAML "
                          "in --include-path DIR")
    return name


@contextlib.contextmanager
def _quiet():
    """Without lm-eval's and datasets' log lines, warnings and progress bars: the library never prints."""
    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), hf._quiet():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None):
    """lm-eval's task index (scanning every YAML takes seconds, so once per include path)."""
    require("lmeval", "--task lm-eval:")
    from lm_eval.tasks import TaskManager  # optional dependency: actcache[lmeval]

    with _quiet():
        return TaskManager(include_path=include_path)


def load_task(name: str, include_path: str | None = None):
    """lm-eval's task object (a ConfigurableTask) for `name`, its dataset loaded."""
    if include_path is not None:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise DatasetError(f"--include-path {include_path} is not a directory; give the folder holding "
                               f"your lm-eval task YAMLs")
        include_path = str(p.resolve())
    tm = _manager(include_path)
    from lm_eval.api.task import ConfigurableTask  # optional dependency: actcache[lmeval]
    from lm_eval.tasks import get_task_dict  # optional dependency: actcache[lmeval]

    if name not in tm.all_tasks:
        where = f" or in {include_path}" if include_path else ""
        raise DatasetError(f"lm-eval has no task {name!r} in its registry{where}; list them with "
                           f"`lm-eval ls tasks`, or pass --include-path DIR holding a YAML with `task: {name}`")
    if name in tm.all_groups or name in tm.all_tags:
        raise DatasetError(f"lm-eval's {name!r} is a group of tasks; pass one of its tasks as lm-eval:<task>")
    try:
        with _quiet():
            tasks = get_task_dict([name], tm)
    except (ConnectionError, FileNotFoundError) as e:
        raise DatasetError(f"lm-eval task {name!r}: its dataset could not be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); run it once with network to fill the "
                           f"Hugging Face cache, or point its YAML's dataset_path at local files") from None
    except Exception as e:  # lm-eval and datasets raise their own errors for a bad YAML or a missing dataset
        raise DatasetError(f"lm-eval task {name!r} could not be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); check its YAML") from None
    task = tasks.get(name)
    if not isinstance(task, ConfigurableTask):
        raise DatasetError(f"lm-eval's {name!r} is not a single configurable task; pass one task")
    return task


def _splits(task, split: str | None, eval_split: str | None) -> tuple[tuple[str, list], tuple[str, list]]:
    """((pool split, docs), (eval split, docs)): lm-eval's own choice unless --split/--eval-split."""
    cfg = task.config
    available = sorted(task.dataset) if task.dataset is not None else []

    def named(s: str, opt: str) -> list:
        if s not in available:
            raise DatasetError(f"lm-eval task {cfg.task!r} has no split {s!r} ({opt}); its splits: {available}")
        return list(cfg.process_docs(task.dataset[s]) if cfg.process_docs is not None else task.dataset[s])

    if split is not None:
        pool = (split, named(split, "--split"))
    else:
        fs = task.fewshot_cfg.split
        name = fs or (cfg.training_split if task.has_training_docs() else
                      cfg.validation_split if task.has_validation_docs() else cfg.test_split)
        if fs is None and task.config.fewshot_config is not None and task.fewshot_cfg.samples is not None:
            name = "fewshot_config.samples"
        pool = (name, list(task.fewshot_docs()))
    if eval_split is not None:
        ev = (eval_split, named(eval_split, "--eval-split"))
    else:
        name = cfg.test_split if task.has_test_docs() else cfg.validation_split if task.has_validation_docs() else None
        if name is None:
            raise DatasetError(f"lm-eval task {cfg.task!r} has no test or validation split; pass --eval-split")
        ev = (name, list(task.eval_docs))
    if pool[0] == ev[0]:
        raise DatasetError(f"lm-eval task {cfg.task!r} draws demonstrations from the split it evaluates "
                           f"({ev[0]!r}); actcache keeps pool and eval apart: pass --split and --eval-split "
                           f"naming two splits (its splits: {available})")
    return pool, ev


def _check_prompt(task) -> None:
    """Refuse what actcache's prompt layout cannot write as lm-eval does."""
    cfg, fs = task.config, task.fewshot_cfg
    name = cfg.task
    if cfg.output_type not in ("multiple_choice", "generate_until"):
        raise DatasetError(f"lm-eval task {name!r} is a {cfg.output_type} task; actcache maps multiple_choice "
                           f"(classification or multiple choice) and generate_until tasks only")
    if getattr(task, "multiple_input", 0):
        raise DatasetError(f"lm-eval task {name!r} has one input per choice (doc_to_text gives a choice index); "
                           f"actcache needs one prompt per doc")
    if cfg.gen_prefix or fs.gen_prefix:
        raise DatasetError(f"lm-eval task {name!r} sets gen_prefix, which actcache's prompts do not write; "
                           f"copy its YAML without gen_prefix and pass --include-path")
    for part in ("doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "fewshot_delimiter"):
        if getattr(fs, part) != getattr(cfg, part):
            raise DatasetError(f"lm-eval task {name!r} writes its demonstrations with another {part} "
                               f"(fewshot_config) than its query; actcache uses one prompt for both")


def _instruction(task, docs: list) -> str:
    """The task's description as actcache's instruction (which is followed by fewshot_delimiter)."""
    cfg = task.config
    texts = {task.resolve_field(d, cfg.description) or "" for d in docs}
    if len(texts) > 1:
        raise DatasetError(f"lm-eval task {cfg.task!r} has a description that changes per doc; actcache writes "
                           f"one instruction for every prompt")
    desc = texts.pop() if texts else ""
    if not desc:
        return ""
    delim = cfg.fewshot_delimiter
    if not desc.endswith(delim) or len(desc) == len(delim):
        raise DatasetError(f"lm-eval task {cfg.task!r}: its description {desc[-40:]!r} does not end with its "
                           f"fewshot_delimiter {delim!r}; end the description with it in the YAML")
    return desc[:len(desc) - len(delim)]


def _label(task, doc, choices: list, where: str) -> int:
    a = task.doc_to_target(doc)
    if isinstance(a, list):
        raise DatasetError(f"lm-eval task {task.config.task!r}: {where} has several targets {a[:3]}; actcache "
                           f"maps one target per doc")
    if isinstance(a, str):
        if a not in choices:
            raise DatasetError(f"lm-eval task {task.config.task!r}: {where}'s target {a!r} is not one of its "
                               f"choices {choices}")
        return choices.index(a)
    if not isinstance(a, int) or not 0 <= a < len(choices):
        raise DatasetError(f"lm-eval task {task.config.task!r}: {where}'s target {a!r} is not a choice index "
                           f"(0..{len(choices) - 1})")
    return a


def lmeval_task(spec) -> tuple[dict, list[dict], list[dict], dict]:
    """`--task lm-eval:NAME` as (Task keyword arguments, pool records, eval records,
    source): records in `data.Example.to_record`'s schema (see the module docstring)."""
    name = task_name(spec.task)
    task = load_task(name, spec.include_path)
    _check_prompt(task)
    (pool_split, pool_docs), (eval_split, eval_docs) = _splits(task, spec.split, spec.eval_split)
    cfg = task.config
    docs = [(pool_split, i, d) for i, d in enumerate(pool_docs)] + [(eval_split, i, d) for i, d in enumerate(eval_docs)]
    instruction = _instruction(task, [d for _, _, d in docs])
    recs = []
    with _quiet():
        for split, i, doc in docs:
            where = f"{split} doc {i}"
            text = task.doc_to_text(doc)
            if not isinstance(text, str):
                raise DatasetError(f"lm-eval task {name!r}: doc_to_text of {where} is a {type(text).__name__}, "
                                   f"not text")
            rec = {"id": f"{split}-{i}", "fields": {FIELD: text}, "label": -1, "choices": [], "answer": ""}
            if cfg.output_type == "multiple_choice":
                rec["choices"] = [str(c) for c in task.doc_to_choice(doc)]
                rec["label"] = _label(task, doc, rec["choices"], where)
            else:
                a = task.doc_to_target(doc)
                if isinstance(a, list):
                    raise DatasetError(f"lm-eval task {name!r}: {where} has several targets {a[:3]}; actcache "
                                       f"maps one answer per doc")
                rec["answer"] = str(a)
            recs.append(rec)
    td, fd = cfg.target_delimiter, cfg.fewshot_delimiter
    kw = dict(name=f"lm-eval:{name}", template=TEMPLATE, instruction=instruction, target_delimiter=td,
              fewshot_delimiter=fd, description=f"lm-eval task {name}")
    if cfg.output_type == "generate_until":
        until = list((cfg.generation_kwargs or {}).get("until") or [fd])
        kw.update(kind="generation", stop=str(until[0]))
    elif len({tuple(r["choices"]) for r in recs}) == 1:  # the same choices for every doc: classes
        kw.update(kind="classification", label_words=tuple(td + c for c in recs[0]["choices"]))
        for r in recs:
            r["choices"] = []
    else:
        kw.update(kind="multiple_choice")
    n = len(pool_docs)
    return kw, recs[:n], recs[n:], _source(task, name, spec.include_path, pool_split, eval_split)


def _source(task, name: str, include_path, pool_split: str, eval_split: str) -> dict:
    import lm_eval  # optional dependency, present once a task loaded

    cfg = task.config
    fps = {}
    for s in (pool_split, eval_split):
        d = task.dataset.get(s) if task.dataset is not None and hasattr(task.dataset, "get") else None
        if getattr(d, "_fingerprint", None):
            fps[s] = d._fingerprint
    kwargs = cfg.dataset_kwargs or {}
    return {"lm-eval": name, "lm_eval_version": getattr(lm_eval, "__version__", None),
            "include_path": str(Path(include_path).expanduser().resolve()) if include_path else None,
            "config": json.loads(json.dumps(task.dump_config(), default=str)),
            "dataset_path": cfg.dataset_path, "dataset_name": cfg.dataset_name,
            "revision": kwargs.get("revision"), "split": pool_split, "eval_split": eval_split,
            "until": list((cfg.generation_kwargs or {}).get("until") or []) or None,
            "fingerprints": fps}
