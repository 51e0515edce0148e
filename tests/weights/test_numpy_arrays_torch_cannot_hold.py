"""NumPy files with arrays no tensor can hold (strings, bytes, dates): the classifier does not call them
weights, so load gives its typed "no weights" error, or the number arrays beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.weights.contents import classify, holds_numbers, is_weights

NOT_NUMBERS = {
    "str": np.array(["conv", "fc"]),
    "bytes": np.array([b"conv", b"fc"]),
    "date": np.array(["2024-01-01"], dtype="datetime64[D]"),
}


@pytest.mark.parametrize("kind", sorted(NOT_NUMBERS))
def test_a_file_of_only_such_arrays_is_the_typed_no_weights_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "labels.npz"
    np.savez(path, labels=NOT_NUMBERS[kind])
    with pytest.raises(CorruptCheckpointError, match="found no weights") as caught:
        torchkeep.load(path)
    assert isinstance(caught.value, TorchkeepError) and str(path) in str(caught.value)
    assert "'labels' (array " in str(caught.value)  # what it holds, dtype and shape


def test_a_mix_loads_the_number_arrays_and_leaves_the_strings_out(tmp_path: Path) -> None:
    """As values beside tensors in a torch.save dict: the file is a state dict with other values."""
    path = tmp_path / "mix.npz"
    np.savez(path, weight=np.arange(6, dtype=np.float32).reshape(2, 3), step=np.array(7), names=NOT_NUMBERS["str"])
    state = torchkeep.load(path)
    assert set(state) == {"weight", "step"}
    assert torch.equal(state["weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    raw = torchkeep.load_raw(path)  # the whole file, strings included
    assert raw["names"].tolist() == ["conv", "fc"]
    contents = classify(raw)
    assert contents.layout == "state dict with other values"
    assert {p.key: p.role for p in contents.parts} == {"weight": "tensor", "step": "tensor", "names": "other"}


def test_a_single_string_array_npy_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "names.npy"
    np.save(path, NOT_NUMBERS["str"])
    with pytest.raises(CorruptCheckpointError, match="single NumPy array"):
        torchkeep.load(path)


def test_big_endian_arrays_are_numbers_and_load_in_native_order(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    np.savez(path, w=np.arange(4, dtype=">f4"))
    assert torch.equal(torchkeep.load(path)["w"], torch.arange(4, dtype=torch.float32))


def test_the_classifier_asks_what_torch_holds() -> None:
    assert all(not holds_numbers(a) for a in NOT_NUMBERS.values())
    assert not holds_numbers(np.array([{"a": 1}], dtype=object))
    assert holds_numbers(np.zeros(2, np.float16)) and holds_numbers(np.zeros(2, bool)) and holds_numbers(torch.zeros(1))
    assert not is_weights({"w": np.zeros(2), "names": NOT_NUMBERS["str"]})
    assert is_weights({"w": np.zeros(2), "b": np.zeros(1, ">i8")})


def test_load_checkpoint_reads_big_endian_arrays_into_a_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torch.nn.Linear(3, 2)
    path = tmp_path / "weights.npz"
    np.savez(path, **{k: v.detach().numpy().astype(">f4") for k, v in source.state_dict().items()})
    model = torch.nn.Linear(3, 2)
    torchkeep.load_checkpoint(path, model=model)
    assert torch.equal(model.weight, source.weight) and torch.equal(model.bias, source.bias)
