"""save_model / load_model: a directory of config.json + model.safetensors + a small manifest."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep import _config
from torchkeep._gc import gc_paused
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LoadMismatchError,
    TorchkeepError,
    UnsafeCheckpointError,
)
from torchkeep.format.jsondoc import check_version, expect, parse_json
from torchkeep.format.sharding import is_weights_file
from torchkeep.model import structure, torch_ao
from torchkeep.model.config import build, built_by_default, config_of
from torchkeep.model.quantize import check_recipe, recipe_of, requantize
from torchkeep.model.registry import import_path, registered
from torchkeep.state.devices import MapLocation, parse_device
from torchkeep.state.keys import unwrap_model
from torchkeep.state.tensors import prepare, state_dict_of
from torchkeep.storage.local import LocalStorage, atomic_write, new_folder
from torchkeep.weights.load import load
from torchkeep.weights.load_into import load_into, match_model
from torchkeep.weights.save import save_folder

MODEL_MANIFEST = "torchkeep_model.json"
CONFIG_FILE = "config.json"
FORMAT_NAME = "torchkeep.model"
FORMAT_VERSION = 1


def is_model_file(name: str) -> bool:
    """Whether :func:`save_model` writes a file of this name into a model folder."""
    return name in (CONFIG_FILE, MODEL_MANIFEST) or is_weights_file(name)


def _dtype_of(state: dict[str, torch.Tensor]) -> str | None:
    sizes: dict[str, int] = {}
    for tensor in state.values():
        name = str(tensor.dtype).removeprefix("torch.")
        sizes[name] = sizes.get(name, 0) + tensor.numel()
    return max(sizes, key=lambda k: sizes[k]) if sizes else None


@gc_paused
def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: Any = None,
    max_shard_size: int | str | None = None,
) -> None:
    """Save a whole model without pickle: its config, its weights, and its class by name.

    The config comes from ``config=``; else the model's ``get_config()`` (rebuilt with the
    class's ``from_config``); else the constructor arguments recorded by
    :func:`torchkeep.register_model`; else a ``config`` attribute. A model made only of torch's
    own layers needs none of these: its structure is recorded and rebuilt from torch.

    Raises:
        ValueError: no config can be found and the model is not made of stock layers.
        UnsupportedValueError: the config holds something that is not JSON data.
    """
    target = unwrap_model(model)
    cfg, source = config_of(target, config)
    described = None
    ao_recipe = torch_ao.recipe_of(target, stock=source == "none")  # torch.ao quantized modules: how to redo it
    if ao_recipe is not None and source == "none":
        described, source = ao_recipe.pop("structure"), "stock"
    elif source == "none":
        described = structure.describe(target)
        if described is not None and structure.matches(target, structure.rebuild(described)):
            source = "stock"
        elif built_by_default(target):  # SimpleNet(): its class, built with its constructor's defaults
            cfg, source, described = {}, "defaults", None
        else:
            raise ValueError(
                f"cannot record how to rebuild {type(target).__qualname__}: pass config=... (torchkeep convert: "
                "--config '{...}'), give the class get_config()/from_config(), or decorate it with "
                "@torchkeep.register_model"
            )
    state = state_dict_of(target)
    recipe = recipe_of(target)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "class": None if described else import_path(type(target)),
        "config_source": source,
        "structure": described,
        "parameters": sum(p.numel() for p in target.parameters()),
        "dtype": _dtype_of(state),
        "torch": torch.__version__,
        "torchkeep": _version(),
    }
    if recipe is not None:
        manifest["quantization"] = recipe
    if ao_recipe is not None:
        manifest[torch_ao.MANIFEST_KEY] = ao_recipe
    limit = None
    if max_shard_size is not None:
        from torchkeep.format.sharding import parse_size

        limit = parse_size(max_shard_size)
    with new_folder(Path(path), is_model_file, "model folder") as temp:  # a model folder replaces only one
        # "format": "pt" is what safetensors' torch writer records; transformers' from_pretrained requires it.
        save_folder(LocalStorage(temp), prepare(state, keep_devices=True), {"format": "pt"}, limit)
        with atomic_write(temp / CONFIG_FILE) as sink:
            sink.write((json.dumps(cfg if cfg is not None else {}, indent=2) + "\n").encode())
        with atomic_write(temp / MODEL_MANIFEST) as sink:
            sink.write((json.dumps(manifest, indent=2) + "\n").encode())


def _version() -> str:
    from torchkeep import __version__

    return __version__


def read_model_manifest(path: Path) -> dict[str, Any] | None:
    """The folder's validated ``torchkeep_model.json``, or None if it has none."""
    file = path / MODEL_MANIFEST
    if not file.is_file():
        return None
    manifest = parse_json(_read_document(file), str(file), "model manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(file, "not a torchkeep model manifest")
    check_version(str(file), "model folder", manifest.get("version"), FORMAT_VERSION)
    class_path = manifest.get("class")
    expect(class_path is None or isinstance(class_path, str), str(file), f"'class' is {class_path!r:.80}, not a str")
    source = manifest.get("config_source", "argument")
    expect(isinstance(source, str), str(file), f"'config_source' is {source!r:.80}, not a str")
    described = manifest.get("structure")
    expect(described is None or isinstance(described, dict), str(file), "'structure' is not an object")
    count = manifest.get("parameters")
    valid = count is None or (type(count) is int and count >= 0)
    expect(valid, str(file), f"'parameters' is {count!r:.80}, not a count")
    dtype = manifest.get("dtype")
    expect(dtype is None or isinstance(dtype, str), str(file), f"'dtype' is {dtype!r:.80}, not a str")
    return manifest


def read_config(path: Path) -> Any:
    """The folder's ``config.json`` (any JSON), or None if it has none."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    return parse_json(_read_document(file), str(file), "config")


def _read_document(file: Path) -> bytes:
    size = file.stat().st_size
    if size > _config.MAX_JSON_BYTES:
        raise CorruptCheckpointError(file, f"is {size} bytes, over the limit of {_config.MAX_JSON_BYTES}")
    return file.read_bytes()


def _allowed_class(class_path: str, allow_modules: Sequence[str], where: Path) -> type[nn.Module]:
    module_name, _, qualname = class_path.partition(":")
    found = registered(class_path)
    if found is not None:
        return found
    if any(module_name == m or module_name.startswith(m + ".") for m in allow_modules):
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise CorruptCheckpointError(where, f"the model class {class_path} cannot be found: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return obj
        raise UnsafeCheckpointError(where, f"{class_path} is not an nn.Module subclass")
    raise UnsafeCheckpointError(
        where,
        f"the model class {class_path} is not allowed, and torchkeep does not import code a file names. "
        f"Allow it in one of three ways: load_model(..., cls={qualname}); decorate the class with "
        f"@torchkeep.register_model (and import it first); or load_model(..., allow_modules=[{module_name!r}])",
        globals_=(class_path,),
    )


@gc_paused
def load_model(
    path: str | os.PathLike[str],
    *,
    cls: type[nn.Module] | None = None,
    map_location: MapLocation = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    eval: bool = True,
    allow_modules: Sequence[str] = (),
) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or a Hugging Face mixin folder, given ``cls=``).

    The class comes from ``cls=``, the registry (:func:`torchkeep.register_model`) or a module in
    ``allow_modules``; a model of stock torch layers needs none. The module is built on the
    meta device and the loaded tensors are assigned to it, so memory holds one copy of the weights.

    Returns:
        The model, in eval mode unless ``eval=False``, on ``map_location`` and in ``dtype``.

    Raises:
        UnsafeCheckpointError: the class is not allowed (the message lists the three ways).
        LoadMismatchError: ``strict`` and the weights do not fit the rebuilt model.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointNotFoundError(root, "not a model directory")
    manifest = read_model_manifest(root)
    config = read_config(root)
    source = (manifest or {}).get("config_source", "argument")

    def construct() -> nn.Module:
        if cls is not None:
            return build(cls, config, source)
        if manifest is None:
            raise UnsafeCheckpointError(root, "no torchkeep manifest names a class: pass cls=YourModel")
        if manifest.get("structure"):
            return structure.rebuild(manifest["structure"])
        class_path = manifest.get("class")
        if not isinstance(class_path, str) or ":" not in class_path:
            raise CorruptCheckpointError(root / MODEL_MANIFEST, "records no class")
        return build(_allowed_class(class_path, allow_modules, root), config, source)

    def construct_checked() -> nn.Module:
        try:
            return construct()
        except TorchkeepError:
            raise
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ImportError,
            RecursionError,
            RuntimeError,  # torch's own checks of layer arguments (a negative or overflowing size)
            AssertionError,  # and its asserts (MultiheadAttention: embed_dim divisible by num_heads)
        ) as exc:
            raise CorruptCheckpointError(
                root, f"cannot rebuild the model from its config and manifest: {type(exc).__name__}: {exc}"
            ) from exc

    if manifest is not None and torch_ao.MANIFEST_KEY in manifest:  # built, quantized by torch.ao, then loaded
        where = str(root / MODEL_MANIFEST)
        return torch_ao.load_quantized(root, manifest, construct_checked, map_location, where, dtype, strict, eval)
    recipe = (manifest or {}).get("quantization")
    if recipe is not None:
        return _load_quantized(root, construct_checked, recipe, map_location, dtype, strict, eval)
    with torch.device("meta"):
        model = construct_checked()
    state = load(root, map_location=map_location, dtype=dtype)
    pending = match_model(model, state, source_name=str(root))
    if strict and not pending.report.ok:
        raise LoadMismatchError(pending.report, str(root))
    tied = _tied_groups(model)
    model.load_state_dict(pending.to_load, strict=False, assign=True)
    _retie(model, tied)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # Non-persistent buffers (or skipped keys) have no value in the file: build for real instead, if
        # this machine can hold it (a manifest of a few bytes may describe a layer of any size).
        needed = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory:
            raise CorruptCheckpointError(
                root,
                f"its structure needs {needed:,} bytes of parameters and buffers to build, more than this "
                f"machine's {memory:,} bytes of memory, and its weights file does not hold them all",
            )
        model = construct_checked()
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(pending.to_load, strict=False)
    return model.eval() if eval else model.train()


def _load_quantized(
    root: Path,
    construct: Callable[[], nn.Module],
    recipe: Any,
    map_location: MapLocation,
    dtype: torch.dtype | None,
    strict: bool,
    eval: bool,
) -> nn.Module:
    """Build the float model, quantize it as recorded, then copy the saved int8 data and scales in."""
    where = str(root / MODEL_MANIFEST)
    recipe = check_recipe(recipe, where)
    if dtype is not None:
        raise ValueError("dtype= cannot cast a quantized model; load it as saved")
    model = construct()
    requantize(model, recipe, where)
    load_into(model, root, strict=strict, map_location="cpu")  # the int8 parts over what re-quantizing made
    if map_location not in (None, "cpu"):
        if not isinstance(map_location, (str, torch.device)):
            raise ValueError("a quantized model loads onto one device: pass map_location as a device")
        model.to(parse_device(map_location))
    return model.eval() if eval else model.train()


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, first)


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MODEL_MANIFEST).is_file()


__all__ = ["is_model_dir", "load_model", "save_model"]
