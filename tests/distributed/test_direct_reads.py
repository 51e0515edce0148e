"""The checked DCP reader reads each verified chunk straight into its destination, or leaves it to DCP."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from torchkeep.checkpoint.direct_reads import CheckedReader
from torchkeep.format.pickle.dcp import dcp_metadata


def _load(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, storage_reader=CheckedReader(folder, dcp_metadata(folder)), no_dist=True)


def test_every_kind_of_destination_gets_the_saved_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = {
        "plain": torch.randn(64, 32),
        "transposed": torch.randn(32, 64).t(),  # stored with its strides: not read directly
        "half": torch.randn(16, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "ints": torch.arange(10, dtype=torch.int64),
    }
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(saved, checkpoint_id=str(tmp_path))
    targets = {
        "plain": torch.zeros(64, 32),
        "transposed": torch.zeros(64, 32),
        "half": torch.zeros(16, dtype=torch.float32),  # a cast: DCP's copy
        "scalar": torch.zeros(()),
        "ints": torch.zeros(10, dtype=torch.int64),
    }
    plain_memory = targets["plain"].data_ptr()
    _load(tmp_path, targets)
    assert targets["plain"].data_ptr() == plain_memory  # filled in place
    assert torch.equal(targets["plain"], saved["plain"])
    assert torch.equal(targets["transposed"], saved["transposed"])
    assert torch.equal(targets["half"], saved["half"].float())
    assert torch.equal(targets["scalar"], saved["scalar"])
    assert torch.equal(targets["ints"], saved["ints"])

    again = {"plain": torch.empty(32, 64).t(), "transposed": torch.zeros(32, 64).t()}
    _load(tmp_path, again)  # non-contiguous destinations: DCP's copy
    assert not again["plain"].is_contiguous()
    assert torch.equal(again["plain"], saved["plain"]) and torch.equal(again["transposed"], saved["transposed"])
