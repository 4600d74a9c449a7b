"""Middlewares: request ids and access logs, problem+json for every error (aiohttp's own protocol errors
included), API-key auth and rate limits."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
import structlog
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.typedefs import Handler

from core.adapters.metrics import HTTP_REQUEST_SECONDS
from core.adapters.postgres.api_keys import ApiKey, find_api_key, hash_secret
from core.application.ports import ReceivedRequest
from core.domain.errors import (
    LedgerError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestInvalid,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from core.domain.secrets import redact, redact_headers
from ingress.context import INGRESS, IPNetwork
from ingress.openapi import OPENAPI_PATH

log = structlog.get_logger("ingress")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBLEM_JSON = "application/problem+json"
TENANT = web.RequestKey("tenant", str)
API_KEY_ID = web.RequestKey("api_key_id", str)
REQUEST_ID = web.RequestKey("request_id", str)
RAW_BODY = web.RequestKey("raw_body", bytes)  # the body as received, once a route has read it
# Methods whose requests the audit trail records, accepted or refused.
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Most API keys an ingress process remembers at once (least recently used are dropped first).
API_KEY_CACHE_SIZE = 10_000
# Most unknown or revoked secrets it remembers, in their own LRU.
UNKNOWN_API_KEY_CACHE_SIZE = 10_000


def occurrence(request: web.Request) -> str:
    """The problem document's `instance`: this request's id as a URN, which the logs carry too. Not the path,
    which is the client's input and may hold anything, a secret included, that must not be echoed back."""
    return f"urn:cleanledger:request:{request.get(REQUEST_ID, 'unknown')}"


def route_of(request: web.Request) -> str:
    """The path as the access log records it: the matched route's template, never the raw path."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "(no route)"


def problem_response(error: LedgerError, *, instance: str | None = None) -> web.Response:
    body: dict[str, Any] = error.to_problem()
    if instance:
        body["instance"] = instance
    response = web.json_response(body, status=error.status, content_type=PROBLEM_JSON)
    retry_after = error.extensions.get("retry_after")
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    return response


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: a request id for every log line of this request (and the response header), an access log."""
    supplied = request.headers.get("X-Request-ID", "")
    request_id = supplied if REQUEST_ID_PATTERN.fullmatch(supplied) else uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    response = await handler(request)
    response.headers["X-Request-ID"] = request_id
    elapsed_s = time.perf_counter() - started
    route = route_of(request)
    HTTP_REQUEST_SECONDS.labels(route, request.method, str(response.status)).observe(elapsed_s)
    log.info(
        "http.request",
        method=request.method,
        route=route,
        status=response.status,
        duration_ms=round(elapsed_s * 1000, 2),
    )
    return response


@web.middleware
async def record_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutating `/v1` request, once answered, accepted or refused, goes to the audit trail as received:
    headers without credentials, the body, tenant, API key, node, time and the answer, secrets cut out. The
    answer waits for RabbitMQ's confirm of the record (bounded, see `AmqpRequestTrail`), never for MongoDB."""
    received_at = datetime.now(UTC)
    response = await handler(request)
    trail = request.app[INGRESS].trail
    if trail is not None and request.method in MUTATING_METHODS and request.path.startswith("/v1/"):
        await trail.record(received_request(request, response, received_at))
    return response


def received_request(request: web.Request, response: web.StreamResponse, received_at: datetime) -> ReceivedRequest:
    raw = request.get(RAW_BODY)
    answered = response.body if isinstance(response, web.Response) else None
    headers = redact_headers([(name, _text(value)) for name, value in request.headers.items()])
    return ReceivedRequest(
        request_id=request.get(REQUEST_ID, ""),
        received_at=received_at,
        node=request.app[INGRESS].node,
        tenant_id=request.get(TENANT),
        api_key_id=request.get(API_KEY_ID),
        method=request.method,
        path=redact(_text(request.rel_url.raw_path)),
        query=redact(_text(request.rel_url.raw_query_string)),
        headers=headers,
        body=None if raw is None else redact(raw.decode("utf-8", "replace")),
        status=response.status,
        answer=redact(answered.decode("utf-8", "replace")) if isinstance(answered, bytes) else None,
        idempotency_key=headers.get("idempotency-key"),
    )


def _text(value: str) -> str:
    """A string as received, with the bytes that were not UTF-8 (kept by aiohttp as surrogate escapes) replaced,
    so that it can be encoded for the record."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes an RFC 9457 problem document; nothing leaks as a bare 500."""
    try:
        return await handler(request)
    except LedgerError as error:
        if error.status >= 500:
            log.warning("http.problem", code=error.code, detail=error.detail)
        response = problem_response(error, instance=occurrence(request))
        if isinstance(error, RequestTimeout) or request.content.exception() is not None:
            return await answer_and_hang_up(request, response)
        return response
    except web.HTTPRequestEntityTooLarge:
        return problem_response(PayloadTooLarge(), instance=occurrence(request))
    except web.HTTPNotFound:
        return problem_response(NotFound("no resource at this path"), instance=occurrence(request))
    except web.HTTPMethodNotAllowed as exc:
        response = problem_response(
            MethodNotAllowed(f"{request.method} is not allowed here"), instance=occurrence(request)
        )
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = RequestInvalid(exc.reason) if exc.status < 500 else LedgerError(exc.reason)
        error_response = problem_response(mapped, instance=occurrence(request))
        error_response.set_status(exc.status)
        return error_response
    except psycopg.OperationalError as exc:  # PostgreSQL down or restarting: come back, nothing was done
        log.warning("http.database_unavailable", error=type(exc).__name__)
        unavailable = ServiceUnavailable("the database is unreachable; retry later", retry_after=1)
        return problem_response(unavailable, instance=occurrence(request))
    except Exception:
        log.exception("http.unhandled")
        return problem_response(LedgerError("an unexpected error occurred"), instance=occurrence(request))


def _problem_for_unhandled(
    self: web_protocol.RequestHandler,
    request: web.BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """Stands in for aiohttp's RequestHandler.handle_error (see install_problem_error_handler).

    It answers what fails before or around the middlewares: a request line or header aiohttp's parser refused
    (400), a Content-Encoding it cannot decode, an exception that escaped every middleware (500). aiohttp's own
    answer is text/plain and, for a parser error, repeats the offending line: a header line with a control
    byte came back verbatim, `Authorization: Bearer <key>` included. This one is a fixed problem document
    that echoes nothing of the request, and the log line names only the error's type.
    """
    if request.writer.output_size > 0:  # as aiohttp's: part of a response went out, the connection is broken
        raise ConnectionError("the response was partly sent already, cannot send a problem document")
    error: LedgerError
    if status >= 500:
        log.error("http.unhandled", status=status, exc_info=exc)
        error = LedgerError("an unexpected error occurred")
    elif isinstance(exc, ContentEncodingError):  # br or zstd: this ingress has no decoder for them
        error = UnsupportedMediaType("Content-Encoding must be gzip, deflate or none")
    else:
        log.info("http.unparsable_request", status=status, error=type(exc).__name__)
        error = RequestInvalid("the request is not valid HTTP/1.1 (request line or headers)")
    response = problem_response(error)
    response.set_status(error.status if error.status < 500 else status)
    response.force_close()  # as aiohttp's: the parser state after an error is not to be trusted
    return response


def install_problem_error_handler() -> None:
    """Make aiohttp's protocol-level errors problem+json too; once per process, repeating is harmless.

    aiohttp (3.14) answers them from `web_protocol.RequestHandler.handle_error` before any middleware runs and
    offers no hook for it (aio-libs/aiohttp#3287, #9882); the protocol class is built inside `web.Server`, so
    the method is replaced on the class. Every aiohttp server in this process answers this way, which in the
    ingress process (and the tests that run its app) is the point.
    """
    web_protocol.RequestHandler.handle_error = _problem_for_unhandled  # type: ignore[method-assign]


async def answer_and_hang_up(request: web.Request, response: web.Response) -> web.Response:
    """For a body that broke off (undecodable gzip) or stalls (a trickle): send the answer, then close the
    connection at once. Left to itself aiohttp would go on reading the rest of the body for up to its lingering
    time (10 s) before closing, and log a broken body as an unhandled exception; and nothing more that
    arrives on this connection is worth reading."""
    response.force_close()  # `Connection: close`, so the client does not send its next request down it
    if REQUEST_ID in request:  # sent now, before request_context would add it
        response.headers["X-Request-ID"] = request[REQUEST_ID]
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # closes the transport once the answer is flushed
    return response


class ApiKeyCache:
    """secret hash -> what PostgreSQL said of it (the key, or None: unknown or revoked), for `ttl_s` seconds.

    Saves a PostgreSQL round trip per request, and one per retry of a wrong secret. A revocation announced
    over Redis takes effect at once (`forget`), otherwise within `ttl_s`. A new key works at once: nobody can
    have tried its secret before it was created. Unknown secrets have their own LRU, so a flood of them cannot
    push the valid keys out.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._known: OrderedDict[str, tuple[ApiKey, float]] = OrderedDict()
        self._unknown: OrderedDict[str, tuple[None, float]] = OrderedDict()
        # Bumped by every forget: a lookup that started before a revocation must not cache its stale answer.
        self.generation = 0
        # Lookups in flight by digest: concurrent requests with one new secret share one PostgreSQL query.
        self.lookups: dict[str, asyncio.Future[ApiKey | None]] = {}

    def get(self, digest: str) -> tuple[bool, ApiKey | None]:
        """(cached, key): (False, None) when PostgreSQL has to be asked."""
        for entries in (self._known, self._unknown):
            entry = entries.get(digest)
            if entry is None:
                continue
            if entry[1] < time.monotonic():
                del entries[digest]
                return False, None
            entries.move_to_end(digest)
            return True, entry[0]
        return False, None

    def forget(self, key_id: UUID) -> None:
        """A revoked key: its next request asks PostgreSQL again (a scan, but revocations are rare)."""
        self.generation += 1
        for digest in [d for d, (key, _) in self._known.items() if key.id == key_id]:
            del self._known[digest]

    def forget_all(self) -> None:
        self.generation += 1
        self._known.clear()

    def put(self, digest: str, key: ApiKey | None, *, looked_up_at: int) -> None:
        """Remember a lookup's answer, unless a key was forgotten since it started (`generation` then)."""
        if looked_up_at != self.generation:
            return
        expires = time.monotonic() + self.ttl_s
        if key is None:
            _remember(self._unknown, digest, (None, expires), UNKNOWN_API_KEY_CACHE_SIZE)
        else:
            self._unknown.pop(digest, None)
            _remember(self._known, digest, (key, expires), API_KEY_CACHE_SIZE)


def _remember(entries: OrderedDict[str, Any], digest: str, entry: Any, size: int) -> None:
    entries[digest] = entry
    entries.move_to_end(digest)
    while len(entries) > size:
        entries.popitem(last=False)


API_KEY_CACHE = web.AppKey("api_key_cache", ApiKeyCache)


def client_address(request: web.Request) -> str:
    """The client's IP address: the direct peer, unless that peer is a trusted proxy (`trusted_proxies`, by
    default the local nginx); then the last X-Forwarded-For hop, the one the proxy appended. Earlier hops came
    from the client and prove nothing, and so does the header itself from any other peer."""
    peer = request.remote or "unknown"
    forwarded = request.headers.getall("X-Forwarded-For", [])
    if forwarded and _is_trusted_proxy(peer, request.app[INGRESS].trusted_proxies):
        try:
            return str(ipaddress.ip_address(forwarded[-1].rsplit(",", 1)[-1].strip()))
        except ValueError:
            pass
    return peer


def _is_trusted_proxy(address: str, proxies: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 on a dual stack
        ip = ip.ipv4_mapped
    return any(ip in network for network in proxies)


async def look_up(request: web.Request, digest: str, secret: str) -> ApiKey | None:
    """Ask PostgreSQL for an uncached secret, once for every request that meanwhile asks for the same one (they
    share this lookup's answer, or its refusal by the per-address limit)."""
    ingress, cache = request.app[INGRESS], request.app[API_KEY_CACHE]
    found: asyncio.Future[ApiKey | None] = asyncio.get_running_loop().create_future()
    cache.lookups[digest] = found  # before the first await: whoever comes next shares it
    try:
        address = client_address(request)
        lookup = await ingress.auth_limiter.take(f"auth-lookup:{address}")
        if not lookup.allowed:
            log.warning("auth.lookups_limited", client=address)
            raise RateLimited("too many unrecognised API keys from this address", retry_after=lookup.retry_after_s)
        generation = cache.generation
        key = await find_api_key(ingress.database, secret)
        cache.put(digest, key, looked_up_at=generation)
        found.set_result(key)
        return key
    except asyncio.CancelledError:
        found.cancel()  # this request's client left: a request sharing the lookup asks again itself
        raise
    except Exception as exc:
        found.set_exception(exc)
        found.exception()  # retrieved, even when no other request was waiting for it
        raise
    finally:
        cache.lookups.pop(digest, None)


async def shared_look_up(request: web.Request, digest: str, secret: str) -> ApiKey | None:
    """The answer of the lookup of this secret already in flight, if there is one; otherwise a lookup of ours."""
    in_flight = request.app[API_KEY_CACHE].lookups.get(digest)
    if in_flight is not None:
        try:
            return await asyncio.shield(in_flight)
        except asyncio.CancelledError:
            if not in_flight.cancelled():
                raise  # this request itself was cancelled
    return await look_up(request, digest, secret)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`/v1` needs `Authorization: Bearer <api key>`; each key then spends from its rate-limit bucket."""
    if (not request.path.startswith("/v1/") and request.path != "/v1") or request.path == OPENAPI_PATH:
        return await handler(request)
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send the API key as `Authorization: Bearer <key>`")
    secret = secret.strip()
    if not (secret.isascii() and secret.isprintable()):
        # Keys are printable ASCII. Header bytes that are not UTF-8 arrive as surrogate escapes, which
        # hash_secret could not even encode: no key, and nothing worth a lookup.
        raise Unauthorized("the API key is unknown or revoked")
    ingress = request.app[INGRESS]
    cache = request.app[API_KEY_CACHE]
    digest = hash_secret(secret)
    cached, key = cache.get(digest)
    if not cached:
        key = await shared_look_up(request, digest, secret)
    if key is None:
        raise Unauthorized("the API key is unknown or revoked")
    request[TENANT] = key.tenant_id
    request[API_KEY_ID] = str(key.id)
    structlog.contextvars.bind_contextvars(tenant_id=key.tenant_id)
    decision = await ingress.limiter.take(str(key.id))
    if not decision.allowed:
        raise RateLimited("rate limit exceeded for this API key", retry_after=decision.retry_after_s)
    return await handler(request)
