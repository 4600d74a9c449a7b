"""Webhook use cases: endpoints (register, list, delete, roll the secret), deliveries (list, resend) and the
event catch-up feed, behind the `WebhookStore` and `AddressResolver` ports; plus the decision a delivery
worker takes after each attempt (`after_attempt`)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from core.domain.errors import (
    RequestInvalid,
    WebhookDeliveryNotFound,
    WebhookDeliveryPending,
    WebhookEndpointNotFound,
)
from core.domain.ids import new_id
from core.domain.webhooks import (
    EVENT_TYPE_PATTERN,
    IPAddress,
    IPNetwork,
    check_addresses,
    new_secret,
    parse_url,
    retry_delay_s,
)

MAX_EVENT_TYPES = 32
MAX_ENDPOINTS_PER_TENANT = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    id: UUID
    tenant_id: str
    url: str
    event_types: tuple[str, ...]
    description: str
    created_at: datetime
    secret_rolled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    attempt: int
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    id: UUID
    endpoint_id: UUID
    event_id: UUID
    event_type: str
    status: str  # pending, succeeded, failed
    attempts: int
    next_attempt_at: datetime | None  # None once finished
    expires_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    completed_at: datetime | None
    history: tuple[WebhookAttempt, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    deliveries: list[WebhookDelivery]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: UUID
    type: str
    tenant_id: str
    occurred_at: datetime
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[StoredEvent]
    # Where to read on from: after the page's last event, or the cursor given when the page is empty, so a
    # client that keeps it polls for what happens next. None only for an empty first page.
    next_cursor: str | None
    has_more: bool


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: tuple[str, ...] = ()
    since: datetime | None = None  # inclusive, occurred_at
    until: datetime | None = None  # exclusive


class AddressResolver(abc.ABC):
    @abc.abstractmethod
    def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` resolves to (empty if it does not); no connection is made."""


class WebhookStore(abc.ABC):
    @abc.abstractmethod
    def add_endpoint(self, endpoint: WebhookEndpoint, secret: str, *, max_per_tenant: int) -> bool:
        """Store a new endpoint; False when the tenant already has `max_per_tenant` live ones."""

    @abc.abstractmethod
    def endpoints(self, tenant_id: str) -> list[WebhookEndpoint]: ...

    @abc.abstractmethod
    def endpoint(self, tenant_id: str, endpoint_id: UUID) -> WebhookEndpoint | None: ...

    @abc.abstractmethod
    def set_secret(self, tenant_id: str, endpoint_id: UUID, secret: str) -> WebhookEndpoint | None: ...

    @abc.abstractmethod
    def delete_endpoint(self, tenant_id: str, endpoint_id: UUID) -> bool:
        """Soft-delete a live endpoint; its pending deliveries fail. False if there is none."""

    @abc.abstractmethod
    def deliveries(
        self, tenant_id: str, endpoint_id: UUID, *, limit: int, cursor: str | None, status: str | None
    ) -> DeliveryPage:
        """An endpoint's deliveries, newest first, each with its attempts."""

    @abc.abstractmethod
    def delivery(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID) -> WebhookDelivery | None: ...

    @abc.abstractmethod
    def resend(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID, expires_at: datetime) -> bool:
        """Make a finished delivery pending and due now, with a new retry window; False if it is pending."""

    @abc.abstractmethod
    def events(self, tenant_id: str, *, limit: int, cursor: str | None, filters: EventFilter) -> EventPage:
        """The tenant's events still in the outbox, oldest first."""


@dataclass
class WebhookService:
    store: WebhookStore
    resolver: AddressResolver
    allowed_networks: tuple[IPNetwork, ...] = ()
    retry_window_s: float = 24 * 3600
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def check_url(self, url: str) -> str:
        """Refuse a URL a webhook may not go to: its form, then every address its host resolves to."""
        parsed = parse_url(url)
        addresses = [parsed.literal] if parsed.literal is not None else self.resolver.resolve(parsed.host, parsed.port)
        check_addresses(parsed.host, addresses, self.allowed_networks)
        return parsed.url

    def register(
        self, tenant_id: str, url: str, event_types: Sequence[str], description: str = ""
    ) -> tuple[WebhookEndpoint, str]:
        """A new endpoint and its signing secret, which is shown this once."""
        types = validate_event_types(event_types)
        checked = self.check_url(url)
        secret = new_secret()
        endpoint = WebhookEndpoint(new_id(), tenant_id, checked, types, description, self._now())
        if not self.store.add_endpoint(endpoint, secret, max_per_tenant=MAX_ENDPOINTS_PER_TENANT):
            raise RequestInvalid(f"a tenant may have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints")
        return endpoint, secret

    def endpoint(self, tenant_id: str, endpoint_id: UUID) -> WebhookEndpoint:
        found = self.store.endpoint(tenant_id, endpoint_id)
        if found is None:
            raise _endpoint_not_found(endpoint_id)
        return found

    def endpoints(self, tenant_id: str) -> list[WebhookEndpoint]:
        return self.store.endpoints(tenant_id)

    def roll_secret(self, tenant_id: str, endpoint_id: UUID) -> tuple[WebhookEndpoint, str]:
        """A new secret for the endpoint, shown this once; deliveries are signed with it from now on."""
        secret = new_secret()
        endpoint = self.store.set_secret(tenant_id, endpoint_id, secret)
        if endpoint is None:
            raise _endpoint_not_found(endpoint_id)
        return endpoint, secret

    def delete(self, tenant_id: str, endpoint_id: UUID) -> None:
        if not self.store.delete_endpoint(tenant_id, endpoint_id):
            raise _endpoint_not_found(endpoint_id)

    def deliveries(
        self, tenant_id: str, endpoint_id: UUID, *, limit: int, cursor: str | None = None, status: str | None = None
    ) -> DeliveryPage:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise RequestInvalid(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        self.endpoint(tenant_id, endpoint_id)
        return self.store.deliveries(tenant_id, endpoint_id, limit=limit, cursor=cursor, status=status)

    def delivery(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID) -> WebhookDelivery:
        found = self.store.delivery(tenant_id, endpoint_id, delivery_id)
        if found is None:
            raise WebhookDeliveryNotFound(
                f"webhook delivery {delivery_id} does not exist", delivery_id=str(delivery_id)
            )
        return found

    def resend(self, tenant_id: str, endpoint_id: UUID, delivery_id: UUID) -> WebhookDelivery:
        """Send a finished (failed, or succeeded) delivery again, with a fresh retry window."""
        self.endpoint(tenant_id, endpoint_id)
        self.delivery(tenant_id, endpoint_id, delivery_id)
        expires_at = self._now() + timedelta(seconds=self.retry_window_s)
        if not self.store.resend(tenant_id, endpoint_id, delivery_id, expires_at):
            raise WebhookDeliveryPending(
                f"webhook delivery {delivery_id} is still pending", delivery_id=str(delivery_id)
            )
        return self.delivery(tenant_id, endpoint_id, delivery_id)

    def events(self, tenant_id: str, *, limit: int, cursor: str | None, filters: EventFilter) -> EventPage:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise RequestInvalid(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        if filters.since and filters.until and filters.since >= filters.until:
            raise RequestInvalid("'since' must be before 'until'")
        return self.store.events(tenant_id, limit=limit, cursor=cursor, filters=filters)

    def _now(self) -> datetime:
        return self.clock()


def validate_event_types(event_types: Sequence[str]) -> tuple[str, ...]:
    types = tuple(dict.fromkeys(event_types))
    if not types:
        raise RequestInvalid('enabled_events must name at least one event type (or "*")')
    if len(types) > MAX_EVENT_TYPES:
        raise RequestInvalid(f"enabled_events may name at most {MAX_EVENT_TYPES} event types")
    bad = [t for t in types if len(t) > 100 or not EVENT_TYPE_PATTERN.fullmatch(t)]
    if bad:
        raise RequestInvalid(f"not event types: {', '.join(map(repr, bad))}")
    return types


def _endpoint_not_found(endpoint_id: UUID) -> WebhookEndpointNotFound:
    return WebhookEndpointNotFound(f"webhook endpoint {endpoint_id} does not exist", endpoint_id=str(endpoint_id))


# --- what a delivery worker does after an attempt ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None  # None: no answer (timeout, connection error, address refused)
    latency_ms: int
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class NextStep:
    status: str  # succeeded, failed, pending
    next_attempt_at: datetime | None


def after_attempt(
    result: AttemptResult,
    *,
    attempts: int,
    now: datetime,
    expires_at: datetime,
    base_s: float,
    cap_s: float,
    retryable: bool = True,
) -> NextStep:
    """A 2xx succeeds. Anything else is tried again after a capped, jittered exponential backoff, unless the
    next try would fall after the delivery's retry window (or the failure is not `retryable`): it fails."""
    if result.succeeded:
        return NextStep("succeeded", None)
    if retryable:
        due = now + timedelta(seconds=retry_delay_s(attempts, base_s=base_s, cap_s=cap_s))
        if due <= expires_at:
            return NextStep("pending", due)
    return NextStep("failed", None)
