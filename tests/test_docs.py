"""The docs: every flag table is its script's parser (docs/flags.py), every relative link resolves."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import flags  # noqa: E402

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def prose(text: str) -> str:
    """The text without code blocks and inline code, where brackets and '#' are not markdown."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def anchors(path: Path) -> set[str]:
    """GitHub's ids of the headings: lower case, punctuation (backquotes too) dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue   # http(s), mailto: not checked (no network)
        file, _, anchor = target.partition("#")
        goal = (path.parent / file).resolve() if file else path
        if not goal.exists() or anchor and (goal.suffix != ".md" or anchor not in anchors(goal)):
            broken.append(f"{path.relative_to(ROOT)}: {target}")
    return broken


@pytest.mark.parametrize("doc", flags.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_flag_tables_are_the_parsers(doc):
    assert flags.refresh(doc.read_text()) == doc.read_text(), f"{doc.name}: run python docs/flags.py"


def test_a_new_flag_makes_its_table_stale(monkeypatch):
    real = flags.script_parser

    def with_a_new_flag(script):
        parser = real(script)
        parser.add_argument("--a-new-flag", help="added by the test")
        return parser

    text = (ROOT / "docs" / "running.md").read_text()
    monkeypatch.setattr(flags, "script_parser", with_a_new_flag)
    assert "--a-new-flag" in flags.refresh(text) != text


def test_every_script_with_a_parser_has_a_table():
    scripts = {p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]
               if "ArgumentParser(" in p.read_text()}
    documented = {m[2].split()[0] for doc in flags.documents() for m in flags.BLOCK.finditer(doc.read_text())}
    assert scripts <= documented, scripts - documented


def test_relative_links_resolve():
    broken = [b for doc in flags.documents() for b in broken_links(doc)]
    assert not broken, broken


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# A `title`\n[ok](a.md#a-title) [ok](#a-title) `[code](x.md)` [web](https://x)\n"
                                   "```\n# a comment\n[code](y.md)\n```\n"
                                   "[no file](b.md) [no heading](a.md#b-title) [in code](#a-comment)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: b.md", "a.md: a.md#b-title", "a.md: #a-comment"]
