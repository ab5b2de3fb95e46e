"""Who may do what: stream tokens, the WebSocket ``Origin`` check. (The publish token of
``POST /api/sessions/{id}/events`` is checked in :mod:`server.api`.)

Stream tokens are optional. Without ``stream_token_secret`` a session id is the
only capability needed to watch a session (it is an unguessable UUID4 unless
the client chose it). With a secret, ``run-workflow`` hands out
``<expiry>.<signature>``: the expiry in Unix seconds, and the base64url
HMAC-SHA256 of ``session_id`` and expiry under the secret. It is bound to one
session, cannot be forged without the secret, needs no storage, and is checked
in constant time.

The ``Origin`` check stops cross-site WebSocket hijacking: browsers let any
page open a WebSocket to any host (there is no CORS for WebSockets), but they
always send the page's ``Origin``. A handshake that carries one must come from
an origin in ``cors_origins`` or from the server's own origin (``Origin``'s
host matches ``Host``). Clients that send no ``Origin`` are not browsers and
are let through: the check protects browser users, it does not authenticate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from .config import Settings, normalise_origin, origin_named
from .errors import Unauthorized
from .query import query_value

_MAX_EXPIRY_DIGITS = 12


def _signature(secret: str, session_id: str, expires: int) -> bytes:
    message = f"{session_id}\n{expires}".encode()
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=")


def issue_stream_token(
    secret: str, session_id: str, ttl: float, *, now: float | None = None
) -> str:
    """A token that lets its holder open streams of ``session_id`` for ``ttl`` seconds
    (an open stream is not cut off when it expires)."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{expires}.{_signature(secret, session_id, expires).decode()}"


def check_stream_token(
    secret: str, session_id: str, token: str | None, *, now: float | None = None
) -> None:
    """Raise :class:`Unauthorized` unless ``token`` is a valid, unexpired token of
    ``session_id``. What was wrong is told (missing, invalid, expired), never why
    a signature did not match."""
    if not token:
        raise Unauthorized("This session needs its token: add ?token=<token from run-workflow>.")
    expires_text, _, signature = token.partition(".")
    valid_shape = (
        expires_text.isascii()
        and expires_text.isdigit()
        and len(expires_text) <= _MAX_EXPIRY_DIGITS
    )
    expires = int(expires_text) if valid_shape else 0
    expected = _signature(secret, session_id, expires)
    given = signature.encode("utf-8", "replace")
    # Always compare, so a malformed token takes as long as a wrong one.
    if not hmac.compare_digest(given, expected) or not valid_shape:
        raise Unauthorized("The stream token is not valid for this session.")
    if expires < (time.time() if now is None else now):
        raise Unauthorized("The stream token has expired; start a new session.")


def origin_allowed(
    origin: str | None, host: str | None, allowed: tuple[str, ...], *, cookies: bool = False
) -> bool:
    """``True`` for no ``Origin``, a listed one, or the server's own. A ``*`` lets any
    origin in only without the user's ``cookies``, as for CORS: browsers send them on a
    WebSocket handshake, so were a proxy in front to authenticate users by cookie, any
    site could otherwise read their sessions."""
    if origin is None:
        return True
    if origin_named(origin, allowed) or ("*" in allowed and not cookies):
        return True
    try:
        netloc = urlsplit(normalise_origin(origin)).netloc
    except ValueError:
        return False
    return bool(host) and bool(netloc) and netloc == (host or "").lower()


def check_stream_access(request: web.Request, settings: Settings, session_id: str) -> None:
    """Raise :class:`Unauthorized` (401) without a valid stream token, when tokens are on."""
    if settings.stream_token_secret is not None:
        check_stream_token(settings.stream_token_secret, session_id, query_value(request, "token"))


def check_websocket_origin(request: web.Request, settings: Settings) -> None:
    """Raise :class:`Unauthorized` (403 ``forbidden_origin``) for a foreign browser page."""
    host = request.headers.get("Host")
    origin = request.headers.get("Origin")
    cookies = hdrs.COOKIE in request.headers
    if not origin_allowed(origin, host, settings.cors_origins, cookies=cookies):
        raise Unauthorized(
            "This page's origin may not open this stream.", code="forbidden_origin", status=403
        )
