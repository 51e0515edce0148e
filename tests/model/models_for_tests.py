"""Models used by the save_model / load_model tests (importable, so fresh processes can allow them)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

import torchkeep


@dataclasses.dataclass
class Block:
    width: int = 8
    dropout: float = 0.0


@dataclasses.dataclass
class MLPConfig:
    inputs: int = 4
    blocks: list[Block] = dataclasses.field(default_factory=lambda: [Block(8), Block(6)])
    classes: int = 3


@torchkeep.register_model
class DataclassMLP(nn.Module):
    """Config is a nested dataclass; its constructor arguments are recorded by register_model."""

    def __init__(self, config: MLPConfig, scale: float = 1.0) -> None:
        super().__init__()
        self.config, self.scale = config, scale
        layers: list[nn.Module] = []
        width = config.inputs
        for block in config.blocks:
            layers += [nn.Linear(width, block.width), nn.ReLU(), nn.Dropout(block.dropout)]
            width = block.width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) * self.scale


class CNN(nn.Module):
    """Follows the get_config() / from_config() protocol; has BatchNorm running stats."""

    def __init__(self, channels: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.channels, self.classes = channels, classes
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(4 * channels, classes)

    def get_config(self) -> dict[str, Any]:
        return {"channels": self.channels, "classes": self.classes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CNN:
        return cls(**config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TiedLM(nn.Module):
    """Config as a plain-dict ``config`` attribute; output layer tied to the embedding."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config["vocab"], config["dim"])
        self.mix = nn.Linear(config["dim"], config["dim"])
        self.head = nn.Linear(config["dim"], config["vocab"], bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class Big(nn.Module):
    """About 1 GiB of float32 weights, for the memory bound of load_model."""

    def __init__(self, width: int = 8192, layers: int = 4) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.net = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    def get_config(self) -> dict[str, int]:
        return {"width": self.width, "layers": self.layers}

    @classmethod
    def from_config(cls, config: dict[str, int]) -> Big:
        return cls(**config)
