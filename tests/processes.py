"""Real processes of the system (ingress nodes, workers) started by tests, and stopped after them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANLEDGER_")}
    env.update(settings.as_environ())
    env["PYTHONPATH"] = str(ROOT)
    return env


def worker_command() -> list[str]:
    """One group-commit worker process (workers/consumer.py), as the Procfile starts it."""
    return [sys.executable, "-m", "workers.consumer"]


def ingress_command(port: int) -> list[str]:
    return [sys.executable, "-m", "ingress.app", "--port", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} within {timeout_s}s")


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    @contextlib.contextmanager
    def start(
        cls, command: list[str], *, env: dict[str, str], name: str, port: int | None = None
    ) -> Iterator[ManagedProcess]:
        log = tempfile.NamedTemporaryFile(prefix=f"cleanledger-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        popen = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        process = cls(name, popen, Path(log.name))
        try:
            if port is not None:
                wait_for_port(port)
            yield process
        finally:
            process.stop()
            log.close()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
