"""Mutated files of every format torchkeep reads give a result or torchkeep's own error, nothing else.

The CI profile runs a few hundred cases; a longer run by hand (see docs/SECURITY.md):
    TORCHKEEP_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/legacy/test_fuzz.py -q
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

import torchkeep

EXAMPLES = int(os.environ.get("TORCHKEEP_FUZZ_EXAMPLES", "150"))


def _samples() -> dict[str, bytes]:
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.ones(2).half(), "s": torch.tensor(1.5)}
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({"model_state_dict": state, "epoch": 2, "loss": 0.5, "cfg": {"lr": 0.1}}, buf)
    out["torch_zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    out["torch_legacy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(6.0), b=np.ones(3, dtype=np.int8))
    out["npz"] = buf.getvalue()
    from torchkeep.format.io import write_plan
    from torchkeep.format.layout import plan_file
    from torchkeep.state.tensors import prepare

    buf = io.BytesIO()
    prepared = prepare(state)
    write_plan(plan_file(prepared.tensors, metadata={"k": "v"}), buf)
    out["safetensors"] = buf.getvalue()
    return out


SAMPLES = _samples()

mutation = s.one_of(
    s.tuples(s.just("flip"), s.integers(0, 10**6), s.integers(1, 255)),
    s.tuples(s.just("truncate"), s.integers(0, 10**6), s.just(0)),
    s.tuples(s.just("insert"), s.integers(0, 10**6), s.integers(0, 255)),
    s.tuples(s.just("delete"), s.integers(0, 10**6), s.integers(1, 64)),
    s.tuples(s.just("smash"), s.integers(0, 10**6), s.integers(0, 255)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        if not out:
            break
        i = position % len(out)
        if kind == "flip":
            out[i] ^= value
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out[i:i] = bytes([value]) * (1 + value % 8)
        elif kind == "delete":
            del out[i : i + value]
        else:  # smash 8 bytes, e.g. a length or an offset field, with a large value
            out[i : i + 8] = (value * 0x0101010101010101).to_bytes(8, "little")
    return bytes(out)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=s.sampled_from(sorted(SAMPLES)), mutations=s.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_fail_only_with_torchkeep_errors(tmp_path: Path, kind: str, mutations: list) -> None:
    path = tmp_path / "fuzzed.bin"
    path.write_bytes(mutate(SAMPLES[kind], mutations))
    for loader in (torchkeep.load, torchkeep.load_raw, torchkeep.scan):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(torchkeep.TorchkeepError):
                loader(path)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_unmutated_samples_load(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "sample.bin"
    path.write_bytes(SAMPLES[kind])
    assert torchkeep.load_raw(path) is not None
