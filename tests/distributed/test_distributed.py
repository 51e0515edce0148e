"""Distributed checkpoints on real gloo process groups (CPU): DDP, FSDP2, resharding N->M and to one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.distributed.launch import launch
from tests.distributed.ranks import mlp

pytestmark = pytest.mark.slow


def test_ddp_resumes_bit_exactly_and_fails_together(tmp_path: Path) -> None:
    reports = launch("ddp", 2, tmp_path)
    for rank, report in enumerate(reports):
        assert report["resumed_losses_equal"] and report["resumed_params_equal"], rank
        assert report["state"] == {"epoch": 1, "seen": 7 + rank}  # shared values, and this rank's own
        assert report["counter"] == 10 + rank  # a per-rank object restored on its own rank
        assert report["files"] == ["manifest.json", "rank-00000.safetensors", "rank-00001.safetensors",
                                   "tensors.safetensors"]  # fmt: skip
        assert report["manifest"] == {"version": 3, "world_size": 2}
        # one rank's bad value fails the save on both, naming rank 1; nothing committed, nothing left over
        bad = report["bad_value"]
        if rank == 1:  # the failing rank raises its own typed error
            assert bad["type"] == "UnsupportedValueError" and "per_rank.x" in bad["message"]
        else:  # the others a DistributedError naming it and why
            assert bad["type"] == "DistributedError" and bad["ranks"] == [1]
            assert "rank(s) [1]" in bad["message"] and "per_rank.x" in bad["message"]
        assert not report["bad_exists"] and report["temporaries"] == []
        assert report["different_paths"]["type"] == "DistributedError"
        assert "different paths" in report["different_paths"]["message"]
        assert report["mismatch"]["type"] == "LoadMismatchError" and report["unchanged_after_mismatch"]
        assert report["async_restored"]

    check_raw_dcp(tmp_path / "ddp-raw-dcp", torch.optim.Adam)

    # The same checkpoint in one process (inference): the shared state, without the ranks' own values.
    model = mlp()
    state = torchkeep.load_checkpoint(tmp_path / "ddp-ckpt", model=model, rng=False)
    assert state == {"epoch": 1}
    with pytest.raises(torchkeep.DistributedError, match=r"saved by 2 rank.*loaded by 1"):
        torchkeep.load_checkpoint(tmp_path / "ddp-ckpt", model=mlp(), per_rank={"counter": object()})


def check_raw_dcp(folder: Path, optimizer_class: Any) -> None:
    """A DCP folder written by the ranks with plain dcp.save: load_raw has dcp_to_torch_save's exact
    structure (lists stay lists), and its optimizer state restores into a live optimizer in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(folder.parent / f"{folder.name}.pt"))
    reference = torch.load(folder.parent / f"{folder.name}.pt", weights_only=True)
    ours = torchkeep.load_raw(folder)

    def same_structure(a: Any, b: Any, where: str) -> None:
        assert type(a) is type(b), (where, type(a), type(b))
        if isinstance(a, dict):
            assert list(a) == list(b), where
            for key in a:
                same_structure(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                same_structure(x, y, f"{where}[{i}]")
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), where
        else:
            assert a == b, where

    same_structure(ours, reference, "")
    assert isinstance(ours["optim"]["param_groups"], list)
    assert torchkeep.inspect(folder).contents.weights_key == "model"  # type: ignore[union-attr]
    model = mlp()
    opt = optimizer_class(model.parameters(), lr=1e-2)
    torchkeep.load_checkpoint(folder, model=model, optimizer=opt, rng=False)
    params = torchkeep.load(folder.parent / f"{folder.name}-params.safetensors")
    assert all(torch.equal(params[name], p) for name, p in model.named_parameters())
    saved_state = ours["optim"]["state"]
    for name, param in model.named_parameters():
        assert torch.equal(opt.state[param]["exp_avg"], saved_state[name]["exp_avg"]), name


def test_fsdp2_resumes_bit_exactly_and_reshards_to_one_process(tmp_path: Path) -> None:
    reports = launch("fsdp", 2, tmp_path)
    for rank, report in enumerate(reports):
        assert report["resumed_losses_equal"] and report["resumed_params_equal"], rank
        assert report["seen"] == 12 + rank
        assert report["async_handle"] == "PendingSave" and report["async_latest"]
        assert report["async_changed"] and report["async_restored"]  # the snapshot, not the state after it
        assert {".metadata", "manifest.json", "rank-00000.safetensors", "rank-00001.safetensors"} <= set(
            report["files"]
        )
    ckpt = tmp_path / "fsdp-ckpt"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    listed = manifest["distributed"]["dcp"]["files"]
    assert set(listed) == {n for n in report["files"] if n.endswith(".distcp") or n == ".metadata"}

    # 2 -> 1: a plain model and optimizer; the next step on both ranks' batches matches the sharded run.
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = torchkeep.load_checkpoint(ckpt, model=model, optimizer=opt)
    assert state == {"step": 3}
    batches = [torchkeep.load(tmp_path / f"fsdp-batch-{rank}.safetensors") for rank in range(2)]
    losses = [((model(b["x"]) - b["y"]) ** 2).mean() for b in batches]
    opt.zero_grad()
    (sum(losses) / 2).backward()  # FSDP averages the ranks' gradients
    opt.step()
    reference = torchkeep.load(tmp_path / "fsdp-after1.safetensors")
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), reference[name], rtol=1e-5, atol=1e-6)

    check_raw_dcp(tmp_path / "fsdp-raw-dcp", torch.optim.AdamW)

    # Weights alone, consolidated in one process by torchkeep's own DCP reader.
    weights = torchkeep.load(ckpt)
    fresh = mlp()
    torchkeep.load_checkpoint(ckpt, model=fresh, rng=False)
    assert set(weights) == set(fresh.state_dict())
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(weights[name], tensor), name

    # A damaged shard file is found before anything is loaded.
    shard = ckpt / "__1_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"__1_0\.distcp.*checksum"):
        torchkeep.load_checkpoint(ckpt, model=fresh, rng=False)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_reshard_four_ranks_to_two(tmp_path: Path) -> None:
    torch.manual_seed(7)
    torchkeep.save(mlp(), tmp_path / "weights.safetensors")
    torchkeep.convert(tmp_path / "weights.safetensors", tmp_path / "from-weights", sharded=True)
    launch("fsdp_save4", 4, tmp_path)
    reports = launch("fsdp_load2", 2, tmp_path)
    for report in reports:
        assert report["params_equal"] and report["exp_avg_equal"] and report["from_weights_equal"]
        assert report["state_keys"] == ["step"]  # the ranks' own values stay with the 4 ranks that saved them
        missing = report["missing_shard"]
        assert missing["type"] in ("CorruptCheckpointError", "DistributedError"), missing
        assert "__3_0.distcp" in missing["message"] and "missing" in missing["message"]
        assert report["unchanged_after_missing"]
        refused = report["per_rank_refused"]
        assert refused["type"] == "DistributedError" and "saved by 4 rank(s), loaded by 2" in refused["message"]
    # RNG re-derived: deterministic, and different on each rank
    assert reports[0]["draw"] != reports[1]["draw"]
    again = launch("fsdp_load2", 2, tmp_path)
    assert [r["draw"] for r in again] == [r["draw"] for r in reports]


def test_single_process_checkpoints_refuse_per_rank(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_rank= is for saves from several ranks"):
        torchkeep.save_checkpoint(tmp_path / "c", model=nn.Linear(2, 2), per_rank={"n": 1})
    torchkeep.save_checkpoint(tmp_path / "c", model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="saved by one process"):
        torchkeep.load_checkpoint(tmp_path / "c", model=nn.Linear(2, 2), per_rank={"n": 1})


def test_a_rank_killed_mid_save_leaves_the_previous_step_on_every_rank(tmp_path: Path) -> None:
    killed = launch("manager_kill", 2, tmp_path, expect_killed=(1,))[0]
    assert killed["third"]["type"] == "DistributedError"  # the surviving rank is told, not left hanging
    assert killed["latest"] == "step-00000002"
    assert killed["steps"] == ["step-00000001", "step-00000002"]  # step 3 never became visible
    assert killed["temporaries"] == []

    reports = launch("manager_resume", 2, tmp_path)
    for rank, report in enumerate(reports):
        saved_draw = json.loads((tmp_path / f"draw-after-step2-{rank}.json").read_text())
        assert report["draw"] == saved_draw  # this rank's own generator, exactly as it was at step 2
        assert report["step"] == 2 and report["seen"] == 20 + rank and report["params_equal"]
        assert report["saved"] == {"step": 3, "latest": True}
        assert report["steps"] == ["step-00000002", "step-00000003"]  # keep_last=2 retired step 1, rank files too
        assert report["latest"] == "step-00000003"
        # incremental across ranks: one object while steps 1-2 share it, the old one collected after step 3
        assert report["incremental"] == {"objects": [1, 1], "changed": True, "restored": True}
    assert reports[0]["draw"] != reports[1]["draw"]


def test_fsdp2_checkpoints_on_s3(tmp_path: Path, s3: dict[str, Any]) -> None:
    reports = launch("s3_fsdp", 2, tmp_path, env={"TORCHKEEP_TEST_S3": json.dumps(s3)})
    for rank, report in enumerate(reports):
        assert report["resumed"] and report["seen"] == rank
    first, second = reports[0]["first"], reports[0]["second"]
    assert "manifest.json" in first and "manifest.json" in second
    assert sum(n.startswith("rank-") for n in first) == 2 and any(n.startswith("dcp-") for n in first)
    assert not (set(first) - {"manifest.json"}) & set(second)  # the first save's objects are all gone
    assert len(first) == len(second)

    # one process, no group: the sharded state loads into a plain model (2 -> 1), read from S3
    model = mlp()
    torchkeep.load_checkpoint("s3://torchkeep-bucket/dist/ckpt", model=model, rng=False, storage_options=s3)
    # and whole, without a model: reassembled from the shards by DCP's reader, every object verified first
    weights = torchkeep.load("s3://torchkeep-bucket/dist/ckpt", storage_options=s3)
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    torchkeep.consolidate("s3://torchkeep-bucket/dist/ckpt", tmp_path / "from-s3.safetensors", storage_options=s3)
    assert all(torch.equal(weights[k], v) for k, v in torchkeep.load(tmp_path / "from-s3.safetensors").items())


def test_a_manager_shared_by_two_ranks_on_s3(tmp_path: Path, s3: dict[str, Any]) -> None:
    reports = launch("s3_manager", 2, tmp_path, env={"TORCHKEEP_TEST_S3": json.dumps(s3)})
    for rank, report in enumerate(reports):
        assert report["latest"] and report["steps"] == [2, 3]  # keep_last=2 retired step 1 (every rank's objects)
        assert report["state"] == {"seen": 30 + rank, "step": 3}
        assert report["restored"] and report["draw_again"]  # bit-exact, each rank's own generator
        assert report["async_info"] == {"step": 4, "handle": "PendingSave"}
        assert report["async_restored"] and report["async_steps"] == [3, 4]
    from torchkeep.storage.remote import RemoteStorage

    names = RemoteStorage("s3://torchkeep-bucket/dist/run", s3).list()
    assert not any(n.startswith("step-00000001/") for n in names)
    assert ".torchkeep.lock" not in names and "latest" in names
