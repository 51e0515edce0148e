"""torchkeep.diff and `torchkeep diff`: across formats and prefixes, per tensor and module, exit 0 when identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli.main import main


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_the_same_weights_in_two_formats_and_with_a_prefix_are_identical(tmp_path: Path) -> None:
    model = net()
    torchkeep.save(model, tmp_path / "a.safetensors")
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "b.pth")  # module. prefix, pickle format
    report = torchkeep.diff(tmp_path / "a.safetensors", tmp_path / "b.pth")
    assert report.identical and len(report.tensors) == 4
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pth")]) == 0


def test_changes_are_measured_per_tensor_and_module(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = net()
    torchkeep.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        model[2].weight.mul_(1.01)  # a 1% change
        model[0].bias.add_(0.5)
    state = dict(model.state_dict())
    state["extra"] = torch.ones(2)
    del state["0.weight"]
    torchkeep.save(state, tmp_path / "b.safetensors")
    report = torchkeep.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert report.only_in_a == ["0.weight"] and report.only_in_b == ["extra"]
    changes = {t.name: t for t in report.tensors}
    assert changes["2.weight"].relative == pytest.approx(0.01, rel=1e-6)
    assert changes["0.bias"].max_abs == pytest.approx(0.5, rel=1e-6)
    assert changes["2.bias"].identical
    assert report.by_module()["2"] == (2, 1, pytest.approx(0.01, rel=1e-6))
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["only_in_b"] == ["extra"] and out["modules"]["2"]["changed"] == 1


def test_a_threshold_and_shape_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = net()
    torchkeep.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.001)
    torchkeep.save(model, tmp_path / "b.safetensors")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["diff", a, b]) == 1
    assert main(["diff", a, b, "--threshold", "0.01"]) == 0
    capsys.readouterr()
    wider = dict(model.state_dict(), **{"2.bias": torch.zeros(5)})
    torchkeep.save(wider, tmp_path / "c.safetensors")
    report = torchkeep.diff(a, tmp_path / "c.safetensors")
    assert report.mismatched == [("2.bias", "float32[4]", "float32[5]")] and not report.same(1.0)
    assert main(["diff", a, str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
