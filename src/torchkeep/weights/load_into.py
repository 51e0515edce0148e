"""torchkeep.load_into: weights into a model, all-or-nothing, with a report."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkeep.errors import LoadMismatchError
from torchkeep.format.pickle.dcp import is_dcp_dir
from torchkeep.state import torch_ao
from torchkeep.state.copies import copy_into_live
from torchkeep.state.devices import MapLocation
from torchkeep.state.keys import (
    Remap,
    compile_remap,
    drop_compile_segments,
    is_extra_state,
    strip_wrapper_prefix,
    unwrap_model,
)
from torchkeep.state.wrappers import flatten_wrappers
from torchkeep.storage.remote import is_url
from torchkeep.weights.files import resolve
from torchkeep.weights.load import is_training_checkpoint, load, placed, read_weights
from torchkeep.weights.report import LoadReport, Mismatch


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def plan_load(
    model_state: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], *, source_name: str = ""
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Match source tensors to the model's keys; nothing is modified.

    Returns the report and, for every loadable key, the tensor to copy in (in the model's naming).
    Model keys that are the same tensor as a loaded key (tied weights) count as loaded.
    """
    report = LoadReport(source=source_name)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        target = model_state.get(key)
        if target is None:
            report.unexpected.append(key)
            continue
        if tuple(target.shape) != tuple(value.shape) or _kind(target.dtype) != _kind(value.dtype):
            report.mismatched.append(Mismatch(key, tuple(target.shape), target.dtype, tuple(value.shape), value.dtype))
            continue
        to_load[key] = value
        report.loaded.append(key)
        if target.dtype != value.dtype:
            report.cast.append(key)
    loaded_ids = {id(model_state[k]) for k in to_load}
    matched = set(to_load) | {m.key for m in report.mismatched}
    for key, target in model_state.items():
        if key in matched:
            continue
        if id(target) in loaded_ids:
            report.loaded.append(key)  # tied to a loaded tensor: it already has its value
        else:
            report.missing.append(key)
    return report, to_load


def load_into(
    model: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    remap: Remap | None = None,
    map_location: MapLocation = None,
    verify: bool = True,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> LoadReport:
    """Load weights into ``model`` in place and report what happened, key by key.

    ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile) prefixes are handled on
    both sides. With ``strict=True`` any missing, unexpected or mismatched key raises
    :class:`LoadMismatchError` before anything is touched; with ``strict=False`` every key whose
    name and shape match is loaded and the rest stay as they were (transfer learning).
    The model's train/eval mode is not changed.

    Args:
        model: the module to fill (may be wrapped in DataParallel / DDP / torch.compile).
        source: a path torchkeep.load reads, or a state dict.
        strict: all-or-nothing (True) or load what matches (False).
        remap: a dict of regex -> replacement applied in order to source keys, or a callable.
        map_location: where to read tensors first (default: CPU, then copied to the model's device).
        verify: check checksums when reading from a path.
        trusted: allow full unpickling of a pickle-based file you vouch for (runs its code).
        storage_options: for a URL source (``s3://...``): passed to fsspec.
        key: for a checkpoint dict holding several sets of weights, which (as :func:`torchkeep.load`
            takes it: ``key="state_dict_ema"``, or ``outer/inner``).

    Returns:
        The :class:`LoadReport`.

    Raises:
        LoadMismatchError: strict load with any problem; the model is unchanged. ``.report`` says why.
    """
    if isinstance(source, Mapping):
        raw = dict(source)
        source_name = "state dict"
    else:
        source_name = os.fspath(source)
        if is_url(source) or is_dcp_dir(source) or is_training_checkpoint(source):  # as load reads them
            raw = load(
                source,
                map_location=map_location or "cpu",
                verify=verify,
                trusted=trusted,
                key=key,
                storage_options=storage_options,
            )
        else:
            # Straight from the page cache into the model: the file is mapped, every checksum is checked
            # on the mapped pages first (so a strict load stays all-or-nothing), then each tensor is copied
            # once, into the parameter that already exists. No full copy of the state is ever allocated
            # (unless map_location asks for the tensors somewhere first).
            extra: dict[str, Any] = {}  # modules' get_extra_state() values a torch.save file holds
            raw = read_weights(resolve(source), mmap=True, verify=verify, trusted=trusted, key=key, extra_state=extra)
            if map_location is not None:
                raw = placed(raw, map_location)
            raw = {**raw, **extra}
    pending = match_model(model, raw, remap=remap, source_name=source_name)
    if strict and not pending.report.ok:
        raise LoadMismatchError(pending.report, source_name)
    pending.apply()
    return pending.report


class PendingLoad:
    """A matched, not yet applied load into one model: check ``report``, then ``apply()``."""

    def __init__(
        self,
        target: nn.Module,
        report: LoadReport,
        to_load: dict[str, torch.Tensor],
        wrapper_parts: Mapping[str, torch.Tensor] | None = None,
        live_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.target = target
        self.report = report
        self.to_load = to_load
        self.wrapper_parts = dict(wrapper_parts or {})  # key -> the inner tensor of a torchao weight
        self.live_state = live_state  # target.state_dict(keep_vars=True), as matched

    def apply(self) -> None:
        # Modules that load the default way get plain copies (state/copies.py); the others go through
        # load_state_dict so their hooks run. Parts of wrapper tensors (torchao's quantized weights) have no
        # key of their own there and are copied in place.
        to_load = copy.copy(self.to_load)  # keeps the _metadata torch.ao modules' load hooks read (a repack's)
        with torch.no_grad():
            for key in [k for k in to_load if k in self.wrapper_parts]:
                self.wrapper_parts[key].copy_(to_load.pop(key))
        to_load = copy_into_live(
            self.target, to_load, self.live_state
        )  # the plain parameters and buffers, on a few threads
        if not to_load:
            return
        result = self.target.load_state_dict(to_load, strict=False)
        if result.unexpected_keys:  # cannot happen after plan_load; guard the contract anyway
            raise RuntimeError(f"load_state_dict rejected keys {result.unexpected_keys}")


def match_model(
    model: nn.Module, raw: Mapping[str, torch.Tensor], *, remap: Remap | None = None, source_name: str = ""
) -> PendingLoad:
    """Match a state dict to a (possibly wrapped) model's keys, handling prefixes; touches nothing."""
    target = unwrap_model(model)
    own_all = target.state_dict(keep_vars=True)
    # Modules' get_extra_state() values are opaque (any type, any shape): matched by key only, then given to
    # load_state_dict, which calls set_extra_state.
    own_extra = {drop_compile_segments(k): k for k in own_all if is_extra_state(k)}
    own_raw = copy.copy(own_all)  # keeps the _metadata torch.ao modules' load hooks read
    for key in own_extra.values():
        del own_raw[key]
    quantized_ao = torch_ao.has_entries(own_raw)  # torch.ao modules: their quantized entries as plain parts
    own_state = flatten_wrappers(torch_ao.flatten(own_raw).tensors if quantized_ao else own_raw)
    wrapper_parts = {k: v for k, v in flatten_wrappers(own_raw).items() if k not in own_raw}
    model_keys = {drop_compile_segments(k): k for k in own_state}
    model_state = {clean: own_state[orig] for clean, orig in model_keys.items()}

    cleaned = {drop_compile_segments(k): v for k, v in raw.items()}
    strip = strip_wrapper_prefix(cleaned, set(model_state) | set(own_extra))
    rename = compile_remap(remap)
    renamed: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in cleaned.items():
        new_key = rename(strip(key))
        if new_key in renamed or new_key in extra:
            raise ValueError(f"remap sends two source keys to {new_key!r}")
        if is_extra_state(new_key):
            extra[new_key] = value
        else:
            renamed[new_key] = value
    report, to_load = plan_load(model_state, renamed, source_name=source_name)
    pending = {model_keys[k]: v for k, v in to_load.items()}
    if quantized_ao:
        pending = _repack_torch_ao(target, own_raw, report, pending)
    for key, value in extra.items():
        if key in own_extra:
            # the module keeps what it is given: a private copy, never a view of a mapped file
            pending[own_extra[key]] = value.clone() if isinstance(value, torch.Tensor) else value
            report.loaded.append(key)
        else:
            report.unexpected.append(key)
    report.missing.extend(key for key in own_extra if key not in extra)
    return PendingLoad(target, report, pending, wrapper_parts, own_raw)


def _repack_torch_ao(
    target: nn.Module, own_raw: Mapping[str, Any], report: LoadReport, to_load: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Integer parts must have the model's exact type (int8 is not uint8); then the parts become entries again."""
    exact = torch_ao.exact_int_types(own_raw)
    for key in [k for k in to_load if k in exact and to_load[k].dtype != exact[k]]:
        value, clean = to_load.pop(key), drop_compile_segments(key)
        report.loaded.remove(clean)
        if clean in report.cast:
            report.cast.remove(clean)
        report.mismatched.append(Mismatch(clean, tuple(value.shape), exact[key], tuple(value.shape), value.dtype))
    return torch_ao.repack(target, own_raw, to_load)
