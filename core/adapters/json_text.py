"""Compact JSON text, fast: what the adapters write into statements, caches and answers."""

from __future__ import annotations

import enum
import json
from datetime import date
from typing import Any
from uuid import UUID

import orjson


def dumps(value: Any) -> str:
    """`value` as compact UTF-8 JSON text. orjson writes UUIDs, timestamps and enums itself, several times
    faster than the standard library; an integer beyond 64 bits is the one thing it refuses, and then the
    standard library writes the whole value instead (a database keeps such a number exact either way). Anything
    else that is not JSON raises TypeError."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_as_orjson_does)


# A run of 20 digits may be a number orjson would read as a float (it keeps integers within 64 bits exact, no
# more). Found with a translation of every digit to "0" and a substring search, both C loops over the bytes: a
# regular expression spent longer on a batch's half megabyte than parsing it did.
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 20


def loads(data: bytes | str) -> Any:
    """JSON text or bytes as Python values, exactly: orjson (several times faster than the standard library),
    unless the text holds a run of 20 digits, an integer orjson would turn into a float; the standard library
    reads those exactly. ValueError (orjson's JSONDecodeError is one) when it is not JSON, nesting too deep
    included."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZERO):
        return orjson.loads(raw)
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _as_orjson_does(value: object) -> str:
    if isinstance(value, date):  # datetimes included
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    raise TypeError(f"{type(value).__name__} is not JSON")
