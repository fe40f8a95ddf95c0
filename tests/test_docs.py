"""The README stays a short entry point: under 300 lines, no notes about how
the code was developed, and every relative link from it and from docs/ resolves
(to a file that exists and, for a #fragment into markdown, to a heading there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DEV_NOTES = re.compile(r"issue ?[0-9]|the issue", re.IGNORECASE)  # as `grep -rniE` finds them
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose(path):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = _slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n < 300, f"README.md has {n} lines; move detail into docs/ and link it"


def test_docs_exist():
    assert DOCS, "docs/ holds the documentation the README links to"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_notes(path):
    hits = [f"{path.name}:{n}: {line}" for n, line in
            enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if DEV_NOTES.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = []
    for n, line in _prose(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            file_part, _, frag = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append(f"{path.name}:{n}: {target} (no such file)")
            elif frag and dest.suffix == ".md" and frag not in _anchors(dest):
                bad.append(f"{path.name}:{n}: {target} (no heading #{frag} in {dest.name})")
    assert not bad, "\n".join(bad)


def test_link_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## Some `code`, here\n")
    doc.write_text("[ok](b.md#some-code-here) [gone](c.md) [bad](b.md#nope)\n```\n[in code](d.md)\n```\n")
    with pytest.raises(AssertionError) as e:
        test_relative_links_resolve(doc)
    msg = str(e.value)
    assert "c.md (no such file)" in msg and "b.md#nope" in msg
    assert "some-code-here" not in msg and "d.md" not in msg


def test_ci_test_command_is_in_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert cmd in README.read_text(encoding="utf-8").splitlines()
