"""What in a serialized ExportedProgram torch would evaluate or call, checked as text for ``torchkeep scan``.

``torch.export.load`` parses every ``expr_str`` with ``sympy.sympify`` (Python's ``eval`` over sympy's
namespace and the builtins), ``ep.module()`` compiles ``guards_code`` into a function, and running the
program calls each node's ``target``, resolved by ``getattr`` from ``torch``. None of it is run here:
each is tokenized or parsed (``ast``) and what can only serve to run code is reported dangerous.
"""

from __future__ import annotations

import ast
import builtins
import re
from typing import Any

from torchkeep.format.pickle.opwalk import DANGEROUS_MODULES, DANGEROUS_NAMES

# Names a shape expression may use only to run code: sympify evaluates the text with Python's eval and
# sympy's namespace, which includes these builtins and sympy helpers that start programs or parse text.
_EXPR_DANGEROUS = frozenset(dir(builtins)) - {"True", "False", "None", "abs", "min", "max", "int", "float", "bool",
                                              "round", "pow", "divmod"} | {
    "sympify", "parse_expr", "lambdify", "preview", "init_session", "init_printing", "var", "symbols", "S",
    "Function", "exec_", "runtests", "test", "doctest", "srepr", "latex", "plot", "evaluate", "python",
}  # fmt: skip
_EXPR_TOKEN = re.compile(
    r"\s+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*|'[A-Za-z_]\w*'|\*\*|//|==|!=|<=|>=|[-+*/%<>(),=~&|]"
)
_GUARD_CALLS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_TORCH_TARGETS = frozenset({"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                            "_sym_sqrt", "_assert", "_check", "_assert_async", "_assert_scalar"})  # fmt: skip
_TARGET_BAD_PARTS = frozenset(m for m in DANGEROUS_MODULES if "." not in m) | DANGEROUS_NAMES | {
    "jit", "hub", "package", "serialization", "_dynamo", "_inductor", "multiprocessing", "import_module",
    "load_library", "save", "utils", "_C",
}  # fmt: skip

Finding = tuple[str, str, str]  # (where in the document, "dangerous" or "unknown", why)


def _check_expression(text: str) -> tuple[str, str] | None:
    pos = 0
    while pos < len(text):
        match = _EXPR_TOKEN.match(text, pos)
        if match is None:
            return "dangerous", f"a character no shape expression holds ({text[pos]!r})"
        token = match.group()
        if (token[:1].isalpha() or token[:1] == "_") and ("__" in token or token in _EXPR_DANGEROUS):
            return "dangerous", f"names {token!r}, which sympify's eval can call"
        pos = match.end()
    return None


def _check_guard(text: str) -> tuple[str, str] | None:
    if len(text) > 65536:
        return "dangerous", "a guard of more than 64 KiB of code"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "dangerous", "guard code that is not one Python expression (torch pastes it into a function)"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Attribute) and node.func.attr in _GUARD_CALLS and not node.keywords
        ):
            return "dangerous", "guard code calls something other than size()/stride()"
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name is not None and "__" in name:
            return "dangerous", f"guard code names {name!r}"
        if isinstance(node, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.GeneratorExp,
                             ast.ListComp, ast.SetComp, ast.DictComp, ast.Starred)):  # fmt: skip
            return "dangerous", f"guard code holds a {type(node).__name__}"
    return None


def _check_target(target: str) -> tuple[str, str] | None:
    parts = target.split(".")
    if any("__" in part for part in parts):
        return "dangerous", f"graph target {target[:80]!r} names a dunder attribute"
    if parts[0] == "torch" and len(parts) > 1 and parts[1] == "ops":
        if len(parts) < 4 or parts[2] in ("import_module", "load_library", "loaded_libraries"):
            return "dangerous", f"graph target {target[:80]!r} is not an operator"
        return None
    if parts[0] == "_operator" and len(parts) == 2:
        return ("dangerous", f"graph target {target!r}") if parts[1] in DANGEROUS_NAMES else None
    if parts[0] == "math" and len(parts) == 2:
        return None
    if parts[0] == "torch":  # torch.export.load resolves it by getattr from torch: torch.os.system reaches os
        if set(parts[1:]) & _TARGET_BAD_PARTS:
            return "dangerous", f"graph target {target[:80]!r} reaches code outside the operator library"
        return None if len(parts) == 2 and parts[1] in _TORCH_TARGETS else ("unknown", f"graph target {target[:80]!r}")
    return "unknown", f"graph target {target[:80]!r} is not a torch operator"


def audit(document: Any, limit: int = 100) -> list[Finding]:
    """What in a serialized program torch would evaluate or call, found suspect (at most ``limit`` findings).

    ``expr_str`` values (sympify, i.e. eval, on load), ``guards_code`` (compiled into a function by
    ``ep.module()``) and node ``target`` names (resolved by getattr from torch, called when run).
    """
    findings: list[Finding] = []
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack and len(findings) < limit:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            verdict = None
            if key == "expr_str" and isinstance(value, str):
                verdict = _check_expression(value)
            elif key == "guards_code" and isinstance(value, list):
                for i, code in enumerate(value):
                    found = _check_guard(code) if isinstance(code, str) else ("dangerous", "guard code not as text")
                    if found:
                        findings.append((f"{here}[{i}]", *found))
                continue
            elif key == "target" and isinstance(value, str):
                verdict = _check_target(value)
            if verdict is not None:
                findings.append((here, *verdict))
            elif isinstance(value, (dict, list)):
                stack.append((value, here))
    return findings
