"""Sending one webhook attempt over HTTP (aiohttp), with the address rules enforced at connection time.

Every host name is resolved again for each new connection by `GuardedResolver`, and the connection may only
go to an address that passes `check_addresses`: a name that resolved to a public address at registration and
to a private one now (DNS rebinding) is refused before any connection is made. An IP literal never reaches a
resolver, so `WebhookSender.send` checks it itself. Redirects are not followed and no proxy from the
environment is used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from core.application.webhooks import AttemptResult
from core.domain.errors import LedgerError
from core.domain.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    IPNetwork,
    check_addresses,
    parse_url,
    signature,
)

USER_AGENT = "Cleanledger-Webhooks/1"
MAX_ERROR_CHARS = 500


class AddressRefused(OSError):
    """The host resolved to an address webhooks may not reach."""


class GuardedResolver(AbstractResolver):
    """The system resolver (on a thread, off the event loop), whose answers must all pass the address rules."""

    def __init__(self, allowed: Sequence[IPNetwork]) -> None:
        self.allowed = tuple(allowed)
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        try:
            check_addresses(host, [ipaddress.ip_address(r["host"].split("%", 1)[0]) for r in results], self.allowed)
        except LedgerError as exc:
            raise AddressRefused(exc.detail) from None
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One attempt to make: where, what, and the secret to sign it with (never logged)."""

    delivery_id: UUID
    url: str
    event_type: str
    body: bytes  # JSON, signed and sent byte for byte
    secret: str


class WebhookSender:
    """One aiohttp session for every attempt of a worker; `send` never raises for the receiver's failures."""

    def __init__(self, *, timeout_s: float, allowed: Sequence[IPNetwork], max_connections: int) -> None:
        self.timeout_s = timeout_s
        self.allowed = tuple(allowed)
        self._session: aiohttp.ClientSession | None = None
        self._max_connections = max_connections

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.allowed),
                limit=self._max_connections,
                use_dns_cache=False,  # resolve (and check) again for every connection
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                trust_env=False,
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def send(self, outgoing: Outgoing) -> AttemptResult:
        started = time.perf_counter()

        def result(status: int | None, error: str | None) -> AttemptResult:
            latency = round((time.perf_counter() - started) * 1000)
            return AttemptResult(status, latency, error[:MAX_ERROR_CHARS] if error else None)

        try:
            parsed = parse_url(outgoing.url)
            if parsed.literal is not None:
                check_addresses(parsed.host, [parsed.literal], self.allowed)
        except LedgerError as exc:
            return result(None, f"refused: {exc.detail}")
        body = outgoing.body
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(outgoing.secret, int(time.time()), body),
            DELIVERY_HEADER: str(outgoing.delivery_id),
            EVENT_HEADER: outgoing.event_type,
        }
        try:
            async with self._open().post(outgoing.url, data=body, headers=headers, allow_redirects=False) as answer:
                await answer.content.readany()  # the first bytes at most: the status is what counts
                status = answer.status
        except TimeoutError:
            return result(None, f"timeout: no answer within {self.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return result(None, f"refused: {exc.os_error}")
            return result(None, f"connection failed: {exc.os_error or exc}")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return result(None, f"{type(exc).__name__}: {exc}")
        return result(status, None if 200 <= status < 300 else f"HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
