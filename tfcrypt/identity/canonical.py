"""Canonical JSON: the one text form a signed payload is written in.

Rules:
- `json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, UTF-8.
- Integers only: a float has no single text form across languages, so none is ever written
  and none is accepted on read (NaN and Infinity neither).
- Object keys are strings; an object with a repeated key is refused on read, because two
  parsers may keep different copies and a signature must mean one thing.
- A reader verifies the signature over the bytes it received; it never re-canonicalises.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

MAX_DEPTH = 32


def canonical_json(obj: Any) -> str:
    """The canonical text of `obj`; raises ValueError for floats and non-string keys."""
    _check_value(obj, "$", 0)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _check_value(obj: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH}")
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        raise ValueError(f"{path}: floats are not canonical, use an integer")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{path}: object key {k!r} is not a string")
            _check_value(v, f"{path}.{k}", depth + 1)
        return
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        for i, v in enumerate(obj):
            _check_value(v, f"{path}[{i}]", depth + 1)
        return
    raise ValueError(f"{path}: {type(obj).__name__} has no JSON form")


def _no_float(text: str) -> Any:
    raise ValueError(f"float {text!r} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"repeated object key {k!r}")
        out[k] = v
    return out


def loads_strict(text: str) -> Any:
    """Parse JSON text under the canonical rules; raises ValueError for anything else.

    Deep nesting surfaces as RecursionError inside `json`; it is reported as ValueError
    so callers have one error to map.
    """
    try:
        return json.loads(text, parse_float=_no_float, parse_constant=_no_float,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None
