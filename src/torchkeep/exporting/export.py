"""torchkeep.export: a model to ONNX, a torch.export program (.pt2) or TorchScript, verified against eager mode."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkeep._warn import warn
from torchkeep.errors import ExportError, ExportVerificationError, TorchkeepError
from torchkeep.exporting import formats
from torchkeep.exporting.inputs import BATCH, Inputs, normalise, redrawn, traceable
from torchkeep.exporting.outputs import Check, compare, flatten
from torchkeep.exporting.report import SPEC_SUFFIX, ExportReport, TensorSpec
from torchkeep.state.keys import unwrap_model
from torchkeep.storage.local import LocalStorage, temporary_sibling, write_errors

Format = Literal["onnx", "exported_program", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "exported_program", "torchscript")
SUFFIXES = {"onnx": ".onnx", "exported_program": ".pt2", "torchscript": ".pt"}
TORCHSCRIPT_DEPRECATED = (
    "TorchScript is deprecated upstream (torch.jit is in maintenance); prefer format='exported_program' "
    "(torch.export, a .pt2 file for Python and C++ runtimes) or format='onnx' (any ONNX runtime)"
)
_OP = re.compile(r"\b(?:aten|prim|quantized|torchvision|torch\.ops\.[\w]+)(?:::|\.)[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY_HEADING = "## Exception summary"
_SOURCE_LINE = re.compile(r"# File: (\S+ in \w+), code: (.*)")
COPY_CHUNK = 8 << 20


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: Format = "onnx",
    example_kwargs: Mapping[str, torch.Tensor] | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    opset: int | None = None,
    torchscript_method: Literal["trace", "script"] = "trace",
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` for deployment and check the artifact computes what the model computes.

    The model is exported in eval mode (its mode is restored after). Beside the artifact goes
    ``<file>.io.json``: its inputs and outputs with names, dtypes and shapes (``"batch"`` where the
    batch is symbolic). With ``verify=True`` the saved artifact is loaded back in its own runtime
    (onnxruntime, ``torch.export.load``, ``torch.jit.load``) and run on the example inputs and, when
    ``dynamic_batch``, on fresh random inputs of another batch size; every output must match eager
    mode within ``atol + rtol * |eager|`` (by default 1e-5 + 1e-4·|x| for float32, 1e-2 + 2e-2·|x|
    for half types; integer and bool outputs must be equal). Nothing is written unless the export
    (and the verification) succeeded; files are written atomically.

    Args:
        model: the model; DataParallel/DDP/compile wrappers are unwrapped.
        example_inputs: a tensor, a tuple of tensors (positional), or a dict of tensors (keyword).
        path: the artifact's file (``.onnx``, ``.pt2``, ``.pt``).
        format: ``"onnx"`` (torch.onnx's dynamo exporter), ``"exported_program"``
            (``torch.export.save``) or ``"torchscript"`` (deprecated upstream: warns).
        example_kwargs: keyword tensors, with positional ``example_inputs``.
        dynamic_batch: make dim 0 of every input one symbolic batch size.
        verify: run the saved artifact and compare it with eager mode.
        rtol, atol: tolerances (defaults by output dtype, above).
        opset: the ONNX opset (default: the exporter's).
        torchscript_method: ``"trace"`` or ``"script"``.
        seed: seeds the random inputs of the second check.

    Returns:
        An :class:`ExportReport`: files, size, time, versions, I/O spec and per-output errors.

    Raises:
        ExportError: the exporter failed (``.op`` names the operator where it says one).
        ExportVerificationError: the artifact's outputs differ from eager mode (``.report``).
        ImportError: ONNX without ``pip install 'torchkeep[export]'``.
        CheckpointWriteError: the files could not be written.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    if torchscript_method not in ("trace", "script"):
        raise ValueError(f"torchscript_method={torchscript_method!r}: choose 'trace' or 'script'")
    if format == "onnx":
        formats.require_onnx()
    if format == "torchscript":
        warn(TORCHSCRIPT_DEPRECATED)
    target = unwrap_model(model)
    inputs = normalise(target, example_inputs, example_kwargs)
    if dynamic_batch and inputs.batch_size() is None:
        raise ValueError(
            "dynamic_batch=True needs every input to share its first dimension (the batch); "
            f"the shapes are {[tuple(t.shape) for t in inputs.tensors()]}: pass dynamic_batch=False"
        )
    out = Path(path)
    was_training = target.training
    target.eval()
    try:
        return _export(target, inputs, out, format, dynamic_batch, verify, rtol, atol, opset, torchscript_method, seed)
    finally:
        target.train(was_training)


def _export(
    model: nn.Module,
    inputs: Inputs,
    out: Path,
    fmt: str,
    dynamic: bool,
    verify: bool,
    rtol: float | None,
    atol: float | None,
    opset: int | None,
    method: str,
    seed: int,
) -> ExportReport:
    eager = _eager(model, inputs, fmt)
    second: tuple[Inputs, list[tuple[str, torch.Tensor]]] | None = None
    if dynamic:
        generator = torch.Generator().manual_seed(seed)
        other = redrawn(inputs, (inputs.batch_size() or 1) + 3, generator)
        second = (other, _eager(model, other, fmt))

    with write_errors(out.parent, "creating the folder"):
        out.parent.mkdir(parents=True, exist_ok=True)
    work = temporary_sibling(out)
    with write_errors(work, "creating a temporary folder"):
        work.mkdir()
    try:
        start = time.perf_counter()
        printed = io.StringIO()  # torch.export prints the partial graph of a failure to stderr
        try:
            with contextlib.redirect_stderr(printed), write_errors(out, "writing the exported files"):
                artifact = _run_exporter(model, inputs, eager, work, out.name, fmt, dynamic, opset, method)
        except (TorchkeepError, ImportError):
            raise
        except Exception as exc:
            raise _translate(fmt, exc, printed.getvalue()) from None
        export_seconds = time.perf_counter() - start

        checks: list[Check] = []
        start = time.perf_counter()
        if verify:
            run = _runner(fmt, work / out.name)
            checks.append(_check(fmt, run, "example inputs", inputs, eager, rtol, atol))
            if second is not None:
                label = f"random inputs, batch {second[0].batch_size()}"
                checks.append(_check(fmt, run, label, second[0], second[1], rtol, atol))
        verify_seconds = time.perf_counter() - start if verify else 0.0

        report = ExportReport(
            format=fmt,
            path=str(out),
            spec_path=str(out.with_name(out.name + SPEC_SUFFIX)),
            files=artifact.files,
            size=sum((work / name).stat().st_size for name in artifact.files),
            export_seconds=export_seconds,
            verify_seconds=verify_seconds,
            dynamic_batch=dynamic,
            inputs=_input_specs(inputs, dynamic),
            outputs=_output_specs(eager, second, inputs, dynamic),
            versions=artifact.versions,
            checks=tuple(checks),
        )
        if not report.ok:
            bad = [f"{o.name} ({c.inputs}): max abs {o.max_abs:.3g}" for c in checks for o in c.outputs if not o.ok]
            raise ExportVerificationError(
                fmt, f"the exported outputs differ from eager mode: {'; '.join(bad)}; nothing was written", report
            )
        _publish(work, out.parent, artifact.files)
        with LocalStorage(out.parent).open_write(Path(report.spec_path).name) as sink:
            sink.write((json.dumps(report.spec(), indent=2) + "\n").encode())
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_exporter(
    model: nn.Module,
    inputs: Inputs,
    eager: list[tuple[str, torch.Tensor]],
    work: Path,
    name: str,
    fmt: str,
    dynamic: bool,
    opset: int | None,
    method: str,
) -> formats.Artifact:
    traced = traceable(inputs) if dynamic else inputs
    if fmt == "onnx":
        return formats.export_onnx(model, traced, dynamic, [n for n, _ in eager], work, name, opset)
    if fmt == "exported_program":
        return formats.export_program(model, traced, dynamic, work, name)
    return formats.export_torchscript(model, traced, method, work, name)


def _eager(model: nn.Module, inputs: Inputs, fmt: str) -> list[tuple[str, torch.Tensor]]:
    try:
        with torch.no_grad():
            return flatten(model(*inputs.args, **inputs.kwargs))
    except TypeError as exc:
        raise ExportError(fmt, f"{exc}") from None
    except Exception as exc:
        raise ExportError(
            fmt, f"the model fails on its example inputs in eager mode: {type(exc).__name__}: {exc}"
        ) from exc


def _runner(fmt: str, path: Path) -> formats.Runner:
    try:
        if fmt == "onnx":
            return formats.run_onnx(path)
        if fmt == "exported_program":
            return formats.run_program(path)
        return formats.run_torchscript(path)
    except Exception as exc:
        raise ExportError(fmt, f"the exported file does not load back: {_summary(exc)}", cause=exc) from None


def _check(
    fmt: str,
    run: formats.Runner,
    label: str,
    inputs: Inputs,
    eager: list[tuple[str, torch.Tensor]],
    rtol: float | None,
    atol: float | None,
) -> Check:
    try:
        got = run(inputs)
        return compare(label, eager, got, rtol, atol)
    except Exception as exc:
        raise ExportError(fmt, f"the exported model fails on {label}: {_summary(exc)}", cause=exc) from None


def _input_specs(inputs: Inputs, dynamic: bool) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name, _dtype(t.dtype), _shape(tuple(t.shape), dynamic))
        for name, t in zip(inputs.names, inputs.tensors(), strict=True)
    )


def _output_specs(
    eager: list[tuple[str, torch.Tensor]],
    second: tuple[Inputs, list[tuple[str, torch.Tensor]]] | None,
    inputs: Inputs,
    dynamic: bool,
) -> tuple[TensorSpec, ...]:
    specs = []
    for i, (name, t) in enumerate(eager):
        shape: tuple[int | str, ...] = tuple(t.shape)
        if second is not None and t.dim():
            other = second[1][i][1]
            follows = t.shape[0] == inputs.batch_size() and other.dim() and other.shape[0] == second[0].batch_size()
            shape = _shape(tuple(t.shape), bool(follows))
        specs.append(TensorSpec(name, _dtype(t.dtype), shape))
    return tuple(specs)


def _shape(shape: tuple[int, ...], dynamic: bool) -> tuple[int | str, ...]:
    return (BATCH, *shape[1:]) if dynamic and shape else shape


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _publish(work: Path, folder: Path, names: tuple[str, ...]) -> None:
    """Each file through the storage layer's atomic write (the artifact last, so its side files precede it)."""
    storage = LocalStorage(folder)
    for name in (*names[1:], names[0]):
        with open(work / name, "rb") as source, storage.open_write(name) as sink:
            while chunk := source.read(COPY_CHUNK):
                sink.write(chunk)


def _summary(exc: BaseException, lines: int = 12, chars: int = 1500) -> str:
    text = _ANSI.sub("", f"{type(exc).__name__}: {exc}").strip()
    if _SUMMARY_HEADING in text:  # the ONNX exporter's advice comes first; what went wrong follows this heading
        text = text.split(_SUMMARY_HEADING, 1)[1].strip()
    kept = [line for line in text.splitlines() if line.strip()][:lines]
    summary = "\n".join(kept)
    return summary if len(summary) <= chars else summary[:chars] + " ..."


def _translate(fmt: str, exc: BaseException, printed: str = "") -> ExportError:
    """The exporter's own message, shortened, with the operator it failed on when it names one."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    op = next((m.group(0) for e in chain for m in [_OP.search(str(e))] if m), None)
    root = chain[-1]
    message = _summary(exc)
    if root is not exc:
        message += f"\ncaused by {_summary(root, lines=6, chars=600)}"
    lines = _SOURCE_LINE.findall(printed)
    if lines:
        where, code = lines[-1]
        message += f"\nthe last line of the model traced before it failed: {where}: {code.strip()}"
    return ExportError(fmt, message, op=op, cause=exc)
