"""torchkeep.export: four models to three formats, verified; the artifact is then run again here, by the test,
in its own runtime on a third batch size, so the check does not rest on torchkeep's own verification."""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.export.models import TwoInputs, models
from tests.storage.test_full_disk import disk, fill  # noqa: F401  (the tmpfs fixture)
from torchkeep.exporting.outputs import flatten

FORMATS = ["onnx", "exported_program", "torchscript"]
SUFFIX = {"onnx": ".onnx", "exported_program": ".pt2", "torchscript": ".pt"}


def run_artifact(fmt: str, path: Path, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> list[Any]:
    """The artifact run by its own runtime, outputs flattened in order."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        values = [*args, *kwargs.values()]
        feed = {name: value.numpy() for name, value in zip(names, values, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    module = torch.export.load(str(path)).module() if fmt == "exported_program" else jit_load(path)
    with torch.no_grad():
        return [t for _, t in flatten(module(*args, **kwargs))]


def jit_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
        return torch.jit.load(str(path))


def export_quietly(*args: Any, **kwargs: Any) -> torchkeep.ExportReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchkeep.TorchkeepWarning)  # TorchScript's deprecation: tested below
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # attention's shape checks, while tracing
        return torchkeep.export(*args, **kwargs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(models()))
def test_export_verifies_and_runs_at_another_batch_size(tmp_path: Path, name: str, fmt: str) -> None:
    model, example, kwargs = models()[name]
    path = tmp_path / f"{name}{SUFFIX[fmt]}"
    report = export_quietly(model, example, path, format=fmt, example_kwargs=kwargs)

    assert report.ok and report.verified
    assert [c.inputs for c in report.checks][1].startswith("random inputs, batch")
    assert all(o.max_abs < 1e-4 for c in report.checks for o in c.outputs)
    assert path.is_file() and report.size == sum((tmp_path / f).stat().st_size for f in report.files)
    assert report.versions["torch"] == torch.__version__
    if fmt == "onnx":
        assert int(report.versions["opset"]) >= 17

    spec = json.loads(Path(report.spec_path).read_text())
    assert spec["artifact"] == path.name and spec["kind"] == fmt and spec["dynamic_batch"]
    assert all(i["shape"][0] == "batch" for i in spec["inputs"])
    eager_outputs = flatten(model(*(example if isinstance(example, tuple) else (example,)), **(kwargs or {})))
    assert [o["name"] for o in spec["outputs"]] == [n for n, _ in eager_outputs]

    # The test's own run, at batch 7, against eager mode.
    torch.manual_seed(1)
    positional = example if isinstance(example, tuple) else (example,)
    args = tuple(torch.randn(7, *t.shape[1:]) for t in positional)
    kw = {k: torch.randn(7, *t.shape[1:]) for k, t in (kwargs or {}).items()}
    with torch.no_grad():
        want = [t for _, t in flatten(model(*args, **kw))]
    got = run_artifact(fmt, path, args, kw)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_report_reads_well(tmp_path: Path) -> None:
    model, example, kwargs = models()["two_inputs_dict_out"]
    report = torchkeep.export(model, example, tmp_path / "m.pt2", format="exported_program", example_kwargs=kwargs)
    text = str(report)
    assert "exported_program ->" in text and "logits" in text and "hidden" in text
    assert "x: float32[batch, 4]" in text and "y: float32[batch, 6]" in text
    assert "random inputs, batch 5" in text


def test_keyword_only_inputs_and_names_in_the_onnx_graph(tmp_path: Path) -> None:
    import onnx

    model = TwoInputs().eval()
    report = torchkeep.export(model, {"x": torch.randn(3, 4), "y": torch.randn(3, 6)}, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["x", "y"]
    assert [o.name for o in graph.output] == ["logits", "hidden"]
    assert [s.name for s in report.inputs] == ["x", "y"]


def test_static_batch_when_asked(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    report = torchkeep.export(
        model, torch.randn(3, 4), tmp_path / "m.pt2", format="exported_program", dynamic_batch=False
    )
    assert len(report.checks) == 1
    assert report.inputs[0].shape == (3, 4)
    with pytest.raises(Exception, match="3"):  # the artifact really is fixed at batch 3
        torch.export.load(str(tmp_path / "m.pt2")).module()(torch.randn(5, 4))


def test_the_tutorials_onnx_export(tmp_path: Path) -> None:
    """Seed 003: torch.onnx.export(model, dummy_input, "model.onnx", input_names=['input'],
    output_names=['output'], dynamic_axes={'input': {0: 'batch_size'}, 'output': {0: 'batch_size'}})."""
    model = models()["cnn_bn"][0]
    dummy_input = torch.randn(1, 3, 16, 16)
    report = torchkeep.export(model, dummy_input, tmp_path / "model.onnx")
    assert report.ok
    assert [(s.name, s.shape) for s in report.inputs] == [("input", ("batch", 3, 16, 16))]
    assert [(s.name, s.shape) for s in report.outputs] == [("output", ("batch", 10))]


def test_the_tutorials_torchscript_trace_and_script(tmp_path: Path) -> None:
    """Seed 003: torch.jit.trace / torch.jit.script + .save, then torch.jit.load; torchkeep warns it is deprecated."""
    model = models()["mlp"][0]
    with pytest.warns(torchkeep.TorchkeepWarning, match="exported_program"):
        traced = torchkeep.export(model, torch.randn(1, 4), tmp_path / "model_traced.pt", format="torchscript")
    with pytest.warns(torchkeep.TorchkeepWarning, match="deprecated"):
        scripted = torchkeep.export(
            model, torch.randn(1, 4), tmp_path / "model_scripted.pt", format="torchscript", torchscript_method="script"
        )
    assert traced.ok and scripted.ok and scripted.versions["torchscript"] == "script"
    loaded_model = jit_load(tmp_path / "model_traced.pt")
    x = torch.randn(6, 4)
    assert torch.equal(loaded_model(x), model(x))


def test_the_model_keeps_its_mode_and_wrappers_are_unwrapped(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    report = torchkeep.export(nn.DataParallel(model), torch.randn(2, 4), tmp_path / "m.pt2", format="exported_program")
    assert report.ok  # exported in eval mode: dropout off, so outputs match
    assert model.training


# ------------------------------------------------------------------------------------------------ errors


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x * 3


class BatchBakedIn(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.shape[0])


class Eigenvalues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x).real


def test_an_op_onnx_cannot_express_is_named(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.ExportError) as caught:
        torchkeep.export(Eigenvalues(), torch.randn(2, 3, 3), tmp_path / "m.onnx")
    assert caught.value.op == "aten.linalg_eig"
    assert "No ONNX function found" in str(caught.value)
    assert len(str(caught.value).splitlines()) < 25
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left


def test_data_dependent_control_flow_is_a_short_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(torchkeep.ExportError, match="data-dependent") as caught:
        torchkeep.export(DataDependent(), torch.randn(2, 3), tmp_path / "m.pt2", format="exported_program")
    assert "if x.sum() > 0" in str(caught.value)  # the model's own line, from the exporter's partial graph
    assert caught.value.__cause__ is None and caught.value.cause is not None
    assert "def forward" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_batch_the_model_fixes_fails_verification_and_writes_nothing(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torchkeep.ExportVerificationError, match="random inputs, batch 5") as caught:
            torchkeep.export(BatchBakedIn(), torch.randn(2, 3), tmp_path / "m.pt", format="torchscript")
    report = caught.value.report
    assert isinstance(report, torchkeep.ExportReport) and not report.ok
    assert report.checks[0].ok and not report.checks[1].ok
    assert not list(tmp_path.iterdir())
    # torch.export sees the same problem while exporting:
    with pytest.raises(torchkeep.ExportError, match="specialized it to be a constant"):
        torchkeep.export(BatchBakedIn(), torch.randn(2, 3), tmp_path / "m.pt2", format="exported_program")


def test_a_tighter_tolerance_than_the_exporter_meets_is_reported(tmp_path: Path) -> None:
    model = models()["transformer"][0]
    with pytest.raises(torchkeep.ExportVerificationError) as caught:
        torchkeep.export(model, torch.randn(2, 5, 16), tmp_path / "m.onnx", rtol=0.0, atol=0.0)
    bad = [o for c in caught.value.report.checks for o in c.outputs if not o.ok]
    assert bad and all(0 < o.max_abs < 1e-4 and o.rtol == 0.0 for o in bad)


def test_a_model_that_fails_in_eager_mode(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.ExportError, match="fails on its example inputs in eager mode"):
        torchkeep.export(nn.Linear(4, 2), torch.randn(2, 5), tmp_path / "m.onnx")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"format": "tflite"}, ValueError, "onnx, exported_program, torchscript"),
        ({"format": "torchscript", "torchscript_method": "compile"}, ValueError, "trace"),
        ({"example_inputs": [torch.randn(2, 4), 3]}, TypeError, "input 1 is a int"),
        ({"example_inputs": "x"}, TypeError, "tuple of tensors"),
        ({"example_inputs": (torch.randn(2, 4), torch.randn(3, 6))}, ValueError, "dynamic_batch=False"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    call: dict[str, Any] = {"example_inputs": (torch.randn(2, 4), torch.randn(2, 6)), "format": "exported_program"}
    call.update(kwargs)
    with warnings.catch_warnings(), pytest.raises(error, match=match):
        warnings.simplefilter("ignore", torchkeep.TorchkeepWarning)
        torchkeep.export(TwoInputs(), call.pop("example_inputs"), tmp_path / "m.pt2", **call)


def test_onnx_without_its_packages_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # what an install without the extra has
    with pytest.raises(ImportError, match=r"pip install 'torchkeep\[export\]'"):
        torchkeep.export(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx")


def test_a_full_disk_is_a_write_error_and_the_earlier_export_stays(disk: Path) -> None:  # noqa: F811
    path = disk / "m.pt2"
    torchkeep.export(nn.Linear(4, 2), torch.randn(2, 4), path, format="exported_program")
    before = path.read_bytes()
    fill(disk, leave=64 * 1024)
    big = nn.Sequential(nn.Linear(1024, 1024))  # 4 MiB of weights
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        torchkeep.export(big, torch.randn(2, 1024), path, format="exported_program")
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "m.pt2", "m.pt2.io.json"]
