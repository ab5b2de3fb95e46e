"""The language model's answer, held to a size: a misbehaving endpoint cannot fill memory.

A chat completion with our parameters is under 2 KB. A proxy's error page, a model
that loops or a hostile endpoint could send hundreds of megabytes, which the SDK
would read whole and then decode: a 400 MB answer took the process to 1.6 GB.
:func:`capped_http_client` is the SDK's own default HTTP client (its pool, time-outs
and redirects) with one hook on every response, error pages included:

- a ``Content-Length`` over :data:`MAX_ANSWER_BYTES` is refused before the body;
- the body is read only up to :data:`MAX_ANSWER_BYTES`;
- the answer is asked for uncompressed, and one compressed anyway is refused: 1 MiB of
  gzip can hold a gigabyte.

Each refusal raises :class:`AnswerRefused`, an ``OpenAIError``, which the SDK passes on
without retrying: the same answer would come back.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator
from typing import Any

import openai

__all__ = ["MAX_ANSWER_BYTES", "AnswerRefused", "capped_http_client"]

MAX_ANSWER_BYTES = 1 << 20


class AnswerRefused(openai.OpenAIError):
    """An answer not read; ``reason`` is safe to show to users."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


TOO_LARGE = f"its answer was over {MAX_ANSWER_BYTES >> 20} MiB"


def capped_http_client() -> Any:
    """A new HTTP client for one SDK client (which closes it)."""
    return openai.DefaultAsyncHttpxClient(
        headers={"Accept-Encoding": "identity"},
        event_hooks={"response": [_cap]},
    )


async def _cap(response: Any) -> None:
    """Runs once the headers are in, before the SDK reads the body."""
    encodings = response.headers.get("content-encoding", "").lower().split(",")
    if any(encoding.strip() not in ("", "identity") for encoding in encodings):
        raise AnswerRefused("its answer was compressed, though asked not to be")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise AnswerRefused(TOO_LARGE)
    library = type(response).__module__.partition(".")[0]  # httpx, or httpx2 in openai 3
    response.stream = _capped_stream_type(library)(response.stream)


@functools.cache
def _capped_stream_type(library: str) -> type:
    """A byte stream class of the HTTP library the SDK uses: a response's stream must be
    an instance of that library's ``AsyncByteStream``."""
    byte_stream = sys.modules[library].AsyncByteStream
    return type("CappedStream", (_CappedStream, byte_stream), {})


class _CappedStream:
    """The body, up to :data:`MAX_ANSWER_BYTES` (mixed into the class above)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self._inner:
            read += len(chunk)
            if read > MAX_ANSWER_BYTES:
                raise AnswerRefused(TOO_LARGE)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def elapsed(self) -> Any:
        """The inner stream's request time, which httpx2's ``Response.elapsed`` reads."""
        return getattr(self._inner, "elapsed", None)
