"""inspect and verify on every kind of file load reads, through the CLI (exit codes, --json) and the API."""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.legacy.test_lightning import fit_lightning
from torchkeep.cli.main import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _inspect_json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    code, out = _run(capsys, "inspect", str(path), "--json")
    assert code == 0, out
    return json.loads(out)


def _roles(doc: dict[str, Any]) -> dict[str, str]:
    return {part["key"]: part["role"] for part in doc["contents"]["parts"]}


def _tutorial_state() -> tuple[dict[str, Any], nn.Module]:
    """The seeds' checkpoint idiom: epoch, model and optimizer state dicts, a scheduler, the loss tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    sched.step()
    state = {
        "epoch": 7,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(),
        "loss": loss.detach(),
        "rng_state": torch.get_rng_state(),
        "best_acc": 0.875,
    }
    return state, model


@pytest.mark.parametrize("legacy", [False, True])
def test_tutorial_checkpoint_is_described_part_by_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], legacy: bool
) -> None:
    state, model = _tutorial_state()
    path = tmp_path / "checkpoint.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)

    doc = _inspect_json(capsys, path)
    assert ("legacy" in doc["format"]) == legacy and "torch.save" in doc["format"]
    assert doc["scan"]["status"] == "safe" and doc["scan"]["exit_code"] == 0
    assert doc["contents"]["layout"] == "training checkpoint"
    assert doc["contents"]["weights_key"] == "model_state_dict"
    assert _roles(doc) == {
        "epoch": "value",
        "model_state_dict": "weights",
        "optimizer_state_dict": "optimizer",
        "scheduler_state_dict": "scheduler",
        "loss": "value",
        "rng_state": "rng",
        "best_acc": "value",
    }
    parts = {p["key"]: p for p in doc["contents"]["parts"]}
    assert parts["loss"]["summary"] == str(float(state["loss"]))  # a small tensor is read
    (group,) = parts["optimizer_state_dict"]["detail"]["param_groups"]
    assert group["params"] == 4 and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert group["lr"] == pytest.approx(0.05)
    assert parts["optimizer_state_dict"]["detail"]["slots"] == {"momentum_buffer": 4}
    assert parts["scheduler_state_dict"]["detail"]["last_epoch"] == 1
    expected = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert {t["name"]: (t["shape"], t["dtype"]) for t in doc["tensors"]} == expected
    assert doc["total_params"] == sum(p.numel() for p in model.parameters())

    code, text = _run(capsys, "inspect", str(path))
    assert code == 0
    assert "holds: training checkpoint, model weights under 'model_state_dict'" in text
    assert "param group: 4 params; lr=0.05, momentum=0.9" in text
    assert "epoch [value]: 7" in text and "scan: safe" in text

    code, text = _run(capsys, "verify", str(path))
    assert code == 0 and "readable" in text


def test_inspect_reads_no_tensor_data_and_verify_reads_it_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged weight storage (its zip CRC fails) does not disturb inspect, which never reads it; verify fails."""
    path = tmp_path / "big.pt"
    torch.save({"weight": torch.randn(256, 256), "step": torch.tensor(3)}, path)
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    raw[info.header_offset + 30 + name_len + extra_len + 1000] ^= 0xFF
    path.write_bytes(bytes(raw))

    info_api = torchkeep.inspect(path)
    assert [(t.name, t.shape) for t in info_api.tensors] == [("weight", (256, 256)), ("step", ())]
    with pytest.raises(torchkeep.CorruptCheckpointError, match="CRC"):
        torchkeep.verify(path)
    assert main(["verify", str(path)]) == 1
    assert "CRC" in capsys.readouterr().err


def test_lightning_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, path, _ = fit_lightning(tmp_path)
    doc = _inspect_json(capsys, path)
    assert doc["contents"]["layout"] == "Lightning checkpoint" and doc["contents"]["weights_key"] == "state_dict"
    roles = _roles(doc)
    assert roles["state_dict"] == "weights" and roles["optimizer_states"] == "optimizer"
    assert roles["lr_schedulers"] == "scheduler" and roles["epoch"] == "value" and roles["global_step"] == "value"
    parts = {p["key"]: p for p in doc["contents"]["parts"]}
    (group,) = parts["optimizer_states"]["detail"]["param_groups"]
    assert group["params"] == 4 and group["lr"] == pytest.approx(0.005)  # StepLR halved 0.01 after the epoch
    assert {t["name"] for t in doc["tensors"]} == set(model.state_dict())
    assert doc["scan"]["status"] == "safe"
    assert main(["verify", str(path)]) == 0


def test_pytorch_model_bin_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    state = model.state_dict()
    shards = {
        "pytorch_model-00001-of-00002.bin": ["0.weight", "0.bias"],
        "pytorch_model-00002-of-00002.bin": ["1.weight", "1.bias"],
    }
    for name, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    doc = _inspect_json(capsys, tmp_path)
    assert "2 shards" in doc["format"] and doc["contents"]["layout"] == "state dict"
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {k: list(v.shape) for k, v in state.items()}
    assert torchkeep.verify(tmp_path) is None
    assert main(["verify", str(tmp_path)]) == 0


def test_dcp_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed.checkpoint as dcp

    state, model = _tutorial_state()
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(
            {"model": state["model_state_dict"], "optim": state["optimizer_state_dict"]}, checkpoint_id=str(tmp_path)
        )
    doc = _inspect_json(capsys, tmp_path)
    assert doc["format"] == "torch.distributed.checkpoint (DCP) folder"
    assert _roles(doc) == {"model": "weights", "optim": "optimizer"} and doc["contents"]["weights_key"] == "model"
    assert {t["name"] for t in doc["tensors"]} == set(model.state_dict())
    assert doc["scan"]["status"] == "safe"
    assert torchkeep.verify(tmp_path) is None
    data = next(tmp_path.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-16])
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.verify(tmp_path)


def test_numpy_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "w.npz", conv=np.zeros((3, 2, 5), dtype=np.float16), bias=np.arange(4, dtype=np.int64))
    doc = _inspect_json(capsys, tmp_path / "w.npz")
    assert doc["format"] == "NumPy .npz archive" and "scan" not in doc
    assert {t["name"]: (t["shape"], t["dtype"]) for t in doc["tensors"]} == {
        "conv": ([3, 2, 5], "float16"),
        "bias": ([4], "int64"),
    }
    np.save(tmp_path / "a.npy", np.ones((2, 3), dtype=np.float32))
    doc = _inspect_json(capsys, tmp_path / "a.npy")
    assert doc["contents"]["layout"] == "object" and doc["contents"]["parts"][0]["summary"] == "tensor float32[2, 3]"
    assert main(["verify", str(tmp_path / "w.npz")]) == 0


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_dangerous_pickle_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(pickle.dumps({"weights": torch.zeros(2), "x": _Payload(marker)}, protocol=2))
    code, text = _run(capsys, "inspect", str(path))
    assert code == 1 and "scan: dangerous" in text
    assert "os.system" in text or "posix.system" in text
    doc = json.loads(_run(capsys, "inspect", str(path), "--json")[1])
    assert doc["scan"]["status"] == "dangerous" and doc["tensors"] == [] and "contents" not in doc
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.verify(path)
    assert not marker.exists()


def test_ls_of_a_folder_that_is_not_a_run_says_what_each_entry_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch.distributed.checkpoint as dcp

    state, model = _tutorial_state()
    torch.save(state, tmp_path / "checkpoint.pth")
    torchkeep.save(model, tmp_path / "model.safetensors")
    torchkeep.save_checkpoint(tmp_path / "ours", model=model, epoch=1)
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": dict(model.state_dict())}, checkpoint_id=str(tmp_path / "dcp"))
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "ran"), protocol=2))

    assert main(["ls", str(tmp_path), "--json"]) == 0
    what = {e["name"]: e["what"] for e in json.loads(capsys.readouterr().out)["files"]}
    assert what["checkpoint.pth"] == "torch.save zip archive; training checkpoint"
    assert what["model.safetensors"].startswith("torchkeep safetensors")
    assert what["ours/"] == "torchkeep checkpoint"
    assert what["arrays.npz"] == "NumPy .npz archive; state dict"
    assert what["dcp/"] == "torch.distributed.checkpoint (DCP) folder; training checkpoint"
    assert what["notes.txt"].startswith("not readable as weights or a checkpoint")
    assert "scan: dangerous" in what["evil.pkl"]
    assert not (tmp_path / "ran").exists()
    assert main(["ls", str(tmp_path)]) == 0
    assert "torch.save zip archive; training checkpoint" in capsys.readouterr().out


def test_review_findings_stay_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed.checkpoint as dcp

    model = nn.Linear(3, 2)
    # a bare state dict: its tensors restore the model and are not returned again as values
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    assert torchkeep.load_checkpoint(tmp_path / "sd.pt", model=nn.Linear(3, 2)) == {}
    # a pytorch_model.bin folder whose index names a tensor no shard holds: verify fails as load does
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model-1.bin")
    index = {"metadata": {}, "weight_map": {"weight": "pytorch_model-1.bin", "bias": "pytorch_model-1.bin",
                                            "ghost": "pytorch_model-1.bin"}}  # fmt: skip
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(folder)
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.verify(folder)
    # the scan covers the files read, not the rest of the tree; through the index too
    (folder / "extra").mkdir()
    (folder / "extra" / "evil.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "ran"), protocol=2))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": {
        "weight": "pytorch_model-1.bin", "bias": "pytorch_model-1.bin"}}))  # fmt: skip
    for where in (folder, folder / "pytorch_model.bin.index.json"):
        scanned = torchkeep.inspect(where).scan
        assert scanned is not None and scanned["status"] == "safe" and scanned["summary"].startswith("1 pickle")
    # a damaged .npy is a typed error, and ls lists it among the rest
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "good.npy", np.ones(3))
    (tmp_path / "npy" / "bad.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 'garbage")
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.inspect(tmp_path / "npy" / "bad.npy")
    assert main(["ls", str(tmp_path / "npy"), "--json"]) == 0
    listed = {e["name"]: e["what"] for e in json.loads(capsys.readouterr().out)["files"]}
    assert listed["bad.npy"].startswith("not readable") and listed["good.npy"] == "NumPy .npy; object"
    # a DCP folder's saved values are read by inspect (DCP stores them as small torch.save blobs)
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": dict(model.state_dict()), "step": 5}, checkpoint_id=str(tmp_path / "dcp"))
    parts = {p.key: p for p in torchkeep.inspect(tmp_path / "dcp").contents.parts}  # type: ignore[union-attr]
    assert parts["step"].role == "value" and parts["step"].summary == "5"
    assert not (tmp_path / "ran").exists()
