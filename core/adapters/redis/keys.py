"""Names of every Redis key and channel this system uses, in one place."""

from __future__ import annotations

import hashlib

RATE_LIMIT_PREFIX = "cleanledger:ratelimit:"
# Workers announce settled operations here: one message per committed group, its operation ids joined by ","
# on a first line, then a JSON object of operation id to the entry cached under `result_key`.
SETTLED_CHANNEL = "cleanledger:settled"
API_KEY_REVOKED_CHANNEL = "cleanledger:api-key-revoked"  # message: the revoked key's id


def idempotency_key(ledger_id: str, tenant_id: str, key: str) -> str:
    """Under the database's identity (`ledger_instance`), so a recreated database never meets old entries.
    The client's key is hashed: bounded length, and none of its characters end up in a Redis key name."""
    return f"cleanledger:idem:{ledger_id}:{tenant_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def result_key(operation_id: str) -> str:
    return f"cleanledger:op:{operation_id}"


def rate_limit_key(bucket_id: str) -> str:
    return RATE_LIMIT_PREFIX + bucket_id
