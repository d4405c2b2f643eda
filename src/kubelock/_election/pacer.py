"""The queue and the hand-off window: when a waiter that sees the lock free may write.

Two ways to keep waiters from all writing at once when the lock comes free:

* the queue (:mod:`kubelock.locks.queue`): a waiter adds its entry to the lock
  object (:meth:`Pacer.join`); when the lock is free the first in line writes
  at once, and the waiter ``k`` places back only when the ``k`` ahead have
  had their turns, passing over them (:meth:`Pacer.wait_for_turn`). Each
  entry says how long its turn is: a turn timeout for a waiter that watches,
  plus its longest poll interval for one that may not
  (:meth:`Pacer.cannot_watch`). A waiter that stops without the lock takes
  its entry out (:meth:`Pacer.leave`);
* the hand-off window (:mod:`kubelock.locks.handoff`), for a waiter outside
  the queue when nobody is in line: a random delay in the published window,
  once per version seen free (:meth:`Pacer.defer`).

Either way the answer is "write now", or "wait until :attr:`Pacer.write_at`".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import trio

from ..errors import ApiError, Forbidden, NotFound
from ..events import Observer, WaitFailed
from ..locks.base import LockStore, Observed
from ..locks.handoff import handoff_window, next_window
from ..locks.queue import (
    MAX_TURN,
    Waiter,
    ahead_of,
    entry,
    fits,
    has_entry,
    queue_key,
    turns,
    waiters,
)
from ..settings import JITTER_FACTOR
from .view import View


class Pacer:
    """One waiter's place in the queue, and its delay in the hand-off window."""

    def __init__(
        self,
        store: LockStore,
        identity: str,
        view: View,
        emit: Observer,
        wall_clock: Callable[[], datetime],
        rng: random.Random,
        *,
        once: str | None,
        release_timeout: float,
        queue: bool,
        turn_timeout: float,
        retry_period: float,
        defer_on_release: bool,
    ) -> None:
        self.store = store
        self.identity = identity
        self.once = once
        self._view = view
        self._emit = emit
        self._wall_clock = wall_clock
        self._rng = rng
        self._release_timeout = release_timeout
        # The queue: whether this contender may join it, for this acquire
        # (:meth:`begin`); whether it has an entry; whom it passes over in line.
        self._queue = queue
        self._turn_timeout = turn_timeout
        # Its longest poll interval: a waiter that may not watch hears that late.
        self._longest_poll = retry_period * (1 + JITTER_FACTOR)
        #: The ``turn`` its entry says: a turn timeout while it may watch.
        self.turn = _as_written(turn_timeout)
        self.may_join = False
        self.in_line = False
        self.passed_over: list[Waiter] = []
        #: When this waiter came, by the wall clock: its place in the queue.
        self.arrived = wall_clock()
        #: This waiter stopped without the lock and took its entry out of the queue.
        self.left_queue = False
        # The hand-off window: a waiter that sees the lock come free waits a random
        # delay before writing, once per version seen.
        self._defer_on_release = defer_on_release
        self._looked_before = False
        self._deferred_for: str | None = None
        self._window = 0.0
        self._delay = 0.0
        self._heard_late_by = 0.0
        #: ``trio.current_time()`` before which this waiter holds back its write.
        self.write_at = -math.inf

    def begin(self, *, may_join: bool) -> None:
        """An acquire() starts: it came now, and may join the queue (if any is kept)."""
        # When it came, for its place in the queue (wall clock: all must compare).
        self.arrived = self._wall_clock()
        self.may_join = self._queue and may_join

    def first_look(self) -> bool:
        """True the first time this waiter reads the lock (and only then)."""
        first = not self._looked_before
        self._looked_before = True
        return first

    def may_defer(self, current: Observed, first_look: bool) -> bool:
        """True when the hand-off window applies: not the first look (nobody else may be
        waiting), a lock released rather than expired, and no queue to go by."""
        return (
            self._defer_on_release
            and not first_look
            and not current.record.is_held
            and not self.in_line
            and not self.passed_over
        )

    def window_to_publish(self, taken: Observed) -> float | None:
        """The hand-off window the winner's release publishes, when it waited in one
        for the version ``taken`` was based on (``None``: it did not)."""
        if self._deferred_for != taken.resource_version:
            return None
        return next_window(self._window, self._delay, self._heard_late_by)

    async def join(self, current: Observed) -> None:
        """Add this waiter's entry to the queue, unless it has one (or stays out)."""
        if not self.may_join:
            return
        if has_entry(current.raw, self.identity):
            self.in_line = True
            own = self._own_entry(current.raw)
            if own is not None and own.turn != self.turn:
                # Its turn changed (it found it may not watch): say so, in its place.
                await self._write(dataclasses.replace(own, turn=self.turn))
            return
        if self.in_line:
            # Passed over (it was too slow to take its turn, or an admin removed
            # it): join again, at the back.
            self._emit(
                WaitFailed(
                    error="this waiter's place in the queue was given up; joining the queue again"
                )
            )
        # In line by when it came; once passed over, at the back.
        since = self._wall_clock() if self.in_line else self.arrived
        mine = entry(self.identity, since, self.once, self.turn)
        if not fits(mine):
            # An identity too long for the queue's bounds: nobody would see the entry.
            self.may_join = False
            return
        await self._write(mine)

    def cannot_watch(self) -> None:
        """Watching is not allowed: this waiter polls, so hears of its turn up to its
        longest poll interval late. Its entry says so from the next attempt on."""
        self.turn = _as_written(min(self._turn_timeout + self._longest_poll, MAX_TURN))

    def _own_entry(self, raw: Mapping[str, Any]) -> Waiter | None:
        key = queue_key(self.identity)
        return next((waiter for waiter in waiters(raw) if waiter.key == key), None)

    async def _write(self, mine: Waiter) -> None:
        """Write this waiter's entry (one merge patch, never a conflict)."""
        try:
            joined = await self.store.annotate({mine.key: mine.value()})
        except Forbidden as error:
            # A Role written for the Go kubelock (no patch): wait outside the queue.
            self.may_join = False
            self._emit(
                WaitFailed(
                    error=f"{error}; waiting outside the queue (grant patch on the lock "
                    "for first come, first served)"
                )
            )
            return
        except NotFound:
            self._view.saw_deleted()
            return
        self.in_line = True
        self._view.observe(joined)

    async def wait_for_turn(self, current: Observed, expiry: float | None) -> bool:
        """True while waiters ahead of this one in the queue have the lock's turn.

        The lock is free (released, or its lease expired). The first in line
        writes at once; the waiter ``k`` places back writes when the turns of
        the ``k`` ahead (as their entries say) have passed since the lock was
        seen free, passing over those ahead.
        """
        line = waiters(current.raw)
        if not line:
            self.passed_over = []
            return False
        own = self._own_entry(current.raw)
        if self.may_join and (
            not has_entry(current.raw, self.identity) or (own is not None and own.turn != self.turn)
        ):
            await self.join(current)
            current = self._view.observed or current
        ahead = ahead_of(current.raw, self.identity)
        if not ahead:
            self.passed_over = []
            return False
        free_since = expiry if expiry is not None else self._view.changed_at
        turn = free_since + turns(ahead, self._turn_timeout)
        if trio.current_time() < turn:
            self.write_at = turn
            return True
        self.passed_over = ahead
        return False

    async def leave(self) -> None:
        """Remove this waiter's entry when it stops waiting without the lock.

        Shielded and bounded, as a release is. Nothing to do when it never
        joined, or its entry is gone (a release that recorded its ``once`` KEY
        removes it).
        """
        if not self.in_line:
            return
        self.in_line = False
        known = self._view.observed.raw if self._view.observed is not None else {}
        if known and not has_entry(known, self.identity):
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(self._release_timeout),
            contextlib.suppress(ApiError),
        ):
            await self.store.annotate({queue_key(self.identity): None})
            self.left_queue = True

    def defer(self, current: Observed) -> bool:
        """True while this waiter should hold back its write on a lock that was released.

        An expired lease (its holder died) is taken at once: that is rare, and
        the lease duration already made everyone wait.

        Not asked on the first look (nobody else may be waiting): that one writes
        at once. Each version seen free gets one random delay in the published window.
        """
        if self._deferred_for != current.resource_version:
            self._deferred_for = current.resource_version
            self._window = handoff_window(current.raw)
            self._delay = self._window * self._rng.random()
            self.write_at = trio.current_time() + self._delay
            # How late this waiter heard of the release, by the releaser's clock:
            # a sample of how long news takes to reach the waiters (see next_window).
            self._heard_late_by = 0.0
            if current.record.renew_time is not None:
                heard = (self._wall_clock() - current.record.renew_time).total_seconds()
                self._heard_late_by = min(max(heard, 0.0), 1.0)
        return trio.current_time() < self.write_at


def _as_written(turn: float) -> float | None:
    """``turn`` as others read it from an entry: out of bounds, not said."""
    return turn if 0 < turn <= MAX_TURN else None
