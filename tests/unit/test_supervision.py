"""The supervisord configuration generated from the Procfile (core/supervision.py)."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

from core.supervision import Process, read_procfile, render, write_config

ROOT = Path(__file__).resolve().parents[2]


def parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser


def test_every_procfile_line_is_a_supervised_program(tmp_path: Path) -> None:
    processes = read_procfile(ROOT / "Procfile")
    assert {p.kind for p in processes} >= {"ingress", "nginx", "worker", "relay", "redeliver"}
    conf = parse(render(processes, root=ROOT, run_dir=tmp_path))
    programs = [s.removeprefix("program:") for s in conf.sections() if s.startswith("program:")]
    assert programs == [p.name for p in processes]
    for process in processes:
        section = conf[f"program:{process.name}"]
        assert shlex.split(section["command"].replace("%%", "%")) == ["/bin/bash", "-c", process.command]
        assert section["autorestart"] == "true"
        assert int(section["startretries"]) >= 10
        assert section["stopasgroup"] == section["killasgroup"] == "true"
        assert int(section["stopwaitsecs"]) > 30, "longer than the longest Prefer: wait"
        assert section["stdout_logfile"] == str(tmp_path / "log" / f"{process.name}.log")
        assert section["directory"] == str(ROOT)
    assert conf["program:nginx"]["stopsignal"] == "QUIT", "nginx drains on QUIT"
    priorities = {p.kind: int(conf[f"program:{p.name}"]["priority"]) for p in processes}
    assert priorities["worker"] < priorities["ingress"] < priorities["nginx"], "stopped in reverse: nginx first"
    assert conf["supervisorctl"]["serverurl"] == f"unix://{tmp_path / 'supervisor.sock'}"
    assert conf["supervisord"]["nodaemon"] == "true"


def test_percent_signs_are_escaped_for_supervisord(tmp_path: Path) -> None:
    text = render([Process("clock", "date +%s")], root=tmp_path, run_dir=tmp_path)
    assert "date +%%s" in parse(text)["program:clock"]["command"]


def test_write_config_creates_the_log_directory(tmp_path: Path) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text("# comment\n\nweb: sleep 1\n")
    path = write_config(procfile, root=tmp_path, run_dir=tmp_path / "var")
    assert path == tmp_path / "var" / "supervisord.conf"
    assert (tmp_path / "var" / "log").is_dir()
    assert "[program:web]" in path.read_text()


@pytest.mark.parametrize("text", ["web sleep 1\n", "web: a\nweb: b\n"])
def test_bad_procfiles_are_refused(tmp_path: Path, text: str) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text(text)
    with pytest.raises(ValueError):
        read_procfile(procfile)


def test_each_process_that_serves_http_has_a_liveness_listener(tmp_path: Path) -> None:
    processes = read_procfile(ROOT / "Procfile")
    conf = parse(render(processes, root=ROOT, run_dir=tmp_path, bin_dir=tmp_path))
    for process in processes:
        section = f"eventlistener:alive-{process.name}"
        if process.kind in ("nginx", "mongo"):
            assert section not in conf, process.name
            continue
        command = shlex.split(conf[section]["command"])
        port = re.search(r"--(?:metrics-)?port (\d+)", process.command).group(1)  # type: ignore[union-attr]
        path = "/healthz" if process.kind == "ingress" else "/metrics"
        assert command == [str(tmp_path / "httpok"), "-p", process.name, "-t", "10", f"http://127.0.0.1:{port}{path}"]
        assert conf[section]["events"] == "TICK_60"
