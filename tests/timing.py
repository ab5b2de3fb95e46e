"""Every timing constant of the test suite, in one place.

These are upper bounds for waiting on something that should happen, never
sleeps standing in for synchronisation: a passing test returns as soon as the
awaited thing happens.
"""

EVENT_TIMEOUT = 5.0  # an event published now reaches a subscriber within this
WORKFLOW_TIMEOUT = 60.0  # a whole workflow finishes within this, on a loaded CI machine
HEARTBEAT_INTERVAL = 0.2  # servers under test send heartbeats this often
