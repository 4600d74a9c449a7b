"""The audit trail in MongoDB (pymongo; SecantusDB locally, a real MongoDB in compose).

One collection, `audit`, one document per record with the record's id as `_id`: an unordered `insert_many`
of a whole batch, where a duplicate key (a redelivered record) is skipped and any other error fails the batch.
Indexed for the lookups an auditor makes: by operation, by idempotency key, by tenant and time.

A record's document is stored as a BSON document (`document`), or, when its JSON text is longer than
LARGE_DOCUMENT_CHARS, as that text (`document_json`): the readers here give back the same dict either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pymongo
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, PyMongoError

from core.adapters import json_text
from core.application.ports import AuditRecord, AuditStore, AuditUnavailable

COLLECTION = "audit"
DUPLICATE_KEY = 11000  # MongoDB's error code
# How long a call waits for a server to answer before it counts as unreachable, milliseconds.
SERVER_TIMEOUT_MS = 2000
# A document whose JSON text is longer than this, in characters, is stored as that text. A batch's request, its
# answer and its snapshot hold some 20,000 values each (1,000 items): as BSON documents the Mongo-wire server
# decodes, checks and encodes every one of them, which cost more CPU than settling the batch; as text they are
# one value each, and an auditor still finds them by operation, key, tenant and time.
LARGE_DOCUMENT_CHARS = 64 * 1024


class MongoAuditStore(AuditStore):
    def __init__(self, url: str) -> None:
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, serverSelectionTimeoutMS=SERVER_TIMEOUT_MS, connectTimeoutMS=SERVER_TIMEOUT_MS, tz_aware=True
        )
        self.collection = self.client.get_default_database("cleanledger")[COLLECTION]
        self._indexed = False

    def write(self, records: Sequence[AuditRecord]) -> int:
        if not records:
            return 0
        try:
            self._ensure_indexes()
            try:
                return len(self.collection.insert_many([_document(r) for r in records], ordered=False).inserted_ids)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if any(error.get("code") != DUPLICATE_KEY for error in errors):
                    raise
                return int(exc.details.get("nInserted", 0))
        except BulkWriteError:
            raise
        except PyMongoError as exc:
            raise AuditUnavailable(f"MongoDB is unavailable: {type(exc).__name__}") from exc

    def newest(self) -> datetime | None:
        """When the newest record stored occurred (how far the trail has caught up)."""
        try:
            found = self.collection.find_one({}, sort=[("occurred_at", pymongo.DESCENDING)], projection=["occurred_at"])
        except PyMongoError as exc:
            raise AuditUnavailable(f"MongoDB is unavailable: {type(exc).__name__}") from exc
        return None if found is None else found["occurred_at"]

    def count(self, *, tenant_id: str | None = None) -> int:
        try:
            return self.collection.count_documents({} if tenant_id is None else {"tenant_id": tenant_id})
        except PyMongoError as exc:
            raise AuditUnavailable(f"MongoDB is unavailable: {type(exc).__name__}") from exc

    def in_commit_order(self) -> Iterator[AuditRecord]:
        try:
            for doc in self.collection.find({"position": {"$ne": None}}).sort("position", pymongo.ASCENDING):
                yield AuditRecord(
                    id=doc["_id"],
                    kind=doc["kind"],
                    tenant_id=doc["tenant_id"],
                    occurred_at=doc["occurred_at"],
                    operation_id=doc.get("operation_id"),
                    idempotency_key=doc.get("idempotency_key"),
                    document=stored_document(doc),
                    position=doc["position"],
                )
        except PyMongoError as exc:
            raise AuditUnavailable(f"MongoDB is unavailable: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.client.close()

    def _ensure_indexes(self) -> None:
        if not self._indexed:
            self.collection.create_index("operation_id")
            self.collection.create_index([("tenant_id", 1), ("idempotency_key", 1)])
            self.collection.create_index([("tenant_id", 1), ("occurred_at", 1)])
            self.collection.create_index("position")
            self._indexed = True


def _document(record: AuditRecord) -> dict[str, Any]:
    stored: dict[str, Any] = {
        "_id": record.id,
        "kind": record.kind,
        "tenant_id": record.tenant_id,
        "occurred_at": record.occurred_at,
        "operation_id": record.operation_id,
        "idempotency_key": record.idempotency_key,
        "position": record.position,
    }
    text = json_text.dumps(record.document)
    if len(text) > LARGE_DOCUMENT_CHARS:
        stored["document_json"] = text
    else:
        stored["document"] = record.document
    return stored


def stored_document(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored record's document, whichever way it was stored."""
    text = stored.get("document_json")
    if isinstance(text, str):
        document: dict[str, Any] = json_text.loads(text)
        return document
    return dict(stored["document"])


class AuditReader:
    """Async reads of the trail, for the ingress (pymongo's asyncio client: no thread hop)."""

    def __init__(self, url: str) -> None:
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=SERVER_TIMEOUT_MS, connectTimeoutMS=SERVER_TIMEOUT_MS, tz_aware=True
        )
        self.collection = self.client.get_default_database("cleanledger")[COLLECTION]

    async def of_operation(self, tenant_id: str, operation_id: str) -> list[dict[str, Any]]:
        """The operation's records, oldest first; only the tenant's (another tenant's id finds nothing)."""
        try:
            cursor = self.collection.find({"tenant_id": tenant_id, "operation_id": operation_id}).sort("occurred_at", 1)
            found = [stored async for stored in cursor]
        except PyMongoError as exc:
            raise AuditUnavailable(f"MongoDB is unavailable: {type(exc).__name__}") from exc
        # orjson reads a batch's half megabyte in a millisecond or two: not worth a thread hop
        return [{**stored, "document": stored_document(stored)} for stored in found]

    async def close(self) -> None:
        await self.client.close()
