"""The seed story's own design (PHASE5-003), as written, as a reference peer.

FastAPI + uvicorn; a ``ConnectionManager`` holding a dict from session id to
ONE WebSocket; ``send_json(message.dict())`` per send, so a pydantic model is
built and dumped for every send. Kept faithful, flaws included:

- a second subscriber to a session replaces the first, which stays open but
  receives nothing more (and when the older one disconnects, it removes the
  newer one from the dict);
- no history, so a reconnecting client misses what was sent meanwhile;
- no Server-Sent Events.

The one addition is the publish endpoint, with the same shape as ours, so one
load generator drives every server. ``python -m bench.peers.seed_fastapi --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import warnings
from datetime import datetime
from enum import Enum
from typing import Any

# The seed is pydantic-v1 style (class Config, .dict()); keep its code, hush the warnings.
warnings.filterwarnings("ignore", category=DeprecationWarning)

import uvicorn  # noqa: E402
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect  # noqa: E402
from pydantic import BaseModel, Field, ValidationError  # noqa: E402

from bench.peers import PEER_BACKLOG  # noqa: E402

# --- backend/app/schemas/websocket_messages.py ---------------------------------------------


class WebSocketMessageType(str, Enum):  # noqa: UP042 (as the seed wrote it)
    AGENT_STATUS = "agent_status"
    PROGRESS = "progress"
    COMPLETE = "complete"
    ERROR = "error"
    HEARTBEAT = "heartbeat"


class WebSocketMessage(BaseModel):
    type: WebSocketMessageType
    timestamp: str = Field(default_factory=lambda: datetime.now().isoformat())
    session_id: str

    class Config:
        use_enum_values = True


class AgentStatusMessage(WebSocketMessage):
    type: WebSocketMessageType = WebSocketMessageType.AGENT_STATUS
    agent: str = Field(..., description="Agent name (demand, inventory, pricing)")
    status: str = Field(..., description="Human-readable status text")
    progress: int = Field(..., ge=0, le=100, description="Percentage complete")
    data: dict = Field(default_factory=dict, description="Optional payload")  # type: ignore[type-arg]


class ProgressMessage(WebSocketMessage):
    type: WebSocketMessageType = WebSocketMessageType.PROGRESS
    agent: str
    status: str
    progress: int = Field(..., ge=0, le=100)
    data: dict = Field(default_factory=dict)  # type: ignore[type-arg]


class CompleteMessage(WebSocketMessage):
    type: WebSocketMessageType = WebSocketMessageType.COMPLETE
    agent: str
    status: str = "Complete"
    progress: int = 100
    data: dict  # type: ignore[type-arg]


class ErrorMessage(WebSocketMessage):
    type: WebSocketMessageType = WebSocketMessageType.ERROR
    error: str = Field(..., description="User-friendly error message")
    details: str = Field(default="", description="Additional error context")


class HeartbeatMessage(WebSocketMessage):
    type: WebSocketMessageType = WebSocketMessageType.HEARTBEAT
    message: str = "ping"


# --- backend/app/orchestrator/websocket_manager.py -----------------------------------------


class ConnectionManager:
    """Manages WebSocket connections for real-time progress updates."""

    def __init__(self) -> None:
        self.active_connections: dict[str, WebSocket] = {}
        self.logger = logging.getLogger(__name__)

    async def connect(self, session_id: str, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections[session_id] = websocket
        self.logger.info(f"WebSocket connected: {session_id}")

    def disconnect(self, session_id: str) -> None:
        if session_id in self.active_connections:
            del self.active_connections[session_id]
            self.logger.info(f"WebSocket disconnected: {session_id}")

    async def send_message(self, session_id: str, message: WebSocketMessage) -> None:
        if session_id in self.active_connections:
            websocket = self.active_connections[session_id]
            try:
                await websocket.send_json(message.dict())
            except Exception as e:
                self.logger.error(f"Failed to send message to {session_id}: {e}")
                self.disconnect(session_id)

    async def broadcast(self, message: WebSocketMessage) -> None:
        for session_id in list(self.active_connections.keys()):
            await self.send_message(session_id, message)

    def get_connection_count(self) -> int:
        return len(self.active_connections)


connection_manager = ConnectionManager()

# --- backend/app/routers/websocket.py -------------------------------------------------------

app = FastAPI()


@app.websocket("/ws/orchestrator/{session_id}")
async def websocket_orchestrator(websocket: WebSocket, session_id: str) -> None:
    await connection_manager.connect(session_id, websocket)

    try:
        heartbeat_task = asyncio.create_task(send_heartbeat(session_id))

        while True:
            await websocket.receive_text()

    except WebSocketDisconnect:
        connection_manager.disconnect(session_id)
        heartbeat_task.cancel()

    except Exception as e:
        connection_manager.logger.error(f"WebSocket error for {session_id}: {e}")
        connection_manager.disconnect(session_id)
        heartbeat_task.cancel()


async def send_heartbeat(session_id: str) -> None:
    while True:
        await asyncio.sleep(30)
        heartbeat = HeartbeatMessage(session_id=session_id)
        await connection_manager.send_message(session_id, heartbeat)


# --- the one addition: the same publish endpoint as ours ------------------------------------

MESSAGE_TYPES: dict[str, type[WebSocketMessage]] = {
    "agent_status": AgentStatusMessage,
    "progress": ProgressMessage,
    "complete": CompleteMessage,
    "error": ErrorMessage,
}
_sequence = itertools.count(1)


@app.post("/api/sessions/{session_id}/events", status_code=202)
async def publish_event(session_id: str, body: dict[str, Any]) -> dict[str, Any]:
    model = MESSAGE_TYPES.get(body.get("type", ""))
    if model is None:
        raise HTTPException(status_code=422, detail="unknown type")
    fields = {key: value for key, value in body.items() if key != "type"}
    try:
        message = model(session_id=session_id, **fields)
    except ValidationError:
        raise HTTPException(status_code=422, detail="invalid event") from None
    seq = next(_sequence)
    await connection_manager.send_message(session_id, message)
    return {"id": str(seq), "seq": seq}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.seed_fastapi")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    # The stock asyncio loop and h11, whatever else is installed, so the row stays
    # comparable from machine to machine (uvicorn's "auto" picks uvloop/httptools if present).
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="asyncio",
        http="h11",
        log_level="warning",
        access_log=False,
        backlog=PEER_BACKLOG,
    )


if __name__ == "__main__":
    main()
