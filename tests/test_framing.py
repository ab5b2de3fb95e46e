"""Wire framing as pure functions: SSE frames, HTTP chunks and WebSocket frames."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from server.framing import http_chunk, sse_frame, websocket_text_frame


def test_sse_frame_has_id_event_and_one_data_line() -> None:
    """A stored event is framed as id:, event:, one data: line and a blank line."""
    assert sse_frame(b'{"a":1}', event="progress", event_id="ep-3") == (
        b'id: ep-3\nevent: progress\ndata: {"a":1}\n\n'
    )


def test_sse_frame_without_id_for_control_events() -> None:
    """Control events and heartbeats carry no id: line."""
    assert sse_frame(b"{}", event="heartbeat") == b"event: heartbeat\ndata: {}\n\n"


def test_sse_frame_cannot_be_broken_by_line_breaks() -> None:
    """CR/LF are stripped from id and event, and data is split into data: lines."""
    framed = sse_frame(b"one\r\ntwo\rthree\nfour", event="ev\nil", event_id="i\r\nd")
    assert framed == (b"id: id\nevent: evil\ndata: one\ndata: two\ndata: three\ndata: four\n\n")


@pytest.mark.parametrize(
    ("data", "event", "event_id", "expected"),
    [
        (b"a\nb", "progress", "ep-3", b"id: ep-3\nevent: progress\ndata: a\ndata: b\n\n"),
        (b"a\rb", "progress", None, b"event: progress\ndata: a\ndata: b\n\n"),
        (b"{}", "pro\rgress", "ep-3", b"id: ep-3\nevent: progress\ndata: {}\n\n"),
        (b"{}", "progress", "ep\n-3", b"id: ep-3\nevent: progress\ndata: {}\n\n"),
    ],
)
def test_a_line_break_in_any_one_field_cannot_break_the_frame(
    data: bytes, event: str, event_id: str | None, expected: bytes
) -> None:
    """Whichever field alone holds the line break, the frame stays one event: id and
    event lose it, data becomes one data: line per line. (The common case, no line
    break anywhere, is built another way.)"""
    assert sse_frame(data, event=event, event_id=event_id) == expected


def test_an_empty_id_and_empty_data_still_make_a_whole_frame() -> None:
    """Empty fields take the common case's way and still end in the blank line."""
    assert sse_frame(b"", event="progress", event_id="") == b"id: \nevent: progress\ndata: \n\n"


def test_http_chunk() -> None:
    """A chunk is its length in hex, CRLF, the bytes, CRLF."""
    assert http_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_websocket_frame_parses_with_an_independent_implementation(size: int) -> None:
    """The pre-built frame is exactly what the websockets library reads back."""
    payload = b"a" * size
    reader = StreamReader()
    reader.feed_data(websocket_text_frame(payload))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("parser wanted more data")
    except StopIteration as done:
        frame = done.value
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == payload
