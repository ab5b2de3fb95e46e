"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .messages import StoredEvent

# Publish-to-send latency is observed for every 16th event of a session (seq 1, 17, 33 ...):
# once per transport when the fan-out has written it to every steady subscriber (the time
# of the last, slowest write), and at each subscriber whose copy went through its queue.
# A histogram observation costs ~3 us, several times a write; timing sampled events, not
# deliveries, keeps the tail that matters at a small fraction of that cost.
LATENCY_SAMPLE_EVERY = 16

_AGENT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    """Every metric the server exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_open_fds and process_max_fds (every stream is a socket), resident memory
        # and CPU seconds: read from /proc at each scrape, nothing on the hot path.
        ProcessCollector(registry=r)
        self.connections = Gauge(
            "orchestrator_connections",
            "Open streaming connections, by transport",
            ["transport"],
            registry=r,
        )
        self.subscribers = Gauge(
            "orchestrator_subscribers", "Subscriptions held by the hub in this process", registry=r
        )
        self.published = HotCounter(
            "orchestrator_events_published",
            "Stored events published through this process, by type",
            "type",
            registry=r,
        )
        self.delivered = HotCounter(
            "orchestrator_events_delivered",
            "Events written to a client connection, by transport",
            "transport",
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
        self.sessions = Gauge(
            "orchestrator_sessions",
            "Sessions in this process, by state: subscribed (an open stream here), running "
            "(a workflow runs here), live (either; what max_sessions limits)",
            ["state"],
            registry=r,
        )
        self.refusals = Counter(
            "orchestrator_refusals",
            "Requests and streams refused by a limit or by access control, by reason",
            ["reason"],
            registry=r,
        )
        self.agent_duration = Histogram(
            "orchestrator_agent_duration_seconds",
            "Agent calls, by agent and outcome (success, timeout, failed, interrupted)",
            ["agent", "outcome"],
            buckets=_AGENT_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "orchestrator_delivery_latency_seconds",
            f"From a stored event reaching this process to its write to a client, by "
            f"transport; live events only, every {LATENCY_SAMPLE_EVERY}th event of a session: "
            f"once for all the subscribers written by the fan-out (its last write), and at "
            f"each subscriber it was queued for",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for transport in ("websocket", "sse"):
            self.connections.labels(transport=transport)
            self.delivered.labels(transport=transport)
            self.delivery_latency.labels(transport=transport)
        for reason in ("slow_consumer", "shutdown"):
            self.closed_by_server.labels(reason=reason)

    def subscriber_closed(self, reason: str) -> None:
        self.closed_by_server.labels(reason=reason).inc()

    def track_sessions(self, **states: Callable[[], int]) -> None:
        """Read each session state's count from a callable when scraped."""
        for state, count in states.items():
            self.sessions.labels(state=state).set_function(count)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def agent_finished(self, agent: str, outcome: str, duration_s: float) -> None:
        self.agent_duration.labels(agent=agent, outcome=outcome).observe(duration_s)

    def latency_sampler(self, transport: str, replayed_up_to: int) -> LatencySampler:
        """For one subscription whose replay ends at ``seq`` ``replayed_up_to``."""
        return LatencySampler(self.delivery_latency.labels(transport=transport), replayed_up_to)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HotCounter(Collector):
    """A labelled counter for the per-delivery hot path: a plain ``int`` per label value.

    ``prometheus_client.Counter.inc`` takes a lock on every call, a noticeable share of
    the cost of one delivery when an event goes to a thousand subscribers. The
    event loop is one thread, so a plain addition is safe; the values are read
    into a counter family only when ``/metrics`` is scraped.
    """

    def __init__(
        self, name: str, documentation: str, label: str, *, registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._children: dict[str, HotCounterChild] = {}
        registry.register(self)

    def labels(self, **labels: str) -> HotCounterChild:
        value = labels[self._label]
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = HotCounterChild()
        return child

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, child in self._children.items():
            family.add_metric([value], child.value)
        yield family


class HotCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LatencySampler:
    """Times the sampled live events of one subscription, right after they are written.

    Replayed events are not timed: they are old on purpose. They are told apart by
    ``seq`` rather than by age, as a broker may build a replayed event afresh on read.
    """

    __slots__ = ("_histogram", "_replayed_up_to")

    def __init__(self, histogram: Histogram, replayed_up_to: int) -> None:
        self._histogram = histogram
        self._replayed_up_to = replayed_up_to

    def sent(self, event: StoredEvent) -> None:
        if event.seq % LATENCY_SAMPLE_EVERY == 1 and event.seq > self._replayed_up_to:
            self._histogram.observe(time.monotonic() - event.created)
