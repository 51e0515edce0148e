"""What `torchkeep ls` / `inspect` / `verify` read: each file's format detected once, and the pickle scan reads a
stored zip member only where it looks (not the whole storage of every tensor, three times over)."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep.cli.main import main
from torchkeep.format.pickle.scan import scan
from torchkeep.weights import legacy

PROC_IO = Path("/proc/self/io")


def _bytes_read() -> int:
    """Bytes this process has read so far (Linux), all files together."""
    line = next(line for line in PROC_IO.read_text().splitlines() if line.startswith("rchar:"))
    return int(line.split()[1])


needs_proc_io = pytest.mark.skipif(not PROC_IO.is_file(), reason="counts bytes read through /proc/self/io (Linux)")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """One file of each format inspect reads by structure, and a safetensors file; 4 MiB tensors in the zips."""
    root = tmp_path / "files"
    root.mkdir()
    for i in range(3):
        torch.save({"w": torch.randn(1024, 1024), "b": torch.randn(1024)}, root / f"zip{i}.pt")
    torch.save({"w": torch.randn(64, 64)}, root / "legacy.pt", _use_new_zipfile_serialization=False)
    np.savez(root / "arrays.npz", w=np.ones((8, 8), np.float32))
    np.save(root / "array.npy", np.ones(4, np.float32))
    torchkeep.save({"w": torch.randn(8, 8)}, root / "model.safetensors")
    return root


@pytest.fixture
def detections(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many times each file's format is detected."""
    calls: Counter[str] = Counter()
    original = legacy.detect_kind

    def counting(path: str) -> legacy.Kind:
        calls[Path(path).name] += 1
        return original(path)

    monkeypatch.setattr(legacy, "detect_kind", counting)
    return calls


def test_ls_of_a_folder_detects_each_file_once(
    folder: Path, detections: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ls", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "torch.save zip archive" in out and "NumPy .npz archive" in out and "NumPy .npy" in out
    assert dict(detections) == {p.name: 1 for p in folder.iterdir()}


@pytest.mark.parametrize("name", ["zip0.pt", "legacy.pt", "arrays.npz", "array.npy", "model.safetensors"])
def test_inspect_and_verify_detect_a_file_once(folder: Path, detections: Counter[str], name: str) -> None:
    torchkeep.inspect(folder / name)
    assert detections == {name: 1}
    detections.clear()
    torchkeep.verify(folder / name)
    assert detections == {name: 1}


@needs_proc_io
def test_ls_reads_a_small_part_of_the_weights_it_describes(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["ls", str(folder)])  # imports and first-call setup are not what is measured
    capsys.readouterr()
    before = _bytes_read()
    assert main(["ls", str(folder)]) == 0
    read = _bytes_read() - before
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert read < on_disk / 10, (read, on_disk)  # was 3x the zips' size: every storage read three times
    assert capsys.readouterr().out.count("state dict") == 5


@needs_proc_io
def test_scan_still_finds_a_zip_at_the_end_of_a_large_stored_member(tmp_path: Path) -> None:
    """The member is read in place, at its end: what the scan finds there is unchanged, the middle unread."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("evil.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
    path = tmp_path / "hidden.pt"
    torch.save({"w": torch.zeros(4)}, path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data/9", bytes(8 << 20) + inner.getvalue())  # 8 MiB of padding, then a zip
    scan(path)
    before = _bytes_read()
    report = scan(path)
    assert _bytes_read() - before < path.stat().st_size / 10
    assert report.exit_code == 1 and report.dangerous and str(report.dangerous[0]) == "os.system"
    assert "zip (after a prefix)" in report.files[f"{path}:archive/data/9"]
