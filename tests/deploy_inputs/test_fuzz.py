"""Fuzzing the deployment-format readers: every public read of a mutated TorchScript, .pt2 or ONNX file
returns or raises a TorchkeepError, in bounded time and memory (tests/fuzz/harness.py)."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as s

import torchkeep
from tests.deploy_inputs.models import CNN, MLP, example, trained
from tests.fuzz import harness
from tests.fuzz.bytemut import mutate, mutations
from tests.fuzz.settings import fuzz_settings

# Members whose bytes are mutated inside a rewritten (CRC-valid) archive, so a mutation reaches the parsers.
_MEMBERS = (".pkl", ".json", ".py", "archive_format", "/data/0", "/weights/weight_0")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("deploy-seeds")
    cnn = trained(CNN, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation
        torch.jit.script(cnn).save(str(folder / "m.pt"))
    dynamic = ({0: torch.export.Dim("batch", min=2)},)
    torch.export.save(torch.export.export(cnn, (example(cnn),), dynamic_shapes=dynamic), str(folder / "m.pt2"))
    out = {"torchscript": (folder / "m.pt").read_bytes(), "exported_program": (folder / "m.pt2").read_bytes()}
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(trained(MLP, 1), (torch.randn(2, 4),), dynamo=True, verbose=False)
    program.save(str(folder / "m.onnx"))
    out["onnx"] = (folder / "m.onnx").read_bytes()
    return out


def _mutate_member(data: bytes, choice: int, changes: list[tuple[str, int, int]]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as old:
        infos = old.infolist()
        targets = [i for i in infos if i.filename.endswith(_MEMBERS)]
        target = targets[choice % len(targets)]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as new:
            for info in infos:
                member = old.read(info)
                new.writestr(info.filename, mutate(member, changes) if info is target else member)
    return buf.getvalue()


@fuzz_settings(ci_cap=40)
@given(
    kind=s.sampled_from(["torchscript", "exported_program", "onnx"]),
    inside=s.booleans(),
    choice=s.integers(0, 1000),
    changes=mutations,
    suffix=s.sampled_from([".pt", ".pt2", ".onnx", ".bin"]),
)
def test_mutated_deployment_files(
    seeds: dict[str, bytes], kind: str, inside: bool, choice: int, changes: list[tuple[str, int, int]], suffix: str
) -> None:
    if kind not in seeds:
        kind = "torchscript"  # onnx not installed
    data = seeds[kind]
    data = _mutate_member(data, choice, changes) if inside and kind != "onnx" else mutate(data, changes)
    with harness.workdir() as work:
        path = work / f"model{suffix}"
        path.write_bytes(data)
        harness.read_as_weights(path, work)


def test_seeds_read_cleanly(seeds: dict[str, bytes], tmp_path: Path) -> None:
    for kind, data in seeds.items():
        path = tmp_path / f"{kind}.bin"
        path.write_bytes(data)
        assert harness.attempt("load", torchkeep.load, path), kind
