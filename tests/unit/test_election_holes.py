"""The election where the API server's own ways could let two hold at once (issue 22).

Each test runs the election under trio's MockClock against the in-memory store,
made faithful where the hole needs it (a write that changes nothing is skipped;
the annotation locks keep whole seconds). The same holes are tested against the
real kube-apiserver in tests/integration/test_election_holes.py.
"""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from kubelock import events
from kubelock.election import Elector
from kubelock.errors import LeaseLost, WaitTimedOut
from kubelock.locks.base import Observed
from kubelock.settings import ElectionTiming

from .memstore import MemoryBackend, MemoryLock

#: The settings of the issue's model: renewals twice a second.
FAST = ElectionTiming(lease_duration=2, renew_deadline=1, retry_period=0.5)
#: Wall-clock time 0 of the MockClock: a whole second.
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def wall_clock() -> datetime:
    """The wall clock, following trio's (mock) clock."""
    return EPOCH + timedelta(seconds=trio.current_time())


def contender(
    backend: MemoryBackend,
    identity: str,
    timing: ElectionTiming,
    seen: list[events.Event] | None = None,
) -> Elector:
    return Elector(
        MemoryLock(backend, identity),
        identity,
        timing,
        observer=seen.append if seen is not None else None,
        wall_clock=wall_clock,
        rng=random.Random(identity),
    )


def store_of(elector: Elector) -> MemoryLock:
    store = elector.store
    assert isinstance(store, MemoryLock)
    return store


async def test_two_renewals_in_one_second_count_once_on_a_whole_seconds_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Endpoints/ConfigMap: the record keeps whole seconds, so a renewal in the
    # same second as the last writes the same bytes, and the server skips it.
    backend = MemoryBackend(whole_seconds=True)
    a = contender(backend, "a", FAST)
    await a.acquire()
    b = contender(backend, "b", FAST)
    b_acquired_at: list[float] = []
    a_lost_with_held_until: list[float] = []

    async def run_b() -> None:
        await b.acquire()
        b_acquired_at.append(trio.current_time())

    async def partition_a() -> None:
        await trio.sleep(1.65)
        store_of(a).partitioned = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_b)
        nursery.start_soon(partition_a)
        await a.keep_renewing(on_lost=lambda _: a_lost_with_held_until.append(a.held_until))

    # The holder's promise: nobody takes the lock before its held_until.
    assert b_acquired_at[0] >= a_lost_with_held_until[0]
    assert b_acquired_at[0] >= a.held_until


async def test_a_holder_whose_wall_clock_stands_still_keeps_its_renewals_visible(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A wall clock that stepped back (or stands still) writes the same renewTime
    # again: the server skips it, and waiters keep their expiry clock running.
    backend = MemoryBackend()
    timing = ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=2)
    a = Elector(MemoryLock(backend, "a"), "a", timing, wall_clock=lambda: EPOCH)
    await a.acquire()
    b = contender(backend, "b", timing)
    b_acquired_at: list[float] = []

    async def run_b() -> None:
        await b.acquire()
        b_acquired_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_b)
        with trio.move_on_after(40):
            await a.keep_renewing()
        renewing_until = a.held_until
    # a renewed all along (every renewal it counted was a write b saw), so b
    # took over only after a stopped renewing and its lease ran out.
    assert a.lost_reason is None
    assert b_acquired_at[0] >= renewing_until


async def test_a_wall_clock_stepped_back_never_writes_a_record_seen_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Found by the simulator (seed 1079): a holder's clock stepped back, so a
    # renewal wrote renewTime 22 after 23, and the next one 23 again. A waiter
    # that missed the version between saw "23" twice, judged the record
    # unchanged, and took the lock while the holder's deadline still ran.
    backend = MemoryBackend(whole_seconds=True)
    offset = [0.0]

    def stepping_clock() -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time() + offset[0])

    a = Elector(MemoryLock(backend, "a"), "a", FAST, wall_clock=stepping_clock)
    await a.acquire()
    with trio.move_on_after(6):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.keep_renewing)
            await trio.sleep(2.1)
            offset[0] = -1.6  # the clock steps back
    renewals = [write.record.renew_time for write in backend.history]
    assert len(renewals) > 5
    # Every record the holder wrote is new: its renewTime only grows.
    for earlier, later in itertools.pairwise(renewals):
        assert earlier is not None
        assert later is not None
        assert later > earlier


LONG = ElectionTiming(lease_duration=600, renew_deadline=10, retry_period=2)


async def test_a_watch_too_old_to_resume_does_not_restart_the_expiry_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", LONG)
    await a.acquire()  # a then dies: it never renews
    b = contender(backend, "b", LONG)
    acquired_at: list[float] = []

    async def server() -> None:
        # Others write to other objects; the server bookmarks open watches, forgets
        # old versions, and closes each watch at its timeout.
        while True:
            await trio.sleep(100)
            backend.others_wrote(10)
            backend.bookmark()
            backend.compact()
            backend.drop_watches()
            await trio.sleep(50)
            backend.others_wrote(10)
            backend.compact()
            backend.expire_watches()

    with trio.fail_after(1000):  # (mock time) without the fix, b never acquires
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            await b.acquire()
            acquired_at.append(trio.current_time())
            nursery.cancel_scope.cancel()
    # b first saw a's record at t=0 and nothing changed since: a lease later, b holds it.
    assert acquired_at == [pytest.approx(600)]


async def test_a_late_gone_in_the_watch_after_acquiring_leaves_the_holder_renewing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", FAST)
    await a.acquire()
    b = contender(backend, "b", FAST)
    store_b = store_of(b)
    real_update = store_b.update

    async def update_then_gone(*args: Any, **kwargs: Any) -> Observed:
        # b's acquiring write lands, and its watch is refused with 410 Gone
        # in the same moment (the answer to a watch reopened from an old version).
        backend.deliver_to_watchers = False
        updated = await real_update(*args, **kwargs)
        backend.deliver_to_watchers = True
        backend.expire_watches()
        return updated

    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        async with a.holding():
            await trio.sleep(5)  # b watches, waiting
            store_b.update = update_then_gone  # type: ignore[method-assign]
    assert b.is_holding
    async with b.holding() as held:
        await trio.sleep(10)  # renewed all along
    assert held.lost is None


STEADY = ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=2)


@pytest.mark.parametrize("watch", [True, False])
async def test_a_held_lock_deleted_counts_as_held_for_a_lease_and_its_holder_stops_at_once(
    autojump_clock: trio.testing.MockClock, watch: bool
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", STEADY)
    await a.acquire()
    b = contender(backend, "b", STEADY)
    store_of(b).watch_forbidden = not watch  # without a watch, b polls and reads the deletion
    b_acquired_at: list[float] = []
    a_stopped_at: list[float] = []

    async def run_b() -> None:
        await b.acquire()
        b_acquired_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_b)
        with pytest.raises(LeaseLost, match="deleted"):
            async with a.holding():
                try:
                    await trio.sleep(5)
                    backend.delete()  # kubectl delete lease
                    await trio.sleep_forever()
                finally:
                    a_stopped_at.append(trio.current_time())
    # The holder stopped its work the moment the deletion was seen, and may be
    # killed at once (its deadline is now); the waiter, which saw the lock
    # held, waits a whole lease from the deletion before it takes it.
    assert a_stopped_at == [pytest.approx(5)]
    assert a.safety_deadline <= 5
    assert b_acquired_at[0] >= 5 + 15


async def test_an_acquiring_write_whose_answer_was_lost_is_recognised_on_the_next_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", STEADY)
    await a.acquire()
    seen: list[events.Event] = []
    b = contender(backend, "b", STEADY, seen)
    store_of(b).lose_answers = 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        async with a.holding():
            await trio.sleep(5)
    # b's write landed at t=5 though b never heard: the next read shows it is b's.
    assert backend.history[-1].by == "b"
    assert b.is_holding
    assert trio.current_time() < 5 + STEADY.retry_period * 3
    assert not any(isinstance(e, events.WaitFailed) and "own identity" in e.error for e in seen)
    assert b.held_until <= 5 + STEADY.lease_duration


async def test_cancelled_during_the_acquiring_write_gives_the_lock_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", STEADY)
    await a.acquire()
    b = contender(backend, "b", STEADY)
    store_of(b).update_answer_latency = 1.0  # b's write lands at once, its answer comes 1 s later
    async with trio.open_nursery() as nursery:

        async def b_interrupted() -> None:
            with trio.move_on_at(5.5):  # a signal while b's acquiring write is in flight
                await b.acquire()

        nursery.start_soon(b_interrupted)
        async with a.holding():
            await trio.sleep(5)
    # b's write landed at t=5; b stopped without the lock, so it gave the lock back.
    assert [w.by for w in backend.history[-2:]] == ["b", "b"]
    assert backend.current is not None
    assert backend.current.record.holder_identity == ""
    assert not b.is_holding
    # What kubelock then logs.
    assert b.gave_back
    assert not b.left_queue


async def test_a_timeout_bounds_a_first_read_that_never_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    b = contender(backend, "b", STEADY)
    store_of(b).hanging = True  # the API server accepts connections and never answers
    with trio.fail_after(60), pytest.raises(WaitTimedOut, match="nothing was written"):
        await b.acquire(timeout=3)  # (fail_after: mock time, so the old hang fails fast)
    assert trio.current_time() == pytest.approx(3)
    assert backend.history == []


async def test_a_lock_deleted_while_held_is_created_again_with_a_greater_fencing_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    first = contender(backend, "first", STEADY)
    await first.acquire()
    await first.release()
    a = contender(backend, "a", STEADY)
    a_token = await a.acquire()
    assert a_token == 1
    b = contender(backend, "b", STEADY)
    b_tokens: list[int] = []

    async def run_b() -> None:
        b_tokens.append(await b.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_b)
        with pytest.raises(LeaseLost, match="deleted"):
            async with a.holding():
                await trio.sleep(5)
                backend.delete()  # kubectl delete lease
                await trio.sleep_forever()
    # b saw the lock held before it was deleted: the token it creates the lock
    # again with goes on from there, so the guarded resource can still fence a.
    assert b_tokens == [a_token + 1]
