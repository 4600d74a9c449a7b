"""Settings from the environment: validated, with the variable named and the value (maybe a secret) never shown."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.settings import Settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLEANLEDGER_LOG_JSON", "flase"),
        ("CLEANLEDGER_LOG_LEVEL", "verbose"),
        ("CLEANLEDGER_DB_POOL_MAX", "-1"),
        ("CLEANLEDGER_DB_POOL_MIN", "-3"),
        ("CLEANLEDGER_INGRESS_PORT", "70000"),
        ("CLEANLEDGER_WORKER_GROUP_MAX", "0"),
        ("CLEANLEDGER_WEBHOOK_TIMEOUT_S", "soon"),
    ],
)
def test_a_bad_value_is_refused(variable: str, value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings.from_env({variable: value})
    assert refused.value.errors()[0]["loc"] == (variable.removeprefix("CLEANLEDGER_").lower(),)


def test_values_are_read_and_normalised() -> None:
    settings = Settings.from_env(
        {"CLEANLEDGER_LOG_LEVEL": " warning ", "CLEANLEDGER_LOG_JSON": "off", "CLEANLEDGER_DB_POOL_MAX": "4"}
    )
    assert (settings.log_level, settings.log_json, settings.db_pool_max) == ("WARNING", False, 4)
    assert Settings.from_env({}).log_json is True  # the default


def test_inconsistent_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="db_pool_min must not exceed db_pool_max"):
        Settings.from_env({"CLEANLEDGER_DB_POOL_MIN": "8", "CLEANLEDGER_DB_POOL_MAX": "4"})
    with pytest.raises(ValidationError):
        Settings().replace(worker_min_backoff_ms=60_000, worker_max_backoff_ms=1_000)


def test_secrets_are_never_printed() -> None:
    secret = "s3cr3t-pa55word"
    settings = Settings.from_env({"CLEANLEDGER_AMQP_URL": f"amqp://app:{secret}@broker:5672/%2F"})
    assert settings.amqp_url.endswith("@broker:5672/%2F")
    assert secret not in repr(settings) and secret not in str(settings)
    with pytest.raises(ValidationError) as refused:
        Settings.from_env({"CLEANLEDGER_DB_POOL_MAX": secret})
    assert secret not in str(refused.value)


def test_settings_survive_their_environment_round_trip() -> None:
    settings = Settings().replace(log_json=False, worker_group_wait_ms=0.5, events_exchange="x.events")
    assert Settings.from_env(settings.as_environ()) == settings


def test_an_entry_point_names_the_variable_and_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.relay"],
        env={"CLEANLEDGER_LOG_JSON": "flase", "CLEANLEDGER_DATABASE_URL": "postgresql://u:hunter2@nowhere/x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("relay: CLEANLEDGER_LOG_JSON: Input should be a valid boolean")
    assert "Traceback" not in done.stderr and "flase" not in done.stderr and "hunter2" not in done.stderr
