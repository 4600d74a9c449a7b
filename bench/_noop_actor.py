"""Trial A of bench/consumers.py: the command queue consumed by a Dramatiq worker whose actor does nothing.

Started by consumers.py as `python -m dramatiq _noop_actor --path bench --processes 1 --threads N`, with
BENCH_AMQP_URL, BENCH_QUEUE, BENCH_MESSAGES, BENCH_BEAM_PIDS and BENCH_OUT in its environment. From the first
actor call to the BENCH_MESSAGES-th it measures this worker process's CPU (time.process_time: all its threads)
and RabbitMQ's (the beam.smp process trees, from /proc), and writes them as JSON to BENCH_OUT.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import dramatiq
from common import tree_cpu_seconds
from dramatiq.brokers.rabbitmq import RabbitmqBroker

MESSAGES = int(os.environ["BENCH_MESSAGES"])
OUT = Path(os.environ["BENCH_OUT"])
BEAM = [int(pid) for pid in os.environ["BENCH_BEAM_PIDS"].split(",")]

broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"], confirm_delivery=True)
dramatiq.set_broker(broker)
_calls = itertools.count(1)
_first: list[float] = []


def _reading() -> list[float]:
    """The monotonic clock, this process's CPU seconds and RabbitMQ's."""
    return [time.monotonic(), time.process_time(), sum(map(tree_cpu_seconds, BEAM))]


@dramatiq.actor(actor_name="execute_command", queue_name=os.environ["BENCH_QUEUE"], max_retries=0)
def execute_command(operation_id: str, idempotency_key: str, command: dict[str, Any]) -> None:
    """No-op: Dramatiq has already decoded the message and passes its kwargs."""
    call = next(_calls)
    if call == 1:
        _first.extend(_reading())
    elif call == MESSAGES:  # [messages, seconds, CPU seconds of this process, of RabbitMQ] in the window
        window = [call - 1, *(last - first for first, last in zip(_first, _reading(), strict=True))]
        partial = OUT.with_suffix(".partial")
        partial.write_text(json.dumps(window))
        partial.rename(OUT)
