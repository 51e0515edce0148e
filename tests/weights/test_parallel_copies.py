"""load_into copies plain parameters itself, in ranges on a few threads; hooks and custom loaders still run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep import _config
from torchkeep.format.staging import copy_through_staging, split_copies
from torchkeep.state.copies import copy_into_live, direct_destinations


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the parallel path run on test-sized models: split anything over 1 KiB into 1 KiB pieces."""
    monkeypatch.setattr(_config, "PARALLEL_COPY_BYTES", 1)
    monkeypatch.setattr(_config, "COPY_PIECE_BYTES", 1024)


def model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Linear(96, 33), nn.Embedding(300, 17), nn.LayerNorm(17)
    )


def test_split_cuts_contiguous_tensors_in_ranges_that_cover_every_element() -> None:
    destination, source = torch.zeros(1000), torch.arange(1000, dtype=torch.float32)
    pieces = split_copies([(destination, source)], 256)
    assert len(pieces) == 16  # 4000 bytes in 64-element pieces
    for d, s in pieces:
        d.copy_(s)
    assert torch.equal(destination, source)


@pytest.mark.usefixtures("small_pieces")
def test_parallel_load_into_is_bit_exact_with_batchnorm_and_a_cast(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = model()
    trained.train()
    trained[1](torch.randn(8, 96))  # BatchNorm's running stats and counter move
    torchkeep.save(trained, tmp_path / "w.safetensors")
    torchkeep.save(copy.deepcopy(trained).half(), tmp_path / "half.safetensors")

    fresh = model()
    report = torchkeep.load_into(fresh, tmp_path / "w.safetensors")
    assert report.ok
    for (key, want), got in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(want, got), key
    assert fresh[1].num_batches_tracked.item() == 1

    cast = model()
    torchkeep.load_into(cast, tmp_path / "half.safetensors")
    assert torch.equal(cast[0].weight, trained[0].weight.half().float())


def test_a_custom_loader_keeps_its_subtree_and_hooks_keep_everything_on_load_state_dict() -> None:
    net = model()
    direct = direct_destinations(net, set(net.state_dict()))
    assert "0.weight" in direct and "4.weight" in direct
    assert not [k for k in direct if k.startswith("1.")]  # BatchNorm has its own _load_from_state_dict

    seen: list[str] = []

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        seen.extend(state_dict)

    net[5].register_load_state_dict_pre_hook(hook)
    assert direct_destinations(net, set(net.state_dict())) == {}
    source = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    torchkeep.load_into(net, source)
    assert sorted(seen) == ["5.bias", "5.weight"]  # the hook ran, with its keys, as load_state_dict gives them
    assert torch.equal(net[0].weight, torch.ones(96, 64))


@pytest.mark.usefixtures("small_pieces")
def test_non_contiguous_destinations_and_the_rest_are_returned_with_metadata() -> None:
    net = nn.Linear(40, 30)
    net.weight = nn.Parameter(torch.zeros(30, 40).t().contiguous().t())  # a transposed (non-contiguous) parameter
    source = type(net.state_dict())({"weight": torch.randn(30, 40), "bias": torch.randn(30), "extra": torch.zeros(1)})
    source._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    rest = copy_into_live(net, dict(source) | {})
    assert set(rest) == {"extra"}
    assert torch.equal(net.weight, source["weight"]) and torch.equal(net.bias, source["bias"])

    kept = copy_into_live(net, source)
    assert getattr(kept, "_metadata", None) == {"": {"version": 1}}


def test_staging_moves_every_piece_through_two_small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline a CUDA load takes, run with host destinations: casts both ways, ranges, odd layouts."""
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 256)
    torch.manual_seed(0)
    sources = [
        torch.randn(1000),  # float32 into bfloat16: the source side sets the piece size
        torch.randn(300).to(torch.bfloat16),  # bfloat16 into float32: the destination side does
        torch.randn(40, 50).t(),  # a non-contiguous source, too large for one buffer
        torch.rand(77) > 0.5,
        torch.empty(0),
        torch.arange(10, dtype=torch.int64),
    ]
    destinations = [
        torch.zeros(1000, dtype=torch.bfloat16),
        torch.zeros(300),
        torch.zeros(50, 40),
        torch.zeros(77, dtype=torch.bool),
        torch.zeros(0),
        torch.zeros(10, dtype=torch.int64),
    ]
    non_contiguous_destination = torch.zeros(40, 50).t()  # too large and not contiguous: copied directly
    sources.append(torch.randn(50, 40))
    destinations.append(non_contiguous_destination)
    expected = [d.clone().copy_(s) for d, s in zip(destinations, sources, strict=True)]

    sent: list[int] = []
    from torchkeep.format import staging

    monkeypatch.setattr(staging._Lane, "__init__", _recording_lane_init(staging._Lane.__init__, sent))
    copy_through_staging(list(zip(destinations, sources, strict=True)))
    for got, want in zip(destinations, expected, strict=True):
        assert torch.equal(got, want)
    assert sent == [256, 256]  # two buffers, each as large as the largest piece, never more


def _recording_lane_init(original: Any, sizes: list[int]) -> Any:
    def init(self: Any, nbytes: int, device: torch.device) -> None:
        sizes.append(nbytes)
        original(self, nbytes, device)

    return init


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_into_a_cuda_model_goes_through_pinned_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 4096)
    torch.manual_seed(0)
    trained = model()
    trained[1](torch.randn(8, 96))
    torchkeep.save(trained, tmp_path / "w.safetensors")
    fresh = model().cuda()
    fresh[0].weight.mul_(3)  # a kernel queued on the current stream, which the staged copies must wait for
    assert torchkeep.load_into(fresh, tmp_path / "w.safetensors").ok
    for (key, want), got in zip(trained.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert got.is_cuda and torch.equal(want, got.cpu()), key
    half = model().cuda().half()
    torchkeep.load_into(half, tmp_path / "w.safetensors")
    assert torch.equal(half[0].weight.cpu(), trained[0].weight.half())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64, bias=False)
        self.b.weight = self.a.weight


@pytest.mark.usefixtures("small_pieces")
def test_tied_weights_get_the_last_keys_value_as_load_state_dict_gives_it() -> None:
    source = {"a.weight": torch.zeros(64, 64), "b.weight": torch.ones(64, 64)}
    assert direct_destinations(Tied(), set(source)) == {}  # never two threads on one memory
    for _ in range(5):
        model, reference = Tied(), Tied()
        torchkeep.load_into(model, source)
        reference.load_state_dict(source)
        assert torch.equal(model.a.weight, reference.a.weight) and torch.equal(model.a.weight, torch.ones(64, 64))


def test_an_overridden_load_state_dict_still_runs() -> None:
    class Doubling(nn.Linear):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            return super().load_state_dict({k: v * 2 for k, v in state_dict.items()}, strict=strict, assign=assign)

    net = Doubling(3, 2)
    torchkeep.load_into(net, {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert torch.equal(net.weight, torch.full((2, 3), 2.0))
