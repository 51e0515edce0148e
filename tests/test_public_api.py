from pathlib import Path

import torchkeep
import torchkeep.errors as errors

EXPECTED = {
    "save", "load", "load_into", "inspect", "verify", "LoadReport", "Mismatch", "Inspection", "TensorInfo",
    "save_checkpoint", "load_checkpoint", "CheckpointManager", "CheckpointInfo",
    "KeepLast", "KeepBest", "KeepEvery", "SaveEvery", "ResumableSampler",
    "TorchkeepError", "CheckpointNotFoundError", "CorruptCheckpointError", "DistributedError", "LoadMismatchError",
    "InvalidDeviceError",
    "UnsafeCheckpointError", "UnsupportedTensorError", "UnsupportedValueError", "CheckpointWriteError",
    "TorchkeepWarning", "__version__", "load_raw", "scan", "ScanReport", "convert", "consolidate", "ConvertReport",
    "save_model", "load_model", "register_model", "export", "ExportReport", "ExportError", "ExportVerificationError",
    "quantize", "PendingSave", "StateMismatchError", "diff", "DiffReport",
    "report", "average", "AverageReport",
}  # fmt: skip


def test_exported_names_are_the_documented_api() -> None:
    assert set(torchkeep.__all__) == EXPECTED
    for name in EXPECTED:
        assert hasattr(torchkeep, name), name
    assert torchkeep.lightning.TorchkeepCheckpointIO.__name__ == "TorchkeepCheckpointIO"  # a submodule on first use


def test_error_tree_inherits_the_builtins_callers_catch() -> None:
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.CorruptCheckpointError, ValueError)
    assert issubclass(errors.LoadMismatchError, RuntimeError)
    assert issubclass(errors.DistributedError, RuntimeError)
    assert issubclass(errors.UnsupportedTensorError, TypeError)
    assert issubclass(errors.UnsupportedValueError, TypeError)
    assert issubclass(errors.CheckpointWriteError, OSError)
    assert issubclass(errors.TorchkeepWarning, UserWarning)
    for name in errors.__all__:
        if name != "TorchkeepWarning":
            assert issubclass(getattr(errors, name), errors.TorchkeepError)


def test_importing_torchkeep_leaves_the_slow_optional_parts_unimported() -> None:
    """`torchkeep --help` paid ~1 s for torch.distributed.checkpoint on every start; it is imported when used."""
    import subprocess
    import sys

    code = (
        "import sys, torchkeep, torchkeep.cli.main; "
        "print(sorted(m for m in ('torch.distributed.checkpoint', 'fsspec') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_warnings_name_the_callers_line(tmp_path: Path) -> None:
    """However deep in torchkeep a warning is raised (through decorators and helpers), it points at the
    line that called torchkeep, as Python's own warnings do."""
    import warnings

    import torch

    weights = {"w": torch.ones(2)}
    torch.save({"state_dict": weights, "model_state_dict": weights}, tmp_path / "two.pth")
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(2))
    for call in (
        lambda: torchkeep.load(tmp_path / "two.pth"),
        lambda: torchkeep.load_into(model, tmp_path / "two.pth"),
        lambda: torchkeep.load(tmp_path / "two.pth", trusted=True),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught and all(w.filename == __file__ for w in caught), [(w.filename, str(w.message)) for w in caught]
