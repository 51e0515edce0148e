"""OrderedDict, Counter and defaultdict values come back as what they were (they came back as plain dicts,
so a resumed `history["new"].append(x)` raised KeyError); a defaultdict whose factory is not a builtin type
is refused when saving, naming where it is."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep


def test_collections_round_trip_with_their_types(tmp_path: Path) -> None:
    history: collections.defaultdict[str, list[float]] = collections.defaultdict(list, {"loss": [0.5, 0.25]})
    counts = collections.Counter({"cat": 3, "dog": 1})
    ordered = collections.OrderedDict([("b", torch.ones(2)), ("a", 2)])
    nested = {"by_epoch": collections.defaultdict(int, {1: 4}), "plain": {"x": 1}, "none": collections.defaultdict()}
    torchkeep.save_checkpoint(
        tmp_path / "ck", model=nn.Linear(2, 2), history=history, counts=counts, ordered=ordered, nested=nested
    )
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["version"] == 4  # an older torchkeep says to upgrade instead of misreading them
    rest = torchkeep.load_checkpoint(tmp_path / "ck", model=nn.Linear(2, 2))
    assert type(rest["history"]) is collections.defaultdict and rest["history"].default_factory is list
    rest["history"]["new"].append(1.0)  # a KeyError when it came back a dict
    assert rest["history"] == {"loss": [0.5, 0.25], "new": [1.0]}
    assert type(rest["counts"]) is collections.Counter and rest["counts"]["bird"] == 0
    assert rest["counts"] == counts
    assert type(rest["ordered"]) is collections.OrderedDict and list(rest["ordered"]) == ["b", "a"]
    assert torch.equal(rest["ordered"]["b"], torch.ones(2)) and rest["ordered"]["a"] == 2
    assert rest["nested"]["by_epoch"][2] == 0 and type(rest["nested"]["plain"]) is dict
    assert rest["nested"]["none"].default_factory is None


def test_plain_values_keep_the_older_format(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "ck", model=nn.Linear(2, 2), epoch=1, note="$odict:")
    assert json.loads((tmp_path / "ck" / "manifest.json").read_text())["version"] == 1
    assert torchkeep.load_checkpoint(tmp_path / "ck", model=nn.Linear(2, 2))["note"] == "$odict:"


def test_a_defaultdict_of_a_lambda_is_refused_naming_where(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.UnsupportedValueError, match=r"stats\.seen.*default_factory"):
        torchkeep.save_checkpoint(tmp_path / "ck", stats={"seen": collections.defaultdict(lambda: 0)})
    assert not (tmp_path / "ck").exists()


def test_a_factory_name_from_the_file_is_never_imported(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "ck", history=collections.defaultdict(list))
    path = tmp_path / "ck" / "manifest.json"
    body = json.loads(path.read_text())
    body["state"]["history"]["factory"] = "os.system"
    from torchkeep.checkpoint.layout import manifest_bytes

    tensors_file = body.pop("tensors_file")
    body.pop("xxh3_64")
    path.write_bytes(manifest_bytes(body, tensors_file))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"'os\.system' is not a builtin type"):
        torchkeep.load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize(
    ("node", "problem"),
    [
        ({"$counter": [["a", "x"]]}, "counts must be numbers"),
        ({"$odict": [], "$counter": []}, "two tags"),
    ],
    ids=["counter-of-strings", "two-tags"],
)
def test_malformed_collection_values_are_corrupt(tmp_path: Path, node: dict[str, Any], problem: str) -> None:
    torchkeep.save_checkpoint(tmp_path / "ck", counts=collections.Counter({"a": 1}))
    path = tmp_path / "ck" / "manifest.json"
    body = json.loads(path.read_text())
    body["state"]["counts"] = node
    from torchkeep.checkpoint.layout import manifest_bytes

    tensors_file = body.pop("tensors_file")
    body.pop("xxh3_64")
    path.write_bytes(manifest_bytes(body, tensors_file))
    with pytest.raises(torchkeep.CorruptCheckpointError, match=problem):
        torchkeep.load_checkpoint(tmp_path / "ck")
