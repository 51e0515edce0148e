"""A real Lightning checkpoint (Trainer.fit, one tiny epoch) loads safely, exactly, with its hyper-parameters."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkeep
from tests.checkpoint.helpers import assert_same_state
from tests.conftest import assert_same_tensors


def fit_lightning(directory: Path) -> tuple[Any, Path, type]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pytorch_lightning as pl

        class Lit(pl.LightningModule):  # type: ignore[misc]
            def __init__(self, hidden: int = 8, lr: float = 0.01, args: Any = None) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

            def training_step(self, batch: Any, index: int) -> torch.Tensor:
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self) -> Any:
                opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
                return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        model = Lit(args=argparse.Namespace(seed=1, name="run"))
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(directory),
            accelerator="cpu",
            enable_checkpointing=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=8))
        path = directory / "last.ckpt"
        trainer.save_checkpoint(path)
    return model, path, Lit


def test_lightning_checkpoint_loads_safely_and_exactly(tmp_path: Path) -> None:
    model, path, lit_class = fit_lightning(tmp_path)
    assert torchkeep.scan(path).verdict == "safe"
    assert_same_tensors(model.state_dict(), torchkeep.load(path))

    raw = torchkeep.load_raw(path)
    assert raw["epoch"] == 1 and raw["global_step"] == 4
    assert raw["hyper_parameters"] == {"hidden": 8, "lr": 0.01, "args": {"seed": 1, "name": "run"}}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = lit_class(args=None)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    state = torchkeep.load_checkpoint(path, model=fresh, optimizer=opt, scheduler=scheduler, rng=False)
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert_same_state(raw["optimizer_states"][0], opt.state_dict())
    assert scheduler.last_epoch == raw["lr_schedulers"][0]["last_epoch"]
    assert state["global_step"] == 4 and state["hyper_parameters"]["args"] == {"seed": 1, "name": "run"}
