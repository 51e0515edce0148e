"""Hugging Face transformers folders and torchkeep model folders, both ways, with tiny models built from
configs (nothing downloaded): save_pretrained -> torchkeep.load_model / load, and torchkeep.save_model ->
from_pretrained, sharded too, tied weights kept tied."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    transformers = pytest.importorskip("transformers")


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_save_pretrained_folders_load_through_torchkeep(tmp_path: Path) -> None:
    model = _gpt2()
    _quiet(model.save_pretrained, tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    loaded = torchkeep.load_model(tmp_path / "hf", cls=transformers.GPT2LMHeadModel)
    tokens = torch.randint(0, 100, (2, 8))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied again, one tensor
    weights = torchkeep.load(tmp_path / "hf")  # the shards, every tensor by its name
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # HF drops the tied copy
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], v) for k, v in expected.items())


def test_torchkeep_model_folders_load_with_from_pretrained(tmp_path: Path) -> None:
    model = _gpt2()
    torchkeep.save_model(model, tmp_path / "tk", max_shard_size="20KB")
    config = json.loads((tmp_path / "tk" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert len(list((tmp_path / "tk").glob("model-*.safetensors"))) > 1
    tokens = torch.randint(0, 100, (2, 8))
    theirs = _quiet(transformers.GPT2LMHeadModel.from_pretrained, tmp_path / "tk").eval()
    assert torch.equal(model(tokens).logits, theirs(tokens).logits)
    ours = torchkeep.load_model(tmp_path / "tk", allow_modules=["transformers"])  # the class from the manifest
    assert type(ours) is transformers.GPT2LMHeadModel
    assert torch.equal(model(tokens).logits, ours(tokens).logits)
    with pytest.raises(torchkeep.UnsafeCheckpointError):
        torchkeep.load_model(tmp_path / "tk")  # a class outside the registry needs cls= or allow_modules


def test_an_encoder_with_non_persistent_buffers(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    torch.manual_seed(1)
    model = transformers.BertModel(config).eval()
    torchkeep.save_model(model, tmp_path / "bert")
    tokens = torch.randint(0, 100, (2, 8))
    theirs = _quiet(transformers.BertModel.from_pretrained, tmp_path / "bert").eval()
    ours = torchkeep.load_model(tmp_path / "bert", cls=transformers.BertModel)
    assert torch.equal(model(tokens).last_hidden_state, theirs(tokens).last_hidden_state)
    assert torch.equal(model(tokens).last_hidden_state, ours(tokens).last_hidden_state)
