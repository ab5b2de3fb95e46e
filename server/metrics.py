"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    """Every metric the server exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "orchestrator_connections",
            "Open streaming connections, by transport",
            ["transport"],
            registry=r,
        )
        self.subscribers = Gauge(
            "orchestrator_subscribers", "Subscriptions held by the hub in this process", registry=r
        )
        self.published = Counter(
            "orchestrator_events_published",
            "Stored events published through this process, by type",
            ["type"],
            registry=r,
        )
        self.delivered = Counter(
            "orchestrator_events_delivered",
            "Events written to a client connection, by transport",
            ["transport"],
            registry=r,
        )
        self.replays = Counter(
            "orchestrator_replays",
            "Subscriptions started (each replays what it missed)",
            registry=r,
        )
        self.replay_gaps = Counter(
            "orchestrator_replay_gaps",
            "Resume positions that could not be served (replay_gap sent)",
            registry=r,
        )
        self.closed_by_server = Counter(
            "orchestrator_subscriptions_closed",
            "Subscriptions ended by the server, by reason",
            ["reason"],
            registry=r,
        )
        self.workflows = Counter(
            "orchestrator_workflows", "Workflows finished, by outcome", ["outcome"], registry=r
        )
        for transport in ("websocket", "sse"):
            self.connections.labels(transport=transport)
            self.delivered.labels(transport=transport)

    def subscriber_closed(self, reason: str) -> None:
        self.closed_by_server.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
