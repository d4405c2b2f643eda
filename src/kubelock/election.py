"""The election: acquire, renew and release one lock, with client-go's semantics.

Safety model, said first (as client-go's package comment does):

* Remote clocks are never trusted. A contender remembers the record it last
  saw and the local monotonic time (``trio.current_time()``) at which it saw
  it change; the lease counts as expired ``leaseDurationSeconds`` after that
  local moment. This tolerates any clock *offset* between machines, not a
  difference in clock *rate*.
* Writes are conditional on the record they were based on (a compare-and-swap
  patch, or a PUT carrying the ``resourceVersion`` read; see
  :mod:`kubelock.locks.lease`). A conflict means somebody else wrote first:
  re-read, never overwrite.
* The holder keeps its own deadline, ``held_until``: the local time at which
  its last *successful* renewal request was **sent**, plus lease-duration.
  Every other contender saw that renewal land after it was sent, so none of
  them can consider the lease expired before ``held_until``. The guarded work
  must be stopped before then; the CLI SIGKILLs its child ahead of it
  (and its watchdog does, should kubelock itself be killed or frozen).
* A renewal counts only if waiters can see it: a write the server skipped
  because it changed nothing (a record in whole seconds renewed twice in one
  second) is sent again with a later renewTime. A lock object deleted while
  held counts as held for a lease from when the deletion was seen; its holder,
  watching, counts the lock as lost at once, with ``held_until`` now.
* Every call is bounded: renewals by the renew deadline, the acquiring write
  (shielded, so a signal cannot leave it half-known) likewise, waiting by the
  ``timeout`` deadline, releases by ``release_timeout``.
* There is no fencing by the API server. ``fencing_token`` (the transition
  count at acquisition, which only grows) lets the guarded work refuse
  writes from an older holder, if the work's own storage can check it.

Waiting is event-driven: a watch on the single lock object wakes a waiter as
soon as the holder releases. Polling every retry-period (with jitter) is the
fallback whenever the watch is down or not allowed. A waiter joins the queue
on the lock object (:mod:`kubelock.locks.queue`), so on a release only the
first in line writes, first come, first served. A waiter outside the queue
(``acquire(timeout=...)``, or a Role without ``patch``) goes after everyone in
it, and when the queue is empty waits a random delay in the published hand-off
window first (:mod:`kubelock.locks.handoff`), so that one waiter writes rather
than all.

With ``once``, the release after successful work also records the KEY on the
lock object (:mod:`kubelock.locks.once`) in the same conditional write, and a
contender that sees its KEY done stops with ``AlreadyDone`` instead of writing.

Time is trio's clock, so ``trio.testing.MockClock`` makes every timing rule
exactly testable. The only I/O is through the :class:`~kubelock.locks.base.LockStore`.

The :class:`Elector` waits, and composes the parts in :mod:`kubelock._election`:
what was last seen of the lock and when it expires (``view``), the watch
(``feed``), the queue and the hand-off window (``pacer``), one acquisition
attempt after another (``attempts``), and, once acquired, holding the lock
(``tenure``) and renewing it (``renewal``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from datetime import datetime

import trio

from ._election.attempts import Attempts
from ._election.feed import Feed
from ._election.pacer import Pacer
from ._election.tenure import FATAL_ERRORS, SAFETY_MARGIN, Held, Tenure
from ._election.view import View
from .errors import (
    AlreadyDone,
    ApiError,
    StatusError,
    Unreachable,
    WaitTimedOut,
)
from .events import (
    Acquired,
    Event,
    Observer,
    WaitFailed,
    Waiting,
)
from .locks.base import LockStore
from .locks.queue import (
    TURN_TIMEOUT,
    ahead_of,
)
from .locks.record import utc_now
from .settings import JITTER_FACTOR, ElectionTiming

__all__ = [
    "FATAL_ERRORS",
    "RELEASE_TIMEOUT",
    "SAFETY_MARGIN",
    "WAITING_REPORT_INTERVAL",
    "Elector",
    "Held",
]

#: How often a waiter repeats "still waiting" for people watching the logs.
WAITING_REPORT_INTERVAL = 30.0
#: The longest a release may take before kubelock leaves the lease to expire.
RELEASE_TIMEOUT = 5.0


def _no_observer(event: Event) -> None:
    pass


class Elector:
    """One contender for one lock.

    Use :meth:`acquire`, then ``async with`` :meth:`holding` around the work
    (it renews, cancels the work on loss, and releases). :attr:`held_until`
    is when others may take over; :attr:`safety_deadline` is when the work
    must be gone.
    """

    def __init__(
        self,
        store: LockStore,
        identity: str,
        timing: ElectionTiming | None = None,
        *,
        observer: Observer | None = None,
        wall_clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        waiting_report_interval: float = WAITING_REPORT_INTERVAL,
        release_timeout: float = RELEASE_TIMEOUT,
        once: str | None = None,
        defer_on_release: bool = True,
        queue: bool = True,
        turn_timeout: float = TURN_TIMEOUT,
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        self.store = store
        self.identity = identity
        self.timing = timing or ElectionTiming()
        self._emit = observer or _no_observer
        self._rng = rng or random.Random()
        self._waiting_report_interval = waiting_report_interval
        self._started = 0.0  # when acquire() was called

        # The parts (see kubelock._election), sharing one view of the lock.
        self._view = View(self.timing.lease_duration)
        self._feed = Feed(store, self.timing, self._view, self._emit, self._rng)
        self._tenure = Tenure(
            store,
            identity,
            self.timing,
            self._view,
            self._feed,
            self._emit,
            wall_clock,
            release_timeout=release_timeout,
            once=once,
        )
        self._pacer = Pacer(
            store,
            identity,
            self._view,
            self._emit,
            wall_clock,
            self._rng,
            once=once,
            release_timeout=release_timeout,
            queue=queue,
            turn_timeout=turn_timeout,
            retry_period=self.timing.retry_period,
            defer_on_release=defer_on_release,
        )
        self._attempts = Attempts(
            store,
            identity,
            self.timing,
            self._view,
            self._tenure,
            self._pacer,
            self._emit,
            release_timeout=release_timeout,
        )

    # -- the tenure's, for callers of the Elector ----------------------------------

    @property
    def once(self) -> str | None:
        """Run once per KEY: a contender that sees it done raises AlreadyDone."""
        return self._tenure.once

    @property
    def is_holding(self) -> bool:
        """True between a successful acquire and release or loss."""
        return self._tenure.is_holding

    @property
    def held_until(self) -> float:
        """The last successful renewal's send time plus lease-duration: others wait until then."""
        return self._tenure.held_until

    @property
    def safety_deadline(self) -> float:
        """When guarded work must be dead: ``held_until`` minus a margin (10% of short leases)."""
        return self._tenure.safety_deadline

    @property
    def fencing_token(self) -> int | None:
        """The transition count at acquisition (``None`` before the first)."""
        return self._tenure.fencing_token

    @property
    def lost_reason(self) -> str | None:
        """Why the lease was lost (``None`` while held, or never lost)."""
        return self._tenure.lost_reason

    @property
    def release_refused(self) -> StatusError | None:
        """Why the API refused the release (RBAC, credentials), if it did."""
        return self._tenure.release_refused

    @property
    def gave_back(self) -> bool:
        """acquire() was stopped just as a write of its took the lock: it released it."""
        return self._attempts.gave_back

    @property
    def left_queue(self) -> bool:
        """This waiter stopped without the lock and took its entry out of the queue."""
        return self._pacer.left_queue

    def held_for(self) -> float:
        return self._tenure.held_for()

    def holding(self) -> contextlib.AbstractAsyncContextManager[Held]:
        """See :meth:`Tenure.holding`: renew around the body, cancel it on loss, release."""
        return self._tenure.holding()

    async def keep_renewing(self, on_lost: Callable[[str], None] | None = None) -> str:
        """See :meth:`Tenure.keep_renewing`: renew until the lease is lost; return why."""
        return await self._tenure.keep_renewing(on_lost)

    def abandon(self, reason: str) -> None:
        """Count the lock as lost without writing anything more to it. Not a checkpoint."""
        self._tenure.abandon(reason)

    def work_succeeded(self) -> None:
        """The guarded work succeeded: the release records the :attr:`once` KEY as done."""
        self._tenure.work_succeeded()

    async def release(self) -> bool:
        """See :meth:`Tenure.release`: give the lock back; True when written."""
        return await self._tenure.release()

    # -- acquire --------------------------------------------------------------

    async def acquire(self, *, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Wait until this contender holds the lock; return the fencing token.

        Cancellation (a signal while waiting) stops waiting at once; a write
        is only ever in flight when the lock looked free or expired.
        ``Forbidden``/``Unauthorized``/``BadRequest`` end the wait with that error (nothing
        retrying could fix); other API errors are reported and retried.

        ``timeout``: give up with :class:`~kubelock.errors.WaitTimedOut` after
        that many seconds, between steps, so no write of ours is cut short
        (``0``: try once). With :attr:`once` set, a record of that KEY being
        done, seen before taking the lock, raises
        :class:`~kubelock.errors.AlreadyDone` instead.
        """
        self._started = trio.current_time()
        give_up_at = math.inf if timeout is None else self._started + max(timeout, 0.0)
        # A waiter with a time limit stays out of the queue, so that giving up
        # leaves nothing written.
        self._pacer.begin(may_join=timeout is None)
        fatal: Exception | None = None
        acquired = False
        self._attempts.won_this_call = False
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._acquire_loop(nursery, give_up_at)
                    acquired = True
                except (*FATAL_ERRORS, WaitTimedOut, AlreadyDone) as error:
                    # Raised outside the nursery, so callers see the error itself.
                    fatal = error
                nursery.cancel_scope.cancel()
            completed = acquired
        except BaseException:
            completed = False  # cancelled (a signal), perhaps just as a write of ours took it
            raise
        finally:
            if not completed:
                await self._attempts.give_back()
        if fatal is not None:
            raise fatal
        assert self.fencing_token is not None
        self._tenure.acquired_at = trio.current_time()
        self._emit(
            Acquired(
                waited=self._tenure.acquired_at - self._started, fencing_token=self.fencing_token
            )
        )
        return self.fencing_token

    async def _acquire_loop(self, nursery: trio.Nursery, give_up_at: float) -> None:
        last_report_holder: str | None = None
        last_report_time = -math.inf
        watching = False
        while True:
            try:
                # Each attempt is bounded by what waiting can afford: the --timeout
                # deadline (a try past it, as timeout 0 asks, gets a renew deadline);
                # without one, each call's own. The acquiring write is shielded and
                # bounded on its own (_acquiring_write).
                now = trio.current_time()
                step_deadline = give_up_at
                if give_up_at <= now:
                    step_deadline = now + self.timing.renew_deadline
                with trio.move_on_at(step_deadline) as step:
                    if await self._attempts.try_once():
                        return
                if step.cancelled_caught:
                    raise Unreachable(
                        f"no answer from the API server about the lock {self.store.describe()} "
                        f"within {step_deadline - now:g}s",
                        verb="get",
                        resource=self.store.kind,
                    )
            except FATAL_ERRORS:
                raise
            except ApiError as error:
                self._emit(WaitFailed(error=str(error)))
                self._give_up_if_due(give_up_at, str(error))
                with trio.move_on_at(give_up_at):
                    await self._feed.sleep_jittered()
                continue
            record = self._view.observed.record if self._view.observed else None
            self._give_up_if_due(give_up_at, self._holder_text())
            now = trio.current_time()
            # Reported while somebody holds it (a free lock is a hand-off under way).
            if (
                record is not None
                and record.is_held
                and (
                    record.holder_identity != last_report_holder
                    or now - last_report_time >= self._waiting_report_interval
                )
            ):
                last_report_holder = record.holder_identity
                last_report_time = now
                ahead = None
                if self._pacer.in_line and self._view.observed is not None:
                    raw = self._view.observed.raw
                    ahead = len(ahead_of(raw, self.identity, record.holder_identity))
                self._emit(
                    Waiting(
                        holder=record.holder_identity,
                        since=record.acquire_time,
                        waited=now - self._started,
                        ahead=ahead,
                    )
                )
            if not watching:
                watching = True
                nursery.start_soon(self._watch)
            await self._wait_for_change_or_expiry(give_up_at)

    def _give_up_if_due(self, give_up_at: float, why: str) -> None:
        now = trio.current_time()
        if now >= give_up_at:
            raise WaitTimedOut(
                f"gave up waiting for the lock {self.store.describe()} after "
                f"{now - self._started:.1f}s: {why}; nothing was written"
            )

    def _holder_text(self) -> str:
        record = self._view.observed.record if self._view.observed else None
        if record is None or not record.is_held:
            return "it was taken by somebody else"
        if record.unreadable:
            return "its record does not parse (held by nobody known)"
        return f"held by {record.holder_identity!r}"

    async def _wait_for_change_or_expiry(self, give_up_at: float = math.inf) -> None:
        """Sleep until the watch reports a change, the lease expires, or the poll is due."""
        poll = self.timing.retry_period * (1 + self._rng.random() * JITTER_FACTOR)
        wake_at = min(trio.current_time() + poll, give_up_at)
        expiry = self._view.expiry()
        if expiry is not None and expiry > trio.current_time():
            wake_at = min(wake_at, expiry)
        if self._pacer.write_at > trio.current_time():
            wake_at = min(wake_at, self._pacer.write_at)
        with trio.move_on_at(wake_at):
            await self._attempts.changed.wait()

    async def _watch(self) -> None:
        """Feed changes of the lock object into the waiting loop (see :class:`Feed`)."""
        await self._feed.follow(self._attempts.saw_change, while_holding=False)
        # Watching is not allowed: this waiter polls, and hears of its turn late. Its
        # entry says so at once (the next attempt rewrites it), so it is not passed over.
        self._pacer.cannot_watch()
        self._attempts.changed.set()
