"""Key names: unwrapping DataParallel / DDP / torch.compile, prefix cleanup, user remaps.

One place handles ``module.`` and ``_orig_mod.`` so that every path (save, load_into, later
checkpoints) agrees on names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from torch import nn

WRAPPER_PREFIX = "module."
COMPILE_SEGMENT = "_orig_mod."

Remap = Mapping[str, str] | Callable[[str], str]
EXTRA_STATE_SUFFIX = "_extra_state"  # torch's key for a module's get_extra_state() (nn.Module._EXTRA_STATE_KEY_SUFFIX)


def is_extra_state(key: object) -> bool:
    """A state dict key holding a module's ``get_extra_state()``: any value, restored by ``set_extra_state``."""
    return isinstance(key, str) and (key == EXTRA_STATE_SUFFIX or key.endswith("." + EXTRA_STATE_SUFFIX))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under any DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def drop_compile_segments(key: str) -> str:
    """``enc._orig_mod.fc.weight`` -> ``enc.fc.weight`` (torch.compile'd submodules)."""
    if COMPILE_SEGMENT not in key:
        return key
    if key.startswith(COMPILE_SEGMENT):
        key = key[len(COMPILE_SEGMENT) :]
    return key.replace("." + COMPILE_SEGMENT, ".")


def strip_wrapper_prefix(keys: Iterable[str], wanted: set[str]) -> Callable[[str], str]:
    """How to rename file keys so they best match ``wanted`` (the model's keys).

    ``module.`` is stripped (repeatedly, for nested wrappers) only when every key has it and
    stripping matches more of the model's keys: a model may own a submodule named ``module``.
    """
    keys = list(keys)
    depth = 0
    best_depth, best_hits = 0, len(wanted.intersection(keys))
    prefix = ""
    while keys and all(k.startswith(prefix + WRAPPER_PREFIX) for k in keys):
        depth += 1
        prefix += WRAPPER_PREFIX
        hits = sum(1 for k in keys if k[len(prefix) :] in wanted)
        if hits > best_hits:
            best_depth, best_hits = depth, hits
    cut = len(WRAPPER_PREFIX) * best_depth
    return lambda key: key[cut:]


def compile_remap(remap: Remap | None) -> Callable[[str], str]:
    """A dict of regex -> replacement (applied in order) or a callable, as one function."""
    if remap is None:
        return lambda key: key
    if callable(remap):
        return remap
    if not isinstance(remap, Mapping):
        raise TypeError(f"remap must be a dict of regex -> replacement or a callable, not {type(remap).__name__}")
    rules = [(re.compile(pattern), replacement) for pattern, replacement in remap.items()]

    def apply(key: str) -> str:
        for pattern, replacement in rules:
            key = pattern.sub(replacement, key)
        return key

    return apply
