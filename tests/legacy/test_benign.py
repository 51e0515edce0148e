"""Benign files users already have load with the exact tensors, without running code."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch as st
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state
from tests.conftest import assert_same_tensors


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def trained() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_the_seeds_dict_checkpoint(tmp_path: Path, legacy: bool) -> None:
    model, opt = trained()
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
         "loss": torch.tensor(0.25), "accuracy": 0.9, "config": {"lr": 0.005, "layers": (4, 8, 3)}},
        path, _use_new_zipfile_serialization=not legacy,
    )  # fmt: skip
    assert_same_tensors(model.state_dict(), torchkeep.load(path))
    fresh, fresh_opt = Net(), torch.optim.Adam(Net().parameters())
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.005)
    with pytest.warns(torchkeep.TorchkeepWarning, match="no random generator state"):  # a resume from it
        state = torchkeep.load_checkpoint(path, model=fresh, optimizer=fresh_opt)
    assert state["epoch"] == 5 and state["accuracy"] == 0.9 and torch.equal(state["loss"], torch.tensor(0.25))
    assert state["config"] == {"lr": 0.005, "layers": (4, 8, 3)}
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(opt.state_dict(), fresh_opt.state_dict())
    raw = torchkeep.load_raw(path)
    assert set(raw) == {"epoch", "model_state_dict", "optimizer_state_dict", "loss", "accuracy", "config"}


def test_dataparallel_state_dict_file_loads_into_a_bare_model(tmp_path: Path) -> None:
    model, _ = trained()
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "dp.pth")
    fresh = Net()
    assert torchkeep.load_into(fresh, tmp_path / "dp.pth").ok
    assert_same_tensors(model.state_dict(), fresh.state_dict())


def test_hugging_face_bin_and_safetensors_of_the_same_weights(tmp_path: Path) -> None:
    model, _ = trained()
    state = model.state_dict()
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "st").mkdir()
    st.save_file(dict(state), tmp_path / "st" / "model.safetensors")
    assert_same_tensors(torchkeep.load(tmp_path / "bin"), torchkeep.load(tmp_path / "st"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(dict(state), torchkeep.load(sharded))


def test_many_kinds_of_tensors_and_values(tmp_path: Path) -> None:
    emb = torch.randn(5, 3)
    state = {
        "half": torch.randn(3).half(), "bf16": torch.randn(3).bfloat16(), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "f8": torch.randn(4).to(torch.float8_e4m3fn), "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5),
        "strided": torch.arange(12.0).reshape(3, 4).t(), "embed": emb, "head": emb,
        "sparse_coo": torch.randn(3, 3).to_sparse(),
        "size": torch.Size([2, 3]), "array": np.arange(4, dtype=np.int16), "ns": argparse.Namespace(lr=0.1),
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state["sparse_csr"] = torch.randn(3, 3).to_sparse_csr()
    for protocol in (2, 4):
        path = tmp_path / f"mixed{protocol}.pt"
        torch.save(state, path, pickle_protocol=protocol)
        raw = torchkeep.load_raw(path)
        for key in ("half", "bf16", "i8", "f8", "empty", "scalar", "strided", "embed"):
            assert_same_tensors({key: state[key]}, {key: raw[key]})
        assert raw["head"].data_ptr() == raw["embed"].data_ptr()  # tied, as saved
        assert torch.equal(raw["sparse_coo"].to_dense(), state["sparse_coo"].to_dense())
        assert torch.equal(raw["sparse_csr"].to_dense(), state["sparse_csr"].to_dense())
        assert raw["size"] == torch.Size([2, 3]) and isinstance(raw["size"], torch.Size)
        assert raw["array"].dtype == np.int16 and raw["array"].tolist() == [0, 1, 2, 3]
        assert raw["ns"] == {"lr": 0.1}


def test_dynamically_quantized_linear_state(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
        state = model.state_dict()
        torch.save(state, tmp_path / "q.pt")
        raw = torchkeep.load_raw(tmp_path / "q.pt")
    packed = [k for k in state if k.endswith("_packed_params")]
    assert packed and set(raw) == set(state)
    weight, bias = raw[packed[0]][0], raw[packed[0]][1]
    assert weight.is_quantized and torch.equal(weight.int_repr(), state[packed[0]][0].int_repr())
    assert torch.equal(bias, state[packed[0]][1])


@pytest.mark.parametrize("width", [4, 256])  # 256: storages past inspect's read limit
def test_inspect_lists_a_quantized_state_dict_as_load_gives_it(tmp_path: Path, width: int) -> None:
    """inspect showed only the scales of a quantized state dict (4 of 12 tensors), and past a few bytes
    of weights called the file a malformed pickle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)), {nn.Linear}, dtype=torch.qint8
        )
        torch.save(model.state_dict(), tmp_path / "q.pth")
    loaded = torchkeep.load(tmp_path / "q.pth")
    info = torchkeep.inspect(tmp_path / "q.pth")
    assert [(t.name, t.shape) for t in info.tensors] == [(k, tuple(v.shape)) for k, v in loaded.items()]
    assert info.contents is not None and info.contents.parts[0].detail["tensors"] == len(loaded)
    assert info.scan is not None and info.scan["exit_code"] == 0


def test_numpy_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", weight=np.ones((2, 3), dtype=np.float32), bias=np.zeros(3))
    loaded = torchkeep.load(tmp_path / "w.npz")
    assert loaded["weight"].dtype == torch.float32 and torch.equal(loaded["weight"], torch.ones(2, 3))


def test_whole_pickled_model_needs_trusted(tmp_path: Path) -> None:
    model, _ = trained()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(torchkeep.UnsafeCheckpointError) as info:
        torchkeep.load(tmp_path / "whole.pt")
    assert any("Linear" in g for g in info.value.globals)
    assert torchkeep.scan(tmp_path / "whole.pt").verdict == "suspicious"
    with pytest.warns(torchkeep.TorchkeepWarning, match="trusted=True"):
        loaded = torchkeep.load(tmp_path / "whole.pt", trusted=True)
    assert_same_tensors(model.state_dict(), loaded)
    # inspect shows what the scan found and how to proceed, with the scan's exit code; nothing is unpickled
    from torchkeep.cli.main import main

    info = torchkeep.inspect(tmp_path / "whole.pt")
    assert info.tensors == [] and info.scan is not None and info.scan["exit_code"] == 2
    assert any("Linear" in note and "convert --trusted" in note for note in info.notes)
    assert main(["inspect", str(tmp_path / "whole.pt")]) == 2


def test_damaged_torch_files(tmp_path: Path) -> None:
    model, _ = trained()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 60)):
        path.write_bytes(data[:cut])
        with pytest.raises((torchkeep.CorruptCheckpointError, torchkeep.CheckpointNotFoundError)):
            torchkeep.load(path)
    for i in range(0, len(data), max(1, len(data) // 120)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            loaded = torchkeep.load(path)
        except torchkeep.TorchkeepError:
            continue
        assert_same_tensors(model.state_dict(), loaded)  # a flip zip ignores (e.g. a name field) is harmless
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 60)):
        legacy.write_bytes(data[:cut])
        with pytest.raises(torchkeep.TorchkeepError):
            torchkeep.load(legacy)


def test_load_checkpoint_accepts_weights_only_sources(tmp_path: Path) -> None:
    model, _ = trained()
    st.save_file(dict(model.state_dict()), tmp_path / "w.safetensors")
    (tmp_path / "hf").mkdir()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    for source in (tmp_path / "w.safetensors", tmp_path / "hf"):
        fresh = Net()
        assert torchkeep.load_checkpoint(source, model=fresh) == {}
        assert_same_tensors(model.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("protocol", [2, 4])
def test_paths_in_a_checkpoint_are_plain_values(tmp_path: Path, protocol: int) -> None:
    """``args.data_dir`` saved as a ``pathlib.Path`` is a name, not code: scanned safe, read back as a path."""
    import pathlib
    import pickle
    import subprocess
    import sys

    model = nn.Linear(2, 2)
    state = {
        "model_state_dict": model.state_dict(),
        "data_dir": pathlib.Path("/data/cifar"),
        "windows": pathlib.PureWindowsPath("C:/runs/a"),
        "relative": pathlib.PurePosixPath("runs", "b"),
    }
    torch.save(state, tmp_path / "ck.pth", pickle_protocol=protocol)
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep", "scan", str(tmp_path / "ck.pth")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    restored = nn.Linear(2, 2)
    rest = torchkeep.load_checkpoint(tmp_path / "ck.pth", model=restored)
    assert rest["data_dir"] == pathlib.Path("/data/cifar") and type(rest["data_dir"]) is type(pathlib.Path())
    assert rest["windows"] == pathlib.PureWindowsPath("C:/runs/a")
    assert rest["relative"] == pathlib.PurePosixPath("runs/b")
    assert_same_tensors(restored.state_dict(), model.state_dict())
    # Python 3.13 names the classes in pathlib._local: the same paths.
    for module in (b"pathlib", b"pathlib._local"):
        named = b"\x80\x02c" + module + b"\nPosixPath\nX\x04\x00\x00\x00/a/bX\x01\x00\x00\x00c\x86R."
        (tmp_path / "p.pkl").write_bytes(named)
        assert torchkeep.load_raw(tmp_path / "p.pkl") == pathlib.Path("/a/b/c")
        assert torchkeep.scan(tmp_path / "p.pkl").exit_code == 0
    # A method reached through the class stays what it is: code.
    hostile = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x07pathlib\x94\x8c\x0fPath.write_text\x94\x93\x94."
    (tmp_path / "hostile.pkl").write_bytes(hostile)
    with pytest.raises(torchkeep.UnsafeCheckpointError, match="write_text"):
        torchkeep.load(tmp_path / "hostile.pkl")
    assert pickle.loads(hostile) is pathlib.Path.write_text  # what a real unpickler would hand out


def test_key_picks_the_weights_in_load_into_and_convert(tmp_path: Path) -> None:
    """A checkpoint with trained and EMA weights: key= picks the EMA set on every path that reads weights."""
    from torchkeep.cli.main import main

    trained, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save({"state_dict": trained.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 5}, tmp_path / "c.pth")
    model = nn.Linear(3, 2)
    report = torchkeep.load_into(model, tmp_path / "c.pth", key="state_dict_ema")
    assert report.ok
    assert_same_tensors(model.state_dict(), ema.state_dict())
    torchkeep.convert(tmp_path / "c.pth", tmp_path / "ema.safetensors", key="state_dict_ema")
    assert_same_tensors(torchkeep.load(tmp_path / "ema.safetensors"), ema.state_dict())
    assert main(["convert", str(tmp_path / "c.pth"), str(tmp_path / "ema-dir"), "--key", "state_dict_ema"]) == 0
    assert_same_tensors(torchkeep.load(tmp_path / "ema-dir"), ema.state_dict())
    with pytest.raises(torchkeep.CorruptCheckpointError, match="no weights at key='nope'"):
        torchkeep.load_into(model, tmp_path / "c.pth", key="nope")
