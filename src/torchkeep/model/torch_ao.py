"""save_model / load_model of torch.ao.quantization models: the recipe the manifest records, and re-applying it.

The manifest key ``torch_ao_quantization`` (docs/FORMAT.md) says which modules torch.ao quantized, how
(``dynamic``: ``quantize_dynamic``; ``static``: prepare / convert), each one's weight scheme, and which
modules became ``nn.Identity`` (fused into a neighbour). ``load_model`` builds the float model (its recorded
structure, or the class and config), quantizes the same modules the same way with torch.ao itself (a static
model's observers see no data: every scale they would compute is overwritten next), checks that this made
exactly the recorded modules and weight schemes, and loads the saved integers and scales with
:func:`~torchkeep.load_into`. Only torch's own classes are built, from fixed tables; nothing a file names
is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.model import structure
from torchkeep.state import torch_ao
from torchkeep.state.devices import MapLocation

MANIFEST_KEY = "torch_ao_quantization"
RECIPE_VERSION = 1
MODES = ("dynamic", "static")
_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_STUBS = ("QuantStub", "DeQuantStub")
_WEIGHT_DTYPES = ("qint8", "quint8", "qint32")
_ACTIVATION_DTYPES = ("quint8", "qint8")


def _tq() -> Any:
    """torch.ao.quantization (untyped), imported when used: importing it warns that it is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        return importlib.import_module("torch.ao.quantization")


def _type_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_ao(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.")


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_QUANTIZED_PACKAGES)


def _is_dynamic(module: nn.Module) -> bool:
    return ".dynamic." in type(module).__module__


def _ao_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost torch.ao modules (a quantized Linear, not its ``_packed_params``), by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if _is_ao(module) and not any(name.startswith(f"{p}.") or p == "" for p in found):
            found[name] = module
    return found


def _weight_scheme(module: nn.Module) -> dict[str, Any] | None:
    """How the module's weight is quantized (``{"dtype", "qscheme", "axis"?}``), from its state's entries."""
    entries = torch_ao.flatten(module.state_dict()).entries
    for described in entries.values():
        if described["kind"] == "packed":
            weight: dict[str, Any] = described["weight"]
            return weight if weight["kind"] == "quantized" else {"kind": "tensor"}
        if described["kind"] == "quantized":
            return described
    return None


def _module_record(module: nn.Module) -> dict[str, Any]:
    record: dict[str, Any] = {"type": _type_name(module)}
    weight = _weight_scheme(module)
    if weight is not None and weight["kind"] == "tensor":  # float16 dynamic: the packed dtype says which
        packed_dtype = getattr(getattr(module, "_packed_params", None), "dtype", torch.float16)
        record["weight"] = {"dtype": str(packed_dtype).removeprefix("torch.")}
    elif weight is not None:
        record["weight"] = {k: v for k, v in weight.items() if k != "kind"}
    dtype = getattr(module, "dtype", None)
    if type(module).__name__ == "Quantize" and isinstance(dtype, torch.dtype):
        record["dtype"] = str(dtype).removeprefix("torch.")
    return record


def recipe_of(model: nn.Module, *, stock: bool) -> dict[str, Any] | None:
    """The recipe for a model holding torch.ao quantized modules (None for any other model).

    Args:
        model: the quantized model.
        stock: the model has no config and class of its own: record its float structure (under
            ``"structure"``, for the manifest), from torch's own layers and torch.ao's stubs only.

    Raises:
        ValueError: quantized modules torchkeep cannot re-create, a mix of dynamic and static, or (stock)
            a model whose float structure cannot be recorded; the message says what to do.
    """
    found = _ao_modules(model)
    quantized = {name: m for name, m in found.items() if _is_quantized(m)}
    if not quantized:
        return None
    torch_ao.flatten(model.state_dict())  # an LSTM's script objects and the like: the typed error, first
    dynamic = {_is_dynamic(m) for m in quantized.values()}
    if len(dynamic) > 1:
        raise ValueError(
            "the model mixes dynamically and statically quantized modules; save_model records one torch.ao "
            "recipe: save its weights with torchkeep.save and load them with load_into into a model you "
            "quantized the same way"
        )
    recipe: dict[str, Any] = {
        "version": RECIPE_VERSION,
        "mode": "dynamic" if dynamic.pop() else "static",
        "library": "torch.ao.quantization",
        "torch": torch.__version__,
        "engine": torch.backends.quantized.engine,
        "modules": {name: _module_record(m) for name, m in found.items()},
        "identity": [name for name, m in model.named_modules() if type(m) is nn.Identity],
    }
    if stock:
        described = float_structure(model, fused=recipe["mode"] == "static")
        if described is None:
            raise ValueError(
                f"cannot record how to rebuild {type(model).__qualname__} before torch.ao quantized it (a fused "
                "layer, or a quantized layer other than Linear, Conv1d/2d/3d and the stubs): save_model the "
                "model's class with a config (pass config=..., give it "
                "get_config()/from_config(), or @torchkeep.register_model), or save its weights with "
                "torchkeep.save and load_into a model you quantized the same way"
            )
        recipe["structure"] = described
        _check_rebuilds(model, recipe)
    return recipe


# -- the float structure of a stock model -----------------------------------------------------------------

_FLOAT_OF = {
    "torch.ao.nn.quantized.dynamic.modules.linear.Linear": "Linear",
    "torch.ao.nn.quantized.modules.linear.Linear": "Linear",
    "torch.ao.nn.quantized.modules.conv.Conv1d": "Conv1d",
    "torch.ao.nn.quantized.modules.conv.Conv2d": "Conv2d",
    "torch.ao.nn.quantized.modules.conv.Conv3d": "Conv3d",
    "torch.ao.nn.quantized.modules.Quantize": "QuantStub",
    "torch.ao.nn.quantized.modules.DeQuantize": "DeQuantStub",
}


def _float_args(float_cls: type[nn.Module], module: nn.Module) -> dict[str, Any] | None:
    """The float layer's constructor arguments, read from the quantized module's attributes."""
    args: dict[str, Any] = {}
    for name, param in _parameters(float_cls).items():
        if name == "bias":
            weight_bias = getattr(module, "_weight_bias", None)
            args["bias"] = callable(weight_bias) and weight_bias()[1] is not None
        elif hasattr(module, name):
            value = getattr(module, name)
            if isinstance(value, tuple):
                value = list(value)
            if not (value is None or isinstance(value, (bool, int, float, str, list))):
                return None
            args[name] = value
        elif param.default is param.empty:
            return None
    return args


def _parameters(cls: type[nn.Module]) -> dict[str, Any]:
    skip = {"self", "device", "dtype"}
    return {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in skip and not name.startswith("_") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def float_structure(module: nn.Module, *, fused: bool = True) -> dict[str, Any] | None:
    """:func:`structure.describe` of the model before quantization, or None if it cannot be known.

    With ``fused`` (static quantization), an ``nn.Identity`` may stand for a layer fused into its
    neighbour, whose float form is lost: such a model cannot be described.
    """
    float_name = _FLOAT_OF.get(_type_name(module))
    if float_name in _STUBS:
        return {"type": float_name}
    if float_name is not None:
        float_cls = structure.stock_class(float_name)
        args = _float_args(float_cls, module) if float_cls is not None else None
        return None if args is None else {"type": float_name, "args": args}
    if isinstance(module, structure.CONTAINERS) and structure.stock_class(type(module).__name__) is type(module):
        children = {}
        for name, child in module.named_children():
            described = float_structure(child, fused=fused)
            if described is None:
                return None
            children[name] = described
        return {"type": type(module).__name__, "children": children}
    if type(module) is nn.Identity and fused:
        return None
    return structure.describe(module)


def rebuild_structure(described: Any) -> nn.Module:
    """:func:`structure.rebuild`, where torch.ao's QuantStub and DeQuantStub may also appear."""
    tq = _tq()

    if not isinstance(described, dict):
        raise ValueError("malformed module structure")
    kind = described.get("type")
    if kind in _STUBS:
        stub: nn.Module = tq.QuantStub() if kind == "QuantStub" else tq.DeQuantStub()
        return stub
    if kind in ("Sequential", "ModuleList", "ModuleDict"):
        children = described.get("children") or {}
        if not isinstance(children, dict):
            raise ValueError("malformed module structure")
        rebuilt = {str(k): rebuild_structure(v) for k, v in children.items()}
        shell = structure.rebuild({"type": kind, "children": {}})
        for name, child in rebuilt.items():
            if isinstance(shell, nn.ModuleList):
                shell.append(child)
            else:
                shell.add_module(name, child)
        return shell
    return structure.rebuild(described)


# -- re-applying the recipe ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao's deprecation notices, and its observers' 'no data seen' (their scales are overwritten next)."""
    with warnings.catch_warnings(), torch_ao.quiet_creation():
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"must run observer before calling calculate_qparams", UserWarning)
        warnings.filterwarnings("ignore", r"Please use quant_min and quant_max", UserWarning)
        yield


def check_recipe(recipe: Any, where: str) -> dict[str, Any]:
    """A recipe read from a manifest, validated before anything is built from it."""

    def expect(ok: bool, problem: str) -> None:
        if not ok:
            raise CorruptCheckpointError(where, f"'{MANIFEST_KEY}' {problem}")

    expect(isinstance(recipe, dict), "is not an object")
    expect(type(recipe.get("version")) is int and 1 <= recipe["version"] <= RECIPE_VERSION, "has a bad version")
    expect(recipe.get("mode") in MODES, f"names mode {recipe.get('mode')!r:.40}, not one of {list(MODES)}")
    modules, identity = recipe.get("modules"), recipe.get("identity", [])
    expect(isinstance(modules, dict) and bool(modules), "'modules' is not an object of module records")
    expect(isinstance(identity, list) and all(isinstance(n, str) for n in identity), "'identity' is not names")
    for name, record in modules.items():
        expect(isinstance(record, dict) and isinstance(record.get("type"), str), f"module {name!r:.80} is malformed")
        weight = record.get("weight")
        if weight is not None:
            dtypes = (*_WEIGHT_DTYPES, "float16")
            expect(isinstance(weight, dict) and weight.get("dtype") in dtypes, f"module {name!r:.80}: bad weight")
            expect(weight.get("qscheme", "per_tensor_affine") in torch_ao.QSCHEMES.values(), "names a bad qscheme")
            axis = weight.get("axis", 0)
            expect(type(axis) is int and 0 <= axis < 8, f"module {name!r:.80}: bad axis")
        expect(record.get("dtype", "quint8") in _ACTIVATION_DTYPES, f"module {name!r:.80}: bad activation dtype")
    return dict(recipe)


_DTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "qint32": torch.qint32}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES[name]  # validated by check_recipe


def _dynamic_qconfig(record: dict[str, Any]) -> Any:
    tq = _tq()

    weight = record.get("weight") or {}
    if weight.get("dtype") == "float16":
        return tq.float16_dynamic_qconfig
    if weight.get("qscheme", "per_tensor_affine") != "per_tensor_affine":
        return tq.per_channel_dynamic_qconfig
    return tq.default_dynamic_qconfig


def _static_qconfig(record: dict[str, Any]) -> Any:
    tq = _tq()

    activation = tq.MinMaxObserver.with_args(dtype=_dtype(record.get("dtype", "quint8")))
    weight = record.get("weight") or {}
    weight_dtype = _dtype(weight.get("dtype", "qint8")) if weight.get("dtype") in _WEIGHT_DTYPES else torch.qint8
    if weight.get("qscheme", "per_tensor_affine") == "per_tensor_affine":
        observer = tq.MinMaxObserver.with_args(dtype=weight_dtype, qscheme=torch.per_tensor_symmetric)
    else:
        observer = tq.PerChannelMinMaxObserver.with_args(
            dtype=weight_dtype, qscheme=torch.per_channel_symmetric, ch_axis=weight.get("axis", 0)
        )
    return tq.QConfig(activation=activation, weight=observer)


def _fusions(model: nn.Module, recipe: dict[str, Any], where: str) -> list[list[str]]:
    """Groups to fuse: a layer that became ``nn.Identity`` joins the nearest quantized sibling before it."""
    groups: dict[str, list[str]] = {}
    recorded = recipe["modules"]
    for name in recipe["identity"]:
        if type(model.get_submodule(name)) is nn.Identity:
            continue  # an Identity in the float model too
        parent_name, _, child = name.rpartition(".")
        siblings = [n for n, _ in model.get_submodule(parent_name).named_children()]
        head = next(
            (s for s in reversed(siblings[: siblings.index(child)]) if _join(parent_name, s) in recorded),
            None,
        )
        if head is None:
            raise CorruptCheckpointError(where, f"cannot tell which layer {name!r} was fused into")
        groups.setdefault(_join(parent_name, head), [_join(parent_name, head)]).append(name)
    return list(groups.values())


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def requantize(model: nn.Module, recipe: dict[str, Any], where: str) -> None:
    """Quantize a freshly built float model as the recipe says, and check the result matches it."""
    tq = _tq()

    quantized = {n: r for n, r in recipe["modules"].items() if r["type"].startswith(_QUANTIZED_PACKAGES)}
    try:
        with _quiet():
            if recipe["mode"] == "dynamic":
                spec = {name: _dynamic_qconfig(record) for name, record in quantized.items()}
                tq.quantize_dynamic(model, spec, inplace=True)
            else:
                model.eval()
                groups = _fusions(model, recipe, where)
                if groups:
                    tq.fuse_modules(model, groups, inplace=True)
                for name, record in quantized.items():
                    model.get_submodule(name).qconfig = _static_qconfig(record)
                tq.prepare(model, inplace=True)
                tq.convert(model, inplace=True)
    except (AttributeError, KeyError, ValueError, TypeError, RuntimeError, AssertionError, IndexError) as exc:
        raise CorruptCheckpointError(
            where, f"cannot quantize the rebuilt model as recorded ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    made = {name: _module_record(m) for name, m in _ao_modules(model).items()}
    if made != recipe["modules"]:
        raise CorruptCheckpointError(
            where,
            f"re-applying the torch.ao {recipe['mode']} quantization with torch {torch.__version__} gives other "
            f"modules than the folder records ({'; '.join(_differences(made, recipe)[:3])}; written with torch "
            f"{recipe.get('torch')}). Quantize the model as you did before and use torchkeep.load_into",
        )


def _differences(made: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    recorded = recipe["modules"]
    out = []
    for name in sorted(set(made) | set(recorded)):
        if made.get(name) != recorded.get(name):
            out.append(f"{name or '<root>'}: recorded {recorded.get(name)}, made {made.get(name)}")
    return out


def _check_rebuilds(model: nn.Module, recipe: dict[str, Any]) -> None:
    """At save: the recorded float structure, quantized again, has the model's modules and state layout."""
    try:
        rebuilt = rebuild_structure(recipe["structure"])
        requantize(rebuilt, recipe, "the recipe")
    except (CorruptCheckpointError, ValueError, TypeError) as exc:
        raise ValueError(
            f"cannot record how to rebuild this torch.ao quantized model ({exc}); save_model its class with a "
            "config, or save its weights with torchkeep.save and load_into a model quantized the same way"
        ) from exc
    ours, theirs = torch_ao.flatten(model.state_dict()).tensors, torch_ao.flatten(rebuilt.state_dict()).tensors
    if list(ours) != list(theirs) or any(ours[k].shape != theirs[k].shape for k in ours):
        raise ValueError(
            "the torch.ao quantized model's recorded structure does not rebuild its state layout; save_model its "
            "class with a config, or save its weights with torchkeep.save and use load_into"
        )


def load_quantized(
    root: Path,
    manifest: dict[str, Any],
    construct: Callable[[], nn.Module],
    map_location: MapLocation,
    where: str,
    dtype: torch.dtype | None,
    strict: bool,
    eval: bool,
) -> nn.Module:
    """load_model's path for a folder whose manifest holds a torch.ao recipe."""
    from torchkeep.weights.load_into import load_into

    recipe = check_recipe(manifest[MANIFEST_KEY], where)
    if dtype is not None:
        raise ValueError("dtype= cannot cast a torch.ao quantized model; load it as saved")
    if map_location not in (None, "cpu") and str(map_location) != "cpu":
        raise ValueError("torch.ao quantized models run on the CPU only: leave map_location as 'cpu'")
    described = manifest.get("structure")
    try:
        model = rebuild_structure(described) if described else construct()
    except TorchkeepError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptCheckpointError(where, f"cannot rebuild the float model: {exc}") from exc
    requantize(model, recipe, where)
    load_into(model, root, strict=strict, map_location="cpu")  # the saved parts over what re-quantizing made
    return model.eval() if eval else model.train()
