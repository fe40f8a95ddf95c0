"""One encoder path: only actcache/prompts.py tokenizes text and lays out token
rows, and one capture runner whose pooling set is a registry."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("actcache", "cli", "indexes", "benchmarks")
OWNER = "actcache/prompts.py"
# Calls that tokenize text or assemble token rows (prompts.py's own functions included:
# another module calling them lays out rows itself instead of asking prompts.py for them).
LAYOUT_FUNCS = {"encode_text", "encode_segments", "encode_continuation", "bos_ids", "row_layout"}
TOKENIZER_METHODS = {"encode", "encode_plus", "batch_encode_plus", "apply_chat_template",
                     "convert_tokens_to_ids", "tokenize"}
TOKENIZER_NAMES = {"tok", "tokenizer", "tk"}
# (file, called name) -> why it may tokenize outside prompts.py.
ALLOWED = {
    ("actcache/select.py", "tok"): "the packaged MiniLM sentence embedder (vote-k) tokenizes with its own "
                                   "model's tokenizer, not the build's LM: its ids never enter a row",
}


def _receiver(node) -> str:
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return node.attr
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def tokenizer_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call in `source` that tokenizes text or lays out token rows."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and (f.id in TOKENIZER_NAMES or f.id in LAYOUT_FUNCS):
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute):
            if f.attr in LAYOUT_FUNCS or f.attr in TOKENIZER_NAMES:  # prompts.encode_segments(...), self.tokenizer(...)
                found.append((node.lineno, f.attr))
            elif f.attr in TOKENIZER_METHODS and "tok" in _receiver(f.value).lower():
                found.append((node.lineno, f.attr))
    return sorted(found)


def _offences() -> list[str]:
    out = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == OWNER:
                continue
            for line, name in tokenizer_calls(path.read_text()):
                if (rel, name) not in ALLOWED:
                    out.append(f"{rel}:{line} {name}(...)")
    return out


def test_only_prompts_tokenizes():
    offences = _offences()
    assert not offences, "token ids laid out outside actcache/prompts.py:\n" + "\n".join(offences)


def test_the_scan_sees_tokenizer_calls():
    src = ("ids = tokenizer('a')['input_ids']\n"
           "x = self.tokenizer.encode('b')\n"
           "y = prompts.encode_segments(tok, ['c'])\n"
           "z = row_layout(pre, q, t, 8, True)\n"
           "w = tok.apply_chat_template([])\n"
           "v = sae.encode(x)\n"
           "u = 'text'.encode()\n")
    assert [n for _, n in tokenizer_calls(src)] == ["tokenizer", "encode", "encode_segments", "row_layout",
                                                    "apply_chat_template"]
