"""What the audit consumer makes of the messages on its queue: request records (from the ingress nodes) and
events (from the relay). A message it cannot read is refused (ValueError: dead-lettered), never a crash."""

from __future__ import annotations

import json
from typing import Any

import pika
import pytest

from core.adapters.rabbitmq.consumer import Delivery
from core.adapters.rabbitmq.trail import REQUEST_RECORDS_TYPE
from workers.audit import audit_records

RECORD: dict[str, Any] = {
    "id": "rec-1", "request_id": "r1", "received_at": "2026-11-27T00:00:00+00:00", "node": "n:1",
    "tenant_id": "t", "api_key_id": "k", "method": "POST", "path": "/v1/credits", "query": "",
    "headers": {"authorization": "[redacted]"}, "body": "{}", "status": 202,
    "answer": '{"id": "op-1", "object": "operation", "status": "pending"}', "idempotency_key": "key-1",
}  # fmt: skip


def delivery(body: bytes, kind: str | None = REQUEST_RECORDS_TYPE) -> Delivery:
    return Delivery(1, body, False, False, "ledger.audit", pika.BasicProperties(type=kind))


def test_a_group_of_request_records_is_a_record_each_linked_to_its_operation() -> None:
    refused = {**RECORD, "id": "rec-2", "answer": '{"code": "idempotency-key-reused", "operation_id": "op-9"}'}
    unreadable = {**RECORD, "id": "rec-3", "answer": "not json", "tenant_id": None}
    records = audit_records(delivery(json.dumps([RECORD, refused, unreadable]).encode()))
    assert [(r.id, r.kind, r.operation_id) for r in records] == [
        ("rec-1", "request.received", "op-1"),
        ("rec-2", "request.received", "op-9"),
        ("rec-3", "request.received", None),
    ]
    assert records[0].idempotency_key == "key-1" and records[0].document["answer"]["status"] == "pending"
    assert records[2].tenant_id is None and records[2].document["answer"] == "not json"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe not utf-8",
        b"{not json",
        b'{"id": "x"}',  # an object, not a list
        b"[1, 2]",  # not records
        json.dumps([{k: v for k, v in RECORD.items() if k != "received_at"}]).encode(),  # a field missing
        json.dumps([{**RECORD, "received_at": "yesterday"}]).encode(),
        b"[" + b"[" * 100_000 + b"]" * 100_000 + b"]",  # nested past the parser's depth
    ],
)
def test_a_request_record_message_that_cannot_be_read_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        audit_records(delivery(body))


@pytest.mark.parametrize("body", [b"\xff", b"[]", b'{"id": 1}', b'{"id": "e", "type": "x", "data": {}}'])
def test_an_event_message_that_cannot_be_read_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        audit_records(delivery(body, kind="transaction.posted"))
