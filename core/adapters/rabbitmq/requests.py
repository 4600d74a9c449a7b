"""The command interface for direct AMQP producers (internal systems that publish to RabbitMQ, not HTTP).

Publish to the durable direct exchange `ledger.requests` (`CLEANLEDGER_REQUEST_EXCHANGE`) with:
- the routing key naming the command: `create_account`, `credit`, `debit` or `transfer`;
- the body of the same HTTP route, as JSON (`core.application.requests`: one schema for both ways in);
- the Idempotency-Key as the AMQP `message_id`;
- the tenant's API key in the `authorization` header, `Bearer <secret>`, checked as over HTTP;
- optionally `reply_to` (a queue) and `correlation_id`: the worker publishes there the operation once it
  settled (`{"id", "object": "operation", "status", "result" | "problem"}`), or the problem document that
  refused the message, with `content_type` `application/json` or `application/problem+json`.
A refused message (invalid, oversized, unauthenticated, unparseable) is answered on its `reply_to` with the
problem, and kept in `<request queue>.XQ` with the reason in its `x-refused-code` and `x-refused-reason`
headers, its `authorization` header removed: nothing is dropped silently, no secret is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pika.spec

from core.adapters.rabbitmq.commands import ReplyTo
from core.application.commands import Batch, validate_idempotency_key
from core.application.requests import BODIES, Body, parse_body
from core.domain.errors import IdempotencyKeyMissing, PayloadTooLarge, Unauthorized, ValidationFailed

AUTHORIZATION_HEADER = "authorization"
# Largest message body accepted, in bytes: the HTTP limits' defaults (`CLEANLEDGER_MAX_BODY_BYTES`, and
# `CLEANLEDGER_MAX_BATCH_BODY_BYTES` for a batch of up to 1,000 commands).
MAX_BODY_BYTES = 64 * 1024
MAX_BATCH_BODY_BYTES = 1024 * 1024
# Longest reply_to or correlation_id honoured, in characters (AMQP's short strings hold 255 bytes).
MAX_REPLY_FIELD = 255


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A command published by a client, parsed; authenticated later with its group (one query)."""

    secret: str
    idempotency_key: str
    body: Body


def reply_of(properties: pika.spec.BasicProperties) -> ReplyTo | None:
    """Where the client wants its answer, if anywhere (read first: even a refused message is answered)."""
    reply_to, correlation_id = properties.reply_to, properties.correlation_id
    if not isinstance(reply_to, str) or not 0 < len(reply_to) <= MAX_REPLY_FIELD:
        return None
    if not isinstance(correlation_id, str) or len(correlation_id) > MAX_REPLY_FIELD:
        correlation_id = None
    return ReplyTo(reply_to, correlation_id)


def parse_request(routing_key: str, properties: pika.spec.BasicProperties, body: bytes) -> ClientRequest:
    """The request a message carries, or the catalogued error that refuses it (its code as over HTTP)."""
    headers: dict[str, Any] = properties.headers if isinstance(properties.headers, dict) else {}
    credentials = headers.get(AUTHORIZATION_HEADER)
    if isinstance(credentials, bytes):
        credentials = credentials.decode("utf-8", "replace")
    scheme, _, secret = credentials.partition(" ") if isinstance(credentials, str) else ("", "", "")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("an `authorization: Bearer <api key>` header is required")
    if properties.message_id is None:
        raise IdempotencyKeyMissing("the message_id carries the Idempotency-Key and is required")
    key = validate_idempotency_key(properties.message_id)
    limit = MAX_BATCH_BODY_BYTES if routing_key == Batch.type else MAX_BODY_BYTES
    if len(body) > limit:
        raise PayloadTooLarge(f"a {routing_key[:40]!r} body may hold at most {limit} bytes")
    model = BODIES.get(routing_key)
    if model is None:
        raise ValidationFailed(f"unknown command {routing_key!r}; routing keys: {', '.join(sorted(BODIES))}")
    return ClientRequest(secret.strip(), key, parse_body(model, body))


def reply_body(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
