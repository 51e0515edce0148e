"""consolidate and convert --sharded, in one process without a process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep
from tests.conftest import assert_same_tensors
from tests.distributed.ranks import mlp
from torchkeep.cli.main import main


def test_weights_to_sharded_checkpoint_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp()
    torchkeep.save(model, tmp_path / "model.safetensors")
    report = torchkeep.convert(tmp_path / "model.safetensors", tmp_path / "sharded", sharded=True)
    assert report.kind == "sharded checkpoint" and report.tensors == len(model.state_dict())
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert ".metadata" in files and any(f.endswith(".distcp") for f in files)
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["distributed"]["world_size"] == 1
    assert all("$dcp" in node for node in manifest["objects"]["model"].values())  # every tensor in DCP

    fresh = mlp()
    torchkeep.load_checkpoint(tmp_path / "sharded", model=fresh, rng=False)
    assert_same_tensors(dict(fresh.state_dict()), dict(model.state_dict()))

    back = torchkeep.consolidate(tmp_path / "sharded", tmp_path / "back.safetensors")
    assert back.tensors == len(model.state_dict())
    assert_same_tensors(torchkeep.load(tmp_path / "back.safetensors"), dict(model.state_dict()))

    torchkeep.consolidate(tmp_path / "sharded", tmp_path / "hf", max_shard_size=300)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_tensors(torchkeep.load(tmp_path / "hf"), dict(model.state_dict()))


def test_consolidate_reads_plain_dcp_folders_and_refuses_damage(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(1)
    state = dict(mlp().state_dict())
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    torchkeep.consolidate(tmp_path / "dcp", tmp_path / "out.safetensors")
    assert_same_tensors(torchkeep.load(tmp_path / "out.safetensors"), state)

    torchkeep.convert(tmp_path / "out.safetensors", tmp_path / "sharded", sharded=True)
    data = next((tmp_path / "sharded").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"distcp.*size"):
        torchkeep.consolidate(tmp_path / "sharded", tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_cli_consolidate_and_convert_sharded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchkeep.save(mlp(), tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "s"), "--sharded"]) == 0
    assert main(["consolidate", str(tmp_path / "s"), str(tmp_path / "c"), "--max-shard-size", "200"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    assert_same_tensors(torchkeep.load(tmp_path / "c"), torchkeep.load(tmp_path / "m.safetensors"))
