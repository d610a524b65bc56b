"""The flag tables of the docs, generated from the scripts' own argparse parsers.

A table sits between `<!-- flags: SCRIPT [SUBCOMMAND] -->` and `<!-- /flags -->` in any .md file of the
repository; `python docs/flags.py` rewrites every such block in place (run it after adding a flag), and
tests/test_docs.py fails when a block differs from its parser.

The parsers are taken as the scripts build them: each script's main() is run until it calls parse_args,
which is replaced here by a function that hands back the parser, so a script needs no hook of its own.
"""
import argparse
import importlib
import re
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- flags: (.+?) -->\n).*?(<!-- /flags -->)", re.S)


class Parser(Exception):
    """Raised in place of parse_args, carrying the parser that main() built."""


def script_parser(script: str) -> argparse.ArgumentParser:
    """The parser that SCRIPT's main() builds ("generate.py", "benchmarks/bench_model.py"); "dump.py
    compare" gives the subcommand's parser."""
    path, *sub = script.split()
    source = ROOT / path
    if "parse_args" not in source.read_text():
        raise SystemExit(f"{path}: no argparse parser to document")
    sys.path[:0] = [str(folder) for folder in (ROOT, source.parent) if str(folder) not in sys.path]
    module = importlib.import_module(source.stem)

    def hand_back(self, *args, **kwargs):
        raise Parser(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", hand_back):
        try:
            module.main()
        except Parser as caught:
            parser = caught.args[0]
    for name in sub:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def table(parser: argparse.ArgumentParser) -> str:
    """One row per flag or positional argument: how it is written, what it does, its default."""
    rows = ["| flag | what |", "|---|---|"]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
            continue
        choices = "{" + ",".join(map(str, a.choices)) + "}" if a.choices else None
        metavar = "" if a.nargs == 0 else " " + (a.metavar or choices or a.dest.upper())
        flag = ", ".join(f"`{o}{metavar}`" for o in a.option_strings) or f"`{a.metavar or choices or a.dest}`"
        what = (a.help or "") % {**vars(a), "prog": parser.prog}
        if a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in what:
            what += f" (default: {a.default})"
        rows.append(f"| {flag} | {escape(what.strip())} |")
    return "\n".join(rows) + "\n"


def escape(cell: str) -> str:
    return cell.replace("|", "\\|")   # a bar inside a table cell


def refresh(text: str) -> str:
    """TEXT with every flags block rebuilt from its script's parser."""
    return BLOCK.sub(lambda m: m[1] + table(script_parser(m[2])) + m[3], text)


def documents() -> list[Path]:
    """The .md files of the repository's top two levels (not .venv and other hidden folders)."""
    return sorted([*ROOT.glob("*.md"), *ROOT.glob("[!.]*/*.md")])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for doc in documents():
        text = doc.read_text()
        if (new := refresh(text)) != text:
            doc.write_text(new)
            print(f"updated {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
