"""Query strings of the HTTP API (the bodies are `core.application.requests`, shared with AMQP)."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from core.application.requests import validation_problem


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
