"""Example inputs: normalised to (args, kwargs), named, dynamic in the batch, re-drawn at another batch size."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BATCH = "batch"


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword example inputs, every one a tensor, with the names the artifact gives them."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    names: tuple[str, ...]  # args first, then kwargs, in the order exporters flatten them

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    def with_tensors(self, tensors: list[torch.Tensor]) -> Inputs:
        count = len(self.args)
        return Inputs(tuple(tensors[:count]), dict(zip(self.kwargs, tensors[count:], strict=True)), self.names)

    def batch_size(self) -> int | None:
        """The shared size of dim 0, or None when the inputs do not share one."""
        sizes = {t.shape[0] if t.dim() else None for t in self.tensors()}
        return sizes.pop() if len(sizes) == 1 else None


def normalise(model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> Inputs:
    """``example_inputs`` as a tensor, a tuple/list of tensors, or a dict of keyword tensors."""
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kwargs: dict[str, Any] = {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(
            f"example_inputs is a {type(example_inputs).__name__}: pass a tensor, a tuple of tensors, "
            "or a dict of keyword tensors"
        )
    if example_kwargs:
        overlap = set(kwargs) & set(example_kwargs)
        if overlap:
            raise ValueError(f"keyword inputs given twice: {sorted(overlap)}")
        kwargs.update(example_kwargs)
    for where, value in [*((f"input {i}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where} is a {type(value).__name__}: exported models take tensors only "
                "(fix other arguments inside the model, or wrap it in a module that does)"
            )
    return Inputs(args, kwargs, (*_positional_names(model, len(args)), *kwargs))


def _positional_names(model: nn.Module, count: int) -> list[str]:
    try:
        params = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = params[:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def dynamic_shapes(inputs: Inputs) -> dict[str, Any] | tuple[Any, ...]:
    """torch.export's ``dynamic_shapes``: dim 0 of every input is one shared symbolic batch."""
    batch = torch.export.Dim(BATCH)
    if inputs.kwargs:
        return {name: {0: batch} for name in inputs.names}
    return tuple({0: batch} for _ in inputs.args)


def traceable(inputs: Inputs) -> Inputs:
    """Inputs to trace a dynamic batch with: a batch of 1 is doubled, or torch.export would fix it at 1."""
    if inputs.batch_size() != 1:
        return inputs
    return inputs.with_tensors([torch.cat([t, t]) for t in inputs.tensors()])


def redrawn(inputs: Inputs, batch: int, generator: torch.Generator) -> Inputs:
    """Fresh random inputs like the examples but with dim 0 of size ``batch``."""
    fresh = []
    for tensor in inputs.tensors():
        shape = (batch, *tensor.shape[1:])
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            value = torch.randn(shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
        elif tensor.dtype == torch.bool:
            value = torch.randint(0, 2, shape, generator=generator).bool()
        else:  # ids, indices: stay inside the range the examples use
            low = int(tensor.min()) if tensor.numel() else 0
            high = int(tensor.max()) + 1 if tensor.numel() else 1
            value = torch.randint(low, high, shape, generator=generator, dtype=tensor.dtype)
        fresh.append(value.to(tensor.device))
    return inputs.with_tensors(fresh)
