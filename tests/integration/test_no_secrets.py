"""No secret in a response, a log line, a queued message or the audit trail: a real ingress and worker,
configured with a database password, with the relay and the audit consumer writing to a real Mongo-wire server,
are sent known API keys and webhook secrets through every error path; then everything they answered and logged,
and every record of the trail, is searched for them. (A new API key's and a webhook endpoint's secret are shown
once, in the answer that creates them: those two answers are the only ones allowed to hold them.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp
import psycopg
import pymongo

from core.adapters.mongo.audit import COLLECTION
from core.adapters.postgres.api_keys import create_api_key, revoke_api_key
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.integration.test_audit import MongoServer, audit_consumer, relay
from tests.processes import ManagedProcess, free_port, ingress_command, settings_env, worker_command
from tests.services import delete_queues, private_queues

DB_PASSWORD = "pw-" + uuid.uuid4().hex  # trust auth ignores it; every process still has it in its URL


def trail_of(mongo_url: str, tenant: str, requests: int) -> str:
    """Every record of the trail as one text, once it holds the tenant's `requests` request records."""
    deadline = time.monotonic() + 60
    with pymongo.MongoClient(mongo_url, serverSelectionTimeoutMS=5000) as client:
        collection = client.get_default_database()[COLLECTION]
        while collection.count_documents({"tenant_id": tenant, "kind": "request.received"}) < requests:
            assert time.monotonic() < deadline, "the requests did not reach the audit trail"
            time.sleep(0.2)
        return json.dumps(list(collection.find({})), default=str)


async def test_no_secret_reaches_a_response_or_a_log(settings: Settings, ledger: LedgerService, tenant: str) -> None:
    parts = psycopg.conninfo.conninfo_to_dict(settings.database_url)
    with_password = psycopg.conninfo.make_conninfo(settings.database_url, password=DB_PASSWORD)
    private = private_queues(settings, f"secrets-{uuid.uuid4().hex[:6]}", database_url=with_password)
    assert parts.get("password") is None  # the session's URL has none: the only one around is ours
    key_id, secret = create_api_key(ledger.pool, tenant)
    revoked_id, revoked_secret = create_api_key(ledger.pool, tenant)
    assert revoke_api_key(ledger.pool, revoked_id.id)
    port = free_port()
    env = {
        **settings_env(private),
        "CLEANLEDGER_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "CLEANLEDGER_LOG_LEVEL": "INFO",  # what production logs: every request, every settled group
    }
    answers: list[str] = []
    mongo = MongoServer()
    mongo.start()
    env["CLEANLEDGER_MONGO_URL"] = mongo.url
    try:
        with (
            ManagedProcess.start(worker_command(), env=env, name="secrets-worker") as worker,
            ManagedProcess.start(ingress_command(port), env=env, name="secrets-ingress", port=port) as ingress,
            relay(private.replace(mongo_url=mongo.url), "secrets-relay") as relayed,
            audit_consumer(private.replace(mongo_url=mongo.url), "secrets-audit") as audited,
        ):
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:

                async def call(method: str, path: str, auth: str | None = secret, **kw: Any) -> str:
                    headers = {"Idempotency-Key": uuid.uuid4().hex, **kw.pop("headers", {})}
                    if auth is not None:
                        headers["Authorization"] = f"Bearer {auth}"
                    async with http.request(method, f"{base}{path}", headers=headers, **kw) as response:
                        text = await response.text(errors="replace")
                    answers.append(text)
                    return text

                hook = await call(
                    "POST", "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/h", "event_types": ["*"]}
                )
                answers.pop()  # shows the webhook secret, once, by design
                endpoint = json.loads(hook)
                rolled = await call("POST", f"/v1/webhook-endpoints/{endpoint['id']}/roll-secret")
                answers.pop()  # shows the new secret, once, by design
                webhook_secrets = [endpoint["secret"], json.loads(rolled)["secret"]]

                account = uuid.uuid4()
                await call("POST", "/v1/credits", json={"account_id": str(account), "amount": 5, "currency": "USD"})
                for auth in [revoked_secret, secret + "x", secret[:-1], "clk_" + "a" * 300]:
                    await call("GET", "/v1/accounts", auth=auth)  # unknown, revoked, truncated, oversized keys
                await call("GET", "/v1/accounts", auth=None, headers={"Authorization": f"Basic {secret}"})
                await call(
                    "POST",
                    "/v1/credits",
                    data=b"{not json " + secret.encode(),
                    headers={"Content-Type": "application/json"},
                )
                await call("POST", "/v1/credits", json={"account_id": secret, "amount": 1, "currency": "USD"})
                await call("POST", "/v1/accounts", json={"currency": "USD", "metadata": {secret: 1}})
                await call("POST", "/v1/accounts", json={"currency": "USD"}, headers={"Idempotency-Key": secret})
                await call("GET", f"/v1/accounts/{secret}")
                await call("GET", f"/v1/accounts?cursor={secret}")
                await call("GET", f"/v1/operations/{uuid.uuid4()}")
                await call("PATCH", f"/v1/accounts/{account}", json={"metadata": {"k": secret * 10}})
                await asyncio.sleep(1.0)  # let the worker settle and log what it does
            # Every mutating request above is in the trail (8 of them), with the events the ledger committed.
            trail = await asyncio.to_thread(trail_of, mongo.url, tenant, 8)
            logs = worker.output() + ingress.output() + relayed.output() + audited.output()
    finally:
        delete_queues(private)
        mongo.stop()
    secrets = {"api key": secret, "revoked api key": revoked_secret, "database password": DB_PASSWORD}
    secrets.update({f"webhook secret {n}": s for n, s in enumerate(webhook_secrets)})
    assert len(answers) >= 12 and logs
    for name, value in secrets.items():
        for n, answer in enumerate(answers):
            assert value not in answer, f"{name} in answer {n}: {answer[:300]}"
        # Not even a piece of one in the logs or the trail: any 16 characters of it in a row.
        pieces = {value[i : i + 16] for i in range(len(value) - 15)}
        leaked = [piece for piece in pieces if piece in logs]
        assert not leaked, f"{name} in the logs: {leaked[:3]}"
        leaked = [piece for piece in pieces if piece in trail]
        assert not leaked, f"{name} in the audit trail: {leaked[:3]}"
    assert str(key_id.id) not in "".join(answers)  # not even which key was used
