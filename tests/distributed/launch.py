"""Launch a scenario of ``ranks.py`` on N real processes (gloo, CPU) and collect what each rank reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("ranks.py")
ROOT = Path(__file__).resolve().parents[2]


def launch(
    scenario: str,
    world_size: int,
    workdir: Path,
    *,
    timeout: float = 240,
    expect_killed: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world_size`` ranks; every rank must exit 0 (except ``expect_killed``).

    Returns each rank's report (``report-<rank>.json``), in rank order; a killed rank reports ``{}``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f"store-{scenario}-{os.getpid()}-{len(list(workdir.iterdir()))}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(rank), str(world_size), str(store), str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world_size)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        if rank in expect_killed:
            assert proc.returncode == -9, f"rank {rank} was to be killed, exited {proc.returncode}:\n{out}"
        else:
            assert proc.returncode == 0, f"rank {rank} of {scenario} exited {proc.returncode}:\n{out}"
    reports = []
    for rank in range(world_size):
        path = workdir / f"report-{scenario}-{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else {})
    return reports
