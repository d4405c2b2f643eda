"""The election's timing rules, exact under trio's MockClock.

Every test here runs against the in-memory store (a test double); the same
behaviours are tested against the real kube-apiserver in tests/integration.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from kubelock import events
from kubelock.election import Elector
from kubelock.errors import AlreadyDone, BadRequest, Forbidden, LeaseLost, WaitTimedOut
from kubelock.locks.base import Observed
from kubelock.locks.handoff import DEFAULT_WINDOW, SPREAD_FACTOR, next_window
from kubelock.locks.once import DONE_ANNOTATION, DONE_KEEP, done_keys
from kubelock.locks.queue import waiters
from kubelock.locks.record import LeaderElectionRecord
from kubelock.settings import ElectionTiming

from .memstore import MemoryBackend, MemoryLock

TIMING = ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=2)


def memory_store(elector: Elector) -> MemoryLock:
    """The in-memory store a `contender` was made with."""
    store = elector.store
    assert isinstance(store, MemoryLock)
    return store


def contender(
    backend: MemoryBackend,
    identity: str,
    seen: list[events.Event] | None = None,
    *,
    once: str | None = None,
    defer: bool = True,
    queue: bool = True,
) -> Elector:
    """A contender; ``defer=False`` writes the moment a release is seen (no hand-off window),
    for the tests of the watch's exact timing; ``queue=False`` never joins the queue."""
    return Elector(
        MemoryLock(backend, identity),
        identity,
        TIMING,
        observer=seen.append if seen is not None else None,
        rng=random.Random(identity),
        once=once,
        defer_on_release=defer,
        queue=queue,
    )


async def test_first_contender_creates_the_lease(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    token = await a.acquire()
    assert token == 0
    assert backend.current is not None
    assert backend.current.record.holder_identity == "a"
    assert backend.current.record.lease_duration_seconds == 15
    assert a.held_until == pytest.approx(trio.current_time() + 15)


async def test_expiry_exactly_lease_duration_after_last_observed_change(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()  # a then dies: it never renews
    await trio.sleep(1)
    b = contender(backend, "b")
    await b.acquire()
    # b first saw a's record at t=1; it may take over at t=16, not a moment before.
    assert trio.current_time() == pytest.approx(16)
    assert backend.history[-1].by == "b"
    assert backend.history[-1].at == pytest.approx(16)


async def test_a_renewal_seen_by_the_waiter_restarts_its_expiry_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        with trio.move_on_after(7):
            await a.keep_renewing()  # renews at 2, 4, 6
        # a stopped renewing at t=7 (last renewal at t=6): b saw that change at t=6.
    assert trio.current_time() == pytest.approx(6 + 15)
    assert b.is_holding


async def test_takeover_increments_transitions_and_the_fencing_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a, b, c = (contender(backend, name) for name in "abc")
    assert await a.acquire() == 0
    assert await b.acquire() == 1
    await b.release()
    assert await c.acquire() == 2
    assert [w.record.leader_transitions for w in backend.history] == [0, 1, 1, 2]


async def test_release_lets_a_waiter_in_at_once(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b", defer=False)
    acquired_at: list[float] = []

    async def wait_b() -> None:
        await b.acquire()
        acquired_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_b)
        await trio.sleep(5)
        await a.release()
    assert acquired_at == [pytest.approx(5)]
    released = backend.history[-2].record
    assert released.holder_identity == ""
    assert released.lease_duration_seconds == 1


async def test_release_is_seen_through_the_watch_not_the_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b", defer=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(5)
        store = memory_store(b)
        gets_before = store.requests.count("get")
        await a.release()
    # One update, no GET: the watch delivered the released record.
    assert store.requests.count("get") == gets_before
    assert trio.current_time() == pytest.approx(5)


async def test_a_release_watched_during_a_poll_is_not_lost_to_the_older_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The watch delivers the release while a GET is in flight; the GET then answers
    with the record it read before the release. The waiter must act on the newer,
    watched record at once, not wait for its next poll."""
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()  # and a never renews, so b's watch goes quiet and b polls
    b = contender(backend, "b", defer=False)
    store = memory_store(b)
    acquired_at: list[float] = []

    async def wait_b() -> None:
        await b.acquire()
        acquired_at.append(trio.current_time())

    polled = trio.Event()
    read = store.get

    async def slow_get() -> Observed | None:
        polled.set()
        return await read()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_b)
        await trio.sleep(1)  # b read the lock and watches it
        store.get_answer_latency = 1.0
        store.get = slow_get  # type: ignore[method-assign]
        await polled.wait()  # the first poll after the watch went quiet
        poll_started = trio.current_time()
        await trio.sleep(0.5)
        await a.release()  # lands while b's GET is in flight
    # b acts when its GET returns, not at its next poll, a retry-period or more later.
    assert acquired_at == [pytest.approx(poll_started + 1.0)]
    assert backend.history[-1].by == "b"


async def test_without_watch_a_waiter_polls_every_retry_period_with_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    seen: list[events.Event] = []
    b = contender(backend, "b", seen)
    store = memory_store(b)
    store.watch_forbidden = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(5)
        await a.release()
    # b found out at its next poll: within retry-period x (1 + 1.2) of the release.
    assert 5 < trio.current_time() <= 5 + 2 * 2.2
    assert b.is_holding
    # And it said why it polled.
    assert any(isinstance(e, events.WaitFailed) and "polling every 2s" in e.error for e in seen)


async def test_holder_that_cannot_renew_reports_loss_before_anyone_may_take_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    seen: list[events.Event] = []
    a = contender(backend, "a", seen)
    await a.acquire()
    store = memory_store(a)
    lost_at: list[float] = []
    b_acquired_at: list[float] = []
    b = contender(backend, "b")

    async def run_b() -> None:
        await b.acquire()
        b_acquired_at.append(trio.current_time())

    async def partition_a() -> None:
        await trio.sleep(3.5)  # a renewed at t=2
        store.partitioned = True  # from now on a's requests fail at once

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_b)
        nursery.start_soon(partition_a)
        await a.keep_renewing(on_lost=lambda reason: lost_at.append(trio.current_time()))

    assert lost_at == [pytest.approx(2 + 10)]  # last renewal sent at 2, renew deadline 10
    assert a.held_until == pytest.approx(2 + 15)
    assert b_acquired_at[0] >= a.held_until
    assert any(isinstance(e, events.RenewFailed) for e in seen)
    assert isinstance(seen[-1], events.Lost)


async def test_a_hanging_renewal_is_cut_at_the_renew_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    store.hanging = True
    reason = await a.keep_renewing()
    assert trio.current_time() == pytest.approx(10)
    assert "renew deadline" in reason
    assert a.held_until == pytest.approx(15)


@pytest.mark.parametrize("watch", [True, False])
async def test_holder_notices_when_another_identity_takes_the_lease(
    autojump_clock: trio.testing.MockClock, watch: bool
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    memory_store(a).watch_forbidden = not watch
    async with trio.open_nursery() as nursery:

        async def intruder() -> None:
            await trio.sleep(3)
            backend.write(LeaderElectionRecord("intruder", 15, None, None, 1))

        nursery.start_soon(intruder)
        reason = await a.keep_renewing()
    assert "intruder" in reason
    # The holder's watch shows it at once; without a watch, the next renewal after t=3.
    assert trio.current_time() == pytest.approx(3 if watch else 4)
    assert a.held_until == pytest.approx(trio.current_time())  # others may hold it now
    assert not a.is_holding
    assert await a.release() is False  # nothing to give back
    assert backend.history[-1].by == "admin"


async def test_an_edit_that_keeps_the_holder_is_not_a_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    current = backend.current
    assert current is not None
    # e.g. somebody added an annotation: new resourceVersion, the same record
    backend.write(current.record, annotations={"example.com/note": "edited"})
    with trio.move_on_after(30):
        await a.keep_renewing()
    assert a.is_holding
    assert backend.history[-1].by == "a"


async def test_cancelled_while_waiting_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    writes = len(backend.history)
    b = contender(backend, "b")
    with trio.move_on_after(12):
        await b.acquire()
    assert len(backend.history) == writes
    assert not b.is_holding


async def test_forbidden_ends_the_wait_with_the_error_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    b = contender(backend, "b")
    store = memory_store(b)

    async def forbidden() -> None:
        raise Forbidden("no", status_code=403, verb="get", resource="leases")

    store.get = forbidden  # type: ignore[method-assign]
    with pytest.raises(Forbidden):
        await b.acquire()


async def test_an_invalid_request_ends_the_wait_after_one_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    b = contender(backend, "b")
    store = memory_store(b)

    async def invalid(record: LeaderElectionRecord) -> None:
        store.requests.append("create")
        raise BadRequest("invalid", status_code=422, verb="create", resource="leases")

    store.create = invalid  # type: ignore[assignment,method-assign]
    with pytest.raises(BadRequest):
        await b.acquire()
    assert store.requests.count("create") == 1


async def test_a_refused_release_is_kept_for_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    refusal = Forbidden("no update", status_code=403, verb="update", resource="leases")

    async def forbidden(record: LeaderElectionRecord, current: object, **_: object) -> None:
        raise refusal

    store.update = forbidden  # type: ignore[assignment,method-assign]
    assert await a.release() is False
    assert a.release_refused is refusal


async def test_a_holder_resumed_past_its_deadline_writes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[events.Event] = []
    backend = MemoryBackend()
    a = contender(backend, "a", seen)
    await a.acquire()
    writes = len(backend.history)
    autojump_clock.jump(TIMING.lease_duration)  # frozen: no renewal ran meanwhile
    assert trio.current_time() >= a.held_until
    assert await a.release() is False
    assert len(backend.history) == writes
    assert a.lost_reason is not None
    assert any(isinstance(event, events.Lost) for event in seen)
    assert not any(isinstance(event, events.Released) for event in seen)


async def test_a_dropped_watch_is_reopened(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b", defer=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(1)
        backend.drop_watches()
        await trio.sleep(1)
        store = memory_store(b)
        assert store.requests.count("watch") == 2
        await a.release()
    assert trio.current_time() == pytest.approx(2)


async def test_waiting_is_reported_when_the_holder_changes_and_periodically(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    seen: list[events.Event] = []
    b = contender(backend, "b", seen)
    with trio.move_on_after(14):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.acquire)
            nursery.start_soon(a.keep_renewing)
    waiting = [e for e in seen if isinstance(e, events.Waiting)]
    assert [e.holder for e in waiting] == ["a"]
    with trio.move_on_after(40):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.acquire)
            nursery.start_soon(a.keep_renewing)
    assert len([e for e in seen if isinstance(e, events.Waiting)]) >= 3


async def test_many_contenders_never_hold_at_once(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    holding: list[str] = []
    overlaps: list[tuple[str, str]] = []
    order: list[str] = []

    async def run(name: str) -> None:
        elector = contender(backend, name, defer=False)
        await elector.acquire()
        if holding:
            overlaps.append((holding[0], name))
        holding.append(name)
        order.append(name)
        await trio.sleep(3)
        holding.remove(name)
        await elector.release()

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(run, f"c{i}")
    assert overlaps == []
    assert sorted(order) == sorted(f"c{i}" for i in range(10))
    # Every hand-off went through a release, never a lease expiry: 10 holds of 3 s.
    assert trio.current_time() == pytest.approx(30)


async def test_a_waiter_with_a_live_watch_makes_no_requests_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b")
    store = memory_store(b)
    with trio.move_on_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.keep_renewing)
            nursery.start_soon(b.acquire)
    # Ten minutes of waiting: one read, its entry in the queue, one watch, and the
    # renewals arrive through it; when it stops waiting, it takes its entry out.
    assert store.requests == ["get", "patch", "watch", "patch"]
    assert backend.current is not None
    assert waiters(backend.current.raw) == []


async def test_a_quiet_watch_falls_back_to_polling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b")
    store = memory_store(b)
    # The holder renews, but b's watch never hears of it (a silently broken watch).
    backend.deliver_to_watchers = False
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.keep_renewing)
            nursery.start_soon(b.acquire)
    gets = store.requests.count("get")
    assert 60 / (2 * 2.2) <= gets <= 60 / 2 + 1  # one poll every retry-period with jitter
    assert not b.is_holding  # it saw the renewals by polling, so never took over


async def test_two_processes_with_the_same_identity_still_exclude_each_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The original README races three kubelocks all given `--id 1`."""
    backend = MemoryBackend()
    seen: list[events.Event] = []
    first, second = contender(backend, "1"), contender(backend, "1", seen)
    await first.acquire()
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.keep_renewing)
            nursery.start_soon(second.acquire)
    assert not second.is_holding
    assert any(isinstance(e, events.WaitFailed) and "own identity" in e.error for e in seen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(second.acquire)
        await trio.sleep(1)
        await first.release()
    assert second.is_holding
    assert second.fencing_token == 1
    # And a takeover by a twin is noticed as a loss by the one that held it before.
    backend.write(LeaderElectionRecord("1", 15, None, None, 2))
    reason = await second.keep_renewing()
    assert "same identity" in reason


# --- --timeout -------------------------------------------------------------------------


async def test_timeout_gives_up_behind_a_holder_at_the_deadline_writing_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    await contender(backend, "a").acquire()
    b = contender(backend, "b")
    with pytest.raises(WaitTimedOut, match=r"after 5\.0s: held by 'a'; nothing was written"):
        await b.acquire(timeout=5)
    assert trio.current_time() == pytest.approx(5)
    assert [write.by for write in backend.history] == ["a"]


async def test_timeout_zero_tries_once(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    await contender(backend, "a").acquire()
    b = contender(backend, "b")
    with pytest.raises(WaitTimedOut):
        await b.acquire(timeout=0)
    assert trio.current_time() == 0
    store = memory_store(b)
    assert store.requests == ["get"]
    # A free lock is taken by that one try.
    backend.write(LeaderElectionRecord())
    c = contender(backend, "c")
    await c.acquire(timeout=0)
    assert c.is_holding


async def test_timeout_does_not_stop_a_waiter_that_gets_the_lock_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: b.acquire(timeout=10))
        await trio.sleep(3)
        await a.release()
    assert b.is_holding


# --- --once ----------------------------------------------------------------------------


async def test_once_records_the_key_in_the_release_after_success(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.write(LeaderElectionRecord())
    assert backend.current is not None
    backend.current.raw["metadata"] = {"annotations": {"someone.else/note": "kept"}}
    a = contender(backend, "a", once="v1")
    token = await a.acquire()
    a.work_succeeded()
    await a.release()
    assert backend.current is not None
    [done] = done_keys(backend.current.raw)
    assert (done.key, done.by, done.fencing_token) == ("v1", "a", token)
    assert backend.current.raw["metadata"]["annotations"]["someone.else/note"] == "kept"
    assert backend.current.record.holder_identity == ""
    # A later contender with the same KEY writes nothing and does not wait.
    b = contender(backend, "b", once="v1")
    writes = len(backend.history)
    with pytest.raises(AlreadyDone, match=r"'v1' is done by 'a' .*fencing token 1"):
        await b.acquire()
    assert len(backend.history) == writes
    # Another KEY runs, and both KEYs stay recorded.
    c = contender(backend, "c", once="v2")
    await c.acquire()
    c.work_succeeded()
    await c.release()
    assert [done.key for done in done_keys(backend.current.raw)] == ["v1", "v2"]


async def test_a_waiter_learns_the_key_is_done_from_its_watch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", once="v1")
    await a.acquire()
    b = contender(backend, "b", once="v1")
    done_at: list[float] = []

    async def wait_b() -> None:
        with pytest.raises(AlreadyDone):
            await b.acquire()
        done_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_b)
        await trio.sleep(7)
        a.work_succeeded()
        await a.release()
    assert done_at == [pytest.approx(7)]
    assert [write.by for write in backend.history] == ["a", "a"]


async def test_a_failed_run_records_nothing_and_the_next_one_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", once="v2")
    await a.acquire()
    await a.release()  # the work failed: no work_succeeded()
    assert backend.current is not None
    assert done_keys(backend.current.raw) == ()
    b = contender(backend, "b", once="v2")
    await b.acquire()
    assert b.is_holding


async def test_done_keys_are_bounded_newest_kept(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    for version in range(DONE_KEEP + 5):
        elector = contender(backend, f"c{version}", once=f"v{version}")
        await elector.acquire()
        elector.work_succeeded()
        await elector.release()
    assert backend.current is not None
    keys = [done.key for done in done_keys(backend.current.raw)]
    assert keys == [f"v{version}" for version in range(5, DONE_KEEP + 5)]


async def test_an_unreadable_done_annotation_reads_as_nothing_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.write(LeaderElectionRecord())
    assert backend.current is not None
    backend.current.raw["metadata"] = {"annotations": {DONE_ANNOTATION: "{not json"}}
    a = contender(backend, "a", once="v1")
    await a.acquire()
    a.work_succeeded()
    await a.release()
    assert [done.key for done in done_keys(backend.current.raw)] == ["v1"]


# --- the hand-off window: no thundering herd -------------------------------------------


async def test_a_free_lock_at_first_look_is_taken_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.write(LeaderElectionRecord())  # released long ago
    b = contender(backend, "b")
    await b.acquire()
    assert trio.current_time() == 0


async def test_on_a_release_one_waiter_writes_and_the_others_see_it_and_do_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    waiters = [contender(backend, name) for name in ("b", "c", "d", "e")]
    async with trio.open_nursery() as nursery:
        for waiter in waiters:
            nursery.start_soon(waiter.acquire)
        await trio.sleep(5)
        await a.release()
        await trio.sleep(1)
        holders = [waiter for waiter in waiters if waiter.is_holding]
        nursery.cancel_scope.cancel()
    assert len(holders) == 1
    writes = {}
    for waiter in waiters:
        assert isinstance(waiter.store, MemoryLock)
        writes[waiter.identity] = waiter.store.requests.count("update")
    assert writes == {waiter.identity: int(waiter in holders) for waiter in waiters}
    # Within the default window of the release, not at a poll.
    assert backend.history[-1].at - backend.history[-2].at < DEFAULT_WINDOW


async def test_the_window_keeps_writes_near_two_per_turn_where_the_herd_writes_many(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def writes_per_turn(defer: bool) -> float:
        backend = MemoryBackend()
        stores: list[MemoryLock] = []

        async def run(name: str) -> None:
            elector = contender(backend, name, defer=defer, queue=False)
            assert isinstance(elector.store, MemoryLock)
            elector.store.latency = 0.002  # each request takes 2 ms
            stores.append(elector.store)
            await elector.acquire()
            await trio.sleep(0.5)
            await elector.release()

        async with trio.open_nursery() as nursery:
            for index in range(30):
                nursery.start_soon(run, f"c{index}")
                await trio.sleep(0.01)  # arrivals 10 ms apart: one creates, the others wait
        writes = sum(
            store.requests.count("update") + store.requests.count("create") for store in stores
        )
        return writes / 30

    herd = await writes_per_turn(defer=False)
    deferred = await writes_per_turn(defer=True)
    assert herd > 10
    assert deferred < 3


def test_the_published_window_shrinks_for_one_waiter_and_grows_with_many() -> None:
    rng = random.Random(7)
    settled = {}
    for crowd in (1, 10, 100):
        window = DEFAULT_WINDOW
        seen = []
        for _ in range(300):
            delay = min(window * rng.random() for _ in range(crowd))
            window = next_window(window, delay, lateness=0.01)
            seen.append(window)
        settled[crowd] = sorted(seen[100:])[100]  # the median after settling
    assert settled[1] < 0.01  # alone: a delay of a few milliseconds at most
    # With others: about SPREAD_FACTOR x lateness per other waiter (the estimate is
    # biased high by the minimum's skew, e**0.577 = 1.8).
    for crowd in (10, 100):
        expected = SPREAD_FACTOR * 0.01 * (crowd - 1)
        assert expected / 2 < settled[crowd] < expected * 4, (crowd, settled)


async def test_holding_cancels_the_body_at_loss_and_then_raises_lease_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    with pytest.raises(LeaseLost, match="renew deadline"):
        async with a.holding() as held:
            store.partitioned = True
            await trio.sleep(3600)
    # Cancelled when loss was decided (renew deadline 10 s), ahead of the safety
    # deadline (a margin before held_until), and nothing was released.
    assert trio.current_time() == pytest.approx(10)
    assert held.lost is not None
    assert "renew deadline" in held.lost
    assert trio.current_time() < held.safety_deadline < held.held_until
    assert backend.history[-1].record.holder_identity == "a"


async def test_holding_lets_an_error_of_the_body_win_over_the_loss(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    with pytest.raises(ValueError, match="clean-up failed"):
        async with a.holding():
            store.partitioned = True
            try:
                await trio.sleep(3600)
            finally:
                raise ValueError("clean-up failed")
    assert a.lost_reason is not None


async def test_holding_releases_when_the_body_ends(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    async with a.holding() as held:
        await trio.sleep(40)  # renewed all along
    assert held.lost is None
    assert backend.current is not None
    assert backend.current.record.holder_identity == ""
    assert not a.is_holding


async def test_a_renewal_in_flight_when_the_body_ends_lands_before_the_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    # Each renewal is stored at once and answered 0.5 s later.
    store.update_answer_latency = 0.5
    async with a.holding():
        # The body ends while the first renewal (sent at 2 s) awaits its answer.
        await trio.sleep(2.2)
    # The renewal was not cut short: the release tested the record the renewal
    # wrote, and landed at the first try (a renewal, then the release).
    assert [write.record.holder_identity for write in backend.history] == ["a", "a", ""]
    assert store.requests.count("update") == 2
    assert not a.is_holding
