"""Hostile and malformed input through the real ingress app (real PostgreSQL, Redis, RabbitMQ, a real worker):
every answer is a problem document with a catalogued code, never a 500, never text/plain, never an echo."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.redis.keys import rate_limit_key
from core.bootstrap import LedgerService
from core.settings import Settings
from ingress.app import init_app
from tests.processes import ManagedProcess

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def api_key(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant, name="tests")[1]


@pytest.fixture
async def api(aiohttp_client: ClientFactory, settings: Settings, worker: ManagedProcess) -> TestClient[Any, Any]:
    return await aiohttp_client(init_app(settings))


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex, **extra}


async def problem(response: Any) -> tuple[int, str]:
    assert response.content_type == PROBLEM_JSON, await response.text()
    return response.status, (await response.json(content_type=None))["code"]


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes

    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document


async def raw_request(client: TestClient[Any, Any], data: bytes, *, trickle_s: float = 0.0) -> RawResponse:
    """Send bytes no well-behaved client library would, read until the server closes; `trickle_s` sends the
    body (after the blank line) one byte at a time, that many seconds apart."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        head, sep, body = data.partition(b"\r\n\r\n")
        writer.write(head + sep if trickle_s else data)
        await writer.drain()

        async def trickle() -> None:
            for i in range(len(body)):
                await asyncio.sleep(trickle_s)
                writer.write(body[i : i + 1])
                await writer.drain()

        trickler = asyncio.create_task(trickle()) if trickle_s else None
        raw = await asyncio.wait_for(reader.read(), 20)
        if trickler is not None:
            trickler.cancel()
    finally:
        writer.close()
    head_bytes, _, body_bytes = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", len(body_bytes)))
    return RawResponse(int(lines[0].split()[1]), headers, body_bytes[:length], raw)


# --- 1. input that used to be a 500 ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/credits", {"account_id": str(uuid.uuid4()), "amount": 5, "currency": "USD", "metadata": {"k": "a\0b"}}),
        ("/v1/credits", {"account_id": str(uuid.uuid4()), "amount": 5, "currency": "USD", "metadata": {"k\0": 1}}),
        ("/v1/accounts", {"currency": "USD", "metadata": {"deep": [{"x": ["ok", {"y": "\0"}]}]}}),
        (
            "/v1/transfers",
            {
                "source_id": str(uuid.uuid4()),
                "destination_id": str(uuid.uuid4()),
                "amount": 5,
                "currency": "USD",
                "metadata": {"n": {"\0": None}},
            },
        ),
    ],
)
async def test_a_nul_anywhere_in_metadata_is_metadata_invalid(
    api: TestClient[Any, Any], api_key: str, path: str, body: dict[str, Any]
) -> None:
    assert "\\u0000" in json.dumps(body)  # sent as JSON's escape, as any client would
    assert await problem(await api.post(path, json=body, headers=auth(api_key))) == (422, "metadata-invalid")


@pytest.mark.parametrize("value", [1.5e20, 9007199254740993, 1, True, None, ["a"], {"nested": "x"}])
async def test_metadata_values_that_are_not_strings_are_refused(
    api: TestClient[Any, Any], api_key: str, value: object
) -> None:
    body = {"currency": "USD", "metadata": {"n": value}}
    assert await problem(await api.post("/v1/accounts", json=body, headers=auth(api_key))) == (422, "metadata-invalid")


async def test_metadata_strings_come_back_exactly_as_sent(
    api: TestClient[Any, Any], api_key: str, settings: Settings, tenant: str
) -> None:
    sent = {"n": "9007199254740993", "big": "1.5e20", "ref": "inv-7 é💸"}
    response = await api.post(
        "/v1/accounts", json={"currency": "USD", "metadata": sent}, headers={**auth(api_key), "Prefer": "wait=10"}
    )
    assert response.status == 201, await response.text()
    account = (await response.json())["result"]["account"]
    assert account["metadata"] == sent
    with psycopg.connect(settings.database_url) as conn:  # and so is the stored request a sweeper would re-send
        row = conn.execute(
            "SELECT o.request -> 'metadata' FROM operations o JOIN idempotency_keys k ON k.operation_id = o.id"
            " WHERE k.tenant_id = %s AND o.id = %s",
            (tenant, (await response.json())["id"]),
        ).fetchone()
    assert row == (sent,)


async def test_an_authorization_header_that_is_not_utf8_is_unauthorized(api: TestClient[Any, Any]) -> None:
    for secret in (b"\xff\xfe\xfd", b"clk_\xc3\x28broken", "clk_caf\u00e9".encode()):
        response = await raw_request(
            api,
            b"GET /v1/accounts/" + str(uuid.uuid4()).encode() + b" HTTP/1.1\r\nHost: ledger\r\n"
            b"Authorization: Bearer " + secret + b"\r\nConnection: close\r\n\r\n",
        )
        assert response.status == 401, response.raw
        assert response.headers["content-type"].startswith(PROBLEM_JSON)
        assert response.json()["code"] == "unauthorized"


async def test_prefer_wait_with_thousands_of_digits_is_the_longest_wait(
    api: TestClient[Any, Any], api_key: str
) -> None:
    for digits in ("9" * 5000, "0" * 5000 + "1"):
        response = await api.post(
            "/v1/accounts", json={"currency": "USD"}, headers=auth(api_key, Prefer=f"wait={digits}")
        )
        assert response.status == 201, await response.text()  # settled well within the wait
        assert response.headers["Preference-Applied"] == ("wait=30" if digits[0] == "9" else "wait=1")


async def test_bodies_that_do_not_match_their_content_encoding(api: TestClient[Any, Any], api_key: str) -> None:
    body = json.dumps({"currency": "USD"}).encode()

    async def send(data: bytes, encoding: str) -> Any:
        h = auth(api_key, **{"Content-Type": "application/json", "Content-Encoding": encoding})
        return await api.post("/v1/accounts", data=data, headers=h)

    for encoding in ("gzip", "deflate"):  # declared but not what was sent: 400, not a 500
        assert await problem(await send(body, encoding)) == (400, "request-invalid")
    for encoding in ("br", "zstd", "compress", "x-unknown", "gzip, gzip"):  # none this ingress decodes: 415
        assert await problem(await send(body, encoding)) == (415, "unsupported-media-type")
    # What matches its Content-Encoding is accepted as ever.
    assert (await send(gzip.compress(body), "gzip")).status == 202
    assert (await send(zlib.compress(body), "deflate")).status == 202
    assert (await send(body, "identity")).status == 202


# --- 2. protocol errors: problem+json that echoes nothing ---------------------------------------------------
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/accounts HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer SECRET\x01x\r\n\r\n",
        b"GET /v1/accounts HTTP/1.1\r\nHost: ledger\r\nX-Note: \x7f\r\nAuthorization: Bearer SECRET\r\n\r\n",
        b"GET /v1/accounts HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer SECRET\r\nBad Name: x\r\n\r\n",
        b"GET /v1/acc\x00ounts?SECRET HTTP/1.1\r\nHost: ledger\r\n\r\n",
        b"GET /v1/accounts HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer SECRET" + b"x" * 9000 + b"\r\n\r\n",
    ],
    ids=["control-byte-in-auth", "del-in-header", "space-in-name", "nul-in-target", "header-too-long"],
)
async def test_requests_the_http_parser_refuses_get_a_problem_that_echoes_nothing(
    api: TestClient[Any, Any], api_key: str, request_bytes: bytes
) -> None:
    request_bytes = request_bytes.replace(b"SECRET", api_key.encode())
    response = await raw_request(api, request_bytes)
    assert response.status == 400, response.raw
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["code"] == "request-invalid"
    assert api_key.encode() not in response.raw
    assert api_key[4:].encode() not in response.raw


# --- 3. smaller ones ----------------------------------------------------------------------------------------
async def test_two_idempotency_keys_are_refused(api: TestClient[Any, Any], api_key: str) -> None:
    h = CIMultiDict(auth(api_key))
    h.add("Idempotency-Key", "another")
    response = await api.post("/v1/accounts", json={"currency": "USD"}, headers=h)
    assert await problem(response) == (400, "idempotency-key-invalid")


@pytest.mark.parametrize("limit", [-1, 2**62 + 1, -(10**30)])
async def test_an_overdraft_limit_out_of_range_is_validation_failed(
    api: TestClient[Any, Any], api_key: str, limit: int
) -> None:
    response = await api.post("/v1/accounts", json={"currency": "USD", "overdraft_limit": limit}, headers=auth(api_key))
    assert await problem(response) == (422, "validation-failed")


async def test_a_trickled_body_is_cut_off(aiohttp_client: ClientFactory, settings: Settings, api_key: str) -> None:
    node = await aiohttp_client(init_app(settings.replace(body_read_timeout_s=1.0)))
    body = b'{"currency": "USD"}'
    started = asyncio.get_running_loop().time()
    response = await raw_request(
        node,
        b"POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\nIdempotency-Key: " + uuid.uuid4().hex.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body,
        trickle_s=0.5,
    )
    assert response.status == 408, response.raw
    assert response.json()["code"] == "request-timeout"
    assert response.headers["connection"] == "close"
    assert response.headers["x-request-id"]
    assert asyncio.get_running_loop().time() - started < 5


async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    """The auth-lookup bucket of an unknown secret's client address shows which address the ingress believed."""
    redis_client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        for trusted, believed in (("127.0.0.1/32,::1/128", True), ("192.0.2.0/24", False)):
            node = await aiohttp_client(init_app(settings.replace(trusted_proxies=trusted)))
            claimed = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
            await redis_client.delete(rate_limit_key(f"auth-lookup:{claimed}"))
            h = {"Authorization": f"Bearer clk_{uuid.uuid4().hex}", "X-Forwarded-For": f"203.0.113.1, {claimed}"}
            assert (await node.get(f"/v1/accounts/{uuid.uuid4()}", headers=h)).status == 401
            assert bool(await redis_client.exists(rate_limit_key(f"auth-lookup:{claimed}"))) is believed
    finally:
        await redis_client.aclose()


def test_a_malformed_trusted_proxies_setting_fails_at_start(settings: Settings) -> None:
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        init_app(settings.replace(trusted_proxies="127.0.0.1/32,not-an-address"))


@pytest.mark.parametrize(
    "target",
    [
        "/v1/accounts/{a}/entries?limit=" + "9" * 5000,
        "/v1/accounts/{a}/entries?cursor=%00",
        "/v1/accounts/{a}/entries?cursor=" + "A" * 5000,
        "/v1/accounts/{a}/entries?since=%00",
        "/v1/accounts/{a}/entries?since=2026-01-01T00:00:00%2B99:00",
        "/v1/accounts/{a}/entries?limit=1&limit=2",
        "/v1/accounts/%00",
        "/v1/accounts/%ff%fe",
        "/v1/operations/{a}%00",
        # the listings and balances
        "/v1/accounts?limit=" + "9" * 5000,
        "/v1/accounts?cursor=%ff%fe",
        "/v1/accounts?cursor=" + "A" * 5000,
        "/v1/accounts?metadata%5B%5D=x",
        "/v1/accounts?metadata%5B" + "k" * 100 + "%5D=x",
        "/v1/accounts?metadata%5Bk%5D=a&metadata%5Bk%5D=b",
        "/v1/accounts?currency=%00",
        "/v1/transactions?account_id=%00",
        "/v1/transactions?kind=" + "x" * 5000,
        "/v1/transactions?since=2026-13-45T99:00:00Z",
        "/v1/transactions?cursor=eyJmIjogMX0",  # {"f": 1}: JSON, but not a cursor
        "/v1/operations?status=%ff",
        "/v1/operations?until=2020-01-01T00:00:00Z&since=2021-01-01T00:00:00Z",
        "/v1/transactions/%00",
        "/v1/accounts/{a}/balance?as_of=" + "9" * 5000,
        "/v1/accounts/{a}/balance?as_of=2026-01-01T00:00:00",  # no offset
        "/v1/accounts/{a}/balance-history?interval=day&since=0001-01-01T00:00:00Z",
        "/v1/accounts/{a}/balance-history?interval=week&since=2026-01-01T00:00:00Z",
    ],
)
async def test_hostile_paths_and_queries_are_problems(api: TestClient[Any, Any], api_key: str, target: str) -> None:
    response = await api.get(target.format(a=uuid.uuid4()), headers={"Authorization": f"Bearer {api_key}"})
    status, code = await problem(response)
    assert 400 <= status < 500, code


# A hold's body (a transfer's too) up to its amount.
HOLD = b'{"source_id": "%s", "destination_id": "%s", "currency": "USD", "amount": '


@pytest.mark.parametrize(
    ("method", "path", "raw_body"),
    [
        ("POST", "/v1/transactions", b'{"legs": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
        ("POST", "/v1/transactions", b'{"legs": [{"account_id": "%s", "amount": ' + b"9" * 5000 + b"}]}"),
        ("POST", "/v1/transactions", b'{"legs": [{"account_id": "%s", "amount": 1e999, "currency": "USD"}]}'),
        ("POST", "/v1/transactions", rb'{"legs": "\u0000"}'),
        ("POST", "/v1/transactions", b"\xff\xfe{}"),
        ("PATCH", "/v1/accounts/%s", rb'{"metadata": {"\ud800": "x"}}'),
        ("PATCH", "/v1/accounts/%s", rb'{"metadata": {"k": "\u0000"}}'),
        ("PATCH", "/v1/accounts/%s", b'{"metadata": {"k": ' + b"[" * 20000 + b"]" * 20000 + b"}}"),
        ("POST", "/v1/accounts/%s/freeze", b'{"status": "closed"}'),
        ("POST", "/v1/accounts/%s/close", b"\xff"),
        # holds, reversals, batches
        ("POST", "/v1/holds", HOLD + b"9" * 5000 + b"}"),
        ("POST", "/v1/holds", HOLD + b'5, "expires_at": "99999-01-01T00:00:00Z"}'),
        ("POST", "/v1/holds", HOLD + rb'5, "expires_at": "\u0000"}'),
        ("POST", "/v1/holds", HOLD + b'5, "expires_at": 1e999}'),
        ("POST", "/v1/holds", HOLD + b'5, "id": "6f1c1f4e-1b43-5c55-9a8e-2f1d0c6f7a10"}'),
        ("POST", "/v1/holds", b"\xff\xfe{}"),
        ("POST", "/v1/holds/%s/capture", b'{"amount": ' + b"9" * 5000 + b"}"),
        ("POST", "/v1/holds/%s/capture", b'{"amount": -1}'),
        ("POST", "/v1/holds/%s/capture", b"\xff"),
        ("POST", "/v1/holds/%s/void", b'{"amount": 5}'),
        ("POST", "/v1/transactions/%s/reverse", b'{"amount": 1e999}'),
        ("POST", "/v1/transactions/%s/reverse", b'{"amount": 0}'),
        ("POST", "/v1/transactions/%s/reverse", rb'{"metadata": {"k": "\u0000"}}'),
        ("POST", "/v1/batches", b'{"items": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
        ("POST", "/v1/batches", b'{"items": [{"type": "batch", "items": []}]}'),
        ("POST", "/v1/batches", rb'{"items": [{"type": "\u0000"}]}'),
        ("POST", "/v1/batches", b'{"items": [' + HOLD + b"9" * 5000 + b', "type": "transfer"}]}'),
        ("POST", "/v1/batches", b'{"items": [{"type": "expire_hold", "hold_id": "%s", "as_of": "2026-01-01T00:00Z"}]}'),
        ("POST", "/v1/batches", b"\xff\xfe{}"),
    ],
    ids=[
        "legs-deep-nesting",
        "leg-huge-int",
        "leg-huge-float",
        "legs-nul",
        "not-utf8",
        "patch-lone-surrogate",
        "patch-nul",
        "patch-deep-nesting",
        "freeze-with-a-body",
        "close-not-utf8",
        "hold-huge-int",
        "hold-expiry-year-99999",
        "hold-expiry-nul",
        "hold-expiry-huge-float",
        "hold-system-id",
        "hold-not-utf8",
        "capture-huge-int",
        "capture-negative",
        "capture-not-utf8",
        "void-with-a-body",
        "reverse-huge-float",
        "reverse-zero",
        "reverse-nul-metadata",
        "batch-deep-nesting",
        "batch-nested-batch",
        "batch-nul-type",
        "batch-item-huge-int",
        "batch-expiry-is-not-for-clients",
        "batch-not-utf8",
    ],
)  # fmt: skip
async def test_hostile_bodies_on_the_new_routes_are_problems(
    api: TestClient[Any, Any], api_key: str, method: str, path: str, raw_body: bytes
) -> None:
    target = path.replace("%s", str(uuid.uuid4()))
    body = raw_body.replace(b"%s", str(uuid.uuid4()).encode())
    h = auth(api_key, **{"Content-Type": "application/json"})
    status, code = await problem(await api.request(method, target, data=body, headers=h))
    assert status in (400, 422), code


@pytest.mark.parametrize(
    "raw_body",
    [
        b'{"account_id": "%s", "amount": ' + b"9" * 5000 + b', "currency": "USD"}',
        b'{"account_id": "%s", "amount": 5, "currency": "USD", "metadata": {"a": '
        + b"[" * 20000
        + b"]" * 20000
        + b"}}",
        b'{"account_id": "%s", "amount": 5, "currency": "USD", "metadata": {"a": 1e999999}}',
        b'{"account_id": "%s", "amount": 5, "currency": "USD", "metadata": {"a": NaN}}',
        b'{"account_id": "%s", "amount": 5, "currency": "USD", "metadata": {"\\ud800": "lone surrogate"}}',
        b'{"account_id": "%s", "amount": 5, "currency": "USD\\u0000"}',
        b'\xff\xfe{"account_id": "%s"}',
    ],
    ids=["huge-int", "deep-nesting", "huge-float", "nan", "lone-surrogate", "nul-currency", "not-utf8"],
)
async def test_hostile_bodies_are_problems(api: TestClient[Any, Any], api_key: str, raw_body: bytes) -> None:
    h = auth(api_key, **{"Content-Type": "application/json"})
    response = await api.post("/v1/credits", data=raw_body.replace(b"%s", str(uuid.uuid4()).encode()), headers=h)
    status, code = await problem(response)
    assert status in (400, 422), code
