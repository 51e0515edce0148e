from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state
from tests.conftest import assert_same_tensors
from torchkeep.cli.main import main


def trained() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    scheduler.step()
    return model, opt, scheduler


def test_weights_file_to_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _, _ = trained()
    torch.save(model.state_dict(), tmp_path / "m.pth", _use_new_zipfile_serialization=False)
    report = torchkeep.convert(tmp_path / "m.pth", tmp_path / "m.safetensors")
    assert report.kind == "weights" and report.tensors == 4
    assert_same_tensors(model.state_dict(), st.load_file(tmp_path / "m.safetensors"))
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "cli.safetensors"), "--progress"]) == 0
    assert "verified bit-identical" in capsys.readouterr().out


def test_training_checkpoint_to_checkpoint_directory_keeps_everything(tmp_path: Path) -> None:
    model, opt, scheduler = trained()
    torch.save(
        {
            "epoch": 7,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "loss": 0.5,
            "path": "kept",
        },
        tmp_path / "ckpt.pth",
    )
    report = torchkeep.convert(tmp_path / "ckpt.pth", tmp_path / "ckpt")
    assert report.kind == "checkpoint"
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1)
    state = torchkeep.load_checkpoint(
        tmp_path / "ckpt", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, rng=False
    )
    assert state == {"epoch": 7, "loss": 0.5, "extra": {"path": "kept"}}
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert_same_state(opt.state_dict(), fresh_opt.state_dict())
    assert fresh_sched.state_dict() == scheduler.state_dict()


def test_convert_refuses_unsafe_unless_trusted(tmp_path: Path) -> None:
    model, _, _ = trained()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.convert(tmp_path / "whole.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.warns(torchkeep.TorchkeepWarning):
        torchkeep.convert(tmp_path / "whole.pt", tmp_path / "out.safetensors", trusted=True)
    assert_same_tensors(model.state_dict(), torchkeep.load(tmp_path / "out.safetensors"))


def test_cli_convert_of_a_whole_model_whose_class_is_gone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pickled model whose class lived in another program's __main__: one clear line, exit 1, nothing written."""
    import subprocess
    import sys

    path = tmp_path / "model.pth"
    script = (
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(2, 2)\n"
        f"torch.save(Net(), {str(path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with pytest.warns(torchkeep.TorchkeepWarning, match="full pickle"):
        code = main(["convert", str(path), str(tmp_path / "out"), "--trusted"])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot be unpickled in this program" in err and "Net" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1  # untrusted: refused, naming the class
    assert "__main__.Net" in capsys.readouterr().err
