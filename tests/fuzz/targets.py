"""Fuzz targets: what hypothesis generates for each kind of input, and which public functions read it.

Each :class:`Target` pairs a strategy with a ``run(case)`` that writes the case into a fresh folder
and calls every public function that reads that kind of input through :func:`harness.attempt`.
The tests (tests/fuzz/test_*.py) and the long campaign (bench/fuzz_campaign.py) share them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as s

from tests.fuzz import harness, jsonmut, seeds
from tests.fuzz.bytemut import mutate, mutations
from tests.fuzz.pickle_gen import pickle_cases, write_pickle_case
from tests.fuzz.safetensors_gen import header_cases, write_header_case
from tests.fuzz.zip_gen import write_zip_case, zip_cases
from torchkeep.checkpoint.layout import CHECKSUM_KEY, manifest_bytes
from torchkeep.format.layout import digest


@dataclass(frozen=True)
class Target:
    name: str
    strategy: s.SearchStrategy[Any]
    run: Callable[[Any], None]
    doc: str


# ---------------------------------------------------------------------------------------------
# Checkpoint manifests (re-signed, so the mutation reaches the validators), and a manager's run


def sign(body: Any) -> bytes:
    """A manifest file for ``body`` with a valid checksum, as an attacker can write one."""
    if not isinstance(body, dict):
        return jsonmut.dumps(body)
    body = dict(body)
    body.pop(CHECKSUM_KEY, None)
    tensors_file = body.pop("tensors_file", None)
    if isinstance(tensors_file, dict):
        return manifest_bytes(body, tensors_file)  # as torchkeep writes it
    if tensors_file is not None:
        body["tensors_file"] = tensors_file
    canonical = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return jsonmut.dumps({**body, CHECKSUM_KEY: digest(canonical)}, indent=1)


def _manifest_document() -> Any:
    return json.loads(seeds.checkpoint()["manifest.json"])


manifest_cases = s.one_of(
    s.tuples(s.just("signed"), jsonmut.mutations),
    s.tuples(s.just("unsigned"), jsonmut.mutations),
    s.tuples(s.just("bytes"), mutations),
)


def manifest_file(case: tuple[str, Any], original: bytes) -> bytes:
    kind, changes = case
    if kind == "bytes":
        return mutate(original, changes)
    document = jsonmut.apply(json.loads(original), changes)
    return sign(document) if kind == "signed" else jsonmut.dumps(document, indent=1)


def run_manifest(case: tuple[str, Any]) -> None:
    with harness.workdir() as work:
        folder = work / "ckpt"
        seeds.write_files(folder, seeds.checkpoint())
        (folder / "manifest.json").write_bytes(manifest_file(case, seeds.checkpoint()["manifest.json"]))
        harness.read_as_checkpoint(folder, work)


def run_manager(case: tuple[int, tuple[str, Any]]) -> None:
    step, change = case
    with harness.workdir() as work:
        run = work / "run"
        seeds.write_files(run, seeds.run())
        manifest = run / f"step-{step:08d}" / "manifest.json"
        manifest.write_bytes(manifest_file(change, manifest.read_bytes()))
        harness.read_as_run(run)


# ---------------------------------------------------------------------------------------------
# Weights: safetensors headers, sharded indexes, model folders


def run_header(case: Any) -> None:
    with harness.workdir() as work:
        path = work / "model.safetensors"
        path.write_bytes(write_header_case(case))
        harness.read_as_weights(path, work)


def run_index(case: tuple[str, Any]) -> None:
    kind, changes = case
    with harness.workdir() as work:
        folder = work / "sharded"
        seeds.write_files(folder, seeds.sharded())
        index = folder / "model.safetensors.index.json"
        if kind == "bytes":
            index.write_bytes(mutate(index.read_bytes(), changes))
        else:
            index.write_bytes(jsonmut.dumps(jsonmut.apply(json.loads(index.read_bytes()), changes), indent=2))
        harness.read_as_weights(folder, work)
        harness.read_as_weights(index, work)


MODEL_FILES = ("torchkeep_model.json", "config.json")


def run_model(case: tuple[str, str, Any]) -> None:
    file, kind, changes = case
    with harness.workdir() as work:
        folder = work / "net"
        seeds.write_files(folder, seeds.model_folder())
        target = folder / file
        if kind == "bytes":
            target.write_bytes(mutate(target.read_bytes(), changes))
        else:
            target.write_bytes(jsonmut.dumps(jsonmut.apply(json.loads(target.read_bytes()), changes), indent=2))
        harness.read_as_model(folder)


# ---------------------------------------------------------------------------------------------
# Pickle-based files: generated opcode streams, mutated real files, hostile zip containers


def run_pickle(case: tuple[str, bytes, int]) -> None:
    with harness.workdir() as work:
        path = work / "model.pt"
        path.write_bytes(write_pickle_case(case))
        harness.read_as_pickle(path, work)


def run_zip(case: Any) -> None:
    with harness.workdir() as work:
        path = work / "model.pt"
        path.write_bytes(write_zip_case(case))
        harness.read_as_pickle(path, work)


def run_bytes(case: tuple[str, list[tuple[str, int, int]]]) -> None:
    kind, changes = case
    with harness.workdir() as work:
        path = work / "fuzzed.bin"
        path.write_bytes(mutate(BYTE_SEEDS()[kind], changes))
        harness.read_as_pickle(path, work)
        if kind in ("safetensors", "tied"):
            harness.read_as_weights(path, work)


def BYTE_SEEDS() -> dict[str, bytes]:
    return {**seeds.pickled(), "safetensors": seeds.safetensors(), "tied": seeds.tied_safetensors()}


BYTE_KINDS = ["npz", "plain_pickle", "safetensors", "tied", "torch_legacy", "torch_zip"]
json_file_cases = s.one_of(s.tuples(s.just("json"), jsonmut.mutations), s.tuples(s.just("bytes"), mutations))


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "manifest",
            manifest_cases,
            run_manifest,
            "checkpoint manifest.json: structural (re-signed or not) and byte mutations",
        ),
        Target(
            "manager",
            s.tuples(s.sampled_from([1, 2, 3]), manifest_cases),
            run_manager,
            "a step's manifest in a CheckpointManager directory",
        ),
        Target("header", header_cases, run_header, "safetensors headers: mutated real ones and generated ones"),
        Target("index", json_file_cases, run_index, "model.safetensors.index.json of a sharded folder"),
        Target(
            "model",
            s.tuples(s.sampled_from(MODEL_FILES), s.just("json"), jsonmut.mutations)
            | s.tuples(s.sampled_from(MODEL_FILES), s.just("bytes"), mutations),
            run_model,
            "save_model folders: torchkeep_model.json and config.json",
        ),
        Target(
            "pickle", pickle_cases, run_pickle, "generated opcode streams as zip archives, legacy files, bare pickles"
        ),
        Target("zip", zip_cases, run_zip, "torch.save zip containers with hostile members and fields"),
        Target(
            "bytes",
            s.tuples(s.sampled_from(BYTE_KINDS), mutations),
            run_bytes,
            "byte mutations of real files of every format",
        ),
    )
}
