"""End to end through nginx: the stack `ops/run` runs, loaded by an async client with a fixed number of requests
in flight, against the plain-SQL baseline measured with as many clients in the same run.

    .venv/bin/python bench/e2e.py [--in-flight 64] [--seconds 20] [--accounts 10000]
                                  [--cases uniform,hot-credit] [--modes wait,accept] [--drain-seconds 60]

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
   202, settled later by the workers). After the load, the script waits up to `--drain-seconds` until the
   database holds no pending operation of the phase.
   Reported: accepted/s (2xx answers over the load window), settled/s (operations of the phase over the time from
   its start to the last settlement, from the database), POST latency p50/p99, accept-to-settled p50/p99
   (idempotency_keys.settled_at - created_at), answers that were not 2xx by status, and CPU milliseconds per
   settled operation of each process kind, from /proc before and after the phase (drain included): the Procfile's
   kinds (ingress = its three nodes), postgres (the whole server), rabbitmq (beam.smp), redis, loadgen (this
   process) and machine (all CPU the machine spent; machine minus the rest is whatever else ran).
5. Checks: every phase's accepted == settled == its rows in the database, none pending; `cleanledger verify`
   exits 0. Ratios: settled/s of each phase over the plain-SQL baseline (uniform for uniform, hot otherwise).
Everything is stopped (SIGTERM to each process group, SIGKILL after 10 s), the queues and the database dropped,
in a finally block. Results go to bench/results/e2e-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
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

from core.adapters.postgres.migrate import migrate
from core.settings import Settings

TENANT = "bench"
CASES = ("uniform", "hot-credit", "hot-transfer")
MODES = ("wait", "accept")
NGINX_PORT = 8080
INGRESS_PORTS = (8081, 8082, 8083)
API = f"http://127.0.0.1:{NGINX_PORT}"
OPENING_CREDIT = 10**9  # cents per account; the load moves 1..1000 per request
WAIT_S = 10  # Prefer: wait=N of the `wait` mode
STOP_GRACE_S = 10.0
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
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> None:
        for name, command in procfile():
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

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for port in (*INGRESS_PORTS, NGINX_PORT):
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

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every process group, SIGKILL to those still there after STOP_GRACE_S; exit codes."""
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

    names = sorted({queue, f"{queue}.DQ", f"{queue}.XQ", f"{queue}.webhooks", *queues_beside(queue)})
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
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


def stack_env(db_url: str, queue: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANLEDGER_")}
    env.update(
        {
            "PWD": str(ROOT),
            "CLEANLEDGER_DATABASE_URL": db_url,
            "CLEANLEDGER_COMMAND_QUEUE": queue,
            "CLEANLEDGER_WEBHOOK_QUEUE": f"{queue}.webhooks",  # the Procfile's webhook worker: private, deleted after
            "CLEANLEDGER_LOG_LEVEL": "WARNING",
            "CLEANLEDGER_RATE_LIMIT_BURST": str(10**9),
            "CLEANLEDGER_RATE_LIMIT_PER_SECOND": str(10**9),
        }
    )
    return env


def cleanledger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cleanledger"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


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


def body_maker(case: str, ids: list[str]) -> tuple[str, Any]:
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
    session: aiohttp.ClientSession, case: str, ids: list[str], *, prefix: str, wait: bool, in_flight: int, seconds: int
) -> Load:
    """`in_flight` loops, each sending its next POST as soon as the previous one was answered, for `seconds`."""
    path, make = body_maker(case, ids)
    load = Load()
    url = f"{API}{path}"
    started = time.perf_counter()
    deadline = started + seconds

    async def loop(n: int) -> None:
        rng = random.Random(f"{prefix}{n}")
        headers = {"Content-Type": "application/json"}
        if wait:
            headers["Prefer"] = f"wait={WAIT_S}"
        while time.perf_counter() < deadline:
            headers["Idempotency-Key"] = f"{prefix}{uuid.uuid4().hex}"
            data = json.dumps(make(rng)).encode()
            sent = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=headers) as response:
                    raw = await response.read()
                    load.statuses[response.status] += 1
                    if wait and response.status in (200, 201) and settled_answer(raw):
                        load.settled_in_answer += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                load.errors[type(exc).__name__] += 1
                continue
            load.latencies_ms.append(1000 * (time.perf_counter() - sent))

    await asyncio.gather(*(loop(n) for n in range(in_flight)))
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


def db_view(conn: psycopg.Connection[Any], prefix: str) -> DbView:
    row = conn.execute(PHASE_SQL, (TENANT, prefix)).fetchone()
    assert row is not None
    return DbView(*row)


def drain(conn: psycopg.Connection[Any], prefix: str, timeout_s: float) -> tuple[DbView, float]:
    """Wait until no operation of the phase is pending (or `timeout_s` passed); the view and the seconds waited."""
    started = time.perf_counter()
    while True:
        view = db_view(conn, prefix)
        waited = time.perf_counter() - started
        if view.pending == 0 or waited > timeout_s:
            return view, waited
        time.sleep(0.25)


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

    @property
    def consistent(self) -> bool:
        return self.pending_after_drain == 0 and self.accepted == self.settled == self.db_rows


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
) -> Phase:
    """One measured phase. The blocking calls (checkpoint, /proc, the drain's queries) run while no request is
    in flight."""
    prefix = f"{case}-{mode}-{uuid.uuid4().hex[:8]}-"
    kinds = stack.roots()
    kinds.update({"postgres": server_roots("postgres"), "rabbitmq": server_roots("beam.smp")})
    kinds["redis"] = server_roots("redis-server")
    checkpoint(db_url)
    meter = CpuMeter(kinds)
    meter.start()
    started_epoch = time.time()
    load = await generate(session, case, ids, prefix=prefix, wait=mode == "wait", in_flight=in_flight, seconds=seconds)
    view, drained = drain(conn, prefix, drain_s)
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
    )


async def measure(
    stack: Stack, secret: str, *, db_url: str, args: argparse.Namespace, cases: list[str], modes: list[str]
) -> tuple[float, list[Phase]]:
    """Open and fund the accounts through the API, then run every phase; the setup seconds and the phases."""
    connector = aiohttp.TCPConnector(limit=args.in_flight)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=aiohttp.ClientTimeout(total=WAIT_S + 50),
    ) as session:
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
    parser.add_argument("--drain-seconds", type=float, default=60.0, help="longest wait for a phase to settle")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-SQL baseline (no ratios)")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if set(cases) - set(CASES) or set(modes) - set(MODES):
        parser.error(f"cases are {', '.join(CASES)}; modes are {', '.join(MODES)}")
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
    checks: dict[str, Any] = {}
    facts: dict[str, Any] = {"procfile": dict(procfile())}
    log_dir = Path(tempfile.mkdtemp(prefix="cleanledger-e2e-"))
    with fresh_database("bench_e2e") as db_url, private_queue(settings.amqp_url) as queue:
        env = stack_env(db_url, queue)
        migrate(Settings.from_env(env))
        stack = Stack(env, log_dir)
        try:
            stack.start()
            stack.wait_ready()
            made = cleanledger(env, "create-api-key", "--tenant", TENANT)
            if made.returncode != 0:
                raise RuntimeError(f"create-api-key failed: {made.stderr}")
            secret = made.stdout.strip().splitlines()[-1]
            facts["setup_seconds"], phases = asyncio.run(
                measure(stack, secret, db_url=db_url, args=args, cases=cases, modes=modes)
            )
            verified = cleanledger(env, "verify")
            checks["verify_exit_code"] = verified.returncode
            checks["verify_output"] = verified.stdout.strip().splitlines()[-5:]
            print(f"cleanledger verify: exit {verified.returncode}: {verified.stdout.strip().splitlines()[-1:]}")
        finally:
            facts["exit_codes"] = stack.stop()
            facts["log_dir"] = str(log_dir)
            facts["log_problems"] = stack.log_problems()
            with contextlib.suppress(Exception):
                facts["redis_keys_removed"] = forget_redis_copies(settings.redis_url, db_url)

    checks["phases_consistent"] = {f"{p.case}/{p.mode}": p.consistent for p in phases}
    checks["plain_sql"] = plain_check
    ok = checks.get("verify_exit_code") == 0 and all(checks["phases_consistent"].values())
    checks["ok"] = ok

    print()
    print_machine(machine)
    ratios: dict[str, float | None] = {}
    for p in phases:
        base = plain.get("uniform" if p.case == "uniform" else "hot")
        ratios[f"{p.case}_{p.mode}_settled/plain_{'uniform' if p.case == 'uniform' else 'hot'}"] = ratio(
            p.settled_per_s, base.tps if base else None
        )
    ratios = {k: v for k, v in ratios.items() if v is not None}
    for name, value in ratios.items():
        print(f"ratio {name:44} {value:.3f}")
    for name, problems in facts["log_problems"].items():
        print(f"log {name}: {problems['lines']} warning/error lines, first: {problems['first'][0]}")
    verdict = "ok" if ok else "FAILED"
    print(f"checks: {verdict} {checks['phases_consistent']}, verify exit {checks.get('verify_exit_code')}")
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
