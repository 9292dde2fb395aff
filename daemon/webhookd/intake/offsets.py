"""Which offsets of a partition are done, and how far the group's committed offset may advance.

Records of a partition finish out of order (a slow webhook holds one record while later ones complete), but Kafka
stores a single committed position per partition. Only the contiguous prefix of finished records may be committed,
so that a crash replays every record whose deliveries were not all done: at least once, never lost.
"""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Tracks one partition for one assignment; thrown away (and `revoked`) when the partition leaves us."""

    __slots__ = ("_done", "_pending", "_position", "committed", "revoked")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # offsets handed out, ascending, not yet past the commit point
        self._done: set[int] = set()  # finished offsets still behind an unfinished one
        self._position: int | None = None  # one past the highest offset seen
        self.committed: int | None = None  # the last position sent to the broker by us
        self.revoked = False

    def started(self, offset: int) -> None:
        """A record was fetched; its offset may not be committed past until `finished`."""
        self._pending.append(offset)
        self._position = offset + 1

    def finished(self, offset: int) -> None:
        """All of this record's deliveries are done (delivered, durably scheduled, dead-lettered or bad)."""
        if self._pending and self._pending[0] == offset:
            self._pending.popleft()
            # Offsets can have gaps (compaction, transaction markers), so walk the set, not a counter.
            while self._pending and self._pending[0] in self._done:
                self._done.discard(self._pending.popleft())
        else:
            self._done.add(offset)

    @property
    def tracked(self) -> int:
        """Offsets held between the commit point and the newest one read (finished or not)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    def commit_position(self) -> int | None:
        """The offset to commit (Kafka's meaning: the next record to read), or None if nothing was seen."""
        if self._pending:
            return self._pending[0]
        return self._position

    def needs_commit(self) -> bool:
        position = self.commit_position()
        return position is not None and position != self.committed
