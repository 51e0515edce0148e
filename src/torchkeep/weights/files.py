"""Which files a weights path refers to: one file, a sharded folder, or its index."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchkeep import _config
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format.names import member, refuse_special
from torchkeep.format.sharding import parse_index

SAFETENSORS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Names of pickle-based and NumPy weight files (read by content in weights/legacy.py).
FOREIGN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".npy", ".npz")


@dataclass(frozen=True)
class WeightFiles:
    """The files holding one set of weights; ``expected`` is the index's weight map, if any."""

    root: Path
    files: tuple[str, ...]
    index: str | None = None
    expected: dict[str, str] | None = None

    def path(self, name: str) -> str:
        return str(self.root / name)


def resolve(path: str | os.PathLike[str]) -> WeightFiles:
    """Find the weight files behind ``path`` (a file, an index file, or a folder)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(p)
    refuse_special(p)  # a FIFO or a device under a weights name: reading it could block forever
    if p.is_dir():
        return _resolve_dir(p)
    if p.name.endswith(INDEX_SUFFIX) or p.suffix == ".json":
        return _from_index(p)
    return WeightFiles(root=p.parent, files=(p.name,))


def _resolve_dir(folder: Path) -> WeightFiles:
    index = folder / _config.INDEX_FILE_NAME
    if index.is_file():
        return _from_index(index)
    single = folder / _config.SINGLE_FILE_NAME
    if single.is_file():
        return WeightFiles(root=folder, files=(single.name,))
    indexes = sorted(q for q in folder.glob("*" + INDEX_SUFFIX) if q.is_file())
    if len(indexes) == 1:
        return _from_index(indexes[0])
    files = sorted(q.name for q in folder.glob("*" + SAFETENSORS_SUFFIX) if q.is_file() and not q.name.startswith("."))
    if len(files) == 1:
        return WeightFiles(root=folder, files=(files[0],))
    if not files:
        return _resolve_pickled_dir(folder)
    raise CheckpointNotFoundError(
        folder, f"folder holds {len(files)} .safetensors files and no index; pass one file: {files[:5]}"
    )


def _resolve_pickled_dir(folder: Path) -> WeightFiles:
    """Hugging Face ``pytorch_model.bin`` (sharded or not), or one torch.save file."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        return _from_index(index)
    single = folder / "pytorch_model.bin"
    if single.is_file():
        return WeightFiles(root=folder, files=(single.name,))
    files = sorted(q.name for q in folder.iterdir() if q.is_file() and q.suffix in FOREIGN_SUFFIXES)
    if len(files) == 1:
        return WeightFiles(root=folder, files=(files[0],))
    if not files:
        raise CheckpointNotFoundError(folder, "folder holds no .safetensors weights (nor .bin/.pt/.pth/.ckpt)")
    raise CheckpointNotFoundError(folder, f"folder holds {len(files)} weight files and no index; pass one: {files[:5]}")


def _from_index(index: Path) -> WeightFiles:
    refuse_special(index)
    try:
        if index.stat().st_size > _config.MAX_JSON_BYTES:
            raise CorruptCheckpointError(index, f"index is over the limit of {_config.MAX_JSON_BYTES} bytes")
        raw = index.read_bytes()
    except IsADirectoryError as exc:
        raise CheckpointNotFoundError(index, "is a directory") from exc
    weight_map = parse_index(raw, str(index))
    files = tuple(dict.fromkeys(weight_map.values()))
    for name in files:
        if not member(index.parent, name, index, what="shard").is_file():
            raise CorruptCheckpointError(index, f"index names shard {name!r}, which does not exist")
    return WeightFiles(root=index.parent, files=files, index=index.name, expected=weight_map)
