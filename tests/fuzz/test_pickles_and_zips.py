"""Hostile pickle-based files: generated opcode streams, hostile zip containers, byte mutations of real files.

Every public read function must return or raise a TorchkeepError, in bounded time and memory
(tests/fuzz/harness.py). The long campaign: bench/fuzz_campaign.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given

from tests.fuzz.settings import fuzz_settings
from tests.fuzz.targets import TARGETS


@fuzz_settings(ci_cap=60)
@given(case=TARGETS["pickle"].strategy)
def test_generated_pickles(case: Any) -> None:
    TARGETS["pickle"].run(case)


@fuzz_settings(ci_cap=40)
@given(case=TARGETS["zip"].strategy)
def test_zip_containers(case: Any) -> None:
    TARGETS["zip"].run(case)


@fuzz_settings(ci_cap=60)
@given(case=TARGETS["bytes"].strategy)
def test_mutated_files(case: Any) -> None:
    TARGETS["bytes"].run(case)
