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


def _as_orjson_does(value: object) -> str:
    if isinstance(value, date):  # datetimes included
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    raise TypeError(f"{type(value).__name__} is not JSON")
