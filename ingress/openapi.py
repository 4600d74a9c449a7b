"""The OpenAPI 3.1 document of the HTTP API, generated when a node starts, from what the routes themselves use:
the route table (methods and paths), the pydantic models the routes parse bodies and queries with (one source,
shared with AMQP), the handlers' docstrings, and the error catalogue (`core.domain.errors`) for problems.

What only this module says is what a route answers: `OPERATIONS` names, per route, its request models and its
responses. A route the table does not name fails `document()`, so none can go undocumented.
Served at `GET /v1/openapi.json`, read by the `/docs` page (Swagger UI 5, its assets from the `swagger-ui-py`
package, served by the node) and by the suite's schemathesis run.
"""

from __future__ import annotations

import html
import importlib.resources
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.application.commands import IDEMPOTENCY_KEY_PATTERN
from core.application.requests import (
    AccountMetadataBody,
    BatchBody,
    CaptureBody,
    CreateAccountBody,
    CreditBody,
    DebitBody,
    HoldBody,
    MetadataPatchBody,
    ReversalBody,
    TransactionBody,
    TransferBody,
)
from core.domain.errors import PROBLEM_TYPE_BASE, LedgerError, catalogue
from ingress.schemas import (
    AccountsQuery,
    BalanceHistoryQuery,
    BalanceQuery,
    DeliveriesQuery,
    EntriesQuery,
    EventsQuery,
    OperationsQuery,
    TransactionsQuery,
    WebhookEndpointBody,
)

OPENAPI_PATH = "/v1/openapi.json"
DOCS_PATH = "/docs"
PROBLEMS_PATH = "/problems/"
SWAGGER_ASSETS = importlib.resources.files("swagger_ui") / "static"
REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object schema: these keys always present, these maybe, others allowed (a client must ignore them)."""
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


_UUID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_CURSOR = {"type": ["string", "null"]}
_METADATA = {"type": "object", "additionalProperties": {"type": "string"}}


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return _object(
        {"object": {"const": "list"}, "data": {"type": "array", "items": item}, "has_more": {"type": "boolean"}},
        {"next_cursor": _CURSOR},
    )


# The answers' documents (`core.application.views`, `ingress.routes`), as clients may rely on them.
RESPONSE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": _object(
        {
            "type": {"type": "string", "format": "uri"},
            "code": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
        {"instance": {"type": "string"}},
    ),
    "Operation": _object(
        {
            "id": _UUID,
            "object": {"const": "operation"},
            "status": {"enum": ["pending", "succeeded", "failed"]},
            "links": _object({"self": {"type": "string"}}),
        },
        {"result": {"type": "object"}, "problem": _ref("Problem")},
    ),
    "Account": _object(
        {
            "id": _UUID,
            "currency": {"type": "string"},
            "kind": {"type": "string"},
            "status": {"enum": ["open", "frozen", "closed"]},
            "balance": _object(
                {
                    "posted": {"type": "integer"},
                    "pending_debits": {"type": "integer", "minimum": 0},
                    "pending_credits": {"type": "integer", "minimum": 0},
                    "available": {"type": "integer"},
                }
            ),
            "overdraft_limit": {"type": "integer"},
            "metadata": _METADATA,
        }
    ),
    "Balance": _object({"account_id": _UUID, "as_of": _TIME, "posted": {"type": "integer"}}),
    "BalanceHistory": _object(
        {
            "account_id": _UUID,
            "interval": {"enum": ["hour", "day"]},
            "data": {"type": "array", "items": _object({"start": _TIME, "closing": {"type": "integer"}})},
        }
    ),
    "Entry": _object(
        {
            "transaction_id": _UUID,
            "account_id": _UUID,
            "amount": {"type": "integer"},
            "currency": {"type": "string"},
            "sequence": {"type": "integer"},
        }
    ),
    "Transaction": _object(
        {
            "id": _UUID,
            "kind": {"type": "string"},
            "created_at": _TIME,
            "metadata": _METADATA,
            "entries": {"type": "array", "items": {"type": "object"}},
        },
        {"operation_id": _UUID},
    ),
    "Hold": _object(
        {
            "id": _UUID,
            "object": {"const": "hold"},
            "source_id": _UUID,
            "destination_id": _UUID,
            "amount": {"type": "integer", "minimum": 1},
            "currency": {"type": "string"},
            "status": {"enum": ["pending", "captured", "voided", "expired"]},
            "expires_at": _TIME_OR_NULL,
            "captured_amount": {"type": ["integer", "null"]},
            "capture_transaction_id": {"type": ["string", "null"], "format": "uuid"},
            "metadata": _METADATA,
            "created_at": _TIME,
        }
    ),
    "AuditRecords": _object(
        {"object": {"const": "list"}, "operation_id": _UUID, "data": {"type": "array", "items": {"type": "object"}}}
    ),
    "WebhookEndpoint": _object(
        {
            "id": _UUID,
            "object": {"const": "webhook_endpoint"},
            "url": {"type": "string"},
            "event_types": {"type": "array", "items": {"type": "string"}},
            "created_at": _TIME,
        },
        {"secret": {"type": "string", "description": "only in the answers that create or roll it"}},
    ),
    "WebhookDelivery": _object(
        {
            "id": _UUID,
            "object": {"const": "webhook_delivery"},
            "endpoint_id": _UUID,
            "event_id": _UUID,
            "status": {"enum": ["pending", "succeeded", "failed"]},
            "attempts": {"type": "integer"},
            "attempt_history": {"type": "array", "items": {"type": "object"}},
        },
        {"completed_at": _TIME_OR_NULL},
    ),
    "Event": _object({"id": _UUID, "type": {"type": "string"}, "occurred_at": _TIME, "data": {"type": "object"}}),
}
RESPONSE_SCHEMAS |= {
    "AccountList": _list_of(_ref("Account")),
    "EntryList": _list_of(_ref("Entry")),
    "TransactionList": _list_of(_ref("Transaction")),
    "OperationList": _list_of(_ref("Operation")),
    "WebhookEndpointList": _list_of(_ref("WebhookEndpoint")),
    "WebhookDeliveryList": _list_of(_ref("WebhookDelivery")),
    "EventList": _list_of(_ref("Event")),
}


@dataclass(frozen=True)
class Operation:
    """One route as documented. responses: status -> schema name ("" for a body that is not JSON)."""

    tag: str
    responses: dict[str, str]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    command: bool = False  # queued under an Idempotency-Key; may `Prefer: wait`
    metadata_filters: bool = False  # takes `metadata[key]=value` pairs
    public: bool = False  # no API key
    extra_headers: tuple[str, ...] = field(default=())


COMMAND = {"200": "Operation", "201": "Operation", "202": "Operation"}
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/accounts"): Operation("accounts", COMMAND, body=CreateAccountBody, command=True),
    ("POST", "/v1/credits"): Operation("postings", COMMAND, body=CreditBody, command=True),
    ("POST", "/v1/debits"): Operation("postings", COMMAND, body=DebitBody, command=True),
    ("POST", "/v1/transfers"): Operation("postings", COMMAND, body=TransferBody, command=True),
    ("POST", "/v1/transactions"): Operation("postings", COMMAND, body=TransactionBody, command=True),
    ("POST", "/v1/batches"): Operation("postings", COMMAND, body=BatchBody, command=True),
    ("POST", "/v1/holds"): Operation("holds", COMMAND, body=HoldBody, command=True),
    ("POST", "/v1/holds/{hold_id}/capture"): Operation("holds", COMMAND, body=CaptureBody, command=True),
    ("POST", "/v1/holds/{hold_id}/void"): Operation("holds", COMMAND, command=True),
    ("GET", "/v1/holds/{hold_id}"): Operation("holds", {"200": "Hold"}),
    ("POST", "/v1/transactions/{transaction_id}/reverse"): Operation(
        "postings", COMMAND, body=ReversalBody, command=True
    ),
    ("POST", "/v1/accounts/{account_id}/freeze"): Operation("accounts", COMMAND, command=True),
    ("POST", "/v1/accounts/{account_id}/unfreeze"): Operation("accounts", COMMAND, command=True),
    ("POST", "/v1/accounts/{account_id}/close"): Operation("accounts", COMMAND, command=True),
    ("PATCH", "/v1/accounts/{account_id}"): Operation("accounts", COMMAND, body=MetadataPatchBody, command=True),
    ("GET", "/v1/accounts"): Operation("accounts", {"200": "AccountList"}, query=AccountsQuery, metadata_filters=True),
    ("GET", "/v1/accounts/{account_id}"): Operation("accounts", {"200": "Account"}),
    ("GET", "/v1/accounts/{account_id}/balance"): Operation("accounts", {"200": "Balance"}, query=BalanceQuery),
    ("GET", "/v1/accounts/{account_id}/balance-history"): Operation(
        "accounts", {"200": "BalanceHistory"}, query=BalanceHistoryQuery
    ),
    ("GET", "/v1/accounts/{account_id}/entries"): Operation("accounts", {"200": "EntryList"}, query=EntriesQuery),
    ("GET", "/v1/operations"): Operation("operations", {"200": "OperationList"}, query=OperationsQuery),
    ("GET", "/v1/transactions"): Operation(
        "postings", {"200": "TransactionList"}, query=TransactionsQuery, metadata_filters=True
    ),
    ("GET", "/v1/transactions/{transaction_id}"): Operation("postings", {"200": "Transaction"}),
    ("GET", "/v1/operations/{operation_id}"): Operation("operations", {"200": "Operation"}, extra_headers=("Prefer",)),
    ("GET", "/v1/operations/{operation_id}/audit"): Operation("operations", {"200": "AuditRecords"}),
    ("POST", "/v1/webhook-endpoints"): Operation("webhooks", {"201": "WebhookEndpoint"}, body=WebhookEndpointBody),
    ("GET", "/v1/webhook-endpoints"): Operation("webhooks", {"200": "WebhookEndpointList"}),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}"): Operation("webhooks", {"200": "WebhookEndpoint"}),
    ("DELETE", "/v1/webhook-endpoints/{endpoint_id}"): Operation("webhooks", {"204": ""}),
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/roll-secret"): Operation("webhooks", {"200": "WebhookEndpoint"}),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}/deliveries"): Operation(
        "webhooks", {"200": "WebhookDeliveryList"}, query=DeliveriesQuery
    ),
    ("GET", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}"): Operation(
        "webhooks", {"200": "WebhookDelivery"}
    ),
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/resend"): Operation(
        "webhooks", {"202": "WebhookDelivery"}
    ),
    ("GET", "/v1/events"): Operation("webhooks", {"200": "EventList"}, query=EventsQuery),
    ("GET", "/healthz"): Operation("health", {"200": ""}, public=True),
    ("GET", "/readyz"): Operation("health", {"200": ""}, public=True),
}
# Routes that describe the API or the node rather than being part of it: served, not documented.
UNDOCUMENTED = frozenset(
    {
        ("GET", OPENAPI_PATH),
        ("GET", DOCS_PATH),
        ("GET", DOCS_PATH + "/assets/{name}"),
        ("GET", PROBLEMS_PATH),
        ("GET", PROBLEMS_PATH + "{code}"),
        ("GET", "/metrics"),
    }
)
HEADERS: dict[str, dict[str, Any]] = {
    "Idempotency-Key": {
        "in": "header",
        "name": "Idempotency-Key",
        "required": True,
        "description": "One key per intended operation: a retry with the same key and body answers the same "
        "operation, a different body with it is 422 `idempotency-key-reused`.",
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN.pattern},
    },
    "Prefer": {
        "in": "header",
        "name": "Prefer",
        "required": False,
        "description": "`wait=N`: hold the answer up to N seconds (capped) until the operation settled.",
        "schema": {"type": "string", "pattern": r"^wait=[0-9]{1,2}$"},
    },
}


def document(app_routes: web.RouteTableDef, *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app_routes`. Raises LookupError for a route `OPERATIONS` does not name."""
    bodies = sorted(
        {op.body for op in OPERATIONS.values() if op.body is not None}
        | {AccountMetadataBody},  # the AMQP body of PATCH's command: listed for producers
        key=lambda model: model.__name__,
    )
    refs, defs = models_json_schema([(model, "validation") for model in bodies], ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in app_routes:
        if not isinstance(route, web.RouteDef):
            continue
        key = (route.method, route.path)
        if key in UNDOCUMENTED:
            continue
        if key not in OPERATIONS:
            raise LookupError(f"{route.method} {route.path} is not documented in ingress/openapi.py")
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, OPERATIONS[key], refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Clean Ledger API",
            "version": version,
            "description": "Double-entry ledger: accounts, postings queued under an Idempotency-Key (202 and an "
            "operation to poll, or `Prefer: wait`), reads, webhooks. Every error is an RFC 9457 problem "
            f"document; its `type` is `{PROBLEM_TYPE_BASE}<code>`, described at `{PROBLEMS_PATH}<code>`.",
        },
        "paths": paths,
        "components": {
            "schemas": {**defs.get("$defs", {}), **RESPONSE_SCHEMAS},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "`clk_...`"}},
        },
        "security": [{"apiKey": []}],
    }


def _operation(route: web.RouteDef, op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    doc = (route.handler.__doc__ or "").strip()
    parameters = [
        {"in": "path", "name": name, "required": True, "schema": _UUID} for name in re.findall(r"{(\w+)}", route.path)
    ]
    if op.query is not None:
        parameters += _query_parameters(op.query)
    if op.metadata_filters:
        parameters.append(
            {
                "in": "query",
                "name": "metadata",
                "style": "deepObject",
                "explode": True,
                "description": "`metadata[key]=value`: only those whose metadata holds each pair",
                "schema": _METADATA,
            }
        )
    headers = (("Idempotency-Key", "Prefer") if op.command else ()) + op.extra_headers
    parameters += [HEADERS[name] for name in headers]
    responses: dict[str, Any] = {}
    for status, schema in op.responses.items():
        responses[status] = {"description": _reason(status)}
        if schema:
            responses[status]["content"] = {"application/json": {"schema": _ref(schema)}}
    problem = {"content": {"application/problem+json": {"schema": _ref("Problem")}}}
    responses["4XX"] = {"description": "refused: a problem document (see its `code`)", **problem}
    responses["5XX"] = {"description": "the service cannot answer now: a problem document", **problem}
    operation: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "tags": [op.tag],
        "summary": doc.splitlines()[0] if doc else route.handler.__name__.replace("_", " "),
        "parameters": parameters,
        "responses": responses,
    }
    if doc:
        operation["description"] = doc
    if op.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    if op.public:
        operation["security"] = []
    return operation


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", []))
    return [
        {"in": "query", "name": name, "required": name in required, "schema": _plain(prop)}
        for name, prop in schema.get("properties", {}).items()
    ]


def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: pydantic's `anyOf [T, null]` for an optional one is just T in a query."""
    options = [p for p in prop.get("anyOf", []) if p.get("type") != "null"]
    kept = {k: v for k, v in prop.items() if k not in ("anyOf", "title", "default")}
    return {**kept, **options[0]} if len(options) == 1 else kept


def _reason(status: str) -> str:
    return {
        "200": "OK",
        "201": "created (a command: settled in this call)",
        "202": "accepted: the operation is pending; poll its `links.self`",
        "204": "deleted",
        "503": "not ready",
    }.get(status, status)


# --- the problem pages -------------------------------------------------------------------------------------
def problem_page(code: str) -> str | None:
    """The HTML page a problem `type` names, from the catalogue; None for a code it does not hold."""
    error = catalogue().get(code)
    if error is None:
        return None
    doc = "" if error is LedgerError else (error.__doc__ or "").strip()  # the base's docstring is about the code
    retry = "Retrying the same request later may succeed." if not error.permanent else "A final answer."
    return _page(
        f"{error.code} ({error.status})",
        f"<h1><code>{html.escape(error.code)}</code></h1>"
        f"<p><strong>{html.escape(error.title)}</strong>, HTTP {error.status}.</p>"
        + (f"<p>{html.escape(doc)}</p>" if doc else "")
        + f"<p>{retry}</p><p><a href='{PROBLEMS_PATH}'>Every problem code</a></p>",
    )


def problems_index() -> str:
    rows = "".join(
        f"<li><a href='{PROBLEMS_PATH}{html.escape(code)}'><code>{html.escape(code)}</code></a>"
        f" {error.status}: {html.escape(error.title)}</li>"
        for code, error in sorted(catalogue().items())
    )
    return _page("Problem codes", f"<h1>Problem codes</h1><ul>{rows}</ul>")


def docs_page() -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Clean Ledger API</title>"
        f"<link rel='stylesheet' href='{DOCS_PATH}/assets/swagger-ui.css'></head><body><div id='swagger-ui'></div>"
        f"<script src='{DOCS_PATH}/assets/swagger-ui-bundle.js'></script>"
        f"<script>window.ui = SwaggerUIBundle({{url: '{OPENAPI_PATH}', dom_id: '#swagger-ui',"
        " docExpansion: 'list', deepLinking: true});</script></body></html>"
    )


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body>{body}</body></html>"
    )
