from __future__ import annotations

import pytest

import torchkeep


def take(iterator, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    return [next(iterator) for _ in range(n)]


def test_resumed_sampler_continues_exactly_mid_epoch_and_across_epochs() -> None:
    whole = torchkeep.ResumableSampler(10, seed=3)
    reference = list(whole) + list(whole) + list(whole)
    assert sorted(reference[:10]) == list(range(10)) and reference[:10] != reference[10:20]

    first = torchkeep.ResumableSampler(10, seed=3)
    seen = list(first)
    it = iter(first)
    seen += take(it, 4)
    state = first.state_dict()
    assert state == {"seed": 3, "epoch": 1, "position": 4, "size": 10}

    second = torchkeep.ResumableSampler(10, seed=0)
    second.load_state_dict(state)
    assert len(second) == 6
    seen += list(second) + list(second)
    assert seen == reference


def test_unshuffled_and_set_epoch() -> None:
    sampler = torchkeep.ResumableSampler(list("abcd"), shuffle=False)
    assert list(sampler) == [0, 1, 2, 3]
    sampler.set_epoch(5)
    assert sampler.state_dict()["epoch"] == 5 and sampler.state_dict()["position"] == 0


def test_state_for_another_dataset_size_is_refused() -> None:
    with pytest.raises(ValueError, match="12 samples"):
        torchkeep.ResumableSampler(10).load_state_dict({"seed": 0, "epoch": 0, "position": 0, "size": 12})
