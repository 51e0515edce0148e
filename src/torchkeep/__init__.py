"""torchkeep: save, load, checkpoint and inspect PyTorch models safely, fast and crash-proof.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LoadMismatchError,
    TorchkeepError,
    UnsafeCheckpointError,
    UnsupportedTensorError,
)
from torchkeep.weights.inspect import Inspection, TensorInfo, inspect
from torchkeep.weights.load import load
from torchkeep.weights.load_into import load_into
from torchkeep.weights.report import LoadReport, Mismatch
from torchkeep.weights.save import save
from torchkeep.weights.verify import verify

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "Inspection",
    "LoadMismatchError",
    "LoadReport",
    "Mismatch",
    "TensorInfo",
    "TorchkeepError",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "__version__",
    "inspect",
    "load",
    "load_into",
    "save",
    "verify",
]
