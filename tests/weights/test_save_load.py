"""save / load options: sharding, metadata, map_location, dtype, mmap, unsupported tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import torchkeep
from tests.conftest import assert_same_tensors, requires_cuda


def big_state(n: int = 12) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 64) for i in range(n)} | {"bias": torch.randn(7)}


def test_sharded_layout_matches_hugging_face(tmp_path: Path) -> None:
    state = big_state()
    out = tmp_path / "sharded"
    torchkeep.save(state, out, max_shard_size="50KB")  # 16 KiB per tensor -> 3 per shard, bias rides in the last
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) == 4 and shards[0] == "model-00001-of-00004.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    assert set(index["weight_map"]) == set(state)
    for name, file in index["weight_map"].items():  # each shard readable by safetensors itself
        assert torch.equal(st.load_file(out / file)[name], state[name])
    assert_same_tensors(state, torchkeep.load(out))
    assert_same_tensors(state, torchkeep.load(out / "model.safetensors.index.json"))
    assert_same_tensors(state, torchkeep.load(out, mmap=True))
    info = torchkeep.inspect(out)
    assert len(info.files) == 4 and "sharded" in info.format


def test_one_shard_writes_a_single_file_and_resave_drops_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "m"
    torchkeep.save(big_state(), out, max_shard_size=40_000)
    assert (out / "model.safetensors.index.json").exists()
    (out / "config.json").write_text("{}")  # someone else's file: never touched
    small = {"w": torch.ones(3)}
    torchkeep.save(small, out, max_shard_size="1GB")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_tensors(small, torchkeep.load(out))


def test_shared_tensors_in_a_sharded_save(tmp_path: Path) -> None:
    emb = torch.randn(100, 40)
    state = {"a": torch.randn(100, 40), "embed": emb, "head": emb}
    torchkeep.save(state, tmp_path / "s", max_shard_size=20_000)
    loaded = torchkeep.load(tmp_path / "s")
    assert loaded["head"] is loaded["embed"]
    assert_same_tensors(state, loaded)


@pytest.mark.parametrize(
    ("size", "expected"), [(1000, 1000), ("500MB", 500_000_000), ("2GB", 2 * 10**9), ("1GiB", 2**30), ("10 kb", 10_000)]
)
def test_shard_size_strings(size: int | str, expected: int) -> None:
    from torchkeep.format.sharding import parse_size

    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["lots", "-5MB", 0, "5XB"])
def test_bad_shard_sizes_are_rejected(tmp_path: Path, size: int | str) -> None:
    with pytest.raises(ValueError, match="size"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "d", max_shard_size=size)


def test_split_shards_is_greedy_and_keeps_order() -> None:
    from torchkeep.format.sharding import split_shards

    assert split_shards([5, 5, 5, 20, 1], lambda x: x, 10) == [[5, 5], [5], [20], [1]]
    assert split_shards([], lambda x: x, 10) == [[]]


def test_metadata_is_kept_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torchkeep.save({"w": torch.ones(2)}, path, metadata={"epoch": "3", "note": "日本"})
    assert torchkeep.inspect(path).metadata == {"epoch": "3", "note": "日本"}
    with st.safe_open(path, "pt") as f:
        assert f.metadata()["epoch"] == "3"
    with pytest.raises(ValueError, match="str to str"):
        torchkeep.save({"w": torch.ones(2)}, path, metadata={"epoch": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        torchkeep.save({"w": torch.ones(2)}, path, metadata={"torchkeep.x": "1"})


def test_bad_targets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        torchkeep.save({"w": torch.ones(1)}, tmp_path / "model.pth")
    with pytest.raises(TypeError, match=r"nn\.Module or a mapping"):
        torchkeep.save([torch.ones(1)], tmp_path / "x.safetensors")  # type: ignore[arg-type]
    with pytest.raises(torchkeep.UnsupportedTensorError, match="not a tensor"):
        torchkeep.save({"w": 3}, tmp_path / "x.safetensors")  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("make", "hint"),
    [
        (lambda: torch.randn(3, 3).to_sparse(), "to_dense"),
        (lambda: torch.randn(3, 3).to_sparse_csr(), "to_dense"),
        # qint8/quint8/qint32 are stored as parts (tests/quant_ao); 4-bit quantized tensors are not
        (lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint4x2), "dequantize"),
        (lambda: torch.randn(3, dtype=torch.complex128), "complex64"),
        (lambda: torch.empty(3, device="meta"), "meta"),
    ],
    ids=["sparse_coo", "sparse_csr", "quantized", "complex128", "meta"],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta", "ignore:torch.quantize_per_tensor")
def test_unstorable_tensors_get_a_clear_error_naming_the_key(
    tmp_path: Path, make: Callable[[], torch.Tensor], hint: str
) -> None:
    tensor = make()
    with pytest.raises(torchkeep.UnsupportedTensorError, match=hint) as info:
        torchkeep.save({"ok": torch.ones(1), "bad.weight": tensor}, tmp_path / "x.safetensors")
    assert info.value.key == "bad.weight"
    assert not (tmp_path / "x.safetensors").exists()


def test_complex64_is_stored(tmp_path: Path) -> None:
    state = {"c": torch.randn(4, dtype=torch.complex64)}
    torchkeep.save(state, tmp_path / "c.safetensors")
    assert_same_tensors(state, torchkeep.load(tmp_path / "c.safetensors"))


def test_requires_grad_parameters_save_and_conj_views(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    c = torch.randn(3, dtype=torch.complex64)
    torchkeep.save({"p": p, "c": c.conj()}, tmp_path / "p.safetensors")
    loaded = torchkeep.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded["p"], p.detach()) and not loaded["p"].requires_grad
    assert torch.equal(loaded["c"], c.conj().resolve_conj())


def test_dtype_casts_floats_only(tmp_path: Path) -> None:
    state = {"f": torch.randn(4), "i": torch.arange(4), "b": torch.tensor([True, False]), "d": torch.randn(2).double()}
    torchkeep.save(state, tmp_path / "m.safetensors")
    loaded = torchkeep.load(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert loaded["f"].dtype == torch.bfloat16 and loaded["d"].dtype == torch.bfloat16
    assert loaded["i"].dtype == torch.int64 and loaded["b"].dtype == torch.bool
    assert torch.equal(loaded["f"], state["f"].bfloat16())
    with pytest.raises(ValueError, match="floating-point"):
        torchkeep.load(tmp_path / "m.safetensors", dtype=torch.int32)


def test_map_location_forms_on_cpu(tmp_path: Path) -> None:
    state = {"w": torch.randn(3), "v": torch.randn(2)}
    path = tmp_path / "m.safetensors"
    torchkeep.save(state, path)
    for location in ("cpu", torch.device("cpu"), "auto", {"cpu": "cpu"}, {"cuda:0": "cpu"}, None):
        loaded = torchkeep.load(path, map_location=location)
        assert all(t.device.type == "cpu" for t in loaded.values())
        assert_same_tensors(state, loaded)
    seen: list[str] = []

    def hook(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.append(location)
        return storage

    assert_same_tensors(state, torchkeep.load(path, map_location=hook))
    assert seen == ["cpu", "cpu"]
    assert_same_tensors(state, torchkeep.load(path, map_location=lambda s, loc: None))
    with pytest.raises(ValueError, match="map_location"):
        torchkeep.load(path, map_location="nonsense-device")
    with pytest.raises(TypeError, match="map_location"):
        torchkeep.load(path, map_location=3)  # type: ignore[arg-type]


def test_mmap_load_reads_lazily_and_is_copy_on_write(tmp_path: Path) -> None:
    state = {"w": torch.randn(1000), "s": torch.tensor(2.0)}
    path = tmp_path / "m.safetensors"
    torchkeep.save(state, path)
    before = path.read_bytes()
    loaded = torchkeep.load(path, mmap=True)
    assert_same_tensors(state, loaded)
    loaded["w"].add_(1)  # private mapping: the file must not change
    assert path.read_bytes() == before


@requires_cuda
def test_cuda_map_locations(tmp_path: Path) -> None:
    state = {"w": torch.randn(3)}
    path = tmp_path / "m.safetensors"
    torchkeep.save(state, path)
    for location in ("cuda", "cuda:0", "auto", {"cpu": "cuda:0"}):
        loaded = torchkeep.load(path, map_location=location)
        assert loaded["w"].is_cuda and torch.equal(loaded["w"].cpu(), state["w"])
    torchkeep.save({"w": state["w"].cuda()}, tmp_path / "g.safetensors")  # saving from the GPU
    assert torch.equal(torchkeep.load(tmp_path / "g.safetensors")["w"], state["w"])
    model = torch.nn.Linear(3, 1).cuda()
    torchkeep.save(model, tmp_path / "lin.safetensors")
    fresh = torch.nn.Linear(3, 1).cuda()
    assert torchkeep.load_into(fresh, tmp_path / "lin.safetensors").ok
    assert torch.equal(fresh.weight, model.weight)


def test_load_from_a_folder_with_a_single_file(tmp_path: Path) -> None:
    state = {"w": torch.randn(3)}
    torchkeep.save(state, tmp_path / "dir")
    assert (tmp_path / "dir" / "model.safetensors").exists()
    assert_same_tensors(state, torchkeep.load(tmp_path / "dir"))
    other = tmp_path / "other"
    other.mkdir()
    st.save_file(state, other / "weights.safetensors")
    assert_same_tensors(state, torchkeep.load(other))


def test_file_written_by_safetensors_is_unchecked_but_loads(tmp_path: Path) -> None:
    state = {"w": torch.randn(3)}
    st.save_file(state, tmp_path / "x.safetensors")
    assert_same_tensors(state, torchkeep.load(tmp_path / "x.safetensors", verify=True))
    info = torchkeep.inspect(tmp_path / "x.safetensors")
    assert not info.checksummed and "none" in str(info)
    assert torchkeep.verify(tmp_path / "x.safetensors") is None
