"""Progress bars: on a terminal past 100 MB, never in pipes and logs unless --progress asks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.cli.main import main
from torchkeep.cli.progress import THRESHOLD_BYTES, Bar


def test_a_bar_shows_on_a_terminal_only_past_the_threshold() -> None:
    pipe = io.StringIO()
    bar = Bar("verifying", stream=pipe)
    bar(THRESHOLD_BYTES, 2 * THRESHOLD_BYTES)
    bar(2 * THRESHOLD_BYTES, 2 * THRESHOLD_BYTES)
    assert pipe.getvalue() == ""  # not a terminal: nothing

    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        small = Bar("verifying", stream=terminal)
        small(10, 20)
        small(20, 20)
        terminal.flush()
        big = Bar("verifying", stream=terminal)
        big(THRESHOLD_BYTES, 2 * THRESHOLD_BYTES)
        big(2 * THRESHOLD_BYTES, 2 * THRESHOLD_BYTES)
        terminal.flush()
        shown = os.read(leader, 65536).decode(errors="replace")
    os.close(leader)
    assert "verifying" in shown and "210M" in shown  # the big one: its total in bytes
    assert "/20.0" not in shown  # the small one stayed silent


def test_commands_show_bars_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchkeep.save({"w": torch.randn(1000)}, tmp_path / "a.safetensors")
    torchkeep.save({"w": torch.randn(1000)}, tmp_path / "b.safetensors")
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["verify", a]) == 0
    assert capsys.readouterr().err == ""  # small and not a terminal
    commands = {
        "verifying": ["verify", a, "--progress"],
        "comparing": ["diff", a, a, "--progress"],
        "averaging": ["average", a, b, "-o", str(tmp_path / "avg.safetensors"), "--progress"],
    }
    for label, argv in commands.items():
        assert main(argv) == 0, argv
        err = capsys.readouterr().err
        assert f"\r{label}:" in err and "B/s" in err, (argv, err)
