"""Shared by the benchmark scripts: fresh databases, the machine's facts, pgbench, CPU from /proc, results.

Every script prints the machine it ran on and writes `bench/results/<name>-<UTC timestamp>.json` with the git
commit, the machine facts, its parameters, every figure and every ratio, so a quoted ratio can always be traced
to one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ADMIN_URL = os.environ.get("CLEANLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- databases ---------------------------------------------------------------------------------------------
def database_url(name: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)


def create_db(name: str) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(name)


def drop_db(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, empty database named `<prefix>_<hex>`, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = create_db(name)
    try:
        yield url
    finally:
        drop_db(name)


def checkpoint(url: str = ADMIN_URL) -> None:
    """Flush dirty buffers before a measured phase, so no phase pays for the previous one's writes."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


# --- the machine -------------------------------------------------------------------------------------------
def machine_facts(url: str = ADMIN_URL) -> dict[str, Any]:
    """What the figures depend on: cores, the CPU, and the PostgreSQL settings that decide commit cost."""
    facts: dict[str, Any] = {"cores": os.cpu_count(), "nproc": int(_run(["nproc"]).strip())}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in (
            "server_version",
            "synchronous_commit",
            "fsync",
            "shared_buffers",
            "wal_level",
            "max_connections",
            "default_transaction_isolation",
        ):
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()
            facts[setting] = row[0] if row else None
    facts["busy_cores_before"] = busy_cores()
    return facts


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores' worth of CPU the machine spends over `seconds` (before a run: what else is running)."""
    before = machine_busy_cpu_seconds()
    time.sleep(seconds)
    return (machine_busy_cpu_seconds() - before) / seconds


def print_machine(facts: Mapping[str, Any]) -> None:
    print(
        f"machine: {facts['nproc']} cores ({facts.get('cpu', '?')}), PostgreSQL {facts['server_version']},"
        f" synchronous_commit={facts['synchronous_commit']} fsync={facts['fsync']}"
        f" shared_buffers={facts['shared_buffers']} max_connections={facts['max_connections']}"
    )
    busy = facts.get("busy_cores_before")
    if busy is not None and busy > 0.2:
        print(f"WARNING: the machine was already busy before this run ({busy:.2f} cores): figures will be low")


def git_commit() -> dict[str, Any]:
    """The commit measured, and the uncommitted changes measured with it: the files (bench/results aside) and a
    hash of `git diff HEAD`, so a run can tell whether the code changed under it."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).strip()
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT).splitlines()
    changed = sorted(line[3:] for line in status if line and not line[3:].startswith("bench/results/"))
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
    return {
        "commit": commit,
        "dirty": bool(changed),
        "changed": changed,
        "diff_sha256": hashlib.sha256(diff).hexdigest()[:16] if diff else None,
    }


def _run(args: list[str], *, cwd: Path | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, cwd=cwd).stdout


# --- pgbench -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    retried: int
    latency_ms: float
    seconds: int
    clients: int
    cpu_ms_per_tx: dict[str, float | None]  # pgbench itself, the PostgreSQL server, the whole machine


def pgbench_init(url: str, scale: int) -> None:
    """pgbench's tables at `scale` (100,000 accounts and one branch row per unit), generated server-side."""
    subprocess.run(["pgbench", "-i", "-q", "-I", "dtGvp", "-s", str(scale), url], check=True, capture_output=True)


def pgbench(url: str, workload: list[str], *, clients: int, seconds: int) -> PgbenchResult:
    """Run pgbench in prepared mode at the server's default isolation (read committed) and parse its summary.

    `workload` selects the script: `["-b", "tpcb-like"]` or `["-f", path]`, plus any `-D name=value`."""
    threads = max(1, min(clients, os.cpu_count() or 1))
    args = [
        "pgbench",
        *workload,
        "-n",  # no vacuum of pgbench's own tables before the run (a custom script has none)
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(seconds),
        "--max-tries=10",
        url,
    ]
    meter = CpuMeter({"postgres": server_roots("postgres")})
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter.start()
    done = subprocess.run(args, capture_output=True, text=True)
    meter.stop()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter.seconds["pgbench"] = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    del meter.seconds["self"]
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {' '.join(args)}\n{done.stdout}\n{done.stderr}")
    out = done.stdout

    def number(pattern: str, default: str | None = None) -> float:
        match = re.search(pattern, out)
        if match is None:
            if default is None:
                raise RuntimeError(f"pgbench output lacks {pattern!r}:\n{out}")
            return float(default)
        return float(match.group(1))

    transactions = int(number(r"number of transactions actually processed: (\d+)"))
    return PgbenchResult(
        tps=number(r"tps = ([\d.]+)"),
        transactions=transactions,
        failed=int(number(r"number of failed transactions: (\d+)", "0")),
        retried=int(number(r"number of transactions retried: (\d+)", "0")),
        latency_ms=number(r"latency average = ([\d.]+) ms"),
        seconds=seconds,
        clients=clients,
        cpu_ms_per_tx=meter.per_operation(transactions),
    )


# --- CPU seconds from /proc --------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the `(comm)` field: index 0 is the state (field 3 of proc(5))."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, *, reaped_children: bool = True) -> float:
    """utime + stime of one process (and, by default, cutime + cstime: its children that exited and were
    waited for, which no longer have a /proc entry of their own), in seconds; 0 once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # proc(5) fields 14-17 (utime, stime, cutime, cstime) are indexes 11-14 here.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """`root` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process tree: every living member plus the exited children they reaped. A delta
    of two readings is the tree's CPU in between, backends and workers that came and went included."""
    return sum(process_cpu_seconds(pid) for pid in process_tree(root))


def pids_by_name(name: str) -> list[int]:
    """Processes whose /proc/<pid>/comm is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    found.append(int(entry))
    return found


def tree_roots(pids: Iterable[int]) -> list[int]:
    """Of `pids`, those whose parent is not among them (the postmaster of all `postgres` processes)."""
    members = set(pids)
    parents = _parents()
    return [pid for pid in members if parents.get(pid) not in members]


def server_roots(name: str) -> list[int]:
    return tree_roots(pids_by_name(name))


def machine_busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat minus idle and iowait)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(p) for p in parts]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds per process kind between `start()` and `stop()`: each kind is a set of process-tree roots
    (trees are re-read at both ends). `self` is this Python process (time.process_time) and `machine` is
    everything the machine did, so `machine - sum(kinds)` shows what ran besides."""

    kinds: dict[str, list[int]]
    before: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        reading = {kind: sum(tree_cpu_seconds(root) for root in roots) for kind, roots in self.kinds.items()}
        reading["self"] = time.process_time()
        reading["machine"] = machine_busy_cpu_seconds()
        return reading

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.seconds = {kind: after[kind] - self.before[kind] for kind in after}
        return self.seconds

    def per_operation(self, operations: int) -> dict[str, float | None]:
        """CPU milliseconds per operation of each kind."""
        return {kind: (1000 * s / operations if operations else None) for kind, s in self.seconds.items()}


# --- results -----------------------------------------------------------------------------------------------
def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def run_started() -> dict[str, Any]:
    """When the run began and the commit (and uncommitted changes) it measures."""
    return {"utc": utc_stamp(), "git": git_commit()}


def jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def write_results(
    name: str,
    *,
    machine: Mapping[str, Any],
    parameters: Mapping[str, Any],
    figures: Mapping[str, Any],
    ratios: Mapping[str, float | None],
    checks: Mapping[str, Any] | None = None,
    started: Mapping[str, Any],
) -> Path:
    """bench/results/<name>-<UTC timestamp>.json with everything needed to trace a quoted figure. `started` is
    `run_started()`'s answer: the commit measured is the one checked out when the run began."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp()
    at_end = git_commit()
    document = {
        "bench": name,
        "started_utc": started["utc"],
        "finished_utc": stamp,
        "git": started["git"],
        "git_changed_during_run": at_end != started["git"],
        "machine": machine,
        "parameters": parameters,
        "figures": figures,
        "ratios": ratios,
        "checks": checks or {},
    }
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(jsonable(document), indent=2) + "\n")
    print(f"results: {path.relative_to(ROOT)}")
    return path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
