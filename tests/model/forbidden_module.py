"""A module no test allows: load_model must refuse its class without importing it."""

from __future__ import annotations

import torch
from torch import nn


class Forbidden(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, width)

    def get_config(self) -> dict[str, int]:
        return {"width": self.width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
