"""The documentation inside the repository: a page per method, linked from README.md and
docs/index.md, links that resolve, and the published numbers of the recipes on the method pages."""

from __future__ import annotations

import re
from pathlib import Path

from kdistill import list_methods
from kdistill.recipes import list_recipes, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_OF = {"meal_v1": "meal", "meal_v2": "meal", "crd_kd": "crd", "hkd_kd": "hkd", "mcl_okd": "mcl"}  # variants share their base method's page
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _page(method: str) -> Path:
    return DOCS / "methods" / f"{PAGE_OF.get(method, method)}.md"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_every_method_has_a_page_linked_from_readme_and_index() -> None:
    readme = (ROOT / "README.md").read_text()
    index = (DOCS / "index.md").read_text()
    methods = list_methods()
    assert {"kd", "reviewkd", "meal_v1", "meal_v2", "dkd", "crd", "crd_kd", "vid"} <= set(methods)
    for name in methods:
        page = _page(name)
        assert page.is_file(), f"method {name!r} has no page {page.relative_to(ROOT)}"
        text = page.read_text()
        assert f"`{name}`" in text, f"{page.name} does not name `{name}`"
        for section in ("## Formula", "## Published numbers", "## Where kdistill differs", "## Command"):
            if name != "ce" or section in ("## Published numbers", "## Command"):
                assert section in text, f"{page.name} lacks the section {section!r}"
        rel = page.relative_to(ROOT).as_posix()
        assert f"]({rel})" in readme, f"README.md does not link {rel}"
        assert f"]({page.relative_to(DOCS).as_posix()})" in index, f"docs/index.md does not link {rel}"


def test_relative_links_resolve() -> None:
    broken = []
    for md in _markdown_files():
        for target in LINK.findall(md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    assert any("methods/kd.md" in t for t in LINK.findall((DOCS / "index.md").read_text()))  # the regex sees links


def test_method_pages_carry_every_published_number_of_their_recipes() -> None:
    checked = 0
    for name, path in list_recipes():
        dataset, family, pair = name.split("/")
        if dataset != "cifar100":
            continue
        recipe = load_recipe(path)
        page = _page(recipe["method"]["name"]).read_text()
        top1 = recipe["published"]["top1"]
        row = next((line for line in page.splitlines() if line.startswith(f"| `{pair}` |")), None)
        assert row is not None, f"{_page(recipe['method']['name']).name} has no row for {name}"
        if family in ("crd_kd", "hkd_kd"):  # two tables on one page: the row must be in the second one
            row = [line for line in page.splitlines() if line.startswith(f"| `{pair}` |")][-1]
        expected = "—" if top1 is None else f"{top1:.2f}"
        assert row.rstrip(" |").endswith(expected) or row.rstrip(" |").endswith(f"**{expected}**"), (name, row)
        checked += 1
    assert checked == 188  # every CIFAR-100 recipe: 153 distillation pairs, 15 networks alone, 20 online and HKD


def test_docs_stand_alone() -> None:
    """No page points at files outside the repository or at specification sections."""
    for md in _markdown_files():
        text = md.read_text()
        for bad in ("spec §", "specs/", "../shared", "§"):
            assert bad not in text, f"{md.relative_to(ROOT)} contains {bad!r}"


SOURCE_DIRS = ("src", "tests", "benchmarks")
OUTSIDE = re.compile(r"(?<![\w.$])(?:/work|/home|/root|/Users|/tmp)/|\.\./shared/specs|shared/specs|(?<![\w.])specs/")
CITATION = re.compile(r"§|\bspec(?:ification)? §|\b[Ii]ssue \d+\b|(?<![\w&#])#\d+\b")
MD_FILE = re.compile(r"(?<![\w./-])([\w./-]+\.md)\b")


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_source_stands_alone() -> None:
    """No file under src/ points at a path outside the repository, cites a specification section
    or an issue number, or names a Markdown file other than README.md and docs/...; tests and benchmarks
    cite no specification section or issue number either (they may read ../shared/data and
    ../shared/teachers, relative to the repository)."""
    problems = []
    for path in _python_files("src"):
        text = path.read_text()
        for pattern in (OUTSIDE, CITATION):
            problems += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in pattern.finditer(text)]
        for name in MD_FILE.findall(text):  # repository paths only: README.md, docs/...; method pages exist
            if not (name == "README.md" or name.startswith("docs/")):
                problems.append(f"{path.relative_to(ROOT)}: names {name!r}, not a path in the repository")
            elif name.startswith("docs/methods/") and not (ROOT / name).is_file():
                problems.append(f"{path.relative_to(ROOT)}: names {name!r}, which does not exist")
    for path in _python_files("tests", "benchmarks"):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        problems += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in CITATION.finditer(text)]
        problems += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in re.finditer(r"shared/specs|specs/\w", text)]
    assert not problems, "\n".join(problems)


def test_standalone_patterns_catch_what_they_should() -> None:
    assert CITATION.search("see baselines spec §2.1") and CITATION.search("(issue 6)") and CITATION.search("defect #9")
    assert OUTSIDE.search("../shared/specs/meal.md") and OUTSIDE.search("data.root=/root/.cache/x")
    assert not CITATION.search("docs/methods/kd.md, Hinton et al. 2015") and not OUTSIDE.search("$KDISTILL_CACHE/data")
    assert MD_FILE.findall("see docs/methods/kd.md and meal.md") == ["docs/methods/kd.md", "meal.md"]
