"""The whole Procfile under supervisord (the config `ops/run` generates), loaded through nginx, while a worker, an
ingress node and the relay are killed with SIGKILL in turn: each is back within seconds, requests keep
succeeding, and every accepted operation settles exactly once.

The stack is the repo's Procfile and nginx.conf with only their ports (and nginx's paths) moved to free ones, so
the test runs beside `ops/run`; the test run's database and a private command queue come through CLEANLEDGER_*.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.postgres.verify import verify
from core.bootstrap import LedgerService
from core.settings import Settings
from core.supervision import read_procfile, write_config
from tests.processes import BIN, ROOT, free_port, settings_env, wait_for_port
from tests.services import delete_queues, private_queues

NGINX_LISTEN = "listen 127.0.0.1:8080;"
CLIENTS = 12  # requests kept in flight through nginx
ACCOUNTS = 6
VICTIMS = ("worker1", "ingress2", "relay", "nginx")  # one of each kind that holds work in flight
CONNECT_TRIES = 10  # a client tries this often while nothing answers on nginx's port
RETRY_AFTER_S = 0.3
BACK_WITHIN_S = 20.0  # a killed process must be RUNNING again (startsecs included) within this
STATUS_LINE = re.compile(r"^(\S+)\s+([A-Z]+)\s*(?:pid (\d+),)?")


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def procfile_on_free_ports(tmp_path: Path) -> tuple[Path, int, list[int], int]:
    """Copies of the Procfile and nginx.conf, changed only in their ports and data directories: (Procfile, nginx
    port, ingress ports, MongoDB port)."""
    procfile = (ROOT / "Procfile").read_text()
    nginx_conf = (ROOT / "nginx.conf").read_text()
    [mongo_line] = [line for line in procfile.splitlines() if line.startswith("mongo:")]
    [mongo_port] = free_ports(1)
    moved = mongo_line.replace("--port 27017", f"--port {mongo_port}").replace("var/mongo", str(tmp_path / "mongo"))
    assert moved.count(str(mongo_port)) == 1 and str(tmp_path) in moved, mongo_line
    procfile = procfile.replace(mongo_line, moved)
    repo_ports = [int(port) for port in re.findall(r"ingress\.app --port (\d+)", procfile)]
    nginx_port, *ingress_ports = free_ports(1 + len(repo_ports))
    for old, new in zip(repo_ports, ingress_ports, strict=True):
        procfile = procfile.replace(f"--port {old}", f"--port {new}")
        assert f"server 127.0.0.1:{old} " in nginx_conf, f"nginx.conf has no upstream on the Procfile's {old}"
        nginx_conf = nginx_conf.replace(f"server 127.0.0.1:{old} ", f"server 127.0.0.1:{new} ")
    assert NGINX_LISTEN in nginx_conf
    nginx_conf = nginx_conf.replace(NGINX_LISTEN, f"listen 127.0.0.1:{nginx_port};")
    (tmp_path / "nginx.conf").write_text(nginx_conf)
    assert '"$PWD/nginx.conf"' in procfile and "var/nginx" in procfile
    procfile = procfile.replace('"$PWD/nginx.conf"', shlex.quote(str(tmp_path / "nginx.conf")))
    procfile = procfile.replace("var/nginx", str(tmp_path / "nginx"))
    (tmp_path / "Procfile").write_text(procfile)
    return tmp_path / "Procfile", nginx_port, ingress_ports, mongo_port


@dataclass
class Supervised:
    conf: Path
    popen: subprocess.Popen[bytes]
    procfile: Path
    api: str  # nginx
    ingress_ports: list[int]

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), *args], capture_output=True, text=True, timeout=30
        )
        return done.stdout

    def status(self) -> dict[str, tuple[str, int | None]]:
        """name -> (state, pid), as `ops/status` shows it."""
        found: dict[str, tuple[str, int | None]] = {}
        for line in self.ctl("status").splitlines():
            match = STATUS_LINE.match(line)
            if match:
                found[match.group(1)] = (match.group(2), int(match.group(3)) if match.group(3) else None)
        return found

    def wait_all_running(self, names: list[str], timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if all(status.get(n, ("", None))[0] == "RUNNING" for n in names):
                return {n: pid for n, (_, pid) in status.items() if pid is not None}
            assert self.popen.poll() is None, "supervisord exited"
            assert time.monotonic() < deadline, f"not all RUNNING within {timeout_s} s: {status}"
            time.sleep(0.2)


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[tuple[Supervised, Settings]]:
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: ops/test (or ops/run) installs it")
    procfile, nginx_port, ingress_ports, mongo_port = procfile_on_free_ports(tmp_path)
    private = private_queues(
        settings,
        "crash",
        mongo_url=f"mongodb://127.0.0.1:{mongo_port}/cleanledger",
        rate_limit_burst=10**6,
        rate_limit_per_second=10**6,
        # An ingress killed between recording an operation and publishing it leaves it pending: the sweeper
        # picks it up after this long (120 s in production) so the test sees it settle.
        redeliver_after_s=3,
    )
    conf = write_config(procfile, root=ROOT, run_dir=tmp_path / "var")
    log = (tmp_path / "supervisord.out").open("wb")
    popen = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(conf)],
        cwd=ROOT,
        env=settings_env(private),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    supervised = Supervised(conf, popen, procfile, f"http://127.0.0.1:{nginx_port}", ingress_ports)
    children: set[int] = set()
    try:
        wait_for_port(nginx_port, timeout_s=60)
        yield supervised, private
    finally:
        with contextlib.suppress(Exception):
            children.update(pid for _, pid in supervised.status().values() if pid)
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(60)
        for pid in children:  # anything supervisord could not stop (each child leads its own process group)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
        log.close()
        delete_queues(private)


@dataclass
class Load:
    """Requests through nginx, each with its own Idempotency-Key, as a client would send them."""

    api: str
    session: aiohttp.ClientSession
    accounts: list[str]
    rng: random.Random
    accepted: dict[str, str]  # idempotency key -> operation id, for every 2xx answer
    refused: list[tuple[int, str]]  # (status, code) of requests that got no 2xx even after their retry
    retried: int = 0

    async def one(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.api}{path}", json=body, headers=headers) as response:
            text = await response.text()
        try:
            doc = json.loads(text)
        except ValueError:  # nginx's own 502 page is HTML
            doc = {}
        return response.status, doc

    async def request(self) -> None:
        key = uuid.uuid4().hex
        src, dst = self.rng.sample(self.accounts, 2)
        body = {"source_id": src, "destination_id": dst, "amount": self.rng.randint(1, 100), "currency": "USD"}
        headers = {"Idempotency-Key": key}
        retried_5xx = False
        for attempt in range(CONNECT_TRIES):
            try:
                status, doc = await self.one("/v1/transfers", body, headers)
            except aiohttp.ClientError:
                status, doc = 0, {}  # no answer: nginx itself was down, or died under the request
            if status in (200, 201, 202):
                self.accepted[key] = doc["id"]
                return
            if (status == 0 and attempt < CONNECT_TRIES - 1) or (status in (502, 503) and not retried_5xx):
                # the same key again: whatever the first attempt did, this one replays or finishes it
                retried_5xx = retried_5xx or status != 0
                self.retried += 1
                await asyncio.sleep(RETRY_AFTER_S)
                continue
            self.refused.append((status, str(doc.get("code", ""))))
            return

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.request()


async def open_accounts(api: str, session: aiohttp.ClientSession) -> list[str]:
    accounts = []
    for i in range(ACCOUNTS):
        async with session.post(
            f"{api}/v1/accounts",
            json={"currency": "USD"},
            headers={"Idempotency-Key": f"crash-acct-{i}", "Prefer": "wait=20"},
        ) as response:
            doc = await response.json(content_type=None)
            assert response.status == 201, doc
        account = doc["result"]["account"]["id"]
        async with session.post(
            f"{api}/v1/credits",
            json={"account_id": account, "amount": 10**9, "currency": "USD"},
            headers={"Idempotency-Key": f"crash-fund-{i}", "Prefer": "wait=20"},
        ) as response:
            assert response.status == 201, await response.text()
        accounts.append(account)
    return accounts


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                found.append(int(stat.parent.name))
    return found


def pending_and_unpublished(settings: Settings, tenant: str) -> tuple[int, int]:
    with psycopg.connect(settings.database_url) as conn:
        pending = conn.execute(
            "SELECT count(*) FROM idempotency_keys WHERE tenant_id = %s AND status = 'pending'", (tenant,)
        ).fetchone()
        unpublished = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    assert pending is not None and unpublished is not None
    return int(pending[0]), int(unpublished[0])


@pytest.mark.slow
def test_killed_processes_come_back_and_nothing_accepted_is_lost(
    stack: tuple[Supervised, Settings], ledger: LedgerService, tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    supervised, settings = stack
    names = [p.name for p in read_procfile(supervised.procfile)]
    pids = supervised.wait_all_running(names, timeout_s=60)
    for port in supervised.ingress_ports:
        wait_for_port(port, timeout_s=30)
    secret = create_api_key(ledger.pool, tenant)[1]
    restarts: dict[str, tuple[int, int, float]] = {}

    async def scenario() -> Load:
        headers = {"Authorization": f"Bearer {secret}"}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(f"{supervised.api}/readyz") as response:
                assert response.status == 200, await response.text()
            accounts = await open_accounts(supervised.api, session)
            load = Load(supervised.api, session, accounts, random.Random(9), {}, [])
            stop = asyncio.Event()
            clients = [asyncio.create_task(load.run(stop)) for _ in range(CLIENTS)]
            try:
                await asyncio.sleep(1.5)
                for victim in VICTIMS:
                    before = len(load.accepted)
                    # As it runs now: a minute's liveness tick right after the start may have restarted a process
                    # whose port was not open yet (harmless, and not what this test is about).
                    old_pid = (await asyncio.to_thread(supervised.status))[victim][1] or pids[victim]
                    os.kill(old_pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    while True:
                        state, pid = (await asyncio.to_thread(supervised.status))[victim]
                        if state == "RUNNING" and pid is not None and pid != old_pid:
                            break
                        assert time.monotonic() - killed_at < BACK_WITHIN_S, f"{victim} not back: {state} {pid}"
                        await asyncio.sleep(0.2)
                    pids[victim] = pid
                    restarts[victim] = (old_pid, pid, time.monotonic() - killed_at)
                    await asyncio.sleep(1.5)  # the restarted process takes its share again
                    assert len(load.accepted) > before, f"requests kept succeeding while {victim} was down"
            finally:
                stop.set()
                await asyncio.gather(*clients)
            return load

    load = asyncio.run(scenario())
    # Only a request a dying process had in hand may fail, and its retry (same key) mostly succeeds; a retry
    # can also meet the key's first attempt still unconfirmed (409 idempotency-key-in-use: retry later).
    assert len(load.refused) <= len(VICTIMS) * CLIENTS, load.refused
    assert all(status in (409, 502, 503, 0) for status, _ in load.refused), load.refused
    assert len(load.accepted) > 100, "the load ran"

    deadline = time.monotonic() + 60
    while (left := pending_and_unpublished(settings, tenant)) != (0, 0):
        assert time.monotonic() < deadline, f"still pending / unpublished after 60 s: {left}"
        time.sleep(0.5)
    with psycopg.connect(settings.database_url) as conn:
        statuses = dict(
            conn.execute(
                "SELECT operation_id::text, status FROM idempotency_keys WHERE tenant_id = %s", (tenant,)
            ).fetchall()
        )
        postings = conn.execute(
            "SELECT count(*), count(DISTINCT operation_id) FROM transactions"
            " WHERE tenant_id = %s AND kind = 'transfer'",
            (tenant,),
        ).fetchone()
    with psycopg.connect(settings.database_url) as conn:
        assert verify(conn) == []
    missing = [op for op in load.accepted.values() if op not in statuses]
    assert not missing, f"accepted operations the database does not know: {missing[:3]}"
    assert all(statuses[op] == "succeeded" for op in load.accepted.values()), "funded accounts: every one posts"
    succeeded = sum(1 for status in statuses.values() if status == "succeeded") - 2 * ACCOUNTS
    assert postings == (succeeded, succeeded), "each settled transfer posted exactly once"

    # Ctrl-C on `ops/run`: supervisord stops every process (nginx first) and exits.
    children = supervised.wait_all_running(names, timeout_s=30)
    supervised.popen.send_signal(signal.SIGINT)
    assert supervised.popen.wait(90) == 0
    still_there = [name for name, pid in children.items() if Path(f"/proc/{pid}").exists()]
    assert not still_there, f"left running after Ctrl-C: {still_there}"
    # The killed nginx master's workers went too (ops/nginx stops them before nginx starts again).
    old_nginx = restarts["nginx"][0]
    assert not group_members(old_nginx), f"the killed nginx master's group lives on: {group_members(old_nginx)}"
    log_dir = supervised.conf.parent / "log"
    for name in names:
        lines = (log_dir / f"{name}.log").read_text().splitlines()
        if name != "nginx":  # nginx writes its own error-log format
            assert all(line.startswith("{") for line in lines), f"{name}: not JSON lines: {lines[:3]}"
    with capsys.disabled():
        print(
            f"\n[crash] accepted={len(load.accepted)} retried={load.retried} refused={len(load.refused)}"
            f" postings={succeeded} refused_answers={load.refused} restarts="
            + ", ".join(f"{name} {old}->{new} in {s:.1f}s" for name, (old, new, s) in restarts.items())
        )
