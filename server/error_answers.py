"""What a failed request gets back: ``{"error", "code", "reference"}``, and nothing more.

Internals (exception text, tracebacks) go to the log only, under the reference the
client is shown. The errors middleware answers for every route but the two streams,
which call :func:`answer_error` themselves (see ``errors_middleware`` in
:mod:`server.app`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from .context import STREAM_CONTEXT
from .errors import (
    BodyTimeout,
    ServiceUnavailable,
    StreamError,
    reference_id,
    refusal_reason,
)

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Something went wrong on our side."

_HTTP_CODES = {
    404: ("not_found", "There is nothing at this address."),
    405: ("method_not_allowed", "This method is not allowed here."),
    413: ("payload_too_large", "The request body is too large."),
}


def error_body(
    status: int, code: str, message: str, reference: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": message, "code": code, "reference": reference}, status=status, headers=headers
    )


def answer_error(request: web.Request, exc: Exception) -> web.Response:
    """The answer to ``exc``, raised while handling ``request`` before its response
    started. An ``HTTPException`` below 400 (a redirect) is raised again, as is."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        if exc.status == 413:  # the body is over client_max_size (max_body_size)
            request.app[STREAM_CONTEXT].metrics.refused(code)
        # A 405 says which methods the address takes (RFC 9110: it must).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_body(exc.status, code, message, reference_id(), allow)
    if isinstance(exc, StreamError):
        ref = reference_id()
        reason = refusal_reason(exc)
        if reason is not None:
            request.app[STREAM_CONTEXT].metrics.refused(reason)
        if exc.status >= 500:
            log.warning(
                "%s %s -> %s: %s [ref %s]",
                request.method,
                request.path,
                exc.status,
                exc.message,
                ref,
                extra={"reference": ref},
            )
        headers = None
        if isinstance(exc, ServiceUnavailable):
            headers = {"Retry-After": str(exc.retry_after)}
        response = error_body(exc.status, exc.code, exc.message, ref, headers)
        if isinstance(exc, BodyTimeout):
            response.force_close()  # the rest of its body may still come: not a next request
        return response
    return error_body(500, "internal_error", INTERNAL_ERROR_MESSAGE, log_failure(request, exc))


def log_failure(request: web.Request, exc: Exception) -> str:
    """Log an unexpected failure (a bug) with its traceback, under a new reference for
    the client to quote; return the reference."""
    ref = reference_id()
    log.error(
        "%s %s failed [ref %s]",
        request.method,
        request.path,
        ref,
        exc_info=exc,
        extra={"reference": ref},
    )
    return ref
