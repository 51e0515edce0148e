"""Many real manager checkpoints, made cheaply: one tensor file hard-linked, a real manifest each."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from torchkeep.checkpoint.io import write_checkpoint_dir
from torchkeep.checkpoint.layout import MANIFEST_FILE, TENSORS_FILE, SaveRequest, manifest_bytes, plan_checkpoint


def fake_run(directory: Path, steps: range, loss: Callable[[int], float]) -> None:
    """Checkpoints as a manager writes them (``info.manager == 1``), sharing one tensor file."""
    first = directory / f"step-{steps[0]:08d}"
    info = {"manager": 1, "step": steps[0], "metrics": {"loss": loss(steps[0])}, "time": 0.0}
    write_checkpoint_dir(first, plan_checkpoint(SaveRequest(rng=False, state={"w": torch.arange(4.0)}), info=info))
    plan = plan_checkpoint(SaveRequest(rng=False, state={"w": torch.arange(4.0)}))
    size = (first / TENSORS_FILE).stat().st_size
    for step in steps[1:]:
        folder = directory / f"step-{step:08d}"
        folder.mkdir()
        os.link(first / TENSORS_FILE, folder / TENSORS_FILE)
        info = {"manager": 1, "step": step, "metrics": {"loss": loss(step)}, "time": float(step)}
        manifest = dict(plan.manifest, info=info)
        (folder / MANIFEST_FILE).write_bytes(manifest_bytes(manifest, {"name": TENSORS_FILE, "size": size}))
