"""The request trail on RabbitMQ: every mutating request an ingress answered, queued for the audit consumer.

The records of the requests answered meanwhile travel together (`GroupWriter`): one persistent message per
group, a JSON array of request documents, published to the audit consumer's own queue with a publisher
confirm, pipelined with the node's other publishes. A request waits for its group's confirm, at most
`wait_s`: normally its record is in RabbitMQ before its answer leaves, and an unreachable broker delays an
answer by that bound, never more. A record RabbitMQ did not confirm is kept (up to `max_unsent`, oldest
dropped first, each counted as lost) and published again every `RETRY_S` until it is.

Each document has an `id` of its own, made here once: a message published twice (a confirm that never came)
writes each record once. MongoDB is never on this path: the audit consumer writes the queue into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

import pika
import structlog

from core.adapters import json_text
from core.adapters.metrics import REQUEST_RECORDS, REQUEST_RECORDS_UNSENT
from core.adapters.rabbitmq.confirms import ConfirmingPublisher, PublishFailed
from core.adapters.rabbitmq.events import CONTENT_TYPE, PERSISTENT, subscriber_queue_topology
from core.application.grouping import GroupWriter
from core.application.ports import ReceivedRequest, RequestTrail
from core.domain.ids import new_id

log = structlog.get_logger(__name__)

REQUEST_RECORDS_TYPE = "request.received"  # the messages' AMQP `type`, and the records' kind in the store
RECORDS_HEADER = "x-audit-records"  # how many request documents the message holds
# Seconds between attempts to publish the records RabbitMQ did not confirm.
RETRY_S = 1.0
# Most records one retry publishes in one message.
RETRY_CHUNK = 1000
# Seconds `close` gives the records still unsent.
CLOSE_WAIT_S = 2.0

Document = dict[str, Any]


def request_document(request: ReceivedRequest) -> Document:
    """The record as the queue carries it (`workers/audit.py` reads it back)."""
    return {
        "id": str(new_id()),
        "request_id": request.request_id,
        "received_at": request.received_at.isoformat(),
        "node": request.node,
        "tenant_id": request.tenant_id,
        "api_key_id": request.api_key_id,
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body,
        "status": request.status,
        "answer": request.answer,
        "idempotency_key": request.idempotency_key,
    }


class AmqpRequestTrail(RequestTrail):
    """queue, exchange: the audit consumer's queue and the events exchange it is bound to (declared as the
    consumer declares them). wait_s: longest a request waits for its record's confirm, in seconds.
    max_group: most records in one message. max_unsent: most unconfirmed records kept for retries."""

    def __init__(
        self,
        amqp_url: str,
        *,
        queue: str,
        exchange: str,
        wait_s: float,
        max_group: int = 256,
        max_unsent: int = 100_000,
        name: str | None = None,
    ) -> None:
        self.queue = queue
        self.wait_s = wait_s
        self.max_unsent = max_unsent
        self.publisher = ConfirmingPublisher(
            amqp_url,
            topology=subscriber_queue_topology(queue, exchange),
            name=name or f"cleanledger request trail {os.getpid()}",
        )
        self._writer: GroupWriter[Document, None] = GroupWriter(self._flush, max_group=max_group, writers=2)
        self._unsent: deque[Document] = deque()
        self._retrying: asyncio.Task[None] | None = None

    async def record(self, request: ReceivedRequest) -> None:
        document = request_document(request)
        if self._retrying is None:
            self._retrying = asyncio.create_task(self._retry_unsent())
        with contextlib.suppress(Exception):  # TimeoutError: it goes on in the background; others: logged there
            await asyncio.wait_for(asyncio.shield(self._writer.submit(document)), self.wait_s)

    async def close(self) -> None:
        await self._writer.close()
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                while self._unsent and await self._publish_unsent():
                    pass
        if self._unsent:
            log.error("trail.records_lost", records=len(self._unsent), reason="stopped with RabbitMQ unreachable")
            REQUEST_RECORDS.labels("lost").inc(len(self._unsent))
            self._unsent.clear()
            REQUEST_RECORDS_UNSENT.set(0)
        await self.publisher.close()

    async def _flush(self, documents: Sequence[Document]) -> list[BaseException | None]:
        if not await self._publish(documents):
            self._keep(documents)
        return [None] * len(documents)

    async def _publish(self, documents: Sequence[Document]) -> bool:
        body = json_text.dumps(documents).encode()
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            type=REQUEST_RECORDS_TYPE,
            headers={RECORDS_HEADER: len(documents)},
        )
        try:
            await self.publisher.publish(exchange="", routing_key=self.queue, body=body, properties=properties)
        except PublishFailed as exc:
            log.warning("trail.publish_failed", records=len(documents), error=str(exc))
            return False
        REQUEST_RECORDS.labels("queued").inc(len(documents))
        return True

    def _keep(self, documents: Sequence[Document]) -> None:
        self._unsent.extend(documents)
        overflow = len(self._unsent) - self.max_unsent
        if overflow > 0:
            for _ in range(overflow):
                self._unsent.popleft()
            log.error("trail.records_lost", records=overflow, reason="backlog full")
            REQUEST_RECORDS.labels("lost").inc(overflow)
        REQUEST_RECORDS_UNSENT.set(len(self._unsent))

    async def _publish_unsent(self) -> bool:
        chunk = [self._unsent.popleft() for _ in range(min(RETRY_CHUNK, len(self._unsent)))]
        published = await self._publish(chunk)
        if not published:
            self._unsent.extendleft(reversed(chunk))  # back in front, in their order
        REQUEST_RECORDS_UNSENT.set(len(self._unsent))
        return published

    async def _retry_unsent(self) -> None:
        while True:
            await asyncio.sleep(RETRY_S)
            while self._unsent and await self._publish_unsent():
                pass
