"""Consuming the command queue: Dramatiq actors against the pika group consumer, CPU per message, same run.

    .venv/bin/python bench/consumers.py [--messages 50000] [--threads 8,64] [--group-max 256] [--group-wait-ms 2]
                                        [--rounds 2]

Each trial fills a private queue `bench.consume.<hex>` (and `.DQ`, `.XQ`, all with Dramatiq's arguments) with
`--messages` persistent transfer commands in Dramatiq's format (`command_message`); one consumer drains it.
A, `dramatiq t<N>`: `python -m dramatiq _noop_actor --processes 1 --threads N` (bench/_noop_actor.py): a no-op
actor, one call and one ack per message. B, `pika group`: this process, through `CommandConsumer` as
workers/consumer.py uses it (prefetch 2 x `--group-max`; groups of up to `--group-max` gathered for up to
`--group-wait-ms`): one json.loads per message, one `basic_ack(multiple=True)` per group. Window: A from the
first actor call to the last, B from the first delivery to the last ack. Reported: messages/s, CPU microseconds
per message of the consuming process (time.process_time inside it) and of RabbitMQ (beam.smp trees, /proc),
totals over `--rounds` rounds (A and B interleaved), and the ratios A/B. Checks: queues drained, no dead
letters. The queues are deleted in a finally block; results go to bench/results/consumers-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine_facts, print_machine, ratio, run_started, server_roots, tree_cpu_seconds, write_results

from core.adapters.rabbitmq.commands import DEAD_LETTER_TTL_MS, command_message, dead_letter_queue, main_queue_arguments
from core.adapters.rabbitmq.consumer import CommandConsumer
from core.application.commands import Transfer
from core.domain.money import Money

AMQP_URL = os.environ.get("CLEANLEDGER_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TIMEOUT_S = 300.0  # longest a trial may take to drain


@dataclass
class Trial:
    consumer: str
    queue: str
    messages: int  # in the window
    seconds: float
    cpu_s: float  # the consuming process, in the window
    beam_s: float  # RabbitMQ, in the window
    lifetime_cpu_s: float  # A: the dramatiq process tree from exec to exit; B: this process from open to close
    beam_idle_cores: float  # RabbitMQ's CPU rate just before the trial
    groups: int | None = None


def amqp() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(AMQP_URL))  # a context manager: closed on exit


def reading(beam: list[int]) -> tuple[float, float, float]:
    """Now: the monotonic clock, this process's CPU seconds and RabbitMQ's (its beam.smp process trees)."""
    return time.monotonic(), time.process_time(), sum(map(tree_cpu_seconds, beam))


def fill(queue: str, messages: int) -> None:
    """Declare the queues as Dramatiq does and publish `messages` persistent transfer commands."""
    with amqp() as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=main_queue_arguments(queue))
        channel.queue_declare(f"{queue}.DQ", durable=True, arguments=main_queue_arguments(queue))
        channel.queue_declare(dead_letter_queue(queue), durable=True, arguments={"x-message-ttl": DEAD_LETTER_TTL_MS})
        persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        for i in range(messages):
            command = Transfer("bench", uuid.uuid4(), uuid.uuid4(), Money.for_posting(123, "USD"))
            message = command_message(
                queue_name=queue, operation_id=uuid.uuid4(), idempotency_key=uuid.uuid4().hex, command=command
            )
            channel.basic_publish("", queue, message.encode(), persistent)
            if i % 5000 == 4999:
                connection.process_data_events(0)
        while channel.queue_declare(queue, passive=True).method.message_count < messages:
            connection.sleep(0.05)


def settle(beam: list[int]) -> float:
    """Let RabbitMQ finish writing the fill; its idle CPU rate (cores) over the next 2 s."""
    time.sleep(1.0)
    before = reading(beam)[2]
    time.sleep(2.0)
    return (reading(beam)[2] - before) / 2.0


def dramatiq_trial(queue: str, threads: int, messages: int, beam: list[int], idle: float, tmp: Path) -> Trial:
    out, log = tmp / f"{queue}.json", tmp / f"{queue}.log"
    env = {**os.environ, "BENCH_AMQP_URL": AMQP_URL, "BENCH_QUEUE": queue, "BENCH_MESSAGES": str(messages)}
    env.update(BENCH_BEAM_PIDS=",".join(map(str, beam)), BENCH_OUT=str(out))
    command = [sys.executable, "-m", "dramatiq", "_noop_actor", "--path", "bench", "--processes", "1", "--threads"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as sink:  # in a process group of its own, so that a failure can stop all of it
        worker = subprocess.Popen(
            [*command, str(threads)], cwd=ROOT, env=env, stdout=sink, stderr=sink, process_group=0
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not out.exists():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dramatiq did not drain {queue} (exit {worker.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(0.01)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lifetime = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    n, seconds, cpu, beam_s = json.loads(out.read_text())
    return Trial(f"dramatiq t{threads}", queue, n, seconds, cpu, beam_s, lifetime, idle)


class TimedConsumer(CommandConsumer):
    """The worker's consumer, noting the moment of the first delivery."""

    def __init__(self, beam: list[int], **kwargs: Any) -> None:
        super().__init__(AMQP_URL, retry_delays_ms=[], **kwargs)
        self.beam, self.first = beam, (0.0, 0.0, 0.0)

    def _on_message(self, *delivery: Any) -> None:
        if self.first[0] == 0.0:
            self.first = reading(self.beam)
        super()._on_message(*delivery)


def pika_trial(queue: str, args: argparse.Namespace, beam: list[int], idle: float) -> Trial:
    start = time.process_time()
    wait_s, prefetch = args.group_wait_ms / 1000, 2 * args.group_max  # the prefetch of workers/consumer.py
    consumer = TimedConsumer(beam, queue_name=queue, group_max=args.group_max, group_wait_s=wait_s, prefetch=prefetch)
    consumer.open()
    done = groups = 0
    try:
        while done < args.messages:
            group = consumer.next_group(timeout_s=TIMEOUT_S)
            if not group:
                raise RuntimeError(f"no message from {queue} for {TIMEOUT_S} s after {done}")
            documents = [json.loads(delivery.body) for delivery in group]  # what the worker's parse starts with
            consumer.ack_through(group[-1].tag)  # flushed to the socket before it returns
            done, groups = done + len(documents), groups + 1
        end = reading(beam)
    finally:
        consumer.close()
    seconds, cpu, beam_s = (b - a for a, b in zip(consumer.first, end, strict=True))
    lifetime = time.process_time() - start
    return Trial("pika group", queue, done, seconds, cpu, beam_s, lifetime, idle, groups)


def delete_queues(queues: list[str]) -> dict[str, int]:
    """Delete the queues and their .DQ and .XQ; the messages each still held."""
    with amqp() as connection:
        channel = connection.channel()
        names = [name for queue in queues for name in (queue, f"{queue}.DQ", dead_letter_queue(queue))]
        left = {name: channel.queue_delete(name).method.message_count for name in names}
    print(f"deleted queues: {', '.join(queues)} (each with .DQ and .XQ)")
    return left


def summary(trials: list[Trial]) -> dict[str, float]:
    """Totals over a consumer's trials: messages/s and CPU microseconds per message."""
    n = sum(t.messages for t in trials)
    return {
        "trials": len(trials),
        "messages_per_s": n / sum(t.seconds for t in trials),
        "consumer_cpu_us_per_msg": 1e6 * sum(t.cpu_s for t in trials) / n,
        "rabbitmq_cpu_us_per_msg": 1e6 * sum(t.beam_s for t in trials) / n,
        "both_cpu_us_per_msg": 1e6 * sum(t.cpu_s + t.beam_s for t in trials) / n,
        "consumer_lifetime_cpu_us_per_msg": 1e6 * sum(t.lifetime_cpu_s for t in trials) / n,
    }


def row(name: str, f: dict[str, float]) -> str:
    cpu = (f[f"{k}_cpu_us_per_msg"] for k in ("consumer", "rabbitmq", "both", "consumer_lifetime"))
    return f"| {name} | {f['messages_per_s']:,.0f} | {' | '.join(f'{c:.1f}' for c in cpu)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000, help="messages per trial")
    parser.add_argument("--threads", default="8,64", help="comma-separated Dramatiq worker thread counts (A)")
    parser.add_argument("--group-max", type=int, default=256, help="B's largest group; its prefetch is twice that")
    parser.add_argument("--group-wait-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all trials, interleaved")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t]
    if args.messages < 2 or args.rounds < 1 or not threads:
        parser.error("--messages must be at least 2, --rounds at least 1, --threads not empty")
    beam = server_roots("beam.smp")
    if urlsplit(AMQP_URL).hostname != "127.0.0.1" or not beam:
        sys.exit("this benchmark needs RabbitMQ (beam.smp) on this machine, at 127.0.0.1")
    started, machine = run_started(), machine_facts()
    with amqp() as connection:
        rabbitmq = connection._impl.server_properties.get("version", b"?")
    machine.update(rabbitmq=str(rabbitmq, "utf-8") if isinstance(rabbitmq, bytes) else rabbitmq)
    machine.update(dramatiq=version("dramatiq"), pika=version("pika"))
    print_machine(machine)
    print(f"RabbitMQ {machine['rabbitmq']} (beam.smp {beam}), dramatiq {machine['dramatiq']}, pika {machine['pika']}")
    header = "| consumer | messages/s | CPU µs/msg: consumer | RabbitMQ | both | consumer, whole life |"
    print(f"{header}\n| --- | ---: | ---: | ---: | ---: | ---: |")

    trials: list[Trial] = []
    queues: list[str] = []
    left: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="cleanledger-consumers-") as tmp:
            for _ in range(args.rounds):
                for kind in [*threads, None]:
                    queues.append(queue := f"bench.consume.{uuid.uuid4().hex[:12]}")
                    fill(queue, args.messages)
                    idle = settle(beam)
                    if kind is None:
                        trials.append(pika_trial(queue, args, beam, idle))
                    else:
                        trials.append(dramatiq_trial(queue, kind, args.messages, beam, idle, Path(tmp)))
                    print(f"{row(trials[-1].consumer, summary(trials[-1:]))} RabbitMQ idle before: {idle:.3f} cores")
    finally:
        if queues:
            left = delete_queues(queues)

    names = [f"dramatiq t{t}" for t in threads] + ["pika group"]
    figures = {name: summary([t for t in trials if t.consumer == name]) for name in names}
    b = figures["pika group"]
    ratios: dict[str, float | None] = {}  # A over B, except messages/s: B over A
    for name in names[:-1]:
        a, key = figures[name], name.replace(" ", "_")
        for cpu in ("consumer", "rabbitmq", "both"):
            ratios[f"{cpu}_cpu_per_msg_{key}/pika"] = ratio(a[f"{cpu}_cpu_us_per_msg"], b[f"{cpu}_cpu_us_per_msg"])
        ratios[f"messages_per_s_pika/{key}"] = ratio(b["messages_per_s"], a["messages_per_s"])
    ratios = {k: v for k, v in ratios.items() if v is not None}
    checks: dict[str, Any] = {"messages_left": {name: n for name, n in left.items() if n}}
    checks["ok"] = not checks["messages_left"] and len(left) == 3 * len(trials)

    print()
    print_machine(machine)
    print(f"totals over {args.rounds} rounds of {args.messages:,} messages per trial:\n{header}")
    print("| --- | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(row(name, f) for name, f in figures.items()))
    for key, value in ratios.items():
        print(f"ratio {key:40} {value:.2f}")
    print(
        f"checks: {'ok' if checks['ok'] else 'FAILED'} (every queue drained, no dead letters)", checks["messages_left"]
    )
    write_results(
        "consumers",
        started=started,
        machine=machine,
        parameters={**vars(args), "threads": threads, "prefetch": 2 * args.group_max, "timeout_s": TIMEOUT_S},
        figures={"consumers": figures, "trials": trials},
        ratios=ratios,
        checks=checks,
    )
    if not checks["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
