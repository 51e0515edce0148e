"""docs/CLI.md is the parser's own help, regenerated: a command or option added without it fails here."""

from __future__ import annotations

from pathlib import Path

from torchkeep.cli.reference import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"


def test_cli_reference_is_current() -> None:
    expected = reference()
    assert DOC.read_text() == expected, "regenerate: .venv/bin/python -m torchkeep.cli.reference > docs/CLI.md"
    for command in ("inspect", "verify", "diff", "report", "average", "ls", "scan", "convert"):
        assert f"## torchkeep {command}\n" in expected
