"""Files the scanner once called safe (exit 0) while the real loader reads something else and runs it.

Each case is a place where the scan's model of a reader differed from the reader: the opcode walk
from CPython's unpickler (a protocol-0 memo key, an over-long dotted name), the zip directory from
torch's zip reader, and the .npy check from torch.load's tar path. Each must now be dangerous
(exit 1, the global named), and the loaders must refuse what they cannot read as torch would.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.cli.main import main
from torchkeep.errors import CorruptCheckpointError


class _Refused(Exception):
    pass


def imports_of(data: bytes) -> list[tuple[str, str]]:
    """What CPython's unpickler imports first (it is refused there, so nothing runs)."""
    seen: list[tuple[str, str]] = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            seen.append((module, name))
            raise _Refused

    with pytest.raises(_Refused):
        Recorder(io.BytesIO(data)).load()
    return seen


def scan_exit(path: Path) -> int:
    return main(["scan", str(path)])


def test_a_memo_key_written_01_is_key_1_as_the_unpickler_reads_it(tmp_path: Path) -> None:
    # pickletools parses PUT "01" as True; the walk stored it under no key, so BINGET 1 ended the walk
    # ("not a pickle") before the STACK_GLOBAL of the two memoized strings: exit 0 for os.system.
    data = b"\x80\x02Vos\np01\n0Vsystem\np02\n0h\x01h\x02\x93Vid\n\x85R."
    assert imports_of(data) == [("os", "system")]
    path = tmp_path / "memo01.pkl"
    path.write_bytes(data)
    report = torchkeep.scan(path)
    assert report.exit_code == 1
    assert [str(g) for g in report.dangerous] == ["os.system"]
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"memo01\.pkl"):
        torchkeep.load(path)


def test_an_over_long_dotted_name_is_dangerous_not_the_end_of_the_pickle(tmp_path: Path) -> None:
    # Under protocol 4 a GLOBAL's name is a dotted path of any length: posixpath.os.path.os....os.system.
    name = "os.path." * 9000 + "os.system"
    data = b"\x80\x04cposixpath\n" + name.encode() + b"\nVid\n\x85R."
    assert imports_of(data) == [("posixpath", name)]
    path = tmp_path / "longname.pkl"
    path.write_bytes(data)
    report = torchkeep.scan(path)
    assert report.exit_code == 1
    assert scan_exit(path) == 1
    (dangerous,) = report.dangerous
    assert dangerous.module == "posixpath" and "not read" in dangerous.name


def _local(name: str, data: bytes) -> bytes:
    n = name.encode()
    crc = zlib.crc32(data)
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(n), 0) + n + data


def _central(name: str, data: bytes, offset: int) -> bytes:
    n = name.encode()
    crc = zlib.crc32(data)
    fields = (0x02014B50, 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(n), 0, 0, 0, 0, 0, offset)
    return struct.pack("<IHHHHHHIIIHHHHHII", *fields) + n


def two_directories(benign: list[tuple[str, bytes]], evil: list[tuple[str, bytes]]) -> bytes:
    """A zip whose end record declares the directory of ``evil`` (torch reads it there) while the directory
    right before the end record, which Python's zipfile reads, lists ``benign``."""
    body = bytearray()
    evil_offsets, benign_offsets = [], []
    for n, d in evil:
        evil_offsets.append(len(body))
        body += _local(n, d)
    for n, d in benign:
        benign_offsets.append(len(body))
        body += _local(n, d)
    declared = len(body)
    body += b"".join(_central(n, d, o) for (n, d), o in zip(evil, evil_offsets, strict=True))
    shift = len(body) - declared
    body += b"".join(_central(n, d, o - shift) for (n, d), o in zip(benign, benign_offsets, strict=True))
    size = len(body) - declared - shift
    body += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(benign), len(benign), size, declared, 0)
    return bytes(body)


def _system(command: str, protocol: int = 2) -> bytes:
    return (
        b"\x80"
        + bytes([protocol])
        + b"cposix\nsystem\nX"
        + struct.pack("<I", len(command))
        + command.encode()
        + b"\x85R."
    )


@pytest.fixture
def zip_with_two_directories(tmp_path: Path) -> tuple[Path, Path]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    with zipfile.ZipFile(good) as z:
        benign = [(i.filename, z.read(i)) for i in z.infolist()]
    marker = tmp_path / "ran-zip"
    evil = [(n, _system(f"touch {marker}") if n.endswith("data.pkl") else d) for n, d in benign]
    path = tmp_path / "two-directories.pt"
    path.write_bytes(two_directories(benign, evil))
    return path, marker


def test_a_zip_with_two_central_directories_is_scanned_as_torch_reads_it(
    zip_with_two_directories: tuple[Path, Path],
) -> None:
    path, _ = zip_with_two_directories
    with zipfile.ZipFile(path) as z:  # what Python's zipfile reads: the benign archive
        assert b"posix" not in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    report = torchkeep.scan(path)
    assert report.exit_code == 1
    assert [str(g) for g in report.dangerous] == ["posix.system"]
    assert any("torch and Python would read different members" in p.reason for p in report.problems)
    for reader in (torchkeep.load, torchkeep.load_raw):
        with pytest.raises(CorruptCheckpointError, match=r"two-directories\.pt.*different members"):
            reader(path)
    assert "scan: dangerous (posix.system" in str(torchkeep.inspect(path))  # inspect shows the scan, loads nothing


def npy_and_tar(payload: bytes) -> bytes:
    """A valid .npy (float32, shape (0,)) that is also a tar archive whose 'storages' member is ``payload``."""
    block = bytearray(b" " * 512)
    block[0:10] = b"\x93NUMPY\x01\x00" + struct.pack("<H", 512 - 10)
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (0,), }  #"  # the tar fields sit in the comment
    block[10 : 10 + len(header)] = header
    for offset, value in ((100, b"0000644 "), (108, b"0000000 "), (116, b"0000000 "), (124, b"00000000000 "),
                          (136, b"00000000000 "), (156, b"0")):  # fmt: skip
        block[offset : offset + len(value)] = value
    block[511:512] = b"\n"
    block[148:156] = b"%06o  " % sum(block)  # the checksum counts its own field as spaces: it is spaces now
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("storages")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return bytes(block) + buf.getvalue()


def test_an_npy_that_is_also_a_tar_is_scanned_as_a_tar_too(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "array.npy"
    path.write_bytes(npy_and_tar(_system("id")))
    assert np.load(path, allow_pickle=False).shape == (0,)
    with tarfile.open(path, "r:") as tar:
        assert "storages" in tar.getnames()
    report = torchkeep.scan(path)
    assert report.exit_code == 1
    assert [str(g) for g in report.dangerous] == ["posix.system"]
    assert report.files[str(path)].startswith("npy (float32, shape (0,))")


def test_torch_load_runs_what_the_scan_now_flags(zip_with_two_directories: tuple[Path, Path], tmp_path: Path) -> None:
    """The proof the cases above are real: torch.load(weights_only=False) runs both payloads."""
    zip_path, zip_marker = zip_with_two_directories
    npy_marker = tmp_path / "ran-npy"
    npy_path = tmp_path / "array.npy"
    npy_path.write_bytes(npy_and_tar(_system(f"touch {npy_marker}")))
    child = textwrap.dedent("""
        import json, sys, torch
        for path in json.loads(sys.argv[1]):
            try:
                torch.load(path, weights_only=False)
            except Exception:
                pass
    """)
    subprocess.run([sys.executable, "-c", child, json.dumps([str(zip_path), str(npy_path)])], check=True, timeout=120)
    assert zip_marker.exists() and npy_marker.exists()
    assert scan_exit(zip_path) == 1 and scan_exit(npy_path) == 1
