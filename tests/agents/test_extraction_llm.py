"""LLM extraction with the real OpenAI SDK against a local Chat Completions server.

The server is aiohttp on 127.0.0.1 with a free port, answering
``POST /v1/chat/completions`` (and Azure's deployment path) from a script of
responses, one per request, and recording what it received.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from server.agents.answer_cap import MAX_ANSWER_BYTES, capped_http_client
from server.agents.extraction import FALLBACK_STATUS, ExtractionAgent
from server.agents.llm import LLMSettings
from server.logs import setup_logging
from tests.agents.conftest import Recorder
from tests.timing import EVENT_TIMEOUT

API_KEY = "sk-test-SECRET-4c8f2e9a1b7d"
STRATEGY = "15% off outdoor furniture for 8 weeks"
# What a model would answer for STRATEGY, but different from what the rules read (channel),
# so a test can tell which path produced the parameters.
LLM_ANSWER = {
    "product_category": "outdoor_furniture",
    "horizon_weeks": 8,
    "price_change_pct": -15.0,
    "promotion": True,
    "channel": "online",
    "service_level": None,
    "lead_time_weeks": None,
}


def completion(content: str) -> dict[str, Any]:
    """A chat.completion object as the Chat Completions API returns it."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80},
    }


def ok(content: str) -> web.Response:
    return web.json_response(completion(content))


def status(code: int, message: str) -> web.Response:
    # retry-after-ms makes the SDK's retry wait 1 ms instead of its back-off
    return web.json_response(
        {"error": {"message": message, "type": "test_error", "code": None}},
        status=code,
        headers={"retry-after-ms": "1"},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ChatServer:
    """The script of responses and the requests received."""

    url: str = ""
    # content, an HTTP status, a whole response as the server should send it, or a
    # handler that streams one
    script: list[str | int | web.Response | Handler] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {"path": request.path, "query": dict(request.query), "headers": dict(request.headers),
             "body": body}
        )  # fmt: skip
        step = self.script.pop(0) if self.script else "hang"
        if step == "hang":
            await self.release.wait()  # until the test ends: the client must time out
            return status(503, "released")
        if isinstance(step, web.Response):
            return step
        if callable(step):
            return await step(request)
        if isinstance(step, int):
            return status(step, f"scripted {step} for key {API_KEY}")
        return ok(step)

    def settings(self, **overrides: Any) -> LLMSettings:
        values: dict[str, Any] = {
            "provider": "openai",
            "api_key": API_KEY,
            "model": "test-model",
            "base_url": f"{self.url}/v1",
            "timeout": 5.0,
            "max_retries": 2,
        }
        values.update(overrides)
        return LLMSettings(**values)


@pytest.fixture
async def chat_server() -> AsyncIterator[ChatServer]:
    server = ChatServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.release.set()
    await runner.cleanup()


@pytest.fixture(autouse=True)
def capture_everything(caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG (the SDK's and the HTTP client's included), to look for the key."""
    caplog.set_level(logging.DEBUG)


def assert_no_key(recorder: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    reported = json.dumps([(r.status, r.data) for r in recorder.reports])
    assert API_KEY not in reported
    assert API_KEY[-8:] not in reported
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert API_KEY not in logged
    assert API_KEY[-8:] not in logged


def fallback_reported(recorder: Recorder, reason_part: str) -> bool:
    return any(
        r.status.startswith("Language model unavailable (")
        and r.status.endswith("); used rule-based extraction")
        and reason_part in r.status
        and r.data.get("method") == "rules"
        for r in recorder.reports
    )


async def test_success_gives_the_models_parameters(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid structured answer becomes the parameters, method 'llm', with a strict schema."""
    chat_server.script = [json.dumps(LLM_ANSWER)]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)

    assert result.method == "llm"
    assert result.model == "test-model"
    assert result.parameters.channel == "online"  # the model's answer, not the rules'
    assert result.parameters.price_change_pct == -15.0
    assert result.parameters.service_level == 0.95  # null -> default
    (sent,) = chat_server.requests
    assert sent["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert sent["body"]["messages"][-1]["content"] == STRATEGY
    schema = sent["body"]["response_format"]
    assert schema["type"] == "json_schema"
    assert schema["json_schema"]["strict"] is True
    assert set(schema["json_schema"]["schema"]["required"]) == set(LLM_ANSWER)
    assert not fallback_reported(recorder, "")
    assert recorder.statuses[-1].startswith("Language model read: Outdoor furniture, 8 weeks")
    # The model is named, its host (an internal address, maybe) is not.
    assert recorder.statuses[0] == "Asking the language model (test-model) to read the strategy"
    reported = json.dumps([(r.status, r.data) for r in recorder.reports])
    assert "127.0.0.1" not in reported, reported
    assert any(r.name.startswith("openai") for r in caplog.records)  # the SDK's logs were seen
    assert_no_key(recorder, caplog)


async def test_the_model_reads_the_whole_strategy_however_long_it_is_allowed_to_be(
    chat_server: ChatServer, recorder: Recorder
) -> None:
    """A strategy longer than the default limit (an operator raised
    ``--max-strategy-length``) reaches the model whole, as the rules read it whole: its
    last sentence may be what matters."""
    chat_server.script = [json.dumps(LLM_ANSWER)]
    strategy = "Background. " * 400 + STRATEGY  # about 4,800 characters
    await ExtractionAgent(chat_server.settings())(strategy, recorder)
    (sent,) = chat_server.requests
    assert sent["body"]["messages"][-1]["content"] == strategy


async def test_output_that_is_not_json_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Prose instead of JSON: rule-based parameters, and the stream says why."""
    chat_server.script = ["Sure! Outdoor furniture, 8 weeks, 15% off."]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)

    assert result.method == "rules"
    assert result.fallback_reason == "its answer was not valid JSON"
    assert result.parameters.channel == "all"
    assert result.parameters.horizon_weeks == 8
    assert fallback_reported(recorder, "not valid JSON")
    assert len(chat_server.requests) == 1  # not retried
    assert_no_key(recorder, caplog)


async def test_output_outside_the_schema_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Valid JSON with an unknown category and a 90-week horizon does not validate."""
    chat_server.script = [json.dumps({**LLM_ANSWER, "product_category": "toys"})]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    assert result.method == "rules"
    assert fallback_reported(recorder, "did not match the parameters schema")

    chat_server.script = [json.dumps({**LLM_ANSWER, "horizon_weeks": 90})]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    assert result.method == "rules"
    assert result.parameters.horizon_weeks == 8
    assert_no_key(recorder, caplog)


@pytest.mark.parametrize(
    "wrong", [{"horizon_weeks": True}, {"horizon_weeks": "8"}, {"promotion": "yes"}]
)
async def test_output_of_the_wrong_json_type_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, wrong: dict[str, Any]
) -> None:
    """The schema is strict, and so is reading the answer: ``true`` is not a week count
    (it was read as 1 week), nor ``"8"`` a number, nor ``"yes"`` a boolean."""
    chat_server.script = [json.dumps({**LLM_ANSWER, **wrong})]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    assert result.method == "rules"
    assert fallback_reported(recorder, "did not match the parameters schema")


async def test_429_then_success_is_retried_by_the_sdk(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 is retried (after retry-after-ms) and the second answer is used."""
    chat_server.script = [429, json.dumps(LLM_ANSWER)]
    result = await ExtractionAgent(chat_server.settings(max_retries=2))(STRATEGY, recorder)

    assert result.method == "llm"
    assert result.parameters.channel == "online"
    assert len(chat_server.requests) == 2
    assert_no_key(recorder, caplog)


async def test_500_falls_back_after_the_retries(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that keeps answering 500: 1 + max_retries requests, then the rules."""
    chat_server.script = [500, 500, 500, 500]
    result = await ExtractionAgent(chat_server.settings(max_retries=1))(STRATEGY, recorder)

    assert result.method == "rules"
    assert result.fallback_reason == "server error, HTTP 500"
    assert len(chat_server.requests) == 2
    assert fallback_reported(recorder, "HTTP 500")
    assert result.parameters.product_category == "outdoor_furniture"
    assert_no_key(recorder, caplog)  # the 500's body quoted the key: it must not leak


async def test_401_quoting_the_key_does_not_leak_it(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused key (whose error text quotes it) is reported as 'credentials refused'."""
    chat_server.script = [401]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    assert result.fallback_reason == "credentials refused, HTTP 401"
    assert len(chat_server.requests) == 1
    assert_no_key(recorder, caplog)


async def test_time_out_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that never answers: the SDK's time-out, then the rules, said in the stream."""
    chat_server.script = ["hang"]
    agent = ExtractionAgent(chat_server.settings(timeout=0.3, max_retries=0))
    result = await agent(STRATEGY, recorder)

    assert result.method == "rules"
    assert result.fallback_reason == "timed out after 0.3 s"
    assert fallback_reported(recorder, "timed out")
    assert len(chat_server.requests) == 1
    assert_no_key(recorder, caplog)


NOT_A_COMPLETION = {
    "a proxy's HTML page": lambda: web.Response(
        text="<html><body>Gateway says hello</body></html>", content_type="text/html"
    ),
    "plain text": lambda: web.Response(text="model overloaded", content_type="text/plain"),
    "an empty object": lambda: web.json_response({}),
    "a JSON list": lambda: web.json_response([completion("{}")]),
    "a choice without a message": lambda: web.json_response(
        {**completion("{}"), "choices": [{"index": 0, "finish_reason": "stop"}]}
    ),
}


@pytest.mark.parametrize("answer", list(NOT_A_COMPLETION))
async def test_an_answer_that_is_not_a_chat_completion_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    """HTTP 200 with something else than a chat completion: the rules, not a failed agent."""
    chat_server.script = [NOT_A_COMPLETION[answer]()]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    assert result.method == "rules"
    assert result.fallback_reason == "its answer could not be read"
    assert fallback_reported(recorder, "could not be read")
    assert_no_key(recorder, caplog)


async def test_a_retry_after_longer_than_the_budget_falls_back_to_the_rules(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 asking to come back in a minute (the SDK would wait): the model's budget,
    each attempt's time-out and one more, runs out first, and the rules are used, well
    before the agent's own time-out would fail the workflow."""
    chat_server.script = [
        web.json_response(
            {"error": {"message": "slow down", "type": "rate_limit", "code": None}},
            status=429,
            headers={"retry-after": "60"},
        )
    ]
    settings = chat_server.settings(timeout=0.3, max_retries=1)
    result = await ExtractionAgent(settings)(STRATEGY, recorder)
    assert result.method == "rules"
    assert result.fallback_reason == "no answer within 0.9 s"
    assert len(chat_server.requests) == 1
    assert_no_key(recorder, caplog)


async def test_a_base_url_with_a_bad_port_falls_back_to_the_rules(recorder: Recorder) -> None:
    """``OPENAI_BASE_URL=http://127.0.0.1:99999/v1``: the rules, and the stream names no URL."""
    settings = LLMSettings(
        provider="openai", api_key=API_KEY, base_url="http://127.0.0.1:99999/v1", max_retries=0
    )
    result = await ExtractionAgent(settings)(STRATEGY, recorder)
    assert result.method == "rules"
    reported = json.dumps([(r.status, r.data) for r in recorder.reports])
    assert "127.0.0.1" not in reported and "99999" not in reported, reported


async def test_unreachable_server_falls_back(recorder: Recorder) -> None:
    """Nothing listening on the port: 'could not connect', then the rules."""
    settings = LLMSettings(
        provider="openai", api_key=API_KEY, base_url="http://127.0.0.1:9/v1", max_retries=0
    )
    result = await ExtractionAgent(settings)(STRATEGY, recorder)
    assert result.method == "rules"
    assert fallback_reported(recorder, "could not connect")


@pytest.mark.parametrize("llm", [None, LLMSettings.from_env({})], ids=["none", "no-credentials"])
async def test_no_credentials_is_announced(llm: LLMSettings | None, recorder: Recorder) -> None:
    """Without a model the rules are used and the stream says so."""
    result = await ExtractionAgent(llm)(STRATEGY, recorder)
    assert result.method == "rules"
    assert recorder.statuses[-1] == FALLBACK_STATUS.format(reason=result.fallback_reason)
    assert result.summary()["method"] == "rules"
    assert result.summary()["fallback_reason"] == result.fallback_reason


async def test_azure_goes_through_the_deployment_path(
    chat_server: ChatServer, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """The Azure client posts to /openai/deployments/<name>/... with api-key and api-version."""
    chat_server.script = [json.dumps(LLM_ANSWER)]
    settings = LLMSettings.from_env(
        {
            "AZURE_OPENAI_ENDPOINT": chat_server.url,
            "AZURE_OPENAI_API_KEY": API_KEY,
            "AZURE_OPENAI_DEPLOYMENT": "forecast-gpt",
            "AZURE_OPENAI_API_VERSION": "2024-10-21",
        }
    )
    result = await ExtractionAgent(settings)(STRATEGY, recorder)

    assert result.method == "llm"
    assert result.model == "forecast-gpt"
    (sent,) = chat_server.requests
    assert sent["path"] == "/openai/deployments/forecast-gpt/chat/completions"
    assert sent["query"]["api-version"] == "2024-10-21"
    assert sent["headers"]["api-key"] == API_KEY
    assert_no_key(recorder, caplog)


# --- answers too large to read -------------------------------------------------------


@dataclass
class Flood:
    """An answer of ``size`` bytes (a JSON object that never ends), streamed as fast as the
    client reads it; ``written`` counts what the client took before it hung up."""

    status: int
    size: int
    written: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status)
        response.content_type = "application/json"
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            await response.write(b'{"id": "chatcmpl-flood",')
            while self.written < self.size:
                await response.write(chunk)
                self.written += len(chunk)
        except ConnectionError:
            pass  # the client stopped reading and closed the connection
        finally:
            self.done.set()
        return response


@pytest.mark.parametrize("status", [200, 502])
async def test_an_answer_over_the_size_limit_is_not_read_whole(
    chat_server: ChatServer, recorder: Recorder, status: int
) -> None:
    """A 160 MiB answer (a model that loops, or a proxy's error page): the client stops
    reading soon after the limit instead of holding it all in memory, does not ask again
    (the same answer would come back), and the rules read the strategy."""
    flood = Flood(status, size=160 << 20)
    chat_server.script = [flood]
    result = await ExtractionAgent(chat_server.settings(max_retries=2))(STRATEGY, recorder)
    assert result.method == "rules"
    assert result.fallback_reason == "its answer was over 1 MiB"
    assert fallback_reported(recorder, "over 1 MiB")
    async with asyncio.timeout(EVENT_TIMEOUT):
        await flood.done.wait()
    # What loopback's socket buffers can hold beyond the limit (the receive buffer grows
    # to tcp_rmem's 32 MiB here), not the whole answer.
    assert flood.written < 64 << 20
    assert len(chat_server.requests) == 1


async def test_an_answer_declared_over_the_size_limit_is_refused_before_its_body(
    chat_server: ChatServer, recorder: Recorder
) -> None:
    """A ``Content-Length`` over the limit: refused on the headers, not after a wait for
    a body that trickles in (the time-out would end it otherwise, attempt after attempt)."""

    async def declared(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.content_length = MAX_ANSWER_BYTES + 1
        await response.prepare(request)
        await response.write(b"{")
        await chat_server.release.wait()
        return response

    chat_server.script = [declared]
    settings = chat_server.settings(timeout=1.0, max_retries=2)
    result = await ExtractionAgent(settings)(STRATEGY, recorder)
    assert result.fallback_reason == "its answer was over 1 MiB"
    assert len(chat_server.requests) == 1


@pytest.mark.parametrize(
    ("encoding", "method"),
    [
        ("gzip", "rules"),
        ("GZIP", "rules"),
        ("identity, gzip", "rules"),
        ("identity", "llm"),
        ("Identity", "llm"),
        ("identity, identity", "llm"),  # the header sent twice
    ],
)
async def test_the_answer_is_asked_for_uncompressed_and_refused_compressed(
    chat_server: ChatServer, recorder: Recorder, encoding: str, method: str
) -> None:
    """1 MiB of gzip can hold a gigabyte: the client asks for ``identity`` and does not
    decode an answer compressed anyway (a proxy that ignores the request), even a good one.
    One that says ``identity``, in any case and however often, is read."""
    body = json.dumps(completion(json.dumps(LLM_ANSWER))).encode()
    if method == "rules":
        body = gzip.compress(body)
    chat_server.script = [
        web.Response(
            body=body, content_type="application/json", headers={"Content-Encoding": encoding}
        )
    ]
    result = await ExtractionAgent(chat_server.settings())(STRATEGY, recorder)
    (sent,) = chat_server.requests
    assert sent["headers"]["Accept-Encoding"] == "identity"
    assert result.method == method
    if method == "rules":
        assert result.fallback_reason == "its answer was compressed, though asked not to be"


async def test_a_capped_answer_still_tells_how_long_it_took(chat_server: ChatServer) -> None:
    """The cap wraps the body, and what the HTTP client reads from it still works: the
    response's ``elapsed`` (the SDK's raw responses give it to callers)."""
    chat_server.script = [json.dumps(LLM_ANSWER)]
    async with capped_http_client() as client:
        response = await client.post(f"{chat_server.url}/v1/chat/completions", json={})
    assert response.json()["object"] == "chat.completion"
    assert response.elapsed.total_seconds() >= 0


async def test_no_log_line_shows_the_base_urls_password(
    chat_server: ChatServer, recorder: Recorder
) -> None:
    """``OPENAI_BASE_URL`` may carry a password (``http://svc:secret@host/v1``). With the
    server's logging, even at DEBUG, no line shows it; the HTTP client used to log each
    request's whole URL at INFO."""
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in ("httpx", "httpx2")]
    saved = (list(root.handlers), root.level, [logger.level for logger in loggers])
    stream = io.StringIO()
    chat_server.script = [json.dumps(LLM_ANSWER)]
    base_url = chat_server.url.replace("http://", "http://svc:pw-SECRET-123@") + "/v1"
    try:
        setup_logging("DEBUG", stream=stream)
        result = await ExtractionAgent(chat_server.settings(base_url=base_url))(STRATEGY, recorder)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for logger, level in zip(loggers, saved[2], strict=True):
            logger.setLevel(level)
    assert result.method == "llm"
    assert "openai" in stream.getvalue()  # the SDK's own lines were written
    assert "pw-SECRET-123" not in stream.getvalue()
