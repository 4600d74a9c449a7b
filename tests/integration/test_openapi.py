"""The API described: the OpenAPI 3.1 document a node serves, its /docs page in headless Chromium, and a page
per problem code."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from core.domain.errors import PROBLEM_TYPE_BASE, catalogue
from core.settings import Settings
from ingress.app import init_app
from ingress.openapi import OPERATIONS, UNDOCUMENTED
from ingress.routes import routes

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def served_routes() -> set[tuple[str, str]]:
    return {(r.method, r.path) for r in routes if isinstance(r, web.RouteDef)} - UNDOCUMENTED


async def test_every_route_is_in_the_served_openapi_document_with_its_models(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    node = await aiohttp_client(init_app(settings))
    answer = await node.get("/v1/openapi.json")  # no API key: the description is public
    assert answer.status == 200
    document = await answer.json()
    assert document["openapi"] == "3.1.0"
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == served_routes() == set(OPERATIONS)
    transfer = document["paths"]["/v1/transfers"]["post"]
    body_ref = transfer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = document["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert set(body["required"]) >= {"source_id", "destination_id", "amount", "currency"}
    assert body["additionalProperties"] is False  # the model forbids unknown fields, and says so
    assert any(p["name"] == "Idempotency-Key" and p["required"] for p in transfer["parameters"])
    listing = {p["name"] for p in document["paths"]["/v1/accounts"]["get"]["parameters"]}
    assert {"limit", "cursor", "currency", "status", "metadata"} <= listing


async def test_each_problem_type_names_a_page_about_its_code(aiohttp_client: ClientFactory, settings: Settings) -> None:
    node = await aiohttp_client(init_app(settings))
    index = await (await node.get("/problems/")).text()
    for code, error in catalogue().items():
        assert (PROBLEM_TYPE_BASE + code).endswith(f"/problems/{code}")
        page = await node.get(f"/problems/{code}")
        assert page.status == 200 and page.content_type == "text/html"
        text = await page.text()
        assert code in text and html.escape(error.title) in text and f"HTTP {error.status}" in text
        assert f"/problems/{code}" in index
    unknown = await node.get("/problems/no-such-code")
    assert (unknown.status, unknown.content_type) == (404, "application/problem+json")


async def test_the_docs_page_lists_every_route_in_headless_chromium(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    browser = shutil.which("chromium")
    assert browser is not None, "chromium is not installed (ops/test installs it)"
    node = await aiohttp_client(init_app(settings))
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):  # served by the node itself: no CDN
        assert (await node.get(f"/docs/assets/{asset}")).status == 200
    assert (await node.get("/docs/assets/..%2F..%2Fsettings.py")).status == 404
    url = f"http://127.0.0.1:{node.port}/docs"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom", url]
    done = await asyncio_run_in_thread(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not re.search(r"https?://(?!127\.0\.0\.1)", "".join(re.findall(r"(?:src|href)=\"[^\"]*\"", done.stdout)))
    shown = set(re.findall(r'data-path="([^"]+)"', done.stdout))
    assert shown == {path for _, path in served_routes()}, done.stdout[-3000:]


async def asyncio_run_in_thread(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Chromium in a thread: the node under test answers it from this event loop meanwhile."""
    import asyncio

    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)


async def test_hostile_paths_on_the_description_routes_are_404_problems_that_echo_nothing(
    aiohttp_client: ClientFactory, settings: Settings
) -> None:
    node = await aiohttp_client(init_app(settings))
    marker = "zz" + "q" * 30
    for path in [
        f"/problems/{marker}%00",
        f"/problems/{marker}%FF%FE",
        f"/problems/{marker}" + "x" * 5000,
        f"/problems/..%2F..%2F{marker}",
        f"/docs/assets/{marker}%00.js",
        f"/docs/assets/{marker}%FF.css",
        f"/docs/assets/.{marker}",
        f"/docs/assets/{marker}" + "y" * 5000,
        f"/docs/assets/..%2F..%2F..%2Fetc%2F{marker}",
    ]:
        answer = await node.get(path)
        assert (answer.status, answer.content_type) == (404, "application/problem+json"), path
        assert marker not in await answer.text(), path
    # The description takes no input: a query or a key changes nothing, and it is the same for every caller.
    plain = await (await node.get("/v1/openapi.json")).read()
    other = await node.get("/v1/openapi.json?x=%00&limit=-1", headers={"Authorization": "Bearer clk_nope"})
    assert (other.status, await other.read()) == (200, plain)
