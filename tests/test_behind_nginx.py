"""The README's nginx configurations, as written, run by a real nginx in front of the real
app: what they promise holds. Every route gets ``Host`` and the forwarding headers (the
same-origin WebSocket is admitted, and a proxied publish is never taken for a local one),
SSE streams through unbuffered, and publishing from outside the network is refused while
reading a session's events is not.

nginx is Debian's package (``.ci/run`` installs it). Without it these tests skip, unless
``CI`` is set: then they fail, because CI must run them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import ClientSession, TCPConnector
from aiohttp.test_utils import BaseTestServer

from server.app import create_app
from server.config import Settings
from tests.clients import (
    AiohttpWS,
    Event,
    http_url,
    new_session_id,
    open_curl_sse,
    progress,
    read_until,
)
from tests.timing import SERVER_START_TIMEOUT

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CONFIGS = re.findall(r"```nginx\n(.*?)```", README, re.DOTALL)
HOST = "forecast.example.com"  # the configs' server_name, and the page's origin
ORIGIN = f"https://{HOST}"
INSIDE = "127.0.0.2"  # stands in for the configs' 10.0.0.0/8: a service inside the network
NGINX_FORBIDDEN = 403


def test_the_readme_has_both_nginx_configurations() -> None:
    assert len(CONFIGS) == 2  # "Several processes behind a load balancer", "Behind nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def runnable(config: str, port: int, upstream: int, folder: Path) -> str:
    """The README's ``config`` as a whole nginx.conf: listening on ``port`` without TLS,
    proxying to ``upstream``, ``INSIDE`` as the inside network, files in ``folder``.
    Nothing else of it changes."""
    config, listens = re.subn(r"listen 443 ssl http2;", f"listen 127.0.0.1:{port};", config)
    config, upstreams = re.subn(
        r"server 127\.0\.0\.1:800\d", f"server 127.0.0.1:{upstream}", config
    )
    assert (listens, upstreams) == (1, 2), "the README's nginx configurations changed shape"
    config = config.replace("10.0.0.0/8", INSIDE)
    config = config.replace("/var/log/nginx/orchestrator.log", str(folder / "access.log"))
    temp_paths = "\n".join(
        f"{kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody, who cannot write to pytest's folders.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
access_log {folder / "access.log"};
{temp_paths}
{config}
}}
"""


@pytest.fixture(scope="session")
def nginx_path() -> str:
    # Debian puts it in /usr/sbin, which a non-root PATH may leave out.
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if path is None:
        reason = "no nginx found: install Debian's package with `apt-get install nginx-light`"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the nginx tests must run", pytrace=False)
        pytest.skip(reason)
    return path


class Proxied:
    """The app behind nginx: where each is."""

    def __init__(self, app: BaseTestServer, port: int) -> None:
        self.app = app
        self.port = port

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


ProxyFactory = Callable[[int], Awaitable[Proxied]]
BOTH_CONFIGS = pytest.mark.parametrize("config", [0, 1], ids=["several processes", "behind nginx"])
BEHIND_NGINX = 1  # the configuration that keeps publishing to the inside network


@pytest.fixture
async def proxied(
    nginx_path: str,
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[BaseTestServer]],
    settings: Settings,
) -> AsyncIterator[ProxyFactory]:
    """The real app (no publish token: only local clients may publish) behind a real
    nginx running the README's configuration number ``config``."""
    started: list[asyncio.subprocess.Process] = []

    async def start(config: int) -> Proxied:
        app = await aiohttp_server(create_app(settings))
        assert app.port is not None  # started
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(runnable(CONFIGS[config], port, app.port, tmp_path))
        out = tmp_path / "nginx.out"
        with out.open("wb") as log:
            nginx = await asyncio.create_subprocess_exec(
                nginx_path, "-p", str(tmp_path), "-c", str(conf), stdout=log, stderr=log
            )
        started.append(nginx)
        async with asyncio.timeout(SERVER_START_TIMEOUT):
            while True:
                assert nginx.returncode is None, out.read_text()
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    await asyncio.sleep(0.01)
                    continue
                writer.close()
                return Proxied(app, port)

    yield start
    for nginx in started:
        if nginx.returncode is None:
            nginx.terminate()
            await nginx.wait()


async def publish_directly(http: ClientSession, app: BaseTestServer, session_id: str) -> Event:
    """A progress event published straight to the app, from loopback."""
    target = http_url(app, f"/api/sessions/{session_id}/events")
    async with http.post(target, json=progress(1)) as response:
        assert response.status == 202
        answer: Event = await response.json()
        return answer


@BOTH_CONFIGS
async def test_a_same_origin_websocket_and_an_sse_stream_get_events_through_nginx(
    proxied: ProxyFactory, config: int
) -> None:
    """The page's own WebSocket (``Origin`` = the site nginx serves) is admitted, as its
    ``Host`` reaches the server; ``curl -N`` gets each event as it is published."""
    proxy = await proxied(config)
    session_id = new_session_id()
    path = f"/orchestrator/{session_id}"
    async with (
        ClientSession() as http,
        http.ws_connect(proxy.url(f"/ws{path}", "ws"), origin=ORIGIN, headers={"Host": HOST}) as ws,
        open_curl_sse(proxy.url(f"/sse{path}"), headers={"Host": HOST}) as sse,
    ):
        sent = await publish_directly(http, proxy.app, session_id)
        for stream in (AiohttpWS(ws), sse):
            events = await read_until(stream, lambda event: event.get("id") == sent["id"])
            assert events[-1]["status"] == "step 1"


@BOTH_CONFIGS
async def test_a_publish_through_nginx_is_never_taken_for_a_local_one(
    proxied: ProxyFactory, config: int
) -> None:
    """A service inside the network publishes through nginx to a server with no publish
    token: the server sees the forwarding header and refuses (403 ``forbidden``), though
    nginx connects to it from loopback."""
    proxy = await proxied(config)
    async with (
        ClientSession(connector=TCPConnector(local_addr=(INSIDE, 0))) as inside,
        inside.post(
            proxy.url(f"/api/sessions/{new_session_id()}/events"),
            json=progress(1),
            headers={"Host": HOST},
        ) as response,
    ):
        assert response.status == 403
        assert (await response.json())["code"] == "forbidden"


async def test_outside_the_network_a_sessions_events_can_be_read_not_published(
    proxied: ProxyFactory,
) -> None:
    """ "Behind nginx" keeps publishing to the inside network: a client outside it is
    refused a publish by nginx itself, and may still read a session's events, as it may
    watch its streams."""
    proxy = await proxied(BEHIND_NGINX)
    session_id = new_session_id()
    target = proxy.url(f"/api/sessions/{session_id}/events")
    async with ClientSession() as http:
        await publish_directly(http, proxy.app, session_id)
        async with http.get(target, headers={"Host": HOST}) as response:
            assert response.status == 200
            assert [e["status"] for e in (await response.json())["events"]] == ["step 1"]
        async with http.post(target, json=progress(2), headers={"Host": HOST}) as response:
            assert response.status == 403
            assert response.content_type == "text/html"  # nginx's page, not the server's


async def test_outside_the_network_a_frontend_may_ask_to_read_a_sessions_events(
    proxied: ProxyFactory,
) -> None:
    """The frontend on another origin (the default ``--cors-origins``) reads the events
    with a header a browser asks about first (``Last-Event-ID``): the preflight reaches
    the server and is answered, where ``limit_except GET`` alone had nginx refuse it,
    and the browser the read."""
    proxy = await proxied(BEHIND_NGINX)
    target = proxy.url(f"/api/sessions/{new_session_id()}/events")
    frontend = "http://localhost:5173"
    preflight = {
        "Host": HOST,
        "Origin": frontend,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id",
    }
    async with ClientSession() as http, http.options(target, headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == frontend
        assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
