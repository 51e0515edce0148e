"""When load finds no weights, its error shows what the file holds and which call reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep


def test_weights_under_an_unknown_key_are_not_guessed_but_the_keys_are_shown(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "my_weights": {"inner": model.state_dict()}, "note": "x"}, path)
    with pytest.raises(torchkeep.CorruptCheckpointError) as caught:
        torchkeep.load(path)
    message = str(caught.value)
    assert "'epoch' (int)" in message and "'my_weights' (dict of 1)" in message and "'note' (str)" in message
    assert "load_checkpoint" in message and "load_raw" in message


def test_an_optimizer_state_file_says_what_it_is(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "optim.pt"
    torch.save(optimizer.state_dict(), path)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="an optimizer's state: load_checkpoint"):
        torchkeep.load(path)


def test_the_cli_prints_one_line_and_the_traceback_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchkeep.cli import main as cli

    path = tmp_path / "optim.pt"
    torch.save({"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, path)
    assert cli.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an optimizer's state" in err and "Traceback" not in err
    assert cli.main(["--verbose", "convert", str(path), str(tmp_path / "out.safetensors")]) == 1
    assert "Traceback" in capsys.readouterr().err

    def broken(args: object) -> int:  # stands for a bug in a command
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_verify", broken)
    assert cli.main(["verify", str(path)]) == 3
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "Traceback" not in err


def test_weights_and_scalers_under_other_libraries_keys(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    path = tmp_path / "timm_like.pth"
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.save({"epoch": 2, "model_state": model.state_dict(), "amp_scaler": scaler.state_dict()}, path)
    loaded = torchkeep.load(path)
    assert set(loaded) == {"weight", "bias"} and torch.equal(loaded["weight"], model.weight)
    restored_scaler = torch.amp.GradScaler("cpu")
    fresh = nn.Linear(3, 2)
    extra = torchkeep.load_checkpoint(path, model=fresh, scaler=restored_scaler, rng=False)
    assert extra == {"epoch": 2}
    assert restored_scaler.state_dict()["scale"] == 1024.0
    assert torch.equal(fresh.weight, model.weight)
