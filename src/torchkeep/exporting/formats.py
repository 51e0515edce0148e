"""The three exporters: each writes its artifact's files into a folder and loads an artifact back to run it.

What to export stays in :mod:`torchkeep.export`; these functions only drive torch's own exporters and
runtimes (onnxruntime for ONNX), so a failure here is the exporter's, translated by the caller.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.exporting.inputs import Inputs, dynamic_shapes
from torchkeep.exporting.outputs import flatten

Runner = Callable[[Inputs], list[torch.Tensor]]
ONNX_EXTRA = "pip install 'torchkeep[export]'  (onnx, onnxscript, onnxruntime)"
# Above this, initializers go to a side file: a protobuf cannot exceed 2 GiB.
ONNX_INLINE_LIMIT = 1 << 30


@dataclass(frozen=True)
class Artifact:
    """The files an exporter wrote (names relative to its folder; the first is the artifact) and their versions."""

    files: tuple[str, ...]
    versions: dict[str, str]


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Torch's exporters log progress and their own deprecations; torchkeep reports what matters itself."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", module=r"torch\.(onnx|export|jit|_export)")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"exporting to ONNX needs {', '.join(missing)}: {ONNX_EXTRA}")


def export_onnx(
    model: nn.Module,
    inputs: Inputs,
    dynamic: bool,
    output_names: list[str],
    folder: Path,
    name: str,
    opset: int | None,
) -> Artifact:
    require_onnx()
    import onnx
    import onnxruntime

    with quiet_exporter():
        program = torch.onnx.export(
            model,
            inputs.args,
            kwargs=inputs.kwargs or None,
            dynamo=True,
            verbose=False,
            input_names=list(inputs.names),
            output_names=output_names,
            dynamic_shapes=dynamic_shapes(inputs) if dynamic else None,
            opset_version=opset,
            optimize=True,
        )
    if program is None:  # f=None returns the program; the type checker knows no overloads
        raise RuntimeError("torch.onnx.export returned no program")
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    program.save(str(folder / name), external_data=weights > ONNX_INLINE_LIMIT)
    opset_used = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    files = sorted(p.name for p in folder.iterdir())
    files.remove(name)
    return Artifact(
        (name, *files),
        {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": str(opset_used),
        },
    )


def run_onnx(path: Path) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]

    def run(inputs: Inputs) -> list[torch.Tensor]:
        given = dict(zip(inputs.names, inputs.tensors(), strict=True))
        feed = {name: given[name].detach().cpu().numpy() for name in wanted}
        return [torch.from_numpy(out) for out in session.run(None, feed)]

    return run


def export_program(model: nn.Module, inputs: Inputs, dynamic: bool, folder: Path, name: str) -> Artifact:
    with quiet_exporter():
        program = torch.export.export(
            model, inputs.args, inputs.kwargs or None, dynamic_shapes=dynamic_shapes(inputs) if dynamic else None
        )
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
    (folder / name).write_bytes(buffer.getvalue())
    return Artifact((name,), {"torch": torch.__version__})


def run_program(path: Path) -> Runner:
    with quiet_exporter():
        # The artifact this process just wrote from the caller's own model, in its private temporary folder.
        module = torch.export.load(str(path)).module()  # trusted-path

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t for _, t in flatten(module(*inputs.args, **inputs.kwargs))]

    return run


def export_torchscript(model: nn.Module, inputs: Inputs, method: str, folder: Path, name: str) -> Artifact:
    with quiet_exporter():
        if method == "script":
            scripted: Any = torch.jit.script(model)
        else:
            # trace takes positional or keyword examples, not both: with any keyword, name them all
            everything = dict(zip(inputs.names, inputs.tensors(), strict=True))
            scripted = torch.jit.trace(  # type: ignore[no-untyped-call]
                model,
                example_inputs=None if inputs.kwargs else inputs.args,
                example_kwarg_inputs=everything if inputs.kwargs else None,
                strict=False,  # dict and list outputs
                check_trace=False,  # torchkeep verifies the saved file itself
            )
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    (folder / name).write_bytes(buffer.getvalue())
    return Artifact((name,), {"torch": torch.__version__, "torchscript": method})


def run_torchscript(path: Path) -> Runner:
    with quiet_exporter():
        # As above: verifying torchkeep's own fresh output, never a file from elsewhere.
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]  # trusted-path

    def run(inputs: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t for _, t in flatten(module(*inputs.args, **inputs.kwargs))]

    return run
