"""Deployment formats as inputs: TorchScript archives, ExportedProgram (.pt2) archives and ONNX models.

Each is recognised by content (``weights.legacy.detect_kind`` asks :func:`zip_kind` and
:func:`looks_like_onnx`) and read as data: weights by name and, where the file holds them, the
model's inputs and outputs. No TorchScript code, exported program, pickle callable or shape
expression from the file is ever run or evaluated; pickles inside are read by the restricted
unpickler. ``torch.jit.load`` and ``torch.export.load`` do run them, which is why
``torchkeep scan`` never calls these archives safe (see docs/SECURITY.md).
"""

from __future__ import annotations

import torch

from torchkeep.format.deploy import onnx_model, pt2, torchscript
from torchkeep.format.deploy.common import DEPLOY_KINDS, KIND_TITLES, DeployKind, Description, Port, TensorMeta
from torchkeep.format.deploy.onnx_model import looks_like_onnx

__all__ = [
    "DEPLOY_KINDS",
    "KIND_TITLES",
    "DeployKind",
    "Description",
    "Port",
    "TensorMeta",
    "describe_file",
    "looks_like_onnx",
    "read_weights",
    "zip_kind",
]


def zip_kind(names: list[str]) -> DeployKind | None:
    """Which deployment archive a zip's member names make it, if any (checked before torch.save's layout)."""
    if torchscript.is_torchscript(names):
        return "torchscript"
    if pt2.is_exported_program(names):
        return "exported_program"
    return None


def read_weights(path: str, kind: DeployKind) -> dict[str, torch.Tensor]:
    """The weights of a deployment file, by name, in the file's order; nothing in it is run."""
    if kind == "torchscript":
        return torchscript.read_weights(path)
    if kind == "exported_program":
        return pt2.read_weights(path)
    return onnx_model.read_weights(path)


def describe_file(path: str, kind: DeployKind) -> Description:
    """What a deployment file is, its weights' names, dtypes and shapes, and its inputs and outputs."""
    if kind == "torchscript":
        return torchscript.describe_file(path)
    if kind == "exported_program":
        return pt2.describe_file(path)
    return onnx_model.describe_file(path)
