"""Real files of every kind torchkeep reads, made once by torchkeep, torch and NumPy, kept as bytes.

The fuzzers start from these: a mutation of a real file reaches far deeper than random bytes.
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import torchkeep
from tests.fuzz.harness import Rig, plain_state

Files = dict[str, bytes]  # relative path -> content


def _files(root: Path) -> Files:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_files(root: Path, files: Files) -> None:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@functools.cache
def checkpoint() -> Files:
    """save_checkpoint of a model, Adam, StepLR, GradScaler, two components, the RNGs and plain state."""
    rig = Rig(trained=True)
    with tempfile.TemporaryDirectory() as tmp:
        torchkeep.save_checkpoint(Path(tmp) / "ckpt", **rig.objects(), **plain_state())
        return _files(Path(tmp) / "ckpt")


@functools.cache
def run() -> Files:
    """A CheckpointManager directory with three steps and a monitored metric."""
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(trained=True)
        with torchkeep.CheckpointManager(Path(tmp) / "run", monitor="val", mode="max") as mgr:
            for step, val in ((1, 0.5), (2, 0.9), (3, 0.7)):
                mgr.save(step, metrics={"val": val}, **rig.objects(), epoch=step)
        return {k: v for k, v in _files(Path(tmp) / "run").items() if not k.startswith(".")}


@functools.cache
def safetensors() -> bytes:
    """One torchkeep weights file (the rig's model, checksummed)."""
    with tempfile.TemporaryDirectory() as tmp:
        torchkeep.save(Rig(trained=True).model, Path(tmp) / "w.safetensors", metadata={"epoch": "3"})
        return (Path(tmp) / "w.safetensors").read_bytes()


@functools.cache
def tied_safetensors() -> bytes:
    """A weights file with an alias (two names, one storage)."""
    a = torch.randn(2, 3)
    state = {"encoder.weight": a, "decoder.weight": a, "bias": torch.zeros(3, dtype=torch.float16)}
    with tempfile.TemporaryDirectory() as tmp:
        torchkeep.save(state, Path(tmp) / "w.safetensors")
        return (Path(tmp) / "w.safetensors").read_bytes()


@functools.cache
def sharded() -> Files:
    """A Hugging Face sharded folder: an index and three shards."""
    state = dict(Rig(trained=True).model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        torchkeep.save(state, Path(tmp) / "m", max_shard_size="100B")
        return _files(Path(tmp) / "m")


@functools.cache
def model_folder() -> Files:
    """save_model of stock layers: torchkeep_model.json (with the structure), config.json, weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with tempfile.TemporaryDirectory() as tmp:
        torchkeep.save_model(model, Path(tmp) / "net")
        return _files(Path(tmp) / "net")


@functools.cache
def pickled() -> dict[str, bytes]:
    """torch.save archives (zip, legacy), a plain pickle and an .npz."""
    torch.manual_seed(0)
    rig = Rig(trained=True)
    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.ones(2).half(), "s": torch.tensor(1.5)}
    tutorial = {
        "epoch": 2,
        "model_state_dict": rig.model.state_dict(),
        "optimizer_state_dict": rig.optimizer.state_dict(),
        "loss": 0.5,
        "cfg": {"lr": 0.1, "sizes": (1, 2)},
    }
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save(tutorial, buf)
    out["torch_zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    out["torch_legacy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(6.0), b=np.ones(3, dtype=np.int8))
    out["npz"] = buf.getvalue()
    import pickle

    out["plain_pickle"] = pickle.dumps({"a": [1, 2.5, (3, "x")], "b": {"c": None}}, protocol=2)
    return out


def json_of(data: bytes) -> Any:
    return json.loads(data)
