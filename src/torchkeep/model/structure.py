"""Models made only of torch's own layers (``nn.Sequential(nn.Linear(...), ...)``): recorded and rebuilt
from torch itself, so no user class is needed and nothing named in a file is imported."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

STOCK_PREFIX = "torch.nn.modules."
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SKIP = {"self", "device", "dtype"}


def stock_class(name: str) -> type[nn.Module] | None:
    """``torch.nn.<name>`` if it is one of torch's own layers, else None."""
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith(STOCK_PREFIX):
        return cls
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise TypeError


def _arguments(module: nn.Module) -> dict[str, Any] | None:
    args: dict[str, Any] = {}
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name in _SKIP or name.startswith("_") or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(module, name):
            value = getattr(module, name)
            if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None
            try:
                args[name] = _plain(value)
            except TypeError:
                return None
        elif param.default is inspect.Parameter.empty:
            return None
    return args


def describe(module: nn.Module) -> dict[str, Any] | None:
    """A JSON description of a model built only from stock layers, or None if it has any other."""
    cls = type(module)
    if stock_class(cls.__name__) is not cls:
        return None
    if isinstance(module, CONTAINERS):
        children = {}
        for name, child in module.named_children():
            described = describe(child)
            if described is None:
                return None
            children[name] = described
        return {"type": cls.__name__, "children": children}
    args = _arguments(module)
    if args is None:
        return None
    return {"type": cls.__name__, "args": args}


def rebuild(description: Any) -> nn.Module:
    """Construct a module from :func:`describe`'s output, from torch's own classes only."""
    if not isinstance(description, dict) or not isinstance(description.get("type"), str):
        raise ValueError("malformed module structure")
    cls = stock_class(description["type"])
    if cls is None:
        raise ValueError(f"{description['type']!r} is not one of torch.nn's own layers")
    if cls in CONTAINERS:
        children = {str(k): rebuild(v) for k, v in dict(description.get("children") or {}).items()}
        if cls is nn.Sequential:
            return nn.Sequential(OrderedDict(children))
        if cls is nn.ModuleList:
            return nn.ModuleList([children[k] for k in sorted(children, key=int)])
        return nn.ModuleDict(children)
    args = description.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("malformed module arguments")
    return cls(**args)


def matches(original: nn.Module, rebuilt: nn.Module) -> bool:
    """Same state dict keys, shapes and dtypes: the description is faithful."""
    a, b = original.state_dict(), rebuilt.state_dict()
    return list(a) == list(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
