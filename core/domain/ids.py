"""Identifiers. UUIDv7 (RFC 9562): time-ordered, so new rows land at the right edge of B-tree indexes."""

from __future__ import annotations

import functools
import os
import time
import uuid

# Namespace for ids derived from names (uuid5), e.g. a tenant's per-currency external account.
LEDGER_NAMESPACE = uuid.UUID("6f1c1f4e-1b43-4c55-9a8e-2f1d0c6f7a10")


def new_id() -> uuid.UUID:
    """A UUIDv7: 48-bit Unix milliseconds, version 7, 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b, 62 bits
    return uuid.UUID(int=value)


@functools.lru_cache(maxsize=4096)  # a few (tenant, currency) pairs per process; a SHA-1 each time otherwise
def external_account_id(tenant_id: str, currency: str) -> uuid.UUID:
    """The id of a tenant's external (system) account for one currency: derived, so no lookup is needed."""
    return uuid.uuid5(LEDGER_NAMESPACE, f"external:{tenant_id}:{currency}")
