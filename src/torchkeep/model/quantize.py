"""torchkeep.quantize: int8 models through torchao, with a recipe save_model records and load_model re-applies.

The recipe (method, torchao version, which modules) is plain JSON in the model manifest; the int8 data
and scales are plain tensors in safetensors (:mod:`torchkeep.state.wrappers`). Loading builds the float
model, quantizes the same modules the same way, then copies the saved int8 data and scales over what that
produced: no pickle, and the reloaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn

from torchkeep.errors import CorruptCheckpointError, UnsupportedTensorError
from torchkeep.state.wrappers import is_wrapper, wrapper_classes

Method = Literal["int8_dynamic", "int8_weight_only"]
METHODS: dict[str, str] = {
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",  # int8 weights, activations quantized per call
    "int8_weight_only": "Int8WeightOnlyConfig",  # int8 weights, float activations
}
RECIPE_ATTRIBUTE = "_torchkeep_quantization"
TORCHAO_EXTRA = "pip install 'torchkeep[quant]'  (torchao)"


def _torchao() -> Any:
    # torchao logs a warning for each GPU kernel library it cannot load on a CPU-only machine, and torch one
    # about how torchao registers an enum: neither is the user's to act on.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
    except ImportError as exc:
        raise ImportError(f"torchkeep.quantize needs torchao: {TORCHAO_EXTRA}") from exc
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return tq


def quantize(
    model: nn.Module,
    method: Method = "int8_dynamic",
    *,
    modules: Sequence[type[nn.Module]] = (nn.Linear,),
    skip: Sequence[str] = (),
) -> nn.Module:
    """Quantize ``model`` in place with torchao and remember how, so :func:`save_model` can record it.

    Args:
        model: a float model (its Linear layers are quantized by default).
        method: ``"int8_dynamic"`` (int8 weights and activations) or ``"int8_weight_only"``.
        modules: the layer types to quantize.
        skip: names of modules to leave in float (e.g. ``["head"]``).

    Returns:
        The same model, quantized.

    Raises:
        ImportError: torchao is missing (``pip install 'torchkeep[quant]'``).
        ValueError: an unknown method, or a model that is already quantized.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if getattr(model, RECIPE_ATTRIBUTE, None) or any(is_wrapper(t) for t in model.state_dict().values()):
        raise ValueError("this model is already quantized; quantize the float model")
    kinds = tuple(modules)
    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds) and name not in skip and not any(name.startswith(s + ".") for s in skip)
    ]
    _apply(model, method, chosen)
    recipe = {
        "method": method,
        "library": "torchao",
        "version": _torchao_version(),
        "modules": chosen,
        "tensors": wrapper_classes(model.state_dict()),
    }
    setattr(model, RECIPE_ATTRIBUTE, recipe)
    return model


def _apply(model: nn.Module, method: str, names: Sequence[str]) -> None:
    tq = _torchao()
    wanted = set(names)
    keep: Callable[[nn.Module, str], bool] = lambda module, fqn: fqn in wanted  # noqa: E731
    tq.quantize_(model, getattr(tq, METHODS[method])(), filter_fn=keep)


def _torchao_version() -> str:
    import torchao

    return str(getattr(torchao, "__version__", "unknown"))


def recipe_of(model: nn.Module) -> dict[str, Any] | None:
    """The recipe to record for ``model``: None when it holds no quantized tensors."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    wrappers = wrapper_classes(model.state_dict())
    if recipe is None:
        if wrappers:
            first = next(iter(wrappers))
            raise UnsupportedTensorError(
                first,
                f"is a {wrappers[first]} from a quantization torchkeep did not record; quantize the float model "
                "with torchkeep.quantize(model, method=...) so save_model can rebuild it, or save its weights "
                "with torchkeep.save",
            )
        return None
    return dict(recipe)


def check_recipe(recipe: Any, where: str) -> dict[str, Any]:
    """A recipe read from a manifest, validated before anything is built from it."""
    if not isinstance(recipe, dict):
        raise CorruptCheckpointError(where, "'quantization' is not an object")
    method = recipe.get("method")
    if method not in METHODS:
        raise CorruptCheckpointError(where, f"'quantization' names method {method!r:.80}, not one of {list(METHODS)}")
    names = recipe.get("modules")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptCheckpointError(where, "'quantization.modules' is not a list of module names")
    return recipe


def requantize(model: nn.Module, recipe: dict[str, Any], where: str) -> None:
    """Quantize a freshly built float model the way the recipe says (its weights are overwritten next)."""
    present = {name for name, _ in model.named_modules()}
    unknown = [n for n in recipe["modules"] if n not in present]
    if unknown:
        raise CorruptCheckpointError(where, f"'quantization.modules' names modules the model lacks: {unknown[:5]}")
    _apply(model, recipe["method"], recipe["modules"])
    made, recorded = wrapper_classes(model.state_dict()), recipe.get("tensors")
    if isinstance(recorded, dict) and made != recorded:
        raise CorruptCheckpointError(
            where,
            f"re-applying {recipe['method']} with torchao {_torchao_version()} gives quantized tensors {made}, "
            f"but the folder holds {recorded} (written with torchao {recipe.get('version')}): install that version",
        )
    setattr(model, RECIPE_ATTRIBUTE, dict(recipe))
