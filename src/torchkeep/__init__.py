"""torchkeep: save, load, checkpoint and inspect PyTorch models safely, fast and crash-proof.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

import importlib
from typing import Any

from torchkeep.checkpoint.background import PendingSave
from torchkeep.checkpoint.io import load_checkpoint, save_checkpoint
from torchkeep.convert import ConvertReport, consolidate, convert
from torchkeep.data import ResumableSampler
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DistributedError,
    ExportError,
    ExportVerificationError,
    InvalidDeviceError,
    LoadMismatchError,
    StateMismatchError,
    TorchkeepError,
    TorchkeepWarning,
    UnsafeCheckpointError,
    UnsupportedTensorError,
    UnsupportedValueError,
)
from torchkeep.exporting.export import export
from torchkeep.exporting.report import ExportReport
from torchkeep.format.pickle.scan import ScanReport, scan
from torchkeep.manager.manager import CheckpointInfo, CheckpointManager
from torchkeep.manager.policies import KeepBest, KeepEvery, KeepLast, SaveEvery
from torchkeep.model.io import load_model, save_model
from torchkeep.model.quantize import quantize
from torchkeep.model.registry import register_model
from torchkeep.report import report
from torchkeep.weights.average import AverageReport, average
from torchkeep.weights.diff import DiffReport, diff
from torchkeep.weights.inspect import Inspection, TensorInfo, inspect
from torchkeep.weights.load import load, load_raw
from torchkeep.weights.load_into import load_into
from torchkeep.weights.report import LoadReport, Mismatch
from torchkeep.weights.save import save
from torchkeep.weights.verify import verify

__version__ = "0.1.0"

__all__ = [
    "AverageReport",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ConvertReport",
    "CorruptCheckpointError",
    "DiffReport",
    "DistributedError",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "Inspection",
    "InvalidDeviceError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LoadMismatchError",
    "LoadReport",
    "Mismatch",
    "PendingSave",
    "ResumableSampler",
    "SaveEvery",
    "ScanReport",
    "StateMismatchError",
    "TensorInfo",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "UnsupportedValueError",
    "__version__",
    "average",
    "consolidate",
    "convert",
    "diff",
    "export",
    "inspect",
    "load",
    "load_checkpoint",
    "load_into",
    "load_model",
    "load_raw",
    "quantize",
    "register_model",
    "report",
    "save",
    "save_checkpoint",
    "save_model",
    "scan",
    "verify",
]


def __getattr__(name: str) -> Any:
    """``torchkeep.lightning`` on first use: Lightning itself is imported only when its plugin is made."""
    if name == "lightning":
        return importlib.import_module("torchkeep.lightning")
    raise AttributeError(f"module 'torchkeep' has no attribute {name!r}")
