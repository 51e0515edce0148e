"""CheckpointManager: commits, listing, retention, restore with fallback, locking, space."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as s
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state
from torchkeep import CheckpointManager


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def test_save_list_latest_best_and_restore(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, monitor="val_acc", mode="max") as mgr:
        models = {}
        for step, acc in [(10, 0.5), (20, 0.9), (30, 0.7)]:
            models[step] = tiny_model(step)
            info = mgr.save(step, metrics={"val_acc": acc}, model=models[step], epoch=step // 10)
            assert info.path == tmp_path / f"step-{step:08d}" and info.path.is_dir()
        assert [i.step for i in mgr.list()] == [10, 20, 30]
        assert mgr.latest().step == 30 and mgr.latest().is_latest
        assert mgr.best().step == 20 and mgr.best().is_best
        assert (tmp_path / "latest").read_text().strip() == "step-00000030"
        target = tiny_model(99)
        state = mgr.restore(model=target)
        assert state == {"epoch": 3, "step": 30}
        assert_same_state(models[30].state_dict(), target.state_dict())
        assert mgr.restore("best", model=target)["step"] == 20
        assert_same_state(models[20].state_dict(), target.state_dict())
        assert mgr.restore(10, model=target)["epoch"] == 1
        with pytest.raises(ValueError, match="already saved"):
            mgr.save(30, model=target)
        with pytest.raises(torchkeep.CheckpointNotFoundError):
            mgr.restore(11, model=target)


def test_a_new_manager_rebuilds_its_view_from_the_directory(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, template="ckpt-{step}") as mgr:
        mgr.save(1, metrics={"loss": 2.0}, rng=False, note="a")
        mgr.save(2, metrics={"loss": 1.0}, rng=False, note="b")
    (tmp_path / "ckpt-final").mkdir()  # not ours: the name does not fit the template
    (tmp_path / "notes.txt").write_text("mine")
    with CheckpointManager(tmp_path, template="ckpt-{step}", monitor="loss") as again:
        assert [(i.step, i.metrics) for i in again.list()] == [(1, {"loss": 2.0}), (2, {"loss": 1.0})]
        assert again.restore(rng=False)["note"] == "b"
        assert again.best().step == 2


def test_should_save(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, save_every=5) as mgr:
        assert [s for s in range(12) if mgr.should_save(s)] == [0, 5, 10]
        mgr.save(5, rng=False)
        assert not mgr.should_save(5)


def test_retention_keeps_latest_and_best_and_never_touches_other_files(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("keep me")
    (tmp_path / "step-notmine").mkdir()
    with CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss") as mgr:
        for step, loss in [(1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3), (5, 0.6)]:
            mgr.save(step, metrics={"loss": loss}, rng=False)
        assert [i.step for i in mgr.list()] == [1, 4, 5]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".torchkeep.lock", "README", "latest", "step-00000001", "step-00000004", "step-00000005",
                     "step-notmine"]  # fmt: skip


def reference_kept(
    history: list[tuple[int, float | None]], keep_last: int, keep_best: int | None, keep_every: int | None
) -> set[int]:
    """Retention written out plainly, applied after every save as the manager does."""
    alive: dict[int, float | None] = {}
    for step, loss in history:
        alive[step] = loss
        keep = set(sorted(alive)[-keep_last:])
        keep.add(max(alive))
        scored = sorted((v, s) for s, v in alive.items() if v is not None)
        if scored:
            keep.add(scored[0][1])
        if keep_best:
            keep |= {s for _, s in scored[:keep_best]}
        if keep_every:
            keep |= {s for s in alive if s % keep_every == 0}
        alive = {s: v for s, v in alive.items() if s in keep}
    return set(alive)


@given(
    deltas=s.lists(s.integers(1, 4), min_size=1, max_size=9),
    losses=s.lists(s.none() | s.floats(0, 10, allow_nan=False), min_size=9, max_size=9),
    keep_last=s.integers(1, 3),
    keep_best=s.none() | s.integers(1, 2),
    keep_every=s.none() | s.integers(2, 5),
)
def test_retention_equals_the_policy(
    tmp_path_factory: pytest.TempPathFactory,
    deltas: list[int],
    losses: list[float | None],
    keep_last: int,
    keep_best: int | None,
    keep_every: int | None,
) -> None:
    directory = tmp_path_factory.mktemp("ret")
    steps = [sum(deltas[: i + 1]) for i in range(len(deltas))]
    history = list(zip(steps, losses, strict=False))
    with CheckpointManager(directory, keep_last=keep_last, keep_best=keep_best, monitor="loss",
                           keep_every=keep_every) as mgr:  # fmt: skip
        for step, loss in history:
            mgr.save(step, metrics={} if loss is None else {"loss": loss}, rng=False)
        kept = {i.step for i in mgr.list()}
    assert kept == reference_kept(history, keep_last, keep_best, keep_every)
    on_disk = {p.name for p in directory.iterdir() if p.name.startswith("step-")}
    assert on_disk == {f"step-{s:08d}" for s in kept}


def test_policies_are_validated() -> None:
    with pytest.raises(ValueError, match="monitor"):
        CheckpointManager("/tmp/unused-torchkeep", keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        torchkeep.KeepBest(1, "loss", "biggest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        torchkeep.KeepLast(0)
    with pytest.raises(ValueError, match="template"):
        CheckpointManager("/tmp/unused-torchkeep", template="no-step-here")


@pytest.mark.parametrize("victim", ["manifest.json", "tensors.safetensors"])
def test_damaged_latest_falls_back_to_the_previous_one(tmp_path: Path, victim: str) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model=tiny_model(1), rng=False, tag="one")
        mgr.save(2, model=tiny_model(2), rng=False, tag="two")
    path = tmp_path / "step-00000002" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    with CheckpointManager(tmp_path) as mgr, pytest.warns(torchkeep.TorchkeepWarning, match="step-00000002"):
        state = mgr.restore(model=tiny_model(5), rng=False)
    assert state["tag"] == "one" and state["step"] == 1


def test_incomplete_latest_and_leftover_temporaries(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, rng=False, tag="one")
        mgr.save(2, rng=False, tag="two")
    (tmp_path / "step-00000002" / "tensors.safetensors").unlink()
    leftover = tmp_path / ".step-00000003.tmp-abcdef123456"
    leftover.mkdir()
    (leftover / "tensors.safetensors").write_bytes(b"partial")
    with CheckpointManager(tmp_path) as mgr:
        assert not leftover.exists()
        assert [i.step for i in mgr.list()] == [1, 2]
        with pytest.warns(torchkeep.TorchkeepWarning):
            assert mgr.restore(rng=False)["tag"] == "one"


def test_nothing_to_restore(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr, pytest.raises(torchkeep.CheckpointNotFoundError):
        mgr.restore()


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path):
        script = f"import torchkeep; torchkeep.CheckpointManager({str(tmp_path)!r})"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "another process" in done.stderr
        CheckpointManager(tmp_path, read_only=True).list()  # readers are welcome
    CheckpointManager(tmp_path).close()  # released


def test_not_enough_free_space_fails_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchkeep.manager.manager as manager_module

    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, rng=False, w=torch.ones(4))
        monkeypatch.setattr(manager_module, "SPACE_MARGIN_BYTES", 10**18)
        with pytest.raises(torchkeep.CheckpointWriteError, match="free"):
            mgr.save(2, rng=False, w=torch.ones(4))
        assert [i.step for i in mgr.list()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["latest", "step-00000001"]


def test_disk_filling_up_mid_save_leaves_earlier_checkpoints_and_no_debris(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import resource, signal, torch, torchkeep
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mgr = torchkeep.CheckpointManager({str(tmp_path)!r})
        mgr.save(1, rng=False, w=torch.ones(1000))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            mgr.save(2, rng=False, w=torch.randn(1_000_000))
        except torchkeep.CheckpointWriteError as exc:
            print("clean error:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "clean error" in done.stdout and "intact" in done.stdout, done.stderr
    with CheckpointManager(tmp_path) as mgr:
        assert [i.step for i in mgr.list()] == [1]
        assert torch.equal(mgr.restore(rng=False)["w"], torch.ones(1000))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
