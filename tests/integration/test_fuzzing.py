"""Every operation of the served OpenAPI document fuzzed by schemathesis against a real ingress process, with a
real API key: no 5xx, every answer in its documented status codes and schema, and every 4xx a problem+json
document, for valid requests and for requests that break the description on purpose. Bounded for the suite
(FUZZ_EXAMPLES per operation); `CLEANLEDGER_FUZZ_EXAMPLES=500 ops/test -k fuzz` is the longer run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from core.adapters.postgres.api_keys import create_api_key
from core.bootstrap import LedgerService
from core.settings import Settings
from tests.processes import ManagedProcess, free_port, ingress_command, settings_env

FUZZ_EXAMPLES = int(os.environ.get("CLEANLEDGER_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_node(settings: Settings) -> Iterator[str]:
    """A real ingress process (the test run's queues), its base URL."""
    port = free_port()
    env = settings_env(settings.replace(rate_limit_burst=10**6, rate_limit_per_second=10**6))
    with ManagedProcess.start(ingress_command(port), env=env, name="fuzzed-ingress", port=port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fuzz_key(ledger: LedgerService) -> str:
    return create_api_key(ledger.pool, "fuzzing-tenant")[1]


def test_every_operation_holds_to_its_description(fuzzed_node: str, fuzz_key: str, worker: ManagedProcess) -> None:
    document = requests.get(f"{fuzzed_node}/v1/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    failures: dict[str, str] = {}
    fuzzed = 0
    for found in schema.get_all_operations():
        operation = found.ok()
        # Valid requests, and requests that break the description on purpose (each must be a 4xx problem).
        cases = st.one_of(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            case.call_and_validate(base_url=fuzzed_node, headers=headers, checks=CHECKS, timeout=30)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # each operation's first failure, reported together
            failures[operation.label] = str(exc)[:3000]
        fuzzed += 1
    assert fuzzed == sum(len(item) for item in document["paths"].values())
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())
