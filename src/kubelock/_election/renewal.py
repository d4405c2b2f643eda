"""Renewing a held lock, and deciding when it is lost.

Two tasks side by side until one of them finds the lease lost: the renew
loop (a renewal every retry-period, each bounded by the renew deadline) and
a watch that sees at once when somebody else wrote the record or the object
was deleted. A renewal counts only if waiters can see it: one the server
skipped as changing nothing is sent again with a later renewTime, and
renewTime only grows, even under a wall clock that steps back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import trio

from ..errors import ApiError, Conflict, NotFound
from ..events import Lost, Observer, Renewed, RenewFailed
from ..locks.base import Observed
from ..locks.record import LeaderElectionRecord
from .feed import Feed
from .view import is_older

if TYPE_CHECKING:
    from .tenure import Tenure


@dataclasses.dataclass(frozen=True)
class _Kept:
    """A renewal landed: the lease is ours for another lease-duration."""


@dataclasses.dataclass(frozen=True)
class _Taken:
    """The lease is lost: somebody else holds the lock, or its object is gone."""

    reason: str


@dataclasses.dataclass(frozen=True)
class _Failed:
    """A renewal attempt failed; the next one may succeed before the renew deadline."""

    error: str


_RenewOutcome = _Kept | _Taken | _Failed


class Renewal:
    """One holder's renew loop and the watch beside it, for one :meth:`Tenure.keep_renewing`."""

    def __init__(
        self,
        tenure: Tenure,
        feed: Feed,
        emit: Observer,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self._tenure = tenure
        self._timing = tenure.timing
        self._feed = feed
        self._emit = emit
        self._wall_clock = wall_clock

    async def run(self, on_lost: Callable[[str], None] | None = None) -> str:
        """Renew every retry-period until the lease is lost; return why (see
        :meth:`Tenure.keep_renewing`)."""
        reason = ""
        async with trio.open_nursery() as nursery:

            async def until_lost(find_loss: Callable[[], Awaitable[str]]) -> None:
                nonlocal reason
                found = await find_loss()
                if not reason:
                    reason = found
                    self._tenure.lost_reason = reason
                    self._emit(Lost(reason=reason, held=self._tenure.held_for()))
                    if on_lost is not None:
                        on_lost(reason)
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_lost, self._renew_until_lost)
            nursery.start_soon(until_lost, self._watch_while_holding)
        return reason

    def _lost_to_others(self, reason: str) -> str:
        """The lock was taken, or its object deleted: others may hold it from now on."""
        self._tenure.held_until = min(self._tenure.held_until, trio.current_time())
        return reason

    def _taken_by(self, record: LeaderElectionRecord) -> str:
        holder = repr(record.holder_identity) if record.is_held else "nobody"
        if record.holder_identity == self._tenure.identity:
            holder = "another process with the same identity"
        elif record.unreadable:
            holder = "a record that does not parse"
        return self._lost_to_others(f"the lock was taken over by {holder}")

    async def _watch_while_holding(self) -> str:
        """Return as soon as a watch shows the lock deleted or written by somebody else.

        Never returns on errors: then the renewals decide.
        """

        def lost_by(change: Observed | None) -> str | None:
            if change is None:
                return self._lost_to_others("the lock object was deleted")
            if not self._tenure.is_ours(change.record):
                known = self._tenure.view.observed
                if known is None or not is_older(change.resource_version, known.resource_version):
                    return self._taken_by(change.record)
            return None

        return await self._feed.follow(lost_by, while_holding=True)

    async def _renew_until_lost(self) -> str:
        next_attempt = self._tenure.last_renew_sent + self._timing.retry_period
        while True:
            await trio.sleep_until(next_attempt)
            deadline = self._tenure.last_renew_sent + self._timing.renew_deadline
            attempt_started = trio.current_time()
            if attempt_started >= deadline:
                return self._deadline_reason()
            outcome: _RenewOutcome = _Failed("timed out")
            # Shielded (and still bounded by the deadline): a renewal cancelled in
            # flight may land all the same, and the release that follows would then
            # test a record that is no longer there and be refused once.
            with trio.CancelScope(deadline=deadline, shield=True):
                outcome = await self._renew_once()
            match outcome:
                case _Kept():
                    self._emit(Renewed(duration=trio.current_time() - attempt_started))
                    next_attempt = self._tenure.last_renew_sent + self._timing.retry_period
                    continue
                case _Taken(reason=reason):
                    return reason
                case _Failed(error=error):
                    self._emit(
                        RenewFailed(error=error, duration=trio.current_time() - attempt_started)
                    )
            if trio.current_time() >= deadline:
                return self._deadline_reason()
            next_attempt = min(trio.current_time() + self._timing.retry_period, deadline)

    def _deadline_reason(self) -> str:
        return f"no renewal succeeded within the renew deadline ({self._timing.renew_deadline:g}s)"

    async def _renew_once(self) -> _RenewOutcome:
        """One renewal: kept, taken from us (the lease is lost), or failed (retry)."""
        current = self._tenure.view.observed
        assert current is not None
        renewed: datetime | None = None  # now, unless the record would not change
        stored = current.record.renew_time
        if stored is not None and self._wall_clock() <= stored:
            # A wall clock that stepped back: renewTime still only grows. A record
            # written again as it was earlier would look unchanged to a waiter that
            # missed the versions between (it judges by content), and its lease
            # would expire too early by that waiter's clock.
            renewed = stored + timedelta(seconds=1)
        while True:
            record = self._tenure.record(
                self._tenure.identity,
                acquired=current.record.acquire_time,
                transitions=current.record.leader_transitions,
                renewed=renewed,
            )
            sent = trio.current_time()
            try:
                updated = await self._tenure.store.update(record, current)
            except Conflict:
                # Somebody else wrote. Re-read: still ours (labels edited) → retry.
                try:
                    fresh = await self._tenure.store.get()
                except ApiError as error:
                    return _Failed(str(error))
                if fresh is None:
                    return _Taken(self._lost_to_others("the lock object was deleted"))
                if not self._tenure.is_ours(fresh.record):
                    self._tenure.view.observe(fresh)
                    return _Taken(self._taken_by(fresh.record))
                current = fresh
                continue
            except NotFound:
                return _Taken(self._lost_to_others("the lock object was deleted"))
            except ApiError as error:
                return _Failed(str(error))
            if updated.record == current.record:
                # Nothing waiters can see changed (a record in whole seconds renewed
                # twice in one second, or a wall clock that stepped back): the server
                # skipped the write, so it is no renewal. Once more, renewed a second
                # after the record's renewTime, so that it changes.
                if renewed is not None or current.record.renew_time is None:
                    return _Failed("the renewal changed nothing in the record")
                renewed = current.record.renew_time + timedelta(seconds=1)
                current = updated
                continue
            self._tenure.landed(updated, sent)
            return _Kept()
