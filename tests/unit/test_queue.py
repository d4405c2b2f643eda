"""The queue on the lock object: first come, first served, and one write per turn.

Under trio's MockClock with the in-memory store (see memstore.py); the same
rules run against the real API server in tests/integration/test_queue.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from kubelock import events
from kubelock.election import Elector
from kubelock.errors import AlreadyDone, WaitTimedOut
from kubelock.locks.base import Observed
from kubelock.locks.queue import TURN_TIMEOUT, ahead_of, entry, queue_key, waiters
from kubelock.locks.record import LeaderElectionRecord, format_micro_time
from kubelock.settings import JITTER_FACTOR

from .memstore import MemoryBackend
from .test_election import TIMING, contender, memory_store


async def test_waiters_take_the_lock_in_the_order_they_came_with_one_write_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    order: list[str] = []

    async def run(name: str) -> None:
        elector = contender(backend, name)
        memory_store(elector).latency = 0.002
        await elector.acquire()
        order.append(name)
        await trio.sleep(0.5)
        await elector.release()

    names = [f"c{index:02d}" for index in range(30)]
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(run, name)
            await trio.sleep(0.01)
    assert order == names
    # c00 creates and releases; each later one joins (a patch), takes and releases:
    # no write is ever refused.
    assert [w.verb for w in backend.patches] == ["patch"] * 29
    assert len(backend.history) == 1 + 29 + 30  # c00's create, 29 takes, 30 releases
    assert waiters(backend.current.raw if backend.current else {}) == []


async def test_the_queue_is_visible_on_the_lock_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    async with trio.open_nursery() as nursery:
        for name in ("b", "c"):
            nursery.start_soon(contender(backend, name, once="v1").acquire)
            await trio.sleep(1)
        assert backend.current is not None
        line = waiters(backend.current.raw)
        assert [(w.identity, w.once) for w in line] == [("b", "v1"), ("c", "v1")]
        assert line[0].since is not None
        assert line[1].since is not None
        assert line[0].since < line[1].since
        assert [w.identity for w in ahead_of(backend.current.raw, "c")] == ["b"]
        nursery.cancel_scope.cancel()


async def test_a_dead_waiter_is_passed_over_after_one_turn_and_its_entry_removed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    # "ghost" joined long ago and died (SIGKILL): its entry stays, nobody acts on it.
    ghost = entry("ghost", datetime(2026, 1, 1, tzinfo=UTC))
    backend._store(a_record(backend), "ghost", {ghost.key: ghost.value()}, verb="patch")
    seen: list[events.Event] = []
    b = contender(backend, "b", seen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(5)
        await a.release()
    # b waited exactly one turn for the ghost, then took the lock and removed it.
    acquired = [event for event in seen if isinstance(event, events.Acquired)]
    assert [event.waited for event in acquired] == [pytest.approx(5 + TURN_TIMEOUT, abs=0.01)]
    assert backend.current is not None
    assert waiters(backend.current.raw) == []


async def test_a_waiter_passed_over_joins_again_at_the_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    seen: list[events.Event] = []
    b = contender(backend, "b", seen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(1)
        nursery.start_soon(contender(backend, "c").acquire)
        await trio.sleep(1)
        # Somebody removes b's entry (as a waiter that passed it over would).
        backend._store(a_record(backend), "admin", {queue_key("b"): None}, verb="patch")
        await trio.sleep(TRIO_SETTLE)
        assert backend.current is not None
        assert [w.identity for w in waiters(backend.current.raw)] == ["c", "b"]
        nursery.cancel_scope.cancel()
    assert any(
        isinstance(event, events.WaitFailed) and "joining the queue again" in event.error
        for event in seen
    )


async def test_a_waiter_with_a_timeout_writes_nothing_and_goes_after_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    b = contender(backend, "b")
    hurried = contender(backend, "hurried")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(0.5)

        async def hurry() -> None:
            with pytest.raises(WaitTimedOut):
                await hurried.acquire(timeout=3)

        nursery.start_soon(hurry)
        await trio.sleep(1)
        await a.release()
        await trio.sleep(1)
        assert b.is_holding  # first in line, though hurried saw the release too
    assert "patch" not in memory_store(hurried).requests
    assert "update" not in memory_store(hurried).requests


async def test_without_patch_a_waiter_waits_outside_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    seen: list[events.Event] = []
    b = contender(backend, "b", seen)
    memory_store(b).patch_forbidden = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(1)
        await a.release()
        await trio.sleep(1)
    assert b.is_holding
    assert any(
        isinstance(event, events.WaitFailed) and "grant patch" in event.error for event in seen
    )


async def test_a_release_that_records_the_key_removes_the_entries_waiting_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a", once="v1")
    await a.acquire()
    others = [contender(backend, name, once="v1") for name in ("b", "c")]
    other_key = contender(backend, "d", once="v2")
    async with trio.open_nursery() as nursery:

        async def wait_done(elector: Elector) -> None:
            with pytest.raises(AlreadyDone):
                await elector.acquire()

        for waiter in others:
            nursery.start_soon(wait_done, waiter)
        nursery.start_soon(other_key.acquire)
        await trio.sleep(1)
        assert backend.current is not None
        assert len(waiters(backend.current.raw)) == 3
        a.work_succeeded()
        await a.release()
        await trio.sleep(1)
        assert other_key.is_holding
        nursery.cancel_scope.cancel()
    assert backend.current is not None
    assert waiters(backend.current.raw) == []
    for waiter in others:
        # Joined once; their entries went with the release, so nothing to take out.
        assert memory_store(waiter).requests.count("patch") == 1


def test_entries_order_by_arrival_then_identity() -> None:
    start = datetime(2026, 11, 30, tzinfo=UTC)
    entries = [
        entry("late", start + timedelta(seconds=2)),
        entry("b", start),
        entry("a", start),
    ]
    obj = {"metadata": {"annotations": {e.key: e.value() for e in entries}}}
    obj["metadata"]["annotations"][queue_key("junk")] = "not json"
    obj["metadata"]["annotations"]["other.example/key"] = '{"id": "x"}'
    assert [w.identity for w in waiters(obj)] == ["a", "b", "late"]
    assert [w.identity for w in ahead_of(obj, "late")] == ["a", "b"]
    assert [w.identity for w in ahead_of(obj, "stranger")] == ["a", "b", "late"]
    assert ahead_of(obj, "a") == []
    assert len(queue_key("x" * 500)) <= len("queue.kubelock.io/") + 63


TRIO_SETTLE = 0.1


def a_record(backend: MemoryBackend) -> LeaderElectionRecord:
    """The record as it stands (a patch leaves it as it is)."""
    assert backend.current is not None
    return backend.current.record


async def test_a_release_outlasts_any_number_of_waiters_joining_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Writes by PUT with the resourceVersion (a Role without patch): every join
    # since the holder read makes its write a 409.
    backend = MemoryBackend(compare="version")
    a = contender(backend, "a")
    await a.acquire()
    store = memory_store(a)
    update = store.update
    joins = 0

    async def update_after_a_join(*args: Any, **kwargs: Any) -> Observed:
        # Each attempt finds one more waiter joined since it read: a 409 every time.
        nonlocal joins
        if joins < 10:
            joins += 1
            late = entry(f"late{joins}", datetime(2026, 11, 30, tzinfo=UTC))
            backend._store(a_record(backend), late.identity, {late.key: late.value()}, "patch")
        return await update(*args, **kwargs)

    store.update = update_after_a_join  # type: ignore[method-assign]
    assert await a.release() is True
    assert backend.current is not None
    assert not backend.current.record.is_held
    assert len(waiters(backend.current.raw)) == 10


async def _after_a_poll_of(elector: Elector) -> None:
    """Return just after ``elector``'s next GET: its following poll is a retry-period away."""
    requests = memory_store(elector).requests
    gets = requests.count("get")
    while requests.count("get") == gets:  # noqa: ASYNC110 (the store's log has nothing to wait on)
        await trio.sleep(0.01)


async def test_a_first_waiter_that_polls_takes_its_turn_before_a_later_one_that_watches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    order: list[str] = []
    polling = contender(backend, "polling")
    memory_store(polling).watch_forbidden = True  # a Role without watch
    watching = contender(backend, "watching")

    async def run(elector: Elector) -> None:
        await elector.acquire()
        order.append(elector.identity)
        await elector.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, polling)
        await trio.sleep(1)
        nursery.start_soon(run, watching)
        await trio.sleep(1)
        assert backend.current is not None
        line = waiters(backend.current.raw)
        assert [w.identity for w in line] == ["polling", "watching"]
        # Refused its watch, the polling waiter rewrote its entry once (a join and a
        # rewrite), keeping its place, to say it hears of its turn up to a poll late.
        assert [w.turn for w in line] == [
            pytest.approx(TIMING.retry_period * (1 + JITTER_FACTOR) + TURN_TIMEOUT),
            TURN_TIMEOUT,
        ]
        assert memory_store(polling).requests.count("patch") == 2
        # Released just after the polling waiter read the lock: it hears of the
        # release only at its next poll, more than one TURN_TIMEOUT later.
        await _after_a_poll_of(polling)
        await a.release()
    assert order == ["polling", "watching"]


def _ghost(name: str, since: datetime, turn: Any) -> tuple[str, str]:
    """The entry of a waiter that joined at ``since`` and died, its ``turn`` as given."""
    value = {"id": name, "since": format_micro_time(since), "turn": turn}
    return queue_key(name), json.dumps(value)


async def _waited_behind(ghosts: dict[str, str]) -> float:
    """How long a watching waiter behind ``ghosts`` waits after the release to take the lock."""
    backend = MemoryBackend()
    a = contender(backend, "a")
    await a.acquire()
    backend._store(a_record(backend), "ghosts", ghosts, verb="patch")
    b = contender(backend, "b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.acquire)
        await trio.sleep(5)
        await a.release()
        released = trio.current_time()
    assert b.is_holding
    assert backend.current is not None
    assert waiters(backend.current.raw) == []  # the ghosts were passed over
    return trio.current_time() - released


async def test_a_dead_waiter_that_polled_is_passed_over_after_its_longer_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    polls_turn = TIMING.retry_period * (1 + JITTER_FACTOR) + TURN_TIMEOUT
    key, value = _ghost("ghost", datetime(2026, 1, 1, tzinfo=UTC), polls_turn)
    waited = await _waited_behind({key: value})
    assert waited == pytest.approx(polls_turn, abs=0.05)


@pytest.mark.parametrize("hostile", ["1e999", -1, "a string", 0, 301, True, None, [1]])
async def test_a_hostile_turn_counts_as_one_turn_timeout(
    autojump_clock: trio.testing.MockClock, hostile: Any
) -> None:
    early = datetime(2026, 1, 1, tzinfo=UTC)
    hostile_key, hostile_value = _ghost("hostile", early, hostile)
    if hostile == "1e999":  # a JSON number beyond a float: inf
        hostile_value = hostile_value.replace('"1e999"', "1e999")
    slow_key, slow_value = _ghost("slow", early + timedelta(seconds=1), 3)
    assert waiters({"metadata": {"annotations": {hostile_key: hostile_value}}})[0].turn is None
    waited = await _waited_behind({hostile_key: hostile_value, slow_key: slow_value})
    assert waited == pytest.approx(TURN_TIMEOUT + 3, abs=0.05)
