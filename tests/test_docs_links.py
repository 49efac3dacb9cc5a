"""The documentation holds together: every relative link and image in the README, the
docs/ pages and the package READMEs points at a file that exists (and, for a link into
a markdown file, at a heading that exists there); the README stays short and links
every docs/ page (issue 26)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
README_MAX_CHARS = 15_000

# [text](target "title") and ![alt](target); [label]: target reference definitions.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files():
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted(ROOT.glob("engine/*/README.md"))
    files += [p for p in (ROOT / "kernels/README.md", ROOT / "benchmarks/RESULTS.md") if p.exists()]
    return files


def strip_code(text: str) -> str:
    """Drop fenced code blocks and inline code spans: a `[x](y)` there is not a link."""
    out, fence = [], None
    for line in text.split("\n"):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m:
            mark = m.group(1)[:3]
            fence = None if fence == mark else (fence or mark)
            out.append("")
            continue
        out.append("" if fence else re.sub(r"(`+)(?:(?!\1).)+\1", "", line))
    return "\n".join(out)


def links(text: str):
    body = strip_code(text)
    return [m.group(1) for m in INLINE.finditer(body)] + [m.group(1) for m in REFDEF.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    h = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    h = h.replace("`", "").replace("*", "").lower()
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def anchors(md: Path) -> set:
    seen, out = {}, set()
    for line in strip_code(md.read_text(encoding="utf-8")).split("\n"):
        m = re.match(r"\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def broken_links(md: Path) -> list:
    problems = []
    for target in links(md.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a URL: not checked offline
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file() and anchor.lower() not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    assert broken_links(md) == []


def test_readme_is_short():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text)} characters (at most {README_MAX_CHARS})"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))
              if not SCHEME.match(t)}
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ has no pages"
    assert [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked] == []


def test_the_checker_catches_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    md = tmp_path / "page.md"
    md.write_text(
        "[ok](there.md) [ok too](there.md#a-heading) [web](https://example.com/x) [self](#top)\n"
        "![missing image](img/nope.png)\n[missing page](gone.md)\n[bad anchor](there.md#nowhere)\n"
        "`[code](not-a-link.md)`\n```\n[fenced](not-a-link-either.md)\n```\n[ref]: missing-ref.md\n# Top\n",
        encoding="utf-8",
    )
    found = broken_links(md)
    assert [p.split(":")[0] for p in found] == ["img/nope.png", "gone.md", "there.md#nowhere", "missing-ref.md"]
