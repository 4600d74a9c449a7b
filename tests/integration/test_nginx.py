"""The repo's nginx.conf in front of a real ingress process: what nginx answers itself is problem+json too,
it names no version, and a trickled body is cut off. nginx runs on free ports with a private prefix."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from core.adapters.postgres.api_keys import create_api_key
from core.adapters.redis.keys import rate_limit_key
from core.bootstrap import LedgerService
from core.domain.errors import catalogue
from core.settings import Settings
from tests.processes import ROOT, ManagedProcess, free_port, ingress_command

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (ops/run installs it)")


def render_conf(prefix: Path, *, listen: int, upstream: int) -> Path:
    """nginx.conf as the repo has it, listening on `listen`, with one ingress node on `upstream`."""
    text = (ROOT / "nginx.conf").read_text()
    text, listens = re.subn(r"listen 127\.0\.0\.1:8080;", f"listen 127.0.0.1:{listen};", text)
    text, servers = re.subn(r"\n\s*server 127\.0\.0\.1:808[1-9] [^;]*;", "", text)
    text = text.replace("least_conn;", f"least_conn;\n        server 127.0.0.1:{upstream} max_fails=3 fail_timeout=5s;")
    assert (listens, servers) == (1, 3), "nginx.conf changed shape: update render_conf"
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


@dataclass
class Front:
    port: int
    ingress: ManagedProcess


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, service_env: dict[str, str]) -> Iterator[Front]:
    assert NGINX is not None
    prefix = tmp_path_factory.mktemp("nginx")
    prefix.chmod(0o755)  # nginx's workers run as another user when the master is root
    ingress_port, port = free_port(), free_port()
    conf = render_conf(prefix, listen=port, upstream=ingress_port)
    checked = subprocess.run([NGINX, "-t", "-p", f"{prefix}/", "-c", str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    env = {**service_env, "CLEANLEDGER_BODY_READ_TIMEOUT_S": "1"}
    with (
        ManagedProcess.start(ingress_command(ingress_port), env=env, name="ingress", port=ingress_port) as ingress,
        ManagedProcess.start(
            [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off;"], env=env, name="nginx", port=port
        ),
    ):
        yield Front(port, ingress)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    first_byte_s: float  # seconds from the first byte sent to the first byte of the answer

    def problem(self) -> dict[str, object]:
        assert self.headers.get("content-type", "").startswith("application/problem+json"), self.raw
        document: dict[str, object] = json.loads(self.body)
        known = catalogue()
        assert document["code"] in known, document
        assert document["title"] == known[str(document["code"])].title
        assert document["status"] == self.status
        assert document["type"] == f"https://cleanledger.dev/problems/{document['code']}"
        return document


def exchange(port: int, data: bytes, *, trickle_s: float = 0.0) -> Answer:
    """Send raw bytes (the body after the blank line a byte every `trickle_s` seconds), read until closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        head, sep, body = data.partition(b"\r\n\r\n")
        started = time.monotonic()
        s.sendall(head + sep if trickle_s else data)
        answered: float | None = None
        for i in range(len(body) if trickle_s else 0):
            if select.select([s], [], [], trickle_s)[0]:
                break  # answered before the body was complete
            s.sendall(body[i : i + 1])
        raw = b""
        while chunk := s.recv(65536):
            answered = answered or time.monotonic()
            raw += chunk
    head_bytes, _, body_bytes = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    return Answer(int(lines[0].split()[1]), headers, body_bytes[:length], raw, (answered or started) - started)


def get(path: str, *extra: bytes) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: ledger\r\n" + b"".join(extra) + b"Connection: close\r\n\r\n"


@pytest.fixture
def secret(ledger: LedgerService, tenant: str) -> str:
    return create_api_key(ledger.pool, tenant)[1]


def test_nginx_names_no_version(front: Front) -> None:
    answer = exchange(front.port, get("/healthz"))
    assert answer.status == 200
    assert answer.headers["server"] == "nginx"


def test_metrics_are_not_served_to_clients(front: Front) -> None:
    answer = exchange(front.port, get("/metrics"))
    assert (answer.status, answer.headers["content-type"]) == (404, "application/problem+json")
    assert b"cleanledger_" not in answer.raw  # the node's own port serves them to the scraper


def test_nginx_own_errors_are_problem_documents(front: Front, secret: str) -> None:
    auth = b"Authorization: Bearer " + secret.encode() + b"\r\n"
    big_body = b'{"currency": "USD", "metadata": {"k": "' + b"x" * 1_100_000 + b'"}}'
    cases = {
        # a body over client_max_body_size
        (413, "payload-too-large"): b"POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\n"
        + auth
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(len(big_body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + big_body,
        (414, "request-invalid"): get("/v1/accounts/" + "x" * 9000, auth),
        (431, "request-invalid"): get("/healthz", auth, b"X-Big: " + b"y" * 9000 + b"\r\n"),
        (400, "request-invalid"): b"GET /healthz HTTP/1.1\r\nHost: ledger\r\n" + auth + b"X-Bad: a\x00b\r\n\r\n",
        (501, "request-invalid"): b"POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\n"
        + auth
        + b"Transfer-Encoding: gzip, chunked, identity\r\nConnection: close\r\n\r\n",
    }
    for (status, code), request in cases.items():
        answer = exchange(front.port, request)
        assert answer.status == status, answer.raw[:300]
        assert answer.problem()["code"] == code
        assert secret.encode() not in answer.raw
        assert b"nginx/" not in answer.raw


def test_a_header_with_a_control_byte_never_comes_back(front: Front, secret: str) -> None:
    answer = exchange(front.port, get("/v1/accounts", b"Authorization: Bearer " + secret.encode() + b"\x01x\r\n"))
    # nginx passes the byte on; the ingress's parser refuses the line, and its answer quotes none of it.
    assert answer.status == 400, answer.raw[:300]
    assert answer.problem()["code"] == "request-invalid"
    assert secret.encode() not in answer.raw
    assert secret[4:].encode() not in answer.raw


def test_a_trickled_body_is_cut_off(front: Front, secret: str) -> None:
    body = b'{"currency": "USD"}'
    answer = exchange(
        front.port,
        b"POST /v1/accounts HTTP/1.1\r\nHost: ledger\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + secret.encode() + b"\r\nIdempotency-Key: " + uuid.uuid4().hex.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body,
        trickle_s=0.5,
    )
    assert answer.status == 408, answer.raw[:300]
    assert answer.problem()["code"] == "request-timeout"
    # The ingress gave the body 1 s: the answer came long before the 9.5 s the trickle would have taken.
    assert answer.first_byte_s < 5


def test_the_client_address_behind_nginx_is_the_one_nginx_saw(front: Front, settings: Settings) -> None:
    claimed = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.delete(rate_limit_key(f"auth-lookup:{claimed}"))
        answer = exchange(
            front.port,
            get(
                f"/v1/accounts/{uuid.uuid4()}",
                f"Authorization: Bearer clk_{uuid.uuid4().hex}\r\n".encode(),
                f"X-Forwarded-For: {claimed}\r\n".encode(),
            ),
        )
        assert answer.status == 401
        # nginx appended the real peer (127.0.0.1) after the claimed hop: the claim got no bucket of its own.
        assert not client.exists(rate_limit_key(f"auth-lookup:{claimed}"))
    finally:
        client.close()


def test_no_ingress_answering_is_a_problem_document_too(front: Front) -> None:
    """Last in this module: it stops the ingress behind the module's nginx."""
    front.ingress.stop()
    for _ in range(2):  # the first failure marks the node down; both are nginx's 502
        answer = exchange(front.port, get("/healthz"))
        assert answer.status == 502, answer.raw[:300]
        assert answer.problem()["code"] == "service-unavailable"
        assert answer.headers["retry-after"] == "1"
