"""What the deployment-format readers share: the kinds, how a file is described, checked zip reads."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.dtypes import dtype_name
from torchkeep.format.pickle.torchfile import MAX_DEFLATE_RATIO, ZIP_ERRORS

DeployKind = Literal["torchscript", "exported_program", "onnx"]
DEPLOY_KINDS: tuple[DeployKind, ...] = ("torchscript", "exported_program", "onnx")
KIND_TITLES: dict[DeployKind, str] = {
    "torchscript": "TorchScript archive (torch.jit.save)",
    "exported_program": "ExportedProgram archive (torch.export.save, .pt2)",
    "onnx": "ONNX model",
}
# Members read into memory whole (JSON documents, code, pickles of records); tensor data is not limited by this.
MAX_MEMBER_BYTES = 256 << 20
# Zip errors a damaged archive makes zipfile raise.

Dim = int | str


@dataclass(frozen=True)
class Port:
    """One input or output of a deployed model, as far as the file says.

    ``dtype`` and ``shape`` are None where the file does not hold them (TorchScript keeps only
    type names); a symbolic dimension is its name (``"batch"``, ``"s0"``), an unknown one ``"?"``.
    ``type`` is the file's own type text for what is not a plain tensor (``Tuple[Tensor, Tensor]``).
    """

    name: str
    dtype: str | None = None
    shape: tuple[Dim, ...] | None = None
    type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
            "type": self.type,
        }

    def __str__(self) -> str:
        if self.dtype is not None or self.shape is not None:
            shape = "" if self.shape is None else "[" + ", ".join(map(str, self.shape)) + "]"
            return f"{self.name}: {self.dtype or '?'}{shape}"
        return f"{self.name}: {self.type or 'unknown type'}"


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's name, dtype and shape, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


@dataclass(frozen=True)
class Description:
    """What a deployment file is and holds, read without running any of it.

    ``tensors`` are the weights ``torchkeep.load`` returns, in its order; ``inputs``/``outputs`` are
    None when the file does not say; ``notes`` are facts a reader should know (folded weights,
    constants left out, a signature too complex to read as text).
    """

    kind: DeployKind
    summary: str
    tensors: list[TensorMeta]
    inputs: tuple[Port, ...] | None = None
    outputs: tuple[Port, ...] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def zip_prefix(names: list[str], member: str) -> str | None:
    """The folder (``"archive/"``, or ``""``) holding ``member`` at the top of an archive, if one does."""
    for name in names:
        if name == member:
            return ""
        head, _, tail = name.partition("/")
        if tail == member and head:
            return head + "/"
    return None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, *, limit: int = MAX_MEMBER_BYTES) -> bytes:
    """One member's bytes, whole: sizes checked before reading, the CRC checked by zipfile."""
    name = info.filename
    if info.file_size > limit:
        raise CorruptCheckpointError(path, f"zip entry {name!r} is {info.file_size} bytes, over the limit of {limit}")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
        raise CorruptCheckpointError(path, f"zip entry {name!r} declares an impossible size")
    try:
        data = archive.read(info)
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(path, f"zip entry {name!r} is damaged: {exc}") from exc
    if len(data) != info.file_size:
        raise CorruptCheckpointError(path, f"zip entry {name!r} is truncated")
    return data


def read_member_storage(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, archive_size: int) -> torch.Tensor:
    """One member's bytes into a fresh uint8 tensor, in pieces (no second whole copy), CRC-checked by zipfile."""
    name = info.filename
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size or info.file_size > archive_size:
            raise CorruptCheckpointError(path, f"zip entry {name!r} declares sizes the archive cannot hold")
    elif info.compress_size > archive_size or info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
        raise CorruptCheckpointError(path, f"zip entry {name!r} declares an impossible size")
    out = torch.empty(info.file_size, dtype=torch.uint8)
    view = out.numpy()
    try:
        with archive.open(info) as member:
            filled = 0
            while filled < info.file_size:
                chunk = member.read(min(info.file_size - filled, 1 << 22))
                if not chunk:
                    raise CorruptCheckpointError(path, f"zip entry {name!r} is truncated")
                view[filled : filled + len(chunk)] = memoryview(chunk)
                filled += len(chunk)
            if member.read(1):
                raise CorruptCheckpointError(path, f"zip entry {name!r} holds more than its declared size")
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(path, f"zip entry {name!r} is damaged: {exc}") from exc
    return out
