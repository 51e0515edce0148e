"""Pickles are read within bounds: hostile ones fail with typed errors in little memory and time, benign ones of
every protocol come back exactly as torch.load / pickle.load return them."""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.legacy.hostile import HOSTILE, P2, glob, torch_zip, write_hostile
from torchkeep.cli.main import main
from torchkeep.format.pickle import allowlist

# Each hostile file goes through every public reader in a child process limited to 3 GiB of address space;
# tracemalloc measures what the load allocated, so a refusal by running out of memory does not pass. The
# budget's floor is lowered to 16 MiB there to keep the run short (tracemalloc slows allocation down).
CHILD = textwrap.dedent("""
    import json, resource, sys, tempfile, time, tracemalloc, warnings
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    import torch, torchkeep
    from torchkeep.format.pickle import unpickler
    unpickler.BUDGET_FLOOR = 16 << 20
    files = json.loads(sys.argv[1])
    readers = {
        "load_raw": torchkeep.load_raw,
        "load": torchkeep.load,
        "load_checkpoint": lambda p: torchkeep.load_checkpoint(p, model=torch.nn.Linear(1, 1)),
        "convert": lambda p: torchkeep.convert(p, tempfile.mkdtemp() + "/out.safetensors"),
    }
    out = {}
    for name, path in files.items():
        for reader, load in readers.items():
            tracemalloc.start()
            start = time.perf_counter()
            try:
                load(path)
                result = "returned"
            except BaseException as exc:
                result = type(exc).__name__ + ": " + str(exc)[:300]
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out[name + " " + reader] = [result, peak, seconds]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, str]]:
    return write_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.mark.slow
def test_hostile_pickles_fail_typed_in_bounded_memory_and_time(hostile: dict[str, tuple[Path, str, str]]) -> None:
    payload = json.dumps({name: str(path) for name, (path, _, _) in hostile.items()})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    problems = []
    for name, (path, error, fragment) in hostile.items():
        # The budget: max(floor, 64x the pickle bytes) of objects; allow twice that for CPython's slack.
        bound = 2 * max(16 << 20, 64 * path.stat().st_size) + (8 << 20)
        for reader in ("load_raw", "load", "load_checkpoint", "convert"):
            result, peak, seconds = results[f"{name} {reader}"]
            if not result.startswith(error + ":") or fragment not in result or str(path) not in result:
                problems.append(f"{name} via {reader}: {result}")
            if "MemoryError" in result or "RecursionError" in result or peak > bound or seconds > 5:
                problems.append(f"{name} via {reader}: {peak >> 20} MiB, {seconds:.1f} s: {result}")
    assert not problems, "\n".join(problems)


def test_each_hostile_pickle_is_refused_with_its_reason(hostile: dict[str, tuple[Path, str, str]]) -> None:
    """In process, the quick way (the child-process test above adds the memory and time bounds)."""
    for name, (path, error, fragment) in hostile.items():
        with pytest.raises(torchkeep.TorchkeepError) as info:
            torchkeep.load_raw(path)
        assert type(info.value).__name__ == error and fragment in str(info.value), f"{name}: {info.value}"


def test_the_cli_reports_a_hostile_file_and_exits_nonzero(
    hostile: dict[str, tuple[Path, str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = hostile["nested_lists_100k.pt"][0]
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 1
    assert "nest more than" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_deep_but_allowed_nesting_loads_and_prints(tmp_path: Path) -> None:
    """Up to the limit, structures load, print, compare and map to a device without recursion errors."""
    deep: Any = "leaf"
    for _ in range(150):
        deep = [deep]
    torch.save({"deep": deep, "w": torch.ones(2)}, tmp_path / "deep.pt")
    loaded = torchkeep.load_raw(tmp_path / "deep.pt", map_location="cpu")
    assert loaded["deep"] == deep and repr(loaded["deep"]).count("[") == 150


def test_shared_references_are_kept_and_counted_once_per_use(tmp_path: Path) -> None:
    shared = {"lr": 0.1, "betas": [0.9, 0.999]}
    weight = torch.randn(3)
    torch.save({"a": shared, "b": shared, "tied": [weight, weight]}, tmp_path / "shared.pt")
    loaded = torchkeep.load_raw(tmp_path / "shared.pt")
    assert loaded["a"] is loaded["b"] and loaded["a"] == shared
    assert loaded["tied"][0] is loaded["tied"][1] and torch.equal(loaded["tied"][0], weight)


def test_a_dense_benign_pickle_far_past_the_floor_loads(tmp_path: Path) -> None:
    """The budget is relative to the pickle's size: a 6 MB vocabulary (about 100 MB of objects) is not refused."""
    vocab = {f"tok{i}": i for i in range(400_000)}
    torch.save({"vocab": vocab, "w": torch.ones(1)}, tmp_path / "vocab.pt")
    assert torchkeep.load_raw(tmp_path / "vocab.pt")["vocab"] == vocab


def test_the_budget_floor_and_ratio_bound_what_a_small_pickle_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lowering the floor shows the bound is the ratio: a list of 10**5 small strings is refused at 1 MiB."""
    from torchkeep.format.pickle import unpickler

    data = pickle.dumps(["x" * 30] * 1 + [str(i) * 8 for i in range(100_000)], protocol=4)
    (tmp_path / "strings.pkl").write_bytes(data)
    assert len(torchkeep.load_raw(tmp_path / "strings.pkl")) == 100_001
    monkeypatch.setattr(unpickler, "BUDGET_FLOOR", 1 << 20)
    monkeypatch.setattr(unpickler, "BUDGET_RATIO", 2)
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"2x the \d+ pickle bytes read"):
        torchkeep.load_raw(tmp_path / "strings.pkl")


# -- benign files, every protocol -------------------------------------------------------------------------


def benign_values() -> dict[str, Any]:
    return {
        "complex": 1 + 2j,
        "set": {1, 2, "a", (3, 4)},
        "frozenset": frozenset({3, (4, 5)}),
        "empty_set": set(),
        "bytearray": bytearray(b"\x00ab\xff"),
        "slice": slice(1, None, 2),
        "ordered": collections.OrderedDict(a=1, b=[1, 2]),
        "bytes": b"\x00\xffxy",
        "empty_bytes": b"",
        "tuple": (1, (2, 3.5), None, True, -7, 2**100),
        "nested": [[1, [2, [3]]], {"k": ("v",), 4: {5: 6}}],
        "range": range(2, 10, 3),
        "text": "é漢🙂\n'\"\\",
        "namespace": argparse.Namespace(lr=0.1, layers=[4, 8]),
        "np_array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_big_endian": np.array([1, 2], dtype=">i4"),
        "np_fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "np_scalar": np.float64(2.5),
        "np_bool": np.bool_(True),
        "np_datetime": np.array(["2020-01-01"], dtype="M8[ns]"),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
    }


def benign_tensors() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "w": torch.randn(3, 4),
        "view": torch.arange(10.0)[2:8:2],
        "i": torch.arange(5),
        "half": torch.ones(3).half(),
        "param": nn.Parameter(torch.ones(2)),
        "state_dict": nn.Linear(2, 3).state_dict(),
    }


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types (tensors and arrays bit for bit; a Namespace comes back as a dict)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, argparse.Namespace):
        return same(vars(a), dict(b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", range(6))
def test_benign_values_round_trip_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    values = benign_values()
    files = {"plain.pkl": pickle.dumps(values, protocol=protocol)}
    buf = io.BytesIO()
    tensors = {} if protocol == 0 else benign_tensors()  # torch.save cannot write tensors at protocol 0
    for name, legacy in (("zip.pt", False), ("legacy.pt", True)):
        buf = io.BytesIO()
        torch.save({**values, **tensors}, buf, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
        files[name] = buf.getvalue()
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        expected = pickle.loads(data) if name == "plain.pkl" else torch.load(path, weights_only=False)
        loaded = torchkeep.load_raw(path)
        assert same(expected, loaded), f"{name}: {[k for k in expected if not same(expected[k], loaded.get(k))]}"


def test_python2_names_map_like_pickle_and_stay_on_the_list() -> None:
    for module, name in (("__builtin__", "complex"), ("__builtin__", "set"), ("copy_reg", "_reconstructor"),
                         ("__builtin__", "xrange")):  # fmt: skip
        assert allowlist.is_allowed(module, name), (module, name)
    for module, name in (("__builtin__", "eval"), ("__builtin__", "getattr"), ("copy_reg", "__newobj__"),
                         ("builtins", "str"), ("__builtin__", "unicode"), ("builtins", "dict.get")):  # fmt: skip
        assert not allowlist.is_allowed(module, name), (module, name)


def test_nothing_on_the_allowlist_allocates_from_a_number_or_calls_what_it_is_given(tmp_path: Path) -> None:
    """Each callable replacement, handed huge ints, refuses instead of building from them."""
    for (module, name), replacement in allowlist._FIXED.items():
        if not callable(replacement) or isinstance(replacement, type):
            continue
        for args in ((10**10,), (10**10, 10**10, 10**10)):
            data = P2 + glob(module, name) + pickle.dumps(args, protocol=2)[2:-1] + b"R."
            path = tmp_path / "call.pt"
            path.write_bytes(torch_zip(data))
            try:
                result = torchkeep.load_raw(path)
            except torchkeep.TorchkeepError:
                continue
            assert type(result) in (complex, slice, range, torch.device), (module, name, args, type(result))


def test_the_hostile_corpus_covers_every_kind_of_attack() -> None:
    assert len(HOSTILE) >= 30


def test_zip_entries_that_share_their_bytes_are_refused(tmp_path: Path) -> None:
    """Many central-directory entries pointing at one stored member: a small file whose storages, read by
    offset, would claim many times its size (inspect reads quantized storages whole). Refused as overlapping."""
    import struct
    import warnings
    import zipfile

    count, size = 12, 4096
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of quantized tensors
        state = {f"w{i}": torch.quantize_per_tensor(torch.zeros(size), 0.1, 0, torch.qint8) for i in range(count)}
    source = tmp_path / "q.pt"
    torch.save(state, source)
    raw = source.read_bytes()
    with zipfile.ZipFile(source) as archive:
        infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [archive.start_dir]
        first = next(i for i in infos if i.filename.endswith("/data/0"))
        body, offsets = bytearray(), {}
        for info, end in zip(infos, ends, strict=True):
            if "/data/" in info.filename and info is not first:
                continue  # every other storage's bytes dropped: its entry will point at storage 0's
            offsets[info.filename] = len(body)
            body += raw[info.header_offset : end]
        directory = bytearray()
        for info in archive.infolist():
            name = info.filename.encode()
            offset = offsets.get(info.filename, offsets[first.filename])
            directory += struct.pack("<4s6H3L5HLL", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, info.CRC, info.compress_size,
                                     info.file_size, len(name), 0, 0, 0, 0, 0, offset) + name  # fmt: skip
        entries = len(archive.infolist())
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(directory), len(body), 0)
    hostile = tmp_path / "shared.pt"
    hostile.write_bytes(bytes(body + directory + end))
    for read in (torchkeep.inspect, torchkeep.load_raw):
        with pytest.raises(torchkeep.CorruptCheckpointError, match="overlap"):
            read(hostile)
