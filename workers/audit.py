"""The audit consumer: every ledger event and every request received, from its own durable queue, into the
audit store (MongoDB).

Run with `python -m workers.audit` (see Procfile). The ledger never waits for it: events reach it through the
outbox, the relay and RabbitMQ. It takes them in groups (`CLEANLEDGER_AUDIT_GROUP_MAX`), writes each group
with one unordered `insert_many`, idempotent by event id, and acknowledges the group only then. While MongoDB
is down the events wait in the queue (`CLEANLEDGER_AUDIT_QUEUE`) and the consumer retries with backoff; a
consumer killed mid-group leaves its group to be redelivered, and the store keeps one copy of each.

Each event is an operation's record: the request as claimed (`request`), its idempotency key and operation
id, and what it committed (`transaction.posted`: the transaction, its entries and the balances it left) or why
it was refused (`transaction.rejected`: the problem). Administrative actions are events too (`account.status_changed`;
`admin.api_key.created`, `admin.api_key.revoked`). The ingress nodes publish, in groups, the record of every
mutating request they answered (`request.received`): as received, secrets cut out, with the answer given,
linked to the operation the answer names.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from types import FrameType
from typing import Any

import pika.exceptions
import structlog
from pymongo.errors import BulkWriteError

from core.adapters import json_text
from core.adapters.metrics import AUDIT_RECORDS_WRITTEN
from core.adapters.rabbitmq.consumer import Delivery, EventConsumer
from core.adapters.rabbitmq.events import POSITION_HEADER
from core.adapters.rabbitmq.trail import REQUEST_RECORDS_TYPE
from core.application.ports import AuditRecord, AuditStore, AuditUnavailable
from core.bootstrap import audit_store, event_consumer
from core.domain.secrets import redact
from core.entrypoint import start

log = structlog.get_logger("audit")
# How long the consumer waits for a first event before it checks for a stop request, in seconds.
IDLE_POLL_S = 1.0
# Waits between attempts to reach MongoDB or RabbitMQ again, in seconds: doubling up to the cap.
RETRY_FIRST_S = 0.2
RETRY_CAP_S = 5.0
# After the first event of a group, how long to wait for more, in seconds.
GROUP_WAIT_S = 0.05
# What a request's record keeps, besides its answer (parsed) and what the record itself holds.
REQUEST_FIELDS = ("request_id", "node", "api_key_id", "method", "path", "query", "headers", "body", "status")


def audit_records(delivery: Delivery) -> list[AuditRecord]:
    """The records of one message: a ledger event's (`core/adapters/rabbitmq/events.py`), or a group of requests
    an ingress answered (`core/adapters/rabbitmq/trail.py`). ValueError when it is neither."""
    if delivery.properties.type == REQUEST_RECORDS_TYPE:
        try:
            documents = json_text.loads(delivery.body)
            if not isinstance(documents, list):
                raise TypeError("not a list of requests")
            return [request_record(document) for document in documents]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a group of request records: {exc}") from None
    return [event_record(delivery)]


def event_record(delivery: Delivery) -> AuditRecord:
    position = (delivery.properties.headers or {}).get(POSITION_HEADER)
    try:
        # A secret a client put in what the ledger keeps (an account's metadata) stays out of the trail.
        event = json_text.loads(redact(delivery.body.decode()))
        data = event["data"]
        return AuditRecord(
            id=str(event["id"]),
            kind=str(event["type"]),
            tenant_id=str(event["tenant_id"]),
            occurred_at=datetime.fromisoformat(event["occurred_at"]),
            operation_id=data.get("operation_id"),
            idempotency_key=data.get("idempotency_key"),
            document=data,
            position=position if isinstance(position, int) else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an event: {exc}") from None


def request_record(document: dict[str, Any]) -> AuditRecord:
    """A request as received, linked to the operation its answer names (accepted, or refused as a reused key)."""
    answer = _json_or_text(document["answer"])
    operation_id = None
    if isinstance(answer, dict):
        operation_id = answer.get("id") if answer.get("object") == "operation" else answer.get("operation_id")
    kept = {name: document[name] for name in REQUEST_FIELDS}
    return AuditRecord(
        id=str(document["id"]),
        kind=REQUEST_RECORDS_TYPE,
        tenant_id=document["tenant_id"],
        occurred_at=datetime.fromisoformat(document["received_at"]),
        operation_id=operation_id if isinstance(operation_id, str) else None,
        idempotency_key=document["idempotency_key"],
        document={**kept, "answer": answer},
    )


def _json_or_text(text: str | None) -> Any:
    """An answer as JSON when it is (they all are, problem documents included), else as the text it was."""
    if text is None:
        return None
    try:
        return json_text.loads(text)
    except ValueError:
        return text


class AuditWorker:
    def __init__(self, store: AuditStore, consumer: EventConsumer) -> None:
        self.store = store
        self.consumer = consumer
        self.stopping = False

    def run(self) -> None:
        backoff = RETRY_FIRST_S
        while not self.stopping:
            try:
                if not self.consumer.is_open:
                    self.consumer.open()
                    log.info("audit.consuming", queue=self.consumer.queue_name)
                group = self.consumer.next_group(timeout_s=IDLE_POLL_S)
                if group:
                    self.handle(group)
                backoff = RETRY_FIRST_S
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.warning("audit.broker_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=backoff)
                self.consumer.close()
                time.sleep(backoff)
                backoff = min(RETRY_CAP_S, backoff * 2)
        self.consumer.close()

    def stop(self) -> None:
        self.stopping = True

    def handle(self, group: list[Delivery]) -> None:
        records: list[tuple[Delivery, AuditRecord]] = []
        rejected: set[int] = set()
        for delivery in group:
            try:
                records.extend((delivery, record) for record in audit_records(delivery))
            except ValueError as exc:
                log.error("audit.message_invalid", error=str(exc), tag=delivery.tag)
                rejected.add(delivery.tag)
        refused = self._write(records)
        if refused is None:
            return  # stopping with the store down: unacknowledged, the group goes back to the queue
        rejected.update(refused)
        for tag in sorted(rejected):
            self.consumer.dead_letter(tag)
        # A multiple-ack must name a tag still outstanding: the last one not rejected, if any.
        kept = [delivery.tag for delivery in group if delivery.tag not in rejected]
        if kept:
            self.consumer.ack_through(max(kept))

    def _write(self, records: list[tuple[Delivery, AuditRecord]]) -> set[int] | None:
        """Write the group, waiting out an unreachable store (None: asked to stop meanwhile). Returns the tags
        of the records the store refuses (a document it cannot hold), found by writing each on its own."""
        backoff = RETRY_FIRST_S
        while True:
            try:
                written = self.store.write([record for _, record in records])
                AUDIT_RECORDS_WRITTEN.inc(written)
                log.info("audit.written", group=len(records), new=written)
                return set()
            except AuditUnavailable as exc:
                if self.stopping:
                    return None
                log.warning("audit.store_unavailable", error=str(exc), retry_in_s=backoff, group=len(records))
                self.consumer.sleep(backoff)
                backoff = min(RETRY_CAP_S, backoff * 2)
            except BulkWriteError:
                refused: set[int] = set()
                for delivery, record in records:
                    try:
                        self.store.write([record])
                    except BulkWriteError as exc:
                        log.error("audit.record_refused", record_id=record.id, error=str(exc)[:500])
                        refused.add(delivery.tag)
                return refused


def main() -> None:
    settings = start("audit", "Audit consumer: writes every ledger event to the MongoDB audit trail.")
    consumer = event_consumer(
        settings, queue=settings.audit_queue, group_max=settings.audit_group_max, group_wait_s=GROUP_WAIT_S
    )
    worker = AuditWorker(audit_store(settings), consumer)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    log.info("audit.stopped")


if __name__ == "__main__":
    main()
