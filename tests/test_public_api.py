import torchkeep
import torchkeep.errors as errors


def test_exported_names_are_the_documented_api() -> None:
    expected = {
        "save",
        "load",
        "load_into",
        "inspect",
        "verify",
        "LoadReport",
        "Mismatch",
        "Inspection",
        "TensorInfo",
        "TorchkeepError",
        "CheckpointNotFoundError",
        "CorruptCheckpointError",
        "LoadMismatchError",
        "UnsafeCheckpointError",
        "UnsupportedTensorError",
        "__version__",
    }
    assert set(torchkeep.__all__) == expected
    for name in expected:
        assert hasattr(torchkeep, name), name


def test_error_tree_inherits_the_builtins_callers_catch() -> None:
    assert issubclass(errors.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(errors.CorruptCheckpointError, ValueError)
    assert issubclass(errors.LoadMismatchError, RuntimeError)
    assert issubclass(errors.UnsupportedTensorError, TypeError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.TorchkeepError)
