"""The HTTP API, in one place. Writes are queued (202 + an operation to poll); reads go to PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web

from core.adapters import json_text
from core.adapters.metrics import OPERATIONS_ACCEPTED, exposition
from core.application.commands import Command, validate_idempotency_key
from core.application.ports import AccountFilters, AuditUnavailable, EntryView, TransactionFilters
from core.application.requests import (
    AccountMetadataBody,
    AccountStatusBody,
    B,
    BatchBody,
    Body,
    CaptureBody,
    CaptureHoldBody,
    CreateAccountBody,
    CreditBody,
    DebitBody,
    EmptyBody,
    HoldBody,
    MetadataPatchBody,
    ReversalBody,
    ReverseTransactionBody,
    TransactionBody,
    TransferBody,
    VoidHoldBody,
    parse_body,
)
from core.application.views import (
    account_json,
    delivery_json,
    endpoint_json,
    event_json,
    hold_json,
    operation_json,
    operation_path,
    transaction_json,
)
from core.application.webhooks import EventFilter
from core.domain.errors import (
    AccountNotFound,
    HoldNotFound,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    NotFound,
    OperationNotFound,
    PayloadTooLarge,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    TransactionNotFound,
    UnsupportedMediaType,
)
from ingress import openapi
from ingress.context import INGRESS, Ingress
from ingress.middleware import RAW_BODY, TENANT
from ingress.schemas import (
    AccountsQuery,
    BalanceHistoryQuery,
    BalanceQuery,
    DeliveriesQuery,
    EventsQuery,
    OperationsQuery,
    TransactionsQuery,
    WebhookEndpointBody,
    parse_json_body,
    parse_model,
    parse_query,
    query_with_metadata,
)

routes = web.RouteTableDef()
log = structlog.get_logger("ingress")
PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([0-9]+)", re.IGNORECASE)
# Content-Encodings the ingress decodes (aiohttp does, as the body is read); any other is refused with 415.
BODY_ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})
ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")  # a file of the docs page's assets, no path


# --- helpers -----------------------------------------------------------------------------------------------
def path_uuid(request: web.Request, name: str) -> UUID:
    try:
        return UUID(request.match_info[name])
    except ValueError:
        raise RequestInvalid(f"{name.replace('_', ' ')} must be a UUID") from None


def prefer_wait(request: web.Request, cap_s: int) -> int | None:
    """Seconds asked for with `Prefer: wait=N` (RFC 7240), capped; None when not asked."""
    match = PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if match is None:
        return None
    digits = match.group(1).lstrip("0")
    # Anything longer is past the cap anyway; and int() refuses strings over 4,300 digits (CPython's guard
    # against quadratic parsing), which made `wait=` and a page of digits a 500.
    return cap_s if len(digits) > 9 else min(int(digits or "0"), cap_s)


def settled_document(entry: dict[str, Any], tenant_id: str) -> dict[str, Any] | None:
    """The operation's document out of a worker's cache entry (`{"tenant_id", "operation"}`), if the tenant's."""
    if entry.get("tenant_id") == tenant_id and isinstance(entry.get("operation"), dict):
        document: dict[str, Any] = entry["operation"]
        return document
    return None


async def cached_operation(ingress: Ingress, tenant_id: str, operation_id: UUID) -> dict[str, Any] | None:
    """The settled operation's document from Redis, when it is there (a worker caches it as it settles)."""
    cached = await ingress.cache.get_result(str(operation_id))
    return settled_document(cached, tenant_id) if cached is not None else None


async def current_operation(ingress: Ingress, tenant_id: str, operation_id: UUID) -> dict[str, Any] | None:
    """The operation's document: Redis copy of a settled result first, PostgreSQL (the truth) otherwise."""
    cached = await cached_operation(ingress, tenant_id, operation_id)
    if cached is not None:
        return cached
    found = await ingress.records.find(tenant_id, operation_id)
    return operation_json(found) if found is not None else None


async def settle_wait(ingress: Ingress, tenant_id: str, document: dict[str, Any], wait_s: int) -> dict[str, Any]:
    """Wait up to `wait_s` for a pending operation to settle, woken by the workers' Redis notification. While
    notifications flow, only the Redis copy is looked at; PostgreSQL answers at the timeout, or when polling."""
    if document["status"] != "pending" or wait_s <= 0:
        return document
    operation_id = UUID(document["id"])

    async def check() -> dict[str, Any] | None:
        latest = await current_operation(ingress, tenant_id, operation_id)
        return latest if latest is not None and latest["status"] != "pending" else None

    async def peek() -> dict[str, Any] | None:
        return await cached_operation(ingress, tenant_id, operation_id)

    settled = await ingress.waiter.wait(
        str(operation_id),
        float(wait_s),
        check=check,
        peek=peek,
        announced=lambda entry: settled_document(entry, tenant_id),
    )
    return settled or document


def operation_response(
    document: dict[str, Any], *, waited: int | None, replayed: bool = False, created: bool = False
) -> web.Response:
    """202 while pending; once settled 201 (succeeded in this very call) or 200."""
    status = document["status"]
    code = 202 if status == "pending" else 201 if created and status == "succeeded" else 200
    response = web.json_response(document, status=code, dumps=json_text.dumps)  # a batch's: 1,000 outcomes
    response.headers["Location"] = operation_path(document["id"])
    if waited is not None:
        response.headers["Preference-Applied"] = f"wait={waited}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def read_body(request: web.Request, model: type[B]) -> B:
    settings = request.app[INGRESS].settings
    timeout_s = settings.body_read_timeout_s
    # A batch may carry up to 1,000 commands; every other body is one command's.
    limit = settings.max_batch_body_bytes if model is BatchBody else settings.max_body_bytes
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"the body exceeds {limit} bytes")
    if request.content_type not in ("application/json", "application/problem+json") and request.body_exists:
        raise UnsupportedMediaType(f"expected application/json, got {request.content_type}")
    encodings = request.headers.getall("Content-Encoding", [])
    if len(encodings) > 1 or (encodings and encodings[0].strip().lower() not in BODY_ENCODINGS):
        # aiohttp passes a coding it does not know through undecoded; refuse it rather than parse the raw bytes.
        raise UnsupportedMediaType("Content-Encoding must be gzip, deflate or none")
    try:
        async with asyncio.timeout(timeout_s):  # a body trickled in byte by byte must not hold the request
            raw = await request.read()
        request[RAW_BODY] = raw  # for the audit trail, as received
        if len(raw) > limit:  # sent without a length, or grown by its Content-Encoding
            raise PayloadTooLarge(f"the body exceeds {limit} bytes")
    except web.RequestPayloadError:  # gzip/deflate that does not decode, or a body cut short
        raise RequestInvalid(
            "the body could not be read: it does not match its Content-Encoding or was cut short"
        ) from None
    except TimeoutError:  # the answer hangs up (middleware `problems`), so the trickle ends there too
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s") from None
    return parse_body(model, raw)


async def submit(request: web.Request, model: type[Body]) -> web.Response:
    """Queue the command the body describes."""
    key = idempotency_key_of(request)
    body = await read_body(request, model)
    return await accept(request, body.to_command(request[TENANT]), key)


async def submit_status(request: web.Request, status: str) -> web.Response:
    """Queue a change of the path's account to `status` (freeze, unfreeze, close); the body is empty or `{}`."""
    key = idempotency_key_of(request)
    account_id = path_uuid(request, "account_id")
    if request.body_exists:
        await read_body(request, EmptyBody)
    body = AccountStatusBody(account_id=account_id, status=status)  # type: ignore[arg-type]
    return await accept(request, body.to_command(request[TENANT]), key)


async def submit_metadata_patch(request: web.Request) -> web.Response:
    """Queue a merge patch of the path's account's metadata."""
    key = idempotency_key_of(request)
    account_id = path_uuid(request, "account_id")
    body = await read_body(request, MetadataPatchBody)
    patch = AccountMetadataBody(account_id=account_id, metadata=body.metadata)
    return await accept(request, patch.to_command(request[TENANT]), key)


async def submit_on_path(
    request: web.Request, id_name: str, body_model: type[Body], command_body: type[Body]
) -> web.Response:
    """Queue a command on the path's resource: the body (which may be left out: every field has a default) with
    the path's id as `id_name`, read as `command_body`, the body that names its resource over AMQP."""
    key = idempotency_key_of(request)
    resource_id = path_uuid(request, id_name)
    body = await read_body(request, body_model) if request.body_exists else body_model()
    named = command_body.model_validate({**body.model_dump(), id_name: resource_id})
    return await accept(request, named.to_command(request[TENANT]), key)


def idempotency_key_of(request: web.Request) -> str:
    raw_keys = request.headers.getall("Idempotency-Key", [])
    if not raw_keys:
        raise IdempotencyKeyMissing()
    if len(raw_keys) > 1:  # which one would be the key? Neither: refuse rather than guess
        raise IdempotencyKeyInvalid("send exactly one Idempotency-Key header")
    return validate_idempotency_key(raw_keys[0])


async def accept(request: web.Request, command: Command, key: str) -> web.Response:
    """Accept (record, publish with confirms; see `core.application.accept`), answer 202, or the settled
    result when `Prefer: wait` was asked and it settled in time."""
    ingress = request.app[INGRESS]
    wait_s = prefer_wait(request, ingress.settings.prefer_wait_max_s)
    outcome = await ingress.acceptance.accept(command, idempotency_key=key)
    OPERATIONS_ACCEPTED.labels("replayed" if outcome.replayed else "new").inc()
    structlog.contextvars.bind_contextvars(operation_id=str(outcome.operation_id))
    document = operation_json(outcome)
    if wait_s is not None:
        document = await settle_wait(ingress, request[TENANT], document, wait_s)
    return operation_response(document, waited=wait_s, replayed=outcome.replayed, created=not outcome.replayed)


def page_response(data: list[dict[str, Any]], next_cursor: str | None) -> web.Response:
    """A page of a keyset-paginated listing: its items, and the cursor of the next page (None on the last)."""
    return web.json_response(
        {"object": "list", "data": data, "has_more": next_cursor is not None, "next_cursor": next_cursor}
    )


def entry_json(entry: EntryView) -> dict[str, Any]:
    return {
        "transaction_id": str(entry.transaction_id),
        "transaction_kind": entry.transaction_kind,
        "account_id": str(entry.account_id),
        "amount": entry.amount,
        "currency": entry.currency,
        "sequence": entry.sequence,
        "balance_after": entry.balance_after,
        "created_at": entry.created_at.isoformat(),
    }


# --- routes ------------------------------------------------------------------------------------------------
@routes.post("/v1/accounts")
async def create_account(request: web.Request) -> web.Response:
    return await submit(request, CreateAccountBody)


@routes.post("/v1/credits")
async def create_credit(request: web.Request) -> web.Response:
    return await submit(request, CreditBody)


@routes.post("/v1/debits")
async def create_debit(request: web.Request) -> web.Response:
    return await submit(request, DebitBody)


@routes.post("/v1/transfers")
async def create_transfer(request: web.Request) -> web.Response:
    return await submit(request, TransferBody)


@routes.post("/v1/transactions")
async def create_transaction(request: web.Request) -> web.Response:
    return await submit(request, TransactionBody)


@routes.post("/v1/transactions/{transaction_id}/reverse")
async def reverse_transaction(request: web.Request) -> web.Response:
    return await submit_on_path(request, "transaction_id", ReversalBody, ReverseTransactionBody)


@routes.post("/v1/holds")
async def create_hold(request: web.Request) -> web.Response:
    return await submit(request, HoldBody)


@routes.post("/v1/holds/{hold_id}/capture")
async def capture_hold(request: web.Request) -> web.Response:
    return await submit_on_path(request, "hold_id", CaptureBody, CaptureHoldBody)


@routes.post("/v1/holds/{hold_id}/void")
async def void_hold(request: web.Request) -> web.Response:
    return await submit_on_path(request, "hold_id", EmptyBody, VoidHoldBody)


@routes.get("/v1/holds/{hold_id}")
async def get_hold(request: web.Request) -> web.Response:
    hold_id = path_uuid(request, "hold_id")
    hold = await request.app[INGRESS].queries.hold(request[TENANT], hold_id)
    if hold is None:
        raise HoldNotFound(f"hold {hold_id} does not exist", hold_id=str(hold_id))
    return web.json_response(hold_json(hold))


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    return await submit(request, BatchBody)


@routes.post("/v1/accounts/{account_id}/freeze")
async def freeze_account(request: web.Request) -> web.Response:
    return await submit_status(request, "frozen")


@routes.post("/v1/accounts/{account_id}/unfreeze")
async def unfreeze_account(request: web.Request) -> web.Response:
    return await submit_status(request, "open")


@routes.post("/v1/accounts/{account_id}/close")
async def close_account(request: web.Request) -> web.Response:
    return await submit_status(request, "closed")


@routes.patch("/v1/accounts/{account_id}")
async def update_account(request: web.Request) -> web.Response:
    return await submit_metadata_patch(request)


@routes.get("/v1/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    query, metadata = query_with_metadata(AccountsQuery, request.query)
    filters = AccountFilters(query.currency, query.status, metadata, newest_first=query.order == "desc")
    page = await ingress.queries.accounts(request[TENANT], filters, limit=query.limit, cursor=query.cursor)
    return page_response([account_json(a) for a in page.accounts], page.next_cursor)


@routes.get("/v1/accounts/{account_id}")
async def get_account(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    account_id = path_uuid(request, "account_id")
    account = await ingress.queries.account(request[TENANT], account_id)
    if account is None:
        raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
    return web.json_response(account_json(account))


@routes.get("/v1/accounts/{account_id}/balance")
async def get_balance(request: web.Request) -> web.Response:
    """The posted balance at `as_of` (default now), from the last entry by then."""
    ingress = request.app[INGRESS]
    account_id = path_uuid(request, "account_id")
    query = parse_model(BalanceQuery, dict(request.query))
    at = query.as_of or datetime.now(UTC)
    balance = await ingress.queries.balance_as_of(request[TENANT], account_id, at)
    if balance is None:
        raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
    return web.json_response({"account_id": str(account_id), "as_of": at.isoformat(), "posted": balance})


@routes.get("/v1/accounts/{account_id}/balance-history")
async def get_balance_history(request: web.Request) -> web.Response:
    """The closing posted balance of each hour or day (UTC) from `since` to `until` (default now)."""
    ingress = request.app[INGRESS]
    account_id = path_uuid(request, "account_id")
    query = parse_model(BalanceHistoryQuery, dict(request.query))
    until = query.until or datetime.now(UTC)
    buckets = await ingress.queries.balance_history(
        request[TENANT], account_id, unit=query.interval, since=query.since, until=until
    )
    if buckets is None:
        raise AccountNotFound(f"account {account_id} does not exist", account_id=str(account_id))
    return web.json_response(
        {
            "account_id": str(account_id),
            "interval": query.interval,
            "data": [{"start": start.isoformat(), "closing": closing} for start, closing in buckets],
        }
    )


@routes.get("/v1/accounts/{account_id}/entries")
async def list_entries(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    account_id = path_uuid(request, "account_id")
    query = parse_query(dict(request.query))
    page = await ingress.queries.entries(
        request[TENANT],
        account_id,
        limit=query.limit,
        cursor=query.cursor,
        newest_first=query.order == "desc",
        since=query.since,
        until=query.until,
    )
    return page_response([entry_json(e) for e in page.entries], page.next_cursor)


@routes.get("/v1/operations")
async def list_operations(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    query = parse_model(OperationsQuery, dict(request.query))
    page = await ingress.queries.operations(
        request[TENANT],
        status=query.status,
        since=query.since,
        until=query.until,
        limit=query.limit,
        cursor=query.cursor,
    )
    return page_response(
        [{**operation_json(op), "created_at": accepted.isoformat()} for op, accepted in page.operations],
        page.next_cursor,
    )


@routes.get("/v1/transactions")
async def list_transactions(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    query, metadata = query_with_metadata(TransactionsQuery, request.query)
    filters = TransactionFilters(
        query.account_id, query.kind, query.since, query.until, metadata, newest_first=query.order == "desc"
    )
    page = await ingress.queries.transactions(request[TENANT], filters, limit=query.limit, cursor=query.cursor)
    return page_response(
        [{**transaction_json(t), "operation_id": str(op)} for t, op in page.transactions], page.next_cursor
    )


@routes.get("/v1/transactions/{transaction_id}")
async def get_transaction(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    transaction_id = path_uuid(request, "transaction_id")
    found = await ingress.queries.transaction(request[TENANT], transaction_id)
    if found is None:
        raise TransactionNotFound(f"transaction {transaction_id} does not exist", transaction_id=str(transaction_id))
    transaction, operation_id = found
    return web.json_response({**transaction_json(transaction), "operation_id": str(operation_id)})


@routes.get("/v1/operations/{operation_id}")
async def get_operation(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    tenant_id = request[TENANT]
    operation_id = path_uuid(request, "operation_id")
    document = await current_operation(ingress, tenant_id, operation_id)
    if document is None:
        raise OperationNotFound(f"operation {operation_id} does not exist", operation_id=str(operation_id))
    wait_s = prefer_wait(request, ingress.settings.prefer_wait_max_s)
    if wait_s is not None:
        document = await settle_wait(ingress, tenant_id, document, wait_s)
    response = web.json_response(document)
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s}"
    return response


@routes.get("/v1/operations/{operation_id}/audit")
async def get_operation_audit(request: web.Request) -> web.Response:
    """The operation's audit records (request as claimed, snapshot or problem), from MongoDB."""
    ingress = request.app[INGRESS]
    tenant_id = request[TENANT]
    operation_id = path_uuid(request, "operation_id")
    if await current_operation(ingress, tenant_id, operation_id) is None:
        raise OperationNotFound(f"operation {operation_id} does not exist", operation_id=str(operation_id))
    try:
        found = await ingress.audit.of_operation(tenant_id, str(operation_id))
    except AuditUnavailable:
        raise ServiceUnavailable("the audit store is unreachable; retry later", retry_after=5) from None
    records = [
        {
            "id": record["_id"],
            "kind": record["kind"],
            "occurred_at": record["occurred_at"].isoformat(),
            "idempotency_key": record.get("idempotency_key"),
            "document": record["document"],
        }
        for record in found
    ]
    # Empty while the trail has not caught up yet (it trails the ledger by the relay and the audit consumer).
    return web.json_response({"object": "list", "operation_id": str(operation_id), "data": records})


# --- webhooks and the event feed ---------------------------------------------------------------------------
def endpoint_path(endpoint_id: UUID | str) -> str:
    return f"/v1/webhook-endpoints/{endpoint_id}"


async def read_json(request: web.Request) -> bytes:
    if request.content_type not in ("application/json", "application/problem+json") and request.body_exists:
        raise UnsupportedMediaType(f"expected application/json, got {request.content_type}")
    request[RAW_BODY] = raw = await request.read()  # for the audit trail, as received
    return raw


@routes.post("/v1/webhook-endpoints")
async def create_webhook_endpoint(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    body = parse_json_body(WebhookEndpointBody, await read_json(request))
    endpoint, secret = await ingress.blocking(
        ingress.ledger.webhooks.register, request[TENANT], body.url, body.event_types, body.description
    )
    log.info("webhook.endpoint_created", endpoint_id=str(endpoint.id))
    response = web.json_response(endpoint_json(endpoint, secret=secret), status=201)
    response.headers["Location"] = endpoint_path(endpoint.id)
    return response


@routes.get("/v1/webhook-endpoints")
async def list_webhook_endpoints(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoints = await ingress.blocking(ingress.ledger.webhooks.endpoints, request[TENANT])
    return web.json_response({"object": "list", "data": [endpoint_json(e) for e in endpoints], "has_more": False})


@routes.get("/v1/webhook-endpoints/{endpoint_id}")
async def get_webhook_endpoint(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id = path_uuid(request, "endpoint_id")
    endpoint = await ingress.blocking(ingress.ledger.webhooks.endpoint, request[TENANT], endpoint_id)
    return web.json_response(endpoint_json(endpoint))


@routes.delete("/v1/webhook-endpoints/{endpoint_id}")
async def delete_webhook_endpoint(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id = path_uuid(request, "endpoint_id")
    await ingress.blocking(ingress.ledger.webhooks.delete, request[TENANT], endpoint_id)
    return web.Response(status=204)


@routes.post("/v1/webhook-endpoints/{endpoint_id}/roll-secret")
async def roll_webhook_secret(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id = path_uuid(request, "endpoint_id")
    endpoint, secret = await ingress.blocking(ingress.ledger.webhooks.roll_secret, request[TENANT], endpoint_id)
    log.info("webhook.secret_rolled", endpoint_id=str(endpoint_id))
    return web.json_response(endpoint_json(endpoint, secret=secret))


@routes.get("/v1/webhook-endpoints/{endpoint_id}/deliveries")
async def list_webhook_deliveries(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id = path_uuid(request, "endpoint_id")
    query = parse_model(DeliveriesQuery, dict(request.query))
    page = await ingress.blocking(
        ingress.ledger.webhooks.deliveries,
        request[TENANT],
        endpoint_id,
        limit=query.limit,
        cursor=query.cursor,
        status=query.status,
    )
    return page_response([delivery_json(d) for d in page.deliveries], page.next_cursor)


@routes.get("/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}")
async def get_webhook_delivery(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id, delivery_id = path_uuid(request, "endpoint_id"), path_uuid(request, "delivery_id")
    delivery = await ingress.blocking(ingress.ledger.webhooks.delivery, request[TENANT], endpoint_id, delivery_id)
    return web.json_response(delivery_json(delivery))


@routes.post("/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/resend")
async def resend_webhook_delivery(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    endpoint_id, delivery_id = path_uuid(request, "endpoint_id"), path_uuid(request, "delivery_id")
    delivery = await ingress.blocking(ingress.ledger.webhooks.resend, request[TENANT], endpoint_id, delivery_id)
    return web.json_response(delivery_json(delivery), status=202)


@routes.get("/v1/events")
async def list_events(request: web.Request) -> web.Response:
    ingress = request.app[INGRESS]
    query = parse_model(EventsQuery, dict(request.query))
    types = tuple(t.strip() for t in (query.type or "").split(",") if t.strip())
    page = await ingress.blocking(
        ingress.ledger.webhooks.events,
        request[TENANT],
        limit=query.limit,
        cursor=query.cursor,
        filters=EventFilter(types, query.since, query.until),
    )
    return web.json_response(
        {
            "object": "list",
            "data": [event_json(e) for e in page.events],
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, without an API key (like /healthz: bind the node where only the scraper reaches it)."""
    body, content_type = exposition()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


@routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers HTTP. No dependency is asked, so an outage elsewhere never gets a live
    node restarted."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 when PostgreSQL and RabbitMQ answer (Redis down is only `degraded`), 503 otherwise."""
    checks = await request.app[INGRESS].readiness.check()
    if "unreachable" in checks.values():
        down = ", ".join(name for name, state in checks.items() if state == "unreachable")
        raise ServiceUnavailable(f"not ready: {down} unreachable", retry_after=1, checks=checks)
    return web.json_response({"status": "ready", "checks": checks})


# --- the API described: OpenAPI, its docs page, the problem pages -------------------------------------------
@routes.get(openapi.OPENAPI_PATH)
async def get_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document, generated from the routes and their models (no API key needed)."""
    ingress = request.app[INGRESS]
    if ingress.openapi is None:
        ingress.openapi = json.dumps(openapi.document(routes, version=package_version("cleanledger"))).encode()
    return web.Response(body=ingress.openapi, content_type="application/json")


@routes.get(openapi.DOCS_PATH)
async def get_docs(request: web.Request) -> web.Response:
    return web.Response(text=openapi.docs_page(), content_type="text/html")


@routes.get(openapi.DOCS_PATH + "/assets/{name}")
async def get_docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    asset = openapi.SWAGGER_ASSETS / name
    if not ASSET_NAME.fullmatch(name) or not asset.is_file():
        raise NotFound("no such asset")
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return web.Response(body=asset.read_bytes(), content_type=content_type)


@routes.get(openapi.PROBLEMS_PATH)
async def get_problems(request: web.Request) -> web.Response:
    return web.Response(text=openapi.problems_index(), content_type="text/html")


@routes.get(openapi.PROBLEMS_PATH + "{code}")
async def get_problem(request: web.Request) -> web.Response:
    page = openapi.problem_page(request.match_info["code"])
    if page is None:
        raise NotFound("no problem has this code")
    return web.Response(text=page, content_type="text/html")
