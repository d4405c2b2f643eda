"""Acquisition attempts: one read, one decision, at most one conditional write each.

An attempt (client-go's ``tryAcquireOrRenew`` while not holding) acts on
what the watch delivered since the last one, or reads the lock; stops with
``AlreadyDone`` when the ``once`` KEY is done; waits while the lease is held
(joining the queue) or while the :class:`~.pacer.Pacer` says so; and
otherwise sends the acquiring write, conditional on the record read. That
write is shielded and bounded: when its answer is lost, a later read that
shows it landed counts as the lock taken since it was sent, and an
``acquire()`` that ends meanwhile gives such a lock back (:meth:`Attempts.give_back`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable

import trio

from ..errors import AlreadyDone, ApiError, Conflict, NotFound
from ..events import Observer, WaitFailed
from ..locks.base import LockStore, Observed
from ..locks.once import describe_done, find_done
from ..locks.queue import removals, waiters
from ..locks.record import MAX_COUNT, LeaderElectionRecord
from ..settings import JITTER_FACTOR, ElectionTiming
from .pacer import Pacer
from .tenure import Tenure
from .view import DELETED, View


class Attempts:
    """One contender's attempts to take the lock, and the news that prompts them."""

    def __init__(
        self,
        store: LockStore,
        identity: str,
        timing: ElectionTiming,
        view: View,
        tenure: Tenure,
        pacer: Pacer,
        emit: Observer,
        *,
        release_timeout: float,
    ) -> None:
        self.store = store
        self.identity = identity
        self.timing = timing
        self._view = view
        self._tenure = tenure
        self._pacer = pacer
        self._emit = emit
        self._release_timeout = release_timeout
        #: A newer record delivered by the watch, not yet acted upon.
        self.changed = trio.Event()
        # When the watch last delivered anything: while it keeps delivering the
        # holder's renewals, the watched record is fresher than any poll.
        self._last_watch_event = -math.inf
        self._warned_same_identity = False
        # An acquiring write sent, and when, while its answer is not known.
        self._unanswered: tuple[LeaderElectionRecord, float] | None = None
        #: A write of this acquire() call took the lock.
        self.won_this_call = False
        #: acquire() was stopped just as a write of its took the lock: it released it.
        self.gave_back = False

    def saw_change(self, change: Observed | None) -> None:
        """What the watch delivered: the next attempt acts on it (see :class:`Feed`)."""
        if change is None:
            self._view.saw_deleted()
        else:
            self._view.observe(change)
        self._last_watch_event = trio.current_time()
        self.changed.set()

    async def try_once(self) -> bool:
        """One acquisition attempt (client-go's ``tryAcquireOrRenew`` while not holding).

        True when this contender now holds the lock; False when it is held by
        somebody else, or somebody else's write won.
        """
        # A change delivered by the watch saves a GET: act on it directly. So does a
        # watch that delivered within a poll interval (the holder's renewals): the
        # poll only runs when the watch has gone quiet, or is down.
        watch_is_fresh = self.changed.is_set() or (
            trio.current_time() - self._last_watch_event
            <= self.timing.retry_period * (1 + JITTER_FACTOR)
        )
        # Cleared before reading: a change the watch delivers while the GET is in
        # flight sets it again, so no wake-up is lost.
        self.changed = trio.Event()
        known = self._view.observed
        if watch_is_fresh and known is not None and known.resource_version != DELETED:
            current: Observed | None = known
        else:
            current = await self.store.get()

        if current is None:
            self._view.saw_deleted()
            expiry = self._view.expiry()
            if expiry is not None and trio.current_time() < expiry:
                return False  # deleted while held: held for a lease from when that was seen
            self._view.observed = None
            sent = trio.current_time()
            # The fencing token only grows: seen before its deletion, the lock
            # goes on from its last count (a contender that never saw it cannot).
            seen = self._view.most_transitions
            transitions = 0 if seen is None else min(seen + 1, MAX_COUNT)
            first = self._tenure.record(self.identity, transitions=transitions)
            self._unanswered = (first, sent)
            try:
                created = await self._acquiring_write(lambda: self.store.create(first))
            except Conflict:  # AlreadyExists: somebody else was first (or our lost create)
                return False
            if created is None:
                return False  # no answer in time: the next read tells whether it landed
            self._unanswered = None
            self._won(created, sent)
            return True

        current = self._view.observe(current)
        if self._is_our_lost_write(current.record):
            # Our acquiring write landed, though its answer was lost (a dropped
            # connection, a timeout): the lock is ours since that write was sent.
            assert self._unanswered is not None
            self._won(current, self._unanswered[1])
            self._unanswered = None
            self._pacer.in_line = False
            return True
        first_look = self._pacer.first_look()
        if self._tenure.once is not None:
            done = find_done(current.raw, self._tenure.once)
            if done is not None:
                raise AlreadyDone(f"{self._tenure.once!r} is {describe_done(done)}", done)
        old = current.record
        expiry = self._view.expiry()
        if old.is_held and expiry is not None and trio.current_time() < expiry:
            # Held, and not by this process (it holds nothing while acquiring), even
            # when the holder wrote our identity: two processes given the same --id
            # must still exclude each other.
            if old.holder_identity == self.identity and not self._warned_same_identity:
                self._warned_same_identity = True
                self._emit(
                    WaitFailed(
                        error=f"the lock is held under this contender's own identity "
                        f"{self.identity!r} by another process; give each contender its "
                        "own --id (waiting until it releases or its lease expires)"
                    )
                )
            await self._pacer.join(current)
            return False
        if await self._pacer.wait_for_turn(current, expiry):
            return False
        if self._pacer.may_defer(current, first_look):
            if self._pacer.defer(current):
                return False
            # Let the watch hand over anything already received: a winner's write
            # seen now saves a 409.
            await trio.lowlevel.checkpoint()
            if self.changed.is_set():
                return False

        record = self._tenure.record(self.identity, transitions=old.leader_transitions + 1)
        # Our own entry, and those of the waiters we passed over, go in the same write.
        leaving = [
            *self._pacer.passed_over,
            *(w for w in waiters(current.raw) if w.identity == self.identity),
        ]
        sent = trio.current_time()
        self._unanswered = (record, sent)
        try:
            updated = await self._acquiring_write(
                lambda: self.store.update(record, current, annotations=removals(leaving))
            )
        except Conflict:
            # Somebody else wrote first: never overwrite. Their record arrives
            # through the watch (which wakes the loop) or the next poll.
            self._unanswered = None
            return False
        except NotFound:
            self._unanswered = None
            self._view.observed = None
            return False
        if updated is None:
            return False  # no answer in time: the next read tells whether it landed
        self._unanswered = None
        self._won(updated, sent)
        self._pacer.in_line = False
        window = self._pacer.window_to_publish(current)
        if window is not None:
            self._tenure.publish_window = window
        return True

    async def give_back(self) -> None:
        """``acquire()`` ends without handing over the lock: leave the queue, and give
        back a lock that a write of ours took meanwhile (or may have: its answer
        never came). Shielded and bounded, as a release is.
        """
        if not self.won_this_call and self._unanswered is not None:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._release_timeout),
                contextlib.suppress(ApiError),
            ):
                current = await self.store.get()
                if current is not None and self._is_our_lost_write(current.record):
                    self._won(current, self._unanswered[1])
        self._unanswered = None
        if self.won_this_call:
            self.won_this_call = False
            self._tenure.acquired_at = trio.current_time()
            self.gave_back = await self._tenure.release()
            return
        await self._pacer.leave()

    async def _acquiring_write(self, write: Callable[[], Awaitable[Observed]]) -> Observed | None:
        """Send an acquiring write, shielded (a signal must not leave a write of unknown
        fate behind) and bounded by the renew deadline; ``None`` when no answer came.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(self.timing.renew_deadline):
            return await write()
        return None

    def _is_our_lost_write(self, record: LeaderElectionRecord) -> bool:
        """True when ``record`` is the acquiring write of ours whose answer never came."""
        if self._unanswered is None:
            return False
        sent = self._unanswered[0]
        # As stored: Endpoints and ConfigMap records keep whole seconds.
        return record in (sent, LeaderElectionRecord.from_annotation(sent.to_annotation()))

    def _won(self, observed: Observed, sent: float) -> None:
        """An acquiring write landed: we hold the lock, with this fencing token."""
        self.won_this_call = True
        self._tenure.began(observed, sent)
