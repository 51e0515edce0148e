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


def test_ranks_share_one_global_position_and_resume_with_another_world_size() -> None:
    two = [torchkeep.ResumableSampler(11, seed=1, num_replicas=2, rank=r) for r in range(2)]
    its = [iter(s) for s in two]
    consumed = [i for _ in range(3) for it in its for i in take(it, 1)]  # 3 batches of 1 on each rank
    states = [s.state_dict() for s in two]
    assert states[0] == states[1] == {"seed": 1, "epoch": 0, "position": 6, "size": 11}

    three = [torchkeep.ResumableSampler(11, num_replicas=3, rank=r) for r in range(3)]
    for sampler in three:
        sampler.load_state_dict(states[0])
    rest = [list(s) for s in three]
    assert [len(r) for r in rest] == [2, 2, 2]  # 5 left, and one of padding to keep the ranks in step
    seen = consumed + [i for r in rest for i in r]
    assert sorted(set(seen)) == list(range(11))  # none skipped
    assert len(seen) == 12 and seen[-1] == two[0].order(0)[0]  # only the padding repeats (the epoch's first)
    assert all(s.state_dict()["epoch"] == 1 for s in three)


def test_ranks_pad_or_drop_the_tail_like_distributed_sampler() -> None:
    padded = [list(torchkeep.ResumableSampler(5, shuffle=False, num_replicas=2, rank=r)) for r in range(2)]
    assert padded == [[0, 2, 4], [1, 3, 0]]
    dropped = [
        list(torchkeep.ResumableSampler(5, shuffle=False, num_replicas=2, rank=r, drop_last=True)) for r in range(2)
    ]
    assert dropped == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        torchkeep.ResumableSampler(5, num_replicas=2, rank=2)
