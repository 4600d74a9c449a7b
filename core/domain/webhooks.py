"""Webhook rules, standard library only: which URLs and addresses a delivery may go to, how a body is signed,
and when a failed delivery is tried again.

The address rules are what keeps the service from becoming an SSRF tool: a URL is checked when it is
registered and its host resolved again before every attempt (a name may resolve elsewhere later), and only
public unicast addresses pass, unless an operator's allow-list names the network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from core.domain.errors import WebhookUrlForbidden, WebhookUrlInvalid
from core.domain.secrets import WEBHOOK_SECRET_PREFIX as SECRET_PREFIX

MAX_URL_LENGTH = 2048
SCHEMES = frozenset({"http", "https"})
SIGNATURE_HEADER = "Cleanledger-Signature"
DELIVERY_HEADER = "Cleanledger-Delivery"
EVENT_HEADER = "Cleanledger-Event"
# Event types a tenant may subscribe to: dotted lower-case names, or "*" for all of them.
EVENT_TYPE_PATTERN = re.compile(r"^(\*|[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?)$")
ALL_EVENTS = "*"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class WebhookUrl:
    url: str
    scheme: str
    host: str  # without brackets
    port: int
    literal: IPAddress | None  # the host when it is an IP address


def parse_url(url: str) -> WebhookUrl:
    """Check a URL's form: http(s), at most 2048 characters, a host, no user or password. Raises
    `WebhookUrlInvalid`. Says nothing yet about where the host resolves (see `check_addresses`)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlInvalid(f"the url is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise WebhookUrlInvalid("the url contains whitespace or control characters")
    try:
        parts: SplitResult = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlInvalid(f"the url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise WebhookUrlInvalid("the url's scheme must be http or https", scheme=scheme)
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlInvalid("the url must not carry a user name or password")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookUrlInvalid("the url has no host")
    if parts.fragment:
        raise WebhookUrlInvalid("the url must not have a fragment")
    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise WebhookUrlInvalid("the url's host is not a valid name or address") from None
    return WebhookUrl(url, scheme, host, port or (443 if scheme == "https" else 80), literal)


def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """The allow-list setting: CIDR networks separated by commas or spaces ("" allows nothing extra)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in re.split(r"[,\s]+", spec.strip()) if item)


def forbidden_reason(address: IPAddress) -> str | None:
    """Why an address may not receive webhooks, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return forbidden_reason(address.ipv4_mapped)
    for reason, flagged in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally reachable", not address.is_global),
    ):
        if flagged:
            return reason
    return None


def check_addresses(host: str, addresses: Iterable[IPAddress], allowed: Sequence[IPNetwork]) -> None:
    """Refuse (`WebhookUrlForbidden`) unless every address the host resolves to is public or allowed: one
    private address among public ones is enough to refuse, as a client may connect to any of them."""
    found = list(addresses)
    if not found:
        raise WebhookUrlInvalid(f"the url's host {host!r} does not resolve")
    for address in found:
        reason = forbidden_reason(address)
        if reason is not None and not any(address in network for network in allowed):
            raise WebhookUrlForbidden(
                f"the url's host {host!r} resolves to a {reason} address, which may not receive webhooks"
            )


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Cleanledger-Signature` header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "t.body">`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """What a receiver does (the README's snippet): recompute, compare in constant time, refuse old ones."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).rpartition("v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def subscribed(event_types: Iterable[str], event_type: str) -> bool:
    """Whether an endpoint subscribed to `event_types` gets `event_type` ("*" all, "transaction.*" a family)."""
    for wanted in event_types:
        if wanted in (ALL_EVENTS, event_type):
            return True
        if wanted.endswith(".*") and event_type.startswith(wanted[:-1]):
            return True
    return False


def retry_delay_s(attempts: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempts-1))]."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempts - 1, 0), 62))
    return (rng or random).uniform(0, ceiling)
