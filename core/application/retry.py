"""Retrying a whole unit of work when a concurrent transaction won (serialization failure or deadlock)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from core.domain.errors import TransientConflict

T = TypeVar("T")
log = structlog.get_logger(__name__)


class RetryCounter:
    """Thread-safe count of retries, for tests, benchmarks and metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.exhausted = 0

    def add(self, *, exhausted: bool = False) -> None:
        with self._lock:
            if exhausted:
                self.exhausted += 1
            else:
                self.retries += 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter (sleep = uniform(0, min(cap, base * 2^attempt))).

    Bounded: after `max_attempts` tries the `TransientConflict` propagates to the caller (a worker then
    lets its queue redeliver the command later).
    """

    max_attempts: int = 12  # tries in all, the first included
    base_delay: float = 0.002  # seconds, before the first retry's jitter
    max_delay: float = 0.25  # seconds, cap of one sleep
    counter: RetryCounter = field(default_factory=RetryCounter)

    def run(self, unit: Callable[[], T], *, what: str = "unit-of-work") -> T:
        for attempt in range(1, self.max_attempts + 1):
            try:
                return unit()
            except TransientConflict as exc:
                if attempt == self.max_attempts:
                    self.counter.add(exhausted=True)
                    log.warning("retry.exhausted", what=what, attempts=attempt, reason=exc.detail)
                    raise
                self.counter.add()
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                log.info("retry", what=what, attempt=attempt, delay_s=round(delay, 4), reason=exc.detail)
                time.sleep(delay)
        raise AssertionError("unreachable")
