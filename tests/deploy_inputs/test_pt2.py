"""ExportedProgram archives (torch.export.save, .pt2) as inputs: weights by FQN, I/O from the program's JSON."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from tests.deploy_inputs.models import CNN, MLP, example, member_named, rewrite_zip, trained
from torchkeep.cli.main import main
from torchkeep.weights.legacy import detect_kind


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """An MLP with a dynamic batch and a CNN with BatchNorm, each exported and saved once for the module."""
    folder = tmp_path_factory.mktemp("pt2")
    out = {}
    for name, cls, seed, dynamic in (("mlp", MLP, 1, True), ("cnn", CNN, 2, False)):
        model = trained(cls, seed)
        shapes = ({0: torch.export.Dim("batch", min=2)},) if dynamic else None
        program = torch.export.export(model, (example(model, batch=4),), dynamic_shapes=shapes)
        path = folder / f"{name}.pt2"
        torch.export.save(program, str(path))
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_weights_are_bit_exact_by_fqn(programs: dict[str, Any], name: str) -> None:
    model, path = programs[name]
    assert detect_kind(str(path)) == "exported_program"
    loaded = torchkeep.load(path)
    reference = torch.export.load(str(path)).state_dict
    assert list(loaded) == list(reference)
    assert_same_tensors(loaded, dict(reference))
    assert_same_tensors(loaded, dict(model.state_dict()))


def test_load_into_fills_a_fresh_eager_model(programs: dict[str, Any]) -> None:
    model, path = programs["cnn"]
    fresh = trained(CNN, seed=99)
    x = example(model, batch=3)
    assert not torch.equal(fresh(x), model(x))
    assert torchkeep.load_into(fresh, path).ok
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_inspect_lists_inputs_and_outputs_with_the_symbolic_batch(programs: dict[str, Any]) -> None:
    info = torchkeep.inspect(programs["mlp"][1])
    assert info.kind == "exported_program" and "ExportedProgram" in info.format
    (x,) = info.inputs or ()
    (y,) = info.outputs or ()
    assert x.name == "x" and x.dtype == "float32" and x.shape is not None and x.shape[1] == 4
    assert isinstance(x.shape[0], str) and x.shape[0] == (y.shape or ())[0]  # the batch symbol, as text
    assert x.shape[0].startswith("s") and x.shape[0][1:].isdigit()  # "s31", not "Symbol('s31', ...)"
    assert y.dtype == "float32" and y.shape is not None and y.shape[1] == 3
    assert [t.name for t in info.tensors] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_cli_inspect_json(programs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(programs["cnn"][1])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "exported_program"
    assert doc["inputs"] == [{"name": "x", "dtype": "float32", "shape": [4, 3, 8, 8], "type": "Tensor"}]
    assert doc["outputs"][0]["shape"] == [4, 2]
    assert {t["name"] for t in doc["tensors"]} == set(programs["cnn"][0].state_dict())


def test_scan_calls_it_unverified_not_safe(programs: dict[str, Any]) -> None:
    report = torchkeep.scan(programs["mlp"][1])
    assert report.exit_code == 2
    assert any("ExportedProgram" in p.reason and "sympy" in p.reason for p in report.problems)


# -- damaged and hostile archives -------------------------------------------------------------------------


def _config(doc: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = doc["config"]
    return config


def _edit_config(path: Path, dst: Path, edit: Any) -> Path:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            doc = json.loads(data)
            edit(_config(doc))
            return json.dumps(doc).encode()
        return data

    return rewrite_zip(path, dst, change)


@pytest.mark.parametrize(
    ("what", "edit", "message"),
    [
        ("name out of the folder", lambda c: c["fc1.weight"].update(path_name="../weight_0"), "plain name"),
        ("view past its storage", lambda c: c["fc1.weight"]["tensor_meta"]["sizes"][0].update(as_int=1000), "exceeds"),
        ("unknown dtype", lambda c: c["fc1.bias"]["tensor_meta"].update(dtype=99), "dtype code"),
        ("missing file", lambda c: c["fc2.bias"].update(path_name="weight_99"), "missing"),
        ("symbolic size", lambda c: c["fc2.bias"]["tensor_meta"]["sizes"][0].update(as_int="3"), "integer"),
    ],
)
def test_lying_weights_config_is_corrupt(
    programs: dict[str, Any], tmp_path: Path, what: str, edit: Any, message: str
) -> None:
    damaged = _edit_config(programs["mlp"][1], tmp_path / "lying.pt2", edit)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=message) as caught:
        torchkeep.load(damaged)
    assert str(damaged) in str(caught.value), what


def test_truncated_and_mislabelled_archives(programs: dict[str, Any], tmp_path: Path) -> None:
    data = programs["cnn"][1].read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[:-100])
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"cut\.pt2"):
        torchkeep.load(cut)
    wrong = rewrite_zip(
        programs["cnn"][1], tmp_path / "wrong.pt2", lambda n, d: b"zip" if n.endswith("/archive_format") else d
    )
    with pytest.raises(torchkeep.CorruptCheckpointError, match="not 'pt2'"):
        torchkeep.inspect(wrong)
    no_weights = rewrite_zip(
        programs["cnn"][1], tmp_path / "gone.pt2", lambda n, d: None if n.endswith("/weight_0") else d
    )
    with pytest.raises(torchkeep.CorruptCheckpointError, match="weight_0"):
        torchkeep.load(no_weights)


def _with_program(src: Path, dst: Path, edit: Any) -> Path:
    program = member_named(src, "models/model.json")

    def change(name: str, data: bytes) -> bytes:
        if name == program:
            doc = json.loads(data)
            edit(doc)
            return json.dumps(doc).encode()
        return data

    return rewrite_zip(src, dst, change)


def _poison_first_expression(doc: Any, code: str) -> bool:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key == "expr_str" and isinstance(value, str):
                doc[key] = f"{code} or {value}"
                return True
            if _poison_first_expression(value, code):
                return True
    if isinstance(doc, list):
        return any(_poison_first_expression(v, code) for v in doc)
    return False


def test_shape_expression_that_runs_code_torch_export_load_runs_it_torchkeep_does_not(
    programs: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    hostile = _with_program(programs["mlp"][1], tmp_path / "hostile.pt2", lambda d: _poison_first_expression(d, code))
    assert torchkeep.load(hostile).keys() == torchkeep.load(programs["mlp"][1]).keys()
    assert torchkeep.inspect(hostile).kind == "exported_program"
    assert not marker.exists()
    report = torchkeep.scan(hostile)
    assert report.exit_code == 1
    assert any("__import__" in p.reason for p in report.problems if p.status == "dangerous")
    torch.export.load(str(hostile))  # the control: torch's own loader evaluates the expression (sympify -> eval)
    assert marker.exists()


def test_graph_target_outside_the_operators_is_dangerous(programs: dict[str, Any], tmp_path: Path) -> None:
    def retarget(doc: Any) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    hostile = _with_program(programs["cnn"][1], tmp_path / "target.pt2", retarget)
    report = torchkeep.scan(hostile)
    assert report.exit_code == 1
    assert any("torch.os.system" in p.reason for p in report.problems)
    assert_same_tensors(torchkeep.load(hostile), torchkeep.load(programs["cnn"][1]))


def test_older_archives_with_one_pickled_state_dict(programs: dict[str, Any], tmp_path: Path) -> None:
    """Before the weights config, an archive kept data/weights/<model>.pt (a torch.save'd state dict)."""
    model, src = programs["mlp"]
    buffer = io.BytesIO()
    torch.save(dict(model.state_dict()), buffer)
    prefix = member_named(src, "archive_format")[: -len("archive_format")]

    older = rewrite_zip(src, tmp_path / "older.pt2", lambda n, d: None if n.startswith(prefix + "data/weights/") else d)
    with zipfile.ZipFile(older, "a") as archive:  # the pickled state dict under its old name
        archive.writestr(prefix + "data/weights/model.pt", buffer.getvalue())
    assert_same_tensors(torchkeep.load(older), dict(model.state_dict()))
    assert [t.name for t in torchkeep.inspect(older).tensors] == list(model.state_dict())


@pytest.mark.parametrize(
    ("key", "value", "status"),
    [
        ("expr_str", "Symbol('s31', positive=True, integer=True)", None),
        ("expr_str", "Max(2, FloorDiv(s0 + 1, 2)) >= 2*s1", None),
        ("expr_str", "exec(bytes((112, 114)))", "dangerous"),  # no dot, no dunder: still a builtin call
        ("expr_str", "preview(s0)", "dangerous"),  # a sympy helper that starts programs
        ("expr_str", "s0.func", "dangerous"),
        ("guards_code", ["L['x'].size()[0] == 3", "2 <= L['y'].stride()[1]"], None),
        ("guards_code", ["L['x'].size()[0] == 3), print((1"], "dangerous"),  # torch pastes it into a call
        ("guards_code", ["L['x'].__class__"], "dangerous"),
        ("target", "torch.ops.aten.conv2d.default", None),
        ("target", "_operator.getitem", None),
        ("target", "torch.sym_max", None),
        ("target", "torch.ops.load_library", "dangerous"),
        ("target", "torch.serialization.load", "dangerous"),
        ("target", "builtins.eval", "unknown"),
    ],
)
def test_audit_of_what_torch_export_load_would_evaluate(key: str, value: Any, status: str | None) -> None:
    from torchkeep.format.deploy.pt2_audit import audit

    findings = audit({"graph_module": {"graph": {"nodes": [{key: value}]}}})
    assert [f[1] for f in findings] == ([status] if status else [])
