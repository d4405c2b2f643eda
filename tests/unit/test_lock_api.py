"""The Python API around the election, against the in-memory store (test double).

The same API is exercised against the real kube-apiserver in tests/integration.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import trio
import trio.testing

import kubelock
from kubelock.errors import LeaseLost, UsageError

from .memstore import MemoryBackend, MemoryLock


async def test_body_runs_while_held_and_the_lock_is_released_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    async with kubelock.Lock("lock", identity="a", store=MemoryLock(backend, "a")) as held:
        assert held.fencing_token == 0
        assert backend.current is not None
        assert backend.current.record.holder_identity == "a"
        await trio.sleep(20)  # renewals keep it held past the lease duration
    assert backend.current.record.holder_identity == ""


async def test_body_exception_propagates_as_itself_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    with pytest.raises(ValueError, match="boom"):
        async with kubelock.Lock("lock", identity="a", store=MemoryLock(backend, "a")):
            raise ValueError("boom")
    assert backend.current is not None
    assert backend.current.record.holder_identity == ""


async def test_lost_lease_cancels_the_body_and_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    store = MemoryLock(backend, "a")
    reached_end = False
    with pytest.raises(LeaseLost, match="renew deadline") as raised:
        async with kubelock.Lock("lock", identity="a", store=store) as held:
            store.partitioned = True
            await trio.sleep(3600)
            reached_end = True
    assert not reached_end
    assert held.lost is not None
    # The body was cancelled when loss was decided, before anyone could take over.
    assert trio.current_time() == pytest.approx(10)
    assert trio.current_time() < held.held_until
    assert "renew deadline" in str(raised.value)


async def test_outer_cancellation_releases(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    with trio.move_on_after(5):
        async with kubelock.Lock("lock", identity="a", store=MemoryLock(backend, "a")):
            await trio.sleep(3600)
    assert backend.current is not None
    assert backend.current.record.holder_identity == ""


def test_invalid_name_is_a_usage_error() -> None:
    with pytest.raises(kubelock.UsageError, match="invalid lock name"):
        kubelock.Lock("Not_A_Name")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_period": 0}, "retry_period must be greater than zero"),
        ({"lease_duration": 10}, "lease_duration (10s) must be greater than renew_deadline"),
        ({"renew_deadline": 2}, "renew_deadline (2s) must be greater than 1.2 x retry_period"),
    ],
)
def test_timing_errors_name_the_keyword_arguments(options: dict[str, float], message: str) -> None:
    with pytest.raises(kubelock.UsageError) as raised:
        kubelock.Lock("lock", **options)  # type: ignore[arg-type]
    assert message in str(raised.value)
    assert "--" not in str(raised.value)


def test_blocking_hold_runs_the_body_and_releases() -> None:
    backend = MemoryBackend()
    with kubelock.hold("lock", identity="a", store=MemoryLock(backend, "a")) as held:
        assert held.fencing_token == 0
        assert backend.current is not None
        assert backend.current.record.holder_identity == "a"
    assert backend.current.record.holder_identity == ""


def test_blocking_hold_interrupts_blocking_code_when_the_lease_is_lost() -> None:
    """Real time: a 3 s lease, renew deadline 2 s; the partition starts at once."""
    backend = MemoryBackend()
    store = MemoryLock(backend, "a")
    started = time.monotonic()
    body_completed = False
    with (
        pytest.raises(LeaseLost),
        kubelock.hold(
            "lock",
            identity="a",
            store=store,
            lease_duration=3,
            renew_deadline=2,
            retry_period=0.5,
        ),
    ):
        store.partitioned = True
        time.sleep(60)  # a blocking call, interrupted by the signal
        body_completed = True
    assert not body_completed  # LeaseLost was raised inside the body, not at its end
    # Interrupted well before the 60 s sleep ended (generous bound, not a timing claim).
    assert time.monotonic() - started < 30


async def test_once_records_a_completed_body_and_then_raises_already_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    with pytest.raises(ValueError, match="boom"):
        async with kubelock.Lock("lock", identity="a", store=MemoryLock(backend, "a"), once="v1"):
            raise ValueError("boom")  # failed: nothing recorded
    ran = []
    async with kubelock.Lock("lock", identity="b", store=MemoryLock(backend, "b"), once="v1"):
        ran.append("b")
    with pytest.raises(kubelock.AlreadyDone) as done:
        async with kubelock.Lock("lock", identity="c", store=MemoryLock(backend, "c"), once="v1"):
            ran.append("c")
    assert ran == ["b"]
    assert done.value.done.by == "b"


def test_hold_with_once_records_only_a_body_that_completed() -> None:
    backend = MemoryBackend()

    def hold(identity: str) -> Any:
        return kubelock.hold(
            "lock", identity=identity, store=MemoryLock(backend, identity), once="v1"
        )

    with pytest.raises(ValueError, match="boom"), hold("a"):
        raise ValueError("boom")
    with hold("b"):
        pass
    with pytest.raises(kubelock.AlreadyDone), hold("c"):
        pytest.fail("a done KEY must not run again")


async def test_timeout_raises_wait_timed_out(autojump_clock: trio.testing.MockClock) -> None:
    backend = MemoryBackend()
    async with kubelock.Lock("lock", identity="a", store=MemoryLock(backend, "a")):
        with pytest.raises(kubelock.WaitTimedOut):
            async with kubelock.Lock(
                "lock", identity="b", store=MemoryLock(backend, "b"), timeout=3
            ):
                pytest.fail("must not be entered")
        assert trio.current_time() == pytest.approx(3)


def test_lock_names_its_keywords_in_mistakes() -> None:
    with pytest.raises(kubelock.UsageError, match=r"^timeout must not be negative"):
        kubelock.Lock("lock", timeout=-1)
    with pytest.raises(kubelock.UsageError, match=r"^invalid once KEY 'a b'"):
        kubelock.Lock("lock", once="a b")


@pytest.mark.parametrize("lease_duration", [math.inf, math.nan, 2.0**31])
def test_durations_a_lease_cannot_hold_are_refused_up_front(lease_duration: float) -> None:
    with pytest.raises(UsageError):
        kubelock.Lock("x", lease_duration=lease_duration)
