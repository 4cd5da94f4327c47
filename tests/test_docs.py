"""The documentation holds together: every relative link of the README, ``documentation/``, the examples' and the
benchmarks' READMEs reaches a file (and, for ``#anchor``, a heading of it by GitHub's anchor rules), and the README
stays a front door that links every page (issue 22)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "documentation"
PAGES = sorted(DOCS.glob("*.md"))
CHECKED = [README, *PAGES, *sorted((ROOT / "examples").rglob("README.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
TARGET = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and inline code spans (a link there is no link)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return re.sub(r"`[^`]*`", "", "\n".join(kept))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text lower-cased, everything but letters, digits, ``_``, ``-``
    and spaces dropped, spaces turned into ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeated headings numbered ``-1``, ``-2`` as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return TARGET.findall(prose(path.read_text(encoding="utf-8")))


def broken_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` that reaches no file, or no heading of it."""
    bad, name = [], path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: — not checked here
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{name}: {target} -> no such file")
        elif anchor and (dest.is_dir() or dest.suffix != ".md" or unquote(anchor) not in anchors(dest)):
            bad.append(f"{name}: {target} -> no heading #{anchor} in {dest.name}")
    return bad


def test_the_documentation_folder_has_its_pages():
    assert {p.name for p in PAGES} >= {"install.md", "trainers.md", "plans_and_weights.md", "released_models.md",
                                        "experiments.md", "analyze.md", "performance.md"}


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file()
    assert broken_links(path) == []


def test_the_readme_links_every_documentation_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_the_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200
    # the two commands come first (.ci/run and the developers rely on them)
    assert "## Two commands on a fresh machine" in text.split("## Five-minute tour")[0]
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_page_has_a_title_and_a_way_back(page):
    first, *_ = page.read_text(encoding="utf-8").splitlines()
    assert first.startswith("# ") and len(first) > 2
    assert any(t.partition("#")[0] == "../README.md" for t in links(page))


@pytest.mark.parametrize("heading,anchor", [
    ("Pretrain → fine-tune with nnU-Net's own commands", "pretrain--fine-tune-with-nnu-nets-own-commands"),
    ("Evaluate and compare strategies: `splits`, `evaluate`, `compare`",
     "evaluate-and-compare-strategies-splits-evaluate-compare"),
    ("What did the network learn? `nnunet_transfer analyze`", "what-did-the-network-learn-nnunet_transfer-analyze"),
    ("Blocks and specs (freezing, L2-SP scope, analysis layers)",
     "blocks-and-specs-freezing-l2-sp-scope-analysis-layers"),
])
def test_slug_follows_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "b.md").write_text("# B\n\n## Real heading\n\n## Real heading\n\n```\n# not a heading\n```\n")
    (tmp_path / "a.md").write_text(
        "[gone](missing.md) [bad anchor](b.md#nope) [ok](b.md#real-heading) [second](b.md#real-heading-1)\n"
        "[code anchor](b.md#not-a-heading) [self](#a) [web](https://example.org/x)\n\n# A\n\n"
        "```\n[in code](also-missing.md)\n```\n`[inline](missing-too.md)`\n")
    assert broken_links(tmp_path / "a.md") == [
        f"{tmp_path / 'a.md'}: missing.md -> no such file",
        f"{tmp_path / 'a.md'}: b.md#nope -> no heading #nope in b.md",
        f"{tmp_path / 'a.md'}: b.md#not-a-heading -> no heading #not-a-heading in b.md"]


def test_readme_layout_names_every_module_and_package_of_the_tree():
    """The README's layout block matches the tree: every top-level module and package of ``nnunet_transfer``, every
    module of a package the block describes by file (``blocks/``, ``plans/`` helpers, ``experiments/``, ``study/``
    readers) appears in it, and nothing it names by path is missing from the tree."""
    text = README.read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    package = ROOT / "nnunet_transfer"
    top = sorted(p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
                 if not p.name.startswith("__") and (p.is_dir() or p.suffix == ".py"))
    missing = [name for name in top if not re.search(rf"(?<![\w/]){re.escape(name)}", block)]
    assert missing == [], f"README.md's layout does not name {missing}; add a line (or a clause) for each"
    named = set(re.findall(r"(?<![\w/])([a-z_]+\.py)\b", block))
    files = {p.name for folder in (package, ROOT / "tests", ROOT / "benchmarks") for p in folder.rglob("*.py")}
    assert named - files == set(), f"README.md's layout names files that do not exist: {sorted(named - files)}"
    for folder in ("blocks", "experiments"):
        unnamed = sorted(p.name for p in (package / folder).glob("*.py")
                         if p.name != "__init__.py" and p.stem not in block)
        assert unnamed == [], f"README.md's layout line for {folder}/ does not name {unnamed}"
