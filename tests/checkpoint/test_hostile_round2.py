"""A second round of hostile and inconsistent inputs: each a typed error naming the file (or the same verdict
from verify as from load), never an untyped error, a hang or an allocation the file does not hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchkeep
from torchkeep.checkpoint.layout import CHECKSUM_KEY, manifest_bytes
from torchkeep.cli.main import main


def rewrite(manifest: Path, change: Any) -> None:
    body = json.loads(manifest.read_text())
    body.pop(CHECKSUM_KEY)
    tensors_file = body.pop("tensors_file")
    change(body)
    manifest.write_bytes(manifest_bytes(body, tensors_file))  # a valid checksum: only the content is hostile


def incremental_step(tmp_path: Path) -> Path:
    with torchkeep.CheckpointManager(tmp_path / "run", incremental=True) as manager:
        manager.save(1, model=nn.Linear(256, 256), rng=False)
    return tmp_path / "run" / "step-00000001"


@pytest.mark.parametrize(
    "entry",
    [
        {"object": "0123456789abcdef-0", "dtype": "F32", "shape": [0, 10**100]},  # overflowed torch.empty
        {"object": "0123456789abcdef-8000000000000000000", "dtype": "U8", "shape": [8 * 10**18]},  # 8 EB
    ],
    ids=["overflow", "exabytes"],
)
def test_a_shared_tensor_of_impossible_size_is_refused_before_any_allocation(
    tmp_path: Path, entry: dict[str, Any]
) -> None:
    step = incremental_step(tmp_path)
    rewrite(step / "manifest.json", lambda body: body["shared_tensors"].update({"model.weight": entry}))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"model\.weight"):
        torchkeep.load_checkpoint(step, model=nn.Linear(256, 256), rng=False)


def test_verify_checks_a_checkpoint_as_load_checkpoint_does(tmp_path: Path) -> None:
    step = incremental_step(tmp_path)
    obj = next((tmp_path / "run" / "objects").iterdir())
    data = bytearray(obj.read_bytes())
    data[100] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="damaged"):
        torchkeep.verify(step)  # it globbed *.safetensors and returned 1
    assert main(["verify", str(step)]) == 1


def test_verify_compares_shards_with_their_index_as_load_does(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for read in (torchkeep.load, torchkeep.verify):
        with pytest.raises(torchkeep.CorruptCheckpointError, match="index does not list"):
            read(tmp_path)


def test_an_index_listing_nothing_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    for read in (torchkeep.load, torchkeep.inspect, torchkeep.verify):  # load gave {}, inspect an IndexError
        with pytest.raises(torchkeep.CorruptCheckpointError, match="lists no tensors"):
            read(tmp_path)


@pytest.mark.parametrize("value", [5, torch.zeros(2, dtype=torch.uint8)], ids=["int", "tensor"])
def test_an_accelerate_cuda_state_of_the_wrong_type_is_corrupt(tmp_path: Path, value: Any) -> None:
    model = nn.Linear(2, 2)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    states = {"step": 3, "random_state": None, "torch_cuda_manual_seed": value}
    torch.save(states, tmp_path / "random_states_0.pkl")  # as Accelerate writes it
    with pytest.raises(torchkeep.CorruptCheckpointError, match="torch_cuda_manual_seed"):
        torchkeep.load_checkpoint(tmp_path, model=nn.Linear(2, 2))


@pytest.mark.parametrize(
    "layer",
    [
        {"type": "Linear", "args": {"in_features": -1, "out_features": 2}},
        {"type": "Linear", "args": {"in_features": 2**62, "out_features": 2**62}},
        {"type": "MultiheadAttention", "args": {"embed_dim": 3, "num_heads": 2}},
    ],
    ids=["negative", "overflow", "assert"],
)
def test_a_model_structure_torch_refuses_is_corrupt(tmp_path: Path, layer: dict[str, Any]) -> None:
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m")
    manifest = tmp_path / "m" / "torchkeep_model.json"
    body = json.loads(manifest.read_text())
    body["structure"] = {"type": "Sequential", "children": {"0": layer}}
    manifest.write_text(json.dumps(body))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="cannot rebuild"):
        torchkeep.load_model(tmp_path / "m")


def test_a_structure_bigger_than_the_machine_is_not_built(tmp_path: Path) -> None:
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m")
    manifest = tmp_path / "m" / "torchkeep_model.json"
    body = json.loads(manifest.read_text())
    side = int((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4) ** 0.5) + 1  # > memory in fp32
    body["structure"] = {"type": "Sequential", "children": {"0": {"type": "Linear", "args": {
        "in_features": side, "out_features": side}}}}  # fmt: skip
    manifest.write_text(json.dumps(body))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="more than this machine's"):
        torchkeep.load_model(tmp_path / "m", strict=False)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_onnx_external_data_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    os.mkfifo(tmp_path / "ext.bin")
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "ext.bin"
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [tensor])
    (tmp_path / "m.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx is not None
    with pytest.raises(torchkeep.CorruptCheckpointError, match="FIFO"):
        torchkeep.load(tmp_path / "m.onnx")
