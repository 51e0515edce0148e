"""torchkeep.quantize (torchao int8) and the quantized model's round trips: save_model/load_model in a fresh
process with identical outputs, torchkeep.save/load_into of its int8 parts, and every refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import bytes_of


def float_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, torchkeep
    model = torchkeep.load_model(sys.argv[1])
    x = torchkeep.load(sys.argv[2])["x"]
    with torch.no_grad():
        torchkeep.save({"y": model(x)}, sys.argv[3])
    print(type(model[0].weight).__name__)
""")


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only"])
def test_save_model_and_load_model_in_a_fresh_process_give_identical_outputs(tmp_path: Path, method: str) -> None:
    model = torchkeep.quantize(float_model(), method)
    x = torch.randn(8, 16)
    with torch.no_grad():
        want = model(x)
    torchkeep.save_model(model, tmp_path / "q")
    torchkeep.save({"x": x}, tmp_path / "x.safetensors")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(tmp_path / "q"),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "Int8Tensor"
    assert bytes_of(torchkeep.load(tmp_path / "y.safetensors")["y"]) == bytes_of(want)

    manifest = json.loads((tmp_path / "q" / "torchkeep_model.json").read_text())
    assert manifest["quantization"]["method"] == method
    assert manifest["quantization"]["modules"] == ["0", "2", "4"]
    stored = torchkeep.load(tmp_path / "q")
    assert stored["0.weight.qdata"].dtype == torch.int8 and "0.weight" not in stored


def test_the_int8_folder_is_smaller_and_close_to_float(tmp_path: Path) -> None:
    model = float_model()
    torchkeep.save_model(model, tmp_path / "fp32")
    x = torch.randn(64, 16)
    with torch.no_grad():
        want = model(x)
        got = torchkeep.quantize(model, "int8_weight_only")(x)
    torchkeep.save_model(model, tmp_path / "int8")
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    int8 = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert int8 < 0.4 * fp32
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_save_and_load_into_a_quantized_model(tmp_path: Path) -> None:
    model = torchkeep.quantize(float_model(), "int8_dynamic")
    torchkeep.save(model, tmp_path / "q.safetensors")
    other = torchkeep.quantize(
        nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    )
    report = torchkeep.load_into(other, tmp_path / "q.safetensors")
    assert report.ok and "0.weight.qdata" in report.loaded
    x = torch.randn(4, 16)
    assert torch.equal(other(x), model(x))
    # A float model does not take int8 parts: strict refuses, naming them, and leaves it untouched.
    plain = float_model()
    before = plain[0].weight.clone()
    with pytest.raises(torchkeep.LoadMismatchError, match=r"0\.weight\.qdata"):
        torchkeep.load_into(plain, tmp_path / "q.safetensors")
    assert torch.equal(plain[0].weight, before)


def test_skipped_modules_stay_float(tmp_path: Path) -> None:
    model = torchkeep.quantize(float_model(), "int8_dynamic", skip=["4"])
    assert type(model[4].weight) is nn.Parameter and type(model[0].weight).__name__ == "Int8Tensor"
    torchkeep.save_model(model, tmp_path / "q")
    loaded = torchkeep.load_model(tmp_path / "q")
    assert type(loaded[4].weight) is nn.Parameter
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), model(x))


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8_dynamic, int8_weight_only"):
        torchkeep.quantize(float_model(), "int3")  # type: ignore[arg-type]
    model = torchkeep.quantize(float_model())
    with pytest.raises(ValueError, match="already quantized"):
        torchkeep.quantize(model)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    direct = float_model()
    quantize_(direct, Int8WeightOnlyConfig())
    with pytest.raises(torchkeep.UnsupportedTensorError, match=r"torchkeep\.quantize"):
        torchkeep.save_model(direct, tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    torchkeep.save_model(model, tmp_path / "q")
    with pytest.raises(ValueError, match="cannot cast a quantized model"):
        torchkeep.load_model(tmp_path / "q", dtype=torch.float16)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda q: q.update(method="int2"), "names method 'int2'"),
        (lambda q: q.update(modules="0"), "not a list of module names"),
        (lambda q: q.update(modules=["0", "nope"]), "names modules the model lacks"),
        (lambda q: q.update(tensors={"0.weight": "Float8Tensor"}), "install that version"),
    ],
)
def test_a_damaged_recipe_is_a_typed_error(tmp_path: Path, edit: object, match: str) -> None:
    torchkeep.save_model(torchkeep.quantize(float_model()), tmp_path / "q")
    path = tmp_path / "q" / "torchkeep_model.json"
    manifest = json.loads(path.read_text())
    edit(manifest["quantization"])  # type: ignore[operator]
    path.write_text(json.dumps(manifest))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=match):
        torchkeep.load_model(tmp_path / "q")


def test_without_torchao_the_pip_command_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"pip install 'torchkeep\[quant\]'"):
        torchkeep.quantize(float_model())
