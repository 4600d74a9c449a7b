"""structlog set-up: JSON lines with a timestamp, level and whatever ids are bound in context
(request_id, operation_id...), so one operation can be followed from ingress to worker."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "INFO", json: bool = True) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )


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
