from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.application.commands import (
    CreateAccount,
    Credit,
    Transfer,
    canonical_json,
    command_from_json,
    validate_idempotency_key,
)
from core.domain.errors import (
    IdempotencyKeyInvalid,
    LedgerError,
    MetadataInvalid,
    SameAccount,
)
from core.domain.model import OverdraftPolicy
from core.domain.money import MAX_POSTING_AMOUNT, Money

uuids = st.uuids()
# PostgreSQL stores no U+0000, and no lone surrogate has a UTF-8 form: metadata refuses both.
no_nul = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
metadata = st.dictionaries(st.text(no_nul, min_size=1, max_size=10), st.text(no_nul, max_size=20), max_size=5)


# What a command's JSON form may hold: no floats (amounts are integers, metadata values strings), any text
# (control characters and lone surrogates included) and integers past 64 bits.
json_forms = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_forms, max_size=6))
def test_the_canonical_form_is_byte_for_byte_the_standard_librarys_sorted_compact_json(body: dict[str, object]) -> None:
    """Fingerprints stored by earlier versions (json.dumps) must still match the ones computed now."""
    try:
        expected = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 form, the request was never accepted
        return
    assert canonical_json(body) == expected


@given(uuids, uuids, st.integers(1, MAX_POSTING_AMOUNT), metadata)
def test_transfer_round_trips_through_json_with_a_stable_fingerprint(
    src: uuid.UUID, dst: uuid.UUID, amount: int, meta: dict[str, object]
) -> None:
    if src == dst:
        return
    cmd = Transfer("acme", src, dst, Money.for_posting(amount, "EUR"), dict(meta))
    again = command_from_json(cmd.to_json())
    assert again == cmd
    assert again.fingerprint() == cmd.fingerprint()


def test_fingerprint_changes_with_any_field() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    base = Credit("acme", a, Money.for_posting(100, "USD"))
    variants = [
        Credit("acme", b, Money.for_posting(100, "USD")),
        Credit("acme", a, Money.for_posting(101, "USD")),
        Credit("acme", a, Money.for_posting(100, "EUR")),
        Credit("other", a, Money.for_posting(100, "USD")),
        Credit("acme", a, Money.for_posting(100, "USD"), {"k": "v"}),
    ]
    assert len({v.fingerprint() for v in variants} | {base.fingerprint()}) == len(variants) + 1


def test_create_account_round_trip_keeps_the_overdraft_limit() -> None:
    cmd = CreateAccount("acme", "JPY", OverdraftPolicy(5000), {"name": "ops"})
    assert command_from_json(cmd.to_json()) == cmd


def test_same_account_transfer_is_rejected() -> None:
    a = uuid.uuid4()
    with pytest.raises(SameAccount):
        Transfer("acme", a, a, Money.for_posting(1, "USD"))


@pytest.mark.parametrize(
    "body",
    [
        {"type": "nope", "tenant_id": "acme"},
        {"type": "credit", "tenant_id": "acme", "account_id": "not-a-uuid", "amount": 1, "currency": "USD"},
        {"type": "credit", "tenant_id": "acme", "account_id": str(uuid.uuid4()), "amount": 1.5, "currency": "USD"},
        {"type": "credit", "tenant_id": "acme", "account_id": str(uuid.uuid4()), "currency": "USD"},
        {
            "type": "credit",
            "tenant_id": "acme",
            "account_id": str(uuid.uuid4()),
            "amount": 1,
            "currency": "USD",
            "x": 1,
        },
    ],
)
def test_malformed_wire_commands_raise_catalogued_errors(body: dict[str, object]) -> None:
    with pytest.raises(LedgerError) as info:
        command_from_json(body)
    assert info.value.status in (400, 422)


def test_metadata_is_capped() -> None:
    with pytest.raises(MetadataInvalid):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"blob": "x" * 5000})
    with pytest.raises(MetadataInvalid):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {str(i): str(i) for i in range(51)})
    with pytest.raises(MetadataInvalid):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"k" * 65: "v"})
    with pytest.raises(MetadataInvalid):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"": "v"})
    with pytest.raises(MetadataInvalid):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"v": "x" * 513})
    # At the limits: 50 keys of 64 characters, values of 512, within 4 KiB.
    Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"k" * 64: "x" * 512, **{str(i): "" for i in range(49)}})


@pytest.mark.parametrize(
    ("value", "kind"),
    [(1, "number"), (1.5e20, "number"), (float("nan"), "number"), (True, "boolean"), (None, "null"), ([], "array")],
)
def test_metadata_values_are_strings(value: object, kind: str) -> None:
    with pytest.raises(MetadataInvalid, match=f"is a {kind}"):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"n": value})
    # The same number as a string keeps every digit, through the wire format and back.
    big = Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"n": "9007199254740993"})
    assert command_from_json(big.to_json()).metadata == {"n": "9007199254740993"}


@pytest.mark.parametrize("meta", [{"\ud800": "v"}, {"k": "a\udfffb"}])
def test_metadata_refuses_lone_surrogates(meta: dict[str, object]) -> None:
    with pytest.raises(MetadataInvalid, match="surrogate"):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), meta)


@pytest.mark.parametrize(
    "meta",
    [{"k": "a\x00b"}, {"a\x00": "1"}, {"\x00": ""}],
)
def test_metadata_refuses_the_nul_character_anywhere(meta: dict[str, object]) -> None:
    with pytest.raises(MetadataInvalid, match="NUL"):
        Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), meta)
    with pytest.raises(MetadataInvalid):
        CreateAccount("acme", "USD", metadata=meta)
    # A backslash followed by "u0000" is ordinary text, not a NUL.
    assert Credit("acme", uuid.uuid4(), Money.for_posting(1, "USD"), {"k": "\\u0000"}).metadata == {"k": "\\u0000"}


@pytest.mark.parametrize("bad", ["", "a b", "x" * 256, "caf\u00e9", None])
def test_idempotency_key_shape(bad: object) -> None:
    with pytest.raises(IdempotencyKeyInvalid):
        validate_idempotency_key(bad)
    assert validate_idempotency_key("order-42:attempt-1") == "order-42:attempt-1"
