"""``torchkeep export`` on a save_model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.export.models import cnn
from torchkeep.cli.main import main


def test_export_a_model_folder_to_each_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    torchkeep.save_model(model, tmp_path / "model")
    for name in ("model.onnx", "model.pt2"):
        assert main(["export", str(tmp_path / "model"), str(tmp_path / name), "--json"]) == 0
        spec = json.loads(capsys.readouterr().out)
        assert spec["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 4]}]
        assert len(spec["verified"]) == 2
        assert (tmp_path / f"{name}.io.json").is_file()
    x = torch.randn(5, 4)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert torch.equal(program(x), model(x))


def test_input_shapes_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchkeep.save_model(cnn(), tmp_path / "cnn")
    # A CNN's input shape cannot be guessed: exit 2 with the hint.
    assert main(["export", str(tmp_path / "cnn"), str(tmp_path / "cnn.pt2")]) == 2
    assert "--input 1,3,224,224" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "cnn"), str(tmp_path / "cnn.pt2"), "--input", "1,3,x"]) == 2
    assert "integers" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "cnn"), str(tmp_path / "cnn.pt2"), "--input", "1,3,8,8:float99"]) == 2
    assert main(["export", str(tmp_path / "cnn"), str(tmp_path / "cnn.tflite"), "--input", "1,3,8,8"]) == 2
    assert "--format" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "cnn"), str(tmp_path / "cnn.pt2"), "--input", "1,3,8,8"]) == 0
    assert "ok  example inputs" in capsys.readouterr().out
    # Not a model folder: torchkeep's own error, exit 1, no traceback.
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x.pt2"), "--input", "1,4"]) == 1
    assert "not a model directory" in capsys.readouterr().err


def test_inspect_shows_the_spec_written_beside_the_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    torchkeep.export(model, torch.randn(2, 4), tmp_path / "m.pt2", format="exported_program")
    assert main(["inspect", str(tmp_path / "m.pt2")]) == 0
    out = capsys.readouterr().out
    assert "exported by torchkeep (exported_program): inputs input: float32[batch, 4]" in out
    assert "verified on random inputs, batch 5: max abs error" in out
    assert main(["inspect", "--json", str(tmp_path / "m.pt2")]) == 0
    assert json.loads(capsys.readouterr().out)["export_spec"]["kind"] == "exported_program"
