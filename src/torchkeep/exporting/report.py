"""What an export did: the artifact, its I/O spec, its versions, and how closely it matches eager mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torchkeep.exporting.outputs import Check

SPEC_FORMAT = "torchkeep.io_spec"
SPEC_VERSION = 1
SPEC_SUFFIX = ".io.json"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype, and shape with ``"batch"`` for the symbolic batch dimension."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExportReport:
    """Returned by :func:`torchkeep.export`; ``str(report)`` is a readable summary.

    ``checks`` holds one :class:`~torchkeep.exporting.outputs.Check` per set of inputs the artifact was run on
    (empty when ``verify=False``); ``ok`` is true when every output of every check is within tolerance.
    """

    format: str
    path: str
    spec_path: str
    files: tuple[str, ...]
    size: int
    export_seconds: float
    verify_seconds: float
    dynamic_batch: bool
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: dict[str, str] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def verified(self) -> bool:
        return bool(self.checks)

    def spec(self) -> dict[str, Any]:
        """The JSON written beside the artifact."""
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "artifact": self.files[0],
            "files": list(self.files),
            "kind": self.format,
            "dynamic_batch": self.dynamic_batch,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "versions": self.versions,
            "verified": [
                {
                    "inputs": check.inputs,
                    "outputs": [
                        {"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel, "rtol": o.rtol, "atol": o.atol}
                        for o in check.outputs
                    ],
                }
                for check in self.checks
            ],
        }

    def __str__(self) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())

        def shape(s: TensorSpec) -> str:
            return f"{s.name}: {s.dtype}[{', '.join(map(str, s.shape))}]"

        lines = [
            f"{self.format} -> {self.path} ({self.size:,} bytes; {versions})",
            f"  exported in {self.export_seconds:.2f} s"
            + (f", verified in {self.verify_seconds:.2f} s" if self.checks else ""),
            f"  inputs:  {'; '.join(shape(s) for s in self.inputs)}",
            f"  outputs: {'; '.join(shape(s) for s in self.outputs)}",
        ]
        if not self.checks:
            lines.append("  not verified (verify=False)")
        for check in self.checks:
            lines.append(f"  {'ok ' if check.ok else 'BAD'} {check.inputs}:")
            for o in check.outputs:
                mark = "" if o.ok else f"   <-- over rtol={o.rtol:g}, atol={o.atol:g}"
                lines.append(f"        {o.name:<16} max abs {o.max_abs:.3g}  max rel {o.max_rel:.3g}{mark}")
        return "\n".join(lines)
