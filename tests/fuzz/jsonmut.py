"""Structural mutations of JSON documents (manifests, indexes, headers, configs), as hypothesis strategies.

A mutation picks a node of the document by index (in a fixed walk order, so shrinking is
stable) and replaces it with any JSON value, a tagged value (``{"$tensor": ...}``), a value spliced
from elsewhere in the same document, the same value retyped, or wrapped hundreds of levels deep;
or deletes it, or adds a key next to it. Values are biased toward the ones validators get wrong:
huge and negative integers, NaN and infinities, path-like and device-like strings, names that
exist elsewhere in the document.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as s

from torchkeep.format.jsondoc import depth
from torchkeep.state.values import TAGS

Node = tuple[Any, ...]  # a path of keys and indexes from the root
# Levels one "nest" adds at most; past the readers' limit (256), short of Python's recursion limit.
MAX_NEST = 200

INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    7,
    255,
    256,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
]
INTERESTING_STRINGS = [
    "",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "x\x00y",
    "C:\\x",
    "~",
    "cpu",
    "cuda",
    "cuda:0",
    "cuda:99",
    "meta",
    "mps",
    "xla:0",
    "warp-drive",
    "cpu:-1",
    "F32",
    "F16",
    "BF16",
    "I64",
    "BOOL",
    "F8_E4M3",
    "U64",
    "O",
    "<f4",
    ">f8",
    "|b1",
    "<U3",
    "<c8",
    "V8",
    "float32",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "NaN",
    "model.0.weight",
    "model.safetensors",
    "tensors.safetensors",
    "manifest.json",
    "step-00000001",
    "torchkeep.checkpoint",
    "torchkeep.model",
    "Linear",
    "Sequential",
    "LSTM",
    "Module",
    "Parameter",
    "torch.nn.modules.linear:Linear",
    "os:system",
    "builtins:eval",
    "argument",
    "get_config",
    "stock",
    *TAGS,
    "$pickle",
    "$",
    "$$tensor",
]
KEYS = [
    "format",
    "version",
    "tensors_file",
    "name",
    "size",
    "objects",
    "state",
    "info",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "components",
    "rng",
    "python",
    "numpy",
    "torch",
    "cuda",
    "param_groups",
    "params",
    "manager",
    "step",
    "metrics",
    "time",
    "weight_map",
    "metadata",
    "total_size",
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "class",
    "config_source",
    "structure",
    "type",
    "children",
    "args",
    "device",
    "requires_grad",
    "value",
    "xxh3_64",
    *TAGS,
]


def _text() -> s.SearchStrategy[str]:
    return s.text(s.characters(exclude_categories=("Cs",)), max_size=12)


scalars: s.SearchStrategy[Any] = s.one_of(
    s.none(),
    s.booleans(),
    s.sampled_from(INTERESTING_INTS),
    s.integers(-(2**70), 2**70),
    s.floats(),
    s.sampled_from(INTERESTING_STRINGS),
    _text(),
)
keys: s.SearchStrategy[str] = s.one_of(s.sampled_from(KEYS), _text())


def _containers(children: s.SearchStrategy[Any]) -> s.SearchStrategy[Any]:
    return s.one_of(
        s.lists(children, max_size=4),
        s.dictionaries(keys, children, max_size=4),
        s.builds(
            lambda tag, value, extra: {tag: value, **extra},
            s.sampled_from(TAGS),
            children,
            s.dictionaries(s.sampled_from(["device", "requires_grad", "dtype", "value"]), children, max_size=2),
        ),
    )


values: s.SearchStrategy[Any] = s.recursive(scalars, _containers, max_leaves=12)

# (operation, node index, argument): the argument's meaning depends on the operation.
mutation = s.one_of(
    s.tuples(s.just("replace"), s.integers(0, 10**6), values),
    s.tuples(s.just("delete"), s.integers(0, 10**6), s.none()),
    s.tuples(s.just("add"), s.integers(0, 10**6), s.tuples(keys, values)),
    s.tuples(s.just("splice"), s.integers(0, 10**6), s.integers(0, 10**6)),
    s.tuples(s.just("retype"), s.integers(0, 10**6), s.none()),
    s.tuples(s.just("tag"), s.integers(0, 10**6), s.sampled_from(TAGS)),
    s.tuples(s.just("nest"), s.integers(0, 10**6), s.integers(1, MAX_NEST)),
)
mutations = s.lists(mutation, min_size=1, max_size=4)


def nodes(document: Any) -> list[Node]:
    """Every node's path, root first, in a fixed order (iterative: documents may nest deeply)."""
    out: list[Node] = []
    stack: list[Node] = [()]
    while stack:
        path = stack.pop()
        out.append(path)
        node = get(document, path)
        if isinstance(node, dict):
            stack.extend((*path, k) for k in reversed(list(node)))
        elif isinstance(node, list):
            stack.extend((*path, i) for i in reversed(range(len(node))))
    return out


def get(document: Any, path: Node) -> Any:
    for part in path:
        document = document[part]
    return document


def _set(document: Any, path: Node, value: Any) -> Any:
    if not path:
        return value
    get(document, path[:-1])[path[-1]] = value
    return document


def _retype(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return [value]
    if isinstance(value, str):
        return int(value) if value.lstrip("-").isdigit() and len(value) < 30 else {value: value}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return [[k, v] for k, v in value.items()]
    return False


def _nest(value: Any, levels: int) -> Any:
    for i in range(levels):
        value = [value] if i % 2 else {"$tuple": [value]} if i % 3 else {"x": value}
    return value


def apply(document: Any, changes: list[tuple[str, int, Any]]) -> Any:
    """A mutated deep copy of ``document``."""
    document = copy.deepcopy(document)
    for op, index, argument in changes:
        paths = nodes(document)
        path = paths[index % len(paths)]
        node = get(document, path)
        if op == "replace":
            document = _set(document, path, copy.deepcopy(argument))
        elif op == "delete" and path:
            parent = get(document, path[:-1])
            del parent[path[-1]]
        elif op == "add":
            key, value = argument
            target = node if isinstance(node, dict) else get(document, path[:-1]) if path else None
            if isinstance(target, dict):
                target[key] = copy.deepcopy(value)
            elif isinstance(node, list):
                node.append(copy.deepcopy(value))
        elif op == "splice":
            donor = paths[argument % len(paths)]
            if donor[: len(path)] != path:  # not a node's own descendant
                document = _set(document, path, copy.deepcopy(get(document, donor)))
        elif op == "retype":
            document = _set(document, path, _retype(node))
        elif op == "tag":
            document = _set(document, path, {argument: node})
        elif op == "nest" and depth(document) < MAX_NEST:
            document = _set(document, path, _nest(node, argument))
    return document


def dumps(document: Any, **kwargs: Any) -> bytes:
    """JSON bytes as the writers would produce them (NaN and infinities as Python writes them)."""
    return json.dumps(document, ensure_ascii=False, **kwargs).encode("utf-8")
