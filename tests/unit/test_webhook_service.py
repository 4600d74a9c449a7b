"""Webhook use cases on fakes: URL checks go through the resolver port, secrets are shown once, resends."""

from __future__ import annotations

import dataclasses
import ipaddress
from datetime import UTC, datetime
from uuid import UUID

import pytest

from core.application.webhooks import (
    AddressResolver,
    DeliveryPage,
    EventFilter,
    EventPage,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookService,
    WebhookStore,
)
from core.domain.errors import (
    RequestInvalid,
    WebhookDeliveryPending,
    WebhookEndpointNotFound,
    WebhookUrlForbidden,
    WebhookUrlInvalid,
)
from core.domain.ids import new_id
from core.domain.webhooks import IPAddress, parse_networks

NOW = datetime(2026, 11, 27, tzinfo=UTC)


class FakeResolver(AddressResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        return [ipaddress.ip_address(a) for a in self.answers.get(host, [])]


class FakeStore(WebhookStore):
    def __init__(self) -> None:
        self.endpoints_: dict[UUID, tuple[WebhookEndpoint, str]] = {}
        self.deliveries_: dict[UUID, WebhookDelivery] = {}

    def add_endpoint(self, endpoint: WebhookEndpoint, secret: str, *, max_per_tenant: int) -> bool:
        if len(self.endpoints(endpoint.tenant_id)) >= max_per_tenant:
            return False
        self.endpoints_[endpoint.id] = (endpoint, secret)
        return True

    def endpoints(self, tenant_id: str) -> list[WebhookEndpoint]:
        return [e for e, _ in self.endpoints_.values() if e.tenant_id == tenant_id]

    def endpoint(self, tenant_id: str, endpoint_id: UUID) -> WebhookEndpoint | None:
        found = self.endpoints_.get(endpoint_id)
        return found[0] if found and found[0].tenant_id == tenant_id else None

    def set_secret(self, tenant_id: str, endpoint_id: UUID, secret: str) -> WebhookEndpoint | None:
        endpoint = self.endpoint(tenant_id, endpoint_id)
        if endpoint is None:
            return None
        endpoint = dataclasses.replace(endpoint, secret_rolled_at=NOW)
        self.endpoints_[endpoint_id] = (endpoint, secret)
        return endpoint

    def delete_endpoint(self, tenant_id: str, endpoint_id: UUID) -> bool:
        return self.endpoint(tenant_id, endpoint_id) is not None and bool(self.endpoints_.pop(endpoint_id))

    def deliveries(
        self, tenant_id: str, endpoint_id: UUID, *, limit: int, cursor: str | None, status: str | None
    ) -> DeliveryPage:
        return DeliveryPage([d for d in self.deliveries_.values() if d.endpoint_id == endpoint_id][:limit], None)

    def delivery(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID) -> WebhookDelivery | None:
        found = self.deliveries_.get(delivery_id)
        owner = self.endpoint(tenant_id, endpoint_id)
        return found if found is not None and owner is not None and found.endpoint_id == endpoint_id else None

    def resend(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID, expires_at: datetime) -> bool:
        found = self.deliveries_[delivery_id]
        if found.status == "pending":
            return False
        self.deliveries_[delivery_id] = dataclasses.replace(found, status="pending", expires_at=expires_at)
        return True

    def events(self, tenant_id: str, *, limit: int, cursor: str | None, filters: EventFilter) -> EventPage:
        return EventPage([], cursor, has_more=False)


def service(**answers: list[str]) -> tuple[WebhookService, FakeStore, FakeResolver]:
    store, resolver = FakeStore(), FakeResolver(answers)
    return WebhookService(store, resolver, retry_window_s=3600, clock=lambda: NOW), store, resolver


def test_register_checks_every_resolved_address_and_shows_the_secret_once() -> None:
    hooks, store, resolver = service(
        **{"hooks.example.com": ["93.184.216.34"], "evil.example.com": ["8.8.8.8", "10.0.0.5"]}
    )
    endpoint, secret = hooks.register("acme", "https://hooks.example.com/in", ["transaction.*"])
    assert secret.startswith("whsec_") and len(secret) > 40
    assert store.endpoints_[endpoint.id][1] == secret
    assert "secret" not in {f.name for f in dataclasses.fields(endpoint)}
    with pytest.raises(WebhookUrlForbidden):
        hooks.register("acme", "https://evil.example.com/in", ["*"])
    with pytest.raises(WebhookUrlInvalid):
        hooks.register("acme", "https://nowhere.example.com/in", ["*"])  # does not resolve
    assert resolver.asked == ["hooks.example.com", "evil.example.com", "nowhere.example.com"]
    assert len(store.endpoints_) == 1


def test_literal_addresses_and_bad_forms_never_reach_the_resolver() -> None:
    hooks, store, resolver = service()
    for url in ("http://10.0.0.1/", "http://169.254.169.254/", "ftp://example.com/", "http://u:p@example.com/"):
        with pytest.raises((WebhookUrlForbidden, WebhookUrlInvalid)):
            hooks.register("acme", url, ["*"])
    assert resolver.asked == [] and store.endpoints_ == {}


def test_allow_list_admits_a_private_network() -> None:
    hooks, _, _ = service(**{"localhost": ["127.0.0.1"]})
    with pytest.raises(WebhookUrlForbidden):
        hooks.register("acme", "http://localhost:8000/", ["*"])
    hooks.allowed_networks = parse_networks("127.0.0.0/8")
    hooks.register("acme", "http://localhost:8000/", ["*"])


def test_roll_delete_and_another_tenant() -> None:
    hooks, store, _ = service()
    endpoint, secret = hooks.register("acme", "http://93.184.216.34/", ["*"])
    rolled, new_secret = hooks.roll_secret("acme", endpoint.id)
    assert new_secret != secret and store.endpoints_[endpoint.id][1] == new_secret
    assert rolled.secret_rolled_at == NOW
    for call in (hooks.roll_secret, hooks.delete, hooks.endpoint):
        with pytest.raises(WebhookEndpointNotFound):
            call("globex", endpoint.id)
    hooks.delete("acme", endpoint.id)
    with pytest.raises(WebhookEndpointNotFound):
        hooks.endpoint("acme", endpoint.id)


def test_resend_only_a_finished_delivery_with_a_new_window() -> None:
    hooks, store, _ = service()
    endpoint, _ = hooks.register("acme", "http://93.184.216.34/", ["*"])
    delivery = WebhookDelivery(
        new_id(), endpoint.id, new_id(), "account.created", "failed", 7, None, NOW, 500, "HTTP 500", NOW, NOW
    )
    store.deliveries_[delivery.id] = delivery
    resent = hooks.resend("acme", endpoint.id, delivery.id)
    assert resent.status == "pending"
    assert (resent.expires_at - NOW).total_seconds() == 3600
    with pytest.raises(WebhookDeliveryPending):
        hooks.resend("acme", endpoint.id, delivery.id)
    with pytest.raises(WebhookEndpointNotFound):
        hooks.resend("globex", endpoint.id, delivery.id)


def test_listing_bounds() -> None:
    hooks, _, _ = service()
    endpoint, _ = hooks.register("acme", "http://93.184.216.34/", ["*"])
    for limit in (0, 1001):
        with pytest.raises(RequestInvalid):
            hooks.deliveries("acme", endpoint.id, limit=limit)
        with pytest.raises(RequestInvalid):
            hooks.events("acme", limit=limit, cursor=None, filters=EventFilter())
    with pytest.raises(RequestInvalid):
        hooks.events("acme", limit=10, cursor=None, filters=EventFilter(since=NOW, until=NOW))
