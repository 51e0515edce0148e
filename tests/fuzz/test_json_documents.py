"""Hostile JSON documents: checkpoint manifests (re-signed), runs, safetensors headers, indexes, model folders.

Every public read function must return or raise a TorchkeepError, in bounded time and memory
(tests/fuzz/harness.py). The long campaign: bench/fuzz_campaign.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given

from tests.fuzz.settings import fuzz_settings
from tests.fuzz.targets import TARGETS


@fuzz_settings(ci_cap=40)
@given(case=TARGETS["manifest"].strategy)
def test_checkpoint_manifests(case: Any) -> None:
    TARGETS["manifest"].run(case)


@fuzz_settings(ci_cap=15)
@given(case=TARGETS["manager"].strategy)
def test_manager_run_directories(case: Any) -> None:
    TARGETS["manager"].run(case)


@fuzz_settings(ci_cap=60)
@given(case=TARGETS["header"].strategy)
def test_safetensors_headers(case: Any) -> None:
    TARGETS["header"].run(case)


@fuzz_settings(ci_cap=30)
@given(case=TARGETS["index"].strategy)
def test_sharded_indexes(case: Any) -> None:
    TARGETS["index"].run(case)


@fuzz_settings(ci_cap=40)
@given(case=TARGETS["model"].strategy)
def test_model_folders(case: Any) -> None:
    TARGETS["model"].run(case)
