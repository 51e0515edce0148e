"""Bit-exact round trips of every dtype, shape and stride, through the public API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
from hypothesis import given
from hypothesis import strategies as s

import torchkeep
from tests.conftest import assert_same_tensors, bytes_of
from torchkeep.format.dtypes import CODE_TO_DTYPE
from torchkeep.format.io import read_tensors, write_plan
from torchkeep.format.layout import plan_file, read_header
from torchkeep.state.tensors import prepare
from torchkeep.storage import MemoryStorage

ALL_DTYPES = list(CODE_TO_DTYPE.values())


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: every bit pattern (NaNs, subnormals) is fair game."""
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


shapes = s.lists(s.integers(0, 5), min_size=0, max_size=4).map(tuple)
names = s.text(alphabet=s.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20).filter(
    lambda n: n != "__metadata__"
)


@given(
    entries=s.dictionaries(names, s.tuples(s.sampled_from(ALL_DTYPES), shapes, s.integers(0, 2**31)), max_size=8),
)
def test_any_dtypes_shapes_and_names_round_trip_bit_exact(tmp_path: Path, entries: dict) -> None:
    state = {name: random_tensor(dtype, shape, seed) for name, (dtype, shape, seed) in entries.items()}
    path = tmp_path / "t.safetensors"
    torchkeep.save(state, path)
    loaded = torchkeep.load(path)
    assert list(loaded) == list(state)
    assert_same_tensors(state, loaded)
    if state:
        assert_same_tensors(state, torchkeep.load(path, mmap=True))


@given(
    shape=s.lists(s.integers(1, 6), min_size=2, max_size=4).map(tuple),
    dtype=s.sampled_from(ALL_DTYPES),
    seed=s.integers(0, 1000),
    data=s.data(),
)
def test_non_contiguous_views_are_saved_as_their_values(tmp_path: Path, shape, dtype, seed, data) -> None:
    base = random_tensor(dtype, shape, seed)
    dims = data.draw(s.permutations(range(len(shape))))
    view = base.permute(*dims)[..., ::2]
    path = tmp_path / "v.safetensors"
    torchkeep.save({"v": view}, path)
    loaded = torchkeep.load(path)["v"]
    assert loaded.is_contiguous()
    assert loaded.shape == view.shape
    assert bytes_of(loaded) == bytes_of(view)


def test_zero_dim_and_zero_element_tensors(tmp_path: Path) -> None:
    state = {
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "int_scalar": torch.tensor(-7, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "empty_int": torch.empty(3, 0, dtype=torch.int32),
        "bool_scalar": torch.tensor(True),
    }
    torchkeep.save(state, tmp_path / "z.safetensors")
    loaded = torchkeep.load(tmp_path / "z.safetensors")
    assert_same_tensors(state, loaded)
    assert loaded["scalar"].dim() == 0


def test_tied_tensors_are_stored_once_and_come_back_shared(tmp_path: Path) -> None:
    emb = torch.randn(100, 16)
    state = {"embed.weight": emb, "head.weight": emb, "other": torch.randn(3)}
    path = tmp_path / "tied.safetensors"
    torchkeep.save(state, path)
    raw = st.load_file(path)  # what other tools see: one copy
    assert set(raw) == {"embed.weight", "other"}
    assert path.stat().st_size < 100 * 16 * 4 * 2
    loaded = torchkeep.load(path)
    assert set(loaded) == {"embed.weight", "head.weight", "other"}
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert torch.equal(loaded["head.weight"], emb)
    info = torchkeep.inspect(path)
    assert info.aliases == {"head.weight": "embed.weight"}
    assert info.total_params == 100 * 16 + 3


def test_overlapping_views_of_one_storage_are_saved_by_value(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    state = {"all": base, "head": base[:4], "tail": base[6:]}
    torchkeep.save(state, tmp_path / "o.safetensors")
    loaded = torchkeep.load(tmp_path / "o.safetensors")
    assert_same_tensors(state, loaded)


def test_same_state_saves_to_the_same_bytes(tmp_path: Path) -> None:
    state = {"b": torch.randn(3, 3), "a": torch.arange(5), "c": torch.ones(2, dtype=torch.float16)}
    torchkeep.save(state, tmp_path / "1.safetensors", metadata={"k": "v"})
    torchkeep.save(dict(state), tmp_path / "2.safetensors", metadata={"k": "v"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_tensors_are_naturally_aligned_in_the_file(tmp_path: Path) -> None:
    state = {
        "u8": torch.ones(3, dtype=torch.uint8),
        "f64": torch.ones(3, dtype=torch.float64),
        "f16": torch.ones(5, dtype=torch.float16),
        "f32": torch.ones(7),
    }
    path = tmp_path / "a.safetensors"
    torchkeep.save(state, path)
    with open(path, "rb") as f:
        header = read_header(f, str(path), path.stat().st_size)
    assert header.data_start % 8 == 0
    for entry in header.entries:
        assert (header.data_start + entry.start) % torch.empty((), dtype=entry.dtype).element_size() == 0


def test_format_round_trip_through_memory_storage() -> None:
    storage = MemoryStorage()
    state = {"w": torch.randn(4, 4), "n": torch.tensor(5)}
    prepared = prepare(state)
    plan = plan_file(prepared.tensors, metadata={"x": "y"})
    with storage.open_write("m.safetensors") as sink:
        write_plan(plan, sink)
    assert storage.size("m.safetensors") == plan.size
    f = storage.open_read("m.safetensors")
    header = read_header(f, "memory://m.safetensors", storage.size("m.safetensors"))
    assert header.metadata == {"x": "y"}
    assert_same_tensors(state, read_tensors(f, header, "m", verify=True))


def test_many_small_and_some_large_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchkeep import _config

    monkeypatch.setattr(_config, "SMALL_TENSOR_BYTES", 64)
    monkeypatch.setattr(_config, "SMALL_BATCH_BYTES", 256)
    state = {f"t{i}": torch.randn(i % 40) for i in range(300)}
    state["big"] = torch.randn(1000)
    torchkeep.save(state, tmp_path / "m.safetensors")
    assert_same_tensors(state, torchkeep.load(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_each_dtype_interoperates_with_the_safetensors_library(tmp_path: Path, dtype: torch.dtype) -> None:
    ours = {"x": random_tensor(dtype, (3, 5), 1), "y": random_tensor(dtype, (), 2)}
    torchkeep.save(ours, tmp_path / "ours.safetensors")
    assert_same_tensors(ours, st.load_file(tmp_path / "ours.safetensors"))
    st.save_file(ours, tmp_path / "theirs.safetensors")
    assert_same_tensors(ours, torchkeep.load(tmp_path / "theirs.safetensors"))


def test_each_loaded_tensor_owns_its_storage(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(10) for i in range(5)}
    torchkeep.save(state, tmp_path / "m.safetensors")
    loaded = torchkeep.load(tmp_path / "m.safetensors")
    for t in loaded.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_misaligned_tensors_from_other_writers_load_in_both_modes(tmp_path: Path) -> None:
    import json
    import struct

    u8 = bytes([1, 2, 3])
    f32 = torch.tensor([1.5, -2.25])
    header = {
        "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    body = json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + u8 + f32.numpy().tobytes())
    for mmap in (False, True):
        loaded = torchkeep.load(path, mmap=mmap)
        assert torch.equal(loaded["f"], f32) and loaded["u"].tolist() == [1, 2, 3]
