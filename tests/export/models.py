"""The models every export test runs: each with its example inputs (positional, keyword)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TwoInputs(nn.Module):
    """Two inputs (the second by keyword in the tests) and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.a(x) + self.b(y))
        return {"logits": self.head(hidden), "hidden": hidden}


class TransformerBlock(nn.Module):
    """Multi-head self-attention, layer norm and a feed-forward layer."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm1(x + attended)
        return self.norm2(x + self.ff(x))


def cnn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    # Running statistics that are not the defaults, so a format that drops buffers shows it.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16))
    return model.eval()


def models() -> dict[str, tuple[nn.Module, Any, dict[str, torch.Tensor] | None]]:
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(2, 4), None),
        "cnn_bn": (cnn(), torch.randn(1, 3, 16, 16), None),  # batch 1, as in the tutorials
        "transformer": (TransformerBlock(), torch.randn(2, 5, 16), None),
        "two_inputs_dict_out": (TwoInputs(), (torch.randn(2, 4),), {"y": torch.randn(2, 6)}),
    }
