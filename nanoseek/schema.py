"""The small shared pieces of configuration: validators, typed TOML sections, and their documentation.

Every part of nanoseek owns its config dataclass (``model/config.py``, ``data/config.py``, ``train/config.py``, the
task and stage sections beside their code); this module is what they share. A field is documented by the string
literal that follows it in the class body, which ``field_docs`` reads back, so ``nanoseek config`` can print every
key with its docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MAX_NESTING = 8
"""Deepest table nesting accepted in a config file (a run config has two levels; a comparison three)."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ValueError that names the offending field, its value and what would be accepted."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, name, value, f"expected one of {', '.join(choices)}")


def require_int(name: str, value: Any, low: int = 0, high: int | None = None) -> None:
    """An int (not a bool) in [low, high]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    allowed = f"expected an integer >= {low}" if high is None else f"expected an integer in [{low}, {high}]"
    require(ok, name, value, allowed)


def require_finite(name: str, value: Any, low: float | None = None, *, strict: bool = False) -> None:
    """A finite number (not a bool), > low when ``strict``, else >= low."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    bound = "" if low is None else (f" > {low:g}" if strict else f" >= {low:g}")
    require(ok, name, value, f"expected a finite number{bound}")


# ---------------------------------------------------------------------------------------------------------------------
# Typed sections


def build_section(cls: type, values: Any, section: str, where: str = "config") -> Any:
    """``cls(**values)`` after checking that every key is a field of ``cls`` and every value has its type (ints
    are accepted for floats, a list of strings for ``tuple[str, ...]``). Errors name ``where``, the section and key."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: [{section}] must be a table of key = value pairs")
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in kinds:
            close = difflib.get_close_matches(key, kinds, n=1)
            hint = f" (did you mean {section}.{close[0]}?)" if close else ""
            raise ValueError(f"{where}: unknown key {section}.{key}{hint}; allowed: {', '.join(kinds)}")
        typed[key] = _typed(kinds[key], f"{section}.{key}", value, where)
    try:
        return cls(**typed)
    except ValueError as err:
        raise ValueError(f"{where}: [{section}] {err}") from None


def _typed(kind: str, name: str, value: Any, where: str) -> Any:
    if kind in ("tuple[str, ...]", "tuple[int, ...]"):  # a TOML array
        item = str if kind == "tuple[str, ...]" else int
        if not (isinstance(value, (list, tuple)) and all(type(x) is item for x in value)):
            raise ValueError(f"{where}: {name}={value!r} has the wrong type: expected a list of {item.__name__}s")
        return tuple(value)
    py = {"int": int, "float": float, "bool": bool, "str": str}[kind]
    ok = isinstance(value, py) and not (py is int and isinstance(value, bool))
    if py is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} has the wrong type: expected {py.__name__}")
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring of every field of dataclass ``cls``: the string literal right after its annotation."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen install): no docs, not an error
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if named and documented and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# ---------------------------------------------------------------------------------------------------------------------
# TOML


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as a TOML literal, else as a string."""
    path, sep, raw = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or not key:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. --set model.d_model=128")
    if "\n" in raw or "\r" in raw:
        raise ValueError(f"--set {text!r}: a value cannot contain a line break")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ValueError(f"--set {section}.{key}: the value is nested too deeply") from None
    if _depth(value) > MAX_NESTING:
        raise ValueError(f"--set {section}.{key}: the value is nested deeper than {MAX_NESTING} levels")
    return section, key.strip(), value


def loads(text: str, what: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error or an absurdly deep nesting is a ValueError naming ``what``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{what} is not valid TOML: {err}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a config") from None
    if _depth(raw) > MAX_NESTING:
        raise ValueError(f"{what} is nested deeper than {MAX_NESTING} levels: not a nanoseek config")
    return raw


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a ValueError naming the file (``what`` says its role)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {err}") from None
    return loads(text, f"{what} {str(path)!r}")


def _depth(value: Any) -> int:
    """Nesting depth of tables and arrays, without recursion (a hostile file may nest thousands deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest
