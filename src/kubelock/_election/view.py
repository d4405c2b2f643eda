"""What one contender last saw of the lock, and when by its own clock: pure, no I/O.

Remote clocks are never trusted: a lease expires ``leaseDurationSeconds``
after the local monotonic moment (``trio.current_time()``) at which this
contender saw the record *change*. A lock object seen deleted while it was
held counts as held for a lease from when the deletion was seen.
"""

from __future__ import annotations

import math

import trio

from ..locks.base import Observed

#: The resourceVersion of a lock object seen deleted while it was held.
DELETED = "deleted"


def is_older(version: str, than: str) -> bool:
    """True when resourceVersion ``version`` is surely older than ``than``.

    Kubernetes calls resourceVersions opaque; every API server in use (etcd's
    revision) writes them as growing integers, which is all this relies on.
    Anything else compares as not older, so it is taken as new.
    """
    if not (version.isdigit() and than.isdigit()):
        return False
    return int(version) < int(than)


class View:
    """The record last observed, and the local moment it last changed."""

    def __init__(self, lease_duration: float) -> None:
        #: This contender's own lease duration, for records that name none.
        self.lease_duration = lease_duration
        self.observed: Observed | None = None
        #: ``trio.current_time()`` when :attr:`observed` last changed.
        self.changed_at = -math.inf
        #: The greatest transition count (fencing token) seen on the lock object,
        #: kept when it is deleted: a lock created again goes on from there.
        self.most_transitions: int | None = None

    def observe(self, observed: Observed) -> Observed:
        """Remember a record unless a newer one is known; return the newest.

        The expiry clock restarts only when the record changed. A GET's answer
        may be older than what the watch delivered while it was in flight: it
        never replaces the newer record.
        """
        known = self.observed
        if known is not None and is_older(observed.resource_version, known.resource_version):
            return known
        if known is None or observed.record != known.record:
            self.changed_at = trio.current_time()
        self.observed = observed
        self._saw_transitions(observed)
        return observed

    def wrote(self, observed: Observed) -> None:
        """A write of ours landed: it is what we saw, changed now."""
        self.observed = observed
        self.changed_at = trio.current_time()
        self._saw_transitions(observed)

    def _saw_transitions(self, observed: Observed) -> None:
        transitions = observed.record.leader_transitions
        if self.most_transitions is None or transitions > self.most_transitions:
            self.most_transitions = transitions

    def saw_deleted(self) -> None:
        """The lock object is gone. Held when last seen, it counts as held for a lease
        from now: its holder's work may still be running (it stops when it notices).
        """
        known = self.observed
        if known is None or not known.record.is_held:
            self.observed = None
            return
        if known.resource_version == DELETED:
            return  # already counted from when the deletion was first seen
        self.observed = Observed(record=known.record, resource_version=DELETED)
        self.changed_at = trio.current_time()

    def expiry(self) -> float | None:
        """Local time at which the observed lease expires (None when not held by anyone)."""
        if self.observed is None or not self.observed.record.is_held:
            return None
        record = self.observed.record
        # A record that does not parse names no lease: count this contender's own.
        duration = self.lease_duration if record.unreadable else record.lease_duration_seconds
        return self.changed_at + duration
