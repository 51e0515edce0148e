"""One byte formatter and one on-disk size, shared by the layers that show or count them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.checkpoint.io import checkpoint_size
from torchkeep.report import html, svg
from torchkeep.weights import average, inspect


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (1024**2, "1.0 MiB"),
     (5 * 1024**3, "5.0 GiB"), (1024**4, "1.0 TiB"), (2048 * 1024**4, "2048.0 TiB")],
)  # fmt: skip
def test_one_byte_formatter_for_inspect_and_the_report(n: int, text: str) -> None:
    assert inspect.human_bytes(n) == text
    assert svg.human_bytes is inspect.human_bytes and html.human_bytes is inspect.human_bytes
    assert not hasattr(inspect, "_human")


def test_inspect_shows_sizes_with_it(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torchkeep.save({"w": torch.zeros(384)}, path)
    assert "total: 1 tensors, 384 elements, 1.5 KiB" in str(torchkeep.inspect(path))


def test_checkpoint_size_of_a_file_a_folder_with_subfolders_and_nothing(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "dcp").mkdir(parents=True)
    (tmp_path / "ckpt" / "manifest.json").write_bytes(b"x" * 10)
    (tmp_path / "ckpt" / "dcp" / "__0_0.distcp").write_bytes(b"x" * 1000)  # counted, not the folder's inode
    (tmp_path / "w.pt").write_bytes(b"x" * 7)
    assert checkpoint_size(tmp_path / "ckpt") == 1010
    assert checkpoint_size(tmp_path / "w.pt") == 7
    assert checkpoint_size(tmp_path / "missing") == 0
    assert not hasattr(average, "_size")


def test_average_reports_progress_in_the_sources_bytes(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.safetensors")
        torchkeep.save({"w": torch.full((4,), float(i))}, paths[-1])
    seen: list[tuple[int, int]] = []
    torchkeep.average(paths, tmp_path / "avg.safetensors", progress=lambda done, total: seen.append((done, total)))
    total = sum(checkpoint_size(p) for p in paths)
    assert seen == [(checkpoint_size(paths[0]), total), (total, total)]
