"""Log lines: our structlog calls and the libraries' stdlib records come out as the same JSON."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from core.logs import configure_logging


@pytest.fixture
def bare_root_logger() -> Iterator[None]:
    """Restores the root logger that `configure_as_a_fresh_process` changes."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.contextvars.clear_contextvars()
        configure_logging(level="WARNING", json=True)  # as tests/conftest.py set it


def configure_as_a_fresh_process() -> None:
    """The root logger as a freshly started process has it: no handlers (pytest adds its own per test)."""
    logging.getLogger().handlers.clear()
    configure_logging(level="INFO", json=True)


def test_library_records_are_json_lines_with_the_bound_ids(
    bare_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_as_a_fresh_process()
    structlog.contextvars.bind_contextvars(request_id="req-1", operation_id="op-1")
    logging.getLogger("dramatiq.worker.Worker").info("Worker process is ready for action.")
    logging.getLogger("psycopg.pool").debug("below the level: dropped")
    structlog.get_logger("ingress").info("request.done", status=202)

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 2
    library, ours = lines
    assert library["event"] == "Worker process is ready for action."
    assert library["logger"] == "dramatiq.worker.Worker"
    assert library["level"] == "info"
    assert ours["event"] == "request.done"
    assert ours["status"] == 202
    for line in lines:
        assert line["request_id"] == "req-1"
        assert line["operation_id"] == "op-1"
        assert line["timestamp"].endswith("Z")


def test_library_exceptions_keep_their_traceback(bare_root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_as_a_fresh_process()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("pika").exception("connection lost")
    (line,) = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert line["event"] == "connection lost"
    assert line["level"] == "error"
    assert "ValueError: boom" in line["exception"]
