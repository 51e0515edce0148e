"""Metrics: Python numbers, 0-dim tensors and NumPy scalars are converted once, at save; the best is never deleted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as s

import torchkeep
from tests.conftest import requires_cuda
from torchkeep import CheckpointManager
from torchkeep.cli.main import main
from torchkeep.manager.policies import Candidate

NUMBERS: list[tuple[str, Any, float | int]] = [
    ("float", 0.25, 0.25),
    ("int", 3, 3),
    ("big int", 2**70, 2**70),
    ("0-dim float tensor", torch.tensor(0.25), 0.25),
    ("0-dim float64 tensor", torch.tensor(0.1, dtype=torch.float64), 0.1),
    ("0-dim bfloat16 tensor", torch.tensor(0.5, dtype=torch.bfloat16), 0.5),
    ("0-dim int tensor", torch.tensor(7), 7),
    ("numpy float32", np.float32(0.25), 0.25),
    ("numpy float64", np.float64(0.1), 0.1),
    ("numpy int64", np.int64(-4), -4),
    ("numpy uint8", np.uint8(200), 200),
    ("numpy 0-d array", np.array(0.25), 0.25),
    ("numpy 0-d int array", np.array(9, dtype=np.int16), 9),
]


@pytest.mark.parametrize(("what", "value", "expected"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_metric_kinds_become_plain_python_numbers(tmp_path: Path, what: str, value: Any, expected: float) -> None:
    with CheckpointManager(tmp_path, monitor="m") as mgr:
        info = mgr.save(1, metrics={"m": value}, rng=False)
        assert info.metrics == {"m": expected} and type(info.metrics["m"]) is type(expected), what
        assert mgr.best() is not None and mgr.best().step == 1  # ranked
    with CheckpointManager(tmp_path, monitor="m", read_only=True) as again:
        (reread,) = again.list()
        assert reread.metrics == {"m": expected} and type(reread.metrics["m"]) is type(expected), what
        assert reread.is_best


def test_tensor_metrics_with_grad_and_nan(tmp_path: Path) -> None:
    weight = torch.tensor(2.0, requires_grad=True)
    loss = weight * 0.25  # a graph node: requires_grad, not a leaf
    with CheckpointManager(tmp_path, monitor="loss") as mgr:
        assert mgr.save(1, metrics={"loss": loss, "nan": torch.tensor(float("nan"))}, rng=False).metrics["loss"] == 0.5
        assert math.isnan(mgr.list()[0].metrics["nan"])
    assert loss.requires_grad and loss.grad_fn is not None  # the caller's tensor is untouched
    with CheckpointManager(tmp_path, read_only=True) as again:
        assert math.isnan(again.list()[0].metrics["nan"])


@requires_cuda
def test_cuda_tensor_metrics(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, monitor="loss", keep_best=1, keep_last=1) as mgr:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.3)]:
            mgr.save(step, metrics={"loss": torch.tensor(loss, device="cuda", requires_grad=True)}, rng=False)
        assert [i.step for i in mgr.list()] == [1, 3] and mgr.best().step == 1


BAD: list[tuple[str, Any, type[Exception], str]] = [
    ("a string", "good", TypeError, "str"),
    ("None", None, TypeError, "NoneType"),
    ("a bool", True, TypeError, "bool"),
    ("a complex", 1j, TypeError, "complex"),
    ("a list", [0.5], TypeError, "list"),
    ("a 2-element tensor", torch.tensor([0.1, 0.2]), ValueError, r"shape \(2,\)"),
    ("a 1-element 1-d tensor", torch.tensor([0.1]), ValueError, r"shape \(1,\)"),
    ("a bool tensor", torch.tensor(True), TypeError, "torch.bool"),
    ("a complex tensor", torch.tensor(1j), TypeError, "complex"),
    ("a meta tensor", torch.empty((), device="meta"), ValueError, "meta"),
    ("a 2-element array", np.array([1.0, 2.0]), ValueError, r"shape \(2,\)"),
    ("a string array", np.array("x"), TypeError, "<U1"),
    ("a numpy bool", np.bool_(True), TypeError, "bool"),
    ("a numpy complex", np.complex64(1j), TypeError, "complex"),
]


@pytest.mark.parametrize(("what", "value", "error", "says"), BAD, ids=[b[0] for b in BAD])
def test_other_metric_values_are_refused_naming_the_metric(
    tmp_path: Path, what: str, value: Any, error: type[Exception], says: str
) -> None:
    with CheckpointManager(tmp_path, monitor="val_acc") as mgr:
        mgr.save(1, metrics={"val_acc": 0.5}, rng=False)
        with pytest.raises(error, match=f"metric 'val_acc'.*{says}"):
            mgr.save(2, metrics={"val_acc": value}, rng=False)
        assert [i.step for i in mgr.list()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == ["step-00000001"]


def test_metric_names_must_be_strings(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr, pytest.raises(TypeError, match="metric names must be str"):
        mgr.save(1, metrics={1: 0.5}, rng=False)  # type: ignore[dict-item]


def test_the_best_survives_when_metrics_are_tensors_and_numpy(tmp_path: Path) -> None:
    # The reported bug: 0-dim tensor metrics were not ranked, so keep_last deleted the best.
    losses = [torch.tensor(0.1), np.float32(0.5), torch.tensor(0.3, dtype=torch.float64), np.array(0.4), 0.6]
    with CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss") as mgr:
        for step, loss in enumerate(losses, start=1):
            mgr.save(step, metrics={"loss": loss}, rng=False)
        assert [i.step for i in mgr.list()] == [1, 5]
        assert mgr.best().step == 1
        assert mgr.restore("best", rng=False)["step"] == 1


def test_nan_is_kept_but_never_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss") as mgr:
        mgr.save(1, metrics={"loss": float("nan")}, rng=False)
        assert mgr.best() is None
        mgr.save(2, metrics={"loss": torch.tensor(0.5)}, rng=False)
        mgr.save(3, metrics={"loss": np.float64("nan")}, rng=False)
        assert [i.step for i in mgr.list()] == [2, 3] and mgr.best().step == 2
    assert main(["ls", str(tmp_path), "--monitor", "loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "2" and lines[1].endswith("best")
    assert "loss=nan" in lines[2] and lines[2].endswith("latest")


KINDS = s.sampled_from(["float", "tensor", "tensor64", "numpy32", "numpy64", "array", "nan", "none"])


def as_kind(value: float, kind: str) -> Any:
    return {
        "float": value,
        "tensor": torch.tensor(value, dtype=torch.float32),
        "tensor64": torch.tensor(value, dtype=torch.float64),
        "numpy32": np.float32(value),
        "numpy64": np.float64(value),
        "array": np.array(value, dtype=np.float32),
        "nan": torch.tensor(float("nan")),
    }.get(kind)


@given(entries=s.lists(s.tuples(s.floats(0, 10, allow_nan=False, width=32), KINDS), min_size=1, max_size=8))
def test_keep_best_never_deletes_the_best(tmp_path_factory: pytest.TempPathFactory,
                                          entries: list[tuple[float, str]]) -> None:  # fmt: skip
    directory = tmp_path_factory.mktemp("best")
    best: tuple[float, int] | None = None
    with CheckpointManager(directory, keep_last=1, keep_best=1, monitor="loss") as mgr:
        for step, (value, kind) in enumerate(entries, start=1):
            metric = as_kind(value, kind)
            mgr.save(step, metrics={} if metric is None else {"loss": metric}, rng=False)
            if kind not in ("nan", "none"):
                best = min(best or (math.inf, 0), (value, step))
            kept = {i.step for i in mgr.list()}
            assert step in kept
            if best is not None:
                assert best[1] in kept and mgr.best().step == best[1]
            assert len(kept) <= 2


def test_keep_best_policy_ranks_any_real_number_and_skips_the_rest() -> None:
    candidates = [
        Candidate(1, {"loss": np.float32(0.3)}),
        Candidate(2, {"loss": np.int64(0)}),
        Candidate(3, {"loss": float("nan")}),
        Candidate(4, {"loss": 0.2}),
        Candidate(5, {"loss": True}),
        Candidate(6, {"loss": "0.1"}),
        Candidate(7, {"loss": np.float64("nan")}),
        Candidate(8, {}),
    ]
    assert torchkeep.KeepBest(8, "loss").ranked(candidates) == [2, 4, 1]
    assert torchkeep.KeepBest(8, "loss", "max").ranked(candidates) == [1, 4, 2]
