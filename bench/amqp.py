"""Direct AMQP producers end to end: commands published straight to RabbitMQ (no HTTP, no nginx) and settled by
the real group-commit workers, against the plain-SQL baseline measured in the same run.

    .venv/bin/python bench/amqp.py [--workers 2] [--publishers 2] [--in-flight 2000] [--seconds 20]
                                   [--accounts 10000] [--cases uniform,hot-credit] [--reply-sample 0.01]
                                   [--baseline-clients 16] [--confirm] [--drain-seconds 60]

Plain SQL first (baseline.py, `--baseline-clients` pgbench clients), then a fresh migrated database, private
command queue, request exchange and request queue (`<name>.bench_<hex>`), an API key, `--accounts` accounts
funded with `execute_many`, and `--workers` `python -m workers.consumer`. Per case (`uniform`: transfers;
`hot-credit`: credits, all on the tenant's external account) `--publishers` threads, one pika connection each,
publish persistent commands to the request exchange for `--seconds`, without publisher confirms (`--confirm`: a
synchronous ack per publish) and with at most `--in-flight` published and not settled: every 50 ms the gate reads
what PostgreSQL settled (sum of the accounts' versions: two entries per operation). A `--reply-sample` share asks
for a reply: publish-to-reply latency. Reported per case: published/s, settled/s (settled_at in the window),
latency, CPU ms per settled operation per process kind (/proc), settled/s over plain SQL; checked: every published
key settled once with one transaction, no dead letters, `cleanledger verify`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import describe, plain_sql
from common import (
    ROOT,
    CpuMeter,
    checkpoint,
    fresh_database,
    machine_facts,
    percentile,
    print_machine,
    ratio,
    run_started,
    server_roots,
    write_results,
)
from e2e import Stack, forget_redis_copies

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.migrate import migrate
from core.adapters.postgres.verify import verify
from core.adapters.rabbitmq.commands import retry_delays_ms, retry_queue
from core.application.commands import CreateAccount, Credit
from core.application.views import OperationStatus
from core.bootstrap import bootstrap
from core.domain.model import OverdraftPolicy
from core.domain.money import Money
from core.settings import Settings

TENANT = "bench"
CASES = {"uniform": "transfer", "hot-credit": "credit"}  # case -> routing key
BASELINE = {"uniform": "uniform", "hot-credit": "hot"}  # case -> plain-SQL case it is divided by
OPENING_CREDIT = 10**9  # cents per account; the load moves 1..1000 per command
ENTRIES_PER_OPERATION = 2  # a transfer and a credit both post two entries
GATE_POLL_S = 0.05
WORKER = [sys.executable, "-m", "workers.consumer"]  # as the Procfile starts it


@dataclass
class Run:
    args: argparse.Namespace
    settings: Settings
    workers: Stack  # e2e's: SIGTERM to each process group, SIGKILL after 10 s; log problems
    ids: list[str] = field(default_factory=list)
    secret: str = ""


@dataclass
class Load:
    """One case's load, shared by the publisher threads, the reply listener and the gate."""

    case: str
    prefix: str  # of every idempotency key of the case
    keys: list[list[str]]  # published, per publisher
    deadline: float
    settled: int = 0  # the gate's last reading
    reply_to: str = ""
    sent: dict[str, float] = field(default_factory=dict)  # correlation id -> perf_counter() at publish
    latencies_ms: list[float] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)

    @property
    def published(self) -> int:
        return sum(len(k) for k in self.keys)

    def on_reply(self, _ch: Any, _method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        sent = self.sent.pop(str(properties.correlation_id), None)
        if sent is not None:
            self.latencies_ms.append(1000 * (time.perf_counter() - sent))
            document = json.loads(body)
            self.replies[str(document.get("status") or document.get("code"))] += 1


def open_accounts(run: Run) -> None:
    """An API key, and `--accounts` accounts each funded by one credit, with execute_many (no queue)."""
    service = bootstrap(run.settings, pool_size=2)
    try:
        _, run.secret = create_api_key(service.pool, TENANT, name="bench-amqp")

        def execute(commands: list[Any]) -> list[Any]:
            batches = [commands[i : i + 256] for i in range(0, len(commands), 256)]
            return [r for b in batches for r in service.execute_many([(c, f"setup-{uuid.uuid4().hex}") for c in b])]

        created = execute([CreateAccount(TENANT, "USD", OverdraftPolicy(0)) for _ in range(run.args.accounts)])
        run.ids = [str(r.result["account"]["id"]) for r in created if r.result is not None]
        funded = execute([Credit(TENANT, uuid.UUID(i), Money.for_posting(OPENING_CREDIT, "USD")) for i in run.ids])
        assert len(run.ids) == run.args.accounts, "accounts not created"
        assert all(r.status is OperationStatus.SUCCEEDED for r in funded), "funding credits failed"
    finally:
        service.close()


def start_workers(run: Run) -> None:
    for n in range(run.args.workers):
        with (run.workers.log_dir / f"worker{n}.log").open("wb") as log:
            run.workers.processes[f"worker{n}"] = subprocess.Popen(
                WORKER, cwd=ROOT, env=run.workers.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )


def wait_for_consumers(run: Run, timeout_s: float = 60.0) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(run.settings.amqp_url))
    deadline, queue = time.monotonic() + timeout_s, run.settings.request_queue
    try:
        while True:
            channel = connection.channel()
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):  # not declared yet
                if channel.queue_declare(queue, passive=True).method.consumer_count >= run.args.workers:
                    return
            if channel.is_open:
                channel.close()
            run.workers.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{queue} did not get {run.args.workers} consumers in {timeout_s:.0f} s")
            connection.sleep(0.2)
    finally:
        connection.close()


def delete_private(s: Settings) -> dict[str, int]:
    """Delete the command queue with its .DQ, .XQ and .retry.<n>ms, the request queue with its .XQ and the
    request exchange; the messages each queue still held."""
    q, rq = s.command_queue, s.request_queue
    delays = retry_delays_ms(
        max_retries=s.worker_max_retries, min_backoff_ms=s.worker_min_backoff_ms, max_backoff_ms=s.worker_max_backoff_ms
    )
    names = [q, f"{q}.DQ", f"{q}.XQ", *(retry_queue(q, ms) for ms in sorted(set(delays))), rq, f"{rq}.XQ"]
    connection = pika.BlockingConnection(pika.URLParameters(s.amqp_url))
    try:
        channel = connection.channel()
        left = {name: int(channel.queue_delete(name).method.message_count) for name in names}
        channel.exchange_delete(s.request_exchange)
        return left
    finally:
        connection.close()


def listen(run: Run, load: Load, stop: threading.Event) -> None:
    """Take the replies to the sampled commands off an exclusive queue of this thread's connection."""
    connection = pika.BlockingConnection(pika.URLParameters(run.settings.amqp_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_consume(queue, load.on_reply, auto_ack=True)
    load.reply_to = queue
    while not stop.is_set():
        connection.process_data_events(time_limit=0.05)
    connection.close()


def publish(run: Run, load: Load, n: int) -> None:
    """Publish until the deadline, while fewer than `--in-flight` messages are published and not settled."""
    rng, keys, a = random.Random(f"{load.prefix}{n}"), load.keys[n], run.args
    connection = pika.BlockingConnection(pika.URLParameters(run.settings.amqp_url))
    channel = connection.channel()
    if a.confirm:
        channel.confirm_delivery()
    headers = {"authorization": f"Bearer {run.secret}"}
    try:
        while time.perf_counter() < load.deadline:
            if load.published - load.settled >= a.in_flight:
                connection.sleep(0.001)
                continue
            if load.case == "uniform":
                src, dst = rng.sample(run.ids, 2)
                doc = {"source_id": src, "destination_id": dst, "amount": rng.randint(1, 1000), "currency": "USD"}
            else:
                doc = {"account_id": rng.choice(run.ids), "amount": rng.randint(1, 1000), "currency": "USD"}
            key = f"{load.prefix}{uuid.uuid4().hex}"
            reply_to = load.reply_to if rng.random() < a.reply_sample else None
            properties = pika.BasicProperties(
                message_id=key, headers=headers, content_type="application/json", delivery_mode=2,
                reply_to=reply_to, correlation_id=key if reply_to else None,
            )  # fmt: skip
            if reply_to:
                load.sent[key] = time.perf_counter()
            channel.basic_publish(run.settings.request_exchange, CASES[load.case], json.dumps(doc).encode(), properties)
            keys.append(key)
    finally:
        connection.close()


def entries_posted(conn: psycopg.Connection[Any]) -> int:
    """The gate's reading: every account's version is its entries; one scan of `--accounts` rows, no locks."""
    return int(conn.execute("SELECT coalesce(sum(version), 0)::bigint FROM accounts").fetchall()[0][0])


PHASE_SQL = """
SELECT count(*) FILTER (WHERE settled_at >= %(t0)s AND settled_at < %(t1)s), count(*),
       count(*) FILTER (WHERE status = 'failed'),
       1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at)),
       1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at))
FROM idempotency_keys WHERE tenant_id = %(tenant)s AND starts_with(key, %(prefix)s)
"""
ONCE_SQL = """
SELECT k.key, k.status, count(t.id) FROM idempotency_keys k LEFT JOIN transactions t ON t.operation_id = k.operation_id
WHERE k.tenant_id = %s AND starts_with(k.key, %s) GROUP BY k.key, k.status
"""


def run_case(run: Run, conn: psycopg.Connection[Any], case: str) -> dict[str, Any]:
    a, stop = run.args, threading.Event()
    load = Load(case, f"amqp-{case}-{uuid.uuid4().hex[:8]}-", [[] for _ in range(a.publishers)], 0.0)
    listener = threading.Thread(target=listen, args=(run, load, stop), daemon=True)
    listener.start()
    try:
        while not load.reply_to:
            if not listener.is_alive():
                raise RuntimeError("the reply listener could not start")
            time.sleep(0.01)
        checkpoint(run.settings.database_url)
        base = entries_posted(conn)
        gate = int(conn.execute("SELECT pg_backend_pid()").fetchall()[0][0])
        meter = CpuMeter({
            "worker": [p.pid for p in run.workers.processes.values()], "postgres": server_roots("postgres"),
            "gate": [gate], "rabbitmq": server_roots("beam.smp"), "redis": server_roots("redis-server"),
        })  # fmt: skip
        meter.start()
        t0 = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
        load.deadline = time.perf_counter() + a.seconds
        with ThreadPoolExecutor(a.publishers) as pool:
            futures = [pool.submit(publish, run, load, n) for n in range(a.publishers)]
            while time.perf_counter() < load.deadline:
                load.settled = (entries_posted(conn) - base) // ENTRIES_PER_OPERATION
                time.sleep(GATE_POLL_S)
            t1 = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
            for f in futures:
                f.result()
        published, drain_started = load.published, time.perf_counter()
        while (entries_posted(conn) - base) // ENTRIES_PER_OPERATION < published or load.sent:
            if time.perf_counter() - drain_started > a.drain_s:
                break
            time.sleep(GATE_POLL_S)
        drain_s = time.perf_counter() - drain_started
        cpu = {("bench" if k == "self" else k): v for k, v in meter.stop().items()}
    finally:
        stop.set()
        listener.join(10)
    run.workers.check_alive()
    params = {"t0": t0, "t1": t1, "tenant": TENANT, "prefix": load.prefix}
    in_window, total, failed, txn_p50, txn_p99 = conn.execute(PHASE_SQL, params).fetchone()  # type: ignore[misc]
    rows = conn.execute(ONCE_SQL, (TENANT, load.prefix)).fetchall()
    published_keys, settled_keys = {k for part in load.keys for k in part}, {r[0] for r in rows}
    window_s = (t1 - t0).total_seconds()
    return {
        "case": case, "window_s": window_s, "published": published, "published_per_s": published / window_s,
        "settled_in_window": in_window, "settled_per_s": in_window / window_s, "settled": total, "failed": failed,
        "drain_s": drain_s, "replies": {**load.replies, "unanswered": len(load.sent)},
        "publish_to_reply_ms": {"p50": percentile(load.latencies_ms, 50), "p99": percentile(load.latencies_ms, 99)},
        "settled_minus_created_ms": {"p50": txn_p50, "p99": txn_p99},
        "exactly_once": {
            "missing": len(published_keys - settled_keys), "unexpected": len(settled_keys - published_keys),
            "not_one_transaction": sum(1 for _, status, n in rows if status != "succeeded" or n != 1),
        },
        "cpu_seconds": cpu, "cpu_ms_per_settled": {k: (1000 * v / total if total else None) for k, v in cpu.items()},
    }  # fmt: skip


def show(p: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.2f}"

    print(
        f"{p['case']}: published {p['published_per_s']:,.0f}/s, settled {p['settled_per_s']:,.0f}/s over the"
        f" {p['window_s']:.1f} s window ({p['published']:,} published, {p['settled']:,} settled after a"
        f" {p['drain_s']:.1f} s drain, {p['failed']} failed); exactly once: {p['exactly_once']}"
    )
    reply, txn = p["publish_to_reply_ms"], p["settled_minus_created_ms"]
    print(
        f"    publish-to-reply p50 {ms(reply['p50'])} ms p99 {ms(reply['p99'])} ms (replies {p['replies']});"
        f" settled_at - created_at p50 {ms(txn['p50'])} ms p99 {ms(txn['p99'])} ms"
    )
    print("    CPU ms per settled operation: " + ", ".join(f"{k} {ms(v)}" for k, v in p["cpu_ms_per_settled"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (python -m workers.consumer)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher threads, one connection each")
    parser.add_argument("--in-flight", type=int, default=2000, help="published and not yet settled, at most")
    parser.add_argument("--seconds", type=int, default=20, help="load seconds per case (and per baseline case)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--reply-sample", type=float, default=0.01, help="share of commands that ask for a reply")
    parser.add_argument("--baseline-clients", type=int, default=16, help="pgbench clients of the plain-SQL baseline")
    parser.add_argument("--confirm", action="store_true", help="publisher confirms (each publish waits for its ack)")
    parser.add_argument("--drain-seconds", dest="drain_s", type=float, default=60.0, help="longest wait to settle")
    a = parser.parse_args()
    cases = [c for c in a.cases.split(",") if c]
    if set(cases) - set(CASES):
        parser.error(f"cases are {', '.join(CASES)}")
    started, machine = run_started(), machine_facts()
    print_machine(machine)
    plain, plain_check = plain_sql(clients=a.baseline_clients, seconds=a.seconds, accounts=a.accounts)
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case:8} ({a.baseline_clients} clients): {describe(result)}")
    suffix, base = f"bench_{uuid.uuid4().hex[:8]}", Settings.from_env()
    phases: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="cleanledger-amqp-"))
    facts: dict[str, Any] = {"log_dir": str(log_dir), "suffix": suffix}
    with fresh_database("bench_amqp") as db_url:
        private = {n: f"{getattr(base, n)}.{suffix}" for n in ("command_queue", "request_exchange", "request_queue")}
        s = base.replace(database_url=db_url, log_level="WARNING", **private)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANLEDGER_")}
        env.update(s.as_environ())
        migrate(s)
        run = Run(a, s, Stack(env, log_dir))
        try:
            setup_started = time.perf_counter()
            open_accounts(run)
            facts["setup_seconds"] = time.perf_counter() - setup_started
            print(f"{a.accounts:,} accounts opened and funded with execute_many in {facts['setup_seconds']:.1f} s")
            start_workers(run)
            wait_for_consumers(run)
            with psycopg.connect(db_url, autocommit=True) as conn:
                for case in cases:
                    phases.append(run_case(run, conn, case))
                    show(phases[-1])
                checks["verify_violations"] = [str(v) for v in verify(conn)]
        finally:
            facts["exit_codes"] = run.workers.stop()
            facts["log_problems"] = run.workers.log_problems()
            try:
                facts["queues_left"] = delete_private(s)
            except Exception as exc:
                print(f"could not delete the queues of {suffix}: {exc}", file=sys.stderr)
            with contextlib.suppress(Exception):
                facts["redis_keys_removed"] = forget_redis_copies(s.redis_url, db_url)
    checks["exactly_once"] = {p["case"]: p["exactly_once"] for p in phases}
    checks["letters_left"] = {q: n for q, n in facts.get("queues_left", {}).items() if n}
    checks["plain_sql"] = plain_check
    settled = all(p["settled"] == p["published"] and not any(p["exactly_once"].values()) for p in phases)
    checks["ok"] = ok = bool(phases) and settled and not checks["verify_violations"] and not checks["letters_left"]
    print()
    print_machine(machine)
    ratios = {
        f"{p['case']}_settled/plain_{BASELINE[p['case']]}": ratio(p["settled_per_s"], plain[BASELINE[p["case"]]].tps)
        for p in phases
    }
    for name, value in ratios.items():
        print(f"ratio {name:30} {value or 0:.3f}  (plain SQL with {a.baseline_clients} pgbench clients)")
    for name, problems in facts["log_problems"].items():
        print(f"log {name}: {problems['lines']} warning/error lines, first: {problems['first'][0]}")
    print(f"checks: {'ok' if ok else 'FAILED'}: exactly once {checks['exactly_once']}")
    print(f"    verify {checks['verify_violations'] or 'ok'}; messages left {checks['letters_left'] or 'none'}")
    print(f"worker logs: {log_dir}")
    write_results(
        "amqp",
        started=started,
        machine=machine,
        parameters={**vars(a), "cases": cases, "gate_poll_s": GATE_POLL_S},
        figures={"plain_sql": plain, "phases": phases, **facts},
        ratios=ratios,
        checks=checks,
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
