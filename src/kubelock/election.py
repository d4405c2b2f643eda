"""The election: acquire, renew and release one lock, with client-go's semantics.

Safety model, said first (as client-go's package comment does):

* Remote clocks are never trusted. A contender remembers the record it last
  saw and the local monotonic time (``trio.current_time()``) at which it saw
  it change; the lease counts as expired ``leaseDurationSeconds`` after that
  local moment. This tolerates any clock *offset* between machines, not a
  difference in clock *rate*.
* Writes carry the ``resourceVersion`` they were based on. A 409 means
  somebody else wrote first: re-read, never overwrite.
* The holder keeps its own deadline, ``held_until``: the local time at which
  its last *successful* renewal request was **sent**, plus lease-duration.
  Every other contender saw that renewal land after it was sent, so none of
  them can consider the lease expired before ``held_until``. The guarded work
  must be stopped before then; the CLI SIGKILLs its child ahead of it.
* There is no fencing by the API server. ``fencing_token`` (the transition
  count at acquisition, which only grows) lets the guarded work refuse
  writes from an older holder, if the work's own storage can check it.

Waiting is event-driven: a watch on the single lock object wakes a waiter as
soon as the holder releases. Polling every retry-period (with jitter) is the
fallback whenever the watch is down or not allowed.

Time is trio's clock, so ``trio.testing.MockClock`` makes every timing rule
exactly testable. The only I/O is through the :class:`~kubelock.locks.base.LockStore`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import aclosing
from datetime import datetime

import trio

from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    StatusError,
    Unauthorized,
)
from .events import (
    Acquired,
    Event,
    Lost,
    Observer,
    Released,
    Renewed,
    RenewFailed,
    WaitFailed,
    Waiting,
)
from .locks.base import LockStore, Observed
from .locks.record import LeaderElectionRecord, utc_now
from .settings import JITTER_FACTOR, ElectionTiming

#: How often a waiter repeats "still waiting" for people watching the logs.
WAITING_REPORT_INTERVAL = 30.0
#: The longest a release may take before kubelock leaves the lease to expire.
RELEASE_TIMEOUT = 5.0
#: Errors that end waiting at once: retrying cannot fix them.
FATAL_ERRORS = (Forbidden, Unauthorized, BadRequest)


def _no_observer(event: Event) -> None:
    pass


class Elector:
    """One contender for one lock.

    Use :meth:`acquire`, then :meth:`keep_renewing` in a task while the work
    runs, then :meth:`release`. :attr:`held_until` is the safety deadline.
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
    ) -> None:
        if not identity:
            raise ValueError("identity must not be empty")
        self.store = store
        self.identity = identity
        self.timing = timing or ElectionTiming()
        self._emit = observer or _no_observer
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._waiting_report_interval = waiting_report_interval
        self._release_timeout = release_timeout

        # What this contender last saw, and when (local monotonic) it last changed.
        self._observed: Observed | None = None
        self._observed_time = -math.inf
        # A newer record delivered by the watch, not yet acted upon.
        self._changed = trio.Event()
        # When the watch last delivered anything: while it keeps delivering the
        # holder's renewals, the watched record is fresher than any poll.
        self._last_watch_event = -math.inf
        self._started = 0.0
        self._acquired_at: float | None = None
        self._last_renew_sent = -math.inf
        self.held_until = -math.inf
        self.fencing_token: int | None = None
        self.lost_reason: str | None = None
        #: Why the API refused the release (RBAC, credentials), if it did.
        self.release_refused: StatusError | None = None
        self._warned_same_identity = False

    # -- public state ---------------------------------------------------------

    @property
    def is_holding(self) -> bool:
        """True between a successful acquire and release or loss."""
        return self._acquired_at is not None and self.lost_reason is None

    @property
    def observed_record(self) -> LeaderElectionRecord | None:
        return self._observed.record if self._observed else None

    def held_for(self) -> float:
        if self._acquired_at is None:
            return 0.0
        return trio.current_time() - self._acquired_at

    # -- acquire --------------------------------------------------------------

    async def acquire(self) -> int:
        """Wait until this contender holds the lock; return the fencing token.

        Cancellation (a signal while waiting) stops waiting at once; a write
        is only ever in flight when the lock looked free or expired.
        ``Forbidden``/``Unauthorized``/``BadRequest`` end the wait with that
        error (nothing retrying could fix); other API errors are reported and
        retried.
        """
        self._started = trio.current_time()
        fatal: ApiError | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._acquire_loop(nursery)
            except FATAL_ERRORS as error:
                # Raised outside the nursery, so callers see the error itself.
                fatal = error
            nursery.cancel_scope.cancel()
        if fatal is not None:
            raise fatal
        assert self.fencing_token is not None
        self._acquired_at = trio.current_time()
        self._emit(
            Acquired(waited=self._acquired_at - self._started, fencing_token=self.fencing_token)
        )
        return self.fencing_token

    async def _acquire_loop(self, nursery: trio.Nursery) -> None:
        last_report_holder: str | None = None
        last_report_time = -math.inf
        watching = False
        while True:
            try:
                if await self._try_acquire_or_renew(use_watched=True):
                    return
            except FATAL_ERRORS:
                raise
            except ApiError as error:
                self._emit(WaitFailed(error=str(error)))
                await self._sleep_jittered()
                continue
            record = self._observed.record if self._observed else None
            now = trio.current_time()
            if record is not None and (
                record.holder_identity != last_report_holder
                or now - last_report_time >= self._waiting_report_interval
            ):
                last_report_holder = record.holder_identity
                last_report_time = now
                self._emit(
                    Waiting(
                        holder=record.holder_identity,
                        since=record.acquire_time,
                        waited=now - self._started,
                    )
                )
            if not watching:
                watching = True
                nursery.start_soon(self._watch)
            await self._wait_for_change_or_expiry()

    async def _wait_for_change_or_expiry(self) -> None:
        """Sleep until the watch reports a change, the lease expires, or the poll is due."""
        poll = self.timing.retry_period * (1 + self._rng.random() * JITTER_FACTOR)
        wake_at = trio.current_time() + poll
        expiry = self._expiry()
        if expiry is not None:
            wake_at = min(wake_at, expiry)
        with trio.move_on_at(wake_at):
            await self._changed.wait()

    def _expiry(self) -> float | None:
        """Local time at which the observed lease expires (None when not held by anyone)."""
        if self._observed is None or not self._observed.record.is_held:
            return None
        return self._observed_time + self._observed.record.lease_duration_seconds

    async def _watch(self) -> None:
        """Feed changes of the lock object into the waiting loop; restart when dropped."""
        backoff = self.timing.retry_period
        quick_closes = 0
        while True:
            observed = self._observed
            version = observed.resource_version if observed else ""
            opened = trio.current_time()
            try:
                async with aclosing(self.store.watch(version)) as changes:
                    async for change in changes:
                        backoff = self.timing.retry_period
                        if change is not None:
                            self._observe(change)
                        self._last_watch_event = trio.current_time()
                        self._changed.set()
            except Gone:
                # Too old to resume: make the loop re-read, then watch from there.
                self._observed = None
                self._changed.set()
            except (Forbidden, Unauthorized) as error:
                # Watching is not allowed (e.g. a Role written for the Go kubelock):
                # polling every retry-period still works, only slower to hand off.
                self._emit(
                    WaitFailed(
                        error=f"{error}; polling every {self.timing.retry_period:g}s instead "
                        "(grant watch for instant hand-off)"
                    )
                )
                return
            except ApiError as error:
                self._emit(WaitFailed(error=f"watch: {error}"))
                await trio.sleep(backoff * (1 + self._rng.random()))
                backoff = min(backoff * 2, 30.0)
                continue
            # The server closed the watch (its timeout, or a restart): reopen it at
            # once, but back off when watches keep closing as soon as they open.
            if trio.current_time() - opened < self.timing.retry_period:
                quick_closes += 1
                if quick_closes > 1:
                    await trio.sleep(backoff * (1 + self._rng.random()))
                    backoff = min(backoff * 2, 30.0)
            else:
                quick_closes = 0

    def _observe(self, observed: Observed) -> None:
        """Remember a record; restart the expiry clock only when the record changed."""
        if self._observed is None or observed.record != self._observed.record:
            self._observed_time = trio.current_time()
        self._observed = observed

    async def _try_acquire_or_renew(self, *, use_watched: bool = False) -> bool:
        """One step of client-go's ``tryAcquireOrRenew``. True when we hold the lock."""
        now_wall = self._wall_clock()
        mine = LeaderElectionRecord(
            holder_identity=self.identity,
            lease_duration_seconds=math.ceil(self.timing.lease_duration),
            acquire_time=now_wall,
            renew_time=now_wall,
            leader_transitions=0,
        )
        # A change delivered by the watch saves a GET: act on it directly. So does a
        # watch that delivered within a poll interval (the holder's renewals): the
        # poll only runs when the watch has gone quiet, or is down.
        watch_is_fresh = self._changed.is_set() or (
            trio.current_time() - self._last_watch_event
            <= self.timing.retry_period * (1 + JITTER_FACTOR)
        )
        if use_watched and watch_is_fresh and self._observed is not None:
            current: Observed | None = self._observed
        else:
            current = await self.store.get()
        self._changed = trio.Event()

        if current is None:
            sent = trio.current_time()
            try:
                created = await self.store.create(mine)
            except Conflict:  # AlreadyExists: somebody else was first
                return False
            self._took(created, sent)
            return True

        self._observe(current)
        old = current.record
        expiry = self._expiry()
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
            return False

        record = LeaderElectionRecord(
            holder_identity=self.identity,
            lease_duration_seconds=mine.lease_duration_seconds,
            acquire_time=now_wall,
            renew_time=now_wall,
            leader_transitions=old.leader_transitions + 1,
        )
        sent = trio.current_time()
        try:
            updated = await self.store.update(record, current)
        except Conflict:
            # Somebody wrote first: forget the stale copy so the next step re-reads.
            self._changed = trio.Event()
            return False
        except NotFound:
            self._observed = None
            return False
        self._took(updated, sent)
        return True

    def _is_ours(self, record: LeaderElectionRecord) -> bool:
        """True when ``record`` is this process's acquisition (identity and acquire time)."""
        acquired = self._observed.record.acquire_time if self._observed else None
        return record.holder_identity == self.identity and record.acquire_time == acquired

    def _took(self, observed: Observed, sent: float) -> None:
        """An acquiring write landed: we hold the lock, with this fencing token."""
        self._wrote(observed, sent)
        self.fencing_token = observed.record.leader_transitions

    def _wrote(self, observed: Observed, sent: float) -> None:
        """A write of ours, sent at ``sent``, landed: the safety deadline moves with it."""
        self._observed = observed
        self._observed_time = trio.current_time()
        self._last_renew_sent = sent
        self.held_until = sent + self.timing.lease_duration

    async def _sleep_jittered(self) -> None:
        await trio.sleep(self.timing.retry_period * (1 + self._rng.random() * JITTER_FACTOR))

    # -- renew ----------------------------------------------------------------

    async def keep_renewing(self, on_lost: Callable[[str], None] | None = None) -> str:
        """Renew every retry-period until the lease is lost; return why it was lost.

        Runs forever while renewals succeed: cancel it to stop. The lease is
        lost when no renewal succeeded within renew-deadline of the last
        successful one being sent, or when another holder is seen. Each
        request is bounded by the time left before that deadline. ``on_lost``
        runs synchronously the moment loss is decided (the supervisor cancels
        the work's scope there).
        """
        if not self.is_holding:
            raise RuntimeError("keep_renewing() needs the lock to be held")
        reason = await self._renew_until_lost()
        self.lost_reason = reason
        self._emit(Lost(reason=reason, held=self.held_for()))
        if on_lost is not None:
            on_lost(reason)
        return reason

    async def _renew_until_lost(self) -> str:
        next_attempt = self._last_renew_sent + self.timing.retry_period
        while True:
            await trio.sleep_until(next_attempt)
            deadline = self._last_renew_sent + self.timing.renew_deadline
            attempt_started = trio.current_time()
            if attempt_started >= deadline:
                return self._deadline_reason()
            outcome: str | None = "timeout"
            with trio.move_on_at(deadline):
                outcome = await self._renew_once()
            if outcome == "renewed":
                self._emit(Renewed(duration=trio.current_time() - attempt_started))
                next_attempt = self._last_renew_sent + self.timing.retry_period
                continue
            if outcome is not None and outcome.startswith("lost:"):
                return outcome.removeprefix("lost:")
            self._emit(
                RenewFailed(
                    error=outcome or "timed out",
                    duration=trio.current_time() - attempt_started,
                )
            )
            if trio.current_time() >= deadline:
                return self._deadline_reason()
            next_attempt = min(trio.current_time() + self.timing.retry_period, deadline)

    def _deadline_reason(self) -> str:
        return f"no renewal succeeded within the renew deadline ({self.timing.renew_deadline:g}s)"

    async def _renew_once(self) -> str:
        """One renewal: ``renewed``, ``lost:<why>``, or the error text of a failed attempt."""
        current = self._observed
        assert current is not None
        while True:
            now_wall = self._wall_clock()
            record = LeaderElectionRecord(
                holder_identity=self.identity,
                lease_duration_seconds=math.ceil(self.timing.lease_duration),
                acquire_time=current.record.acquire_time,
                renew_time=now_wall,
                leader_transitions=current.record.leader_transitions,
            )
            sent = trio.current_time()
            try:
                updated = await self.store.update(record, current)
            except Conflict:
                # Somebody else wrote. Re-read: still ours (labels edited) → retry.
                try:
                    fresh = await self.store.get()
                except ApiError as error:
                    return str(error)
                if fresh is None:
                    return "lost:the lock object was deleted"
                if not self._is_ours(fresh.record):
                    holder = (
                        repr(fresh.record.holder_identity) if fresh.record.is_held else "nobody"
                    )
                    if fresh.record.holder_identity == self.identity:
                        holder = "another process with the same identity"
                    self._observe(fresh)
                    return f"lost:the lock was taken over by {holder}"
                current = fresh
                continue
            except NotFound:
                return "lost:the lock object was deleted"
            except ApiError as error:
                return str(error)
            self._wrote(updated, sent)
            return "renewed"

    # -- giving up ------------------------------------------------------------

    def past_deadline(self) -> bool:
        """True once ``held_until`` has passed: another contender may hold the lock now.

        Renewals stop before then by themselves; this is for a holder that was
        stopped or starved (SIGSTOP, a debugger) and has just resumed.
        """
        return trio.current_time() >= self.held_until

    def abandon(self, reason: str) -> None:
        """Count the lock as lost without writing anything more to it. Not a checkpoint."""
        if not self.is_holding:
            return
        self.lost_reason = reason
        self._emit(Lost(reason=reason, held=self.held_for()))

    # -- release --------------------------------------------------------------

    async def release(self) -> bool:
        """Give the lock back so the next contender starts at once; True when written.

        Shielded from cancellation and bounded by ``release_timeout``: when the API
        cannot be reached, kubelock exits anyway and the lease expires. When the
        API refuses (403, 401, 400), :attr:`release_refused` holds the error.
        Does nothing when the lock is not held (never acquired, or lost), and
        writes nothing once ``held_until`` has passed (see :meth:`past_deadline`):
        the lock is then counted as lost.
        """
        if not self.is_holding:
            return False
        if self.past_deadline():
            self.abandon(
                "kubelock was not running at the lease's deadline (stopped or starved); "
                "others may hold the lock now, so nothing more is written"
            )
            return False
        held = self.held_for()
        written = False
        with trio.CancelScope(shield=True), trio.move_on_after(self._release_timeout):
            written = await self._write_release()
        self._acquired_at = None
        self._emit(Released(held=held, written=written))
        return written

    async def _write_release(self) -> bool:
        current = self._observed
        assert current is not None
        for _ in range(3):
            now_wall = self._wall_clock()
            # As client-go does: empty holder, and a 1 s duration for old clients
            # that do not treat an empty holder as free.
            record = LeaderElectionRecord(
                holder_identity="",
                lease_duration_seconds=1,
                acquire_time=now_wall,
                renew_time=now_wall,
                leader_transitions=current.record.leader_transitions,
            )
            try:
                self._observed = await self.store.update(record, current)
                return True
            except Conflict:
                try:
                    fresh = await self.store.get()
                except ApiError:
                    return False
                if fresh is None or not self._is_ours(fresh.record):
                    return False  # not ours any more: nothing to give back
                current = fresh
            except FATAL_ERRORS as error:
                self.release_refused = error
                return False
            except ApiError:
                return False
        return False
