"""The fuzzers start from valid files: unmutated, every public read function reads each of them.

Otherwise a fuzz target would only exercise the first check that rejects its seed.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz import harness
from tests.fuzz.targets import TARGETS

# Refusals that are right for the seed itself (a plain pickle holds no weights; inspect reads every format).
NO_WEIGHTS = {"load", "load_into(strict=False)", "convert"}
UNMUTATED: list[tuple[str, Any, set[str]]] = [
    ("manifest", ("signed", []), set()),
    ("manifest", ("unsigned", []), set()),
    ("manager", (3, ("signed", [])), set()),
    ("header", ("mutated", "plain", [], "keep", False), set()),
    ("header", ("mutated", "plain", [], "resign", True), set()),
    ("header", ("mutated", "tied", [], "strip", False), {"load_into(strict=True)"}),  # other keys than the model
    ("index", ("json", []), set()),
    ("model", ("torchkeep_model.json", "json", []), {"load_model(cls)"}),  # stock layers: no config for cls
    ("zip", ([0], [], []), set()),
    ("zip", ([8, 12, 14], [], []), set()),
    ("bytes", ("safetensors", []), set()),
    ("bytes", ("tied", []), {"load_into(strict=True)"}),
    ("bytes", ("torch_zip", []), set()),
    ("bytes", ("torch_legacy", []), set()),
    ("bytes", ("npz", []), set()),
    ("bytes", ("plain_pickle", []), NO_WEIGHTS),
]


@pytest.mark.parametrize(
    ("target", "case", "expected"), UNMUTATED, ids=[f"{t}-{i}" for i, (t, *_) in enumerate(UNMUTATED)]
)
def test_unmutated_seeds_read_cleanly(target: str, case: Any, expected: set[str]) -> None:
    harness.TALLY.clear()
    TARGETS[target].run(case)
    refused = {fn: outcome for (fn, outcome), _ in harness.TALLY.items() if outcome != "ok"}
    assert harness.TALLY, "nothing was called"
    assert set(refused) == expected, refused
