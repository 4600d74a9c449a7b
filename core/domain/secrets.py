"""What a Clean Ledger secret looks like, and how a text is cleared of them before it is kept anywhere.

Every secret the service issues starts with a public marker: `clk_` for an API key, `whsec_` for a webhook
signing secret. Whatever a client sends is kept in the audit trail as received, so a secret it put in the
wrong place (a header, the path, the body, the idempotency key) must be cut out first, as secret scanners do:
the marker stays, the rest of the token becomes `[redacted]`.
"""

from __future__ import annotations

import re

API_KEY_PREFIX = "clk_"
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a public marker, not a secret
REDACTED = "[redacted]"
# Headers whose whole value is a credential, whatever it looks like (lower case).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
# Characters after the marker that are public: an API key's listings show its first 12 characters (marker
# included), which tell keys apart and give away 48 of its 256 bits.
VISIBLE_TOKEN_CHARS = 8
# A marker, then more of the token's characters (url-safe base64, as `secrets.token_urlsafe` makes them) than
# the visible part: a truncated secret is cut out too.
_SECRET = re.compile(
    rf"({re.escape(API_KEY_PREFIX)}|{re.escape(WEBHOOK_SECRET_PREFIX)})[A-Za-z0-9_\-]{{{VISIBLE_TOKEN_CHARS + 1},}}"
)


def redact(text: str) -> str:
    """`text` with every token that looks like one of our secrets replaced by its marker and `[redacted]`."""
    if API_KEY_PREFIX not in text and WEBHOOK_SECRET_PREFIX not in text:
        return text  # the common case, without running the expression
    return _SECRET.sub(lambda match: match.group(1) + REDACTED, text)


def redact_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers as a record keeps them: credential headers' values redacted whole, secrets cut out of the rest,
    repeated names joined with ", " (as HTTP allows)."""
    kept: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        clean = REDACTED if lowered in CREDENTIAL_HEADERS else redact(value)
        kept[lowered] = f"{kept[lowered]}, {clean}" if lowered in kept else clean
    return kept
