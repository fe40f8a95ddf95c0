"""The `actcache` command line. Thin: parse options, build a config, call one
library function, report. Heavy imports happen inside the commands so that
`actcache --help` stays fast. Library errors become one line and an exit code.

Defaults live in the library's config dataclasses. An option either reads its
default from the dataclass (the light ones: ModelSpec, DataSpec, EvalConfig,
RunConfig, imported here) or, for the configs of heavy modules (BuildConfig,
QueryConfig), repeats it and tests/test_cli_defaults.py checks that they agree.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import List, Literal, Optional

import typer

from actcache.capture import COMPONENTS, SPANS, STATS, STORE_DTYPES, pooling_names
from actcache.config import DEFAULT_STRATEGIES, MASKS, VERSION
from actcache.data import DataSpec
from actcache.models import DEVICES, DTYPE_CHOICES, ModelSpec
from actcache.pipeline import EvalConfig, RunConfig

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=True, no_args_is_help=True, context_settings=CONTEXT,
                  help="Cache language-model activations once; query and evaluate them many times.")

# What the global --quiet / --verbose asked for (set once per invocation by `main_options`).
OUTPUT = {"quiet": False, "verbose": False}
ENGINES = ("local", "ray")
# Fixed sets of values, listed in --help and checked while parsing (a usage error,
# exit 2, before any work), each read from the library's own list.
Device = Literal[DEVICES]
Dtype = Literal[DTYPE_CHOICES]
Component = Literal[COMPONENTS]
Mask = Literal[MASKS]
Engine = Literal[ENGINES]
Span = Literal[SPANS]
StoreDtype = Literal[STORE_DTYPES]
Stat = Literal[STATS]


def _each_of(values, what: str):
    """A callback checking every entry of a comma-separated option against `values`."""
    def check(s: Optional[str]) -> Optional[str]:
        bad = [x for x in _split(s) if x not in values]
        if bad:
            raise typer.BadParameter(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(values)}")
        return s

    return check


def _strategy_names() -> tuple:
    # The registry imports torch (its strategies score prompts): read only when a
    # strategy is named, so --help and every other command stay fast.
    from actcache.select import STRATEGIES as REGISTRY

    return tuple(REGISTRY)


def _check_strategies(s: Optional[str]) -> Optional[str]:
    """--strategies / --strategy: each name a registered strategy (checked before any work)."""
    if s:
        names = _strategy_names()
        bad = [x for x in _split(s) if x not in names]
        if bad:
            raise typer.BadParameter(f"unknown strategy {', '.join(map(repr, bad))}; registered: {', '.join(names)}")
    return s


# Options shared by several commands, declared once.
STORE = typer.Option(None, "--store", envvar="ACTCACHE_HOME", help="Store root (default ~/.cache/actcache).")
DTYPE = typer.Option(ModelSpec.dtype, help="auto: bfloat16 where the CPU/GPU runs it natively, else float32.")
DEVICE_HELP = "Where the model runs; auto: cuda, else mps, else cpu."
DEVICE = typer.Option(ModelSpec.device, help=DEVICE_HELP)
DATA_DIR = typer.Option(None, "--data-dir", envvar="ACTCACHE_DATA_DIR",
                        help="Folder holding the benchmark folders (sst2/, boolq/, ...).")
SEEDS = typer.Option(",".join(map(str, EvalConfig.seeds)), help="Seeds for the selection experiment, comma-separated integers.")
STRATEGIES = typer.Option(None, callback=_check_strategies,
                          help=f"Selection strategies, comma-separated (default: {', '.join(DEFAULT_STRATEGIES)}); "
                               f"other registered strategies on request (an unknown name lists them).")
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout (and nothing else there).")
OUT_DIR = typer.Option(EvalConfig.out, help="Output directory for report.md, CSVs and plots.")


def _split(s: Optional[str]) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip()) if s else ()


def _ints(s: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _split(s))
    except ValueError:
        from actcache.errors import ConfigError

        # A ConfigError, so handle_errors prints one line (typer's usage box is many).
        raise ConfigError(f"{flag} {s!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def _words(s: Optional[str]) -> tuple:
    # Label words follow "Sentiment:" and so start with a space: "negative,positive"
    # -> (" negative", " positive").
    return tuple(" " + w.strip() for w in s.split(",") if w.strip()) if s else ()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"actcache {VERSION}")
        raise typer.Exit()


class _Lines(logging.Handler):
    """actcache's log records as plain stderr lines ('[12:00:01] loading model ...')."""

    def emit(self, record: logging.LogRecord) -> None:
        import time  # stdlib, kept beside its one use like _plain_progress's

        try:
            typer.echo(f"[{time.strftime('%H:%M:%S', time.localtime(record.created))}] {record.getMessage()}",
                       err=True)
        except Exception:  # noqa: BLE001 - a log line must never end a command
            self.handleError(record)


def _setup_output(quiet: bool, verbose: bool):
    """--quiet: no progress and no info lines; --verbose: library and model-loading
    log records (transformers', huggingface_hub's too, with their download bars).
    Returns a function that puts the loggers back as they were."""
    from actcache.errors import ConfigError

    if quiet and verbose:
        raise ConfigError("give --quiet or --verbose, not both")
    OUTPUT.update(quiet=quiet, verbose=verbose)
    names = ("actcache", *(("transformers", "huggingface_hub") if verbose else ()))
    saved = [(lg, lg.level, lg.propagate) for lg in map(logging.getLogger, names)]
    handler = _Lines()
    for lg, _, _ in saved:
        lg.addHandler(handler)
        lg.propagate = False
    saved[0][0].setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for lg, _, _ in saved[1:]:
        lg.setLevel(logging.INFO)

    def restore() -> None:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        OUTPUT.update(quiet=False, verbose=False)

    return restore


def info_line(msg: str, err: bool = True) -> None:
    """A line about what happened (not a result); --quiet drops it."""
    if not OUTPUT["quiet"]:
        typer.echo(msg, err=err)


@app.callback()
def main_options(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no info lines (results and "
                                                            "errors only)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log what the library does: model "
                                                                "download, load and conversion, with "
                                                                "transformers' own messages."),
):
    """Cache language-model activations once; query and evaluate them many times."""
    from actcache.errors import ConfigError

    try:
        ctx.call_on_close(_setup_output(quiet, verbose))
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(e.exit_code)


def handle_errors(fn):
    """Turn actcache errors into one stderr line and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from actcache.errors import EXIT_INTERRUPTED, ActcacheError

        try:
            return fn(*args, **kwargs)
        except ActcacheError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", fg="yellow", err=True)
            raise typer.Exit(EXIT_INTERRUPTED)

    return wrapper


def _plain_progress(interval: float):
    """A (desc, done, total) callback for logs: one plain stderr line per step at
    its start and end, and at most one every `interval` seconds in between."""
    import time

    state: dict = {}

    def cb(desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        st = state.setdefault(desc, {"t0": now, "last": None, "ended": False})
        end = total > 0 and done >= total
        due = st["last"] is None or now - st["last"] >= interval
        if st["ended"] or not (end or due):
            return
        el = now - st["t0"]
        rate = done / el if el > 0 else 0.0
        eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and not end else ""
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        typer.echo(f"[{time.strftime('%H:%M:%S')}] {desc}: {done}/{total}{pct}, {el:.0f} s elapsed, "
                   f"{rate:.2f}/s{eta}", err=True)
        st["last"], st["ended"] = now, end

    return cb


@contextmanager
def progress_bar():
    """A rich progress bar fed by the library's (desc, done, total) callback; when
    stderr is no terminal (nohup, batch jobs, CI) plain lines every ~15 s instead
    ($ACTCACHE_PROGRESS_INTERVAL seconds; ACTCACHE_PROGRESS=1 forces the bar,
    ACTCACHE_PROGRESS=0 or --quiet shows none)."""
    if OUTPUT["quiet"] or os.environ.get("ACTCACHE_PROGRESS") == "0":
        yield lambda desc, done, total: None
        return
    if not sys.stderr.isatty() and os.environ.get("ACTCACHE_PROGRESS") != "1":
        yield _plain_progress(float(os.environ.get("ACTCACHE_PROGRESS_INTERVAL", "15")))
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    tasks = {}
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
                  console=Console(stderr=True)) as bar:
        def cb(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = bar.add_task(desc, total=total)
            bar.update(tasks[desc], completed=done, total=total)

        yield cb


def data_options(task, data, data_dir, text_field, label_field, label_values, label_words, template,
                 split_field, id_field, limit, eval_limit, seed, split=None, eval_split=None, data_revision=None,
                 include_path=None):
    return DataSpec(task=task, path=data, data_dir=data_dir, text_fields=_split(text_field),
                    label_field=label_field, label_values=_split(label_values),
                    label_words=_words(label_words), template=template.replace("\\n", "\n") if template else None,
                    split_field=split_field, id_field=id_field, pool_limit=limit,
                    eval_limit=eval_limit if eval_limit is not None else limit, seed=seed,
                    split=split, eval_split=eval_split, revision=data_revision, include_path=include_path)


ENGINE = typer.Option("local", help="local (this process), or ray: the forward passes on a Ray cluster "
                                    "(pip install 'actcache[ray]'); the same store, bit for bit.")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="A running Ray cluster ('auto' or ray://host:10001); "
                                                         "default: start a local one sized to this machine.")
WORKERS = typer.Option(None, help="--engine ray: actors (default: one per GPU, else one per --cpus-per-worker).")
CPUS_PER_WORKER = typer.Option(1, help="--engine ray: cores (and threads) per actor.")
GPUS_PER_WORKER = typer.Option(0.0, help="--engine ray: GPUs per actor (1 gives each actor a GPU).")


def _remote(engine: str, address, workers, cpus: int, gpus: float):
    """The remote engine of --engine (None for local); ConfigError for an unknown one."""
    if engine == "local":
        return None
    if engine != "ray":
        from actcache.errors import ConfigError

        raise ConfigError(f"--engine must be local or ray, not {engine!r}")
    from actcache.cluster import RayEngine

    return RayEngine(address=address, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)


@app.command()
@handle_errors
def build(
    model: str = typer.Option(ModelSpec.model, help="Hugging Face id, local directory, .gguf file, or the packaged default."),
    revision: Optional[str] = typer.Option(None, help="Model revision (hub branch, tag or commit)."),
    dtype: Dtype = DTYPE,
    device: Device = DEVICE,
    model_config: Optional[str] = typer.Option(None, help="Benchmarks only: build llama-3.2-3b, qwen2.5-3b or a "
                                                          "config.json's architecture with random weights instead "
                                                          "of loading --model (evaluate refuses such a build)."),
    init_seed: int = typer.Option(ModelSpec.init_seed, help="Torch seed of the random weights of --model-config."),
    task: str = typer.Option(DataSpec.task, help="Named task: rotten_tomatoes, sst2, agnews, rte, boolq, arc_challenge, "
                                                 "openbookqa, gsm8k; or hf:<dataset>[:<config>], a Hugging Face dataset "
                                                 "(hub id, local parquet/JSON/CSV files, or a save_to_disk directory); "
                                                 "or lm-eval:<task>, a task of lm-evaluation-harness 0.4.13 with "
                                                 "its prompts and docs (pip install 'actcache\\[lmeval]')."),
    include_path: Optional[str] = typer.Option(None, "--include-path", help="--task lm-eval: a folder of your own "
                                                                            "lm-eval task YAMLs, searched besides "
                                                                            "lm-eval's registry."),
    data: Optional[str] = typer.Option(None, help="A local .jsonl/.csv instead of --task."),
    split: Optional[str] = typer.Option(None, help="--task hf: the pool split (default: train, or the only split); "
                                                   "--task lm-eval: the split demonstrations come from (default: "
                                                   "the task's few-shot split, else training split)."),
    eval_split: Optional[str] = typer.Option(None, help="--task hf: the eval split (default: validation, else test, "
                                                        "else a hash split of the pool split); --task lm-eval: "
                                                        "default the split lm-eval evaluates (test, else "
                                                        "validation)."),
    data_revision: Optional[str] = typer.Option(None, help="--task hf: dataset revision on the hub (branch, tag or commit)."),
    data_dir: Optional[str] = DATA_DIR,
    text_field: Optional[str] = typer.Option(None, help="Text field(s) of --data, comma-separated."),
    label_field: str = typer.Option(DataSpec.label_field, help="Label field of --data."),
    label_values: Optional[str] = typer.Option(None, help="Label values of --data in class order, comma-separated."),
    label_words: Optional[str] = typer.Option(None, help="Label words in class order, comma-separated; a leading space is added."),
    template: Optional[str] = typer.Option(None, help="Prompt template with {field} slots, e.g. 'Review: {text}\\nSentiment:'."),
    split_field: Optional[str] = typer.Option(None, help="Field of --data naming the split (eval/test/dev vs pool)."),
    id_field: Optional[str] = typer.Option(None, help="Field of --data holding example ids."),
    limit: Optional[int] = typer.Option(None, help="At most this many pool (and eval) examples, seeded."),
    eval_limit: Optional[int] = typer.Option(None, help="At most this many eval examples (default: --limit)."),
    seed: int = typer.Option(DataSpec.seed, help="Seed for subsampling."),
    layers: str = typer.Option("all", help="'all', '0,6,-1' or a slice '2:10'."),
    components: str = typer.Option(",".join(COMPONENTS), callback=_each_of(COMPONENTS, "component"),
                                   help=f"Any of {', '.join(COMPONENTS)}, comma-separated."),
    pooling: str = typer.Option("mean,last", callback=_each_of(pooling_names(), "pooling"),
                                help=f"Any of {', '.join(pooling_names())}, comma-separated."),
    masks: str = typer.Option(",".join(MASKS), callback=_each_of(MASKS, "mask"),
                              help=f"Masking strategies, any of {', '.join(MASKS)} (see README)."),
    span: Span = typer.Option("full", help="Pool over 'full' (input plus label) or 'input' only."),
    max_length: int = typer.Option(384, help="Maximum tokens per sequence; longer inputs lose their start, recorded per example."),
    batch_size: int = typer.Option(16, help="Examples per forward batch."),
    batch_tokens: Optional[int] = typer.Option(None, help="Instead of --batch-size rows: as many length-sorted "
                                                          "rows as fit this many padded tokens per forward batch "
                                                          "(fills a GPU; part of the build key)."),
    store_dtype: StoreDtype = typer.Option("float16", help="The dtype stored activations are kept in."),
    context_k: int = typer.Option(4, help="Demonstrations in the in-context mask's prefix; with fewer than "
                                          "the task's labels, the mask is the mean over label rotations."),
    context_seed: int = typer.Option(0, help="Seed of the in-context prefix (its demonstrations and which "
                                             "label leads; rotations use this seed and the next ones)."),
    index: Optional[str] = typer.Option(None, help="Build every array's FAISS index now: flat (exact cosine), ivf, "
                                                   "hnsw, or a FAISS factory string. Default: none now; each index "
                                                   "is built on first use (flat) and kept."),
    sae: Optional[str] = typer.Option(None, "--sae", help="SAE directories (SAELens / Gemma Scope layout), "
                                                          "comma-separated: their features are pooled and stored "
                                                          "sparse; adding one to a finished build runs only it."),
    store: Optional[str] = STORE,
    as_json: bool = JSON,
    engine: Engine = ENGINE,
    ray_address: Optional[str] = RAY_ADDRESS,
    workers: Optional[int] = WORKERS,
    cpus_per_worker: int = CPUS_PER_WORKER,
    gpus_per_worker: float = GPUS_PER_WORKER,
):
    """Run the model over the dataset once; cache pooled activations and statistics (FAISS indexes on first use)."""
    import actcache
    from actcache.builder import BuildConfig

    cfg = BuildConfig(
        model=ModelSpec(model, revision, dtype, device, _config_path(model_config), init_seed),
        data=data_options(task, data, data_dir, text_field, label_field, label_values, label_words,
                          template, split_field, id_field, limit, eval_limit, seed, split, eval_split,
                          data_revision, include_path),
        layers=layers, components=_split(components), poolings=_split(pooling), masks=_split(masks),
        span=span, max_length=max_length, batch_size=batch_size, batch_tokens=batch_tokens, store_dtype=store_dtype,
        context_k=context_k, context_seed=context_seed, index=index, saes=_split(sae), home=store)
    remote = _remote(engine, ray_address, workers, cpus_per_worker, gpus_per_worker)
    with progress_bar() as cb:
        st = actcache.build(cfg, progress=cb, remote=remote)
    r = st.report
    if as_json:
        typer.echo(json.dumps(r))
        return
    if r["cache_hit"]:
        typer.echo(f"cache hit: 0 forward passes; {len(r['reused'])} arrays reused")
    else:
        typer.echo(f"computed {len(r['computed'])} arrays in {r['forward_batches']} forward batches, "
                   f"reused {len(r['reused'])}, built {r['indexes_built']} indexes ({r['seconds']} s)")
    typer.echo(f"key  {r['key']}\npath {r['path']}\n{hardware_line(r['dtype'], r['dtype_requested'], r['hardware'])}")
    if r["built_on"] and r["built_on"] != r["hardware"]["class"]:
        typer.echo(f"note: this build's arrays were computed on {r['built_on']}, not on this machine's "
                   f"{r['hardware']['class']}")


def _config_path(name: Optional[str]) -> Optional[str]:
    """A --model-config path made absolute (a later query may run elsewhere); shape names as given."""
    if name and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def hardware_line(dtype: str, requested: str, hw: dict) -> str:
    """'dtype bfloat16 (auto) on cpu-AVX512-amx, Intel Xeon ..., 2 threads'."""
    how = "auto" if requested == "auto" else "as asked"
    return (f"dtype {dtype} ({how}) on {hw.get('class')}, {hw.get('device_name')}, "
            f"{hw.get('threads')} threads")


@app.command("ls")
@handle_errors
def ls_cmd(store: Optional[str] = STORE, as_json: bool = JSON):
    """List builds in the store with their size on disk (reads only; `actcache gc` cleans up)."""
    from actcache.admin import build_usage, human
    from actcache.store import list_builds

    rows = list_builds(store)
    sizes = {u["key"]: u["bytes"] for u in build_usage(store)}
    for r in rows:
        r["bytes"] = sizes.get(r["key"], 0)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k not in ("provenance", "config")} for r in rows]))
        return
    if not rows:
        typer.echo("no builds yet; run `actcache build`")
    for r in rows:
        size = f"{human(r['bytes']):>6}"
        if not r["status"].startswith("done"):
            typer.echo(f"{r['key'][:16]}  {size}  {r['status']}" + (f": {r['error']}" if r.get("error") else ""))
            continue
        typer.echo(f"{r['key'][:16]}  {size}  {r['task']:<16} {r['model']:<24} pool={r['n_pool']:<6} "
                   f"eval={r['n_eval']:<6} layers={len(r['layers'])} arrays={r['n_arrays']}"
                   + ("" if r["status"] == "done" else f"  ({r['status']})"))
    if rows:
        typer.echo(f"{len(rows)} build{'s' * (len(rows) != 1)}, {human(sum(r['bytes'] for r in rows))} in total")


KEY = typer.Argument("last", help="Build key, unique prefix, or 'last' (the most recently finished build).")


@app.command()
@handle_errors
def verify(key: Optional[str] = typer.Argument(None, help="Build key, unique prefix or 'last' (default: last)."),
           all_: bool = typer.Option(False, "--all", help="Verify every build in the store."),
           repair: bool = typer.Option(False, "--repair", help="Rebuild damaged or missing indexes; delete damaged "
                                                               "derived files and leftovers (recomputed on use)."),
           store: Optional[str] = STORE,
           as_json: bool = JSON):
    """Check every array (checksums), index and cached file of a build; optionally repair what can be derived."""
    from dataclasses import asdict

    from actcache.errors import EXIT_PROBLEMS, ConfigError
    from actcache.store import build_dirs, find_build, verify as check

    if key and all_:
        raise ConfigError("give a build key or --all (not both)")
    if all_:
        dirs = build_dirs(store)
    else:
        dirs = [find_build(key or "last", store)]  # without opening: a damaged build is what verify reports
    bad, reports = 0, []
    for d in dirs:
        rep = check(d, repair=repair)
        bad += not rep.ok
        reports.append({"key": rep.key, "ok": rep.ok, "checked": rep.checked,
                        "findings": [asdict(f) for f in rep.findings]})
        if as_json:
            continue
        for f in rep.findings:
            typer.echo(f"{rep.key[:16]}  {'repaired' if f.repaired else f.what + ' damaged'}: {f.message}")
        typer.echo(f"{rep.key[:16]}  {'ok' if rep.ok else 'NOT ok'}: {rep.checked} items checked, "
                   f"{len(rep.findings)} problems, {sum(f.repaired for f in rep.findings)} repaired")
    if as_json:
        typer.echo(json.dumps({"ok": not bad, "builds": reports}))
    if bad:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command()
@handle_errors
def info(key: str = KEY, store: Optional[str] = STORE,
         as_json: bool = typer.Option(False, "--json", help="One line of JSON (the default is the same "
                                                            "document, indented).")):
    """Show one build: sizes, arrays and full provenance (JSON)."""
    from actcache.admin import disk_usage
    from actcache.store import Store

    st = Store.open(key, store)
    doc = {**st.info(), "bytes": disk_usage(st.dir)}
    typer.echo(json.dumps(doc, default=str) if as_json else json.dumps(doc, indent=2, default=str))


def _plan_out(plan, act: bool, as_json: bool, what: str) -> None:
    """Print a removal plan (dry run) or carry it out (--yes), one line per path."""
    from actcache.admin import human, remove

    total = sum(r.bytes for r in plan)
    freed = remove(plan) if act else 0
    if as_json:
        typer.echo(json.dumps({"removed" if act else "would_remove": [r.to_dict() for r in plan],
                               "bytes": total, "dry_run": not act}))
        return
    verb = "removed" if act else "would remove"
    for r in plan:
        typer.echo(f"{verb}  {human(r.bytes):>6}  {r.path}  ({r.reason})")
    if not plan:
        typer.echo(f"nothing to remove ({what})")
    elif act:
        typer.echo(f"freed {human(freed)} in {len(plan)} path{'s' * (len(plan) != 1)}")
    else:
        typer.echo(f"{human(total)} in {len(plan)} path{'s' * (len(plan) != 1)} would be removed; "
                   f"add --yes to remove {'it' if len(plan) == 1 else 'them'}")


YES = typer.Option(False, "--yes", "-y", help="Remove; without it, only print what would be removed (dry run).")


@app.command("rm")
@handle_errors
def rm_cmd(keys: List[str] = typer.Argument(..., help="Build keys, unique prefixes, or 'last'."),
           yes: bool = YES, store: Optional[str] = STORE, as_json: bool = JSON):
    """Remove builds and everything derived from them (indexes, query activations, quality matrices, embeddings)."""
    from actcache.admin import plan_rm

    _plan_out(plan_rm(keys, store), yes, as_json, "no such builds")


@app.command()
@handle_errors
def gc(older_than: Optional[str] = typer.Option(None, "--older-than", help="Also remove builds unused for this "
                                                "long: 30d, 12h, 2w, 90m (a plain number is days)."),
       max_size: Optional[str] = typer.Option(None, "--max-size", help="Also remove least-recently-used builds "
                                              "until the builds left take at most this much: 500M, 10G."),
       yes: bool = YES, store: Optional[str] = STORE, as_json: bool = JSON):
    """Remove leftovers, and with --older-than / --max-size old or least-recently-used builds.

    Leftovers: temp files of writers no longer running, resume data of finished
    work, build folders holding neither a build nor resume data."""
    from actcache.admin import parse_age, parse_size, plan_gc

    plan = plan_gc(store, None if older_than is None else parse_age(older_than),
                   None if max_size is None else parse_size(max_size))
    _plan_out(plan, yes, as_json, "the store is clean")


def main() -> None:  # pragma: no cover
    app()


def _search_options(label, ids, exclude_id, min_score, offset, fields, other: str | None) -> dict:
    """The QueryConfig search options of `query`'s flags; refused with `other` (--strategy)."""
    given = [n for n, v in (("--label", bool(label)), ("--id", bool(ids)), ("--exclude-id", bool(exclude_id)),
                            ("--min-score", min_score is not None), ("--offset", offset != 0),
                            ("--fields", fields is not None)) if v]
    if given and other:
        from actcache.errors import ConfigError

        raise ConfigError(f"{', '.join(given)} apply to a local neighbour query only; drop them, or {other}")
    return dict(labels=label or None, ids=ids or None, exclude_ids=tuple(exclude_id or ()), min_score=min_score,
                offset=offset, fields=None if fields is None else tuple(f.strip() for f in fields.split(",")))


def _ask_server(c, key: str, sel: dict | None, input_: str | None, opts: dict) -> list[dict]:
    """`query --server`: the records of a strategy (`sel`), or of the eval rows or `input_`'s inputs."""
    if sel is not None:
        return c.select(key, sel.pop("strategy"), **sel)
    if input_ is None:
        return c.neighbors(key, **opts)
    from actcache.query import read_source

    raw, is_jsonl, _ = read_source(input_)
    if is_jsonl:  # raw lines: the server parses them as the local command does
        return c.neighbors(key, jsonl=raw, source=input_, **opts)
    return c.neighbors(key, texts=[ln for ln in raw if ln.strip()], source=input_, **opts)


@app.command("query")
@handle_errors
def query_cmd(
    key: str = KEY,
    component: Component = typer.Option("mlp", help="Component of the array searched."),
    layer: int = typer.Option(-1, help="Model layer; negatives count from the end of the build's layers."),
    pooling: str = typer.Option("mean", help=f"Pooling of the array searched: {', '.join(pooling_names())}; "
                                             f"of SAE features (--strategy sae-*): mean or max."),
    mask: Mask = typer.Option("label-masked", help="Mask of the array searched."),
    k: Optional[int] = typer.Option(None, "--k", help="Neighbours per input (default 4; per class with --balanced). "
                                                      "With --strategy vote-k: graph degree (default min(150, pool - 1)); "
                                                      "vote-k-lm: graph degree (default 10)."),
    balanced: bool = typer.Option(False, "--balanced", help="k neighbours from every class."),
    exclude_self: bool = typer.Option(True, "--exclude-self/--no-exclude-self",
                                      help="Drop pool items with the input's id or exact text."),
    input_: Optional[str] = typer.Option(None, "--input", help="New inputs: a text file (one per line), a JSONL "
                                                               "file, or - for stdin. Default: the build's eval rows."),
    text_field: str = typer.Option("text", help="JSONL field holding the text (one-field templates)."),
    out: Optional[str] = typer.Option(None, help="Output JSONL; - for stdout. Default neighbors.jsonl "
                                                 "(selection.jsonl with --strategy)."),
    label: Optional[List[int]] = typer.Option(None, "--label", help="Only return pool examples of this class "
                                                                    "(repeatable)."),
    ids: Optional[List[str]] = typer.Option(None, "--id", help="Only return this pool example (repeatable)."),
    exclude_id: Optional[List[str]] = typer.Option(None, "--exclude-id", help="Never return this pool example "
                                                                              "(repeatable)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop neighbours scoring below this "
                                                                        "(scores are higher-is-better)."),
    offset: int = typer.Option(0, "--offset", help="Skip this many ranked neighbours (per class with "
                                                   "--balanced); --k is the page size."),
    fields: Optional[str] = typer.Option(None, "--fields", help="Comma-separated record keys to keep, e.g. "
                                                                "test_id,neighbors."),
    strategy: Optional[str] = typer.Option(None, callback=_check_strategies,
                                           help="Run a registered selection strategy instead, e.g. "
                                                f"{', '.join(DEFAULT_STRATEGIES)} (vote-k loads the build's model "
                                                "for its confidence stage; an unknown name lists them all)."),
    budget: Optional[int] = typer.Option(None, help="Examples a subset strategy picks."),
    seed: int = typer.Option(0, help="Seed of the strategy."),
    stat: Stat = typer.Option("kurt", help="--strategy stat: the statistic to rank the pool by."),
    order: str = typer.Option("high", help="--strategy stat / sae-feature: rank 'high' or 'low' values first."),
    feature: Optional[int] = typer.Option(None, help="--strategy sae-feature: the SAE feature to rank the pool by."),
    sae: Optional[str] = typer.Option(None, "--sae", help="--strategy sae-knn / sae-feature: the SAE's key prefix "
                                                          "(default: the build's only SAE)."),
    server: Optional[str] = typer.Option(None, help="Ask a running `actcache serve` at this URL instead "
                                                    "(same records; e.g. http://127.0.0.1:8765)."),
    token: Optional[str] = typer.Option(None, envvar="ACTCACHE_TOKEN", help="Bearer token for --server."),
    device: Device = DEVICE,
    store: Optional[str] = STORE,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (records, destination, array) on "
                                                       "stdout; the records go to --out (not '-')."),
):
    """Nearest pool examples of each eval row or new text (JSONL), or a demonstration-selection strategy."""
    from actcache.query import write_jsonl

    to_stdout = out == "-"
    if as_json and to_stdout:
        from actcache.errors import ConfigError

        raise ConfigError("--json prints a summary on stdout; send the records to a file with --out PATH")
    search = _search_options(label, ids, exclude_id, min_score, offset, fields,
                             "--strategy" if strategy is not None else None)
    array = dict(component=component, layer=layer, pooling=pooling, mask=mask)
    rows = dict(balanced=balanced, exclude_self=exclude_self, text_field=text_field)
    ranking = dict(stat=stat, order=order, feature=feature, sae=sae)
    sizes = dict(budget=budget, k=k, seed=seed)
    dest = out or ("selection.jsonl" if strategy else "neighbors.jsonl")
    where = "stdout" if to_stdout else dest
    if server:
        recs, line, summary = _query_server(server, token, key, input_, strategy, sizes, array, rows, ranking,
                                            search, where)
    elif strategy is None:
        recs, line, summary = _query_knn(key, store, input_, k, device, array, rows, search, where)
    else:
        recs, line, summary = _query_strategy(key, store, input_, strategy, sizes, array, rows, ranking, where)
    write_jsonl(recs, sys.stdout if to_stdout else dest)
    if as_json:
        typer.echo(json.dumps({"summary": line, "records": len(recs), "out": dest, **summary}))
    else:
        info_line(line, err=to_stdout)


def _query_server(server, token, key, input_, strategy, sizes, array, rows, ranking, search, where):
    """`query --server`: the same records from a running `actcache serve`."""
    from actcache.client import Client

    opts = dict(**array, k=sizes["k"], **rows, **Client.search_body(search))
    sel = None if strategy is None else dict(strategy=strategy, **sizes, **array, **ranking)
    recs = _ask_server(Client(server, token), key, sel, input_, opts)
    return (recs, f"wrote {len(recs)} records to {where} (from {server})",
            dict(key=key, server=server, strategy=strategy))


def _query_knn(key, store, input_, k, device, array, rows, search, where):
    """`query` without --strategy: nearest pool examples by the build's stored vectors."""
    from actcache.query import QueryConfig, query

    cfg = QueryConfig(key=key, home=store, **array, **({} if k is None else {"k": k}), **rows,
                      source=input_ or "eval", device=device, **search)
    with progress_bar() as cb:
        recs = query(cfg, progress=cb)
    r = recs.report
    line = (f"wrote {len(recs)} records to {where} ({r['array']}, k={cfg.k}"
            f"{' per class' if rows['balanced'] else ''}; {r['forward_batches']} forward "
            f"batches{', cached activations' if r['cache_hit'] else ''})")
    return recs, line, dict(key=r.get("build_key", key), array=str(r["array"]), k=cfg.k,
                            forward_batches=r["forward_batches"], cache_hit=r["cache_hit"])


def _query_strategy(key, store, input_, strategy, sizes, array, rows, ranking, where):
    """`query --strategy`: a registered selection strategy, its options read from the registry."""
    from actcache.select import STRATEGIES, select
    from actcache.store import Store

    st = Store.open(key, store)
    wanted = {**array, **rows, "source": input_ or "eval", **ranking}
    opts = STRATEGIES[strategy].pick(wanted) if strategy in STRATEGIES else {}
    with progress_bar() as cb:
        sel = select(st, strategy, **sizes, progress=cb, **opts)
    recs = sel.to_records()
    what = f"{len(sel.per_query)} test inputs" if sel.per_query is not None else f"{len(sel.ids)} pool ids"
    fb = sel.params.get("forward_batches", 0)
    line = f"wrote {len(recs)} records ({what}, strategy {strategy}) to {where}; {fb} forward batches"
    return recs, line, dict(key=st.key, strategy=strategy, forward_batches=fb)


@app.command()
@handle_errors
def evaluate(
    key: str = typer.Argument("last", help="Build key, unique prefix, or 'last'."),
    n_candidates: int = typer.Option(EvalConfig.n_candidates, help="Pool candidates in the 1-shot quality matrix."),
    n_probes: int = typer.Option(EvalConfig.n_probes, help="Eval probes in the quality matrix."),
    n_eval: int = typer.Option(EvalConfig.n_eval, help="Eval inputs in the selection experiment."),
    k: int = typer.Option(EvalConfig.k, help="Demonstrations per prompt in the selection experiment."),
    seeds: str = SEEDS,
    strategies: Optional[str] = STRATEGIES,
    knn_layers: str = typer.Option(EvalConfig.knn_layers, help="Layers for knn ('auto' = first, middle, last)."),
    knn_order: str = typer.Option(EvalConfig.knn_order, help="Order of retrieved demonstrations: similar-last (KATE: "
                                                       "most similar nearest the query), similar-first, shuffle."),
    votek_budget: int = typer.Option(EvalConfig.votek_budget, help="vote-k and vote-k-lm annotation set size; each input retrieves --k from it."),
    turns: str = typer.Option(EvalConfig.turns, help="Subset strategies: labels take turns (on), not (off), or "
                                                     "both. Balanced random (random+turns), the baseline, always runs."),
    quality: str = typer.Option(EvalConfig.quality, help="Pair score: margin (gold log-prob margin) or correct."),
    quality_def: str = typer.Option(EvalConfig.quality_def, help="Candidate quality: balanced (probe classes "
                                    "equally, relative to same-label candidates) or mean."),
    confirm_fraction: float = typer.Option(EvalConfig.confirm_fraction, help="Share of candidates in the "
                                           "confirmation half (probes are split evenly)."),
    dtype: Dtype = DTYPE,
    device: Device = typer.Option(EvalConfig.device, help=DEVICE_HELP),
    n_boot: int = typer.Option(EvalConfig.n_boot, help="Bootstrap resamples for CIs."),
    sae_min_active: int = typer.Option(EvalConfig.sae_min_active, help="An SAE feature enters the study when "
                                                                       "active in at least this many candidates."),
    allow_overlap: bool = typer.Option(EvalConfig.allow_overlap, "--allow-overlap/--no-allow-overlap",
                                       help="Run the SAE study even where an SAE trained on the text of candidates "
                                            "or probes (reported); by default that is refused."),
    batch_size: int = typer.Option(EvalConfig.batch_size, help="Prompts per forward batch."),
    max_length: int = typer.Option(EvalConfig.max_length, help="Longest prompt; longer ones drop demonstrations (reported)."),
    demos: Optional[str] = typer.Option(None, help="A query JSONL (from `actcache query`) evaluated as one more strategy."),
    out: str = OUT_DIR,
    store: Optional[str] = STORE,
    engine: Engine = ENGINE,
    ray_address: Optional[str] = RAY_ADDRESS,
    workers: Optional[int] = WORKERS,
    cpus_per_worker: int = CPUS_PER_WORKER,
    gpus_per_worker: float = GPUS_PER_WORKER,
    as_json: bool = JSON,
):
    """Score ICL on a build: quality matrix, correlation study (raw and label-controlled), selection experiment."""
    from actcache.pipeline import evaluate as run_eval, resolve_key

    seed_list = _ints(seeds, "--seeds")  # options are checked before anything is opened
    cfg = EvalConfig(key=resolve_key(key, store), home=store, n_candidates=n_candidates, n_probes=n_probes,
                     n_eval=n_eval, k=k, seeds=seed_list,
                     **({"strategies": _split(strategies)} if strategies else {}), knn_layers=knn_layers, knn_order=knn_order,
                     votek_budget=votek_budget, turns=turns, quality=quality,
                     quality_def=quality_def, confirm_fraction=confirm_fraction, dtype=dtype, device=device,
                     n_boot=n_boot, sae_min_active=sae_min_active,
                     allow_overlap=allow_overlap,
                     batch_size=batch_size, max_length=max_length, demos=demos, out=out)
    remote = _remote(engine, ray_address, workers, cpus_per_worker, gpus_per_worker)
    with progress_bar() as cb:
        res = run_eval(cfg, progress=cb, remote=remote)
    _print_results(res, as_json)


def _print_results(res, as_json: bool = False, extra: dict | None = None) -> None:
    """The result table and summary of an `EvalResult` (with `as_json`, one JSON summary)."""
    from rich.console import Console
    from rich.table import Table

    from actcache.report import hardware_lines, headline, summary_lines

    if as_json:
        head, *rows = headline(res)
        typer.echo(json.dumps({**(extra or {}), "task": res.task, "build_key": res.build_key, "report": f"{res.out}/report.md",
                               "results": f"{res.out}/results.json", "seconds": res.seconds,
                               "sizes": {k: v for k, v in vars(res.sizes).items() if k != "seeds"},
                               "table": [dict(zip(head, r)) for r in rows], "summary": summary_lines(res)},
                              default=str))
        return

    sz = res.sizes
    t = Table(title=f"{res.task}: zero-shot vs {sz.k}-shot accuracy on {sz.n_eval} eval inputs "
                    f"({sz.n_candidates} candidates x {sz.n_probes} probes in the study)")
    head, *rows = headline(res)
    for h in head:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    con = Console()
    con.print(t)
    for line in summary_lines(res) + [h[2:] for h in hardware_lines(res.hardware)]:
        con.print(line, markup=False, highlight=False)
    con.print(f"report: {res.out}/report.md  plots: {res.out}/*.png  ({res.seconds} s)")


@app.command()
@handle_errors
def run(
    preset: str = typer.Option(..., help="A study preset, e.g. paper-boolq-llama (see `actcache presets`)."),
    model: Optional[str] = typer.Option(None, help="Override the preset's model (e.g. gemma-3-270m here)."),
    dtype: Dtype = DTYPE,
    device: Device = typer.Option(RunConfig.device, help=DEVICE_HELP),
    data_dir: Optional[str] = DATA_DIR,
    limit: Optional[int] = typer.Option(None, help="Pool size cap (default: the preset's candidates)."),
    eval_limit: Optional[int] = typer.Option(None, help="Eval size cap."),
    n_candidates: Optional[int] = typer.Option(None, help="Override the preset's candidate count."),
    n_probes: Optional[int] = typer.Option(None, help="Override the preset's probe count."),
    n_eval: int = typer.Option(RunConfig.n_eval, help="Eval inputs in the selection experiment."),
    context_seed: Optional[int] = typer.Option(None, help="Override the preset's in-context seed (the build's "
                                                          "--context-seed)."),
    strategies: Optional[str] = STRATEGIES,
    seeds: str = SEEDS,
    out: str = OUT_DIR,
    store: Optional[str] = STORE,
    as_json: bool = JSON,
):
    """Build, query and evaluate one study preset end to end."""
    from actcache.pipeline import run as run_preset

    cfg = RunConfig(preset=preset, model=model, dtype=dtype, device=device, data_dir=data_dir, limit=limit,
                    eval_limit=eval_limit, n_candidates=n_candidates, n_probes=n_probes, n_eval=n_eval,
                    context_seed=context_seed,
                    **({"strategies": _split(strategies)} if strategies else {}),
                    seeds=_ints(seeds, "--seeds"), out=out, home=store)
    with progress_bar() as cb:
        r = run_preset(cfg, progress=cb)
    if as_json:
        _print_results(r.results, True, {"build": {k: r.build.get(k) for k in ("key", "forward_batches", "cache_hit")},
                                         "neighbors": r.neighbors})
        return
    typer.echo(f"build {r.build['key'][:16]}: {r.build['forward_batches']} forward batches "
               f"({'cache hit' if r.build['cache_hit'] else 'computed'})")
    _print_results(r.results)


@app.command()
@handle_errors
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind; off loopback --token is required."),
    port: int = typer.Option(8765, help="TCP port."),
    token: Optional[str] = typer.Option(None, envvar="ACTCACHE_TOKEN",
                                        help="Bearer token clients must send (at least 16 characters)."),
    allow_host: list[str] = typer.Option([], "--allow-host", help="Also answer requests whose Host header names "
                                                                  "this (repeatable; '*' for any). Loopback names "
                                                                  "and --host are always allowed."),
    read_timeout: float = typer.Option(10.0, help="Seconds a client has to send each whole request; "
                                                  "slower connections are closed."),
    deadline: float = typer.Option(60.0, help="Seconds a request may take; past it the answer is 503."),
    queue: int = typer.Option(64, help="Requests that may wait per lane (lookup, model); more get 429."),
    max_ids: int = typer.Option(1024, help="Eval ids per request."),
    max_texts: int = typer.Option(256, help="New texts (or inputs, or JSONL lines) per request."),
    max_request_chars: int = typer.Option(50_000, help="Characters of new inputs per request."),
    threads: Optional[int] = typer.Option(None, help="Threads of the forward pass (default: $ACTCACHE_THREADS, "
                                                      "else every core)."),
    access_log: bool = typer.Option(False, "--access-log", help="Log one line per request to stderr (request id, "
                                                                "client, method, path, status, milliseconds)."),
    device: Device = DEVICE,
    store: Optional[str] = STORE,
):
    """Serve the store's finished builds over HTTP: neighbours and selection strategies (docs at /docs)."""
    # Idle OpenMP threads spin only briefly (~20k spins) before sleeping: spinning without
    # end starved the event loop on 2 cores (new texts 1.9 requests/s), and sleeping at
    # once (OMP_WAIT_POLICY=PASSIVE) made every forward 40% slower (10 vs 16 requests/s).
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    import logging

    from actcache.serve import serve as run_server
    from actcache.service import ServeLimits

    if access_log:
        log = logging.getLogger("actcache.serve.access")
        log.setLevel(logging.INFO)
        log.addHandler(logging.StreamHandler(sys.stderr))
    limits = ServeLimits(max_ids=max_ids, max_texts=max_texts, max_request_chars=max_request_chars, queue=queue,
                         deadline_s=deadline)
    run_server(store, host, port, token, read_timeout_s=read_timeout, limits=limits, allow_hosts=tuple(allow_host),
               threads=threads, device=device,
               on_ready=lambda url: info_line(f"actcache serve on {url} (OpenAPI docs at {url}/docs); "
                                              f"Ctrl-C stops it"))


sae_app = typer.Typer(no_args_is_help=True, context_settings=CONTEXT, help="Sparse autoencoders over the model's activations.")
app.add_typer(sae_app, name="sae")


@sae_app.command("train")
@handle_errors
def sae_train(
    model: str = typer.Option("gemma-3-270m", help="Model id or path."),
    dtype: Dtype = DTYPE,
    device: Device = DEVICE,
    task: str = typer.Option("sst2", help="Train on this task's pool texts (demonstration form)."),
    text_file: Optional[str] = typer.Option(None, "--text-file", help="Or on the lines of this file."),
    data_dir: Optional[str] = DATA_DIR,
    limit: int = typer.Option(3000, help="At most this many texts (seeded)."),
    hook: str = typer.Option("mlp_out", help="resid_post, mlp_out or attn_out (Gemma Scope's names)."),
    layer: int = typer.Option(9, help="Decoder layer."),
    width: int = typer.Option(4096, help="Number of latents."),
    k: int = typer.Option(32, help="Active latents per token (TopK)."),
    epochs: int = typer.Option(10, help="Passes over the training tokens."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation and the batch order."),
    exclude_build: Optional[str] = typer.Option(None, "--exclude-build",
                                                help="Leave out every row (pool and eval) of this build (key, "
                                                     "prefix or 'last'), so its study can use the SAE."),
    store: Optional[str] = STORE,
):
    """Train a TopK SAE (eai-sparsify) on per-token activations; report held-out FVU and L0."""
    from actcache.sae import SAETrainConfig, train_sae

    cfg = SAETrainConfig(model=model, dtype=dtype, device=device, task=task, text_file=text_file, data_dir=data_dir, limit=limit,
                         hook=hook, layer=layer, width=width, k=k, epochs=epochs, seed=seed, home=store,
                         exclude_build=exclude_build)
    with progress_bar() as cb:
        _, r = train_sae(cfg, progress=cb)
    src = r["source"]
    left = (f", {src['n_excluded']:,} left out as rows of build {src['exclude_build'][:12]}"
            if "n_excluded" in src else "")
    typer.echo(f"held-out FVU {r['heldout']['fvu']:.3f}, L0 {r['heldout']['l0']:.1f} on {r['heldout']['n_tokens']:,} "
               f"tokens (train FVU {r['train']['fvu']:.3f} on {r['train']['n_tokens']:,}); {r['steps']} steps, "
               f"{r['seconds']} s; {r['texts']['train']:,} training texts{left}"
               f"\nsaved {r['path']} (key {r['key'][:16]})")


@app.command()
def presets():
    """List the study presets."""
    from actcache.pipeline import PRESETS

    for name, p in PRESETS.items():
        typer.echo(f"{name:<28} {p.model:<26} {p.task:<14} k={p.k} candidates={p.n_candidates} "
                   f"components={','.join(p.components)} layers={p.layers} masks={','.join(p.masks)}")
