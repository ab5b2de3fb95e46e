"""Every timing constant of the test suite, in one place.

These are upper bounds for waiting on something that should happen, never
sleeps standing in for synchronisation: a passing test returns as soon as the
awaited thing happens.
"""

EVENT_TIMEOUT = 5.0  # an event published now reaches a subscriber within this
WORKFLOW_TIMEOUT = 60.0  # a whole workflow finishes within this, on a loaded CI machine
HEARTBEAT_INTERVAL = 0.2  # servers under test send heartbeats this often

# Transport, API and end-to-end tests (tests/transports, tests/test_*.py).
POLL_INTERVAL = 0.01  # how often a bounded wait re-checks its condition (counts, gauges)
QUIET_HEARTBEAT_INTERVAL = 3600.0  # a server that never sends an idle heartbeat in a test
CLEANUP_TIMEOUT = 5.0  # a dropped client's subscriber, task and gauge are gone within this
SERVER_START_TIMEOUT = 30.0  # `python -m server` answers /healthz within this (imports included)
SERVER_STOP_TIMEOUT = 10.0  # `python -m server` exits after SIGTERM within this
