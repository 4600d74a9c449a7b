"""Query strings of the HTTP API (the bodies are `core.application.requests`, shared with AMQP)."""

from __future__ import annotations

import re
from typing import Literal, TypeVar
from uuid import UUID

from multidict import MultiMapping
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from core.application.requests import validation_problem
from core.domain.errors import MetadataInvalid, RequestInvalid
from core.domain.model import MAX_METADATA_KEYS, validate_metadata


class EntriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=200)
    order: Literal["desc", "asc"] = "desc"
    since: AwareDatetime | None = None  # inclusive
    until: AwareDatetime | None = None  # exclusive


def parse_query(query: dict[str, str]) -> EntriesQuery:
    try:
        return EntriesQuery.model_validate(query)
    except ValidationError as exc:
        raise validation_problem(exc, status=400) from None


class ListingQuery(BaseModel):
    """What every keyset-paginated listing takes (its cursor carries the listing's digest, hence 500)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=500)


class AccountsQuery(ListingQuery):
    """`GET /v1/accounts`; `metadata[key]=value` pairs are taken out before (see `query_with_metadata`)."""

    order: Literal["desc", "asc"] = "desc"  # by creation
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    status: Literal["open", "frozen", "closed"] | None = None


METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$", re.DOTALL)


class TransactionsQuery(ListingQuery):
    """`GET /v1/transactions`; `metadata[key]=value` pairs are taken out before (see `query_with_metadata`)."""

    order: Literal["desc", "asc"] = "desc"  # by time
    account_id: UUID | None = None  # transactions with an entry on this account
    kind: Literal["credit", "debit", "transfer", "multi_leg"] | None = None
    since: AwareDatetime | None = None  # inclusive
    until: AwareDatetime | None = None  # exclusive


def query_with_metadata(model: type[M], query: MultiMapping[str]) -> tuple[M, tuple[tuple[str, str], ...]]:
    """A listing's parameters, and its metadata filters (`metadata[key]=value`, each key once)."""
    plain: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, value in query.items():
        found = METADATA_PARAM.match(name)
        target, key = (metadata, found.group(1)) if found else (plain, name)
        if key in target:
            raise RequestInvalid(f"query parameter {name[:80]!r} is given more than once")
        target[key] = value
    if len(metadata) > MAX_METADATA_KEYS:
        raise RequestInvalid(f"at most {MAX_METADATA_KEYS} metadata filters")
    try:  # what metadata cannot hold (a NUL, a lone surrogate, a key too long) no filter can match
        validate_metadata(metadata)
    except MetadataInvalid as exc:
        raise RequestInvalid(f"metadata filters: {exc.detail}") from None
    return parse_model(model, plain), tuple(sorted(metadata.items()))


class OperationsQuery(ListingQuery):
    """`GET /v1/operations`, oldest first: for reconciliation, what was accepted and how it ended."""

    status: Literal["pending", "succeeded", "failed"] | None = None
    since: AwareDatetime | None = None  # inclusive, on when the operation was accepted
    until: AwareDatetime | None = None  # exclusive


class BalanceQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    as_of: AwareDatetime | None = None  # default: now


class BalanceHistoryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: Literal["hour", "day"]
    since: AwareDatetime
    until: AwareDatetime | None = None  # default: now


class DeliveriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=200)
    status: Literal["pending", "succeeded", "failed"] | None = None


class EventsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=200)
    # One event type, or several separated by commas: dotted lower-case names.
    type: str | None = Field(None, max_length=1000, pattern=r"^[a-z0-9_.,\s]*$")
    since: AwareDatetime | None = None  # inclusive, on occurred_at
    until: AwareDatetime | None = None  # exclusive


class WebhookEndpointBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: str = Field(max_length=4096)  # the domain refuses over 2048 with its own code
    event_types: list[str] = Field(min_length=1, max_length=32)
    description: str = Field("", max_length=500)


M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], query: dict[str, str]) -> M:
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise validation_problem(exc, status=400) from None


def parse_json_body(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_problem(exc) from None
