"""The one classifier of what a pickled file holds, seen through load, load_checkpoint, convert and inspect."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


def _trained() -> tuple[nn.Module, Any, Any, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler without CUDA: disabled, and says so
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched, scaler


def test_files_that_hold_no_weights_say_what_they_are(tmp_path: Path) -> None:
    _, opt, sched, _ = _trained()
    cases = {
        "rng.pt": (torch.get_rng_state(), "random generator state"),
        "rng_dict.pt": ({"rng_state": torch.get_rng_state()}, "random generator state"),
        "optimizer.pt": (opt.state_dict(), r"load_checkpoint\(path, optimizer=...\)"),
        "scheduler.pt": (sched.state_dict(), r"load_checkpoint\(path, scheduler=...\)"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(torchkeep.CorruptCheckpointError, match=message):
            torchkeep.load(tmp_path / name)
        with pytest.raises(torchkeep.CorruptCheckpointError):
            torchkeep.convert(tmp_path / name, tmp_path / f"{name}.safetensors")
        assert not (tmp_path / f"{name}.safetensors").exists()
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"'state' \(dict of 4.*'param_groups' \(list of 1\)"):
        torchkeep.load(tmp_path / "optimizer.pt")  # the message shows the file's keys and their types
    assert torchkeep.inspect(tmp_path / "rng.pt").contents.layout == "RNG state"  # type: ignore[union-attr]


def test_weights_under_any_usual_key_nested_or_chosen(tmp_path: Path) -> None:
    model, *_ = _trained()
    state = dict(model.state_dict())
    ema = {k: v + 1 for k, v in state.items()}
    torch.save({"model_state": state, "epoch": 2}, tmp_path / "a.pt")
    assert_same_tensors(torchkeep.load(tmp_path / "a.pt"), state)
    torch.save({"checkpoint": {"model": state, "step": 5}, "note": "x"}, tmp_path / "nested.pt")
    assert_same_tensors(torchkeep.load(tmp_path / "nested.pt"), state)
    assert torchkeep.inspect(tmp_path / "nested.pt").contents.weights_key == "checkpoint/model"  # type: ignore[union-attr]

    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 9}, tmp_path / "both.pt")
    with pytest.warns(torchkeep.TorchkeepWarning, match=r"\['state_dict', 'state_dict_ema'\]; loaded 'state_dict'"):
        assert_same_tensors(torchkeep.load(tmp_path / "both.pt"), state)
    assert_same_tensors(torchkeep.load(tmp_path / "both.pt", key="state_dict_ema"), ema)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"key='epoch'.*'state_dict'"):
        torchkeep.load(tmp_path / "both.pt", key="epoch")

    torch.save({"weight": state["0.weight"], "epoch": 3}, tmp_path / "loose.pt")  # tensors beside values
    assert list(torchkeep.load(tmp_path / "loose.pt")) == ["weight"]


def test_a_timm_style_checkpoint_restores_its_scaler_under_its_own_key(tmp_path: Path) -> None:
    """timm's CheckpointSaver._save layout, key for key (timm itself needs torchvision, which the pinned
    CPU torch here cannot have): epoch, arch, state_dict, optimizer, version, args (a Namespace),
    amp_scaler, state_dict_ema, metric."""
    model, opt, _, scaler = _trained()
    scaler_state = {**scaler.state_dict(), "scale": 512.0, "growth_factor": 2.0, "_growth_tracker": 7}
    torch.save(
        {
            "epoch": 4,
            "arch": "mlp",
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "version": 2,
            "args": argparse.Namespace(model="mlp", lr=0.1, epochs=4),
            "amp_scaler": scaler_state,
            "state_dict_ema": model.state_dict(),
            "metric": 0.93,
        },
        tmp_path / "timm.pth.tar",
    )
    contents = torchkeep.inspect(tmp_path / "timm.pth.tar").contents
    assert contents is not None and contents.weights_key == "state_dict"
    assert {p.key: p.role for p in contents.parts}["amp_scaler"] == "scaler"
    fresh, fresh_opt, _, _ = _trained()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    restored: dict[str, Any] = {}

    class Scaler:  # what load_checkpoint gives a scaler: its saved state
        def load_state_dict(self, state: dict[str, Any]) -> None:
            restored.update(state)

    values = torchkeep.load_checkpoint(
        tmp_path / "timm.pth.tar", model=fresh, optimizer=fresh_opt, scaler=Scaler(), rng=False
    )
    assert restored["scale"] == 512.0 and restored["_growth_tracker"] == 7
    assert values["epoch"] == 4 and values["metric"] == 0.93 and values["arch"] == "mlp"
    assert "state_dict_ema" in values  # the EMA weights are returned with the other values
    assert dict(values["args"]) == {"model": "mlp", "lr": 0.1, "epochs": 4}  # a Namespace comes back as its dict
    assert_same_tensors(dict(fresh.state_dict()), dict(model.state_dict()))


def test_load_raw_of_a_torchkeep_checkpoint_is_its_whole_dict(tmp_path: Path) -> None:
    model, opt, sched, _ = _trained()
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, epoch=3, losses=[0.5])
    raw = torchkeep.load_raw(tmp_path / "c")
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "losses"} <= set(raw)
    assert raw["epoch"] == 3 and raw["losses"] == [0.5]
    assert_same_tensors(raw["model"], dict(model.state_dict()))
    assert raw["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    assert raw["scheduler"] == sched.state_dict()
    torchkeep.save(model, tmp_path / "m.safetensors")
    torchkeep.convert(tmp_path / "m.safetensors", tmp_path / "sharded", sharded=True)  # a DCP-backed checkpoint
    assert_same_tensors(torchkeep.load_raw(tmp_path / "sharded")["model"], dict(model.state_dict()))
