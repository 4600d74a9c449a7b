"""The generated supervisord config, run for real on a small Procfile: what dies is started again, what keeps
dying at start backs off, and a stop takes the whole process group."""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.supervision import write_config
from tests.processes import BIN, free_port

STATUS_LINE = re.compile(r"^(\S+)\s+([A-Z]+)\s*(?:pid (\d+),)?")


class Supervisor:
    def __init__(self, conf: Path, popen: subprocess.Popen[bytes]) -> None:
        self.conf = conf
        self.popen = popen

    def status(self) -> dict[str, tuple[str, int | None]]:
        out = subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(self.conf), "status"], capture_output=True, text=True, timeout=30
        ).stdout
        found: dict[str, tuple[str, int | None]] = {}
        for line in out.splitlines():
            if match := STATUS_LINE.match(line):
                found[match.group(1)] = (match.group(2), int(match.group(3)) if match.group(3) else None)
        return found

    def wait_for(self, name: str, state: str, timeout_s: float, *, not_pid: int | None = None) -> int | None:
        deadline = time.monotonic() + timeout_s
        while True:
            current, pid = self.status().get(name, ("", None))
            if current == state and (not_pid is None or pid != not_pid):
                return pid
            assert time.monotonic() < deadline, f"{name} is {current}, not {state}, after {timeout_s} s"
            time.sleep(0.1)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    procfile = tmp_path / "Procfile"
    hung = (
        "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[2]))); s.listen();"
        " time.sleep(300)"
    )  # takes connections and never answers: alive to the kernel, hung to a client
    procfile.write_text(
        "# a steady process with a child of its own, one that never gets past its start, and a hung one\n"
        "steady: sleep 300 & exec sleep 301\n"
        "early: exit 3\n"
        f"hung: exec {BIN / 'python'} -c {shlex.quote(hung)} --metrics-port {free_port()}\n"
    )
    conf = write_config(
        procfile, root=tmp_path, run_dir=tmp_path / "var", liveness_event="TICK_5", liveness_timeout_s=2
    )
    popen = subprocess.Popen(
        [str(BIN / "supervisord"), "-n", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield Supervisor(conf, popen)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(30)
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)


def test_restarts_backoff_and_group_stop(supervisor: Supervisor) -> None:
    pid = supervisor.wait_for("steady", "RUNNING", 15)
    assert pid is not None
    # Died after it had started: started again at once, with a new pid.
    subprocess.run(["kill", "-9", str(pid)], check=True)
    new_pid = supervisor.wait_for("steady", "RUNNING", 15, not_pid=pid)
    assert new_pid is not None and new_pid != pid
    # Dies before startsecs every time: retried with a growing delay, not given up at once.
    supervisor.wait_for("early", "BACKOFF", 15)
    # Stopping takes the process group: the background `sleep 300` goes with its parent.
    sleepers = [p for p in Path("/proc").glob("[0-9]*") if _is_child_sleep(p, new_pid)]
    assert sleepers, "the steady process's own child is running"
    supervisor.popen.send_signal(signal.SIGINT)
    assert supervisor.popen.wait(30) == 0
    assert not [p for p in sleepers if _alive(p)], "stopasgroup took the child too"


def test_a_hung_process_is_restarted_by_its_liveness_check(supervisor: Supervisor) -> None:
    pid = supervisor.wait_for("hung", "RUNNING", 15)
    assert supervisor.wait_for("steady", "RUNNING", 15)
    # Its metrics port takes the connection and answers nothing: httpok gives up after 2 s and restarts it.
    restarted = supervisor.wait_for("hung", "RUNNING", 30, not_pid=pid)
    assert restarted is not None and restarted != pid
    assert "alive-hung" in supervisor.status()  # the listener, itself supervised
    assert "alive-steady" not in supervisor.status()  # no HTTP: nothing to ask


def _is_child_sleep(proc: Path, parent: int) -> bool:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]) == parent and (proc / "comm").read_text().strip() == "sleep"
    return False


def _alive(proc: Path) -> bool:
    """Exists and is no zombie (an orphan's zombie may wait for a container's init to reap it)."""
    with contextlib.suppress(OSError, IndexError):
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False
