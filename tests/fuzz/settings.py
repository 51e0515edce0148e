"""How many cases each fuzz test runs: the loaded hypothesis profile (CI caps it), or TORCHKEEP_FUZZ_EXAMPLES."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def fuzz_settings(ci_cap: int | None = None) -> settings:
    """``TORCHKEEP_FUZZ_EXAMPLES`` if set (long runs by hand), else the profile's count, at most ``ci_cap``."""
    chosen = os.environ.get("TORCHKEEP_FUZZ_EXAMPLES")
    if chosen:
        examples = int(chosen)
    else:
        examples = settings().max_examples
        if ci_cap is not None:
            examples = min(examples, ci_cap)
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
