"""Folders written by Hugging Face Accelerate's ``Accelerator.save_state``, read without running code.

Accelerate writes, for its first prepared model, optimizer, scheduler and scaler: ``model.safetensors``
(or ``pytorch_model.bin``), ``optimizer.bin``, ``scheduler.bin``, ``scaler.pt`` (torch.save files), and
each process's generators in ``random_states_<process>.pkl`` (a plain pickle: ``step``, ``random_state``,
``numpy_random_seed``, ``torch_manual_seed``, ``torch_cuda_manual_seed``). Objects registered with
``register_for_checkpointing`` are ``custom_checkpoint_<i>.pkl``: they come back as plain values under
that name. Further models and optimizers (``model_1.safetensors``, ``optimizer_1.bin``...) as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchkeep.errors import CorruptCheckpointError
from torchkeep.weights.legacy import read_raw
from torchkeep.weights.load import load

RNG_PREFIX = "random_states_"
# Accelerate numbers the files of each prepared kind without gaps: model, model_1, model_2...; this many
# indices are read at most.
MAX_PREPARED = 64
# torchkeep's key -> the names Accelerate gives the file of such an object ({n}: "", "_1", "_2"...), preferred first.
PREPARED_FILES = {
    "model": ("model{n}.safetensors", "pytorch_model{n}.bin"),
    "optimizer": ("optimizer{n}.bin",),
    "scheduler": ("scheduler{n}.bin",),
}


def is_accelerate_state(folder: str | os.PathLike[str]) -> bool:
    """A ``save_state`` folder: its model weights beside an optimizer, a scheduler or RNG files."""
    root = Path(folder)
    has_model = (root / "model.safetensors").is_file() or (root / "pytorch_model.bin").is_file()
    markers = ("optimizer.bin", "scheduler.bin", f"{RNG_PREFIX}0.pkl")
    return has_model and any((root / name).is_file() for name in markers)


def read_accelerate_state(
    folder: Path, *, rank: int, trusted: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The objects by torchkeep's keys (``model``, ``optimizer``, ``scheduler``, ``scaler``; further ones as
    ``components.model_1``...), the plain values (``step``, registered objects), and this rank's RNG state
    in torchkeep's form (None when the folder holds none for it)."""
    objects: dict[str, Any] = {}
    for index in range(MAX_PREPARED):
        n = f"_{index}" if index else ""
        found = {key: file for key, names in PREPARED_FILES.items() if (file := _first_file(folder, names, n))}
        if not found:
            break  # each kind numbered without gaps: an index with no file of any kind ends them all
        for key, file in found.items():
            read = load(file, trusted=trusted) if key == "model" else read_raw(str(file), trusted=trusted)
            objects[f"components.{key}{n}" if index else key] = read
    if (folder / "scaler.pt").is_file():
        objects["scaler"] = read_raw(str(folder / "scaler.pt"), trusted=trusted)
    plain: dict[str, Any] = {}
    for file in sorted(folder.glob("custom_checkpoint_*.pkl")):
        plain[file.stem] = read_raw(str(file), trusted=trusted)
    rng_file = folder / f"{RNG_PREFIX}{rank}.pkl"
    rng: dict[str, Any] | None = None
    if rng_file.is_file():
        saved = read_raw(str(rng_file), trusted=trusted)
        if isinstance(saved, dict):
            if "step" in saved:
                plain["step"] = saved["step"]
            names = {"random_state": "python", "numpy_random_seed": "numpy", "torch_manual_seed": "torch"}
            rng = {ours: saved[theirs] for theirs, ours in names.items() if theirs in saved}
            cuda = saved.get("torch_cuda_manual_seed")
            if cuda is not None and not isinstance(cuda, (list, tuple)):
                raise CorruptCheckpointError(
                    rng_file, f"torch_cuda_manual_seed is a {type(cuda).__name__}, not a list of generator states"
                )
            if cuda:  # one state per device (empty: saved without CUDA)
                rng["cuda"] = list(cuda)
    return objects, plain, rng


def _first_file(folder: Path, names: tuple[str, ...], n: str) -> Path | None:
    for name in names:
        if (folder / name.format(n=n)).is_file():
            return folder / name.format(n=n)
    return None
