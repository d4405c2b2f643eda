"""Holding an acquired lock: its deadlines and fencing token, renewing, releasing.

A tenure begins when an acquiring write lands (:meth:`Tenure.began`) and ends
with a release, or with the lease lost. It owns :attr:`Tenure.held_until` (the
local time the last successful renewal was *sent*, plus lease-duration), the
safety deadline before it, the fencing token, the release (which records the
``once`` KEY when the work succeeded) and :meth:`Tenure.holding`, which ties
them and the renewals (:mod:`.renewal`) around the guarded work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import trio

from ..errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    LeaseLost,
    StatusError,
    Unauthorized,
)
from ..events import Lost, Observer, Released
from ..locks.base import LockStore, Observed
from ..locks.handoff import handoff_annotation
from ..locks.once import DoneKey, done_annotation
from ..locks.queue import removals, waiters
from ..locks.record import LeaderElectionRecord
from ..settings import ElectionTiming
from .feed import Feed
from .renewal import Renewal
from .view import View

#: Errors that end waiting at once: retrying cannot fix them.
FATAL_ERRORS = (Forbidden, Unauthorized, BadRequest)
#: How long before ``held_until`` guarded work must be gone at the latest.
SAFETY_MARGIN = 1.0


@dataclasses.dataclass(frozen=True)
class Held:
    """What ``async with elector.holding() as held`` (and ``kubelock.Lock``) give the body."""

    name: str
    namespace: str
    identity: str
    #: The lease's transition count at acquisition: it only grows, so work can
    #: store it and refuse anything carrying an older one.
    fencing_token: int
    _tenure: Tenure = dataclasses.field(repr=False)

    @property
    def lost(self) -> str | None:
        """Why the lock was lost while the body ran (``None`` while it is held)."""
        return self._tenure.lost_reason

    @property
    def held_until(self) -> float:
        """``trio.current_time()`` before which no other contender can take the lock."""
        return self._tenure.held_until

    @property
    def safety_deadline(self) -> float:
        """``trio.current_time()`` by which the guarded work must be gone (see the Elector's)."""
        return self._tenure.safety_deadline


class Tenure:
    """One contender's hold on the lock, from the acquiring write to the release or loss."""

    def __init__(
        self,
        store: LockStore,
        identity: str,
        timing: ElectionTiming,
        view: View,
        feed: Feed,
        emit: Observer,
        wall_clock: Callable[[], datetime],
        *,
        release_timeout: float,
        once: str | None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.timing = timing
        self.view = view
        self._feed = feed
        self._emit = emit
        self._wall_clock = wall_clock
        self._release_timeout = release_timeout
        self.once = once
        self._succeeded = False
        #: When acquire() returned (``None`` while not held, and after the release).
        self.acquired_at: float | None = None
        self.last_renew_sent = -math.inf
        self.held_until = -math.inf
        self.fencing_token: int | None = None
        self.lost_reason: str | None = None
        #: Why the API refused the release (RBAC, credentials), if it did.
        self.release_refused: StatusError | None = None
        #: The hand-off window the release publishes (``None``: leave it as it is).
        self.publish_window: float | None = None

    # -- state ------------------------------------------------------------------

    @property
    def is_holding(self) -> bool:
        """True between a successful acquire and release or loss."""
        return self.acquired_at is not None and self.lost_reason is None

    @property
    def safety_deadline(self) -> float:
        """When guarded work must be dead: ``held_until`` minus a margin (10% of short leases)."""
        return self.held_until - min(SAFETY_MARGIN, self.timing.lease_duration / 10)

    def held_for(self) -> float:
        if self.acquired_at is None:
            return 0.0
        return trio.current_time() - self.acquired_at

    def began(self, observed: Observed, sent: float) -> None:
        """An acquiring write landed: we hold the lock, with this fencing token."""
        self.landed(observed, sent)
        self.fencing_token = observed.record.leader_transitions

    def landed(self, observed: Observed, sent: float) -> None:
        """A write of ours, sent at ``sent``, landed: the safety deadline moves with it."""
        self.view.wrote(observed)
        self.last_renew_sent = sent
        self.held_until = sent + self.timing.lease_duration

    def is_ours(self, record: LeaderElectionRecord) -> bool:
        """True when ``record`` is this process's acquisition (identity and acquire time)."""
        observed = self.view.observed
        acquired = observed.record.acquire_time if observed else None
        return record.holder_identity == self.identity and record.acquire_time == acquired

    def record(
        self,
        holder: str,
        *,
        transitions: int,
        acquired: datetime | None = None,
        renewed: datetime | None = None,
        lease_duration_seconds: int | None = None,
    ) -> LeaderElectionRecord:
        """A record to write now: renewed at ``renewed`` and acquired at ``acquired``
        (default: now)."""
        now = self._wall_clock()
        return LeaderElectionRecord(
            holder_identity=holder,
            lease_duration_seconds=(
                math.ceil(self.timing.lease_duration)
                if lease_duration_seconds is None
                else lease_duration_seconds
            ),
            acquire_time=now if acquired is None else acquired,
            renew_time=now if renewed is None else renewed,
            leader_transitions=transitions,
        )

    # -- holding ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[Held]:
        """Keep the acquired lock renewed while the body runs; release it when the body ends.

        The one way to hold a lock, for the CLI and the Python API alike. The
        renew loop runs in a task beside the body. When the lease is lost, the
        body's cancel scope is cancelled at once (the body's cancellation path
        must stop the work before :attr:`safety_deadline`), :attr:`lost_reason`
        says why, and leaving the block raises :class:`~kubelock.errors.LeaseLost`.
        Whatever ends the body (return, exception, outer cancellation), the
        lock is then released, shielded and bounded (:meth:`release`). An
        exception of the body propagates as itself, not in an ExceptionGroup,
        and wins over the loss.

        A holder that was stopped or starved (SIGSTOP, a debugger, a blocked
        loop) past :attr:`safety_deadline` counts the lock as lost when the
        body ends, and writes nothing more to it. A release the API refuses
        (:attr:`release_refused`) is raised after a body that ended cleanly.
        """
        if not self.is_holding:
            raise RuntimeError("holding() needs the lock to be acquired first")
        assert self.fencing_token is not None
        store = self.store
        held = Held(store.name, store.namespace, self.identity, self.fencing_token, self)
        body_error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:

                def on_lost(reason: str) -> None:
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self.keep_renewing, on_lost)
                try:
                    yield held
                except Exception as error:
                    # Re-raised below, outside the nursery, so callers see their
                    # own exception rather than an ExceptionGroup.
                    body_error = error
                nursery.cancel_scope.cancel()
            if trio.current_time() >= self.safety_deadline:
                # The work outlived the deadline (its watchdog killed it, if it has one).
                self.abandon("kubelock was not running at the lease's safety deadline")
        finally:
            await self.release()
        if body_error is not None:
            raise body_error
        if self.lost_reason is not None:
            raise LeaseLost(f"lost the lock {store.describe()}: {self.lost_reason}")
        if self.release_refused is not None:
            raise self.release_refused

    # -- renew ----------------------------------------------------------------

    async def keep_renewing(self, on_lost: Callable[[str], None] | None = None) -> str:
        """Renew every retry-period until the lease is lost; return why it was lost.

        Runs forever while renewals succeed: cancel it to stop (a renewal in
        flight finishes first, bounded by the renew deadline). The lease is
        lost when no renewal succeeded within renew-deadline of the last
        successful one being sent, or when another holder is seen, or the lock
        object deleted (a watch reports both at once; renewals find them too).
        Each request is bounded by the time left before that deadline. ``on_lost``
        runs synchronously the moment loss is decided (:meth:`holding` cancels
        the body's scope there).
        """
        if not self.is_holding:
            raise RuntimeError("keep_renewing() needs the lock to be held")
        return await Renewal(self, self._feed, self._emit, self._wall_clock).run(on_lost)

    # -- giving up ------------------------------------------------------------

    def abandon(self, reason: str) -> None:
        """Count the lock as lost without writing anything more to it. Not a checkpoint."""
        if not self.is_holding:
            return
        self.lost_reason = f"{reason}; others may hold it now, so nothing more is written"
        self._emit(Lost(reason=self.lost_reason, held=self.held_for()))

    # -- release --------------------------------------------------------------

    def work_succeeded(self) -> None:
        """The guarded work succeeded: the release records the :attr:`once` KEY as done."""
        self._succeeded = True

    async def release(self) -> bool:
        """Give the lock back so the next contender starts at once; True when written.

        Shielded from cancellation and bounded by ``release_timeout``: when the API
        cannot be reached, kubelock exits anyway and the lease expires. When the
        API refuses (403, 401, 400), :attr:`release_refused` holds the error.
        Does nothing when the lock is not held (never acquired, or lost), and
        writes nothing once ``held_until`` has passed (a holder that was stopped
        or starved): the lock then counts as lost (:meth:`abandon`), and an
        :attr:`once` KEY is not recorded. After :meth:`work_succeeded`, the same
        conditional write records the :attr:`once` KEY as done.
        """
        if not self.is_holding:
            return False
        if trio.current_time() >= self.held_until:
            self.abandon("kubelock was not running at the lease's deadline")
            return False
        held = self.held_for()
        written = False
        with trio.CancelScope(shield=True), trio.move_on_after(self._release_timeout):
            written = await self._write_release()
        self.acquired_at = None
        done = self.once if self._succeeded else None
        self._emit(Released(held=held, written=written, done=done))
        return written

    async def _write_release(self) -> bool:
        current = self.view.observed
        assert current is not None
        if self.once is not None and self._succeeded:
            # One read for the newest queue: the entries waiting for this KEY go
            # with the release, rather than each waiter writing to leave.
            with contextlib.suppress(ApiError):
                fresh = await self.store.get()
                if fresh is not None and self.is_ours(fresh.record):
                    current = fresh
        # Until it lands or release() gives up: a 409 is usually only a waiter
        # joining the queue (a merge patch of its own annotation) since we read.
        while True:
            # As client-go does: empty holder, and a 1 s duration for old clients
            # that do not treat an empty holder as free.
            record = self.record(
                "", transitions=current.record.leader_transitions, lease_duration_seconds=1
            )
            annotations: dict[str, str | None] = {}
            if self.publish_window is not None:
                annotations.update(handoff_annotation(self.publish_window))
            if self.once is not None and self._succeeded:
                assert self.fencing_token is not None
                at = record.renew_time
                done = DoneKey(self.once, self.identity, at, self.fencing_token)
                annotations.update(done_annotation(current.raw, done))
                # Those waiting for the same KEY have nothing left to wait for.
                annotations.update(removals(w for w in waiters(current.raw) if w.once == self.once))
            try:
                self.view.observed = await self.store.update(
                    record, current, annotations=annotations
                )
                return True
            except Conflict:
                try:
                    fresh = await self.store.get()
                except ApiError:
                    return False
                if fresh is None or not self.is_ours(fresh.record):
                    return False  # not ours any more: nothing to give back
                current = fresh
            except FATAL_ERRORS as error:
                self.release_refused = error
                return False
            except ApiError:
                return False
