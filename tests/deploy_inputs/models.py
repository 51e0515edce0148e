"""The models the deployment-format tests export: an MLP and a small CNN with BatchNorm (trained buffers)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def trained(cls: type[nn.Module], seed: int) -> nn.Module:
    """A model in eval mode whose BatchNorm buffers are not their defaults (a few training steps' statistics)."""
    torch.manual_seed(seed)
    model = cls()
    if isinstance(model, CNN):
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 8, 8))
    return model.eval()


def example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8) if isinstance(model, CNN) else torch.randn(batch, 4)


def rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip member by member, each through ``change`` (None drops it); stored, as torch writes them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)
    dst.write_bytes(buf.getvalue())
    return dst


def member_named(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(suffix)]
    return name
