"""torchkeep.average: the mean or EMA of a run's checkpoints (or of files of any format) into one file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.weights.average import average


def _model(fill: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    model[1].num_batches_tracked.fill_(int(fill) * 10)
    return model


def _run(tmp_path: Path, fills: list[float]) -> Path:
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run, keep_last=10) as manager:
        for step, fill in enumerate(fills, start=1):
            manager.save(step, model=_model(fill))
    return run


def test_mean_last_and_ema_of_a_run(tmp_path: Path) -> None:
    run = _run(tmp_path, [1.0, 2.0, 4.0])
    report = average(run, tmp_path / "mean.safetensors")
    mean = torchkeep.load(tmp_path / "mean.safetensors")
    assert len(report.sources) == 3 and report.method == "mean"
    assert torch.equal(mean["0.weight"], torch.full((4, 3), 7.0 / 3.0))
    assert torch.equal(mean["1.running_var"], torch.full((4,), 1.0))  # a buffer: every source has 1.0
    assert torch.equal(mean["1.num_batches_tracked"], torch.tensor(40))  # a counter: the newest's
    assert report.copied == ["1.num_batches_tracked"]

    average(run, tmp_path / "last2.safetensors", last=2)
    assert torch.equal(torchkeep.load(tmp_path / "last2.safetensors")["0.bias"], torch.full((4,), 3.0))

    report = average(run, tmp_path / "ema.safetensors", ema=0.5)
    assert report.method == "ema(0.5)"
    ema = (1.0 * 0.5 + 2.0 * 0.5) * 0.5 + 4.0 * 0.5
    assert torch.equal(torchkeep.load(tmp_path / "ema.safetensors")["0.weight"], torch.full((4, 3), ema))
    assert "ema(0.5) of 3 checkpoint(s)" in str(report)


def test_files_of_different_formats_and_dtypes_kept(tmp_path: Path) -> None:
    a, b = _model(1.0).to(torch.bfloat16), _model(2.0).to(torch.bfloat16)
    torch.save(a.state_dict(), tmp_path / "a.pth")
    torchkeep.save(b, tmp_path / "b.safetensors")
    average([tmp_path / "a.pth", tmp_path / "b.safetensors"], tmp_path / "out.safetensors")
    out = torchkeep.load(tmp_path / "out.safetensors")
    assert out["0.weight"].dtype == torch.bfloat16
    assert torch.equal(out["0.weight"], torch.full((4, 3), 1.5, dtype=torch.bfloat16))


def test_mismatched_sources_and_empty_runs_are_refused(tmp_path: Path) -> None:
    torchkeep.save(_model(1.0), tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    torchkeep.save(other, tmp_path / "b.safetensors")
    with pytest.raises(torchkeep.StateMismatchError, match=r"b\.safetensors.*'0\.weight'"):
        average([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        average(tmp_path / "empty", tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="ema"):
        average([tmp_path / "a.safetensors"], tmp_path / "out.safetensors", ema=1.0)


def test_cli_average_of_a_run_and_of_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchkeep.cli.main import main

    run = _run(tmp_path, [1.0, 3.0])
    assert main(["average", str(run), "-o", str(tmp_path / "avg.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "mean" and len(report["sources"]) == 2
    assert torch.equal(torchkeep.load(tmp_path / "avg.safetensors")["0.weight"], torch.full((4, 3), 2.0))
    files = [str(tmp_path / "avg.safetensors"), str(tmp_path / "avg.safetensors")]
    assert main(["average", *files, "-o", str(tmp_path / "same.safetensors"), "--ema", "0.9"]) == 0
    assert "ema(0.9) of 2 checkpoint(s)" in capsys.readouterr().out
    torchkeep.save(nn.Linear(2, 2), tmp_path / "other.safetensors")
    assert main(["average", files[0], str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "other.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--ema", "1"], ["--last", "0"]])
def test_cli_average_with_an_invalid_option_value_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    from torchkeep.cli.main import main

    run = _run(tmp_path, [1.0, 3.0])
    assert main(["average", str(run), "-o", str(tmp_path / "avg.safetensors"), *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchkeep: error:") and "internal error" not in err
