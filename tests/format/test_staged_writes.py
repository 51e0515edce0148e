"""Tensors on a GPU are hashed and written through two small host buffers; the file is byte for byte the
one their host copies give. Without a GPU the same pipeline is run on host tensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import _config
from torchkeep.format import io as format_io
from torchkeep.format import staging


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "big": torch.randn(3000),  # cut in pieces
        "half": torch.randn(1001).to(torch.bfloat16),
        "small": torch.randn(7),  # goes out in the small-tensor batch on the host path
        "empty": torch.empty(0, 4),
        "mask": torch.rand(333) > 0.5,
        "ids": torch.arange(513, dtype=torch.int64),
        "matrix": torch.randn(37, 41),
    }


def test_the_staged_path_writes_the_same_bytes_as_the_host_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torchkeep.save(state(), tmp_path / "host.safetensors")
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 1024)
    monkeypatch.setattr(staging, "is_staged", lambda tensor: True)  # every tensor as if it were on a GPU
    monkeypatch.setattr(format_io, "is_staged", lambda tensor: True)
    pieces: list[int] = []
    original = staging.host_pieces

    def counted(tensors: list[torch.Tensor]) -> Iterator[tuple[int, memoryview]]:
        for index, view in original(tensors):
            assert view.nbytes <= 1024
            pieces.append(view.nbytes)
            yield index, view

    monkeypatch.setattr(staging, "host_pieces", counted)
    monkeypatch.setattr(format_io, "host_pieces", counted)
    torchkeep.save(state(), tmp_path / "staged.safetensors")
    assert (tmp_path / "staged.safetensors").read_bytes() == (tmp_path / "host.safetensors").read_bytes()
    data = sum(t.numel() * t.element_size() for t in state().values())
    assert sum(pieces) == 2 * data  # every byte passed twice: once hashed, once written
    loaded = torchkeep.load(tmp_path / "staged.safetensors")
    for key, tensor in state().items():
        assert torch.equal(loaded[key], tensor), key


def test_a_device_tensor_without_its_checksum_is_refused_by_the_planner() -> None:
    from torchkeep.format.layout import plan_file

    with pytest.raises(ValueError, match="checksums"):
        plan_file({"t": torch.empty(3, device="meta")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_state_saves_to_the_bytes_of_its_host_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 4096)
    host = state()
    on_gpu = {k: v.cuda() for k, v in host.items()}
    on_gpu["big"].mul_(1)  # queued work the staged copies must wait for
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # computed on a non-default stream: the writer's threads must wait for it
        on_gpu["matrix"] = host["matrix"].cuda() * 1
        on_gpu["conv"] = (
            torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5).cuda().contiguous(memory_format=torch.channels_last)
        )  # not contiguous: comes to the host whole
    host["conv"] = on_gpu["conv"].cpu()
    torchkeep.save(host, tmp_path / "host.safetensors")
    with torch.cuda.stream(side):
        torchkeep.save(on_gpu, tmp_path / "gpu.safetensors")
        torchkeep.save(on_gpu, tmp_path / "gpu_folder", max_shard_size=8192)  # shards written by worker threads
    assert (tmp_path / "gpu.safetensors").read_bytes() == (tmp_path / "host.safetensors").read_bytes()
    from_folder = torchkeep.load(tmp_path / "gpu_folder")
    assert all(torch.equal(from_folder[k], v) for k, v in host.items())
    manager = torchkeep.CheckpointManager(tmp_path / "run")
    model = torch.nn.Linear(300, 200).cuda()
    manager.save(1, model=model)
    fresh = torch.nn.Linear(300, 200).cuda()
    manager.restore(model=fresh)
    assert torch.equal(fresh.weight, model.weight)


def test_a_real_tensor_with_the_negative_bit_is_saved_as_its_values(tmp_path: Path) -> None:
    imaginary = torch.tensor([1 + 2j, 3 + 4j], dtype=torch.complex64).conj().imag  # a lazily negated view
    negated = torch._neg_view(torch.tensor([1.0, 2.0]))
    assert imaginary.is_neg() and negated.is_neg()
    torchkeep.save({"imaginary": imaginary, "negated": negated}, tmp_path / "n.safetensors")
    loaded = torchkeep.load(tmp_path / "n.safetensors")
    assert torch.equal(loaded["imaginary"], torch.tensor([-2.0, -4.0]))
    assert torch.equal(loaded["negated"], torch.tensor([-1.0, -2.0]))
