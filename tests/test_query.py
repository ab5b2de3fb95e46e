"""``query_value`` reads one query parameter as ``request.query`` would, without keeping
the parsed query for the life of a stream."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from server.query import query_value

QUERIES = [
    "",
    "last_event_id=3f2a-7",
    "token=12.ab-_c%2B&last_event_id=",
    "last_event_id=a+b&last_event_id=second",
    "last_event_id=%E2%9C%93",
    "last_event_id",
    "=v&k=%ZZ",
    "x=1;last_event_id=2",
]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("name", ["last_event_id", "token", "k", "missing"])
def test_query_value_reads_what_request_query_reads(query: str, name: str) -> None:
    request = make_mocked_request("GET", f"/sse/orchestrator/s-0000001?{query}")
    assert query_value(request, name) == request.query.get(name)


@pytest.mark.parametrize(
    ("query", "value"),
    [
        ("last_event_id=a&lastEventId=b", "b"),
        ("lastEventId=b&last_event_id=a", "b"),
        ("lastEventID=c&last_event_id=a", "c"),
        ("lastEventId=b&lastEventID=c", "b"),
        ("last_event_id=a", "a"),
        ("lastEventId=&last_event_id=a", ""),
        ("other=1", None),
    ],
)
def test_query_value_of_several_names_takes_the_first_name_present(
    query: str, value: str | None
) -> None:
    request = make_mocked_request("GET", f"/sse/orchestrator/s-0000001?{query}")
    assert query_value(request, "lastEventId", "lastEventID", "last_event_id") == value
