"""Classes load_model may build, and the constructor arguments they were built with."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

M = TypeVar("M", bound=type[nn.Module])

_REGISTRY: dict[str, type[nn.Module]] = {}
RECORDED_ATTR = "_torchkeep_init_args"


def import_path(cls: type) -> str:
    """``package.module:QualName``, the name a model directory records its class by."""
    return f"{cls.__module__}:{cls.__qualname__}"


@overload
def register_model(cls: M, *, name: str | None = None) -> M: ...


@overload
def register_model(cls: None = None, *, name: str | None = None) -> Callable[[M], M]: ...


def register_model(cls: M | None = None, *, name: str | None = None) -> M | Callable[[M], M]:
    """Allow ``load_model`` to build this class, and record its constructor arguments as its config.

    Use as a decorator (``@torchkeep.register_model``) or a call (``register_model(MyNet)``).
    ``name`` registers it under another import path too (a class that moved).
    """

    def apply(klass: M) -> M:
        if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
            raise TypeError(f"register_model takes an nn.Module subclass, not {klass!r}")
        _REGISTRY[import_path(klass)] = klass
        if name is not None:
            _REGISTRY[name] = klass
        _record_init_args(klass)
        return klass

    return apply(cls) if cls is not None else apply


def _record_init_args(klass: type[nn.Module]) -> None:
    original = klass.__init__
    if getattr(original, "_torchkeep_records", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])
        for param in signature.parameters.values():
            if param.kind is inspect.Parameter.VAR_KEYWORD and param.name in arguments:
                arguments.update(arguments.pop(param.name))
        original(self, *args, **kwargs)
        if type(self) is klass:  # a subclass records its own
            object.__setattr__(self, RECORDED_ATTR, arguments)

    __init__._torchkeep_records = True  # type: ignore[attr-defined]
    klass.__init__ = __init__  # type: ignore[method-assign]


def registered(path: str) -> type[nn.Module] | None:
    return _REGISTRY.get(path)


def unregister(path: str) -> None:
    """Forget a registration (tests use this)."""
    _REGISTRY.pop(path, None)
