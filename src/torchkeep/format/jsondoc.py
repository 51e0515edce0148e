"""Reading the JSON documents of a checkpoint (manifests, indexes, configs) with hard limits.

One reader for every JSON file torchkeep opens: bytes in, a validated document out, or
CorruptCheckpointError naming the file. Nesting depth is checked (iteratively) before anything
walks the document recursively, and a document cut short says so.
"""

from __future__ import annotations

import json
import re
from typing import Any

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


# A JSON escape of a UTF-16 surrogate; only a string holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads(text: str) -> Any:
    """``json.loads`` as every torchkeep document is read: no duplicate keys, and no lone UTF-16 surrogate
    (``"\\ud800"``): no UTF-8 text holds one, so a name or value holding it could not be printed, written
    back or compared with what another reader sees (the safetensors library refuses it too).

    Raises:
        ValueError: the text is not such JSON (RecursionError: it nests too deeply for the parser).
    """
    document = json.loads(text, object_pairs_hook=_no_duplicates)
    if _SURROGATE_ESCAPE.search(text):  # rare: only then is every string checked
        try:
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"a string holds a lone UTF-16 surrogate ({exc.object[exc.start]!a}), which is not text"
            ) from exc
    return document


def depth(document: Any) -> int:
    """How deeply lists and objects nest (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if level > _config.MAX_JSON_DEPTH:
            return level
        stack.extend((child, level) for child in children)
    return deepest


def parse_json(raw: bytes, path: str, what: str, *, max_bytes: int | None = None) -> Any:
    """Parse ``raw`` (the bytes of ``what`` at ``path``): UTF-8 JSON, no duplicate keys, bounded size and depth."""
    limit = _config.MAX_JSON_BYTES if max_bytes is None else max_bytes
    if len(raw) > limit:
        raise CorruptCheckpointError(path, f"{what} is {len(raw)} bytes, over the limit of {limit}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(path, f"{what} is not UTF-8 text: {exc}") from exc
    try:
        document = loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip())
        hint = " (the file ends early: truncated?)" if cut else ""
        raise CorruptCheckpointError(path, f"{what} is not valid JSON{hint}: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"{what} is not valid JSON: {exc}") from exc
    if depth(document) > _config.MAX_JSON_DEPTH:
        raise CorruptCheckpointError(path, f"{what} nests deeper than {_config.MAX_JSON_DEPTH} levels")
    return document


def expect(condition: bool, path: str, problem: str) -> None:
    """A schema check: CorruptCheckpointError(path, problem) unless ``condition``."""
    if not condition:
        raise CorruptCheckpointError(path, problem)


def newer_format(path: str, what: str, version: object, supported: int) -> CorruptCheckpointError:
    """The error for a document written by a newer torchkeep than this one."""
    from torchkeep import __version__

    return CorruptCheckpointError(
        path,
        f"{what} was written by a newer torchkeep (format version {version}; this torchkeep {__version__} reads "
        f"up to version {supported}); upgrade torchkeep (pip install -U torchkeep) to read it",
    )


def check_version(path: str, what: str, version: object, supported: int) -> int:
    """A format version field: an int from 1 to ``supported``; newer ones say to upgrade."""
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(path, f"{what} has an invalid format version {version!r}")
    if version > supported:
        raise newer_format(path, what, version, supported)
    return version
