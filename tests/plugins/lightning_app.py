"""A tiny Lightning setup shared by the plugin tests, and runnable as a script that trains until killed.

Script: ``python lightning_app.py DIR`` checkpoints into DIR after every step, pausing a little per step.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchkeep.lightning import TorchkeepCheckpointIO

STEPS_PER_EPOCH = 4


class Lit(pl.LightningModule):
    def __init__(self, width: int = 8, lr: float = 0.01, pause: float = 0.0, extra: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
        )

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if self.hparams.pause:
            time.sleep(self.hparams.pause)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def batches() -> DataLoader[Any]:
    """The same batches in the same order every epoch: no sampler state to resume."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * STEPS_PER_EPOCH, 4, generator=generator), torch.arange(32) % 3)
    return DataLoader(data, batch_size=8, shuffle=False)


def make_trainer(directory: Path, callbacks: list[Any], plugin: Any = None, **options: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
        default_root_dir=str(directory),
        plugins=[plugin if plugin is not None else TorchkeepCheckpointIO()],
        callbacks=callbacks,
        **options,
    )


def every_step(directory: Path) -> ModelCheckpoint:
    """Keeps the newest step's checkpoint and last.ckpt, removing the one before at every step."""
    return ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=1, save_last=True)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    target = Path(sys.argv[1])
    torch.manual_seed(0)
    model = Lit(width=1024, pause=0.01)  # 1M parameters: each save writes ~12 MB, long enough to be killed in
    make_trainer(target, [every_step(target)], max_steps=100_000).fit(model, batches())
