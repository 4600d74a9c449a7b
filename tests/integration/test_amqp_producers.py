"""Direct AMQP producers: commands published to the `ledger.requests` exchange, answered on reply_to, settled
by a real worker through the same use case, idempotency and problem codes as HTTP."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pika.adapters.blocking_connection import BlockingChannel

from core.adapters.postgres.api_keys import create_api_key, revoke_api_key
from core.adapters.rabbitmq.producer import LedgerProducer
from core.application.commands import Transfer
from core.application.requests import BODIES
from core.bootstrap import LedgerService
from core.domain.errors import catalogue
from core.domain.money import Money
from core.settings import Settings
from tests.helpers import balance, credit, key, open_account
from tests.integration.test_worker_failures import dead_letters
from tests.processes import ManagedProcess, settings_env, worker_command
from tests.services import delete_queues, private_queues

REPLY_TIMEOUT_S = 15.0
ACCOUNT = str(uuid.uuid4())  # any account id: these messages are refused before an account is looked at


class Producer:
    """An internal system's side: publish commands, read the answers from an exclusive reply queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        self.channel: BlockingChannel = self.connection.channel()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.wait_for_worker()

    def wait_for_worker(self) -> None:
        """Until a worker consumes the request queue (it declares and binds it as it starts)."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            probe = self.connection.channel()
            try:
                if probe.queue_declare(self.settings.request_queue, passive=True).method.consumer_count:
                    return
            except pika.exceptions.ChannelClosedByBroker:
                pass  # not declared yet
            finally:
                if probe.is_open:
                    probe.close()
            self.connection.sleep(0.1)
        raise AssertionError("no worker consumes the request queue")

    def send(
        self,
        command_type: str,
        body: dict[str, Any] | bytes,
        *,
        secret: str | None,
        message_id: str | None,
        reply: bool = True,
    ) -> str:
        correlation_id = uuid.uuid4().hex
        self.channel.basic_publish(
            self.settings.request_exchange,
            command_type,
            body if isinstance(body, bytes) else json.dumps(body).encode(),
            pika.BasicProperties(
                message_id=message_id,
                headers={"authorization": f"Bearer {secret}"} if secret else {},
                reply_to=self.reply_queue if reply else None,
                correlation_id=correlation_id,
                content_type="application/json",
                delivery_mode=2,
            ),
        )
        return correlation_id

    def answer(self, correlation_id: str) -> tuple[str, dict[str, Any]]:
        """(content type, document) of the reply with this correlation id."""
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            if properties.correlation_id == correlation_id:
                return str(properties.content_type), json.loads(body)
        raise AssertionError(f"no reply for {correlation_id} within {REPLY_TIMEOUT_S}s")

    def call(self, command_type: str, body: dict[str, Any] | bytes, **kw: Any) -> tuple[str, dict[str, Any]]:
        return self.answer(self.send(command_type, body, **kw))

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def producer(settings: Settings, worker: ManagedProcess) -> Iterator[Producer]:
    client = Producer(settings)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def secret(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant)[1]


def test_a_transfer_published_straight_to_rabbitmq_settles_and_is_answered(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 1_000)
    body = {"source_id": str(a), "destination_id": str(b), "amount": 250, "currency": "USD"}
    content_type, answer = producer.call("transfer", body, secret=secret, message_id="amqp-transfer-1")
    assert content_type == "application/json"
    assert answer["status"] == "succeeded", answer
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (750, 250)
    # The operation is the tenant's like any other: readable over the same queries as HTTP.
    operation = ledger.queries.operation(tenant, uuid.UUID(answer["id"]))
    assert operation is not None and operation.result == answer["result"]

    # The message id is the Idempotency-Key: sent again, the same operation answers and nothing moves twice.
    _, again = producer.call("transfer", body, secret=secret, message_id="amqp-transfer-1")
    assert (again["id"], again["status"]) == (answer["id"], "succeeded")
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (750, 250)
    # The same key for another request is refused with the HTTP code, alone.
    changed = {**body, "amount": 1}
    content_type, reused = producer.call("transfer", changed, secret=secret, message_id="amqp-transfer-1")
    assert content_type == "application/problem+json"
    assert (reused["code"], reused["status"]) == ("idempotency-key-reused", 422)


def test_the_key_space_is_shared_with_http(producer: Producer, ledger: LedgerService, tenant: str, secret: str) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 100)
    over_http = ledger.execute(Transfer(tenant, a, b, Money.for_posting(40, "USD")), idempotency_key="shared-key")
    body = {"source_id": str(a), "destination_id": str(b), "amount": 40, "currency": "USD"}
    _, answer = producer.call("transfer", body, secret=secret, message_id="shared-key")
    assert answer["id"] == str(over_http.operation_id)
    assert balance(ledger, tenant, b) == 40


def test_business_rejections_and_other_tenants_accounts_answer_as_over_http(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str
) -> None:
    mine = open_account(ledger, tenant)
    theirs = open_account(ledger, f"{tenant}-other")
    credit(ledger, f"{tenant}-other", theirs, 500)
    _, broke = producer.call(
        "debit", {"account_id": str(mine), "amount": 1, "currency": "USD"}, secret=secret, message_id=key()
    )
    assert (broke["status"], broke["problem"]["code"]) == ("failed", "insufficient-funds")
    # The tenant is the API key's: another tenant's account does not exist for it, and nothing moves.
    _, stolen = producer.call(
        "transfer",
        {"source_id": str(theirs), "destination_id": str(mine), "amount": 100, "currency": "USD"},
        secret=secret,
        message_id=key(),
    )
    assert (stolen["status"], stolen["problem"]["code"]) == ("failed", "account-not-found")
    assert balance(ledger, f"{tenant}-other", theirs) == 500
    assert balance(ledger, tenant, mine) == 0


def test_an_account_is_frozen_and_closed_over_amqp_as_over_http(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str
) -> None:
    mine = open_account(ledger, tenant)
    _, frozen = producer.call(
        "change_account_status", {"account_id": str(mine), "status": "frozen"}, secret=secret, message_id=key()
    )
    assert (frozen["status"], frozen["result"]["account"]["status"]) == ("succeeded", "frozen")
    _, refused = producer.call(
        "credit", {"account_id": str(mine), "amount": 5, "currency": "USD"}, secret=secret, message_id=key()
    )
    assert refused["problem"]["code"] == "account-frozen"
    _, closed = producer.call(
        "change_account_status", {"account_id": str(mine), "status": "closed"}, secret=secret, message_id=key()
    )
    assert closed["result"]["account"]["status"] == "closed"
    content_type, bad = producer.call(
        "change_account_status", {"account_id": str(mine), "status": "gone"}, secret=secret, message_id=key()
    )
    assert (content_type, bad["code"]) == ("application/problem+json", "validation-failed")


@pytest.mark.parametrize(
    ("command_type", "body", "auth", "message_id", "code"),
    [
        ("credit", {"amount": 5, "currency": "USD"}, True, "k", "validation-failed"),
        ("credit", b"\xff{not json", True, "k", "request-invalid"),
        ("credit", {"account_id": "x", "amount": 5, "currency": "USD", "extra": 1}, True, "k", "validation-failed"),
        ("credit", {"account_id": ACCOUNT, "amount": -5, "currency": "USD"}, True, "k", "amount-invalid"),
        ("credit", {"account_id": ACCOUNT, "amount": 5, "currency": "XXX"}, True, "k", "currency-invalid"),
        ("credit", {"account_id": ACCOUNT, "amount": 5, "currency": "USD"}, True, None, "idempotency-key-missing"),
        ("credit", {"account_id": ACCOUNT, "amount": 5, "currency": "USD"}, True, "a b", "idempotency-key-invalid"),
        ("credit", {"account_id": ACCOUNT, "amount": 5, "currency": "USD"}, False, "k", "unauthorized"),
        ("credit", b"{" + b" " * 70_000 + b"}", True, "k", "payload-too-large"),
    ],
)  # fmt: skip
def test_refused_messages_are_answered_and_kept_with_their_reason_but_not_their_secret(
    producer: Producer,
    settings: Settings,
    secret: str,
    command_type: str,
    body: dict[str, Any] | bytes,
    auth: bool,
    message_id: str | None,
    code: str,
) -> None:
    drain(settings, f"{settings.request_queue}.XQ")  # what earlier tests left
    content_type, problem = producer.call(
        command_type, body, secret=secret if auth else None, message_id=message_id and f"{message_id}-{key()}"
    )
    assert (content_type, problem["code"]) == ("application/problem+json", code)
    assert secret not in json.dumps(problem)
    # Not dropped silently: kept in the request queue's dead letters, with the reason and without the secret.
    [(properties, kept)] = drain(settings, f"{settings.request_queue}.XQ")
    assert properties.headers["x-refused-code"] == code
    assert properties.headers["x-refused-reason"]
    assert "authorization" not in properties.headers
    assert secret not in repr(properties) and secret.encode() not in kept
    assert kept == (body if isinstance(body, bytes) else json.dumps(body).encode())
    assert queue_depth(settings, settings.request_queue) == 0  # and the worker goes on serving


def test_an_unknown_command_is_unroutable(producer: Producer, settings: Settings, secret: str) -> None:
    producer.channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        producer.channel.basic_publish(
            settings.request_exchange,
            "refund",
            b"{}",
            pika.BasicProperties(message_id=key(), headers={"authorization": f"Bearer {secret}"}),
            mandatory=True,
        )


def test_a_wrong_or_revoked_key_is_refused_at_once(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    account = open_account(ledger, tenant)
    body = {"account_id": str(account), "amount": 7, "currency": "USD"}
    _, wrong = producer.call("credit", body, secret=secret + "x", message_id=key())
    assert wrong["code"] == "unauthorized"
    _, ok = producer.call("credit", body, secret=secret, message_id=key())
    assert ok["status"] == "succeeded"
    row = db.execute("SELECT id FROM api_keys WHERE tenant_id = %s", (tenant,)).fetchone()
    assert row is not None
    assert revoke_api_key(ledger.pool, row[0])  # type: ignore[arg-type]
    _, revoked = producer.call("credit", body, secret=secret, message_id=key())
    assert revoked["code"] == "unauthorized"
    assert balance(ledger, tenant, account) == 7


def test_a_command_without_reply_to_settles_all_the_same(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str
) -> None:
    account = open_account(ledger, tenant)
    for n in range(20):
        producer.send(
            "credit", {"account_id": str(account), "amount": n + 1, "currency": "USD"}, secret=secret,
            message_id=f"fire-and-forget-{n}", reply=False,
        )  # fmt: skip
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while balance(ledger, tenant, account) != sum(range(1, 21)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert balance(ledger, tenant, account) == sum(range(1, 21))


def drain(settings: Settings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in `queue`, taken off it."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    found = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        connection.close()


def queue_depth(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def test_a_client_command_that_keeps_failing_is_retried_without_its_secret_then_answered_as_failed(
    settings: Settings, ledger: LedgerService, tenant: str, secret: str, poison: dict[str, object]
) -> None:
    impatient = private_queues(settings, "amqp-poison", worker_max_retries=2, worker_min_backoff_ms=50)
    account = open_account(ledger, tenant)
    try:
        with ManagedProcess.start(worker_command(), env=settings_env(impatient), name="amqp-poison-worker") as worker:
            client = Producer(impatient)
            try:
                body = {"account_id": str(account), "amount": 9, "currency": "USD", "metadata": poison}
                _, failed = client.call("credit", body, secret=secret, message_id="doomed-credit")
                try:
                    _, fine = client.call(
                        "credit", {"account_id": str(account), "amount": 3, "currency": "USD"}, secret=secret,
                        message_id="fine-credit",
                    )  # fmt: skip
                except AssertionError:
                    raise AssertionError(worker.output()[-4000:]) from None
            finally:
                client.close()
            assert failed["status"] == "failed", worker.output()
        assert (failed["problem"]["code"], failed["problem"]["retries"]) == ("processing-failed", 2)
        assert fine["status"] == "succeeded"
        assert balance(ledger, tenant, account) == 3
        # The retries travelled as command messages: nothing kept or dead-lettered carries the secret.
        assert dead_letters(impatient) == 1
        assert secret.encode() not in dead_letter_bodies(impatient)
    finally:
        delete_queues(impatient)


def dead_letter_bodies(settings: Settings) -> bytes:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    found = b""
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(f"{settings.command_queue}.XQ", auto_ack=False)
            if method is None:
                return found
            found += body + repr(properties.headers).encode()
    finally:
        connection.close()


def test_the_shipped_producer_publishes_with_confirms_and_awaits_the_answer(
    producer: Producer, settings: Settings, ledger: LedgerService, tenant: str, secret: str
) -> None:
    account = open_account(ledger, tenant)
    with LedgerProducer(settings.amqp_url, api_key=secret, exchange=settings.request_exchange) as client:
        answer = client.send(
            "credit", {"account_id": str(account), "amount": 42, "currency": "USD"}, idempotency_key="typed-1"
        )
        assert (answer.problem, answer.document["status"]) == (False, "succeeded")
        refused = client.send("credit", {"account_id": "nope"}, idempotency_key="typed-2")
        assert (refused.problem, refused.document["code"]) == (True, "validation-failed")
        with pytest.raises(pika.exceptions.UnroutableError):
            client.send("refund", {}, idempotency_key="typed-3")
    assert balance(ledger, tenant, account) == 42


# --- hostile messages, generated -----------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # NULs and lone surrogates included
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
COMMAND_LIKE = st.fixed_dictionaries(
    {
        "account_id": st.uuids().map(str) | ANY_TEXT,
        "amount": st.integers() | st.floats() | ANY_TEXT,
        "currency": st.sampled_from(["USD", "EUR"]) | ANY_TEXT,
    },
    optional={"metadata": st.dictionaries(ANY_TEXT, JSON_VALUES, max_size=4), "status": ANY_TEXT, "legs": JSON_VALUES},
)
MESSAGE_BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    COMMAND_LIKE.map(lambda value: json.dumps(value).encode()),
)


def test_generated_hostile_messages_are_each_answered_and_the_worker_lives_on(
    producer: Producer, settings: Settings, worker: ManagedProcess, ledger: LedgerService, tenant: str, secret: str
) -> None:
    """Bodies (bytes, any JSON, command-shaped JSON with hostile values), authorization headers and message ids
    generated by Hypothesis, on every command's routing key: each message gets exactly one answer on its reply_to
    (an operation, or a catalogued problem), and the worker keeps serving."""
    sent: list[str] = []

    @given(
        command_type=st.sampled_from(sorted(BODIES)),
        body=MESSAGE_BODIES,
        # Mostly a valid key and an id, so that most bodies reach validation and the posting itself.
        authorization=st.one_of(
            *[st.just(f"Bearer {secret}")] * 4, ANY_TEXT.map(lambda text: text.encode("utf-8", "replace"))
        ),
        message_id=st.one_of(
            *[st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)] * 4, st.none()
        ),
    )
    @hypothesis_settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def publish(command_type: str, body: bytes, authorization: str | bytes, message_id: str | None) -> None:
        correlation_id = uuid.uuid4().hex
        producer.channel.basic_publish(
            settings.request_exchange,
            command_type,
            body,
            pika.BasicProperties(
                message_id=f"{message_id}-{key()}" if message_id else message_id,
                headers={"authorization": authorization},
                reply_to=producer.reply_queue,
                correlation_id=correlation_id,
                delivery_mode=2,
            ),
        )
        sent.append(correlation_id)

    publish()
    codes = set(catalogue())
    answered: dict[str, tuple[str, dict[str, Any]]] = {}
    deadline = time.monotonic() + 60
    while len(answered) < len(sent) and time.monotonic() < deadline:
        method, properties, raw = producer.channel.basic_get(producer.reply_queue, auto_ack=True)
        if method is None:
            producer.connection.sleep(0.05)
            continue
        assert properties.correlation_id not in answered, "a message was answered twice"
        answered[properties.correlation_id] = (properties.content_type, json.loads(raw))
    assert set(answered) == set(sent)  # every one, none dropped
    seen = Counter(document.get("code", document.get("status")) for _, document in answered.values())
    print(f"[amqp-fuzz] messages={len(sent)} answers={dict(seen)}")
    for content_type, document in answered.values():
        if content_type == "application/problem+json":
            assert document["code"] in codes
        else:
            assert document["object"] == "operation" and document["status"] in ("succeeded", "failed")
    assert worker.popen.poll() is None
    account = open_account(ledger, tenant)
    _, settled = producer.call(
        "credit", {"account_id": str(account), "amount": 5, "currency": "USD"}, secret=secret, message_id=key()
    )
    assert settled["status"] == "succeeded"  # and the worker still settles


def test_holds_reversals_and_batches_over_amqp_as_over_http(
    producer: Producer, ledger: LedgerService, tenant: str, secret: str
) -> None:
    a, b = open_account(ledger, tenant), open_account(ledger, tenant)
    credit(ledger, tenant, a, 1_000)
    held = {"source_id": str(a), "destination_id": str(b), "amount": 300, "currency": "USD"}
    _, placed = producer.call("create_hold", held, secret=secret, message_id=key())
    hold = placed["result"]["hold"]["id"]
    _, captured = producer.call("capture_hold", {"hold_id": hold, "amount": 200}, secret=secret, message_id=key())
    assert (captured["status"], captured["result"]["hold"]["status"]) == ("succeeded", "captured")
    _, again = producer.call("void_hold", {"hold_id": hold}, secret=secret, message_id=key())
    assert again["problem"]["code"] == "hold-not-pending"
    transaction = captured["result"]["transaction"]["id"]
    _, reversed_ = producer.call(
        "reverse_transaction", {"transaction_id": transaction, "amount": 50}, secret=secret, message_id=key()
    )
    assert reversed_["result"]["transaction"]["reverses"] == transaction
    items = [{"type": "transfer", **held, "amount": 1} for _ in range(600)]  # past one command's 64 KiB
    _, batch = producer.call("batch", {"items": items}, secret=secret, message_id=key())
    assert [i["status"] for i in batch["result"]["items"]] == ["succeeded"] * 600
    assert (balance(ledger, tenant, a), balance(ledger, tenant, b)) == (1_000 - 200 + 50 - 600, 200 - 50 + 600)
