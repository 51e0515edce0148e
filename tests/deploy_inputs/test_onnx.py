"""ONNX models as inputs: initializers by name (through onnx), graph inputs and outputs; external data kept in."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from tests.deploy_inputs.models import CNN, MLP, example, trained
from torchkeep.cli.main import main
from torchkeep.weights.legacy import detect_kind

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it


def _export(model: nn.Module, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and pytree warnings
        return torch.onnx.export(
            model, (example(model),), dynamo=True, dynamic_shapes=({0: "batch"},), verbose=False, **kwargs
        )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """The MLP as torch.onnx.export writes it; the CNN unoptimized (weights as they are, in an external file)
    and optimized (BatchNorm folded into the Conv). Exported once for the module (about 2 s each)."""
    folder = tmp_path_factory.mktemp("onnx")
    mlp, cnn = trained(MLP, 1), trained(CNN, 2)
    _export(mlp).save(str(folder / "mlp.onnx"))
    program = _export(cnn, optimize=False)
    program.save(str(folder / "cnn.onnx"), external_data=True)
    program.optimize()
    program.save(str(folder / "cnn_folded.onnx"))
    return {
        "mlp": (mlp, folder / "mlp.onnx"),
        "cnn": (cnn, folder / "cnn.onnx"),
        "folded": (cnn, folder / "cnn_folded.onnx"),
    }


def test_mlp_initializers_are_its_weights_bit_exact_and_fill_an_eager_model(models: dict[str, Any]) -> None:
    model, path = models["mlp"]
    assert detect_kind(str(path)) == "onnx"
    loaded = torchkeep.load(path)
    assert_same_tensors(loaded, dict(model.state_dict()))
    fresh = trained(MLP, seed=99)
    x = example(model, batch=7)
    assert torchkeep.load_into(fresh, path).ok
    assert torch.equal(fresh(x), model(x))


def test_cnn_weights_from_external_data_fill_an_eager_model(models: dict[str, Any]) -> None:
    model, path = models["cnn"]
    assert (path.parent / "cnn.onnx.data").is_file()
    loaded = torchkeep.load(path)
    state = dict(model.state_dict())
    assert_same_tensors(loaded, {k: state[k] for k in loaded})
    assert set(state) - set(loaded) == {"bn.num_batches_tracked"}  # unused by the graph: the exporter drops it
    fresh = trained(CNN, seed=99)
    report = torchkeep.load_into(fresh, path, strict=False)
    assert report.missing == ["bn.num_batches_tracked"] and not report.unexpected
    x = example(model, batch=3)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_folded_weights_are_not_given_as_the_models_and_inspect_says_so(models: dict[str, Any]) -> None:
    """The exporter folds a BatchNorm into its Conv under the Conv's names: loaded into a model, those values
    would change what it computes (load_into reported them 'loaded'). Only what the exporter marks as
    parameters or buffers is given, with a warning naming the rest."""
    model, path = models["folded"]
    with pytest.warns(torchkeep.TorchkeepWarning, match=r"folded.*conv\.weight"):
        loaded = torchkeep.load(path)
    assert torch.equal(loaded["head.2.weight"], model.state_dict()["head.2.weight"])  # kept as it was
    assert "conv.weight" not in loaded and "bn.running_var" not in loaded
    assert any("folded" in note for note in torchkeep.inspect(path).notes)
    fresh = type(model)()
    before = fresh.state_dict()["conv.weight"].clone()
    with pytest.warns(torchkeep.TorchkeepWarning, match="folded"):
        report = torchkeep.load_into(fresh, path, strict=False)
    assert "conv.weight" in report.missing and torch.equal(fresh.state_dict()["conv.weight"], before)


def test_inspect_lists_io_with_symbolic_dims(models: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    info = torchkeep.inspect(models["cnn"][1])
    assert info.kind == "onnx" and info.format.startswith("ONNX model")
    assert [(p.name, p.dtype, p.shape) for p in info.inputs or ()] == [("x", "float32", ("batch", 3, 8, 8))]
    assert [(p.dtype, p.shape) for p in info.outputs or ()] == [("float32", ("batch", 2))]
    assert main(["inspect", "--json", str(models["mlp"][1])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "onnx" and doc["inputs"][0]["shape"] == ["batch", 4]
    assert [t["name"] for t in doc["tensors"]] == list(models["mlp"][0].state_dict())


def test_scan_finds_no_pickle(models: dict[str, Any]) -> None:
    assert torchkeep.scan(models["mlp"][1]).exit_code == 0


# -- damaged and hostile files -------------------------------------------------------------------------


def test_damaged_model_is_corrupt(models: dict[str, Any], tmp_path: Path) -> None:
    data = models["mlp"][1].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"cut\.onnx"):
        torchkeep.load(cut)


def _relocate(src: Path, dst: Path, **changes: str) -> Path:
    model = onnx.load(str(src), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key in changes:
                entry.value = changes[entry.key]
    onnx.save(model, str(dst))
    return dst


def test_external_data_stays_in_the_folder_and_in_range(models: dict[str, Any], tmp_path: Path) -> None:
    src = models["cnn"][1]
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes((src.parent / "cnn.onnx.data").read_bytes())
    escaping = _relocate(src, inner / "escape.onnx", location="../outside.bin")
    with pytest.raises(torchkeep.CorruptCheckpointError, match="plain file name"):
        torchkeep.load(escaping)
    (inner / "cnn.onnx.data").write_bytes((src.parent / "cnn.onnx.data").read_bytes()[:100])
    short = _relocate(src, inner / "short.onnx")
    with pytest.raises(torchkeep.CorruptCheckpointError, match="past the end"):
        torchkeep.load(short)
    lying = _relocate(src, inner / "lying.onnx", length="4")
    with pytest.raises(torchkeep.CorruptCheckpointError, match="does not hold"):
        torchkeep.load(lying)


def test_without_onnx_the_error_names_the_extra(models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'torchkeep\[export\]'"):
        torchkeep.load(models["mlp"][1])


def _rename_bytes(src: Path, dst: Path, old: str, new: bytes) -> Path:
    """Replace a name inside the serialized model with bytes that are not UTF-8 (protobuf keeps them as bytes)."""
    data = src.read_bytes()
    assert data.count(old.encode()) >= 1 and len(new) == len(old)
    dst.write_bytes(data.replace(old.encode(), new))
    return dst


def test_names_that_are_not_utf8(models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # fuzz finding: protobuf returns such a name as bytes, which then broke inspect --json with a TypeError
    weight = _rename_bytes(models["mlp"][1], tmp_path / "weight.onnx", "fc1.weight", b"fc1.\xff\xfeight")
    for read in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(torchkeep.CorruptCheckpointError, match="not UTF-8"):
            read(weight)
    port = _rename_bytes(models["mlp"][1], tmp_path / "port.onnx", "linear_1", b"linear_\xff")
    assert main(["inspect", "--json", str(port)]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"][0]["name"] == "linear_\ufffd"
