"""The clock of kubelock's deadlines: CLOCK_BOOTTIME, which goes on while the machine sleeps.

A suspend cannot be made here (it would stop the machine running the tests),
so these tests check what can be: the clock read, its sleeps, and that
kubelock's event loop and its watchdog both run on it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
import trio

from kubelock import supervisor, watchdog
from kubelock.clock import BOOTTIME, MAX_SLEEP, BootClock
from kubelock.settings import Settings


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
def test_on_linux_it_reads_clock_boottime() -> None:
    assert BOOTTIME == time.CLOCK_BOOTTIME


def test_its_time_is_boottime_in_seconds() -> None:
    clock = BootClock()
    before = time.clock_gettime(BOOTTIME)
    now = clock.current_time()
    after = time.clock_gettime(BOOTTIME)
    assert before <= now <= after


def test_it_sleeps_until_the_deadline_but_never_longer_than_max_sleep() -> None:
    clock = BootClock()
    now = clock.current_time()
    assert clock.deadline_to_sleep_time(now - 5) < 0  # overdue: trio does not sleep at all
    assert 0 < clock.deadline_to_sleep_time(now + MAX_SLEEP / 2) <= MAX_SLEEP / 2
    assert clock.deadline_to_sleep_time(now + 3600) == MAX_SLEEP
    assert clock.deadline_to_sleep_time(float("inf")) == MAX_SLEEP


def test_trio_runs_on_it() -> None:
    async def main() -> tuple[float, float, bool]:
        started = trio.current_time()
        with trio.move_on_after(0.05) as scope:
            await trio.sleep_forever()
        return started, trio.current_time(), scope.cancelled_caught

    before = time.clock_gettime(BOOTTIME)
    started, ended, timed_out = trio.run(main, clock=BootClock())
    assert before <= started  # trio's time is BOOTTIME itself, no offset
    assert timed_out
    assert ended - started >= 0.05


def test_the_watchdog_reads_the_same_clock() -> None:
    assert watchdog._CLOCK == BOOTTIME


def test_the_cli_runs_the_election_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    given: dict[str, Any] = {}

    def fake_run(main: object, *args: object, clock: trio.abc.Clock | None = None) -> int:
        given["clock"] = clock
        return 0

    monkeypatch.setattr(trio, "run", fake_run)  # as the supervisor calls it
    supervisor.run(Settings(command=("true",), identity="me"), watchdog=None)  # type: ignore[arg-type]
    assert isinstance(given["clock"], BootClock)
