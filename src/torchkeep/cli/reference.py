"""The CLI reference (docs/CLI.md), generated from the parser's own --help, so it cannot drift.

    .venv/bin/python -m torchkeep.cli.reference > docs/CLI.md

tests/cli/test_cli_reference.py fails when docs/CLI.md differs from what this prints.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from torchkeep.cli.main import build_parser

WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the text is the same on every terminal


@contextmanager
def _columns() -> Iterator[None]:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def reference() -> str:
    """Markdown: the top-level help, then each command's full help, in the parser's order."""
    with _columns():
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        lines = [
            "# torchkeep command line",
            "",
            "Generated from `torchkeep --help` by `python -m torchkeep.cli.reference > docs/CLI.md`; do not edit.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, sub in commands.choices.items():
            lines += ["", f"## torchkeep {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
