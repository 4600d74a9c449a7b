"""Webhook rules of the domain: URL form, address checks (SSRF), signatures, subscriptions, retry schedule."""

from __future__ import annotations

import ipaddress
import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from core.application.webhooks import AttemptResult, after_attempt, validate_event_types
from core.domain.errors import RequestInvalid, WebhookUrlForbidden, WebhookUrlInvalid
from core.domain.webhooks import (
    check_addresses,
    forbidden_reason,
    parse_networks,
    parse_url,
    retry_delay_s,
    signature,
    subscribed,
    verify_signature,
)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http://user@example.com/",
        "http://user:pw@example.com/",
        "http:///path",
        "http://exa mple.com/",
        "http://example.com:99999/",
        "https://example.com/#frag",
        "https://example.com/" + "x" * 2048,
    ],
)
def test_malformed_urls_are_invalid(url: str) -> None:
    with pytest.raises(WebhookUrlInvalid):
        parse_url(url)


def test_url_parts() -> None:
    parsed = parse_url("https://Hooks.Example.com/in?x=1")
    assert (parsed.scheme, parsed.host, parsed.port, parsed.literal) == ("https", "hooks.example.com", 443, None)
    assert parse_url("http://[::1]:8080/").literal == ipaddress.ip_address("::1")
    assert parse_url("http://127.0.0.1/").port == 80


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.0.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "private"),  # reserved too; the standard library lists 240.0.0.0/4 among the private
        ("100.64.0.1", "not globally reachable"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped: judged as the IPv4 address
        ("93.184.216.34", None),
        ("2606:2800:220:1:248:1893:25c8:1946", None),
    ],
)
def test_forbidden_addresses(address: str, reason: str | None) -> None:
    found = forbidden_reason(ipaddress.ip_address(address))
    # The standard library's tables vary a little between Python versions: a refusal is what must not.
    assert (found is None) == (reason is None), found


def test_every_resolved_address_must_pass_unless_allowed() -> None:
    public, private = ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.1")
    check_addresses("h", [public], ())
    with pytest.raises(WebhookUrlForbidden):
        check_addresses("h", [public, private], ())
    with pytest.raises(WebhookUrlInvalid):
        check_addresses("h", [], ())
    check_addresses("h", [public, private], parse_networks("10.0.0.0/8, 127.0.0.0/8"))
    assert parse_networks("") == ()
    with pytest.raises(WebhookUrlForbidden):
        check_addresses("h", [ipaddress.ip_address("127.0.0.1")], parse_networks("10.0.0.0/8"))


def test_signature_round_trip_and_replay_window() -> None:
    now = int(time.time())
    header = signature("whsec_x", now, b'{"a":1}')
    assert header.startswith(f"t={now},v1=") and len(header.rpartition("v1=")[2]) == 64
    assert verify_signature("whsec_x", header, b'{"a":1}', now=now)
    assert not verify_signature("whsec_y", header, b'{"a":1}', now=now)
    assert not verify_signature("whsec_x", header, b'{"a":2}', now=now)
    assert not verify_signature("whsec_x", header, b'{"a":1}', now=now + 301)  # too old: a replay
    assert not verify_signature("whsec_x", "garbage", b"", now=now)


def test_subscriptions() -> None:
    assert subscribed(["*"], "transaction.posted")
    assert subscribed(["transaction.*"], "transaction.rejected")
    assert not subscribed(["transaction.*"], "account.created")
    assert subscribed(["account.created"], "account.created")
    assert not subscribed(["account.created"], "account.created_x")
    assert validate_event_types(["a.b", "a.b", "*"]) == ("a.b", "*")
    for bad in ([], ["A.B"], ["a b"], ["a.*.b"]):
        with pytest.raises(RequestInvalid):
            validate_event_types(bad)


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [retry_delay_s(n, base_s=1.0, cap_s=60.0, rng=rng) for n in range(1, 200)]
    assert all(0 <= d <= 60.0 for d in delays)
    assert all(d <= 2 ** (n - 1) for n, d in enumerate(delays[:6], start=1))
    assert len(set(delays)) == len(delays)


def test_after_attempt_schedules_within_the_window_then_fails() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ok = AttemptResult(204, 3, None)
    failed = AttemptResult(500, 3, "HTTP 500")
    assert after_attempt(ok, attempts=1, now=now, expires_at=now, base_s=1, cap_s=10).status == "succeeded"
    step = after_attempt(failed, attempts=1, now=now, expires_at=now + timedelta(hours=1), base_s=1, cap_s=10)
    assert step.status == "pending" and step.next_attempt_at is not None
    assert now <= step.next_attempt_at <= now + timedelta(seconds=1)
    late = after_attempt(failed, attempts=30, now=now, expires_at=now, base_s=1, cap_s=10)
    assert late.status == "failed" and late.next_attempt_at is None
    assert not AttemptResult(302, 1, None).succeeded and not AttemptResult(None, 1, "timeout").succeeded
