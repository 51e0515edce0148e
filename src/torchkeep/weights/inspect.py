"""torchkeep.inspect: what a weights file or folder holds, from the headers alone.

Deployment files (TorchScript, ExportedProgram .pt2, ONNX) are described by
:mod:`torchkeep.format.deploy`: their kind, weights, and inputs/outputs where the file holds them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep import _config
from torchkeep._gc import gc_paused
from torchkeep.errors import UnsafeCheckpointError
from torchkeep.format import deploy
from torchkeep.format.dtypes import dtype_name
from torchkeep.format.layout import Header
from torchkeep.format.names import refuse_special
from torchkeep.format.pickle.dcp import is_dcp_dir, read_dcp
from torchkeep.format.pickle.torchfile import is_zip, read_torch_file
from torchkeep.state import torch_ao
from torchkeep.storage.remote import is_url
from torchkeep.weights.contents import READ_LIMIT, Contents, classify, weights_at
from torchkeep.weights.files import resolve
from torchkeep.weights.legacy import Kind, detect_once, extract_state_dict, numpy_structure
from torchkeep.weights.load import open_header, open_weights_file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    file: str
    alias_of: str | None = None


@dataclass(frozen=True)
class Inspection:
    """The contents of a weights path: tensors, totals, metadata, and how it was written.

    For deployment files, ``kind`` is ``"torchscript"``, ``"exported_program"`` or ``"onnx"`` (else
    None), ``inputs``/``outputs`` list the model's ports where the file holds them (else None), and
    ``notes`` says what a reader should know about them.
    """

    path: str
    files: list[str]
    tensors: list[TensorInfo]
    metadata: dict[str, str]
    checksummed: bool
    format: str
    file_bytes: int
    aliases: dict[str, str] = field(default_factory=dict)
    kind: str | None = None
    inputs: tuple[deploy.Port, ...] | None = None
    outputs: tuple[deploy.Port, ...] | None = None
    notes: tuple[str, ...] = ()
    contents: Contents | None = None  # pickled checkpoints, DCP folders, NumPy files: what each part is
    scan: dict[str, Any] | None = None  # pickle-based files: the static scanner's verdict

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.alias_of is None)

    def params_by_prefix(self, depth: int = 1) -> dict[str, int]:
        """Element counts grouped by the first ``depth`` parts of the module path."""
        groups: dict[str, int] = {}
        for t in self.tensors:
            if t.alias_of is not None:
                continue
            parts = t.name.split(".")[:-1]
            prefix = ".".join(parts[:depth]) or "(top level)"
            groups[prefix] = groups.get(prefix, 0) + t.numel
        return groups

    def to_dict(self) -> dict[str, Any]:
        ports = {} if self.kind is None else {
            "kind": self.kind,
            "inputs": None if self.inputs is None else [p.to_dict() for p in self.inputs],
            "outputs": None if self.outputs is None else [p.to_dict() for p in self.outputs],
            "notes": list(self.notes),
        }  # fmt: skip
        described = {
            **({"contents": self.contents.to_dict()} if self.contents is not None else {}),
            **({"scan": self.scan} if self.scan is not None else {}),
        }
        return {
            **ports,
            **described,
            "path": self.path,
            "format": self.format,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "checksummed": self.checksummed,
            "metadata": self.metadata,
            "total_tensors": len(self.tensors),
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "params_by_prefix": self.params_by_prefix(),
            "aliases": self.aliases,
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "numel": t.numel,
                    "bytes": t.nbytes,
                    "file": t.file,
                    "alias_of": t.alias_of,
                }
                for t in self.tensors
            ],
        }

    def table(self) -> str:
        rows = [("name", "dtype", "shape", "numel", "bytes")]
        for t in self.tensors:
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            if t.alias_of is not None:
                rows.append((t.name, t.dtype, shape, "-", f"= {t.alias_of}"))
            else:
                rows.append((t.name, t.dtype, shape, f"{t.numel:,}", human_bytes(t.nbytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}  {e:>{widths[4]}}"
            for a, b, c, d, e in rows
        ]
        return "\n".join(lines)

    def tree(self) -> str:
        """Parameter counts as a module tree."""
        counts: dict[tuple[str, ...], int] = {}
        for t in self.tensors:
            if t.alias_of is not None:
                continue
            parts = tuple(t.name.split("."))
            for i in range(1, len(parts) + 1):
                counts[parts[:i]] = counts.get(parts[:i], 0) + t.numel
        lines = [f"(all) {self.total_params:,}"]
        for parts in sorted(counts):
            lines.append(f"{'  ' * len(parts)}{parts[-1]}  {counts[parts]:,}")
        return "\n".join(lines)

    def ports(self) -> list[str]:
        """The inputs, outputs and notes of a deployment file, as lines."""
        lines = []
        for what, ports in (("inputs", self.inputs), ("outputs", self.outputs)):
            if ports is None:
                lines.append(f"{what}: not recorded in the file")
            else:
                lines.append(f"{what}: " + (", ".join(str(p) for p in ports) or "none"))
        lines += [f"note: {note}" for note in self.notes]
        return lines

    def __str__(self) -> str:
        check = "xxh3-64 per tensor" if self.checksummed else "none (not written by torchkeep: cannot verify)"
        if self.kind is not None:
            check = "none in the format (zip entries are CRC-checked)" if self.kind != "onnx" else "none in the format"
        if self.contents is not None:
            check = "none in the format" + (" (zip entries are CRC-checked)" if "zip" in self.format else "")
        scan = [f"scan: {self.scan['status']} ({self.scan['summary']})"] if self.scan is not None else []
        lines = [
            f"{self.path}: {self.format}, {len(self.files)} file(s), {human_bytes(self.file_bytes)} on disk",
            *(self.ports() if self.kind is not None else [f"note: {note}" for note in self.notes]),
            *scan,
            *(self.contents.lines() if self.contents is not None else []),
            f"checksums: {check}",
        ]
        if self.tensors or self.contents is not None or self.kind is not None:  # else: nothing was read
            lines += [
                self.table(),
                f"total: {len(self.tensors)} tensors, {self.total_params:,} elements, {human_bytes(self.total_bytes)}",
                "by module: " + ", ".join(f"{k} {v:,}" for k, v in self.params_by_prefix().items()),
            ]
        if self.metadata:
            lines.append("metadata:")
            lines += [f"  {k}: {v}" for k, v in sorted(self.metadata.items())]
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a byte count for people (binary units, up to TiB). The one formatter: the
    run report (a higher layer) shows sizes with it too."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@gc_paused
def inspect(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> Inspection:
    """Describe a weights file or folder by reading only its headers.

    A TorchScript archive, an ExportedProgram archive (.pt2) or an ONNX model is described by what
    it is, its weights' names, dtypes and shapes, and its inputs and outputs where it records them;
    nothing in it is run (an ONNX file needs ``pip install 'torchkeep[export]'``).

    A URL (``s3://...``, with ``storage_options`` for fsspec) is read by ranged reads of the headers.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: a malformed header.
    """
    if is_url(path):
        from torchkeep.weights.remote import remote_headers

        found, indexed = remote_headers(str(path), storage_options)
        return _from_headers(str(path), found, _config.INDEX_FILE_NAME if indexed else None)
    refuse_special(path)
    seen: dict[str, Kind] = {}  # each file's kind, detected once and handed on
    if Path(path).is_file():
        detected = detect_once(os.fspath(path), seen)
        if detected in deploy.DEPLOY_KINDS:
            return _inspect_deployed(os.fspath(path), detected)
        if detected in ("torch", "npy", "npz"):
            return _inspect_structure(os.fspath(path), [Path(path).name], Path(path).parent, detected)
    if is_dcp_dir(path):
        return _inspect_structure(os.fspath(path), sorted(p.name for p in Path(path).iterdir() if p.is_file()),
                                  Path(path), "dcp")  # fmt: skip
    files = resolve(path)
    if all(detect_once(files.path(name), seen) == "torch" for name in files.files):  # pytorch_model.bin folders
        return _inspect_structure(os.fspath(path), list(files.files), files.root, "torch")
    found = []
    for name in files.files:
        file_path = files.path(name)
        with open_weights_file(file_path) as f:
            found.append((name, open_header(f, file_path), os.fstat(f.fileno()).st_size))
    return _from_headers(os.fspath(path), found, files.index)


def _from_headers(path: str, found: list[tuple[str, Header, int]], index: str | None) -> Inspection:
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    aliases: dict[str, str] = {}
    checksummed = True
    versions: set[str | None] = set()
    file_bytes = 0
    for name, header, size in found:
        file_bytes += size
        checksummed &= header.checksums is not None
        versions.add(header.format_version)
        metadata.update(header.metadata)
        aliases.update(header.aliases)
        for e in header.entries:
            tensors.append(TensorInfo(e.name, dtype_name(e.dtype), e.shape, e.numel, e.nbytes, name))
        for alias, target in header.aliases.items():
            entry = next(e for e in header.entries if e.name == target)
            tensors.append(
                TensorInfo(
                    alias, dtype_name(entry.dtype), entry.shape, entry.numel, entry.nbytes, name, alias_of=target
                )
            )
    version = versions.pop() if len(versions) == 1 else None
    kind = f"torchkeep safetensors v{version}" if version else "safetensors"
    if index:
        kind += f", sharded ({index})"
    return Inspection(
        path=path,
        files=[name for name, _, _ in found],
        tensors=tensors,
        metadata=metadata,
        checksummed=checksummed,
        format=kind,
        file_bytes=file_bytes,
        aliases=aliases,
    )


def _inspect_deployed(path: str, kind: deploy.DeployKind) -> Inspection:
    described = deploy.describe_file(path, kind)
    name = Path(path).name
    return Inspection(
        path=path,
        files=[name],
        tensors=[TensorInfo(t.name, t.dtype_name, t.shape, t.numel, t.nbytes, name) for t in described.tensors],
        metadata={},
        checksummed=False,
        format=described.summary,
        file_bytes=os.path.getsize(path),
        kind=described.kind,
        inputs=described.inputs,
        outputs=described.outputs,
        notes=described.notes,
    )


FORMAT_NAMES = {"npy": "NumPy .npy", "npz": "NumPy .npz archive"}


def _inspect_structure(path: str, names: list[str], root: Path, kind: str) -> Inspection:
    """A pickle-based or NumPy file, a folder of them, or a DCP folder: the structure alone (weights are not
    read, scalars are) classified part by part, and for pickles the static scanner's verdict.

    ``kind``: what every one of ``names`` is (``torch``, ``npy``, ``npz``), or ``dcp`` for a DCP folder, as the
    caller detected it: no file is detected twice."""
    from torchkeep.format.pickle.scan import scan

    dcp = kind == "dcp"
    pickled = kind in ("torch", "dcp")
    # the files read, not the whole tree (a folder may hold other things; an index names its shards)
    reports = ([scan(path)] if dcp else [scan(root / name) for name in names]) if pickled else []
    report = max(reports, key=lambda r: (r.exit_code == 1, r.exit_code), default=None)  # 1 outranks 2
    pickles = sum(len(r.pickles) for r in reports)
    verdict = None if report is None else {"status": report.status, "exit_code": report.exit_code,
                                           "summary": _scan_summary(report, pickles)}  # fmt: skip
    file_bytes = sum((root / name).stat().st_size for name in names)
    if report is not None and report.exit_code == 1:  # never unpickled, not even by the restricted reader
        return Inspection(path, names, [], {}, False, _format_name(kind, root, names), file_bytes, scan=verdict)
    try:
        obj = _structure(path, names, root, kind)
    except UnsafeCheckpointError as exc:  # unknown globals (a whole pickled model): the scan says what it needs
        if report is None or report.exit_code != 2:
            raise
        note = (
            f"not read: it imports {', '.join(exc.globals) or 'globals off the allowlist'}, which only its own code "
            "builds: a pickled object (torch.save(model)). If you trust the file, `torchkeep convert --trusted` "
            "turns it into safe files once (its classes must be importable: PYTHONPATH)"
        )
        return Inspection(path, names, [], {}, False, _format_name(kind, root, names), file_bytes, scan=verdict,
                          notes=(note,))  # fmt: skip
    contents = classify(obj)
    tensors: list[TensorInfo] = []
    weights = weights_at(obj, contents)
    if weights is not None and torch_ao.has_entries(weights):  # quantized entries: as load gives them
        weights = torch_ao.flatten(weights, torch_ao.reading_error(path)).tensors
    if weights is not None:
        for name, tensor in weights.items():
            if isinstance(tensor, torch.Tensor):
                numel = tensor.numel()
                file = names[0] if len(names) == 1 else ""
                tensors.append(TensorInfo(name, dtype_name(tensor.dtype), tuple(tensor.shape), numel,
                                          numel * tensor.element_size(), file))  # fmt: skip
    return Inspection(path, names, tensors, {}, False, _format_name(kind, root, names), file_bytes,
                      contents=contents, scan=verdict)  # fmt: skip


def _structure(path: str, names: list[str], root: Path, kind: str) -> Any:
    """What the files hold, read by the restricted unpickler with only small storages read."""
    if kind == "dcp":
        return read_dcp(path, read_limit=READ_LIMIT)
    if kind != "torch":
        return numpy_structure(str(root / names[0]), "npy" if kind == "npy" else "npz")
    if len(names) == 1:
        return read_torch_file(str(root / names[0]), read_limit=READ_LIMIT)
    obj: dict[str, Any] = {}
    for name in names:  # the shards of one state dict
        shard = read_torch_file(str(root / name), read_limit=READ_LIMIT)
        obj.update(extract_state_dict(shard, str(root / name)))
    return obj


def _format_name(kind: str, root: Path, names: list[str]) -> str:
    if kind == "dcp":
        return "torch.distributed.checkpoint (DCP) folder"
    if kind in FORMAT_NAMES:
        return FORMAT_NAMES[kind]
    with open(root / names[0], "rb") as f:
        zipped = is_zip(f.read(4))
    what = "torch.save zip archive" if zipped else "torch.save legacy file (or a plain pickle)"
    return what + (f", {len(names)} shards" if len(names) > 1 else "")


def _scan_summary(report: Any, pickles: int) -> str:
    if report.exit_code == 0:
        return f"{pickles} pickle(s), only allowlisted globals"
    problems = [*report.refused(), *(str(p) for p in report.problems)][:3]
    return "; ".join(problems) or report.status
