"""The `actcache` command line. Thin: parse options, build a config, call one
library function, report. Heavy imports happen inside the commands so that
`actcache --help` stays fast. Library errors become one line and an exit code.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cache language-model activations once; query and evaluate them many times.")


def _split(s: Optional[str]) -> tuple:
    return tuple(x.strip() for x in s.split(",") if x.strip()) if s else ()


def _words(s: Optional[str]) -> tuple:
    # Label words follow "Sentiment:" and so start with a space: "negative,positive"
    # -> (" negative", " positive").
    return tuple(" " + w.strip() for w in s.split(",") if w.strip()) if s else ()


def handle_errors(fn):
    """Turn actcache errors into one stderr line and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from actcache.errors import ActcacheError

        try:
            return fn(*args, **kwargs)
        except ActcacheError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", fg="yellow", err=True)
            raise typer.Exit(130)

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
    ($ACTCACHE_PROGRESS_INTERVAL seconds; ACTCACHE_PROGRESS=1 forces the bar)."""
    if not sys.stderr.isatty() and os.environ.get("ACTCACHE_PROGRESS") != "1":
        yield _plain_progress(float(os.environ.get("ACTCACHE_PROGRESS_INTERVAL", "15")))
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

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
                 split_field, id_field, limit, eval_limit, seed):
    from actcache.data import DataSpec

    return DataSpec(task=task, path=data, data_dir=data_dir, text_fields=_split(text_field),
                    label_field=label_field, label_values=_split(label_values),
                    label_words=_words(label_words), template=template.replace("\\n", "\n") if template else None,
                    split_field=split_field, id_field=id_field, pool_limit=limit,
                    eval_limit=eval_limit if eval_limit is not None else limit, seed=seed)


@app.command()
@handle_errors
def build(
    model: str = typer.Option("gemma-3-270m", help="Hugging Face id, local directory, .gguf file, or the packaged default."),
    revision: Optional[str] = typer.Option(None, help="Model revision (hub branch, tag or commit)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the CPU/GPU runs it natively, else float32), "
                                           "float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps or auto."),
    task: str = typer.Option("rotten_tomatoes", help="Named task: rotten_tomatoes, sst2, agnews, rte, boolq, arc_challenge, openbookqa, gsm8k."),
    data: Optional[str] = typer.Option(None, help="A local .jsonl/.csv instead of --task."),
    data_dir: Optional[str] = typer.Option(None, envvar="ACTCACHE_DATA_DIR", help="Folder holding the benchmark folders (sst2/, boolq/, ...)."),
    text_field: Optional[str] = typer.Option(None, help="Text field(s) of --data, comma-separated."),
    label_field: str = typer.Option("label", help="Label field of --data."),
    label_values: Optional[str] = typer.Option(None, help="Label values of --data in class order, comma-separated."),
    label_words: Optional[str] = typer.Option(None, help="Label words in class order, comma-separated; a leading space is added."),
    template: Optional[str] = typer.Option(None, help="Prompt template with {field} slots, e.g. 'Review: {text}\\nSentiment:'."),
    split_field: Optional[str] = typer.Option(None, help="Field of --data naming the split (eval/test/dev vs pool)."),
    id_field: Optional[str] = typer.Option(None, help="Field of --data holding example ids."),
    limit: Optional[int] = typer.Option(None, help="At most this many pool (and eval) examples, seeded."),
    eval_limit: Optional[int] = typer.Option(None, help="At most this many eval examples (default: --limit)."),
    seed: int = typer.Option(0, help="Seed for subsampling."),
    layers: str = typer.Option("all", help="'all', '0,6,-1' or a slice '2:10'."),
    components: str = typer.Option("resid,mlp,attn", help="Any of resid, mlp, attn."),
    pooling: str = typer.Option("mean,last", help="Any of mean, last."),
    masks: str = typer.Option("isolated,in-context,label-masked,sink-masked", help="Masking strategies (see README)."),
    span: str = typer.Option("full", help="Pool over 'full' (input plus label) or 'input' only."),
    max_length: int = typer.Option(384, help="Maximum tokens per sequence; longer inputs lose their start, recorded per example."),
    batch_size: int = typer.Option(16, help="Examples per forward batch."),
    store_dtype: str = typer.Option("float16", help="float16 or float32 for stored activations."),
    context_k: int = typer.Option(4, help="Demonstrations in the in-context mask's prefix."),
    index: Optional[str] = typer.Option(None, help="Build every array's FAISS index now: flat (exact cosine), ivf, "
                                                   "hnsw, or a FAISS factory string. Default: none now; each index "
                                                   "is built on first use (flat) and kept."),
    store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root (default ~/.cache/actcache)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Run the model over the dataset once; cache pooled activations and statistics (FAISS indexes on first use)."""
    import actcache
    from actcache.builder import BuildConfig
    from actcache.models import ModelSpec

    cfg = BuildConfig(
        model=ModelSpec(model, revision, dtype, device),
        data=data_options(task, data, data_dir, text_field, label_field, label_values, label_words,
                          template, split_field, id_field, limit, eval_limit, seed),
        layers=layers, components=_split(components), poolings=_split(pooling), masks=_split(masks),
        span=span, max_length=max_length, batch_size=batch_size, store_dtype=store_dtype,
        context_k=context_k, index=index, home=store)
    with progress_bar() as cb:
        st = actcache.build(cfg, progress=cb)
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


def hardware_line(dtype: str, requested: str, hw: dict) -> str:
    """'dtype bfloat16 (auto) on cpu-AVX512-amx, Intel Xeon ..., 2 threads'."""
    how = "auto" if requested == "auto" else "as asked"
    return (f"dtype {dtype} ({how}) on {hw.get('class')}, {hw.get('device_name')}, "
            f"{hw.get('threads')} threads")


@app.command("ls")
@handle_errors
def ls_cmd(store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root."),
           as_json: bool = typer.Option(False, "--json")):
    """List builds in the store."""
    from actcache.store import list_builds

    rows = list_builds(store)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k not in ("provenance", "config")} for r in rows]))
        return
    if not rows:
        typer.echo("no builds yet; run `actcache build`")
    for r in rows:
        if r["status"] != "done":
            typer.echo(f"{r['key'][:16]}  {r['status']}")
            continue
        typer.echo(f"{r['key'][:16]}  {r['task']:<16} {r['model']:<24} pool={r['n_pool']:<6} "
                   f"eval={r['n_eval']:<6} layers={len(r['layers'])} arrays={r['n_arrays']} {r['size_mb']} MB")


@app.command()
@handle_errors
def info(key: str = typer.Argument(..., help="Build key or unique prefix."),
         store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root.")):
    """Show one build: sizes, arrays and full provenance (JSON)."""
    from actcache.store import Store

    typer.echo(json.dumps(Store.open(key, store).info(), indent=2, default=str))


def main() -> None:  # pragma: no cover
    app()


@app.command("query")
@handle_errors
def query_cmd(
    key: str = typer.Argument(..., help="Build key or unique prefix."),
    component: str = typer.Option("mlp", help="resid, mlp or attn."),
    layer: int = typer.Option(-1, help="Model layer; negatives count from the end of the build's layers."),
    pooling: str = typer.Option("mean", help="mean or last."),
    mask: str = typer.Option("label-masked", help="isolated, in-context, label-masked or sink-masked."),
    k: Optional[int] = typer.Option(None, "--k", help="Neighbours per input (default 4; per class with --balanced). "
                                                      "With --strategy vote-k: graph degree (default 10)."),
    balanced: bool = typer.Option(False, "--balanced", help="k neighbours from every class."),
    exclude_self: bool = typer.Option(True, "--exclude-self/--no-exclude-self",
                                      help="Drop pool items with the input's id or exact text."),
    input_: Optional[str] = typer.Option(None, "--input", help="New inputs: a text file (one per line), a JSONL "
                                                               "file, or - for stdin. Default: the build's eval rows."),
    text_field: str = typer.Option("text", help="JSONL field holding the text (one-field templates)."),
    out: Optional[str] = typer.Option(None, help="Output JSONL; - for stdout. Default neighbors.jsonl "
                                                 "(selection.jsonl with --strategy)."),
    strategy: Optional[str] = typer.Option(None, help="Run a selection strategy instead: random, knn, vote-k, "
                                                      "k-center, kmeans, stat, embed-knn."),
    budget: Optional[int] = typer.Option(None, help="Examples a subset strategy picks."),
    seed: int = typer.Option(0, help="Seed of the strategy."),
    stat: str = typer.Option("kurt", help="--strategy stat: mean, var, skew, kurt, max_abs, max_over_median."),
    order: str = typer.Option("high", help="--strategy stat: rank 'high' or 'low' values first."),
    store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root."),
):
    """Nearest pool examples of each eval row or new text (JSONL), or a demonstration-selection strategy."""
    import inspect

    from actcache.query import QueryConfig, query, write_jsonl

    to_stdout = out == "-"
    say = functools.partial(typer.echo, err=to_stdout)
    if strategy is None:
        cfg = QueryConfig(key=key, home=store, component=component, layer=layer, pooling=pooling, mask=mask,
                          k=4 if k is None else k, balanced=balanced, exclude_self=exclude_self,
                          source=input_ or "eval", text_field=text_field)
        with progress_bar() as cb:
            recs = query(cfg, progress=cb)
        write_jsonl(recs, sys.stdout if to_stdout else (out or "neighbors.jsonl"))
        r = recs.report
        say(f"wrote {len(recs)} records to {'stdout' if to_stdout else out or 'neighbors.jsonl'} "
            f"({r['array']}, k={cfg.k}{' per class' if balanced else ''}; {r['forward_batches']} forward "
            f"batches{', cached activations' if r['cache_hit'] else ''})")
        return
    from actcache.select import STRATEGIES, select
    from actcache.store import Store

    st = Store.open(key, store)
    wanted = {"component": component, "layer": layer, "pooling": pooling, "mask": mask, "balanced": balanced,
              "exclude_self": exclude_self, "source": input_ or "eval", "text_field": text_field,
              "stat": stat, "order": order}
    fn = STRATEGIES.get(strategy)
    opts = {n: v for n, v in wanted.items() if fn is not None and n in inspect.signature(fn).parameters}
    with progress_bar() as cb:
        sel = select(st, strategy, budget=budget, k=k, seed=seed, progress=cb, **opts)
    recs = sel.to_records()
    dest = out or "selection.jsonl"
    write_jsonl(recs, sys.stdout if to_stdout else dest)
    what = f"{len(sel.per_query)} test inputs" if sel.per_query is not None else f"{len(sel.ids)} pool ids"
    fb = sel.params.get("forward_batches", 0)
    say(f"wrote {len(recs)} records ({what}, strategy {strategy}) to {'stdout' if to_stdout else dest}; "
        f"{fb} forward batches")


@app.command()
@handle_errors
def evaluate(
    key: str = typer.Argument("last", help="Build key, unique prefix, or 'last'."),
    n_candidates: int = typer.Option(120, help="Pool candidates in the 1-shot quality matrix."),
    n_probes: int = typer.Option(40, help="Eval probes in the quality matrix."),
    n_eval: int = typer.Option(100, help="Eval inputs in the selection experiment."),
    k: int = typer.Option(4, help="Demonstrations per prompt in the selection experiment."),
    seeds: str = typer.Option("0,1,2", help="Seeds for the selection experiment."),
    strategies: str = typer.Option("random,knn,vote-k,k-center,kmeans,stat,embed-knn", help="Selection strategies."),
    knn_layers: str = typer.Option("auto", help="Layers for knn ('auto' = first, middle, last)."),
    knn_order: str = typer.Option("similar-last", help="Order of retrieved demonstrations: similar-last (KATE: "
                                                       "most similar nearest the query), similar-first, shuffle."),
    votek_budget: int = typer.Option(100, help="vote-k annotation set size; each input retrieves --k from it."),
    quality: str = typer.Option("margin", help="Pair score: margin (gold log-prob margin) or correct."),
    quality_def: str = typer.Option("mean", help="Candidate quality: mean, gain (over zero-shot) or balanced."),
    dtype: str = typer.Option("auto", help="Scoring dtype: auto (bfloat16 where the hardware runs it natively, "
                                           "else float32), float32, bfloat16 or float16."),
    n_boot: int = typer.Option(200, help="Bootstrap resamples for CIs."),
    batch_size: int = typer.Option(16, help="Prompts per forward batch."),
    max_length: int = typer.Option(2048, help="Longest prompt; longer ones drop demonstrations (reported)."),
    demos: Optional[str] = typer.Option(None, help="A query JSONL (from `actcache query`) evaluated as one more strategy."),
    out: str = typer.Option("actcache-report", help="Output directory for report.md, CSVs and plots."),
    store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root."),
):
    """Score ICL on a build: quality matrix, correlation study (raw and label-controlled), selection experiment."""
    from actcache.study import EvalConfig, evaluate as run_eval, parse_seeds, resolve_key

    cfg = EvalConfig(key=resolve_key(key, store), home=store, n_candidates=n_candidates, n_probes=n_probes,
                     n_eval=n_eval, k=k, seeds=parse_seeds(seeds),
                     strategies=_split(strategies), knn_layers=knn_layers, knn_order=knn_order,
                     votek_budget=votek_budget, quality=quality,
                     quality_def=quality_def, dtype=dtype, n_boot=n_boot, batch_size=batch_size,
                     max_length=max_length, demos=demos, out=out)
    with progress_bar() as cb:
        res = run_eval(cfg, progress=cb)
    _print_results(res)


def _print_results(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from actcache.report import hardware_lines, headline, summary_lines

    t = Table(title=f"{res['task']}: zero-shot vs {res['sizes']['k']}-shot accuracy on {res['sizes']['n_eval']} "
                    f"eval inputs ({res['sizes']['n_candidates']} candidates x {res['sizes']['n_probes']} probes "
                    f"in the study)")
    head, *rows = headline(res)
    for h in head:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    con = Console()
    con.print(t)
    for line in summary_lines(res) + [h[2:] for h in hardware_lines(res.get("hardware"))]:
        con.print(line, markup=False, highlight=False)
    con.print(f"report: {res['out']}/report.md  plots: {res['out']}/*.png  ({res['seconds']} s)")


@app.command()
@handle_errors
def run(
    preset: str = typer.Option(..., help="A study preset, e.g. paper-boolq-llama (see `actcache presets`)."),
    model: Optional[str] = typer.Option(None, help="Override the preset's model (e.g. gemma-3-270m here)."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    data_dir: Optional[str] = typer.Option(None, envvar="ACTCACHE_DATA_DIR", help="Folder holding the benchmarks."),
    limit: Optional[int] = typer.Option(None, help="Pool size cap (default: the preset's candidates)."),
    eval_limit: Optional[int] = typer.Option(None, help="Eval size cap."),
    n_candidates: Optional[int] = typer.Option(None, help="Override the preset's candidate count."),
    n_probes: Optional[int] = typer.Option(None, help="Override the preset's probe count."),
    n_eval: int = typer.Option(100, help="Eval inputs in the selection experiment."),
    strategies: str = typer.Option("random,knn,vote-k,k-center,kmeans,stat", help="Selection strategies."),
    seeds: str = typer.Option("0,1,2", help="Seeds for the selection experiment."),
    out: str = typer.Option("actcache-report", help="Output directory."),
    store: Optional[str] = typer.Option(None, envvar="ACTCACHE_HOME", help="Store root."),
):
    """Build, query and evaluate one study preset end to end."""
    import actcache
    from actcache.builder import BuildConfig
    from actcache.data import DataSpec
    from actcache.errors import ConfigError
    from actcache.models import ModelSpec
    from actcache.query import QueryConfig, query, write_jsonl
    from actcache.study import PRESETS, EvalConfig, evaluate as run_eval, parse_seeds

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    seed_list = parse_seeds(seeds)  # before the build, not after it
    p = PRESETS[preset]
    n_cand = n_candidates or p["n_candidates"]
    cfg = BuildConfig(model=ModelSpec(model or p["model"], None, dtype, device),
                      data=DataSpec(task=p["task"], data_dir=data_dir, pool_limit=limit or n_cand,
                                    eval_limit=eval_limit or n_eval + (n_probes or p["n_probes"])),  # probes and eval inputs are disjoint
                      layers=p["layers"], components=p["components"], masks=p["masks"],
                      context_k=p["context_k"], max_length=p["max_length"], home=store)
    with progress_bar() as cb:
        st = actcache.build(cfg, progress=cb)
        typer.echo(f"build {st.key[:16]}: {st.report['forward_batches']} forward batches "
                   f"({'cache hit' if st.report['cache_hit'] else 'computed'})")
        recs = query(QueryConfig(key=st.key, home=store, component=p["components"][0], k=max(1, p["k"])),
                     progress=cb)
        Path(out).mkdir(parents=True, exist_ok=True)
        write_jsonl(recs, str(Path(out) / "neighbors.jsonl"))
        res = run_eval(EvalConfig(key=st.key, home=store, n_candidates=n_cand, n_probes=n_probes or p["n_probes"],
                                  n_eval=n_eval, k=p["k"], seeds=seed_list,
                                  strategies=_split(strategies), out=out), progress=cb)
    _print_results(res)


@app.command()
def presets():
    """List the study presets."""
    from actcache.study import PRESETS

    for name, p in PRESETS.items():
        typer.echo(f"{name:<28} {p['model']:<26} {p['task']:<14} k={p['k']} candidates={p['n_candidates']} "
                   f"components={','.join(p['components'])} layers={p['layers']} masks={','.join(p['masks'])}")
