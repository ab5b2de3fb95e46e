"""How much bulk work one client can cause runs before the event loop gets a turn.

A session may hold a thousand stored events of 256 KiB (``buffer_size`` x
``max_body_size``). Folded into a snapshot or replayed to a new subscriber in one go,
they held the loop for seconds, and every other stream, heartbeat and request waited.
Such loops count the bytes they handle and yield once a MiB has gone by.
"""

from __future__ import annotations

# Bytes handled between two turns of the loop for others: a few milliseconds of work.
BYTES_PER_TURN = 1 << 20


class ByteBudget:
    """Counts the bytes a loop handles; :meth:`spent` says when to yield."""

    __slots__ = ("_left",)

    def __init__(self) -> None:
        self._left = BYTES_PER_TURN

    def spent(self, size: int) -> bool:
        """Take ``size`` bytes; ``True`` (and a fresh budget) once a MiB has gone by:
        ``await asyncio.sleep(0)`` then."""
        self._left -= size
        if self._left > 0:
            return False
        self._left = BYTES_PER_TURN
        return True
