"""Plain values in checkpoints come back with exact types, and what needs pickle is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as s

import torchkeep
from tests.checkpoint.helpers import assert_same_state

scalars = (
    s.none()
    | s.booleans()
    | s.integers(-(2**70), 2**70)
    | s.floats(allow_nan=True, allow_infinity=True)
    | s.text(max_size=10)
)
keys = s.none() | s.booleans() | s.integers(-5, 5) | s.text(max_size=6) | s.floats(allow_nan=False)
values = s.recursive(
    scalars,
    lambda children: (
        s.lists(children, max_size=4) | s.tuples(children, children) | s.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


@given(value=values)
def test_nested_plain_values_round_trip_exactly(tmp_path: Path, value: Any) -> None:
    torchkeep.save_checkpoint(tmp_path / "c", rng=False, value=value)
    assert_same_state(value, torchkeep.load_checkpoint(tmp_path / "c", rng=False)["value"])


def test_tensors_arrays_and_torch_types(tmp_path: Path) -> None:
    state = {
        "loss": torch.tensor(0.25),
        "loss_grad": torch.tensor(1.5, requires_grad=True),
        "ints": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "bf16": torch.randn(3).bfloat16(),
        "view": torch.randn(4, 4).t(),
        "array": np.arange(12, dtype=np.float32).reshape(3, 4),
        "big_endian": np.arange(3, dtype=">i4"),
        "fortran": np.asfortranarray(np.ones((2, 3))),
        "bool_array": np.array([True, False]),
        "np_f32": np.float32(1.5),
        "np_i64": np.int64(-3),
        "np_bool": np.bool_(True),
        "np_c64": np.complex64(1 + 2j),
        "np_str": np.str_("hi"),
        "np_nan": np.float64("nan"),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "neg_zero": -0.0,
        "nan": float("nan"),
        "inf": (float("inf"), float("-inf")),
        "int_keys": {1: "a", 2: {"nested": [1, 2.5, None]}},
        "config": {"layers": [64, 32], "act": "relu", "dropout": 0.1},
    }
    torchkeep.save_checkpoint(tmp_path / "c", rng=False, **state)
    loaded = torchkeep.load_checkpoint(tmp_path / "c", rng=False)
    assert_same_state(state, loaded)
    assert loaded["loss"].dim() == 0
    assert loaded["loss_grad"].requires_grad
    assert loaded["big_endian"].dtype == np.dtype(">i4")
    assert list(loaded) == list(state)  # key order survives


def test_manifest_is_plain_json_and_tensors_plain_safetensors(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "c", model=torch.nn.Linear(2, 2), epoch=4, rng=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == "torchkeep.checkpoint" and manifest["version"] == 1
    assert manifest["state"] == {"epoch": 4}
    weights = torchkeep.load(tmp_path / "c" / "tensors.safetensors")
    assert set(weights) == {"model.weight", "model.bias"}


class HoldsAFunction:
    def __init__(self) -> None:
        self.fn = lambda epoch: 0.9**epoch

    def __call__(self, epoch: int) -> float:
        return float(self.fn(epoch))


def test_values_that_need_pickle_are_refused_naming_where(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnsupportedValueError, match=r"cfg\.hook") as info:
        torchkeep.save_checkpoint(tmp_path / "c", rng=False, cfg={"hook": lambda x: x})
    assert "pickle" in str(info.value)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=HoldsAFunction())
    with pytest.raises(torchkeep.UnsupportedValueError, match=r"scheduler\.lr_lambdas\[0\]\.fn"):
        torchkeep.save_checkpoint(tmp_path / "c", scheduler=scheduler, rng=False)
    with pytest.raises(torchkeep.UnsupportedValueError, match="object"):
        torchkeep.save_checkpoint(tmp_path / "c", rng=False, arr=np.array([object()]))
    with pytest.raises(torchkeep.UnsupportedValueError):
        torchkeep.save_checkpoint(tmp_path / "c", rng=False, s={1, 2})
    assert not (tmp_path / "c").exists()


def test_plain_lambda_schedulers_are_fine(tmp_path: Path) -> None:
    """LambdaLR keeps no state for a plain function: the lambda given at construction is used."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda e: 0.5**e)
    opt.step()
    scheduler.step()
    torchkeep.save_checkpoint(tmp_path / "c", optimizer=opt, scheduler=scheduler, rng=False)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda=lambda e: 0.5**e)
    torchkeep.load_checkpoint(tmp_path / "c", optimizer=opt2, scheduler=scheduler2, rng=False)
    assert scheduler2.last_epoch == 1 and opt2.param_groups[0]["lr"] == 0.05
