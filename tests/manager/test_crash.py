"""Real processes, real SIGKILLs: resumed runs are bit-identical and no kill loses the last good state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchkeep
from tests.checkpoint.helpers import assert_same_state

SCRIPT = Path(__file__).with_name("resume_script.py")
ROOT = Path(__file__).parents[2]


def run_script(*args: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, check=True)  # fmt: skip


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sigkilled_then_resumed_run_is_bit_identical(tmp_path: Path, optimizer: str) -> None:
    total, stop_at = 14, 7  # 5 batches an epoch: the kill lands mid-epoch
    run_script(tmp_path / "whole", tmp_path / "whole.out", total, optimizer)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, (tmp_path / "cut", tmp_path / "cut.out", total, optimizer, stop_at))],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["saved", str(stop_at)]
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    run_script(tmp_path / "cut", tmp_path / "cut.out", total, optimizer)

    whole = torchkeep.load_checkpoint(tmp_path / "whole.out", rng=False)
    resumed = torchkeep.load_checkpoint(tmp_path / "cut.out", rng=False)
    assert len(whole["losses"]) == total
    assert whole["losses"] == resumed["losses"]
    a, b = (
        torchkeep.load(tmp_path / "whole.out" / "tensors.safetensors"),
        torchkeep.load(tmp_path / "cut.out" / "tensors.safetensors"),
    )
    assert_same_state(a, b)  # parameters, optimizer moments, step counters, bit for bit
    manifest = json.loads((tmp_path / "whole.out" / "manifest.json").read_text())
    assert "scheduler" in manifest["objects"]


CHILD = textwrap.dedent("""
    import sys, torch, torchkeep
    mgr = torchkeep.CheckpointManager(sys.argv[1], keep_last=2)
    latest = mgr.latest()
    step = latest.step if latest else 0
    print("ready", flush=True)
    while True:
        step += 1
        mgr.save(step, rng=False, w=torch.full((3_000_000,), float(step)), b=torch.arange(step))
""")


def test_fifty_sigkills_during_saves_never_lose_the_last_good_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    restored_steps = []
    for _ in range(50):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                 env=env)  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        with torchkeep.CheckpointManager(tmp_path) as mgr:
            assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "leftovers must be cleaned at start"
            infos = mgr.list()
            if not infos:
                continue
            state = mgr.restore(rng=False)  # verifies every checksum
            step = state["step"]
            assert step == infos[-1].step
            assert torch.equal(state["w"], torch.full((3_000_000,), float(step)))
            assert torch.equal(state["b"], torch.arange(step))
            restored_steps.append(step)
    assert len(restored_steps) >= 40 and restored_steps == sorted(restored_steps)
