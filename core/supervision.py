"""supervisord's configuration, generated from the Procfile (`cleanledger supervisord-config`).

The Procfile stays the one list of processes (bench/e2e.py reads it too); this module turns each of its lines
into a supervisord `[program:x]` that is restarted whenever it dies, stopped with its whole process group, and
logs to a file of its own; and, for one that serves HTTP, an event listener that restarts it when it hangs.
`ops/run` writes the file and runs `supervisord -n -c var/supervisord.conf`; `ops/status` asks the same file's
control socket.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")

# A process that stays up this long counts as started, in seconds. One that dies sooner is retried after 1 s,
# then 2 s, 3 s... (supervisord's backoff) up to STARTRETRIES times; one that dies later, after running, is
# restarted at once. 60 tries is ~30 min of backoff: long enough to outlast a dependency being restarted.
# It is also the grace a new process has before its liveness check: `httpok` judges RUNNING processes only, and
# with 2 s a minute's tick that fell just after a start found the ports not yet open and restarted every process
# of the node (seen once in the suite: test_supervised_crashes then met pids already gone).
STARTSECS = 5
STARTRETRIES = 60
# How long a stopping process may take before SIGKILL, in seconds: an ingress node finishes the requests in
# flight first, and a `Prefer: wait=N` request may hold for up to 30 s (CLEANLEDGER_PREFER_WAIT_MAX_S).
STOPWAITSECS = 45
LOG_MAXBYTES = "50MB"
LOG_BACKUPS = 5

# Start order (lower first); supervisord stops in the reverse order, one program at a time, so nginx drains
# first (QUIT: it finishes the requests it proxies), then the ingress nodes, then the workers settle what the
# ingress nodes queued last.
PRIORITY = {"nginx": 300, "ingress": 200}
DEFAULT_PRIORITY = 100
# nginx stops gracefully on QUIT (TERM is its fast shutdown, which drops requests in flight).
STOPSIGNAL = {"nginx": "QUIT"}
# Liveness: a process that serves HTTP is asked every minute (superlance's `httpok`, a supervisord event
# listener) and restarted when it does not answer 200 within LIVENESS_TIMEOUT_S: a hung process, not only a
# dead one. An ingress node is asked its /healthz (`--port`), every other process its metrics
# (`--metrics-port`).
LIVENESS_EVENT = "TICK_60"
LIVENESS_TIMEOUT_S = 10
LIVENESS_URLS = (
    (re.compile(r"--metrics-port (\d+)"), "/metrics"),
    (re.compile(r"ingress\.app .*--port (\d+)"), "/healthz"),
)


@dataclass(frozen=True, slots=True)
class Process:
    name: str
    command: str

    @property
    def kind(self) -> str:
        """ingress1 -> ingress, worker2 -> worker."""
        return re.sub(r"\d+$", "", self.name)

    @property
    def liveness_url(self) -> str | None:
        """Where the process answers whether it is alive, if it serves HTTP."""
        for pattern, path in LIVENESS_URLS:
            found = pattern.search(self.command)
            if found:
                return f"http://127.0.0.1:{found.group(1)}{path}"
        return None


def read_procfile(path: Path) -> list[Process]:
    """Every `name: command` line of a Procfile, in order; comments and blank lines skipped."""
    processes = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = PROCFILE_LINE.match(stripped)
        if match is None:
            raise ValueError(f"{path}: not a `name: command` line: {line!r}")
        processes.append(Process(match.group(1), match.group(2)))
    names = [p.name for p in processes]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: a process name appears twice: {names}")
    return processes


def _value(text: str) -> str:
    """supervisord expands %(name)s in values: a literal % must be doubled."""
    return text.replace("%", "%%")


def render(
    processes: list[Process],
    *,
    root: Path,
    run_dir: Path,
    bin_dir: Path | None = None,
    liveness_event: str = LIVENESS_EVENT,
    liveness_timeout_s: int = LIVENESS_TIMEOUT_S,
) -> str:
    """The supervisord configuration (INI) for `processes`, run in `root`, its state under `run_dir`
    (control socket, pid file, log/ with one file per process); `bin_dir` holds `httpok` (default: this
    Python's). A process serving HTTP is asked on every `liveness_event` and restarted when it does not
    answer within `liveness_timeout_s` seconds."""
    httpok = (bin_dir or Path(sys.executable).parent) / "httpok"
    root, run_dir = root.resolve(), run_dir.resolve()
    log_dir = run_dir / "log"
    lines = [
        "; Generated from the Procfile by `cleanledger supervisord-config` (ops/run): edit the Procfile, not this.",
        "[supervisord]",
        "nodaemon=true",
        f"directory={_value(str(root))}",
        f"logfile={_value(str(log_dir / 'supervisord.log'))}",
        f"logfile_maxbytes={LOG_MAXBYTES}",
        f"logfile_backups={LOG_BACKUPS}",
        f"pidfile={_value(str(run_dir / 'supervisord.pid'))}",
        f"childlogdir={_value(str(log_dir))}",
        "",
        "[unix_http_server]",
        f"file={_value(str(run_dir / 'supervisor.sock'))}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_value(str(run_dir / 'supervisor.sock'))}",
    ]
    for process in processes:
        # bash runs the line as the Procfile means it ($PWD, &&); it execs the line's last command, so the pid
        # supervisord watches is the process itself. Its own process group, signalled whole on stop and kill,
        # takes any children along (nginx's workers).
        command = shlex.join(["/bin/bash", "-c", process.command])
        lines += [
            "",
            f"[program:{process.name}]",
            f"command={_value(command)}",
            f"directory={_value(str(root))}",
            f"priority={PRIORITY.get(process.kind, DEFAULT_PRIORITY)}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={STARTSECS}",
            f"startretries={STARTRETRIES}",
            f"stopsignal={STOPSIGNAL.get(process.kind, 'TERM')}",
            f"stopwaitsecs={STOPWAITSECS}",
            "stopasgroup=true",
            "killasgroup=true",
            # JSON lines straight from the process to its file: supervisord writes them, nothing re-parses them.
            "redirect_stderr=true",
            f"stdout_logfile={_value(str(log_dir / f'{process.name}.log'))}",
            f"stdout_logfile_maxbytes={LOG_MAXBYTES}",
            f"stdout_logfile_backups={LOG_BACKUPS}",
        ]
        url = process.liveness_url
        if url is not None:
            listener = [str(httpok), "-p", process.name, "-t", str(liveness_timeout_s), url]
            lines += [
                "",
                f"[eventlistener:alive-{process.name}]",
                f"command={_value(shlex.join(listener))}",
                f"events={liveness_event}",
                "autorestart=true",
                f"stdout_logfile={_value(str(log_dir / f'alive-{process.name}.log'))}",
                f"stdout_logfile_maxbytes={LOG_MAXBYTES}",
                "redirect_stderr=false",
                f"stderr_logfile={_value(str(log_dir / f'alive-{process.name}.log'))}",
            ]
    return "\n".join(lines) + "\n"


def write_config(procfile: Path, *, root: Path, run_dir: Path, **liveness: Any) -> Path:
    """Write `<run_dir>/supervisord.conf` for `procfile` (and create `<run_dir>/log`); returns its path.
    `liveness`: `render`'s liveness_event and liveness_timeout_s."""
    (run_dir / "log").mkdir(parents=True, exist_ok=True)
    path = run_dir / "supervisord.conf"
    path.write_text(render(read_procfile(procfile), root=root, run_dir=run_dir, **liveness))
    return path
