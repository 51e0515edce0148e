"""Any nested training state <-> a JSON tree plus named tensors. No pickle.

Supported, and restored with their exact types: None, bool, int, float (nan, inf and -0.0
included), str, list, tuple, dict (keys of any supported scalar type), ``collections.OrderedDict``,
``Counter`` and ``defaultdict`` (whose ``default_factory`` is None or a builtin type: list, dict,
set, int, float, str, bool, tuple, bytes), tensors (any device, 0-dim included), NumPy arrays and
scalars, torch.Size, torch.dtype and torch.device. Other subclasses of dict and list (a config's
``EasyDict``) are stored as plain dicts and lists. Anything else raises
:class:`UnsupportedValueError` naming where it was found (``optimizer.param_groups[0].fn``).

JSON forms (the manifest schema, docs/FORMAT.md): plain JSON for null/bool/int/str/finite float
and for lists; a dict whose keys are all plain strings not starting with ``$`` is a JSON object;
every other value is an object with one ``$``-tagged key.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError, TorchkeepError, UnsupportedValueError
from torchkeep.format.dtypes import dtype_name

Json = Any
# Tags of dict types that keep their class; a manifest holding any is version 4 (an older reader says to upgrade).
COLLECTION_TAGS = ("$odict", "$counter", "$defaultdict")
TAGS = (
    "$tensor",
    "$ndarray",
    "$npscalar",
    "$float",
    "$tuple",
    "$dict",
    "$size",
    "$dtype",
    "$device",
    "$dcp",
    *COLLECTION_TAGS,
)
# The default factories a defaultdict may have: builtin types, named in the manifest, never imported from it.
DEFAULT_FACTORIES: dict[str, type] = {
    t.__name__: t for t in (list, dict, set, frozenset, int, float, complex, str, bool, tuple, bytes)
}


class Encoder:
    """Turns values into JSON, collecting tensors under unique, readable names."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _name(self, where: str) -> str:
        name = where or "value"
        if name in self.tensors:
            n = 2
            while f"{name}#{n}" in self.tensors:
                n += 1
            name = f"{name}#{n}"
        return name

    def encode(self, value: Any, where: str, depth: int = 0) -> Json:
        # Exact types: subclasses (np.str_, np.float64, IntEnum) must keep their own type.
        if value is None or type(value) in (bool, str, int):
            return value
        if depth > _config.MAX_VALUE_DEPTH:
            raise UnsupportedValueError(
                where,
                f"nests more than {_config.MAX_VALUE_DEPTH} levels deep (or refers to itself); "
                "store a flatter structure",
            )
        depth += 1
        if type(value) is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return self._tensor(value, where)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, where)
        if isinstance(value, np.generic):
            return self._npscalar(value, where)
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if isinstance(value, torch.dtype):
            return {"$dtype": dtype_name(value)}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, tuple) and type(value) is tuple:
            return {"$tuple": [self.encode(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]
        if type(value) in (collections.OrderedDict, collections.Counter, collections.defaultdict):
            return self._collection(value, where, depth)
        if isinstance(value, dict):
            return self._dict(value, where, depth)
        raise UnsupportedValueError(
            where,
            f"is a {type(value).__module__}.{type(value).__qualname__}, which cannot be stored without pickle; "
            "store plain data (numbers, strings, lists, dicts, tensors, arrays) instead",
        )

    def _dict(self, value: dict[Any, Any], where: str, depth: int) -> Json:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: self.encode(v, f"{where}.{k}" if where else k, depth) for k, v in value.items()}
        return {"$dict": self._pairs(value, where, depth)}

    def _pairs(self, value: dict[Any, Any], where: str, depth: int) -> list[Json]:
        items = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise UnsupportedValueError(where, f"has a key of type {type(k).__name__}, which cannot be stored")
            items.append([self.encode(k, f"{where}<key>", depth), self.encode(v, f"{where}[{k!r}]", depth)])
        return items

    def _collection(self, value: dict[Any, Any], where: str, depth: int) -> Json:
        if type(value) is collections.OrderedDict:
            return {"$odict": self._pairs(value, where, depth)}
        if type(value) is collections.Counter:
            return {"$counter": self._pairs(value, where, depth)}
        factory = value.default_factory  # type: ignore[attr-defined]
        if factory is not None and DEFAULT_FACTORIES.get(getattr(factory, "__name__", "")) is not factory:
            raise UnsupportedValueError(
                where,
                f"is a defaultdict whose default_factory is {factory!r}, which cannot be stored without pickle; "
                "use a builtin type (defaultdict(list), defaultdict(int)...) or store dict(...) and rebuild it",
            )
        return {
            "$defaultdict": self._pairs(value, where, depth),
            "factory": None if factory is None else factory.__name__,
        }

    def _tensor(self, value: torch.Tensor, where: str) -> Json:
        name = self._name(where)
        self.tensors[name] = value
        out: dict[str, Any] = {"$tensor": name}
        if value.device.type != "cpu":
            out["device"] = str(value.device)
        if value.requires_grad:
            out["requires_grad"] = True
        return out

    def _ndarray(self, value: np.ndarray[Any, Any], where: str) -> Json:
        if value.dtype.hasobject or value.dtype.kind not in "biufc":
            raise UnsupportedValueError(where, f"is a NumPy array of dtype {value.dtype}, which cannot be stored")
        native = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False))
        try:
            tensor = torch.from_numpy(native)
        except TypeError as exc:
            raise UnsupportedValueError(where, f"NumPy dtype {value.dtype} has no torch equivalent") from exc
        name = self._name(where)
        self.tensors[name] = tensor
        return {"$ndarray": name, "dtype": value.dtype.str}

    def _npscalar(self, value: np.generic, where: str) -> Json:
        if value.dtype.kind not in "biufcU":
            raise UnsupportedValueError(where, f"is a NumPy {value.dtype} scalar, which cannot be stored")
        item = value.item()
        if isinstance(item, complex):
            payload: Json = [self.encode(item.real, where), self.encode(item.imag, where)]
        else:
            payload = self.encode(item, where)
        return {"$npscalar": value.dtype.str, "value": payload}


class Decoder:
    """The inverse of :class:`Encoder`, given the tensors read back."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        source: str,
        place: Callable[[torch.Tensor, str], torch.Tensor],
        sharded: Callable[[str], Any] | None = None,
    ) -> None:
        self.tensors = tensors
        self.source = source
        self.place = place
        self.sharded = sharded  # resolves a {"$dcp": key} node: a tensor saved sharded, through DCP

    def _bad(self, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.source, f"manifest: {problem}")

    def decode(self, node: Json) -> Any:
        """The value a manifest node stands for; a malformed node is CorruptCheckpointError, never another error."""
        try:
            return self._decode(node)
        except TorchkeepError:  # already typed (a damaged node, an unavailable device)
            raise
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError, RecursionError) as exc:
            raise self._bad(f"malformed value: {type(exc).__name__}: {exc}") from exc

    def _decode(self, node: Json) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self._decode(v) for v in node]
        if not isinstance(node, dict):
            raise self._bad(f"unexpected JSON value {node!r:.80}")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self._decode(v) for k, v in node.items()}
        if len(tags) > 1:
            raise self._bad(f"a value with two tags {tags[:2]!r:.80}")
        tag = tags[0]
        handler = getattr(self, "_" + tag[1:], None)
        if tag not in TAGS or handler is None:
            raise self._bad(f"unknown tag {tag!r:.80}")
        return handler(node)

    def _lookup(self, name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in self.tensors:
            raise self._bad(f"refers to tensor {name!r:.80}, which the tensor file lacks")
        return self.tensors[name]

    def _dcp(self, node: dict[str, Any]) -> Any:
        key = node["$dcp"]
        if not isinstance(key, str):
            raise self._bad(f"$dcp {key!r:.80} is not a string")
        if self.sharded is None:
            raise self._bad(f"refers to sharded tensor {key!r:.80}, but this checkpoint has no sharded tensors")
        return self.sharded(key)

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        device = node.get("device", "cpu")
        if not isinstance(device, str):
            raise self._bad(f"tensor device {device!r:.80} is not a string")
        tensor = self.place(self._lookup(node["$tensor"]), device)
        if node.get("requires_grad") and (tensor.is_floating_point() or tensor.is_complex()):
            tensor.requires_grad_(True)
        return tensor

    def _numeric_dtype(self, spec: Any, kinds: str) -> np.dtype[Any]:
        dtype = np.dtype(spec) if isinstance(spec, str) else None
        if dtype is None or dtype.kind not in kinds:
            raise self._bad(f"dtype {spec!r:.80} is not a numeric NumPy dtype")
        return dtype

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray[Any, Any]:
        dtype = self._numeric_dtype(node["dtype"], "biufc")
        tensor = self._lookup(node["$ndarray"])
        if tensor.element_size() != dtype.itemsize:
            raise self._bad(f"array {node['$ndarray']!r} of {dtype} is stored as {tensor.dtype}")
        return tensor.numpy().copy().astype(dtype, copy=False)

    def _npscalar(self, node: dict[str, Any]) -> np.generic:
        dtype = self._numeric_dtype(node["$npscalar"], "biufcU")
        value = node["value"]
        item = complex(self._decode(value[0]), self._decode(value[1])) if dtype.kind == "c" else self._decode(value)
        if isinstance(item, (list, dict, tuple)):
            raise self._bad(f"NumPy scalar value {value!r:.80} is not a number or string")
        return dtype.type(item)  # type: ignore[no-any-return]

    def _float(self, node: dict[str, Any]) -> float:
        text = node["$float"]
        if text not in ("nan", "inf", "-inf"):
            raise self._bad(f"bad special float {text!r:.80}")
        return float(text)

    def _tuple(self, node: dict[str, Any]) -> tuple[Any, ...]:
        items = node["$tuple"]
        if not isinstance(items, list):
            raise self._bad("$tuple must hold a list")
        return tuple(self._decode(v) for v in items)

    def _dict(self, node: dict[str, Any]) -> dict[Any, Any]:
        return dict(self._pairs(node, "$dict"))

    def _pairs(self, node: dict[str, Any], tag: str) -> list[tuple[Any, Any]]:
        pairs = node[tag]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise self._bad(f"{tag} must hold [key, value] pairs")
        return [(self._decode(k), self._decode(v)) for k, v in pairs]

    def _odict(self, node: dict[str, Any]) -> collections.OrderedDict[Any, Any]:
        return collections.OrderedDict(self._pairs(node, "$odict"))

    def _counter(self, node: dict[str, Any]) -> collections.Counter[Any]:
        pairs = self._pairs(node, "$counter")
        if not all(type(count) in (int, float) for _, count in pairs):
            raise self._bad("$counter counts must be numbers")
        return collections.Counter(dict(pairs))

    def _defaultdict(self, node: dict[str, Any]) -> collections.defaultdict[Any, Any]:
        name = node.get("factory")
        if name is not None and name not in DEFAULT_FACTORIES:
            raise self._bad(f"defaultdict factory {name!r:.80} is not a builtin type torchkeep rebuilds")
        out: collections.defaultdict[Any, Any] = collections.defaultdict(
            None if name is None else DEFAULT_FACTORIES[name]
        )
        out.update(self._pairs(node, "$defaultdict"))
        return out

    def _size(self, node: dict[str, Any]) -> torch.Size:
        dims = node["$size"]
        if not isinstance(dims, list) or not all(type(d) is int and 0 <= d < 2**63 for d in dims):
            raise self._bad(f"$size {dims!r:.80} is not a list of non-negative ints")
        return torch.Size(dims)

    def _dtype(self, node: dict[str, Any]) -> torch.dtype:
        dtype = getattr(torch, str(node["$dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise self._bad(f"unknown dtype {node['$dtype']!r:.80}")
        return dtype

    def _device(self, node: dict[str, Any]) -> torch.device:
        spec = node["$device"]
        if not isinstance(spec, str):
            raise self._bad(f"$device {spec!r:.80} is not a string")
        return torch.device(spec)
