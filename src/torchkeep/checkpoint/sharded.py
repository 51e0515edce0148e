"""The ``distributed`` part of a checkpoint's manifest, and reading its sharded tensors in one process.

A checkpoint saved by several ranks (format version 3) records, beside the usual fields::

    "distributed": {
      "world_size": 2,
      "ranks": [{"file": {"name": "rank-00000.safetensors", "size": 1234}, "rng": ..., "objects": {...},
                 "state": ...}, ...],                       # one per rank, in rank order
      "dcp": {"files": {".metadata": {"size": 901, "xxh3_64": "..."}, "__0_0.distcp": {...}, ...}}
    }

``dcp`` is there when tensors were saved sharded; the folder is then also a DCP checkpoint, and the
manifest refers to each such tensor by ``{"$dcp": key}``.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.checkpoint.layout import CHECKSUM_KEY
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.jsondoc import expect
from torchkeep.format.layout import digest
from torchkeep.format.names import is_plain_name, member
from torchkeep.format.pickle.dcp import read_dcp


@dataclass(frozen=True)
class Section:
    """A validated ``distributed`` manifest field."""

    world_size: int
    ranks: list[dict[str, Any]]
    dcp_files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return bool(self.dcp_files)


def parse_section(manifest: dict[str, Any], path: str) -> Section | None:
    """The manifest's ``distributed`` field, checked; None for a single-process checkpoint."""
    raw = manifest.get("distributed")
    if raw is None:
        return None
    expect(isinstance(raw, dict), path, "manifest field 'distributed' is not an object")
    size = raw.get("world_size")
    expect(type(size) is int and size >= 1, path, f"manifest records world size {size!r}, not a positive int")
    ranks = raw.get("ranks")
    expect(
        isinstance(ranks, list) and len(ranks) == size and all(isinstance(r, dict) for r in ranks),
        path,
        f"manifest records {size} ranks but not one entry for each",
    )
    for rank, entry in enumerate(ranks):
        file = entry.get("file")
        expect(
            isinstance(file, dict) and is_plain_name(file.get("name")) and type(file.get("size")) is int,
            path,
            f"manifest entry of rank {rank} names no plain file with a size",
        )
    files: dict[str, dict[str, Any]] = {}
    if "dcp" in raw:
        dcp = raw["dcp"]
        listed = dcp.get("files") if isinstance(dcp, dict) else None
        if not isinstance(listed, dict) or not listed:
            raise CorruptCheckpointError(path, "manifest field 'distributed.dcp' lists no files")
        for name, info in listed.items():
            expect(
                is_plain_name(name)
                and isinstance(info, dict)
                and type(info.get("size")) is int
                and isinstance(info.get(CHECKSUM_KEY), str),
                path,
                f"manifest lists DCP file {name!r:.80} without a plain name, a size and a checksum",
            )
        files = listed
    return Section(size, ranks, files)


def verify_file(root: Path, name: str, info: dict[str, Any], manifest_path: str) -> None:
    """A file of the checkpoint has the size and checksum the manifest records.

    Raises:
        CorruptCheckpointError: missing, truncated, or changed since it was written.
    """
    path = member(root, name, manifest_path, what="checkpoint file")
    if not path.is_file():
        raise CorruptCheckpointError(path, "is missing: the checkpoint is incomplete")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != info["size"]:
            raise CorruptCheckpointError(path, f"size {size} differs from the {info['size']} recorded in the manifest")
        if size == 0:
            actual = digest(b"")
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                actual = digest(mapped)
    if actual != info[CHECKSUM_KEY]:
        raise CorruptCheckpointError(path, "checksum mismatch: the file is damaged or was changed after the save")


class FullTensors:
    """Sharded tensors reassembled whole, in one process (no process group): for inference, export,
    consolidation. Every DCP file is verified first; the data is read by torchkeep's own reader."""

    def __init__(self, root: Path, section: Section, manifest_path: str) -> None:
        self.root = root
        self.section = section
        self.manifest_path = manifest_path
        self._tensors: dict[str, Any] | None = None

    def __call__(self, key: str) -> torch.Tensor:
        if self._tensors is None:
            for name, info in self.section.dcp_files.items():
                verify_file(self.root, name, info, self.manifest_path)
            self._tensors = read_dcp(self.root)
        value = self._tensors.get(key)
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(self.root, f"the sharded tensors lack {key!r:.80}, which the manifest names")
        return value
