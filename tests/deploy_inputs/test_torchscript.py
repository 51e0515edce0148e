"""TorchScript archives as inputs: weights read without running TorchScript or the archive's pickles."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from tests.deploy_inputs.models import CNN, MLP, example, rewrite_zip, trained
from torchkeep.cli.main import main
from torchkeep.weights.legacy import detect_kind


def _quietly(fn: Any, *args: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit and torch.ao.quantization are deprecated upstream, still in use
        return fn(*args)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """traced and scripted, MLP and CNN: the original model and its archive (made once for the module)."""
    folder = tmp_path_factory.mktemp("torchscript")
    out = {}
    for name, cls, seed in (("mlp", MLP, 1), ("cnn", CNN, 2)):
        model = trained(cls, seed)
        for how in ("trace", "script"):
            scripted = (
                _quietly(torch.jit.trace, model, example(model))
                if how == "trace"
                else _quietly(torch.jit.script, model)
            )
            path = folder / f"{name}_{how}.pt"
            _quietly(scripted.save, str(path))
            out[f"{name}_{how}"] = (model, path)
    return out


def _jit_state(path: Path) -> dict[str, torch.Tensor]:
    return dict(_quietly(torch.jit.load, str(path)).state_dict())


@pytest.mark.parametrize("key", ["mlp_trace", "mlp_script", "cnn_trace", "cnn_script"])
def test_weights_are_bit_exact_and_named_as_torch_jit_names_them(archives: dict[str, Any], key: str) -> None:
    model, path = archives[key]
    assert detect_kind(str(path)) == "torchscript"
    loaded = torchkeep.load(path)
    jit = _jit_state(path)
    assert list(loaded) == list(jit)  # same names, same order: parameters, buffers, then submodules
    assert_same_tensors(loaded, jit)
    assert_same_tensors(loaded, dict(model.state_dict()))
    if "cnn" in key:
        assert "bn.running_var" in loaded and loaded["bn.num_batches_tracked"].item() == 3


@pytest.mark.parametrize("key", ["mlp_trace", "cnn_script"])
def test_load_into_fills_a_fresh_eager_model(archives: dict[str, Any], key: str) -> None:
    model, path = archives[key]
    fresh = trained(type(model), seed=99)
    x = example(model, batch=5)
    assert not torch.equal(fresh(x), model(x))
    report = torchkeep.load_into(fresh, path)
    assert report.ok and len(report.loaded) == len(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_inspect_says_what_it_is_and_lists_forward(archives: dict[str, Any]) -> None:
    _, path = archives["cnn_trace"]
    info = torchkeep.inspect(path)
    assert info.kind == "torchscript" and info.format.startswith("TorchScript archive")
    assert [str(p) for p in info.inputs or ()] == ["x: Tensor"]
    assert [p.type for p in info.outputs or ()] == ["Tensor"]
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes["conv.weight"] == (4, 3, 3, 3) and shapes["bn.num_batches_tracked"] == ()
    assert info.total_params == sum(t.numel() for t in archives["cnn_trace"][0].state_dict().values())
    assert "TorchScript" in str(info) and "inputs: x: Tensor" in str(info)


def test_cli_inspect_json(archives: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(archives["mlp_script"][1])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "torchscript"
    assert doc["inputs"] == [{"name": "x", "dtype": None, "shape": None, "type": "Tensor"}]
    assert [t["name"] for t in doc["tensors"]] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_found_by_content_whatever_the_name(archives: dict[str, Any], tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(archives["mlp_trace"][1].read_bytes())
    assert list(torchkeep.load(renamed)) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert set(torchkeep.load_raw(renamed)) == set(torchkeep.load(renamed))


def test_trusted_runs_torch_jit_load_with_a_warning(archives: dict[str, Any]) -> None:
    _, path = archives["cnn_script"]
    with pytest.warns(torchkeep.TorchkeepWarning, match="torch.jit.load"):
        trusted = torchkeep.load(path, trusted=True)
    assert_same_tensors(trusted, torchkeep.load(path))


def test_scan_never_calls_it_safe_and_says_why(archives: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    report = torchkeep.scan(archives["mlp_script"][1])
    assert report.exit_code != 0
    reasons = [p.reason for p in report.problems if "TorchScript" in p.reason]
    assert (
        len(reasons) == 1 and "torch.jit.load" in reasons[0] and "torchkeep.load reads only its weights" in reasons[0]
    )
    assert main(["scan", str(archives["mlp_script"][1])]) != 0
    assert "TorchScript archive" in capsys.readouterr().out


# -- damaged and hostile archives ------------------------------------------------------------------------


def test_truncated_archive_is_corrupt(archives: dict[str, Any], tmp_path: Path) -> None:
    data = archives["cnn_trace"][1].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) - 200])
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"cut\.pt"):
        torchkeep.load(cut)


def test_flipped_storage_byte_fails_its_crc(archives: dict[str, Any], tmp_path: Path) -> None:
    src = archives["cnn_trace"][1]
    data = bytearray(src.read_bytes())
    start = data.find(b"PK\x03\x04")  # the first member is a storage (data/0), written stored
    name_len, extra_len = (
        int.from_bytes(data[start + 26 : start + 28], "little"),
        int.from_bytes(data[start + 28 : start + 30], "little"),
    )
    data[start + 30 + name_len + extra_len + 5] ^= 0x40
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="CRC"):
        torchkeep.load(flipped)


@pytest.mark.parametrize(
    ("what", "change", "message"),
    [
        ("garbage data.pkl", lambda n, d: b"\x80\x02garbage" if n.endswith("/data.pkl") else d, "malformed pickle"),
        ("missing storage", lambda n, d: None if n.endswith("/data/0") else d, "storage '0'"),
        ("no data.pkl", lambda n, d: None if n.endswith("/data.pkl") else d, "data.pkl"),
        ("no module", lambda n, d: pickle.dumps({"a": 1}, protocol=2) if n.endswith("/data.pkl") else d, "module"),
    ],
)
def test_damaged_members_are_typed_errors(
    archives: dict[str, Any], tmp_path: Path, what: str, change: Any, message: str
) -> None:
    damaged = rewrite_zip(archives["cnn_script"][1], tmp_path / "damaged.pt", change)
    for read in (torchkeep.load, torchkeep.inspect):
        with pytest.raises(torchkeep.CorruptCheckpointError, match=message) as caught:
            read(damaged)
        assert str(damaged) in str(caught.value), what


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


def test_hostile_data_pkl_is_refused_with_no_code_run(archives: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps(_System(f"touch {marker}"), protocol=2)
    hostile = rewrite_zip(
        archives["cnn_trace"][1], tmp_path / "hostile.pt", lambda n, d: payload if n.endswith("/data.pkl") else d
    )
    for read in (torchkeep.load, torchkeep.inspect, torchkeep.load_raw):
        with pytest.raises(torchkeep.UnsafeCheckpointError, match="system"):
            read(hostile)
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load_into(trained(CNN, 3), hostile)
    assert not marker.exists()
    assert torchkeep.scan(hostile).exit_code == 1


def test_a_torchscript_class_is_never_called(archives: dict[str, Any], tmp_path: Path) -> None:
    # REDUCE of a __torch__ class would call it (the real one runs the archive's code): refused.
    payload = b"\x80\x02c__torch__\nNet\n)R."
    hostile = rewrite_zip(
        archives["mlp_trace"][1], tmp_path / "call.pt", lambda n, d: payload if n.endswith("/data.pkl") else d
    )
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"TorchScript class __torch__\.Net"):
        torchkeep.load(hostile)


def test_torchscript_classes_are_data_only_inside_torchscript_archives(
    archives: dict[str, Any], tmp_path: Path
) -> None:
    # The same data.pkl in a torch.save archive (no constants.pkl, so torch.load would unpickle it itself)
    plain = rewrite_zip(
        archives["mlp_trace"][1], tmp_path / "plain.pt", lambda n, d: None if n.endswith("/constants.pkl") else d
    )
    assert detect_kind(str(plain)) == "torch"
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="__torch__"):
        torchkeep.load(plain)


def test_parameters_come_from_the_class_headers(archives: dict[str, Any], tmp_path: Path) -> None:
    """A tensor attribute the class does not list as a parameter or buffer is not a weight (as in torch.jit)."""

    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.scale = torch.tensor([2.0, 3.0])  # a plain attribute: not in state_dict()
            self.register_buffer("shift", torch.ones(2))
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale + self.shift + self.scratch

    path = tmp_path / "constant.pt"
    _quietly(_quietly(torch.jit.script, WithConstant()).save, str(path))
    loaded, jit = torchkeep.load(path), _jit_state(path)
    assert list(loaded) == list(jit)
    assert_same_tensors(loaded, jit)
    assert "scale" not in loaded


def test_packed_quantized_weights_are_named_not_silently_dropped(tmp_path: Path) -> None:
    """torch.jit.load(f).state_dict() of a scripted quantize_dynamic model is empty: torchkeep says why."""
    model = _quietly(torch.ao.quantization.quantize_dynamic, trained(MLP, 1), {nn.Linear}, torch.qint8)
    path = tmp_path / "quantized.pt"
    _quietly(_quietly(torch.jit.script, model).save, str(path))
    with pytest.raises(torchkeep.UnsupportedTensorError, match="LinearPackedParamsBase") as caught:
        torchkeep.load(path)
    assert caught.value.key == "fc1._packed_params._packed_params"
