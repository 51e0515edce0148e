"""Checks of saved optimizer state against a live optimizer, before anything is modified: the same
parameter groups, the same optimizer class (by hyperparameters, then by the slots each keeps), and state
tensors in their parameters' shapes. torch's own ``load_state_dict`` checks only the group sizes, and a
misfit then fails at the next ``step()``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkeep._warn import warn
from torchkeep.errors import CorruptCheckpointError, StateMismatchError
from torchkeep.state.keys import drop_compile_segments, unwrap_model

# Keys LR schedulers and SWA add to an optimizer's parameter groups, and the parameters themselves: not the
# optimizer's own hyperparameters.
_NOT_HYPERPARAMETERS = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"}
)


def _check_same_class(optimizer: Any, mine: Mapping[Any, Any], theirs: Mapping[Any, Any], path: str) -> None:
    """Saved parameter groups with hyperparameters this optimizer lacks, lacking some of its own, come from
    another optimizer class (SGD's momentum/nesterov against Adam's betas/eps). Keys on one side only are
    torch versions adding hyperparameters (``foreach``, ``fused``, ``decoupled_weight_decay``...): they load."""
    saved_only = sorted(str(k) for k in theirs if k not in mine and k not in _NOT_HYPERPARAMETERS)
    live_only = sorted(str(k) for k in mine if k not in theirs and k not in _NOT_HYPERPARAMETERS)
    if saved_only and live_only:
        raise StateMismatchError(
            path,
            f"the saved optimizer state is from another optimizer than this {type(optimizer).__name__}: its "
            f"parameter groups have {saved_only}, which this one lacks, and lack its {live_only}. Restore it "
            "into the optimizer class it was saved from, or leave optimizer= out to restore the rest; nothing "
            "changed",
        )


def check_optimizer(optimizer: Any, saved: Any, path: str) -> None:
    """The checks torch's load_state_dict makes, before anything is modified."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise CorruptCheckpointError(path, "optimizer state has no list of param_groups")
    if not isinstance(saved.get("state", {}), dict):
        raise CorruptCheckpointError(path, "optimizer 'state' is not a dict")
    saved_groups = saved["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
        raise CorruptCheckpointError(path, "optimizer param_groups are not dicts with a 'params' list")
    if len(groups) != len(saved_groups):
        raise StateMismatchError(
            path,
            f"the optimizer has {len(groups)} parameter groups, the checkpoint {len(saved_groups)}; nothing changed",
        )
    for mine, theirs in zip(groups, saved_groups, strict=True):
        _check_same_class(optimizer, mine, theirs, path)
    _check_slots(optimizer, saved, path)  # hyperparameters alike (Adamax's and Adam's): the slots tell them apart
    for i, (mine, theirs) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(mine["params"]) != len(theirs["params"]):
            raise StateMismatchError(
                path,
                f"optimizer parameter group {i} has {len(mine['params'])} parameters, "
                f"the checkpoint {len(theirs['params'])}; nothing changed",
            )


# The per-parameter state slots each torch.optim optimizer keeps in its parameter's shape (torch's sources);
# per-parameter scalars (step, eta, mu, mu_product) and factored statistics (Adafactor's row_var / col_var)
# are not. Found by the optimizer's own class: a custom optimizer, a subclass of a torch.optim one included,
# may keep other slots or the same names in other shapes, so it is not checked.
_PARAM_SHAPED_SLOTS: dict[str, frozenset[str]] = {
    "SGD": frozenset({"momentum_buffer"}),
    "Adam": frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "AdamW": frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "Adamax": frozenset({"exp_avg", "exp_inf"}),
    "NAdam": frozenset({"exp_avg", "exp_avg_sq"}),
    "RAdam": frozenset({"exp_avg", "exp_avg_sq"}),
    "SparseAdam": frozenset({"exp_avg", "exp_avg_sq"}),
    "Adadelta": frozenset({"square_avg", "acc_delta"}),
    "Adagrad": frozenset({"sum"}),
    "ASGD": frozenset({"ax"}),
    "RMSprop": frozenset({"square_avg", "momentum_buffer", "grad_avg"}),
    "Rprop": frozenset({"prev", "step_size"}),
    "Adafactor": frozenset({"variance"}),
    "Muon": frozenset({"momentum_buffer"}),
}


# The other per-parameter slots of each (scalars, factored statistics): with the shaped ones, every slot
# the class keeps. A saved slot outside them is another optimizer's (Adamax's exp_inf restored into Adam).
_OTHER_SLOTS: dict[str, frozenset[str]] = {
    "Adam": frozenset({"step"}),
    "AdamW": frozenset({"step"}),
    "Adamax": frozenset({"step"}),
    "NAdam": frozenset({"step", "mu_product"}),
    "RAdam": frozenset({"step"}),
    "SparseAdam": frozenset({"step"}),
    "Adadelta": frozenset({"step"}),
    "Adagrad": frozenset({"step"}),
    "ASGD": frozenset({"step", "eta", "mu"}),
    "RMSprop": frozenset({"step"}),
    "Rprop": frozenset({"step"}),
    "Adafactor": frozenset({"step", "row_var", "col_var"}),
}


def _builtin_class(optimizer: Any) -> str | None:
    """The torch.optim class ``optimizer`` is (exactly: not a subclass) when the slot tables know it; else None."""
    # A wrapper (Accelerate's AcceleratedOptimizer) keeps the real optimizer as .optimizer.
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        cls = type(candidate)  # the class itself: a subclass may keep slots of its own, in shapes of its own
        if cls.__module__.startswith("torch.optim.") and cls.__name__ in _PARAM_SHAPED_SLOTS:
            return cls.__name__
    return None


def _param_shaped_slots(optimizer: Any) -> frozenset[str]:
    """The state slots of ``optimizer`` that must have their parameter's shape; empty for other classes."""
    name = _builtin_class(optimizer)
    return _PARAM_SHAPED_SLOTS[name] if name is not None else frozenset()


def _check_slots(optimizer: Any, saved: Any, path: str) -> None:
    """Saved per-parameter slots that this torch.optim class never keeps come from another optimizer (its
    hyperparameters may look alike: Adamax's against Adam's): refused before anything is modified."""
    name = _builtin_class(optimizer)
    state = saved.get("state") if isinstance(saved, dict) else None
    if name is None or not isinstance(state, dict):
        return
    known = _PARAM_SHAPED_SLOTS[name] | _OTHER_SLOTS.get(name, frozenset())
    foreign = sorted({str(slot) for per_param in state.values() if isinstance(per_param, Mapping)
                      for slot in per_param if slot not in known})  # fmt: skip
    if foreign:
        raise StateMismatchError(
            path,
            f"the saved optimizer state is from another optimizer than this {type(optimizer).__name__}: it keeps "
            f"{foreign} for its parameters, which {name} never does. Restore it into the optimizer class it was "
            "saved from, or leave optimizer= out to restore the rest; nothing changed",
        )


def fit_state_shapes(optimizer: Any, saved: Any, path: str, model: Any, strict: bool) -> Any:
    """Check each saved parameter-shaped state tensor against the live parameter it will be paired with
    (as torch pairs them: the saved ``param_groups``' ids with the live groups' parameters, in order).

    ``strict``: a misfit raises StateMismatchError. Otherwise the saved state of those parameters is
    dropped (they start fresh, as a new parameter would) with a warning, and the rest is kept.
    """
    slots = _param_shaped_slots(optimizer)
    state = saved.get("state")
    if not slots or not isinstance(state, dict) or not state:
        return saved
    paired: dict[Any, tuple[Any, str]] = {}
    for g, (mine, theirs) in enumerate(zip(optimizer.param_groups, saved["param_groups"], strict=True)):
        for i, (param, saved_id) in enumerate(zip(mine["params"], theirs["params"], strict=True)):
            with contextlib.suppress(TypeError):  # an unhashable id pairs with nothing: torch's load refuses it
                paired[saved_id] = (param, f"group {g}, parameter {i}")
    names: dict[int, str] = {}
    if isinstance(model, nn.Module):
        names = {
            id(p): drop_compile_segments(n) for n, p in unwrap_model(model).named_parameters(remove_duplicate=False)
        }
    misfits: dict[Any, str] = {}
    for key, per_param in state.items():
        if key not in paired or not isinstance(per_param, Mapping):
            continue
        param, position = paired[key]
        for slot in sorted(slots & set(per_param)):
            value = per_param[slot]
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(param.shape):
                name = f"{names[id(param)]!r}" if id(param) in names else position
                misfits[key] = f"{name} (saved {slot} {list(value.shape)}, parameter {list(param.shape)})"
                break
    if not misfits:
        return saved
    listed = "; ".join(list(misfits.values())[:5]) + (f"; and {len(misfits) - 5} more" if len(misfits) > 5 else "")
    if strict:
        raise StateMismatchError(
            path,
            f"the saved optimizer state does not fit the shapes of the parameters it would be restored into: "
            f"{listed}. The optimizer must be built over the same parameters, in the same order, as the one "
            "saved; pass strict=False to restore the rest and start these afresh; nothing changed",
        )
    warn(
        f"{path}: the saved optimizer state of {len(misfits)} parameter(s) does not fit their shapes, so they "
        f"start with fresh optimizer state (the rest is restored): {listed}"
    )
    return {**saved, "state": {k: v for k, v in state.items() if k not in misfits}}
