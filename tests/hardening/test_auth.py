"""Who may do what: stream tokens, the WebSocket Origin check, the publish token, and no
version banner in responses."""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import make_mocked_request

from server.api import _may_publish
from server.auth import check_stream_token, issue_stream_token, origin_allowed
from server.errors import Unauthorized
from server.messages import CompleteEvent, ProgressEvent
from tests.hardening.clients import (
    assert_error_body,
    read_until_final,
    refused_ws,
    sse_url,
    url,
    ws_url,
)
from tests.hardening.conftest import StartServer
from tests.hardening.support import (
    RawConnection,
    context_of,
    events_in,
    metric,
    new_session_id,
)

SECRET = "test-stream-secret"
POLICY_VIOLATION = 1008
FRONTEND = "http://localhost:5173"


# --- stream tokens, as functions ----------------------------------------------------------------


def test_a_token_is_valid_for_its_session_until_it_expires() -> None:
    """A token checks for its own session within its lifetime, and for nothing else."""
    token = issue_stream_token(SECRET, "session-0001", 60, now=1000.0)
    check_stream_token(SECRET, "session-0001", token, now=1059.0)
    with pytest.raises(Unauthorized, match="expired"):
        check_stream_token(SECRET, "session-0001", token, now=1061.0)
    with pytest.raises(Unauthorized, match="not valid"):
        check_stream_token(SECRET, "session-0002", token, now=1000.0)
    with pytest.raises(Unauthorized, match="not valid"):
        check_stream_token("another-secret", "session-0001", token, now=1000.0)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "1060.",
        ".c2lnbmF0dXJl",
        "99999999999999999999.abc",
        "١٠٦٠.abc",  # Arabic-Indic digits are digits to str.isdigit(), not to us
        "1060.\udcff",
        "1060.sig\x00nature",
    ],
)
def test_a_malformed_token_is_refused_never_crashes(token: str) -> None:
    """Whatever the token holds, the answer is Unauthorized."""
    with pytest.raises(Unauthorized):
        check_stream_token(SECRET, "session-0001", token, now=1000.0)


def test_a_token_whose_expiry_was_moved_is_refused() -> None:
    """The expiry is signed: moving it forward breaks the signature."""
    token = issue_stream_token(SECRET, "session-0001", 60, now=1000.0)
    expires, _, signature = token.partition(".")
    with pytest.raises(Unauthorized, match="not valid"):
        check_stream_token(SECRET, "session-0001", f"{int(expires) + 3600}.{signature}", now=1000)


# --- stream tokens, over the wire -----------------------------------------------------------------


async def test_with_a_secret_run_workflow_returns_a_token_that_opens_its_streams(
    start: StartServer, http: ClientSession
) -> None:
    """run-workflow's 202 carries ``token``; with ``?token=`` the WebSocket, SSE and session
    endpoints serve that session."""
    server = await start(stream_token_secret=SECRET)
    async with http.post(
        url(server, "/api/orchestrator/run-workflow"), json={"strategy_description": "chairs"}
    ) as response:
        assert response.status == 202
        body = await response.json()
    session_id, token = body["session_id"], body["token"]
    async with http.ws_connect(ws_url(server, session_id, f"?token={token}")) as ws:
        events = await read_until_final(ws)
        assert events[-1]["final"] is True
    async with http.get(sse_url(server, session_id, f"?token={token}")) as response:
        assert response.status == 200
        assert "event: complete" in await response.text()
    async with http.get(url(server, f"/api/sessions/{session_id}?token={token}")) as response:
        assert response.status == 200
    path = f"/api/sessions/{session_id}/events?limit=1&token={token}"
    async with http.get(url(server, path)) as response:
        assert response.status == 200
        assert [e["seq"] for e in (await response.json())["events"]] == [1]


async def test_wait_true_also_returns_the_token(start: StartServer, http: ClientSession) -> None:
    """The 200 of ``?wait=true`` carries the token too."""
    server = await start(stream_token_secret=SECRET)
    async with http.post(
        url(server, "/api/orchestrator/run-workflow?wait=true"),
        json={"strategy_description": "chairs"},
    ) as response:
        assert response.status == 200
        body = await response.json()
    check_stream_token(SECRET, body["session_id"], body["token"])


async def test_without_secret_no_token_is_issued_or_needed(
    start: StartServer, http: ClientSession
) -> None:
    """Tokens are off by default: no ``token`` field, and streams open without one."""
    server = await start()
    async with http.post(
        url(server, "/api/orchestrator/run-workflow"), json={"strategy_description": "chairs"}
    ) as response:
        body = await response.json()
    assert "token" not in body
    async with http.ws_connect(ws_url(server, body["session_id"])) as ws:
        assert (await read_until_final(ws))[-1]["final"] is True


@pytest.mark.parametrize("problem", ["missing", "other session", "expired", "forged"])
async def test_a_stream_without_a_valid_token_is_refused(
    start: StartServer, http: ClientSession, problem: str
) -> None:
    """Missing, foreign, expired or forged token: the WebSocket gets ``unauthorized`` then
    1008; SSE, the session snapshot and its events get 401 in the JSON error shape."""
    server = await start(stream_token_secret=SECRET, stream_token_ttl=60.0)
    session_id = new_session_id()
    token = {
        "missing": None,
        "other session": issue_stream_token(SECRET, new_session_id(), 60),
        "expired": issue_stream_token(SECRET, session_id, 60, now=time.time() - 120),
        "forged": issue_stream_token("not-the-secret", session_id, 60),
    }[problem]
    query = "" if token is None else f"?token={token}"

    notice, code = await refused_ws(http, ws_url(server, session_id, query))
    assert code == POLICY_VIOLATION
    assert notice is not None and notice["type"] == "error" and notice["code"] == "unauthorized"
    async with http.get(sse_url(server, session_id, query)) as response:
        assert response.status == 401
        assert_error_body(await response.json(), "unauthorized")
    for path in (f"/api/sessions/{session_id}", f"/api/sessions/{session_id}/events"):
        async with http.get(url(server, f"{path}{query}")) as response:
            assert response.status == 401
            assert_error_body(await response.json(), "unauthorized")
    assert metric(context_of(server), "orchestrator_refusals_total", reason="unauthorized") == 4


async def test_a_token_is_checked_when_a_stream_opens_not_while_it_runs(
    start: StartServer, http: ClientSession
) -> None:
    """A stream opened with a valid token goes on past the token's expiry, to the session's
    final event (the README: cutting it off mid-workflow would leave its user with no way
    back in); a stream opened after the expiry is refused."""
    server = await start(stream_token_secret=SECRET)
    hub = context_of(server).hub
    session_id = new_session_id()
    token = issue_stream_token(SECRET, session_id, 1)  # expires within two seconds
    query = f"?token={token}"

    async with (
        http.ws_connect(ws_url(server, session_id, query)) as ws,
        http.get(sse_url(server, session_id, query)) as sse,
    ):
        assert sse.status == 200
        await hub.publish(
            ProgressEvent(session_id=session_id, agent="demand", status="s", progress=1)
        )
        assert (await ws.receive_json(timeout=5))["seq"] == 1  # both streams passed the check
        while not (await sse.content.readline()).startswith(b"data: "):
            pass

        while True:  # the clock, not the server, is what this waits for
            try:
                check_stream_token(SECRET, session_id, token)
            except Unauthorized:
                break
            await asyncio.sleep(0.05)

        await hub.publish(
            ProgressEvent(session_id=session_id, agent="demand", status="s", progress=50)
        )
        await hub.publish(CompleteEvent(session_id=session_id, agent="orchestrator", final=True))
        assert [event["seq"] for event in await read_until_final(ws)] == [2, 3]
        assert [event["seq"] for event in events_in(await sse.text())] == [2, 3]

    notice, code = await refused_ws(http, ws_url(server, session_id, query))
    assert code == POLICY_VIOLATION
    assert notice is not None and notice["code"] == "unauthorized"
    async with http.get(sse_url(server, session_id, query)) as response:
        assert response.status == 401


# --- the WebSocket Origin check -------------------------------------------------------------------


def test_origin_rules() -> None:
    """No Origin passes (not a browser); a listed one, ``*``, or the server's own passes."""
    allowed = (FRONTEND,)
    assert origin_allowed(None, "example.org", allowed)
    assert origin_allowed(FRONTEND, "example.org", allowed)
    assert origin_allowed("HTTP://LOCALHOST:5173/", "example.org", allowed)
    assert origin_allowed("https://example.org", "example.org", allowed)
    assert origin_allowed("https://evil.example", "example.org", ("*",))
    assert not origin_allowed("https://evil.example", "example.org", allowed)
    assert not origin_allowed("https://example.org:8443", "example.org", allowed)
    assert not origin_allowed("null", "example.org", allowed)
    assert not origin_allowed("", "example.org", allowed)
    assert not origin_allowed("https://example.org", None, allowed)
    assert not origin_allowed("http://[::1", "example.org", allowed)
    # A '*' lets any origin in without the user's cookies; a named one, with them.
    assert not origin_allowed("https://evil.example", "example.org", ("*",), cookies=True)
    assert origin_allowed(FRONTEND, "example.org", ("*", FRONTEND), cookies=True)
    assert origin_allowed("https://example.org", "example.org", ("*",), cookies=True)


async def test_a_browser_websocket_from_a_foreign_origin_is_refused_1008(
    start: StartServer, http: ClientSession
) -> None:
    """A handshake with a foreign ``Origin`` is upgraded, told ``forbidden_origin`` and
    closed with 1008 before any event of the session is read."""
    server = await start(cors_origins=(FRONTEND,))
    ctx = context_of(server)
    session_id = new_session_id()
    notice, code = await refused_ws(
        http, ws_url(server, session_id), headers={"Origin": "https://evil.example"}
    )
    assert code == POLICY_VIOLATION
    assert notice is not None and notice["code"] == "forbidden_origin"
    assert metric(ctx, "orchestrator_refusals_total", reason="forbidden_origin") == 1
    assert metric(ctx, "orchestrator_replays_total") == 0  # never subscribed


async def test_a_wildcard_admits_a_foreign_websocket_only_without_the_users_cookies(
    start: StartServer, http: ClientSession
) -> None:
    """With ``*`` in ``--cors-origins`` a foreign page's WebSocket is admitted, as its
    reads are over CORS, but not with the user's cookies (which browsers send on the
    handshake): behind a proxy that authenticates users by cookie, any site could read
    their sessions. A page listed by name may send them."""
    server = await start(cors_origins=("*", FRONTEND))
    foreign = {"Origin": "https://evil.example", "Cookie": "session=user-1"}
    notice, code = await refused_ws(http, ws_url(server, new_session_id()), headers=foreign)
    assert code == POLICY_VIOLATION
    assert notice is not None and notice["code"] == "forbidden_origin"
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": FRONTEND, "Cookie": "session=user-1"},
    ):
        async with http.ws_connect(ws_url(server, new_session_id()), headers=headers) as ws:
            await ws.send_str('{"type": "ping"}')  # admitted: answered, not refused
            assert (await ws.receive_json(timeout=5))["type"] == "heartbeat"


@pytest.mark.parametrize("listed", ["https://app.example:443", "HTTPS://App.Example:443/"])
async def test_an_origin_listed_with_its_default_port_is_the_one_browsers_send(
    start: StartServer, http: ClientSession, listed: str
) -> None:
    """Browsers never send a default port (``Origin: https://app.example``): an origin
    listed with one is that origin, for CORS (with credentials) and the WebSocket check."""
    server = await start(cors_origins=(listed,))
    origin = {"Origin": "https://app.example"}
    async with http.get(url(server, "/healthz"), headers=origin) as response:
        assert response.headers.get("Access-Control-Allow-Origin") == "https://app.example"
        assert response.headers.get("Access-Control-Allow-Credentials") == "true"
    async with http.ws_connect(ws_url(server, new_session_id()), headers=origin) as ws:
        await ws.send_str('{"type": "ping"}')  # admitted: answered, not refused
        assert (await ws.receive_json(timeout=5))["type"] == "heartbeat"


@pytest.mark.parametrize("origin", [FRONTEND, "same", None])
async def test_listed_same_origin_and_originless_websockets_are_admitted(
    start: StartServer, http: ClientSession, origin: str | None
) -> None:
    """The frontend's origin, the server's own origin, and clients sending no Origin."""
    server = await start(cors_origins=(FRONTEND,))
    if origin == "same":
        origin = f"http://{server.host}:{server.port}"
    headers = {} if origin is None else {"Origin": origin}
    session_id = new_session_id()
    async with http.ws_connect(ws_url(server, session_id), headers=headers) as ws:
        await context_of(server).hub.publish(
            ProgressEvent(session_id=session_id, agent="demand", status="s", progress=1)
        )
        message = await ws.receive_json(timeout=5)
        assert message["seq"] == 1


async def test_credentials_are_allowed_to_listed_origins_only_not_to_any_by_a_wildcard(
    start: StartServer, http: ClientSession
) -> None:
    """``--cors-origins '*'`` lets any page read, without the user's cookies: were a
    proxy in front to authenticate users by cookie, every site they visit could read
    their sessions. A listed origin may send them."""
    server = await start(cors_origins=("*", FRONTEND))
    for origin, credentials in (("https://any.example", None), (FRONTEND, "true")):
        async with http.get(url(server, "/healthz"), headers={"Origin": origin}) as response:
            assert response.headers.get("Access-Control-Allow-Origin") == origin
            assert response.headers.get("Access-Control-Allow-Credentials") == credentials


async def test_an_origin_configured_with_capitals_or_a_slash_is_one_origin_everywhere(
    start: StartServer, http: ClientSession
) -> None:
    """``--cors-origins HTTP://LocalHost:5173/`` names the frontend at
    ``http://localhost:5173`` for CORS (REST, SSE, the preflight) as for the WebSocket
    check: the browser's requests are let through by both, not by one of them."""
    server = await start(cors_origins=("HTTP://LocalHost:5173/",))
    origin = {"Origin": FRONTEND}
    async with http.get(url(server, "/healthz"), headers=origin) as response:
        assert response.status == 200
        assert response.headers.get("Access-Control-Allow-Origin") == FRONTEND
        # so that the page can read a 503's Retry-After
        assert response.headers.get("Access-Control-Expose-Headers") == "Retry-After"
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    async with http.options(url(server, "/api/orchestrator/run-workflow"), headers=preflight) as ok:
        assert ok.status == 204
    session_id = new_session_id()
    async with http.ws_connect(ws_url(server, session_id), headers=origin) as ws:
        await context_of(server).hub.publish(
            ProgressEvent(session_id=session_id, agent="demand", status="s", progress=1)
        )
        assert (await ws.receive_json(timeout=5))["seq"] == 1


# --- the publish token ----------------------------------------------------------------------------


async def test_with_a_publish_token_publishing_needs_the_bearer_token(
    start: StartServer, http: ClientSession
) -> None:
    """No or a wrong ``Authorization: Bearer`` gets 401 in the JSON error shape; the right
    one publishes."""
    server = await start(publish_token="publish-me")
    target = url(server, f"/api/sessions/{new_session_id()}/events")
    event = {"type": "progress", "agent": "demand", "status": "ok", "progress": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic publish-me"}):
        async with http.post(target, json=event, headers=headers) as response:
            assert response.status == 401
            assert_error_body(await response.json(), "unauthorized")
    async with http.post(
        target, json=event, headers={"Authorization": "Bearer publish-me"}
    ) as response:
        assert response.status == 202


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_without_a_publish_token_a_request_relayed_by_a_proxy_may_not_publish(
    start: StartServer, http: ClientSession, header: str
) -> None:
    """Behind a reverse proxy on the same machine every peer is loopback: a request that
    carries a proxy's forwarding header gets 403, a direct loopback one 202."""
    server = await start(publish_token=None)
    target = url(server, f"/api/sessions/{new_session_id()}/events")
    event = {"type": "progress", "agent": "demand", "status": "ok", "progress": 1}
    async with http.post(target, json=event, headers={header: "203.0.113.9"}) as response:
        assert response.status == 403
        assert_error_body(await response.json(), "forbidden")
    async with http.post(target, json=event) as response:
        assert response.status == 202


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False), ("203.0.113.9", False)],
)
def test_without_a_publish_token_only_loopback_may_publish(peer: str, allowed: bool) -> None:
    """With no publish token configured, the peer address decides: loopback only."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 12345) if name == "peername" else default
    )
    request = make_mocked_request("POST", "/api/sessions/x/events", transport=transport)
    assert _may_publish(request, None) is allowed


# --- no version banner ----------------------------------------------------------------------


async def test_no_response_names_the_server_software(
    start: StartServer, http: ClientSession
) -> None:
    """REST, errors, SSE, static files and the WebSocket handshake carry no ``Server`` header."""
    server = await start()
    session_id = new_session_id()
    for path in ("/healthz", "/nowhere", "/api/sessions/bad", "/", "/sse/orchestrator/x"):
        async with http.get(url(server, path)) as response:
            assert "Server" not in response.headers, path
    async with http.get(sse_url(server, session_id)) as response:
        assert response.status == 200 and "Server" not in response.headers
    raw = await RawConnection.open(server)
    try:
        head = await raw.request_head(
            f"/ws/orchestrator/{session_id}",
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert head["status"] == 101 and "Server" not in head["headers"]
    finally:
        raw.abort()
