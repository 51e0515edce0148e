"""A background save that fails while nothing waits for it is reported on stderr at interpreter exit,
naming the checkpoint and the error; one whose error was raised to the program is not reported again.

Each case is a real Python process whose files may grow to 1 MiB only (RLIMIT_FSIZE): writing a larger
tensor file fails with EFBIG in the background, as a full disk would, with no root and no mount."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses RLIMIT_FSIZE and SIGXFSZ")

PRELUDE = """
import resource, signal, sys, torch, torchkeep
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
where = sys.argv[1]
big = torch.zeros(1 << 20)  # 4 MiB: its tensor file cannot be written
"""


def run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = PRELUDE + textwrap.dedent(body) + '\nprint("training done", flush=True)\n'
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)


def assert_reported(done: subprocess.CompletedProcess[str], path: Path) -> None:
    assert done.stdout.strip() == "training done"  # the program itself ran to its end
    assert f"the background save of {path}" in done.stderr
    assert "failed" in done.stderr and "was not saved" in done.stderr
    assert "CheckpointWriteError" in done.stderr and "EFBIG" in done.stderr
    assert done.stderr.count("the background save of") == 1
    # The exit status stays 0: the interpreter fixes it before exit functions run (see the README).
    assert done.returncode == 0


def test_an_async_managers_last_save_that_fails_unwaited_is_reported(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        """
        mgr = torchkeep.CheckpointManager(where + "/run", keep_last=2, async_save=True)
        mgr.save(1, w=torch.zeros(10)).wait()
        mgr.save(2, w=big)  # the script's final checkpoint; nothing waits for it
        """,
    )
    assert_reported(done, tmp_path / "run" / "step-00000002")
    assert "(step 2)" in done.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("step-")) == ["step-00000001"]


def test_an_error_of_a_manager_collected_before_exit_is_still_reported(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        """
        def train():
            mgr = torchkeep.CheckpointManager(where + "/run", async_save=True)
            mgr.save(1, w=big)  # fails; the manager is dropped (and finalised) when train() returns

        train()
        import gc; gc.collect()
        """,
    )
    assert_reported(done, tmp_path / "run" / "step-00000001")


def test_a_nonblocking_save_checkpoint_that_fails_unwaited_is_reported(tmp_path: Path) -> None:
    done = run(tmp_path, 'torchkeep.save_checkpoint(where + "/final", w=big, blocking=False)\n')
    assert_reported(done, tmp_path / "final")
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize(
    "collect",
    [
        "handle.wait()",
        "mgr.wait()",
        "mgr.close()",
        "mgr.save(3, w=torch.zeros(10))",
    ],
)
def test_an_error_raised_to_the_program_is_not_reported_again(tmp_path: Path, collect: str) -> None:
    done = run(
        tmp_path,
        f"""
        mgr = torchkeep.CheckpointManager(where + "/run", async_save=True)
        mgr.save(1, w=torch.zeros(10)).wait()
        handle = mgr.save(2, w=big)
        try:
            {collect}
        except torchkeep.CheckpointWriteError as exc:
            print("caught", type(exc).__name__, file=sys.stderr)
        """,
    )
    assert done.returncode == 0 and done.stdout.strip() == "training done"
    assert done.stderr.strip() == "caught CheckpointWriteError"


def test_a_wait_that_times_out_does_not_take_the_error(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        """
        import concurrent.futures
        handle = torchkeep.save_checkpoint(where + "/final", w=torch.zeros(64 << 20), blocking=False)
        try:
            handle.wait(timeout=0)  # 256 MiB: still writing (or else failed already: then this raises it)
            timed_out = False
        except concurrent.futures.TimeoutError:
            timed_out = True
        except torchkeep.CheckpointWriteError:
            timed_out = False
        print("timed out" if timed_out else "raised", flush=True)
        """,
    )
    first, _, rest = done.stdout.partition("\n")
    assert rest.strip() == "training done"
    if first == "timed out":
        assert "the background save of" in done.stderr and "EFBIG" in done.stderr
    else:
        assert "the background save of" not in done.stderr


def test_a_successful_background_save_says_nothing_at_exit(tmp_path: Path) -> None:
    done = run(
        tmp_path,
        """
        mgr = torchkeep.CheckpointManager(where + "/run", async_save=True)
        mgr.save(1, w=torch.zeros(10))
        torchkeep.save_checkpoint(where + "/one", w=torch.zeros(10), blocking=False)
        """,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert (tmp_path / "run" / "step-00000001").is_dir() and (tmp_path / "one").is_dir()
