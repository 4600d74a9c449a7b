"""structlog set-up: JSON lines with a timestamp, level and whatever ids are bound in context
(request_id, operation_id...), so one operation can be followed from ingress to worker."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "INFO", json: bool = True) -> None:
    """Our own log calls (structlog) and the libraries' (stdlib logging: Dramatiq, psycopg_pool, pika...)
    come out as the same lines, JSON by default, with the ids bound in context."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    _render_stdlib_records(shared, renderer, numeric_level)


def _render_stdlib_records(
    shared: list[structlog.typing.Processor], renderer: structlog.typing.Processor, level: int
) -> None:
    """Give the root logger's handlers our renderer. Dramatiq's CLI has already installed its own handler
    (in a worker process it writes to the pipe the parent forwards); elsewhere there is none yet."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_CurrentStderrHandler())
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level)
    # pika narrates every connection's bring-up and teardown at INFO (a dozen lines each); its warnings and
    # errors still come through.
    logging.getLogger("pika").setLevel(max(level, logging.WARNING))


class _CurrentStderrHandler(logging.Handler):
    """Writes each record to whatever `sys.stderr` is at the time of the call (see `_StderrLogger`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the process down
            self.handleError(record)


class _StderrLogger:
    """Writes each line to whatever `sys.stderr` is at the time of the call, not at configuration (test
    runners and daemonizers swap it); one write per line so threads do not interleave within a line."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _stderr_logger(*args: object) -> _StderrLogger:
    return _StderrLogger()
