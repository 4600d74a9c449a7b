"""The command worker: settles queued commands in groups, one commit per group (group commit).

Run with `python -m workers.consumer` (see Procfile); start more of them to scale out. Each one:
1. takes a group of messages off the command queue (`CommandConsumer.next_group`);
2. settles the whole group in one SERIALIZABLE unit of work (`LedgerService.settle_group`): business
   rejections are final results, a serialization failure re-runs the group, and a command that fails for
   any other reason is split off so it fails alone;
3. only after the commit acknowledges the group (one multiple-ack), then caches and announces the results
   in Redis (one pipeline) for the ingress requests waiting on them.
A command that failed alone is sent back for a later try with backoff (`CLEANLEDGER_WORKER_MAX_RETRIES`
tries); once they are spent its operation settles as `processing-failed` and the message moves to the
dead-letter queue `<queue>.XQ`. A message that is not a valid command, or whose idempotency key belongs to
another request, goes to the dead letters at once. When PostgreSQL cannot be reached, nothing is blamed:
the worker waits and settles the same group again. A worker that dies at any point leaves its unacknowledged
group to be redelivered, and settling it again replays what was committed.

Commands of direct AMQP producers (`core/adapters/rabbitmq/requests.py`) join the same groups: their API keys
are checked for the whole group in one query, their bodies with the HTTP schemas, and once settled (or
refused) the worker answers on their `reply_to`. A retry carries them on as ordinary command messages, their
reply address with them and their secret left behind.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pika.exceptions
import structlog
from psycopg_pool import ConnectionPool

from core.adapters.metrics import (
    COMMANDS_GIVEN_UP,
    COMMANDS_RETRIED,
    GROUP_COMMANDS,
    GROUP_SECONDS,
    OPERATIONS_SETTLED,
    watch_retries,
)
from core.adapters.postgres.api_keys import find_api_keys
from core.adapters.postgres.db import PREDICATE_LOCK_PAGES_NEEDED, predicate_lock_pages
from core.adapters.rabbitmq.commands import (
    ReplyTo,
    command_message,
    parse_command_message,
    retry_message,
)
from core.adapters.rabbitmq.consumer import CommandConsumer, Delivery
from core.adapters.rabbitmq.requests import ClientRequest, parse_request, reply_body, reply_of
from core.adapters.redis.cache import SettlementPublisher
from core.application.group_commit import Unsettled
from core.application.ports import StoreUnavailable, Submission
from core.application.views import OperationResult, operation_json
from core.bootstrap import LedgerService, bootstrap, command_consumer, settlement_publisher
from core.domain.errors import LedgerError, ProcessingFailed, Unauthorized
from core.domain.ids import new_id
from core.entrypoint import start
from core.settings import Settings

log = structlog.get_logger("worker")
# How long the worker waits for a first message before it checks for a stop request, in seconds.
IDLE_POLL_S = 1.0
# Waits between attempts to reach PostgreSQL or RabbitMQ again, in seconds: doubling up to the cap.
RECONNECT_FIRST_S = 0.2
RECONNECT_CAP_S = 5.0


@dataclass
class Verdicts:
    """What to do with each message of a group once it is settled; AMQP acts only, done after the commit."""

    announce: list[tuple[str, OperationResult]] = field(default_factory=list)  # (tenant, outcome)
    dead_letter: list[int] = field(default_factory=list)  # delivery tags
    dead_letter_copies: list[bytes] = field(default_factory=list)  # single commands out of batch messages
    refused: list[tuple[Delivery, LedgerError]] = field(default_factory=list)  # client messages, kept apart
    retry: list[tuple[bytes, int]] = field(default_factory=list)  # (message, attempt)
    replies: list[tuple[ReplyTo, dict[str, Any], bool]] = field(default_factory=list)  # (to, document, problem)

    def refuse(self, delivery: Delivery, reply: ReplyTo | None, error: LedgerError) -> None:
        """A message that can never settle: answered if it asked, then dead-lettered with its reason. A
        client's message is copied to its own dead-letter queue without its secret instead."""
        if reply is not None:
            self.replies.append((reply, error.to_problem(), True))
        if delivery.from_client:
            self.refused.append((delivery, error))
        else:
            self.dead_letter.append(delivery.tag)


@dataclass(frozen=True, slots=True)
class Parsed:
    delivery: Delivery
    document: dict[str, Any]  # the command message, as a retry sends it on
    submission: Submission
    retries: int
    reply: ReplyTo | None
    batched: bool = False  # one of the commands of a batch message (the message is acknowledged, never rejected)


class CommandWorker:
    def __init__(
        self, ledger: LedgerService, consumer: CommandConsumer, settlements: SettlementPublisher, *, settings: Settings
    ) -> None:
        self.ledger = ledger
        self.consumer = consumer
        self.settlements = settlements
        self.settings = settings
        self.stopping = False

    def run(self) -> None:
        """Consume until `stop()`; reconnects to RabbitMQ and waits out PostgreSQL as long as it takes."""
        backoff = RECONNECT_FIRST_S
        while not self.stopping:
            try:
                if not self.consumer.is_open:
                    self.consumer.open()
                    log.info("worker.consuming", queue=self.consumer.queue_name)
                group = self.consumer.next_group(timeout_s=IDLE_POLL_S)
                if group:
                    self.handle(group)
                backoff = RECONNECT_FIRST_S
            except (pika.exceptions.AMQPError, OSError) as exc:
                # The group's unacknowledged messages return to the queue; settling them again replays.
                log.warning("worker.broker_unavailable", error=f"{type(exc).__name__}: {exc}", retry_in_s=backoff)
                self.consumer.close()
                time.sleep(backoff)
                backoff = min(RECONNECT_CAP_S, backoff * 2)
            except Exception:
                # A bug, not an outage: the group goes back to the queue and the worker starts afresh, slowly,
                # rather than exiting and leaving the queue unserved.
                log.exception("worker.group_crashed", retry_in_s=backoff)
                self.consumer.close()
                time.sleep(backoff)
                backoff = min(RECONNECT_CAP_S, backoff * 2)
        self.consumer.close()

    def stop(self) -> None:
        """Finish the group in hand, acknowledge it, then return from `run`."""
        self.stopping = True

    def handle(self, group: list[Delivery]) -> None:
        backoff = RECONNECT_FIRST_S
        while True:
            try:
                verdicts = self.decide(group)
                break
            except StoreUnavailable as exc:
                if self.stopping:
                    return  # unacknowledged: the group goes back to the queue when the connection closes
                log.warning("worker.database_unavailable", error=str(exc), retry_in_s=backoff, group=len(group))
                self.consumer.sleep(backoff)
                backoff = min(RECONNECT_CAP_S, backoff * 2)
        for body, attempt in verdicts.retry:
            self.consumer.retry_later(body, attempt=attempt)
        for tag in verdicts.dead_letter:
            self.consumer.dead_letter(tag)
        for body in verdicts.dead_letter_copies:
            self.consumer.dead_letter_copy(body)
        for delivery, error in verdicts.refused:
            self.consumer.refuse_request(delivery, code=error.code, reason=error.detail)
        # A multiple-ack must name a tag still outstanding: the last one not rejected above, if any.
        rejected = set(verdicts.dead_letter)
        kept = [delivery.tag for delivery in group if delivery.tag not in rejected]
        if kept:
            self.consumer.ack_through(max(kept))
        for reply, document, problem in verdicts.replies:
            self.consumer.reply(reply, reply_body(document), problem=problem)
        self.settlements.settled_many(
            [
                (str(outcome.operation_id), {"tenant_id": tenant, "operation": operation_json(outcome)})
                for tenant, outcome in verdicts.announce
            ],
            ttl_s=self.settings.result_cache_s,
        )

    def decide(self, group: list[Delivery]) -> Verdicts:
        """Settle the group and decide each message's fate; touches PostgreSQL only, so it can run again."""
        verdicts = Verdicts()
        parsed = self._parse(group, verdicts)
        started = time.perf_counter()
        outcomes = self.ledger.settle_group([p.submission for p in parsed])
        GROUP_SECONDS.observe(time.perf_counter() - started)
        GROUP_COMMANDS.observe(len(parsed))
        for p, outcome in zip(parsed, outcomes, strict=True):
            tenant = p.submission.command.tenant_id
            if isinstance(outcome, Unsettled) and p.retries < self.settings.worker_max_retries:
                verdicts.retry.append((retry_message(p.document), p.retries + 1))
                COMMANDS_RETRIED.inc()
                continue
            if isinstance(outcome, Unsettled):
                if p.batched:  # the others of its message settled: keep this one alone in the dead letters
                    verdicts.dead_letter_copies.append(json.dumps(p.document, separators=(",", ":")).encode())
                elif not p.delivery.from_client:
                    verdicts.dead_letter.append(p.delivery.tag)
                try:
                    outcome = self._give_up(p.submission, p.retries)
                except StoreUnavailable:
                    raise
                except Exception:  # not even its failure can be stored: the dead letter keeps the command
                    log.exception("operation.give_up_failed", operation_id=str(p.submission.operation_id))
                    continue
            if isinstance(outcome, OperationResult):
                OPERATIONS_SETTLED.labels(str(outcome.status)).inc()
                verdicts.announce.append((tenant, outcome))
                if p.reply is not None:
                    verdicts.replies.append((p.reply, operation_json(outcome), False))
            else:  # the request itself is wrong (its key belongs to another request): no retry can fix it
                log.error("worker.message_refused", operation_id=str(p.submission.operation_id), code=outcome.code)
                verdicts.refuse(p.delivery, p.reply, outcome)
        log.info(
            "worker.group_settled",
            size=len(group),
            settled=len(verdicts.announce),
            retried=len(verdicts.retry),
            dead_lettered=len(verdicts.dead_letter),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return verdicts

    def _parse(self, group: list[Delivery], verdicts: Verdicts) -> list[Parsed]:
        """The group's commands; the messages that are none are refused in `verdicts`."""
        parsed: list[Parsed] = []
        requests: list[tuple[Delivery, ClientRequest, ReplyTo | None]] = []
        for delivery in group:
            reply = reply_of(delivery.properties) if delivery.from_client else None
            try:
                if delivery.from_client:
                    requests.append(
                        (delivery, parse_request(delivery.routing_key, delivery.properties, delivery.body), reply)
                    )
                    continue
                carried = parse_command_message(delivery.body)
            except LedgerError as exc:
                log.warning("worker.message_invalid", code=exc.code, tag=delivery.tag, from_client=delivery.from_client)
                verdicts.refuse(delivery, reply, exc)
                continue
            for document, queued in carried:
                submission = Submission(queued.command, queued.idempotency_key, queued.operation_id, queued.request)
                parsed.append(Parsed(delivery, document, submission, queued.retries, queued.reply, len(carried) > 1))
        # One query authenticates every client message of the group; the tenant is the key's, never the body's.
        keys = find_api_keys(self.ledger.pool, {request.secret for _, request, _ in requests}) if requests else {}
        for delivery, request, reply in requests:
            api_key = keys.get(request.secret)
            try:
                if api_key is None:
                    raise Unauthorized("the API key is unknown or revoked")
                command = request.body.to_command(api_key.tenant_id)
            except LedgerError as exc:
                verdicts.refuse(delivery, reply, exc)
                continue
            submission = Submission(command, request.idempotency_key, new_id())
            message = command_message(
                queue_name=self.settings.command_queue,
                operation_id=submission.operation_id,
                idempotency_key=submission.idempotency_key,
                command=command,
                reply=reply,
            )
            parsed.append(Parsed(delivery, message.asdict(), submission, 0, reply))
        return parsed

    def _give_up(self, submission: Submission, retries: int) -> OperationResult:
        COMMANDS_GIVEN_UP.inc()
        error = ProcessingFailed(f"gave up after {retries} retries", retries=retries)
        failed = self.ledger.give_up(
            submission.command,
            idempotency_key=submission.idempotency_key,
            operation_id=submission.operation_id,
            error=error,
        )
        log.error("operation.processing_failed", operation_id=str(submission.operation_id), retries=retries)
        return failed


def warn_if_predicate_locks_too_few(pool: ConnectionPool) -> None:
    """Say so at start when the server would turn a batch's reads into a lock on a whole table (README,
    Configuration)."""
    pages = predicate_lock_pages(pool)
    if pages < PREDICATE_LOCK_PAGES_NEEDED:
        log.warning(
            "worker.predicate_locks_too_few",
            pages=pages,
            needed=PREDICATE_LOCK_PAGES_NEEDED,
            advice="set max_pred_locks_per_relation = 4096 and max_pred_locks_per_transaction = 1024 in"
            " postgresql.conf (see README, Configuration): large batches may otherwise be refused under load",
        )


def build(settings: Settings) -> CommandWorker:
    """The worker's adapters, built once per process by the composition root."""
    ledger = bootstrap(settings, pool_size=2)
    watch_retries(ledger.retry.counter)
    warn_if_predicate_locks_too_few(ledger.pool)
    return CommandWorker(ledger, command_consumer(settings), settlement_publisher(settings), settings=settings)


def main() -> None:
    settings = start("worker", "Group-commit worker: settles the commands of the command and request queues.")
    worker = build(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run()
    finally:
        worker.ledger.close()
        log.info("worker.stopped")


if __name__ == "__main__":
    main()
