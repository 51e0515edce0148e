from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.cli.main import main


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    torchkeep.save(
        {"enc.layer.weight": torch.randn(4, 3), "enc.layer.bias": torch.randn(4), "head.weight": torch.randn(2, 4)},
        path,
        metadata={"epoch": "7"},
    )
    return path


def test_inspect_table(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "enc.layer.weight" in out and "float32" in out and "[4, 3]" in out
    assert "total: 3 tensors, 24 elements" in out
    assert "enc 16" in out and "head 8" in out and "epoch: 7" in out


def test_inspect_json(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_params"] == 24 and doc["total_bytes"] == 96
    assert doc["metadata"] == {"epoch": "7"} and doc["checksummed"] is True
    assert {t["name"]: t["shape"] for t in doc["tensors"]}["head.weight"] == [2, 4]
    assert doc["params_by_prefix"] == {"enc": 16, "head": 8}


def test_inspect_tree(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(weights), "--tree"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "(all) 24"
    assert "  enc  16" in lines and "    layer  16" in lines


def test_verify_ok_and_damaged(weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(weights)]) == 0
    assert "3 tensors verified" in capsys.readouterr().out
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    assert main(["verify", str(weights)]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "checksum mismatch" in err


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_demo_trains_saves_and_reloads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "predictions identical to the trained model: True" in out
    assert "mismatched  fc.2.weight" in out
    assert "child killed with SIGKILL (exit -9)" in out
    assert "loss sequence identical: True; parameters bit-identical: True" in out
    assert "fresh process: rebuilt IrisNet eval, predictions identical: True" in out
    assert (tmp_path / "demo" / "iris.safetensors").exists()
    assert "iris.onnx" in out and "iris.pt2" in out and out.count("batch 5: ok (max abs error") == 2
    assert "fresh process: reloaded Int8Tensor weights, predictions identical: True" in out
    assert (tmp_path / "demo" / "iris.onnx.io.json").is_file() and (tmp_path / "demo" / "iris-int8").is_dir()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    with torchkeep.CheckpointManager(tmp_path / "run", keep_last=3) as mgr:
        for step, acc in [(100, 0.5), (200, 0.75), (300, 0.6)]:
            mgr.save(step, metrics={"val_acc": acc}, model=torch.nn.Linear(2, 2), epoch=step // 100)
    return tmp_path / "run"


def test_ls_lists_steps_with_marks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(run_dir), "--monitor", "val_acc", "--mode", "max"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "time", "size", "metrics"]
    assert [line.split()[0] for line in lines[1:]] == ["100", "200", "300"]
    assert lines[2].endswith("best") and "val_acc=0.75" in lines[2]
    assert lines[3].endswith("latest")


def test_verify_and_inspect_a_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = run_dir / "step-00000200"
    assert main(["verify", str(ckpt)]) == 0
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "OK, checkpoint" in out and "model.weight" in out and "epoch=2" in out
    assert main(["inspect", str(ckpt), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["info"]["step"] == 200 and doc["objects"] == ["model", "rng"]
    tensors = ckpt / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    assert main(["verify", str(ckpt)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """``torchkeep ls DIR | head -1``: the reader goes away; the command stops quietly (141, as SIGPIPE)."""
    import subprocess
    import sys

    for i in range(2000):  # enough lines to fill the pipe's buffer
        (tmp_path / f"file-{i:05d}.txt").write_text("x")
    done = subprocess.run(
        f"{sys.executable} -m torchkeep ls {tmp_path} | head -1; echo status=${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "status=141", done.stdout[-500:] + done.stderr
    assert done.stderr == ""


def test_dot_is_a_path_like_any_other(
    weights: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(weights.parent)
    assert main(["inspect", "."]) == 0  # it said "PosixPath('.') has an empty name"
    assert "head.weight" in capsys.readouterr().out
    assert main(["verify", "."]) == 0


def test_ls_of_an_empty_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{tmp_path}: empty (no files, no checkpoints)\n"
