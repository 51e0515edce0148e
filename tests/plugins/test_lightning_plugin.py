"""TorchkeepCheckpointIO with a real Lightning Trainer: safe files, top-k removal, exact resume, kill -9, refusals."""

from __future__ import annotations

import argparse
import copy
import enum
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import bytes_of

pl = pytest.importorskip("pytorch_lightning")

from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.utilities.parsing import AttributeDict  # noqa: E402

from tests.plugins.lightning_app import STEPS_PER_EPOCH, Lit, batches, every_step, make_trainer  # noqa: E402
from torchkeep.lightning import TorchkeepCheckpointIO  # noqa: E402

pytestmark = [
    # Lightning's own advice (few workers, GPU unused, torch internals it calls); not about torchkeep.
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning_fabric"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*treespec.*:DeprecationWarning"),
]


class Recording(TorchkeepCheckpointIO):
    """The plugin, remembering what Lightning asked it to do."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, dict[str, Any]] = {}
        self.removed: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saved[os.fspath(path)] = copy.deepcopy(checkpoint)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        self.removed.append(os.fspath(path))


def assert_same(saved: Any, loaded: Any, where: str = "checkpoint") -> None:
    """Equal, with the same types all the way down; tensors byte for byte."""
    assert type(saved) is type(loaded), f"{where}: {type(saved).__name__} came back as {type(loaded).__name__}"
    if isinstance(saved, torch.Tensor):
        assert (saved.dtype, saved.shape) == (loaded.dtype, loaded.shape), where
        assert bytes_of(saved) == bytes_of(loaded), where
    elif isinstance(saved, dict):
        assert list(saved) == list(loaded), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}[{key!r}]")
        assert getattr(saved, "_metadata", None) == getattr(loaded, "_metadata", None), f"{where}._metadata"
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(loaded), where
        for i, (a, b) in enumerate(zip(saved, loaded, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(saved, argparse.Namespace):
        assert_same(vars(saved), vars(loaded), where)
    elif isinstance(saved, float) and math.isnan(saved):
        assert math.isnan(loaded), where
    else:
        assert saved == loaded and repr(saved) == repr(loaded), where


def assert_torchkeep_checkpoint(path: Path) -> None:
    """A checkpoint directory of JSON and safetensors only, every checksum intact, no pickle anywhere."""
    assert path.is_dir(), path
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "tensors.safetensors"]
    json.loads((path / "manifest.json").read_text())
    assert torchkeep.scan(path).status == "safe"
    assert (torchkeep.verify(path) or 0) > 0


def checkpoint_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".ckpt"))


def final_state(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    return (
        trainer.lightning_module.state_dict(),
        trainer.optimizers[0].state_dict(),
        trainer.lr_scheduler_configs[0].scheduler.state_dict(),
    )


@pytest.mark.parametrize("save_last", [True, "link"])
def test_model_checkpoint_writes_torchkeep_checkpoints_and_removes_beyond_top_k(tmp_path: Path, save_last: Any) -> None:
    torch.manual_seed(0)
    plugin = Recording()
    callback = ModelCheckpoint(
        dirpath=tmp_path, monitor="train_loss", save_top_k=2, save_last=save_last, every_n_train_steps=1
    )
    model = Lit(extra=argparse.Namespace(seed=1, paths=[Path("/data/x")]))
    make_trainer(tmp_path, [callback], plugin, max_epochs=2).fit(model, batches())

    top_k = {Path(p).name for p in callback.best_k_models}
    assert len(top_k) == 2
    assert checkpoint_entries(tmp_path) == sorted([*top_k, "last.ckpt"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left"
    removed = {Path(p).name for p in plugin.removed}
    assert removed and not removed & top_k  # some were removed, and really gone
    assert all(not Path(p).exists() for p in plugin.removed if Path(p).name not in top_k | {"last.ckpt"})
    for name in top_k:
        assert_torchkeep_checkpoint(tmp_path / name)
    if save_last == "link":
        assert (tmp_path / "last.ckpt").is_symlink()
    else:
        assert_torchkeep_checkpoint(tmp_path / "last.ckpt")

    # What Lightning handed over comes back: the same nested dict, types and tensor bytes.
    newest = max(plugin.saved, key=lambda p: plugin.saved[p]["global_step"])
    loaded = TorchkeepCheckpointIO().load_checkpoint(newest)
    assert_same(plugin.saved[newest], loaded)
    assert loaded["hyper_parameters"]["extra"].paths == [Path("/data/x")]
    states = loaded["callbacks"][callback.state_key]
    assert isinstance(states["best_model_score"], torch.Tensor) and states["dirpath"] == str(tmp_path)
    last = TorchkeepCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")  # through the link, if one
    assert (
        last["global_step"]
        == loaded["global_step"]
        == (2 * STEPS_PER_EPOCH if save_last is True else last["global_step"])
    )
    # Other torchkeep tools read the same folder: the module's weights, its optimizer.
    assert_same(dict(loaded["state_dict"]), torchkeep.load(newest))


def test_resume_continues_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = make_trainer(
        tmp_path / "a", [ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=-1, every_n_epochs=1)], max_epochs=3
    )
    straight.fit(Lit(), batches())
    first_epoch = tmp_path / "a" / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    assert_torchkeep_checkpoint(first_epoch)

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = make_trainer(
        tmp_path / "b", [ModelCheckpoint(dirpath=tmp_path / "b", save_top_k=-1, every_n_epochs=1)], max_epochs=3
    )
    resumed.fit(Lit(), batches(), ckpt_path=first_epoch)

    assert resumed.global_step == straight.global_step == 3 * STEPS_PER_EPOCH
    weights, optimizer, scheduler = final_state(straight)
    weights_b, optimizer_b, scheduler_b = final_state(resumed)
    assert_same(weights, weights_b)
    assert_same(optimizer, optimizer_b)
    assert_same(scheduler, scheduler_b)


def test_killed_mid_training_resumes_from_last(tmp_path: Path) -> None:
    script = Path(__file__).with_name("lightning_app.py")
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=Path(__file__).parents[2])
    caught_mid_save = False
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "last.ckpt" / "manifest.json").exists():
            assert child.poll() is None, "the training script died"
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.01)
        # Kill while last.ckpt is being replaced, if we catch it within a few seconds.
        soon = time.monotonic() + 5
        while time.monotonic() < soon and not caught_mid_save:
            caught_mid_save = any(name.startswith(".last.ckpt.tmp-") for name in os.listdir(tmp_path))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    plugin = TorchkeepCheckpointIO()
    for name in checkpoint_entries(tmp_path):  # whatever carries a checkpoint's name is a whole checkpoint
        assert_torchkeep_checkpoint(tmp_path / name)
    step = plugin.load_checkpoint(tmp_path / "last.ckpt")["global_step"]
    assert step >= 1

    torch.manual_seed(0)
    model = Lit(width=1024)
    trainer = make_trainer(tmp_path, [every_step(tmp_path)], max_steps=step + 3)
    trainer.fit(model, batches(), ckpt_path="last")
    assert trainer.global_step == step + 3
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert plugin.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == step + 3
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name], "what the kill left half-written is gone"


class Colour(enum.Enum):
    RED = 1


def test_hyper_parameter_that_cannot_be_stored_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    with pytest.raises(torchkeep.UnsupportedValueError, match=r"hyper_parameters\.extra") as caught:
        trainer.fit(Lit(extra=Colour.RED), batches())
    assert caught.value.where == "hyper_parameters.extra"
    assert not (tmp_path / "ckpts").exists() or not list((tmp_path / "ckpts").iterdir())


def test_other_values_that_cannot_be_stored_leave_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "x.ckpt"
    for value, where in ((print, "hyper_parameters.fn"), ({1, 2}, "callbacks.Mine.seen")):
        key, inner = where.split(".", 1)
        checkpoint: dict[str, Any] = {"state_dict": {"w": torch.ones(2)}, key: {}}
        node = checkpoint[key]
        for part in inner.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[where.rsplit(".", 1)[1]] = value
        with pytest.raises(torchkeep.UnsupportedValueError) as caught:
            TorchkeepCheckpointIO().save_checkpoint(checkpoint, target)
        assert caught.value.where == where
        assert list(tmp_path.iterdir()) == []


def test_round_trip_keeps_types_without_a_trainer(tmp_path: Path) -> None:
    weights = OrderedDict(w=torch.randn(3, 2), b=torch.arange(3, dtype=torch.bfloat16))
    weights._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    checkpoint = {
        "epoch": 2,
        "global_step": 7,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": weights,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 7, "_last_lr": [0.1]}],
        "hyper_parameters": {
            "args": argparse.Namespace(inner=argparse.Namespace(depth=2), items=(1, "a", None)),
            "attrs": AttributeDict(a=1, b=[PurePosixPath("/p"), PureWindowsPath("c:/w")]),
            "path": Path("runs/1"),
            "numbers": {1: -0.0, (2, 3): float("nan"), "inf": float("inf")},
        },
    }
    io = TorchkeepCheckpointIO()
    target = tmp_path / "run" / "epoch=2-step=7.ckpt"
    io.save_checkpoint(checkpoint, target)
    assert_torchkeep_checkpoint(target)
    assert_same(checkpoint, io.load_checkpoint(target))

    # Two optimizers stay Lightning's list; the module's weights stay readable by torchkeep.load.
    checkpoint["optimizer_states"] = checkpoint["optimizer_states"] * 2
    io.save_checkpoint(checkpoint, target)  # replaces the folder atomically
    assert_same(checkpoint, io.load_checkpoint(target))
    assert_same(dict(weights), torchkeep.load(target))

    io.remove_checkpoint(target)
    assert list(target.parent.iterdir()) == []


def test_reads_torch_save_checkpoints_safely_and_removes_links_alone(tmp_path: Path) -> None:
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3, "hyper_parameters": {"lr": 0.1}}, old)
    io = TorchkeepCheckpointIO()
    loaded = io.load_checkpoint(old)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))

    target = tmp_path / "epoch=0-step=1.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    link = tmp_path / "last.ckpt"
    link.symlink_to(target.name)
    assert io.load_checkpoint(link)["state_dict"]["w"].tolist() == [1.0, 1.0]
    io.remove_checkpoint(link)
    assert not link.exists() and not link.is_symlink() and (target / "manifest.json").exists()
    io.remove_checkpoint(tmp_path / "never-written.ckpt")  # as Lightning's own: nothing there, nothing to do


def test_refuses_what_it_did_not_write(tmp_path: Path) -> None:
    io = TorchkeepCheckpointIO()
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    torchkeep.save_checkpoint(tmp_path / "plain", model=nn.Linear(2, 2), rng=False)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="not written by TorchkeepCheckpointIO"):
        io.load_checkpoint(tmp_path / "plain")
    (tmp_path / "half.ckpt").mkdir()
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"no manifest\.json"):
        io.load_checkpoint(tmp_path / "half.ckpt")


def test_urls_go_through_fsspec() -> None:
    io = TorchkeepCheckpointIO()
    url = "memory://torchkeep-lightning/epoch=0-step=1.ckpt"
    checkpoint = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 1, "hyper_parameters": {"p": Path("a")}}
    io.save_checkpoint(checkpoint, url)
    assert_same(checkpoint, io.load_checkpoint(url))
    io.remove_checkpoint(url)
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(url)


def test_importing_torchkeep_does_not_import_lightning() -> None:
    code = (
        "import sys, torchkeep, torchkeep.lightning; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'lightning_fabric')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_killed_runs_leftovers_go_by_the_managers_rule(tmp_path: Path) -> None:
    """Stale temporaries of .ckpt names: a folder of only what a save writes is removed (remove_own); one that
    also holds something torchkeep does not write is left, with a warning naming it; a newer one is kept."""
    old = time.time() - 60

    def leftover(name: str, *files: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in files:
            (folder / file).write_bytes(b"x")
        os.utime(folder, (old, old))
        return folder

    own = leftover(".epoch=0-step=1.ckpt.tmp-0123456789ab", "manifest.json", "tensors.safetensors",
                   ".tensors.safetensors.tmp-0123456789ab")  # fmt: skip
    mixed = leftover(".epoch=0-step=2.ckpt.tmp-0123456789ab", "manifest.json", "notes.txt")
    stray_file = tmp_path / ".last.ckpt.tmp-0123456789ab"
    stray_file.write_bytes(b"x")
    os.utime(stray_file, (old, old))
    plugin = TorchkeepCheckpointIO()
    fresh = tmp_path / ".epoch=0-step=3.ckpt.tmp-0123456789ab"  # another live writer's, after this plugin
    fresh.mkdir()
    os.utime(fresh, (time.time() + 60, time.time() + 60))  # the file clock is coarser than time.time()
    with pytest.warns(torchkeep.TorchkeepWarning, match=r"epoch=0-step=2.*notes\.txt"):
        plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "epoch=0-step=4.ckpt")
    assert not own.exists() and not stray_file.exists() and fresh.exists()
    assert sorted(p.name for p in mixed.iterdir()) == ["manifest.json", "notes.txt"]
