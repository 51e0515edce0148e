"""consolidate and convert --sharded, in one process without a process group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from tests.checkpoint.test_hostile_manifests import rewrite_manifest
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


def test_sharded_checkpoint_saved_without_a_layout_still_loads_whole(tmp_path: Path) -> None:
    """Version-3 checkpoints saved before the manifest recorded the DCP layout: read by the static reader."""
    model = mlp()
    torchkeep.save(model, tmp_path / "m.safetensors")
    torchkeep.convert(tmp_path / "m.safetensors", tmp_path / "s", sharded=True)
    rewrite_manifest(tmp_path / "s", lambda body: body["distributed"]["dcp"].pop("layout"))
    assert_same_tensors(torchkeep.load(tmp_path / "s"), dict(model.state_dict()))
    torchkeep.consolidate(tmp_path / "s", tmp_path / "whole.safetensors")
    assert_same_tensors(torchkeep.load(tmp_path / "whole.safetensors"), dict(model.state_dict()))


def test_cli_consolidate_and_convert_sharded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchkeep.save(mlp(), tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "s"), "--sharded"]) == 0
    assert main(["consolidate", str(tmp_path / "s"), str(tmp_path / "c"), "--max-shard-size", "200"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()
    assert_same_tensors(torchkeep.load(tmp_path / "c"), torchkeep.load(tmp_path / "m.safetensors"))


def _first_chunk(body: dict[str, Any]) -> list[Any]:
    layout = body["distributed"]["dcp"]["layout"]
    return layout[sorted(layout)[0]]["chunks"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda body: _first_chunk(body).__setitem__(4, 10**12), "does not fit"),  # bytes past the file's end
        (lambda body: _first_chunk(body).__setitem__(2, "../x.distcp"), "does not fit"),  # out of the folder
        (lambda body: _first_chunk(body).__setitem__(1, [1, 1]), "tile"),  # a chunk smaller than its tensor
        (lambda body: _first_chunk(body).__setitem__(0, [0, -1]), "non-negative"),
        (lambda body: next(iter(body["distributed"]["dcp"]["layout"].values())).update(dtype="F99"), "F99"),
        (lambda body: body["distributed"].update(ranks=[]), "not one entry for each"),
        (lambda body: body["distributed"]["dcp"].update(files={}), "lists no files"),
    ],
)
def test_hostile_distributed_manifests_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    """A re-signed manifest that lies about the sharded layout: a typed error, the model untouched."""
    torchkeep.save(mlp(), tmp_path / "m.safetensors")
    torchkeep.convert(tmp_path / "m.safetensors", tmp_path / "s", sharded=True)
    rewrite_manifest(tmp_path / "s", change)
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(torchkeep.CorruptCheckpointError, match=message):
        torchkeep.load_checkpoint(tmp_path / "s", model=model, rng=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_verify_and_inspect_check_every_file_of_a_sharded_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torchkeep.save(mlp(), tmp_path / "m.safetensors")
    torchkeep.convert(tmp_path / "m.safetensors", tmp_path / "s", sharded=True)
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "saved by 1 rank(s): 6 sharded tensors" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "s")]) == 0
    assert "and 4 rank and DCP files" in capsys.readouterr().out  # the rank file, .metadata, 2 data files (2 threads)
    data = next((tmp_path / "s").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    assert main(["verify", str(tmp_path / "s")]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
