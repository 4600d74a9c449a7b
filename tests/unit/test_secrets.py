"""What the audit trail keeps of a request: secrets cut out wherever a client put them."""

from __future__ import annotations

import secrets

from core.domain.secrets import (
    API_KEY_PREFIX,
    REDACTED,
    VISIBLE_TOKEN_CHARS,
    WEBHOOK_SECRET_PREFIX,
    redact,
    redact_headers,
)


def test_a_secret_is_cut_out_wherever_it_sits_and_its_marker_stays() -> None:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    hook = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
    text = f'{{"metadata": {{"{key}": "x"}}, "note": "{hook[:-5]} and {key}x", "path": "/v1/accounts/{key}"}}'
    cleaned = redact(text)
    assert key[len(API_KEY_PREFIX) : len(API_KEY_PREFIX) + 8] not in cleaned
    assert hook[len(WEBHOOK_SECRET_PREFIX) : len(WEBHOOK_SECRET_PREFIX) + 8] not in cleaned
    assert cleaned.count(f"{API_KEY_PREFIX}{REDACTED}") == 3
    assert cleaned.count(f"{WEBHOOK_SECRET_PREFIX}{REDACTED}") == 1


def test_text_without_secrets_is_kept_as_it_is() -> None:
    visible = API_KEY_PREFIX + secrets.token_urlsafe(32)[:VISIBLE_TOKEN_CHARS]  # as key listings show it
    text = f'{{"currency": "USD", "metadata": {{"clk": "whsec", "ref": "clk_ab", "key": "{visible}"}}}}'
    assert redact(text) == text


def test_credential_headers_are_redacted_whole_and_repeated_headers_joined() -> None:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    kept = redact_headers(
        [
            ("Authorization", "Basic dXNlcjpwYXNz"),
            ("Cookie", "session=abc"),
            ("X-Note", f"mine is {key}"),
            ("Idempotency-Key", "a"),
            ("Idempotency-Key", "b"),
        ]
    )
    assert kept == {
        "authorization": REDACTED,
        "cookie": REDACTED,
        "x-note": f"mine is {API_KEY_PREFIX}{REDACTED}",
        "idempotency-key": "a, b",
    }
