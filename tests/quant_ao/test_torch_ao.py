"""torch.ao.quantization models (seed 003's tutorial path) through torchkeep: save / load_into / save_model /
load_model with bit-identical outputs, the tutorial's ``torch.save(quantized_model.state_dict())`` files read
in full, the documented key scheme, and every refusal (damaged or hostile packed parameters, LSTM)."""

from __future__ import annotations

import collections
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.quant_ao.models import (
    SmallCNN,
    dynamic_mlp,
    run,
    static_cnn,
    static_sequential,
    torch_ao_notices_filtered,
)

MIGRATION = r"torchkeep\.quantize\(model, method=\"int8_dynamic\"\)"
save_warns = pytest.mark.filterwarnings("ignore:torch.ao.quantization \\(and its quantized tensors\\)")


def metadata_of(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    meta: dict[str, str] = json.loads(raw[8 : 8 + size])["__metadata__"]
    return meta


def save_quietly(obj: Any, path: Path) -> None:
    with pytest.warns(torchkeep.TorchkeepWarning, match=MIGRATION):
        torchkeep.save(obj, path)


# -- torchkeep.save / load_into -----------------------------------------------------------------------------


def test_dynamic_model_saves_with_a_warning_and_loads_into_another_bit_for_bit(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0), dynamic_mlp(1)
    x = torch.randn(5, 8)
    assert not torch.equal(run(a, x), run(b, x))
    with pytest.warns(torchkeep.TorchkeepWarning, match=MIGRATION) as caught:
        torchkeep.save(a, tmp_path / "q.safetensors")
    assert caught[0].filename == __file__  # points at the caller's line
    report = torchkeep.load_into(b, tmp_path / "q.safetensors")
    assert report.ok and not report.cast
    assert torch.equal(run(a, x), run(b, x))


@pytest.mark.parametrize(("backend", "fused"), [("x86", True), ("fbgemm", False)])
def test_static_model_round_trips_through_save_and_load_into(tmp_path: Path, backend: str, fused: bool) -> None:
    a, b = static_cnn(0, backend, fused=fused), static_cnn(1, backend, fused=fused)
    x = torch.randn(3, 1, 6, 6)
    assert not torch.equal(run(a, x), run(b, x))
    save_quietly(a, tmp_path / "s.safetensors")
    torchkeep.load_into(b, tmp_path / "s.safetensors")
    assert torch.equal(run(a, x), run(b, x))
    assert b.fc.scale == a.fc.scale and b.quant.scale.item() == a.quant.scale.item()


def test_float16_dynamic_quantization_round_trips(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0, torch.float16), dynamic_mlp(1, torch.float16)
    x = torch.randn(5, 8)
    save_quietly(a, tmp_path / "h.safetensors")
    assert "0._packed_params.weight" in torchkeep.load(tmp_path / "h.safetensors")
    torchkeep.load_into(b, tmp_path / "h.safetensors")
    assert torch.equal(run(a, x), run(b, x))


def test_the_key_scheme_and_the_metadata_are_as_documented(tmp_path: Path) -> None:
    model = static_cnn(0)
    save_quietly(model, tmp_path / "s.safetensors")
    stored = torchkeep.load(tmp_path / "s.safetensors")
    assert list(stored) == [
        "quant.scale", "quant.zero_point",
        "conv.weight.int_repr", "conv.weight.scale", "conv.weight.zero_point", "conv.bias", "conv.scale",
        "conv.zero_point",
        "fc.scale", "fc.zero_point",
        "fc._packed_params.weight.int_repr", "fc._packed_params.weight.scale", "fc._packed_params.weight.zero_point",
        "fc._packed_params.bias",
    ]  # fmt: skip
    assert not any(t.is_quantized for t in stored.values())
    weight = model.fc.weight()
    assert stored["fc._packed_params.weight.int_repr"].dtype == torch.int8
    assert stored["fc._packed_params.weight.scale"].shape == (5, 1)  # per channel, axis 0: broadcasts
    assert stored["conv.weight.scale"].shape == (4, 1, 1, 1)
    parts = {p: stored[f"fc._packed_params.weight.{p}"] for p in ("int_repr", "scale", "zero_point")}
    dequantized = (parts["int_repr"].double() - parts["zero_point"]) * parts["scale"]
    assert torch.equal(dequantized.float(), weight.dequantize())

    described = json.loads(metadata_of(tmp_path / "s.safetensors")["torchkeep.torch_ao"])
    assert described["version"] == 1 and described["library"] == "torch.ao.quantization"
    assert described["entries"]["conv.weight"] == {
        "kind": "quantized", "dtype": "qint8", "qscheme": "per_channel_affine", "axis": 0,
    }  # fmt: skip
    assert described["entries"]["fc._packed_params._packed_params"]["bias"] is True
    assert described["entries"]["fc._packed_params.dtype"] == {"kind": "dtype", "dtype": "qint8"}

    dynamic = dynamic_mlp(0)
    save_quietly(dynamic, tmp_path / "d.safetensors")
    again = torchkeep.load(tmp_path / "d.safetensors")
    assert again["0._packed_params.weight.scale"].shape == () and again["0._packed_params.weight.scale"].dtype == (
        torch.float64
    )
    save_quietly(dynamic, tmp_path / "d2.safetensors")
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "d2.safetensors").read_bytes()


def test_the_tutorials_state_dict_line_works_with_torchkeep_save(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0), dynamic_mlp(1)
    save_quietly(a.state_dict(), tmp_path / "q.safetensors")  # torch.save(quantized_model.state_dict(), ...)
    torchkeep.load_into(b, tmp_path / "q.safetensors")
    x = torch.randn(2, 8)
    assert torch.equal(run(a, x), run(b, x))


def test_an_int8_weight_does_not_load_as_another_integer_type(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0), dynamic_mlp(1)
    save_quietly(a, tmp_path / "q.safetensors")
    state = torchkeep.load(tmp_path / "q.safetensors")
    state["0._packed_params.weight.int_repr"] = state["0._packed_params.weight.int_repr"].to(torch.uint8)
    x = torch.randn(2, 8)
    before = run(b, x)
    with pytest.raises(torchkeep.LoadMismatchError) as info:
        torchkeep.load_into(b, state)
    assert [m.key for m in info.value.report.mismatched] == ["0._packed_params.weight.int_repr"]
    assert "int8 vs file [16, 8] uint8" in str(info.value)
    assert torch.equal(run(b, x), before)  # untouched


def test_a_non_strict_load_fills_what_matches_and_keeps_the_rest(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0), dynamic_mlp(1)
    save_quietly(a, tmp_path / "q.safetensors")
    state = torchkeep.load(tmp_path / "q.safetensors")
    partial = {k: v for k, v in state.items() if k.startswith("2.")}
    report = torchkeep.load_into(b, partial, strict=False)
    assert "0._packed_params.weight.int_repr" in report.missing
    assert torch.equal(b[2].weight().int_repr(), a[2].weight().int_repr())
    assert not torch.equal(b[0].weight().int_repr(), a[0].weight().int_repr())


def test_a_quantized_model_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    a, b = dynamic_mlp(0), dynamic_mlp(1)
    with pytest.warns(torchkeep.TorchkeepWarning, match=MIGRATION):
        torchkeep.save_checkpoint(tmp_path / "ckpt", model=a, state={"step": 3})
    torchkeep.load_checkpoint(tmp_path / "ckpt", model=b)
    x = torch.randn(2, 8)
    assert torch.equal(run(a, x), run(b, x))


def test_a_dynamically_quantized_lstm_is_refused_naming_the_module(tmp_path: Path) -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4)
            self.head = nn.Linear(4, 2)

    with torch_ao_notices_filtered():
        model = torch.ao.quantization.quantize_dynamic(Tagger(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    with pytest.raises(
        torchkeep.UnsupportedTensorError, match=r"module 'lstm'.*quantize_dynamic\(model, \{nn\.Linear\}\)"
    ):
        torchkeep.save(model, tmp_path / "lstm.safetensors")
    assert not (tmp_path / "lstm.safetensors").exists()


# -- save_model / load_model --------------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, torchkeep
    model = torchkeep.load_model(sys.argv[1])
    x = torchkeep.load(sys.argv[2])["x"]
    with torch.no_grad():
        torchkeep.save({"y": model(x)}, sys.argv[3])
    print(type(model[0]).__module__, type(model[0]).__name__)
""")


@save_warns
def test_save_model_and_load_model_of_a_dynamic_stock_model_in_a_fresh_process(tmp_path: Path) -> None:
    model = dynamic_mlp(0)
    x = torch.randn(6, 8)
    torchkeep.save_model(model, tmp_path / "q")
    torchkeep.save({"x": x}, tmp_path / "x.safetensors")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", FRESH_PROCESS, str(tmp_path / "q"), str(tmp_path / "x.safetensors"),
         str(tmp_path / "y.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # -W error: load_model itself shows no torch.ao notice
    assert done.stdout.split() == ["torch.ao.nn.quantized.dynamic.modules.linear", "Linear"]
    assert torch.equal(torchkeep.load(tmp_path / "y.safetensors")["y"], run(model, x))

    manifest = json.loads((tmp_path / "q" / "torchkeep_model.json").read_text())
    assert manifest["config_source"] == "stock" and manifest["structure"]["children"]["0"] == {
        "type": "Linear", "args": {"in_features": 8, "out_features": 16, "bias": True},
    }  # fmt: skip
    recipe = manifest["torch_ao_quantization"]
    assert recipe["mode"] == "dynamic" and set(recipe["modules"]) == {"0", "2"}
    assert recipe["modules"]["0"]["weight"] == {"dtype": "qint8", "qscheme": "per_tensor_affine"}
    assert "quantization" not in manifest  # the torchao recipe's key stays the lead's


@save_warns
def test_save_model_and_load_model_of_a_static_model_class(tmp_path: Path) -> None:
    model = static_cnn(0)
    torchkeep.save_model(model, tmp_path / "cnn")
    loaded = torchkeep.load_model(tmp_path / "cnn", cls=SmallCNN)
    x = torch.randn(3, 1, 6, 6)
    assert torch.equal(run(loaded, x), run(model, x))
    recipe = json.loads((tmp_path / "cnn" / "torchkeep_model.json").read_text())["torch_ao_quantization"]
    assert recipe["mode"] == "static" and recipe["identity"] == ["bn", "relu"]
    assert recipe["modules"]["conv"]["type"].endswith("ConvReLU2d")


@save_warns
def test_save_model_and_load_model_of_a_static_stock_model(tmp_path: Path) -> None:
    model = static_sequential(0)
    torchkeep.save_model(model, tmp_path / "seq")
    loaded = torchkeep.load_model(tmp_path / "seq")
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(run(loaded, x), run(model, x))


@save_warns
def test_a_fused_stock_model_cannot_be_described_and_says_what_to_do(tmp_path: Path) -> None:
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(1, 2, 3), nn.ReLU(),
                          torch.ao.quantization.DeQuantStub())  # fmt: skip
    from tests.quant_ao.models import calibrated

    quantized = calibrated(model, "x86", 0, fuse=[["1", "2"]])
    with pytest.raises(ValueError, match="load_into"):
        torchkeep.save_model(quantized, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


@save_warns
def test_load_model_refuses_a_recipe_that_no_longer_matches(tmp_path: Path) -> None:
    torchkeep.save_model(dynamic_mlp(0), tmp_path / "q")
    manifest_path = tmp_path / "q" / "torchkeep_model.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["torch_ao_quantization"]["modules"]["0"]["weight"]["qscheme"] = "per_channel_affine"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="load_into"):
        torchkeep.load_model(tmp_path / "q")
    manifest["torch_ao_quantization"]["modules"]["0"]["weight"]["dtype"] = "__import__('os')"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="bad weight"):
        torchkeep.load_model(tmp_path / "q")


# -- reading the tutorial's torch.save files ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_the_tutorials_pth_loads_every_entry_and_fills_a_quantized_model(tmp_path: Path, kind: str) -> None:
    make = (lambda seed: dynamic_mlp(seed)) if kind == "dynamic" else (lambda seed: static_cnn(seed))
    a, b = make(0), make(1)
    torch.save(a.state_dict(), tmp_path / "quantized_model.pth")  # the tutorial's line
    save_quietly(a, tmp_path / "ours.safetensors")

    read = torchkeep.load(tmp_path / "quantized_model.pth")
    ours = torchkeep.load(tmp_path / "ours.safetensors")
    assert list(read) == list(ours)  # every entry, packed parameters included, under the same names
    for key in ours:
        assert read[key].dtype == ours[key].dtype and torch.equal(read[key], ours[key]), key

    torchkeep.load_into(b, tmp_path / "quantized_model.pth")
    x = torch.randn(3, 8) if kind == "dynamic" else torch.randn(3, 1, 6, 6)
    assert torch.equal(run(a, x), run(b, x))

    report = torchkeep.scan(tmp_path / "quantized_model.pth")
    assert report.verdict == "safe" and report.exit_code == 0


def _hostile_pth(tmp_path: Path, packed: Any, dtype: Any = torch.qint8) -> Path:
    state = collections.OrderedDict(dynamic_mlp(0).state_dict())
    state["0._packed_params._packed_params"] = packed
    state["0._packed_params.dtype"] = dtype
    path = tmp_path / "hostile.pth"
    with torch_ao_notices_filtered():
        torch.save(state, path)
    return path


def _weight() -> torch.Tensor:
    return dynamic_mlp(0)[0].weight()


@pytest.mark.parametrize(
    ("packed", "dtype", "says"),
    [
        (("evil", 3), torch.qint8, "not a 2-d tensor"),
        ((None,), torch.qint8, "pair"),
        ("not a tuple", torch.qint8, "pair"),
        ((_weight(), torch.zeros(16), torch.zeros(1)), torch.qint8, "pair"),
        ((_weight(), "bias"), torch.qint8, "bias"),
        ((_weight(), torch.zeros(3)), torch.qint8, r"shape \[16\]"),
        ((_weight(), torch.zeros(16, dtype=torch.int64)), torch.qint8, "bias"),
        ((torch.zeros(16, 8, dtype=torch.int32), torch.zeros(16)), torch.qint8, "neither quantized nor float"),
        ((_weight(), torch.zeros(16)), torch.quint8, "says torch.quint8"),
    ],
    ids=[
        "strings",
        "one-item",
        "not-tuple",
        "three-items",
        "str-bias",
        "bias-shape",
        "int-bias",
        "int-weight",
        "dtype-disagrees",
    ],
)
def test_a_damaged_or_hostile_packed_entry_is_a_typed_error_naming_it(
    tmp_path: Path, packed: Any, dtype: Any, says: str
) -> None:
    path = _hostile_pth(tmp_path, packed, dtype)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=says) as info:
        torchkeep.load(path)
    assert info.value.key is not None and info.value.key.startswith("0._packed_params.")
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load_into(dynamic_mlp(1), path)


def test_per_channel_scales_that_do_not_fit_their_tensor_are_refused(tmp_path: Path) -> None:
    with torch_ao_notices_filtered():  # torch builds it unchecked; computing with it would read past the scales
        lying = torch._empty_per_channel_affine_quantized(
            (16, 8),
            scales=torch.ones(2, dtype=torch.float64),
            zero_points=torch.zeros(2, dtype=torch.int64),
            axis=0,
            dtype=torch.qint8,
        )
    path = _hostile_pth(tmp_path, (lying, torch.zeros(16)))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="does not fit"):
        torchkeep.load(path)


def test_a_pickled_script_object_is_refused_and_not_called_safe(tmp_path: Path) -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4)

    with torch_ao_notices_filtered():
        model = torch.ao.quantization.quantize_dynamic(Tagger(), {nn.LSTM}, dtype=torch.qint8)
        torch.save(model.state_dict(), tmp_path / "lstm.pth")
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"torch\.ScriptObject") as info:
        torchkeep.load(tmp_path / "lstm.pth")
    assert info.value.globals == ("torch.ScriptObject",)
    assert torchkeep.scan(tmp_path / "lstm.pth").verdict != "safe"
