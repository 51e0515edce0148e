"""``torchkeep export``: a save_model folder to a verified deployment artifact."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from torchkeep.errors import TorchkeepError
from torchkeep.exporting.export import SUFFIXES, export
from torchkeep.model.io import load_model

_BY_SUFFIX = {suffix: fmt for fmt, suffix in SUFFIXES.items()}


def parse_input(text: str) -> tuple[str | None, tuple[int, ...], torch.dtype]:
    """``[NAME=]SHAPE[:DTYPE]`` -> (name or None, shape, dtype)."""
    name, _, rest = text.rpartition("=")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = tuple(int(part) for part in shape_text.split(","))
    except ValueError:
        raise ValueError(
            f"--input {text!r}: the shape must be integers separated by commas, e.g. 1,3,224,224"
        ) from None
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"--input {text!r}: every size must be at least 1")
    dtype = getattr(torch, dtype_text or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--input {text!r}: {dtype_text!r} is not a torch dtype (float32, float16, int64, ...)")
    return name or None, shape, dtype


def _example(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    return torch.randint(0, 10, shape, generator=generator, dtype=dtype)


def _first_linear(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if not list(m.children())), None)
    return first.in_features if isinstance(first, nn.Linear) else None


def run_export(args: argparse.Namespace) -> int:
    """Exit 0 when exported (and verified); errors of torchkeep exit 1 (in ``main``); bad arguments exit 2."""
    try:
        return _run(args)
    except (ValueError, TypeError, ImportError) as exc:
        if isinstance(exc, TorchkeepError):
            raise
        print(f"torchkeep export: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = args.format or _BY_SUFFIX.get(output.suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the format from {output.name!r}: pass --format, or name it .onnx, .pt2 or .pt")
    model = load_model(args.model_dir, allow_modules=args.allow_module)
    specs = [parse_input(text) for text in args.input]
    if not specs:
        width = _first_linear(model)
        if width is None:
            raise ValueError(
                "this model does not start with a Linear layer: give its input shape, e.g. --input 1,3,224,224"
            )
        specs = [(None, (2, width), torch.float32)]
    generator = torch.Generator().manual_seed(0)
    positional = tuple(_example(shape, dtype, generator) for name, shape, dtype in specs if name is None)
    keywords = {name: _example(shape, dtype, generator) for name, shape, dtype in specs if name is not None}
    report = export(
        model,
        positional,
        output,
        format=fmt,  # type: ignore[arg-type]  # argparse choices and the suffix table hold only valid names
        example_kwargs=keywords or None,
        dynamic_batch=not args.static_batch,
        verify=not args.no_verify,
        rtol=args.rtol,
        atol=args.atol,
    )
    print(json.dumps(report.spec(), indent=2) if args.json else report)
    return 0
