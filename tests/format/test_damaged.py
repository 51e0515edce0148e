"""Hostile and damaged files: always a typed error, quickly, with bounded memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError


def good_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(6, 5), "a.bias": torch.randn(5), "n": torch.tensor(3), "h": torch.randn(4).half()}
    path = tmp_path / "good.safetensors"
    torchkeep.save(state, path, metadata={"epoch": "1"})
    return path


def handmade(path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def expect_corrupt(path: Path, *, problem: str | None = None) -> CorruptCheckpointError:
    with pytest.raises(CorruptCheckpointError) as info:
        torchkeep.load(path)
    assert str(path) in str(info.value)
    if problem is not None:
        assert problem in str(info.value)
    return info.value


def test_truncation_at_every_point_is_detected(tmp_path: Path) -> None:
    path = good_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        with pytest.raises(CorruptCheckpointError):
            torchkeep.load(cut)
        with pytest.raises(CorruptCheckpointError):
            torchkeep.inspect(cut)


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    path = good_file(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "flip.safetensors"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CorruptCheckpointError):
            torchkeep.load(bad)
        with pytest.raises(CorruptCheckpointError):
            torchkeep.verify(bad)


def test_flipped_data_byte_names_the_tensor(tmp_path: Path) -> None:
    path = good_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    err = expect_corrupt(path, problem="checksum mismatch")
    assert err.key is not None
    assert torchkeep.load(path, verify=False)  # the user can still get at the bytes on purpose
    assert torchkeep.load(path, mmap=True)  # mmap checks structure only, as documented


def test_header_length_of_ten_to_the_fifteen(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    expect_corrupt(path, problem="exceeds the limit")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    expect_corrupt(path, problem="runs past the end")


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "run past"),
        ({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, bytes(8), "run past"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, bytes(12), "needs 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16), "belong to no tensor"),
        ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4), "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, bytes(8), "invalid data_offsets"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": 1}},
            bytes(8),
            "string pairs",
        ),
        ({"a": [1, 2]}, b"", "not an object"),
        ([1, 2], b"", "not a JSON object"),
        ({"": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, bytes(4), "empty name"),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"torchkeep.xxh3_64": "{}"}},
            bytes(4),
            "incomplete",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "__metadata__": {"torchkeep.aliases": '{"b": "zz"}'},
            },
            bytes(4),
            "bad alias",
        ),
    ],
    ids=[
        "overlap",
        "out-of-bounds",
        "huge-shape",
        "size-mismatch",
        "gap",
        "trailing",
        "dtype",
        "negative-dim",
        "bool-dim",
        "reversed",
        "offsets-type",
        "metadata-type",
        "entry-type",
        "not-object",
        "empty-name",
        "checksums-missing",
        "bad-alias",
    ],
)
def test_malformed_headers(tmp_path: Path, header: object, data: bytes, problem: str) -> None:
    path = handmade(tmp_path / "bad.safetensors", header, data)
    expect_corrupt(path, problem=problem)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"a": 1, "a": 2}', "duplicate"),
        (b"[" * 100_000, "not valid JSON"),
    ],
    ids=["syntax", "utf8", "duplicate-key", "deep-nesting"],
)
def test_invalid_json(tmp_path: Path, raw: bytes, problem: str) -> None:
    expect_corrupt(handmade(tmp_path / "j.safetensors", None, raw_header=raw), problem=problem)


def test_empty_file_random_bytes_and_foreign_formats(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_corrupt(empty, problem="too short")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).numpy().tobytes()
    )
    expect_corrupt(noise)
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, pickled)  # a torch zip under the wrong name: read by content
    assert torch.equal(torchkeep.load(pickled)["w"], torch.ones(2))


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        torchkeep.load(tmp_path / "absent.safetensors")
    assert isinstance(info.value, FileNotFoundError) and info.value.path.endswith("absent.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"no \.safetensors"):
        torchkeep.load(tmp_path / "empty_dir")
    with pytest.raises(CheckpointNotFoundError):
        torchkeep.inspect(tmp_path / "absent")


def test_damaged_index_files(tmp_path: Path) -> None:
    out = tmp_path / "s"
    torchkeep.save({f"w{i}": torch.randn(100) for i in range(4)}, out, max_shard_size=900)
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    index.write_text("{broken")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        torchkeep.load(out)
    index.write_text(json.dumps({"weight_map": {"w0": "../../etc/passwd"}}))
    with pytest.raises(CorruptCheckpointError, match="not a file in the same folder"):
        torchkeep.load(out)
    index.write_text(json.dumps({"weight_map": {**doc["weight_map"], "ghost": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="does not exist"):
        torchkeep.load(out)
    lying = dict(doc["weight_map"])
    lying["w0"], lying["w3"] = lying["w3"], lying["w0"]
    index.write_text(json.dumps({"weight_map": lying}))
    with pytest.raises(CorruptCheckpointError, match="index"):
        torchkeep.load(out)


def test_hostile_files_fail_within_a_small_memory_limit(tmp_path: Path) -> None:
    """In a child limited to 3 GiB of address space: claims of terabytes must not be believed."""
    files = {
        "len.safetensors": struct.pack("<Q", 10**15) + b"{}",
        "shape.safetensors": (lambda b: struct.pack("<Q", len(b)) + b + bytes(8))(
            json.dumps({"a": {"dtype": "F64", "shape": [10**9, 10**9], "data_offsets": [0, 8 * 10**18]}}).encode()
        ),
        "header.safetensors": struct.pack("<Q", 90 * 2**20) + b"{" + bytes(100),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import torchkeep
        for name in {sorted(files)!r}:
            try:
                torchkeep.load({str(tmp_path)!r} + "/" + name)
            except torchkeep.CorruptCheckpointError:
                continue
            sys.exit("loaded " + name)
        print("all refused")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "all refused" in done.stdout


def test_a_lone_surrogate_in_a_name_or_metadata_is_corrupt_everywhere(tmp_path: Path) -> None:
    # JSON may spell "\ud800", which decodes to no text: convert used to fail writing it back (UnicodeEncodeError),
    # and a terminal printing the name would too. The safetensors library refuses such a header as well.
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    cases = {
        "name": '{"\\ud800": ' + entry + "}",
        "metadata": '{"__metadata__": {"k": "v\\udfff"}, "a": ' + entry + "}",
        "alias map": '{"__metadata__": {"torchkeep.aliases": "{\\"\\\\ud800\\": \\"a\\"}"}, "a": ' + entry + "}",
    }
    for what, header in cases.items():
        raw = header.encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        if len(raw) & 0xFF == 0x80:  # a length whose first byte is PROTO: load names the file a failed pickle instead
            raw += b" " * 8
        path = handmade(tmp_path / f"{what.replace(' ', '-')}.safetensors", None, b"\0" * 4, raw_header=raw)
        expect_corrupt(path, problem="lone UTF-16 surrogate")
        for reader in (torchkeep.inspect, torchkeep.verify):
            with pytest.raises(CorruptCheckpointError, match="surrogate"):
                reader(path)
        with pytest.raises(CorruptCheckpointError, match="surrogate"):
            torchkeep.convert(path, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
    # A surrogate pair is one character (an emoji): a valid name.
    raw = ('{"\\ud83d\\ude00": ' + entry + "}").encode()
    path = handmade(tmp_path / "pair.safetensors", None, b"\0" * 4, raw_header=raw + b" " * (-(8 + len(raw)) % 8))
    assert list(torchkeep.load(path)) == ["\U0001f600"]


def test_a_format_version_of_unicode_digits_is_corrupt_not_a_value_error(tmp_path: Path) -> None:
    # "²".isdigit() is True and int("²") raises a plain ValueError, which escaped every reader.
    meta = {"torchkeep.format": "\u00b2", "torchkeep.xxh3_64": "{}", "torchkeep.header_xxh3_64": "0" * 16}
    path = handmade(tmp_path / "version.safetensors", {"__metadata__": meta})
    for reader in (torchkeep.load, torchkeep.inspect, torchkeep.verify):
        with pytest.raises(CorruptCheckpointError) as info:
            reader(path)
        assert str(path) in str(info.value)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_device_under_a_weight_name_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Opening a FIFO blocks until a writer comes: load, inspect, verify, scan and `torchkeep ls` waited forever.
    import os

    from torchkeep.cli.main import main

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    device = tmp_path / "zero.pt"
    device.symlink_to("/dev/zero")
    for path, kind in ((fifo, "FIFO"), (device, "device")):
        for reader in (torchkeep.load, torchkeep.load_raw, torchkeep.inspect, torchkeep.verify):
            with pytest.raises(CorruptCheckpointError, match=f"is a {kind}.*not a regular file") as info:
                reader(path)
            assert info.value.path == str(path)
        report = torchkeep.scan(path)
        assert report.exit_code == 2
        assert [p.reason for p in report.problems] == [f"is a {kind}{' (named pipe)' if kind == 'FIFO' else ''}, "
                                                       "not a regular file: not read"]  # fmt: skip
    assert main(["ls", str(tmp_path)]) == 0  # each entry says it is not readable; the listing goes on


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_a_fifo_as_an_index_or_a_shard_is_refused(tmp_path: Path) -> None:
    import os

    index = tmp_path / "model.safetensors.index.json"
    os.mkfifo(index)
    with pytest.raises(CorruptCheckpointError, match="is a FIFO") as info:
        torchkeep.load(index)
    assert info.value.path == str(index)
    with pytest.raises(CorruptCheckpointError, match="is a FIFO"):
        torchkeep.load_into(torch.nn.Linear(2, 2), index)


def test_a_bad_header_whose_length_starts_like_a_pickle_keeps_its_own_problem(tmp_path: Path) -> None:
    # A 128-byte header: its length prefix begins with 0x80, a pickle's first byte; the message named the
    # file "not readable as a pickle" instead of the header's real problem.
    header = json.dumps({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (128 - len(header))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(CorruptCheckpointError, match="unknown dtype 'F99'"):
        torchkeep.load(path)
