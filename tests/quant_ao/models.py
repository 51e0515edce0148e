"""Tiny torch.ao quantized models, as seed 003's tutorial builds them (quantize_dynamic; qconfig/prepare/convert).

torch.ao.quantization warns that it is deprecated on every call: each builder here filters that warning
(and the quantized-tensor creation notice, and observers' notes) around its own calls, nowhere else.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.ao.quantization as tq
from torch import nn


@contextlib.contextmanager
def torch_ao_notices_filtered() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning)
        warnings.filterwarnings("ignore", r"Please use quant_min and quant_max", UserWarning)
        warnings.filterwarnings("ignore", r"must run observer before calling calculate_qparams", UserWarning)
        yield


def float_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def dynamic_mlp(seed: int, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """The tutorial's ``quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``."""
    with torch_ao_notices_filtered():
        return tq.quantize_dynamic(float_mlp(seed), {nn.Linear}, dtype=dtype)


class SmallCNN(nn.Module):
    """QuantStub -> Conv2d -> BatchNorm -> ReLU -> Linear -> DeQuantStub: the static tutorial's shape."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.quant = tq.QuantStub()
        self.conv = nn.Conv2d(1, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width * 4 * 4, 5)
        self.dequant = tq.DeQuantStub()

    def get_config(self) -> dict[str, Any]:
        return {"width": self.width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu(self.bn(self.conv(x)))
        return self.dequant(self.fc(x.flatten(1)))


def calibrated(model: nn.Module, backend: str, seed: int, *, fuse: list[list[str]] | None = None) -> nn.Module:
    """qconfig = get_default_qconfig(backend); [fuse]; prepare; calibrate on a few batches; convert."""
    torch.manual_seed(seed + 100)
    model.eval()
    with torch_ao_notices_filtered():
        model.qconfig = tq.get_default_qconfig(backend)
        if fuse:
            tq.fuse_modules(model, fuse, inplace=True)
        prepared = tq.prepare(model)
        for _ in range(4):
            prepared(torch.randn(2, 1, 6, 6))
        return tq.convert(prepared)


def static_cnn(seed: int, backend: str = "x86", *, fused: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return calibrated(SmallCNN(), backend, seed, fuse=[["conv", "bn", "relu"]] if fused else None)


def static_sequential(seed: int) -> nn.Module:
    """A stock model statically quantized without fusion: save_model records its float structure."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        tq.QuantStub(), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4), tq.DeQuantStub()
    )
    return calibrated(model, "fbgemm", seed)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch_ao_notices_filtered():
        return model(x)
