"""The seeds' workflows: save a model, load it into a fresh one, wrapped or not, fully or partly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


class MLP(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def trained_cnn() -> CNN:
    torch.manual_seed(0)
    model = CNN()
    model.train()
    for _ in range(3):  # moves BatchNorm running stats and num_batches_tracked
        model(torch.randn(8, 1, 8, 8))
    return model


def differs(a: nn.Module, b: nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_mlp_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, fresh = MLP(), MLP()
    assert differs(model, fresh)
    torchkeep.save(model, tmp_path / "m.safetensors")
    report = torchkeep.load_into(fresh, tmp_path / "m.safetensors")
    assert report.ok and sorted(report.loaded) == sorted(model.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(model(x), fresh(x))


def test_cnn_with_batchnorm_keeps_running_stats_and_counter(tmp_path: Path) -> None:
    model = trained_cnn()
    assert int(model.features[1].num_batches_tracked) == 3
    fresh = CNN()
    torchkeep.save(model, tmp_path / "cnn.safetensors")
    torchkeep.load_into(fresh, tmp_path / "cnn.safetensors")
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert fresh.features[1].num_batches_tracked.dtype == torch.int64
    model.eval()
    fresh.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), fresh(x))


def test_train_eval_mode_is_left_as_it_was(tmp_path: Path) -> None:
    torchkeep.save(trained_cnn(), tmp_path / "cnn.safetensors")
    fresh = CNN()
    fresh.eval()
    torchkeep.load_into(fresh, tmp_path / "cnn.safetensors")
    assert not any(m.training for m in fresh.modules())
    fresh.train()
    torchkeep.load_into(fresh, tmp_path / "cnn.safetensors")
    assert all(m.training for m in fresh.modules())


def test_dataparallel_saved_then_loaded_into_bare_model_and_back(tmp_path: Path) -> None:
    wrapped = nn.DataParallel(trained_cnn())
    torchkeep.save(wrapped, tmp_path / "dp.safetensors")
    assert not any(k.startswith("module.") for k in torchkeep.load(tmp_path / "dp.safetensors"))
    bare = CNN()
    assert torchkeep.load_into(bare, tmp_path / "dp.safetensors").ok
    assert_same_tensors(wrapped.module.state_dict(), bare.state_dict())

    torchkeep.save(bare, tmp_path / "bare.safetensors")
    rewrapped = nn.DataParallel(CNN())
    assert torchkeep.load_into(rewrapped, tmp_path / "bare.safetensors").ok
    assert_same_tensors(bare.state_dict(), rewrapped.module.state_dict())


def test_state_dict_with_module_prefix_loads_into_bare_model(tmp_path: Path) -> None:
    model = trained_cnn()
    prefixed = nn.DataParallel(model).state_dict()  # what users saved by hand
    assert all(k.startswith("module.") for k in prefixed)
    torchkeep.save(prefixed, tmp_path / "p.safetensors")
    bare = CNN()
    assert torchkeep.load_into(bare, tmp_path / "p.safetensors").ok
    assert_same_tensors(model.state_dict(), bare.state_dict())
    other = CNN()
    assert torchkeep.load_into(other, prefixed).ok  # a state dict in memory works the same


def test_a_submodule_named_module_is_not_stripped(tmp_path: Path) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

    a, b = Holder(), Holder()
    torchkeep.save(a, tmp_path / "h.safetensors")
    assert set(torchkeep.load(tmp_path / "h.safetensors")) == {"module.weight", "module.bias"}
    assert torchkeep.load_into(b, tmp_path / "h.safetensors").ok
    assert torch.equal(a.module.weight, b.module.weight)


def test_torch_compile_prefixes_on_either_side(tmp_path: Path) -> None:
    model = MLP()
    compiled = torch.compile(model)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    torchkeep.save(compiled, tmp_path / "c.safetensors")
    assert set(torchkeep.load(tmp_path / "c.safetensors")) == set(model.state_dict())
    torchkeep.save(compiled.state_dict(), tmp_path / "raw.safetensors")  # prefixes saved by hand
    for source in ("c.safetensors", "raw.safetensors"):
        target = torch.compile(MLP())
        assert torchkeep.load_into(target, tmp_path / source).ok
        assert_same_tensors(model.state_dict(), target._orig_mod.state_dict())
        bare = MLP()
        assert torchkeep.load_into(bare, tmp_path / source).ok


def test_strict_failure_raises_and_leaves_the_model_unchanged(tmp_path: Path) -> None:
    torchkeep.save(MLP(classes=10), tmp_path / "m10.safetensors")
    target = MLP(classes=5)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(torchkeep.LoadMismatchError) as info:
        torchkeep.load_into(target, tmp_path / "m10.safetensors")
    assert_same_tensors(before, target.state_dict())
    assert {m.key for m in info.value.report.mismatched} == {"fc.2.weight", "fc.2.bias"}
    assert "fc.2.weight" in str(info.value) and "strict=False" in str(info.value)


def test_non_strict_transfer_reports_exactly_the_mismatched_head(tmp_path: Path) -> None:
    source = MLP(classes=10)
    torchkeep.save(source, tmp_path / "m10.safetensors")
    target = MLP(classes=5)
    head_before = target.fc[2].weight.detach().clone()
    report = torchkeep.load_into(target, tmp_path / "m10.safetensors", strict=False)
    assert sorted(report.loaded) == ["fc.0.bias", "fc.0.weight"]
    assert report.missing == [] and report.unexpected == []
    mismatch = {m.key: m for m in report.mismatched}
    assert set(mismatch) == {"fc.2.weight", "fc.2.bias"}
    assert mismatch["fc.2.weight"].model_shape == (5, 8)
    assert mismatch["fc.2.weight"].file_shape == (10, 8)
    assert not report.ok
    assert torch.equal(target.fc[0].weight, source.fc[0].weight)
    assert torch.equal(target.fc[2].weight, head_before)
    text = str(report)
    assert "mismatched" in text and "fc.2.weight" in text and "[5, 8]" in text and "[10, 8]" in text


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    state = MLP().state_dict()
    state.pop("fc.0.bias")
    state["extra.weight"] = torch.zeros(2)
    report = torchkeep.load_into(MLP(), state, strict=False)
    assert report.missing == ["fc.0.bias"]
    assert report.unexpected == ["extra.weight"]
    with pytest.raises(torchkeep.LoadMismatchError):
        torchkeep.load_into(MLP(), state)


def test_remap_with_regex_rules_and_callable(tmp_path: Path) -> None:
    model = MLP()
    renamed = {k.replace("fc.", "backbone.layers."): v for k, v in model.state_dict().items()}
    torchkeep.save(renamed, tmp_path / "r.safetensors")
    target = MLP()
    report = torchkeep.load_into(target, tmp_path / "r.safetensors", remap={r"^backbone\.": "", r"^layers\.": "fc."})
    assert report.ok
    assert_same_tensors(model.state_dict(), target.state_dict())
    target2 = MLP()
    assert torchkeep.load_into(target2, renamed, remap=lambda k: k.replace("backbone.layers.", "fc.")).ok
    with pytest.raises(TypeError, match="remap"):
        torchkeep.load_into(MLP(), renamed, remap=["nope"])  # type: ignore[arg-type]


def test_tied_weights_come_back_tied(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model, fresh = TiedLM(), TiedLM()
    torchkeep.save(model, tmp_path / "lm.safetensors")
    assert torchkeep.inspect(tmp_path / "lm.safetensors").total_params == 50 * 8
    report = torchkeep.load_into(fresh, tmp_path / "lm.safetensors")
    assert report.ok
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(model(ids), fresh(ids))


def test_tied_model_loads_a_file_that_stores_one_name_only(tmp_path: Path) -> None:
    model = TiedLM()
    torchkeep.save({"embed.weight": model.embed.weight}, tmp_path / "one.safetensors")
    fresh = TiedLM()
    report = torchkeep.load_into(fresh, tmp_path / "one.safetensors")
    assert report.ok and set(report.loaded) == {"embed.weight", "head.weight"}
    assert torch.equal(fresh.head.weight, model.embed.weight)


def test_lower_precision_file_loads_with_a_cast_noted(tmp_path: Path) -> None:
    model = MLP()
    torchkeep.save(model, tmp_path / "f32.safetensors")
    half = torchkeep.load(tmp_path / "f32.safetensors", dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())
    target = MLP()
    report = torchkeep.load_into(target, half)
    assert report.ok and sorted(report.cast) == sorted(half)
    assert target.fc[0].weight.dtype == torch.float32
    assert torch.equal(target.fc[0].weight, model.fc[0].weight.half().float())


def test_int_tensor_into_float_parameter_is_a_mismatch() -> None:
    state = MLP().state_dict()
    state["fc.0.bias"] = torch.arange(8)
    report = torchkeep.load_into(MLP(), state, strict=False)
    assert [m.key for m in report.mismatched] == ["fc.0.bias"]


def test_load_into_missing_file_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.CheckpointNotFoundError) as info:
        torchkeep.load_into(MLP(), tmp_path / "nope.safetensors")
    assert isinstance(info.value, FileNotFoundError)
    assert "nope.safetensors" in str(info.value)


def test_load_into_from_a_training_checkpoint_takes_its_model(tmp_path: Path) -> None:
    """A torchkeep checkpoint folder is a path torchkeep.load reads (its model's weights); load_into read its
    whole tensor file instead and refused it (model.weight, rng.torch... unexpected)."""
    model = nn.Linear(3, 2)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, optimizer=torch.optim.Adam(model.parameters()))
    for map_location in (None, "cpu"):
        fresh = nn.Linear(3, 2)
        report = torchkeep.load_into(fresh, tmp_path / "ck", map_location=map_location)
        assert report.ok and sorted(report.loaded) == ["bias", "weight"]
        assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
