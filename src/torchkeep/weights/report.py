"""LoadReport: what a load_into did, key by key."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torchkeep.format.dtypes import dtype_name


@dataclass(frozen=True)
class Mismatch:
    """A key present on both sides whose tensors cannot be loaded into each other."""

    key: str
    model_shape: tuple[int, ...]
    model_dtype: torch.dtype
    file_shape: tuple[int, ...]
    file_dtype: torch.dtype

    def describe(self) -> str:
        return (
            f"model {list(self.model_shape)} {dtype_name(self.model_dtype)}"
            f" vs file {list(self.file_shape)} {dtype_name(self.file_dtype)}"
        )


@dataclass(frozen=True)
class LoadReport:
    """The outcome of :func:`torchkeep.load_into`.

    ``loaded``: model keys that received values; ``missing``: model keys the source lacks;
    ``unexpected``: source keys the model lacks; ``mismatched``: keys on both sides whose shapes
    (or kinds of dtype: float / int / bool / complex) differ; ``cast``: loaded keys whose
    precision was converted (e.g. float16 file into a float32 model), which is not a problem.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        rows = [("loaded", str(len(self.loaded)), "")]
        rows += [("missing", k, "in the model, not in the source") for k in self.missing]
        rows += [("unexpected", k, "in the source, not in the model") for k in self.unexpected]
        rows += [("mismatched", m.key, m.describe()) for m in self.mismatched]
        rows += [("cast", k, "loaded with a dtype conversion") for k in self.cast]
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"LoadReport{' for ' + self.source if self.source else ''}: {'OK' if self.ok else 'NOT OK'}"]
        lines += [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}".rstrip() for a, b, c in rows]
        return "\n".join(lines)
