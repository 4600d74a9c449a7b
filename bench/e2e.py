"""End to end through nginx: the stack `ops/run` runs, loaded by an async client with a fixed number of requests
in flight, against the plain-SQL baseline measured with as many clients in the same run.

    .venv/bin/python bench/e2e.py [--in-flight 64] [--seconds 20] [--accounts 10000]
                                  [--cases uniform,hot-credit] [--modes wait,accept] [--drain-seconds 60]
                                  [--compare-without audit,mongo,webhooks]

1. Baseline first (bench/baseline.py): the plain-SQL `post_transfer` driven by pgbench with `--in-flight` clients,
   uniform and hot, for `--seconds` each.
2. A private stack: a fresh, migrated database, a private command queue (`ledger.commands.bench_<hex>`), and every
   line of the Procfile started with `bash -c` in the repo root in its own process group, with CLEANLEDGER_*
   pointing at them, CLEANLEDGER_LOG_LEVEL=WARNING and the rate limit raised out of the way; logs go to a temp
   dir. nginx listens on 127.0.0.1:8080, so the script refuses to start while anything answers there (ops/run).
3. An API key from `cleanledger create-api-key --tenant bench`; `--accounts` accounts opened and funded through
   the API (POST /v1/accounts and /v1/credits with `Prefer: wait=30`).
4. Per case and mode, `--in-flight` requests are kept outstanding for `--seconds`, each with a new
   Idempotency-Key. Cases: `uniform` (transfers between random accounts), `hot-credit` (credits to random
   accounts: all of them write the tenant's one external account), `hot-transfer` (transfers all into one
   account). Modes: `wait` (`Prefer: wait=10`: a 201/200 answer is the settled outcome) and `accept` (no wait:
   202, settled later by the workers). After each `wait` phase comes `wait-paced`: the same requests sent open
   loop at `--paced-fraction` (0.5) of the settled/s just measured, its latency counted from when each request
   was due. After the load, the script waits up to `--drain-seconds` until the database holds no pending
   operation of the phase.
   Reported: accepted/s (2xx answers over the load window), settled/s (operations of the phase over the time from
   its start to the last settlement, from the database), POST latency p50/p99, accept-to-settled p50/p99
   (idempotency_keys.settled_at - created_at), answers that were not 2xx by status, and CPU milliseconds per
   settled operation of each process kind, from /proc before and after the phase (drain included): the Procfile's
   kinds (ingress = its three nodes), postgres (the whole server), rabbitmq (beam.smp), redis, loadgen (this
   process) and machine (all CPU the machine spent; machine minus the rest is whatever else ran).
5. Checks: every phase's accepted == settled == its rows in the database, none pending; `cleanledger verify`
   exits 0. Ratios: settled/s of each phase over the plain-SQL baseline (uniform for uniform, hot otherwise).
6. `--compare-without PROCESSES` (Procfile names, comma-separated): the price of those processes, measured in
   the same run. The run's tenant is `bench-<hex>`, MongoDB keeps its data in a directory of the run's own
   (deleted after; the Procfile's var/mongo outlives runs, and a grown store is slower), the webhook allow-list
   admits 127.0.0.0/8, and a receiver (aiohttp in a child process on 127.0.0.1, answers 200, counts deliveries)
   gets one endpoint subscribed to `*`, registered after the accounts are funded. Each part runs an unmeasured
   warm-up, then every case and mode; after each phase the script waits (up to `--drain-seconds`, CPU metered
   as the phase's catch-up) until the audit trail and the webhook deliveries have caught up with the outbox.
   After the "on" part (everything running) the audit trail must hold every outbox event of the tenant (a drain
   of up to 60 s) and the receiver every delivery; then the stack is stopped, started again from the Procfile
   minus PROCESSES on the same database, queues and accounts, and the phases run again. Ratios: settled/s on /
   settled/s without, per case and mode; CPU ms per settled operation per process kind for both parts.
Everything is stopped (SIGTERM to each process group, SIGKILL after 10 s), the queues and the database dropped,
in a finally block. Results go to bench/results/e2e-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pymongo
from aiohttp import web
from pymongo.errors import PyMongoError

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

from core.adapters.postgres.migrate import migrate
from core.adapters.rabbitmq.connection import queue_depth
from core.settings import Settings

TENANT = "bench"
CASES = ("uniform", "hot-credit", "hot-transfer")
MODES = ("wait", "accept")
NGINX_PORT = 8080
INGRESS_PORTS = (8081, 8082, 8083)
MONGO_PORT = 27017  # the Procfile's SecantusDB
API = f"http://127.0.0.1:{NGINX_PORT}"
OPENING_CREDIT = 10**9  # cents per account; the load moves 1..1000 per request
WAIT_S = 10  # Prefer: wait=N of the `wait` mode
STOP_GRACE_S = 10.0
# --compare-without: the longest wait for the audit trail after the "on" part, the unmeasured warm-up of each
# part, the networks webhooks may reach (the receiver is on loopback) and the processes the load goes through.
AUDIT_DRAIN_S = 60.0
WARM_UP_S = 2
WEBHOOK_ALLOWED_NETWORKS = "127.0.0.0/8"
LOAD_PATH_KINDS = ("nginx", "ingress")
LOG_PROBLEM = re.compile(r'"level":\s*"(warning|error|critical)"|Traceback|\[(warn|error|crit|alert|emerg)\]', re.I)


# --- the stack -------------------------------------------------------------------------------------------------
def port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def healthy(port: int) -> bool:
    """GET /healthz answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def procfile() -> list[tuple[str, str]]:
    """(name, command) of every `name: command` line of the Procfile."""
    entries = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line.strip())
        if match and not line.lstrip().startswith("#"):
            entries.append((match.group(1), match.group(2)))
    return entries


def kind_of(name: str) -> str:
    """ingress1, ingress2... -> ingress."""
    return re.sub(r"\d+$", "", name)


@dataclass
class Stack:
    env: dict[str, str]
    log_dir: Path
    exclude: frozenset[str] = frozenset()  # Procfile names not started
    # The Procfile's MongoDB keeps its data in var/mongo, which outlives runs: a run's own directory instead, so
    # every run's audit trail starts empty (a Mongo-wire server grown by earlier runs is slower).
    mongo_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] | None = None  # once stopped

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name, command in procfile():
            if name in self.exclude:
                continue
            if name == "mongo" and self.mongo_dir is not None:
                assert "var/mongo" in command, command
                command = command.replace("var/mongo", str(self.mongo_dir))
            log = (self.log_dir / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                ["bash", "-c", command],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()

    def wait_ready(self, timeout_s: float = 60.0, extra_ports: tuple[int, ...] = ()) -> None:
        deadline = time.monotonic() + timeout_s
        for port in (*INGRESS_PORTS, NGINX_PORT, *extra_ports):
            while not port_answers(port):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} within {timeout_s:.0f} s")
                time.sleep(0.2)
        for port in (*INGRESS_PORTS, NGINX_PORT):
            while not healthy(port):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"/healthz on 127.0.0.1:{port} did not answer 200 within {timeout_s:.0f} s")
                time.sleep(0.2)

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"stack processes exited: {dead}; logs in {self.log_dir}")

    def roots(self) -> dict[str, list[int]]:
        kinds: dict[str, list[int]] = {}
        for name, process in self.processes.items():
            kinds.setdefault(kind_of(name), []).append(process.pid)
        return kinds

    def runs(self, kind: str) -> bool:
        return any(kind_of(name) == kind for name in self.processes)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every process group, SIGKILL to those still there after STOP_GRACE_S; exit codes. Once:
        a second call answers the same codes (the groups' ids may belong to other processes by then)."""
        if self.exit_codes is not None:
            return self.exit_codes
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            # The group too: a leader that exited may leave children (nginx workers, Dramatiq's processes).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            codes[name] = process.returncode
        self.exit_codes = codes
        return codes

    def log_problems(self) -> dict[str, dict[str, Any]]:
        """Per process: how many log lines look like warnings or errors, and the first few of them."""
        found: dict[str, dict[str, Any]] = {}
        for name in self.processes:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            bad = [line for line in lines if LOG_PROBLEM.search(line)]
            if bad:
                found[name] = {"lines": len(bad), "first": [line[:400] for line in bad[:3]]}
        return found


def queues_beside(queue: str) -> list[str]:
    """Queues named `<queue>.<anything>` (Dramatiq's .DQ/.XQ, the consumer's retry queues), from rabbitmqctl;
    none if it cannot be asked."""
    try:
        listed = subprocess.run(
            ["rabbitmqctl", "list_queues", "--quiet", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [name for name in listed.split() if name.startswith(f"{queue}.")]


def delete_queues(amqp_url: str, queue: str) -> list[str]:
    """The private command queue and every queue beside it (at least Dramatiq's delay and dead-letter queues)."""
    import pika

    names = sorted(
        {
            queue,
            f"{queue}.DQ",
            f"{queue}.XQ",
            *(f"{queue}.{subscriber}{dead}" for subscriber in ("webhooks", "audit") for dead in ("", ".XQ")),
            *queues_beside(queue),
        }
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
        channel.exchange_delete(f"{queue}.events")  # the run's private events exchange
    finally:
        connection.close()
    return names


def forget_redis_copies(redis_url: str, db_url: str) -> int:
    """Drop the Redis copies this run left (idempotency keys under the database's id, settled results)."""
    import redis

    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT id::text FROM ledger_instance").fetchone()
        ops = [str(r[0]) for r in conn.execute("SELECT operation_id FROM idempotency_keys").fetchall()]
    client = redis.Redis.from_url(redis_url)
    try:
        names = [f"cleanledger:op:{op}" for op in ops]
        if row is not None:
            names += [n.decode() for n in client.scan_iter(match=f"cleanledger:idem:{row[0]}:*", count=1000)]
        for i in range(0, len(names), 1000):
            client.unlink(*names[i : i + 1000])
        return len(names)
    finally:
        client.close()


def stack_env(db_url: str, queue: str, *, loopback_webhooks: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANLEDGER_")}
    env.update(
        {
            "PWD": str(ROOT),
            "CLEANLEDGER_DATABASE_URL": db_url,
            "CLEANLEDGER_COMMAND_QUEUE": queue,
            "CLEANLEDGER_WEBHOOK_QUEUE": f"{queue}.webhooks",  # the Procfile's webhook worker: private, deleted after
            # The audit consumer's: private too, so it reads this run's events only (not the backlog other runs
            # left in the shared `ledger.audit`) and the ones it leaves are deleted with the run.
            "CLEANLEDGER_AUDIT_QUEUE": f"{queue}.audit",
            "CLEANLEDGER_EVENTS_EXCHANGE": f"{queue}.events",  # private: deleted after, with the queues
            "CLEANLEDGER_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
            "CLEANLEDGER_RATE_LIMIT_BURST": str(10**9),
            "CLEANLEDGER_RATE_LIMIT_PER_SECOND": str(10**9),
        }
    )
    if loopback_webhooks:
        env["CLEANLEDGER_WEBHOOK_ALLOWED_NETWORKS"] = WEBHOOK_ALLOWED_NETWORKS
    return env


def names_off_the_load_path(parser: argparse.ArgumentParser, option: str, value: str) -> list[str]:
    """The Procfile names a comma-separated `option` leaves out of the stack, sorted; a parser error for a name the
    Procfile does not have, or for nginx or an ingress node (the load goes through them)."""
    without = sorted({name.strip() for name in value.split(",") if name.strip()})
    names = [name for name, _ in procfile()]
    unknown = [name for name in without if name not in names]
    if unknown:
        parser.error(f"{option} takes Procfile names ({', '.join(names)}); not {unknown}")
    if any(kind_of(name) in LOAD_PATH_KINDS for name in without):
        parser.error(f"{option} cannot leave out nginx or an ingress node: the load goes through them")
    return without


def wait_ports_free(ports: tuple[int, ...], timeout_s: float = 15.0) -> None:
    """Until nothing answers on any of `ports` (a stopped stack's sockets are gone)."""
    deadline = time.monotonic() + timeout_s
    while busy := [port for port in ports if port_answers(port)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1 ports {busy} still answer {timeout_s:.0f} s after the stack stopped")
        time.sleep(0.2)


def cleanledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cleanledger"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def api_key(env: dict[str, str], tenant: str) -> str:
    """A new API key of `tenant`, from `cleanledger create-api-key`: its secret."""
    made = cleanledger(env, "create-api-key", "--tenant", tenant)
    if made.returncode != 0:
        raise RuntimeError(f"create-api-key failed: {made.stderr}")
    return made.stdout.strip().splitlines()[-1]


# --- HTTP ------------------------------------------------------------------------------------------------------
async def settled_request(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST until the operation settled (setup): waits with `Prefer: wait=30`, honours 409/429/503."""
    key = uuid.uuid4().hex
    for _ in range(30):
        async with session.post(
            f"{API}{path}", json=body, headers={"Idempotency-Key": key, "Prefer": "wait=30"}
        ) as response:
            doc: dict[str, Any] = await response.json(content_type=None)
            if response.status in (200, 201) and doc.get("status") == "succeeded":
                return doc
            if response.status in (202, 409, 429, 503):
                await asyncio.sleep(min(1.0, float(response.headers.get("Retry-After", "0.2"))))
                continue
            raise RuntimeError(f"POST {path} answered {response.status}: {doc}")
    raise RuntimeError(f"POST {path} did not settle")


async def open_accounts(session: aiohttp.ClientSession, accounts: int, concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate:
            doc = await settled_request(session, "/v1/accounts", {"currency": "USD"})
            account_id: str = doc["result"]["account"]["id"]
            await settled_request(
                session, "/v1/credits", {"account_id": account_id, "amount": OPENING_CREDIT, "currency": "USD"}
            )
            return account_id

    return list(await asyncio.gather(*(one() for _ in range(accounts))))


BodyMaker = Callable[[random.Random], dict[str, Any]]  # a request's body from the load loop's own random stream


def body_maker(case: str, ids: list[str]) -> tuple[str, BodyMaker]:
    hot, others = ids[0], ids[1:]

    def uniform(rng: random.Random) -> dict[str, Any]:
        src, dst = rng.sample(ids, 2)
        return {"source_id": src, "destination_id": dst, "amount": rng.randint(1, 1000), "currency": "USD"}

    def hot_credit(rng: random.Random) -> dict[str, Any]:
        return {"account_id": rng.choice(ids), "amount": rng.randint(1, 1000), "currency": "USD"}

    def hot_transfer(rng: random.Random) -> dict[str, Any]:
        return {
            "source_id": rng.choice(others),
            "destination_id": hot,
            "amount": rng.randint(1, 1000),
            "currency": "USD",
        }

    return {
        "uniform": ("/v1/transfers", uniform),
        "hot-credit": ("/v1/credits", hot_credit),
        "hot-transfer": ("/v1/transfers", hot_transfer),
    }[case]


@dataclass
class Load:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    settled_in_answer: int = 0  # wait mode: 201/200 with a final status
    elapsed_s: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)


def settled_answer(raw: bytes) -> bool:
    """The answer carries the operation's final status (succeeded or failed)."""
    try:
        return json.loads(raw).get("status") in ("succeeded", "failed")
    except (ValueError, AttributeError):
        return False


async def generate(
    session: aiohttp.ClientSession,
    case: str,
    ids: list[str],
    *,
    prefix: str,
    wait: bool,
    in_flight: int,
    seconds: int,
    rate: float | None = None,
    request: tuple[str, BodyMaker] | None = None,
    wait_s: int = WAIT_S,
    is_settled: Callable[[bytes], bool] = settled_answer,
) -> Load:
    """Closed loop (`rate` None): `in_flight` loops, each sending its next POST as soon as the previous one was
    answered, for `seconds`. Open loop (`rate` requests/s): one POST every 1/rate s, whatever the answers, at
    most `in_flight` at once; a latency counts from when the request was due, so a stalled server is not
    excused by the requests it kept from being sent (no coordinated omission).
    `request` (path, body maker) replaces the case's; in wait mode (`Prefer: wait=<wait_s>`) `is_settled` judges
    each 200/201 answer's body: does it carry the final outcome (bench/batches.py also reads its items)."""
    path, make = request or body_maker(case, ids)
    load = Load()
    url = f"{API}{path}"
    started = time.perf_counter()
    deadline = started + seconds
    headers = {"Content-Type": "application/json"}
    if wait:
        headers["Prefer"] = f"wait={wait_s}"

    async def post(rng: random.Random, due: float) -> None:
        data = json.dumps(make(rng)).encode()
        try:
            request_headers = {**headers, "Idempotency-Key": f"{prefix}{uuid.uuid4().hex}"}
            async with session.post(url, data=data, headers=request_headers) as response:
                raw = await response.read()
                load.statuses[response.status] += 1
                if wait and response.status in (200, 201) and is_settled(raw):
                    load.settled_in_answer += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.errors[type(exc).__name__] += 1
            return
        load.latencies_ms.append(1000 * (time.perf_counter() - due))

    async def loop(n: int) -> None:
        rng = random.Random(f"{prefix}{n}")
        while (now := time.perf_counter()) < deadline:
            await post(rng, now)

    async def paced(rate: float) -> None:
        rng = random.Random(prefix)
        slots = asyncio.Semaphore(in_flight)
        tasks: set[asyncio.Task[None]] = set()
        due = started

        async def one(due: float) -> None:
            async with slots:
                await post(rng, due)

        while due < deadline:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += 1 / rate
        await asyncio.gather(*tasks)

    if rate is None:
        await asyncio.gather(*(loop(n) for n in range(in_flight)))
    else:
        await paced(rate)
    load.elapsed_s = time.perf_counter() - started
    return load


# --- the database's view of a phase ---------------------------------------------------------------------------
PHASE_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'succeeded'),
       count(*) FILTER (WHERE status = 'failed'),
       extract(epoch FROM max(settled_at))::float8,
       1000 * percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at)),
       1000 * percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM settled_at - created_at))
FROM idempotency_keys WHERE tenant_id = %s AND starts_with(key, %s)
"""


@dataclass
class DbView:
    rows: int
    pending: int
    succeeded: int
    failed: int
    last_settled_epoch: float | None
    settle_p50_ms: float | None
    settle_p99_ms: float | None


def db_view(conn: psycopg.Connection[Any], prefix: str, tenant: str = TENANT) -> DbView:
    row = conn.execute(PHASE_SQL, (tenant, prefix)).fetchone()
    assert row is not None
    return DbView(*row)


def drain(conn: psycopg.Connection[Any], prefix: str, timeout_s: float, tenant: str = TENANT) -> tuple[DbView, float]:
    """Wait until no operation of the phase is pending (or `timeout_s` passed); the view and the seconds waited."""
    started = time.perf_counter()
    while True:
        view = db_view(conn, prefix, tenant)
        waited = time.perf_counter() - started
        if view.pending == 0 or waited > timeout_s:
            return view, waited
        time.sleep(0.25)


class BacklogSampler:
    """The outbox backlog (events staged, not yet published by the relay) every `interval_s`, on a thread and a
    connection of its own, while a phase runs: whether the relay keeps up, and how far it fell behind."""

    def __init__(self, db_url: str, *, interval_s: float = 0.25) -> None:
        self.db_url = db_url
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-backlog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, int | None]:
        self._stop.set()
        self._thread.join()
        return {
            "max": max(self.samples, default=None),
            "last": self.samples[-1] if self.samples else None,
            "samples": len(self.samples),
        }

    def _run(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self._stop.wait(self.interval_s):
                row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
                self.samples.append(int(row[0]) if row else 0)


# --- a phase ---------------------------------------------------------------------------------------------------
@dataclass
class Phase:
    case: str
    mode: str
    in_flight: int
    load_seconds: float
    requests: int
    accepted: int
    accepted_per_s: float
    settled: int
    settled_per_s: float | None
    settled_in_answer: int
    succeeded: int
    failed: int
    pending_after_drain: int
    db_rows: int
    drain_seconds: float
    post_latency_ms: dict[str, float | None]
    accept_to_settled_ms: dict[str, float | None]
    not_2xx: dict[str, int]
    client_errors: dict[str, int]
    cpu_seconds: dict[str, float]
    cpu_ms_per_settled: dict[str, float | None]
    rate_per_s: float | None = None  # the open-loop request rate (wait-paced), None for a closed loop
    outbox_backlog: dict[str, int | None] | None = None  # events unpublished, sampled during the load: max, last

    @property
    def consistent(self) -> bool:
        return self.pending_after_drain == 0 and self.accepted == self.settled == self.db_rows


def phase_kinds(stack: Stack, extra: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """The process-tree roots of each kind the phases meter: the stack's, the servers' and `extra`."""
    kinds = stack.roots()
    kinds.update({"postgres": server_roots("postgres"), "rabbitmq": server_roots("beam.smp")})
    kinds["redis"] = server_roots("redis-server")
    kinds.update(extra or {})
    return kinds


async def run_phase(
    session: aiohttp.ClientSession,
    conn: psycopg.Connection[Any],
    stack: Stack,
    *,
    case: str,
    mode: str,
    ids: list[str],
    in_flight: int,
    seconds: int,
    drain_s: float,
    db_url: str,
    tenant: str = TENANT,
    extra_kinds: dict[str, list[int]] | None = None,
    rate: float | None = None,
    prefix: str | None = None,
    request: tuple[str, BodyMaker] | None = None,
    wait_s: int = WAIT_S,
    is_settled: Callable[[bytes], bool] = settled_answer,
) -> Phase:
    """One measured phase. The blocking calls (checkpoint, /proc, the drain's queries) run while no request is
    in flight. `prefix` starts every Idempotency-Key of the phase (default: case, mode and a random part);
    `request`, `wait_s` and `is_settled` go to `generate`."""
    prefix = prefix or f"{case}-{mode}-{uuid.uuid4().hex[:8]}-"
    kinds = phase_kinds(stack, extra_kinds)
    checkpoint(db_url)
    meter = CpuMeter(kinds)
    meter.start()
    backlog = BacklogSampler(db_url)
    backlog.start()
    started_epoch = time.time()
    load = await generate(
        session,
        case,
        ids,
        prefix=prefix,
        wait=mode.startswith("wait"),
        in_flight=in_flight,
        seconds=seconds,
        rate=rate,
        request=request,
        wait_s=wait_s,
        is_settled=is_settled,
    )
    outbox_backlog = backlog.stop()
    view, drained = drain(conn, prefix, drain_s, tenant)
    seconds_used = meter.stop()
    stack.check_alive()
    settled = view.succeeded + view.failed
    cpu = {("loadgen" if k == "self" else k): v for k, v in seconds_used.items()}
    return Phase(
        case=case,
        mode=mode,
        in_flight=in_flight,
        load_seconds=load.elapsed_s,
        requests=sum(load.statuses.values()) + sum(load.errors.values()),
        accepted=load.accepted,
        accepted_per_s=load.accepted / load.elapsed_s,
        settled=settled,
        settled_per_s=(
            settled / (view.last_settled_epoch - started_epoch) if settled and view.last_settled_epoch else None
        ),
        settled_in_answer=load.settled_in_answer,
        succeeded=view.succeeded,
        failed=view.failed,
        pending_after_drain=view.pending,
        db_rows=view.rows,
        drain_seconds=drained,
        post_latency_ms={"p50": percentile(load.latencies_ms, 50), "p99": percentile(load.latencies_ms, 99)},
        accept_to_settled_ms={"p50": view.settle_p50_ms, "p99": view.settle_p99_ms},
        not_2xx={str(s): n for s, n in sorted(load.statuses.items()) if not 200 <= s < 300},
        client_errors=dict(load.errors),
        cpu_seconds=cpu,
        cpu_ms_per_settled={k: (1000 * v / settled if settled else None) for k, v in cpu.items()},
        rate_per_s=rate,
        outbox_backlog=outbox_backlog,
    )


def api_session(secret: str, in_flight: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=in_flight),
        headers={"Authorization": f"Bearer {secret}"},
        timeout=aiohttp.ClientTimeout(total=WAIT_S + 50),
    )


async def measure(
    stack: Stack, secret: str, *, db_url: str, args: argparse.Namespace, cases: list[str], modes: list[str]
) -> tuple[float, list[Phase]]:
    """Open and fund the accounts through the API, then run every phase; the setup seconds and the phases."""
    async with api_session(secret, args.in_flight) as session:
        setup_started = time.perf_counter()
        ids = await open_accounts(session, args.accounts, args.in_flight)
        setup_s = time.perf_counter() - setup_started
        print(f"{args.accounts:,} accounts opened and funded through the API in {setup_s:.1f} s")
        phases = []
        with psycopg.connect(db_url, autocommit=True) as conn:
            for case in cases:
                for mode in modes:
                    phase = await run_phase(
                        session,
                        conn,
                        stack,
                        case=case,
                        mode=mode,
                        ids=ids,
                        in_flight=args.in_flight,
                        seconds=args.seconds,
                        drain_s=args.drain_seconds,
                        db_url=db_url,
                    )
                    show(phase)
                    phases.append(phase)
                    if mode == "wait" and args.paced_fraction > 0 and phase.settled_per_s:
                        # The same requests at a fraction of the highest rate just sustained: latency with
                        # headroom, as a service runs day to day.
                        rate = args.paced_fraction * phase.settled_per_s
                        print(f"  paced at {args.paced_fraction:g} x {phase.settled_per_s:,.0f}/s = {rate:,.0f}/s")
                        paced = await run_phase(
                            session,
                            conn,
                            stack,
                            case=case,
                            mode="wait-paced",
                            ids=ids,
                            in_flight=args.in_flight * 4,
                            seconds=args.seconds,
                            drain_s=args.drain_seconds,
                            db_url=db_url,
                            rate=rate,
                        )
                        show(paced)
                        phases.append(paced)
        return setup_s, phases


def show(phase: Phase) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    settled_rate = "-" if phase.settled_per_s is None else f"{phase.settled_per_s:,.0f}"
    print(
        f"{phase.case}/{phase.mode}: accepted {phase.accepted_per_s:,.0f}/s, settled {settled_rate}/s"
        f" ({phase.accepted:,} accepted, {phase.settled:,} settled, {phase.pending_after_drain} pending after"
        f" {phase.drain_seconds:.1f} s drain, {phase.failed} failed)"
    )
    print(
        f"    POST p50 {ms(phase.post_latency_ms['p50'])} ms p99 {ms(phase.post_latency_ms['p99'])} ms;"
        f" accept-to-settled p50 {ms(phase.accept_to_settled_ms['p50'])} ms"
        f" p99 {ms(phase.accept_to_settled_ms['p99'])} ms; not 2xx {phase.not_2xx or 'none'};"
        f" client errors {phase.client_errors or 'none'}"
    )
    cpu = ", ".join(f"{k} {ms(v)}" for k, v in phase.cpu_ms_per_settled.items())
    print(f"    CPU ms per settled operation: {cpu}")
    if phase.outbox_backlog is not None:
        backlog = phase.outbox_backlog
        print(f"    outbox backlog during the load: max {backlog['max']}, at the end {backlog['last']}")


# --- --compare-without: the webhook receiver, the work behind the outbox, the two parts ----------------------
def serve_receiver(port: Any, requests: Any, distinct: Any, ready: Any) -> None:
    """The receiver's process: aiohttp on a free port of 127.0.0.1 (written to `port`); every POST /hooks is
    answered 200 and counted in `requests`, its Cleanledger-Delivery id (the same on a retry) in `distinct`."""
    seen: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        requests.value += 1
        delivery = request.headers.get("Cleanledger-Delivery", "")
        if delivery not in seen:
            seen.add(delivery)
            distinct.value += 1
        return web.Response(status=200)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hooks", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        port.value = sock.getsockname()[1]
        ready.set()
        await asyncio.Event().wait()  # until terminated

    asyncio.run(serve())


@dataclass
class Receiver:
    """The webhook receiver in a child process of its own: its CPU is reported apart (`receiver`), and it
    takes no time from the load generator's event loop."""

    process: BaseProcess
    port: int
    requests: ctypes.c_int64
    distinct: ctypes.c_int64

    @classmethod
    def start(cls) -> Receiver:
        context = multiprocessing.get_context("spawn")
        port, requests, distinct = (context.RawValue(ctypes.c_int64, 0) for _ in range(3))
        ready = context.Event()
        process = context.Process(
            target=serve_receiver, args=(port, requests, distinct, ready), name="webhook-receiver", daemon=True
        )
        process.start()
        deadline = time.monotonic() + 30
        while not ready.wait(0.2):
            if not process.is_alive() or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the webhook receiver did not start (exit code {process.exitcode})")
        return cls(process, int(port.value), requests, distinct)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def counts(self) -> tuple[int, int]:
        """POSTs received, and different deliveries among them."""
        return int(self.requests.value), int(self.distinct.value)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


OUTBOX_OF_TENANT = "SELECT count(*), coalesce(max(position), 0) FROM outbox WHERE tenant_id = %s"
UNPUBLISHED_OF_TENANT = "SELECT count(*) FROM outbox WHERE published_at IS NULL AND tenant_id = %s"
NEWEST_EVENT_OF_TENANT = "SELECT event_id FROM outbox WHERE tenant_id = %s ORDER BY position DESC LIMIT 1"
OPERATIONS_OF_TENANT = "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s"
REQUEST_KIND = "request.received"  # the audit trail's records of requests (core/adapters/rabbitmq/trail.py)
OUTBOX_SINCE = "SELECT count(*) FROM outbox WHERE tenant_id = %s AND position > %s"
DELIVERIES_OF_ENDPOINT = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'pending'),
       count(*) FILTER (WHERE status = 'succeeded'),
       count(*) FILTER (WHERE status = 'failed')
FROM webhook_deliveries WHERE endpoint_id = %s
"""


@dataclass
class Background:
    """The work a posting leaves behind in the outbox for the audit consumer and the webhook worker, for the run's
    tenant, and how far they got: the outbox and the deliveries (PostgreSQL), the audit trail (MongoDB, the
    `audit` collection), the receiver's counts."""

    conn: psycopg.Connection[Any]
    tenant: str
    mongo_url: str
    receiver: Receiver
    audit: bool  # the stack runs the audit consumer and MongoDB: the trail must catch up
    webhooks: bool  # the stack runs the webhook worker: the deliveries must catch up
    endpoint_id: str | None = None
    registered_after: int = 0  # the tenant's last outbox position when the endpoint was registered
    mongo: pymongo.MongoClient[dict[str, Any]] | None = None

    def last_position(self) -> int:
        row = self.conn.execute(OUTBOX_OF_TENANT, (self.tenant,)).fetchone()
        assert row is not None
        return int(row[1])

    def audit_documents(self) -> tuple[int | None, int | None]:
        """The tenant's documents in the audit trail: its events' records, and the records of its requests that
        name an operation (None: MongoDB did not answer)."""
        if self.mongo is None:
            self.mongo = pymongo.MongoClient(self.mongo_url, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
        try:
            collection = self.mongo.get_default_database("cleanledger")["audit"]
            events = collection.count_documents({"tenant_id": self.tenant, "kind": {"$ne": REQUEST_KIND}})
            requests = collection.count_documents(
                {"tenant_id": self.tenant, "kind": REQUEST_KIND, "operation_id": {"$ne": None}}
            )
            return int(events), int(requests)
        except PyMongoError:
            return None, None

    def reading(self) -> dict[str, int | None]:
        row = self.conn.execute(OUTBOX_OF_TENANT, (self.tenant,)).fetchone()
        unpublished = self.conn.execute(UNPUBLISHED_OF_TENANT, (self.tenant,)).fetchone()
        assert row is not None
        assert unpublished is not None
        deliveries: tuple[Any, ...] = (0, 0, 0, 0)
        since = 0
        if self.endpoint_id is not None:
            deliveries = self.conn.execute(DELIVERIES_OF_ENDPOINT, (self.endpoint_id,)).fetchone() or deliveries
            since_row = self.conn.execute(OUTBOX_SINCE, (self.tenant, self.registered_after)).fetchone()
            since = int(since_row[0]) if since_row else 0
        received, distinct = self.receiver.counts()
        events, requests = self.audit_documents() if self.audit else (None, None)
        operations = self.conn.execute(OPERATIONS_OF_TENANT, (self.tenant,)).fetchone()
        assert operations is not None
        return {
            "outbox_events": int(row[0]),
            "outbox_unpublished": int(unpublished[0]),
            "audit_documents": events,
            "operations": int(operations[0]),
            "request_documents": requests,
            "events_since_registration": since,
            "delivery_rows": int(deliveries[0]),
            "deliveries_pending": int(deliveries[1]),
            "deliveries_succeeded": int(deliveries[2]),
            "deliveries_failed": int(deliveries[3]),
            "received": received,
            "received_distinct": distinct,
        }

    def owed(self, reading: dict[str, int | None]) -> dict[str, int]:
        """What is still to be done: events not yet published, not yet in the trail, without a delivery yet,
        deliveries not yet made."""
        owed = {"unpublished": int(reading["outbox_unpublished"] or 0)}
        if self.audit:
            owed["audit"] = int(reading["outbox_events"] or 0) - int(reading["audit_documents"] or 0)
            owed["requests"] = int(reading["operations"] or 0) - int(reading["request_documents"] or 0)
        if self.webhooks and self.endpoint_id is not None:
            owed["fan_out"] = int(reading["events_since_registration"] or 0) - int(reading["delivery_rows"] or 0)
            owed["deliveries"] = int(reading["deliveries_pending"] or 0)
        return owed

    def newest_event_audited(self) -> bool:
        """A cheap look, one lookup by `_id` in MongoDB: the tenant's newest outbox event is in the trail. (Counting
        the tenant's documents is a scan in the Mongo-wire server, whose CPU the phase is charged with: it is
        done only once this says the trail may have caught up.)"""
        row = self.conn.execute(NEWEST_EVENT_OF_TENANT, (self.tenant,)).fetchone()
        if row is None:
            return True
        if self.mongo is None:
            self.mongo = pymongo.MongoClient(self.mongo_url, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000)
        try:
            found = self.mongo.get_default_database("cleanledger")["audit"].find_one({"_id": str(row[0])}, ["_id"])
        except PyMongoError:
            return False
        return found is not None

    def settle(self, timeout_s: float) -> tuple[float, dict[str, int], dict[str, int | None]]:
        """Wait until nothing is owed (or `timeout_s` passed); the seconds waited, what is still owed, the reading."""
        started = time.perf_counter()
        while True:
            waited = time.perf_counter() - started
            if self.audit and waited <= timeout_s and not self.newest_event_audited():
                time.sleep(0.5)
                continue
            reading = self.reading()
            owed = self.owed(reading)
            waited = time.perf_counter() - started
            if not any(n > 0 for n in owed.values()) or waited > timeout_s:
                return waited, owed, reading
            time.sleep(2.0 if self.audit else 0.5)

    def close(self) -> None:
        if self.mongo is not None:
            self.mongo.close()


def gained(before: dict[str, int | None], after: dict[str, int | None], key: str) -> int | None:
    """How much a reading's `key` grew (None: not read at one end)."""
    old, new = before[key], after[key]
    return None if old is None or new is None else new - old


@dataclass
class PhaseBackground:
    """One phase's audit and webhook work: during the phase (load and drain) and in the catch-up after it, until
    the trail and the deliveries had caught up with the outbox (or `--drain-seconds` passed)."""

    part: str
    case: str
    mode: str
    events: int  # outbox events of the tenant staged from the phase's start to the end of its catch-up
    delivered_during: int  # different deliveries the receiver got during the phase
    delivered_after: int  # ... during the catch-up
    received_twice: int  # deliveries the receiver got again (retries), during and after
    audited_during: int | None  # documents the audit trail gained during the phase (None: not measured)
    audited_after: int | None
    catch_up_seconds: float
    owed_after_catch_up: dict[str, int]
    cpu_seconds_catch_up: dict[str, float]
    cpu_ms_per_settled_with_catch_up: dict[str, float | None]  # (phase + catch-up CPU) / settled


@dataclass
class Comparison:
    """`--compare-without`: the run's tenant, the receiver, and what each part ("on", "without") found."""

    without: list[str]
    tenant: str
    receiver: Receiver
    mongo_url: str
    amqp_url: str
    webhook_queue: str
    audit_queue: str
    endpoint_id: str | None = None
    registered_after: int = 0
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    backgrounds: list[PhaseBackground] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)


async def register_endpoint(session: aiohttp.ClientSession, url: str) -> str:
    """POST /v1/webhook-endpoints for `url`, every event type; the endpoint's id (its secret is not kept)."""
    body = {"url": url, "event_types": ["*"], "description": "bench/e2e.py receiver"}
    async with session.post(f"{API}/v1/webhook-endpoints", json=body) as response:
        doc: dict[str, Any] = await response.json(content_type=None)
        if response.status != 201:
            raise RuntimeError(f"POST /v1/webhook-endpoints answered {response.status}: {doc}")
        return str(doc["id"])


def wait_queue_empty(amqp_url: str, name: str, timeout_s: float) -> float:
    """Until `name` holds no ready message (or `timeout_s` passed); the seconds waited."""
    started = time.perf_counter()
    while (queue_depth(amqp_url, name) or 0) > 0 and time.perf_counter() - started < timeout_s:
        time.sleep(0.25)
    return time.perf_counter() - started


async def warm_up(
    session: aiohttp.ClientSession,
    conn: psycopg.Connection[Any],
    *,
    case: str,
    ids: list[str],
    in_flight: int,
    drain_s: float,
    tenant: str,
) -> dict[str, Any]:
    """WARM_UP_S of unmeasured `wait` load, then its drain: a freshly started stack opens its pools and caches
    here, not in the first measured phase."""
    prefix = f"warm-up-{uuid.uuid4().hex[:8]}-"
    load = await generate(session, case, ids, prefix=prefix, wait=True, in_flight=in_flight, seconds=WARM_UP_S)
    view, _ = drain(conn, prefix, drain_s, tenant)
    return {"case": case, "seconds": WARM_UP_S, "accepted": load.accepted, "pending_after": view.pending}


async def measure_part(
    part: str,
    stack: Stack,
    secret: str,
    comparison: Comparison,
    *,
    ids: list[str] | None,
    db_url: str,
    args: argparse.Namespace,
    cases: list[str],
    modes: list[str],
) -> tuple[list[str], list[Phase]]:
    """One part of the comparison: with `ids` None ("on"), open and fund the accounts and register the webhook
    endpoint first; then a warm-up and every phase, each followed by its catch-up. The accounts and the phases."""
    record = comparison.parts.setdefault(part, {})
    record["processes"] = sorted(stack.processes)
    extra = {"receiver": [comparison.receiver.pid]}
    async with api_session(secret, args.in_flight) as session:
        with psycopg.connect(db_url, autocommit=True) as conn:
            background = Background(
                conn,
                comparison.tenant,
                comparison.mongo_url,
                comparison.receiver,
                audit=stack.runs("audit") and stack.runs("mongo"),
                webhooks=stack.runs("webhooks"),
                endpoint_id=comparison.endpoint_id,
                registered_after=comparison.registered_after,
            )
            try:
                if ids is None:
                    setup_started = time.perf_counter()
                    ids = await open_accounts(session, args.accounts, args.in_flight)
                    record["setup_seconds"] = setup_s = time.perf_counter() - setup_started
                    print(f"{args.accounts:,} accounts opened and funded through the API in {setup_s:.1f} s")
                    # The setup's events through the trail and the webhook queue before the endpoint exists: none of
                    # them is delivered, and every event after it is.
                    waited, owed, _ = background.settle(args.drain_seconds)
                    if stack.runs("webhooks"):
                        waited += wait_queue_empty(comparison.amqp_url, comparison.webhook_queue, args.drain_seconds)
                        time.sleep(1.0)  # the fan-out's batch in hand, if any
                    record["setup_catch_up"] = {"seconds": waited, "owed": owed}
                    comparison.endpoint_id = background.endpoint_id = await register_endpoint(
                        session, comparison.receiver.url
                    )
                    comparison.registered_after = background.registered_after = background.last_position()
                    print(f"webhook endpoint {comparison.endpoint_id} -> {comparison.receiver.url}, every event type")
                record["warm_up"] = await warm_up(
                    session,
                    conn,
                    case=cases[0],
                    ids=ids,
                    in_flight=args.in_flight,
                    drain_s=args.drain_seconds,
                    tenant=comparison.tenant,
                )
                waited, owed, _ = background.settle(args.drain_seconds)
                record["before_phases"] = {"catch_up_seconds": waited, "owed": owed}
                phases: list[Phase] = []
                for case in cases:
                    for mode in modes:
                        before = background.reading()
                        phase = await run_phase(
                            session,
                            conn,
                            stack,
                            case=case,
                            mode=mode,
                            ids=ids,
                            in_flight=args.in_flight,
                            seconds=args.seconds,
                            drain_s=args.drain_seconds,
                            db_url=db_url,
                            tenant=comparison.tenant,
                            extra_kinds=extra,
                        )
                        during = background.reading()
                        meter = CpuMeter(phase_kinds(stack, extra))
                        meter.start()
                        waited, owed, after = background.settle(args.drain_seconds)
                        catch_up = {("loadgen" if k == "self" else k): v for k, v in meter.stop().items()}
                        stack.check_alive()
                        settled = phase.settled
                        with_catch_up = {
                            k: (1000 * (v + catch_up.get(k, 0.0)) / settled if settled else None)
                            for k, v in phase.cpu_seconds.items()
                        }
                        found = PhaseBackground(
                            part=part,
                            case=case,
                            mode=mode,
                            events=gained(before, after, "outbox_events") or 0,
                            delivered_during=gained(before, during, "received_distinct") or 0,
                            delivered_after=gained(during, after, "received_distinct") or 0,
                            received_twice=(gained(before, after, "received") or 0)
                            - (gained(before, after, "received_distinct") or 0),
                            audited_during=gained(before, during, "audit_documents"),
                            audited_after=gained(during, after, "audit_documents"),
                            catch_up_seconds=waited,
                            owed_after_catch_up=owed,
                            cpu_seconds_catch_up=catch_up,
                            cpu_ms_per_settled_with_catch_up=with_catch_up,
                        )
                        show(phase)
                        show_background(found)
                        phases.append(phase)
                        comparison.backgrounds.append(found)
                if part == "on":
                    check_trail(comparison, background)
                record["queues_at_end"] = {
                    name: queue_depth(comparison.amqp_url, name)
                    for name in (comparison.audit_queue, comparison.webhook_queue)
                }
            finally:
                background.close()
    return ids, phases


def check_trail(comparison: Comparison, background: Background) -> None:
    """After the "on" part: the audit trail holds every outbox event of the tenant (waiting up to AUDIT_DRAIN_S),
    and the receiver got every event since the endpoint was registered."""
    waited, _, reading = background.settle(AUDIT_DRAIN_S)
    if background.audit:
        comparison.checks["audit_trail"] = {
            "tenant": comparison.tenant,
            "outbox_events": reading["outbox_events"],
            "audit_documents": reading["audit_documents"],
            "waited_s": waited,
            "operations": reading["operations"],
            "request_documents": reading["request_documents"],
            "complete": reading["audit_documents"] == reading["outbox_events"]
            and reading["request_documents"] == reading["operations"],
        }
    if background.webhooks:
        since = reading["events_since_registration"]
        comparison.checks["webhooks"] = {
            "events_since_registration": since,
            "delivery_rows": reading["delivery_rows"],
            "deliveries_succeeded": reading["deliveries_succeeded"],
            "deliveries_pending": reading["deliveries_pending"],
            "deliveries_failed": reading["deliveries_failed"],
            "received": reading["received"],
            "received_distinct": reading["received_distinct"],
            "waited_s": waited,
            "complete": bool(since)
            and since == reading["delivery_rows"] == reading["deliveries_succeeded"] == reading["received_distinct"],
        }


def show_background(found: PhaseBackground) -> None:
    def count(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    owed = {k: v for k, v in found.owed_after_catch_up.items() if v}
    print(
        f"    {found.events:,} events: webhooks delivered {found.delivered_during:,} during the phase,"
        f" {found.delivered_after:,} after ({found.received_twice} twice); audit trail +{count(found.audited_during)}"
        f" during, +{count(found.audited_after)} after; caught up in {found.catch_up_seconds:.1f} s"
        f"{f', still owed {owed}' if owed else ''}"
    )


def compare_figures(phases: list[Phase], without: list[Phase], comparison: Comparison) -> dict[str, Any]:
    """Per case/mode: CPU ms per settled operation on, on with the catch-up, and without."""
    cpu: dict[str, Any] = {}
    for p in phases:
        key = f"{p.case}/{p.mode}"
        cpu[key] = {"on": p.cpu_ms_per_settled}
        for found in comparison.backgrounds:
            if (found.part, found.case, found.mode) == ("on", p.case, p.mode):
                cpu[key]["on_with_catch_up"] = found.cpu_ms_per_settled_with_catch_up
    for p in without:
        cpu.setdefault(f"{p.case}/{p.mode}", {})["without"] = p.cpu_ms_per_settled
    return cpu


def show_comparison(
    phases: list[Phase], without: list[Phase], comparison: Comparison, cpu: dict[str, Any]
) -> dict[str, float | None]:
    """Print settled/s on and without, their ratio and the CPU per settled operation; the ratios."""
    label = "+".join(comparison.without)
    print(f"compare: everything on / without {', '.join(comparison.without)} (same run, database and accounts)")
    ratios: dict[str, float | None] = {}
    off = {(p.case, p.mode): p for p in without}
    for p in phases:
        q = off.get((p.case, p.mode))
        if q is None:
            continue
        value = ratio(p.settled_per_s, q.settled_per_s)
        ratios[f"{p.case}_{p.mode}_settled_on/without_{label}"] = value

        def rate(x: float | None) -> str:
            return "-" if x is None else f"{x:,.0f}/s"

        shown = "-" if value is None else f"{value:.3f}"
        print(f"  {p.case}/{p.mode}: settled {rate(p.settled_per_s)} on, {rate(q.settled_per_s)} without: {shown}")
    kinds: list[str] = []
    for rows in cpu.values():
        for figures in rows.values():
            kinds += [k for k in figures if k not in kinds]
    labels = {(key, part): f"{key} {part}" for key, rows in cpu.items() for part in rows}
    width = max(len("case/mode part"), *(len(label) for label in labels.values()))
    widths = [max(6, len(k)) for k in kinds]
    print("  CPU ms per settled operation (on_with_catch_up: the phase's CPU and its catch-up's, over its settled):")
    print("  " + " | ".join(["case/mode part".ljust(width), *(k.rjust(w) for k, w in zip(kinds, widths, strict=True))]))
    for (key, part), label in labels.items():
        figures = cpu[key][part]
        cells = ["-" if figures.get(k) is None else f"{figures[k]:.2f}" for k in kinds]
        print("  " + " | ".join([label.ljust(width), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]))
    return ratios


# --- main ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def private_queue(amqp_url: str) -> Iterator[str]:
    queue = f"ledger.commands.bench_{uuid.uuid4().hex[:8]}"
    try:
        yield queue
    finally:
        try:
            deleted = delete_queues(amqp_url, queue)
            print(f"deleted queues: {', '.join(deleted)}")
        except Exception as exc:
            print(f"could not delete the queues of {queue}: {exc}", file=sys.stderr)


def preflight() -> None:
    if port_answers(NGINX_PORT):
        sys.exit(
            f"something already answers on 127.0.0.1:{NGINX_PORT} (is `ops/run` running?); stop it first:"
            " this benchmark starts its own stack there"
        )
    busy = [p for p in INGRESS_PORTS if port_answers(p)]
    if busy:
        sys.exit(f"ports {busy} already answer on 127.0.0.1; the Procfile's ingress nodes need them")
    if "mongo" in dict(procfile()) and port_answers(MONGO_PORT):
        sys.exit(
            f"something already answers on 127.0.0.1:{MONGO_PORT} (`ops/run`'s SecantusDB, or another MongoDB?);"
            " stop it first: this benchmark starts the Procfile's `mongo` there, and its audit consumer writes to it"
        )
    if shutil.which("nginx") is None:
        sys.exit("nginx is not installed (ops/run installs it: apt-get install nginx)")
    if not (ROOT / ".venv" / "bin" / "cleanledger").exists():
        sys.exit("no .venv: run ops/test once")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--in-flight", type=int, default=64, help="requests kept outstanding")
    parser.add_argument("--seconds", type=int, default=20, help="load seconds per phase (and per baseline case)")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--cases", default="uniform,hot-credit", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--modes", default="wait,accept", help="comma-separated, of wait, accept")
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="after each wait phase, the same at this fraction of its settled/s, open loop (0: skip)",
    )
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="longest wait for a phase to settle")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-SQL baseline (no ratios)")
    parser.add_argument(
        "--compare-without",
        metavar="PROCESSES",
        help="Procfile names, comma-separated (e.g. audit,mongo,webhooks): run the phases again on a stack started"
        " without them, same database and accounts, and report settled/s on / without",
    )
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if set(cases) - set(CASES) or set(modes) - set(MODES):
        parser.error(f"cases are {', '.join(CASES)}; modes are {', '.join(MODES)}")
    without: list[str] = []
    if args.compare_without is not None:
        without = names_off_the_load_path(parser, "--compare-without", args.compare_without)
        if not without:
            parser.error("--compare-without takes at least one Procfile name")
    preflight()
    started = run_started()
    machine = machine_facts()
    print_machine(machine)
    settings = Settings.from_env()

    plain, plain_check = (
        ({}, {})
        if args.no_baseline
        else plain_sql(clients=args.in_flight, seconds=args.seconds, accounts=args.accounts)
    )
    for case, result in plain.items():
        print(f"plain-SQL post_transfer {case:8} ({args.in_flight} clients): {describe(result)}")

    phases: list[Phase] = []
    without_phases: list[Phase] = []
    checks: dict[str, Any] = {}
    facts: dict[str, Any] = {"procfile": dict(procfile())}
    log_dir = Path(tempfile.mkdtemp(prefix="cleanledger-e2e-"))
    # --compare-without: a tenant of this run's own and the receiver.
    tenant = f"bench-{uuid.uuid4().hex[:8]}" if without else TENANT
    comparison: Comparison | None = None
    with fresh_database("bench_e2e") as db_url, private_queue(settings.amqp_url) as queue:
        env = stack_env(db_url, queue, loopback_webhooks=bool(without))
        stack_settings = Settings.from_env(env)
        migrate(stack_settings)
        stack = Stack(env, log_dir, mongo_dir=log_dir / "mongo")
        off: Stack | None = None
        try:
            if without:
                comparison = Comparison(
                    without=without,
                    tenant=tenant,
                    receiver=Receiver.start(),
                    mongo_url=stack_settings.mongo_url,
                    amqp_url=stack_settings.amqp_url,
                    webhook_queue=stack_settings.webhook_queue,
                    audit_queue=stack_settings.audit_queue,
                )
            stack.start()
            stack.wait_ready(extra_ports=(MONGO_PORT,) if comparison and stack.runs("mongo") else ())
            secret = api_key(env, tenant)
            if comparison is None:
                facts["setup_seconds"], phases = asyncio.run(
                    measure(stack, secret, db_url=db_url, args=args, cases=cases, modes=modes)
                )
            else:
                print(f"part 1, everything on: tenant {tenant}")
                ids, phases = asyncio.run(
                    measure_part(
                        "on", stack, secret, comparison, ids=None, db_url=db_url, args=args, cases=cases, modes=modes
                    )
                )
                facts["setup_seconds"] = comparison.parts["on"]["setup_seconds"]
                restart_started = time.perf_counter()
                facts["exit_codes"] = stack.stop()
                wait_ports_free((*INGRESS_PORTS, NGINX_PORT, *((MONGO_PORT,) if stack.runs("mongo") else ())))
                off_env = dict(env)
                if "audit" in without:  # nobody to read the ingress's request records: they are not sent
                    off_env["CLEANLEDGER_AUDIT_REQUESTS"] = "false"
                off = Stack(off_env, log_dir / "without", exclude=frozenset(without), mongo_dir=log_dir / "mongo")
                off.start()
                off.wait_ready(extra_ports=(MONGO_PORT,) if off.runs("mongo") else ())
                restart_s = time.perf_counter() - restart_started
                comparison.parts["without"] = {"restart_seconds": restart_s}
                print(f"part 2, without {', '.join(without)}: stack stopped and started again in {restart_s:.1f} s")
                _, without_phases = asyncio.run(
                    measure_part(
                        "without", off, secret, comparison, ids=ids, db_url=db_url, args=args, cases=cases, modes=modes
                    )
                )
            verified = cleanledger(env, "verify")
            checks["verify_exit_code"] = verified.returncode
            checks["verify_output"] = verified.stdout.strip().splitlines()[-5:]
            print(f"cleanledger verify: exit {verified.returncode}: {verified.stdout.strip().splitlines()[-1:]}")
        finally:
            facts["exit_codes"] = stack.stop()
            facts["log_dir"] = str(log_dir)
            facts["log_problems"] = stack.log_problems()
            if comparison is not None:
                if off is not None:
                    record = comparison.parts.setdefault("without", {})
                    record["exit_codes"] = off.stop()
                    record["log_dir"] = str(off.log_dir)
                    record["log_problems"] = off.log_problems()
                comparison.receiver.stop()
            with contextlib.suppress(Exception):
                facts["redis_keys_removed"] = forget_redis_copies(settings.redis_url, db_url)
            shutil.rmtree(log_dir / "mongo", ignore_errors=True)  # the run's audit trail: data, not a log

    checks["phases_consistent"] = {f"{p.case}/{p.mode}": p.consistent for p in phases}
    checks["plain_sql"] = plain_check
    ok = checks.get("verify_exit_code") == 0 and all(checks["phases_consistent"].values())
    if comparison is not None:
        checks["phases_consistent_without"] = {f"{p.case}/{p.mode}": p.consistent for p in without_phases}
        checks.update(comparison.checks)
        ok = (
            ok
            and len(without_phases) == len(phases)
            and all(checks["phases_consistent_without"].values())
            and all(comparison.checks.get(name, {}).get("complete", True) for name in ("audit_trail", "webhooks"))
        )
    checks["ok"] = ok

    print()
    print_machine(machine)
    ratios: dict[str, float | None] = {}
    for p in phases:
        base = plain.get("uniform" if p.case == "uniform" else "hot")
        ratios[f"{p.case}_{p.mode}_settled/plain_{'uniform' if p.case == 'uniform' else 'hot'}"] = ratio(
            p.settled_per_s, base.tps if base else None
        )
    if comparison is not None:
        cpu = compare_figures(phases, without_phases, comparison)
        ratios.update(show_comparison(phases, without_phases, comparison, cpu))
        received, distinct = comparison.receiver.counts()
        facts["compare"] = {
            "without": without,
            "tenant": tenant,
            "webhook_endpoint_id": comparison.endpoint_id,
            "receiver": {"url": comparison.receiver.url, "received": received, "received_distinct": distinct},
            "parts": comparison.parts,
            "phases_without": without_phases,
            "background": comparison.backgrounds,
            "cpu_ms_per_settled": cpu,
        }
    ratios = {k: v for k, v in ratios.items() if v is not None}
    for name, value in ratios.items():
        print(f"ratio {name:44} {value:.3f}")
    for name, problems in facts["log_problems"].items():
        print(f"log {name}: {problems['lines']} warning/error lines, first: {problems['first'][0]}")
    if comparison is not None:
        for name, problems in comparison.parts.get("without", {}).get("log_problems", {}).items():
            print(f"log without/{name}: {problems['lines']} warning/error lines, first: {problems['first'][0]}")
    verdict = "ok" if ok else "FAILED"
    print(f"checks: {verdict} {checks['phases_consistent']}, verify exit {checks.get('verify_exit_code')}")
    if comparison is not None:
        print(f"checks without: {checks['phases_consistent_without']}")
        for name in ("audit_trail", "webhooks"):
            if name in checks:
                print(f"check {name}: {checks[name]}")
        unclean = {
            f"{part}/{name}": code
            for part, codes in (
                ("on", facts["exit_codes"]),
                ("without", comparison.parts["without"].get("exit_codes", {})),
            )
            for name, code in codes.items()
            if code != 0
        }
        if unclean:
            print(f"WARNING: processes that did not exit 0 on SIGTERM: {unclean}")
    print(f"process logs: {log_dir}")
    write_results(
        "e2e",
        started=started,
        machine=machine,
        parameters={**vars(args), "cases": cases, "modes": modes, "wait_s": WAIT_S},
        figures={"plain_sql": plain, "phases": phases, **facts},
        ratios=ratios,
        checks=checks,
    )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
