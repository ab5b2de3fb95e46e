"""One error root, and one wire code per error.

    StreamError                 every error this server raises on purpose
    ├── ClientError             the caller did something wrong: 4xx, message is safe to show
    │   ├── InvalidRequest      400/422 malformed or invalid input
    │   ├── InvalidSessionId    400 session id does not match the pattern
    │   ├── Unauthorized        401/403 missing or wrong credentials
    │   ├── PayloadTooLarge     413
    │   ├── BodyTimeout         408 the body did not arrive within body_timeout
    │   ├── IdempotencyKeyReused 422 an Idempotency-Key sent again with another event
    │   └── Conflict            409 session already ran, or already ended
    │       └── SessionEnded    409 publishing after the final event
    └── ServiceUnavailable      503 the broker cannot be reached, or shutting down (retry later)
        └── Overloaded          503 a limit is reached (WebSocket: 1013)

Anything else is a bug or a fault of a dependency: it is logged with its
traceback next to a reference id, and the client gets only a friendly
message, the code ``internal_error`` and that reference id (see
:func:`reference_id`). Exception text never reaches the wire.
"""

from __future__ import annotations

import secrets


def reference_id() -> str:
    """A short id that ties a user-visible error to its server log line."""
    return secrets.token_hex(6)


class StreamError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(StreamError):
    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class InvalidRequest(ClientError):
    pass


class InvalidSessionId(ClientError):
    code = "invalid_session_id"

    def __init__(self) -> None:
        super().__init__("Session ids are 8 to 128 characters of letters, digits, '-' and '_'.")


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class BodyTimeout(ClientError):
    status = 408
    code = "request_timeout"

    def __init__(self) -> None:
        super().__init__("The request body did not arrive in time; send it again.")


class IdempotencyKeyReused(ClientError):
    status = 422
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used in this session for a different event."
        )


class SessionNotFound(ClientError):
    status = 404
    code = "session_not_found"

    def __init__(self) -> None:
        super().__init__("No such session (it never started, or has expired).")


class Conflict(ClientError):
    status = 409
    code = "conflict"


class SessionEnded(Conflict):
    code = "session_ended"

    def __init__(self, session_id: str) -> None:
        super().__init__("This session has ended; nothing more can be published into it.")
        self.session_id = session_id


class ServiceUnavailable(StreamError):
    status = 503
    code = "service_unavailable"
    retry_after = 5  # seconds, sent as ``Retry-After``

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Overloaded(ServiceUnavailable):
    """A limit of :mod:`server.limits` is reached; ``reason`` names which one."""

    code = "overloaded"

    def __init__(self, reason: str) -> None:
        super().__init__("The server is busy; please try again in a few seconds.")
        self.reason = reason


def refusal_reason(error: StreamError) -> str | None:
    """The label a refusal by a limit or by access control is counted under, else ``None``."""
    if isinstance(error, Overloaded):
        return error.reason
    if error.code == "shutting_down" or error.status in (401, 403, 408, 413):
        return error.code
    return None
