"""Where one process of the stack spends its CPU under end-to-end load: py-spy on a live process, folded.

    .venv/bin/python bench/profile.py [--process ingress] [--seconds 12] [--mode wait] [--case uniform] \
                                      [--load e2e|batches]

Runs `bench/e2e.py` (one case and mode, no baseline, no paced phase), or with `--load batches`
`bench/batches.py` (no baseline), in the background, waits until its
accounts are open and the load has started, attaches `py-spy record` (`--nonblocking`, 250 Hz) for `--seconds`
to the first process of the given Procfile kind (`ingress`, `worker`, `relay`, ...), then folds the stacks:

- busy samples (the Python stack was not parked in the event loop's `select` or a blocking wait) against idle;
- per function, the share of busy samples it is on the stack of (inclusive) and at the top of (self), the
  top 40 of each;
- per area (HTTP, PostgreSQL, RabbitMQ, Redis, logging, our own code...): each busy sample counted once, for
  the innermost frame of a known package (a socket write under redis-py is Redis's share, not asyncio's).

The e2e run's own figures are printed too (its phase ran under the profiler, so they are a little lower than an
unprofiled run). Writes `bench/results/profile-<kind>-<UTC timestamp>.json`.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_facts, print_machine, run_started, write_results

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
# A frame at the top of an idle stack: the thread waits for I/O (the event loop's select, psycopg's wait for
# the server's answer, pika's poll), it does not compute.
IDLE_TOPS = (
    "select (selectors.py",
    "poll (selectors.py",
    "wait (threading.py",
    "_wait_for_tstate_lock",
    "Connection.wait (psycopg/connection.py",
    "PollPoller.poll (pika/",
)
# Areas by the module path in a frame (py-spy writes `function (package/module.py:line)`). A busy sample counts
# for the area of the innermost frame that has one: a socket write under redis-py is Redis's, not asyncio's.
AREAS = (
    ("PostgreSQL (psycopg)", "(psycopg"),
    ("RabbitMQ (pika)", "(pika/"),
    ("Redis (redis-py)", "(redis/"),
    ("logging (structlog, logging)", "(structlog/"),
    ("logging (structlog, logging)", "(logging/"),
    ("pydantic", "(pydantic"),
    ("HTTP (aiohttp)", "(aiohttp/"),
    ("our code: core", "(core/"),
    ("our code: ingress", "(ingress/"),
    ("our code: workers", "(workers/"),
)


def process_of(kind: str, command_marker: str) -> int | None:
    """The pid of the first process whose command line has the Procfile kind's module."""
    for entry in sorted(Path("/proc").iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if command_marker in command and "py-spy" not in command and "bench/" not in command:
            return int(entry.name)
    return None


MARKERS = {
    "ingress": "-m ingress.app",
    "worker": "-m workers.consumer",
    "relay": "-m workers.relay",
    "audit": "-m workers.audit",
    "webhooks": "-m workers.webhooks",
}


def innermost_area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, marker in AREAS:
            if marker in frame:
                return area
    return "other (asyncio, the interpreter)"


def fold(raw: Path) -> dict[str, Any]:
    busy = idle = 0
    inclusive: collections.Counter[str] = collections.Counter()
    top: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in IDLE_TOPS):
            idle += n
            continue
        busy += n
        top[frames[-1]] += n
        for name in {frame.split(":")[0] for frame in frames}:
            inclusive[name] += n
        areas[innermost_area(frames)] += n
    share = (lambda n: round(100 * n / busy, 1)) if busy else (lambda n: None)
    return {
        "samples": {"busy": busy, "idle": idle},
        "inclusive_pct": {name: share(n) for name, n in inclusive.most_common(40)},
        "self_pct": {name: share(n) for name, n in top.most_common(40)},
        "areas_pct": {name: share(n) for name, n in areas.most_common()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process", default="ingress", choices=sorted(MARKERS))
    parser.add_argument("--seconds", type=int, default=12, help="seconds of sampling")
    parser.add_argument("--case", default="uniform")
    parser.add_argument("--mode", default="wait", choices=("wait", "accept"))
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--load", default="e2e", choices=("e2e", "batches"), help="the benchmark under the profiler")
    args = parser.parse_args()
    if not PY_SPY.exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    started = run_started()
    facts = machine_facts()
    print_machine(facts)
    load_seconds = args.seconds + 15  # the profile starts a few seconds into the phase and ends before it does
    log = tempfile.NamedTemporaryFile(prefix="profile-e2e-", suffix=".log", delete=False)  # noqa: SIM115
    if args.load == "batches":
        load = ["batches.py", "--no-baseline", "--seconds", str(load_seconds), "--accounts", str(args.accounts)]
    else:
        load = [
            "e2e.py",
            "--no-baseline",
            "--cases",
            args.case,
            "--modes",
            args.mode,
            "--paced-fraction",
            "0",
            "--seconds",
            str(load_seconds),
            "--accounts",
            str(args.accounts),
        ]
    e2e = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / load[0]), *load[1:]],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    raw = Path(tempfile.mkdtemp(prefix="profile-")) / "stacks.txt"
    try:
        deadline = time.monotonic() + 600
        while "opened and funded" not in Path(log.name).read_text(errors="replace"):
            if e2e.poll() is not None or time.monotonic() > deadline:
                print(Path(log.name).read_text(errors="replace")[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        time.sleep(4)  # into the phase
        pid = process_of(args.process, MARKERS[args.process])
        if pid is None:
            print(f"no {args.process} process found", file=sys.stderr)
            return 1
        spy = [str(PY_SPY), "record", "-p", str(pid), "-d", str(args.seconds), "-r", "250", "--nonblocking"]
        subprocess.run(
            [*spy, "-f", "raw", "-o", str(raw)],
            check=True,
            capture_output=True,
        )
        e2e.wait(timeout=load_seconds + 300)
    finally:
        if e2e.poll() is None:
            e2e.terminate()
            e2e.wait(timeout=60)
    folded = fold(raw)
    e2e_lines = [
        line
        for line in Path(log.name).read_text(errors="replace").splitlines()
        if not line.startswith("{") and line.strip()
    ]
    busy, idle = folded["samples"]["busy"], folded["samples"]["idle"]
    print(f"{args.process} pid, {args.seconds} s at 250 Hz: {busy} busy samples, {idle} idle")
    print("by area (% of busy samples, each counted for its innermost known package):")
    for area, pct in folded["areas_pct"].items():
        print(f"  {pct:5.1f}  {area}")
    print("top of the stack (self % of busy samples):")
    for name, pct in list(folded["self_pct"].items())[:15]:
        print(f"  {pct:5.1f}  {name}")
    shown = ("uniform/", "hot", "    CPU", "    POST", "batches of")
    print("\n".join(line for line in e2e_lines if line.startswith(shown)))
    write_results(
        f"profile-{args.process}" + ("-batches" if args.load == "batches" else ""),
        started=started,
        machine=facts,
        parameters={**vars(args), "load_seconds": load_seconds, "e2e_log": log.name},
        figures={**folded, "e2e": e2e_lines},
        ratios={},
        checks={"e2e_exit": e2e.returncode},
    )
    return 0 if e2e.returncode == 0 else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
