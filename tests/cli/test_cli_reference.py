"""docs/CLI.md is the parser's own help, regenerated: a command or option added without it fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchkeep
from torchkeep.cli.reference import reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "CLI.md"


def test_cli_reference_is_current() -> None:
    expected = reference()
    assert DOC.read_text() == expected, "regenerate: .venv/bin/python -m torchkeep.cli.reference > docs/CLI.md"
    for command in ("inspect", "verify", "diff", "report", "average", "ls", "scan", "convert"):
        assert f"## torchkeep {command}\n" in expected


def test_every_json_key_is_documented(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from torchkeep.cli.main import main
    from torchkeep.cli.reference import JSON_SCHEMAS

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save({"epoch": 1, "model_state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pth")
    torchkeep.save(model, tmp_path / "m.safetensors")
    runs = [
        ["inspect", str(tmp_path / "c.pth"), "--json"],
        ["diff", str(tmp_path / "c.pth"), str(tmp_path / "m.safetensors"), "--json"],
        ["average", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.safetensors"), "--json"],
    ]
    for argv in runs:
        assert main(argv) == 0, argv
        document = json.loads(capsys.readouterr().out)
        undocumented = [key for key in document if f"`{key}`" not in JSON_SCHEMAS]
        assert not undocumented, (argv[0], undocumented)
    assert main(["ls", str(tmp_path), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files and all(f"`{key}`" in JSON_SCHEMAS for entry in files for key in entry)
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run) as manager:
        manager.save(1, model=model, metrics={"loss": 0.5})
    assert main(["ls", str(run), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert all(f"`{key}`" in JSON_SCHEMAS for key in [*listing, *listing["checkpoints"][0]])
    main(["inspect", str(tmp_path / "c.pth"), "--json"])
    parts = json.loads(capsys.readouterr().out)["contents"]["parts"]
    assert all(f"`{key}`" in JSON_SCHEMAS for part in parts for key in part)
