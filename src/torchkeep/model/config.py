"""A model's config as plain JSON, and back: dataclasses are rebuilt from constructor annotations."""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import typing
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from torchkeep.errors import UnsupportedValueError
from torchkeep.model.registry import RECORDED_ATTR

JSON_SCALARS = (str, int, float, bool, type(None))


def to_json(value: Any, where: str = "config") -> Any:
    """Plain JSON data; dataclasses become dicts of their fields. Anything else is refused."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise UnsupportedValueError(
        where,
        f"is a {type(value).__name__}; a model config must be JSON data (numbers, strings, lists, dicts, dataclasses)",
    )


TRANSFORMERS = "transformers"  # the config_source of a Hugging Face transformers model


def config_of(model: nn.Module, explicit: Any = None) -> tuple[Any, str]:
    """The config to save and where it came from: the argument, the model's protocol, or recorded."""
    if explicit is not None:
        return to_json(explicit), "argument"
    if is_transformers_model(model):  # its own JSON, as save_pretrained writes config.json
        hf_config: Any = model.config
        config = json.loads(hf_config.to_json_string(use_diff=False))
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        return config, TRANSFORMERS
    get_config = getattr(model, "get_config", None)
    if callable(get_config):
        return to_json(get_config()), "get_config"
    if RECORDED_ATTR in vars(model):
        return to_json(vars(model)[RECORDED_ATTR]), "recorded"
    config = getattr(model, "config", None)
    if config is not None and not isinstance(config, nn.Module) and not callable(config):
        return to_json(config), "config attribute"
    return None, "none"


def built_by_default(model: nn.Module) -> bool:
    """Whether ``type(model)()`` (a constructor that takes nothing: the tutorials' ``SimpleNet()``) builds a
    model of the same structure, so its config is ``{}``. The probe is built on the meta device (nothing allocated)
    with every random generator put back after (a save must not move a random stream)."""
    cls = type(model)
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if parameters:  # an argument with a default may hold what neither repr nor the state dict shows
        return False
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = cls()
    except Exception:  # its own code refused to run this way: not a default build
        return False
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    mine, theirs = model.state_dict(), probe.state_dict()
    return (
        repr(probe) == repr(model)
        and list(mine) == list(theirs)
        and all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine)
    )


def _rebuild(value: Any, annotation: Any) -> Any:
    """Turn JSON back into the annotated type where it is a dataclass (nested ones too)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _rebuild(value, arg)
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        return annotation(**{k: _rebuild(v, hints.get(k, Any)) for k, v in value.items()})
    if origin in (list, tuple) and isinstance(value, list):
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        items = [_rebuild(v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    return value


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face ``transformers`` model: a ``PreTrainedModel`` with its ``PretrainedConfig``."""
    config = getattr(model, "config", None)
    return getattr(type(model), "config_class", None) is not None and callable(getattr(config, "to_json_string", None))


def build(cls: type[nn.Module], config: Any, source: str) -> nn.Module:
    """Construct ``cls`` from its saved config, following the protocol it was saved with."""
    config_class = getattr(cls, "config_class", None)
    if (source == TRANSFORMERS or "model_type" in (config or {})) and callable(
        getattr(config_class, "from_dict", None)
    ):
        # transformers: the class takes its config object (a config.json from save_pretrained or torchkeep)
        return cls(config_class.from_dict(config))  # type: ignore[union-attr]
    if source == "defaults":  # a constructor that takes nothing
        return cls()
    if source == "get_config" and callable(getattr(cls, "from_config", None)):
        return cls.from_config(config)  # type: ignore[attr-defined, no-any-return]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: pass values as they are
        hints = {}
    parameters = inspect.signature(cls.__init__).parameters
    if source == "config attribute" or (
        isinstance(config, dict) and "config" in parameters and "config" not in config and len(parameters) == 2
    ):
        return cls(_rebuild(config, hints.get("config", Any)))
    if isinstance(config, dict):
        return cls(**{k: _rebuild(v, hints.get(k, Any)) for k, v in config.items()})
    if config is None:
        return cls()
    raise TypeError(f"cannot build {cls.__qualname__} from a config of type {type(config).__name__}")
