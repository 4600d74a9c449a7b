"""The one settings object. Every value comes from a CLEANLEDGER_* environment variable, with a default
that works against this machine's local services."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Self


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/cleanledger"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    mongo_url: str = "mongodb://127.0.0.1:27017/cleanledger"
    db_pool_min: int = 2  # connections kept open per process
    db_pool_max: int = 16  # connections at most per process
    db_statement_timeout_ms: int = 5000  # a stuck statement fails instead of holding locks forever
    db_lock_timeout_ms: int = 3000  # waiting longer than this for a row lock counts as a conflict
    log_level: str = "INFO"
    log_json: bool = True

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Self:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"CLEANLEDGER_{f.name.upper()}")
            if raw is None:
                continue
            if f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
