"""The ingress's memory of API keys: what it may answer without asking PostgreSQL."""

from __future__ import annotations

import time

from core.adapters.postgres.api_keys import ApiKey
from core.domain.ids import new_id
from ingress.middleware import ApiKeyCache


def test_known_and_unknown_secrets_are_remembered_until_they_expire() -> None:
    cache = ApiKeyCache(ttl_s=0.05)
    key = ApiKey(new_id(), "acme")
    assert cache.get("a") == (False, None)
    cache.put("a", key, looked_up_at=cache.generation)
    cache.put("wrong", None, looked_up_at=cache.generation)
    assert cache.get("a") == (True, key)
    assert cache.get("wrong") == (True, None)
    time.sleep(0.06)
    assert cache.get("a") == (False, None)
    assert cache.get("wrong") == (False, None)


def test_forgetting_a_key_drops_every_secret_of_it_and_only_those() -> None:
    cache = ApiKeyCache(ttl_s=60)
    revoked, other = ApiKey(new_id(), "acme"), ApiKey(new_id(), "acme")
    for digest, key in (("r1", revoked), ("r2", revoked), ("o", other)):
        cache.put(digest, key, looked_up_at=cache.generation)
    cache.forget(revoked.id)
    assert cache.get("r1") == cache.get("r2") == (False, None)
    assert cache.get("o") == (True, other)
    cache.forget_all()
    assert cache.get("o") == (False, None)


def test_a_lookup_that_overlapped_a_revocation_is_not_remembered() -> None:
    cache = ApiKeyCache(ttl_s=60)
    key = ApiKey(new_id(), "acme")
    started = cache.generation  # the lookup reads PostgreSQL before the revocation commits...
    cache.forget(key.id)  # ...and the announcement arrives before its answer
    cache.put("a", key, looked_up_at=started)
    assert cache.get("a") == (False, None)  # asked again next time, and then PostgreSQL says revoked
