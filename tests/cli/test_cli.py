from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.cli.main import main


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    torchkeep.save(
        {"enc.layer.weight": torch.randn(4, 3), "enc.layer.bias": torch.randn(4), "head.weight": torch.randn(2, 4)},
        path,
        metadata={"epoch": "7"},
    )
    return path


def test_inspect_table(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "enc.layer.weight" in out and "float32" in out and "[4, 3]" in out
    assert "total: 3 tensors, 24 elements" in out
    assert "enc 16" in out and "head 8" in out and "epoch: 7" in out


def test_inspect_json(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_params"] == 24 and doc["total_bytes"] == 96
    assert doc["metadata"] == {"epoch": "7"} and doc["checksummed"] is True
    assert {t["name"]: t["shape"] for t in doc["tensors"]}["head.weight"] == [2, 4]
    assert doc["params_by_prefix"] == {"enc": 16, "head": 8}


def test_inspect_tree(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights), "--tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "(all) 24"
    assert "  enc  16" in lines and "    layer  16" in lines


def test_verify_ok_and_damaged(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(weights)]) == 0
    assert "3 tensors verified" in capsys.readouterr().out
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    assert main(["verify", str(weights)]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "checksum mismatch" in err


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_demo_trains_saves_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "predictions identical to the trained model: True" in out
    assert "mismatched  fc.2.weight" in out
    assert (tmp_path / "demo" / "iris.safetensors").exists()
