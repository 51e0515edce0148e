"""Hostile and damaged manifests, indexes and model folders: a typed error, and nothing modified.

The manifests here carry valid checksums (recomputed after each change), as an attacker's would:
the checksum catches damage, not intent, so every field is validated on its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.checkpoint.layout import CHECKSUM_KEY, manifest_bytes
from torchkeep.cli.main import main


def rewrite_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a checkpoint manifest and re-sign it, as an attacker can."""
    body = json.loads((folder / "manifest.json").read_text())
    del body[CHECKSUM_KEY]
    change(body)
    tensors_file = body.pop("tensors_file")
    (folder / "manifest.json").write_bytes(manifest_bytes(body, tensors_file))


def checkpoint(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    torchkeep.save_checkpoint(path, model=model, optimizer=opt, epoch=3)
    return path, model, opt


def fresh() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    model = nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused(path: Path, match: str) -> None:
    """load_checkpoint refuses with CorruptCheckpointError and leaves model and optimizer as they were."""
    model, opt, before = fresh()
    with pytest.raises(torchkeep.CorruptCheckpointError, match=match or None):
        torchkeep.load_checkpoint(path, model=model, optimizer=opt)
    assert_same_tensors(before, dict(model.state_dict()))
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/tensors.safetensors", "", ".", 7])
def test_tensor_file_named_outside_the_folder(tmp_path: Path, name: object, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = checkpoint(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((path / "tensors.safetensors").read_bytes())
    rewrite_manifest(path, lambda body: body["tensors_file"].update(name=name))
    assert_refused(path, "plain file name")
    for command in ("verify", "inspect"):
        assert main([command, str(path)]) == 1
        assert "plain file name" in capsys.readouterr().err


def test_tensor_file_that_is_a_link_out_of_the_folder(tmp_path: Path) -> None:
    path, _, _ = checkpoint(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (path / "tensors.safetensors").rename(outside)
    (path / "tensors.safetensors").symlink_to(outside)
    assert_refused(path, "leaves its folder")
    # A link inside the folder is fine.
    (path / "tensors.safetensors").unlink()
    outside.rename(path / "real.safetensors")
    (path / "tensors.safetensors").symlink_to("real.safetensors")
    model, opt, _ = fresh()
    assert torchkeep.load_checkpoint(path, model=model, optimizer=opt)["epoch"] == 3


def test_manager_restore_skips_an_escaping_checkpoint(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, model=model, rng=False)
        mgr.save(2, model=model, rng=False)
    step2 = tmp_path / "run" / "step-00000002"
    rewrite_manifest(step2, lambda body: body["tensors_file"].update(name="../step-00000001/tensors.safetensors"))
    reader = torchkeep.CheckpointManager(tmp_path / "run", read_only=True)
    with pytest.warns(torchkeep.TorchkeepWarning, match="step-00000002"):
        assert reader.restore(model=nn.Linear(2, 2))["step"] == 1


def test_index_names_and_links(tmp_path: Path) -> None:
    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    folder = tmp_path / "sharded"
    torchkeep.save(state, folder, max_shard_size="20KB")
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shard = doc["weight_map"]["a"]
    for bad in ("../x.safetensors", "/abs.safetensors", "a\\b.safetensors"):
        index.write_text(json.dumps({**doc, "weight_map": {**doc["weight_map"], "a": bad}}))
        with pytest.raises(torchkeep.CorruptCheckpointError, match="same folder"):
            torchkeep.load(folder)
    index.write_text(json.dumps(doc))
    outside = tmp_path / "outside.safetensors"
    (folder / shard).rename(outside)
    (folder / shard).symlink_to(outside)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="leaves its folder"):
        torchkeep.load(folder)


def test_hugging_face_cache_links_to_blobs_load(tmp_path: Path) -> None:
    # snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays out its cache.
    repo = tmp_path / "models--org--net"
    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64)}
    torchkeep.save(state, tmp_path / "staging", max_shard_size="20KB")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "staging").iterdir())):
        blob = repo / "blobs" / f"hash{i}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    assert_same_tensors(state, torchkeep.load(snapshot))


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "size is a string": lambda b: b["tensors_file"].update(size="12"),
    "objects is a list": lambda b: b.update(objects=[1]),
    "tensor ref is an int": lambda b: b["objects"]["model"].update(weight={"$tensor": 5}),
    "tensor ref missing": lambda b: b["objects"]["model"].update(weight={"$tensor": "nope"}),
    "dict pairs not a list": lambda b: b["objects"]["optimizer"].update(state={"$dict": "x"}),
    "unhashable dict key": lambda b: b["objects"]["optimizer"].update(state={"$dict": [[[1], 2]]}),
    "object ndarray": lambda b: b["state"].update(epoch={"$ndarray": "model.weight", "dtype": "O"}),
    "negative size": lambda b: b["state"].update(epoch={"$size": [-1]}),
    "bad device": lambda b: b["state"].update(epoch={"$device": "warp-drive"}),
    "bad float": lambda b: b["state"].update(epoch={"$float": "1e999"}),
    "unknown tag": lambda b: b["state"].update(epoch={"$pickle": "x"}),
    "tuple of a number": lambda b: b["state"].update(epoch={"$tuple": 3}),
    "npscalar of a list": lambda b: b["state"].update(epoch={"$npscalar": "<f4", "value": [1, 2]}),
    "param_groups a dict": lambda b: b["objects"]["optimizer"].update(param_groups={"0": {}}),
    "rng garbage": lambda b: b["objects"].update(rng={"python": [3, [1, 2], None]}),
    "rng torch not a tensor": lambda b: b["objects"].update(rng={"torch": "seed"}),
    "deep nesting": lambda b: b["state"].update(epoch=_deep(300)),
}


def _deep(levels: int) -> Any:
    node: Any = 0
    for _ in range(levels):
        node = [node]
    return node


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_fields_are_typed_and_change_nothing(tmp_path: Path, case: str) -> None:
    path, _, _ = checkpoint(tmp_path)
    rewrite_manifest(path, MALFORMED[case])
    assert_refused(path, "")


def test_bad_rng_state_is_found_before_the_model_is_modified(tmp_path: Path) -> None:
    path, saved_model, _ = checkpoint(tmp_path)
    rewrite_manifest(path, lambda b: b["objects"]["rng"].update(numpy={"$tuple": ["MT19937", [1, 2, 3], 0, 0, 0.0]}))
    assert_refused(path, "RNG state is malformed")
    model, opt, _ = fresh()
    torchkeep.load_checkpoint(path, model=model, optimizer=opt, rng=False)  # the rest is fine
    assert_same_tensors(dict(saved_model.state_dict()), dict(model.state_dict()))


def test_an_object_that_refuses_its_state_is_named_and_models_stay_untouched(tmp_path: Path) -> None:
    class Picky:
        def state_dict(self) -> dict[str, Any]:
            return {"n": 1}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise KeyError("wants 'm'")

    model = nn.Linear(3, 2)
    torchkeep.save_checkpoint(tmp_path / "c", model=model, components={"picky": Picky()})
    target, _, before = fresh()
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"components.picky.*nothing else was modified"):
        torchkeep.load_checkpoint(tmp_path / "c", model=target, components={"picky": Picky()})
    assert_same_tensors(before, dict(target.state_dict()))


def test_newer_format_versions_say_upgrade(tmp_path: Path) -> None:
    path, _, _ = checkpoint(tmp_path)
    rewrite_manifest(path, lambda b: b.update(version=5))  # 2: incremental, 3: several ranks, 4: collections
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"newer torchkeep \(format version 5.*upgrade"):
        torchkeep.load_checkpoint(path, model=nn.Linear(3, 2))

    weights = tmp_path / "w.safetensors"
    torchkeep.save({"w": torch.ones(3)}, weights)
    raw = weights.read_bytes()
    assert raw.count(b'"torchkeep.format":"1"') == 1
    weights.write_bytes(raw.replace(b'"torchkeep.format":"1"', b'"torchkeep.format":"9"'))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"newer torchkeep.*upgrade"):
        torchkeep.load(weights)

    net = tmp_path / "net"
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), net)
    manifest = json.loads((net / "torchkeep_model.json").read_text())
    (net / "torchkeep_model.json").write_text(json.dumps({**manifest, "version": 5}))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"newer torchkeep.*upgrade"):
        torchkeep.load_model(net)


@pytest.mark.parametrize(
    "document",
    [
        "[" * 100_000 + "]" * 100_000,
        json.dumps(_deep(300)),
        '{"format": "torchkeep.model", "version": 1, "class": 5}',
        '{"format": "torchkeep.model", "version": 1, "structure": [1]}',
        '{"format": "torchkeep.model", "version": "1"}',
        '{"format": "torchkeep.model", "format": "torchkeep.model", "version": 1}',
        '{"format": "torchkeep.model", "version": 1, "class": "a:B"',
        "\udcff",
    ],
)
def test_model_manifest_json_is_checked(tmp_path: Path, document: str) -> None:
    net = tmp_path / "net"
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), net)
    (net / "torchkeep_model.json").write_bytes(document.encode("utf-8", "surrogateescape"))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"torchkeep_model.json"):
        torchkeep.load_model(net)


def test_deep_config_and_index_are_typed(tmp_path: Path) -> None:
    net = tmp_path / "net"
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), net)
    (net / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"config.json"):
        torchkeep.load_model(net)
    folder = tmp_path / "sharded"
    torchkeep.save({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, folder, max_shard_size="20KB")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 50_000)
    with pytest.raises(torchkeep.CorruptCheckpointError, match="index"):
        torchkeep.load(folder)


def test_truncated_files_say_so(tmp_path: Path) -> None:
    path, _, _ = checkpoint(tmp_path)
    tensors = path / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])
    with pytest.raises(torchkeep.CorruptCheckpointError, match="truncated"):
        torchkeep.load_checkpoint(path, model=nn.Linear(3, 2))
    path2, _, _ = checkpoint(tmp_path / "two")
    manifest = path2 / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-40])
    with pytest.raises(torchkeep.CorruptCheckpointError, match="truncated"):
        torchkeep.load_checkpoint(path2, model=nn.Linear(3, 2))


def test_state_too_deep_or_cyclic_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnsupportedValueError, match="levels deep"):
        torchkeep.save_checkpoint(tmp_path / "a", history=_deep(1000))
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(torchkeep.UnsupportedValueError, match="refers to itself"):
        torchkeep.save_checkpoint(tmp_path / "b", history=cyclic)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_unavailable_devices_are_a_typed_error(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    torchkeep.save({"w": torch.ones(3)}, weights)
    for device in ("cuda:0", "cuda", torch.device("cuda", 1), "mps"):
        with pytest.raises(torchkeep.InvalidDeviceError, match=r"not available.*map_location='cpu'"):
            torchkeep.load(weights, map_location=device)
    with pytest.raises(torchkeep.InvalidDeviceError):
        torchkeep.load(weights, map_location={"cpu": "cuda:0"})
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torchkeep.save(model, weights)
    with pytest.raises(torchkeep.InvalidDeviceError):
        torchkeep.load_into(model, weights, map_location="cuda:0")
    # A checkpoint that says its tensors lived on a GPU, loaded "where they were saved".
    path, _, _ = checkpoint(tmp_path)
    rewrite_manifest(path, lambda b: b["objects"]["model"]["weight"].update(device="cuda:0"))
    target, opt, before = fresh()
    with pytest.raises(torchkeep.InvalidDeviceError, match="cuda"):
        torchkeep.load_checkpoint(path, model=target, optimizer=opt, map_location=None)
    assert_same_tensors(before, dict(target.state_dict()))
    with pytest.raises(torchkeep.InvalidDeviceError, match="not a device"):
        torchkeep.load(weights, map_location="warp-drive:0")


@pytest.mark.parametrize(
    "structure",
    [
        {"type": "Linear", "args": {"nope": 1}},
        {"type": "system", "args": {}},
        {"type": "Sequential", "children": [1, 2]},
        {"type": "Linear", "args": {"in_features": "x", "out_features": 2}},
    ],
)
def test_model_structure_that_cannot_be_built_is_typed(tmp_path: Path, structure: dict[str, Any]) -> None:
    net = tmp_path / "net"
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), net)
    manifest = json.loads((net / "torchkeep_model.json").read_text())
    (net / "torchkeep_model.json").write_text(json.dumps({**manifest, "structure": structure}))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="cannot rebuild"):
        torchkeep.load_model(net)


def test_an_optimizer_group_listing_fewer_parameters_is_typed(tmp_path: Path) -> None:
    """Found by the fuzzing campaign: a re-signed manifest whose group lists one parameter fewer."""
    path, _, _ = checkpoint(tmp_path)
    rewrite_manifest(path, lambda body: body["objects"]["optimizer"]["param_groups"][0]["params"].pop())
    model, opt, before = fresh()
    with pytest.raises(torchkeep.StateMismatchError, match="parameter group 0 has 2 parameters, the checkpoint 1"):
        torchkeep.load_checkpoint(path, model=model, optimizer=opt)
    assert_same_tensors(before, dict(model.state_dict()))
    assert opt.state_dict()["state"] == {}
