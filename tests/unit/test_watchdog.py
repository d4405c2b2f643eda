"""The watchdog, with real processes: it kills the guarded group when kubelock cannot.

The death of kubelock is real: this file runs as a small driver (``python
test_watchdog.py``) that starts a watchdog, spawns a group with a grandchild,
guards it, prints the PIDs and sleeps; the test SIGKILLs the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from kubelock.testing import process_alive
from kubelock.watchdog import Watchdog

#: Generous bound for anything that should take well under a second.
PATIENCE = 30.0
# A group leader with a grandchild in its group; prints the grandchild's PID.
GROUP = ["sh", "-c", "sleep 300 & echo $!; exec sleep 300"]


def spawn_group() -> tuple[subprocess.Popen[str], int]:
    leader = subprocess.Popen(GROUP, process_group=0, stdout=subprocess.PIPE, text=True)
    assert leader.stdout is not None
    grandchild = int(leader.stdout.readline())
    return leader, grandchild


def wait_dead(*pids: int, timeout: float = PATIENCE) -> float:
    """Seconds until none of ``pids`` is alive; fails after ``timeout``."""
    started = time.monotonic()
    while any(process_alive(pid) for pid in pids):
        assert time.monotonic() - started < timeout, f"still alive after {timeout}s: {pids}"
        time.sleep(0.005)
    return time.monotonic() - started


def test_the_group_dies_at_once_when_kubelock_is_killed() -> None:
    driver = subprocess.Popen(
        [sys.executable, __file__], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert driver.stdout is not None
        leader, grandchild = map(int, driver.stdout.readline().split())
        assert process_alive(leader)
        assert process_alive(grandchild)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        wait_dead(leader, grandchild)
    finally:
        driver.kill()
        for pid in (locals().get("leader"), locals().get("grandchild")):
            if isinstance(pid, int) and process_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_the_group_dies_when_the_deadline_passes_not_before() -> None:
    watchdog = Watchdog.start()
    leader, grandchild = spawn_group()
    try:
        watchdog.set_deadline(trio.current_time() + 0.5)
        watchdog.guard(leader.pid)
        started = time.monotonic()
        took = wait_dead(leader.pid, grandchild)
        assert time.monotonic() - started >= 0.5 - 0.01  # killed at the deadline, not before
        assert took < PATIENCE
        assert leader.wait() == -signal.SIGKILL
    finally:
        leader.kill()
        watchdog.close()


async def test_a_renewal_moves_the_deadline() -> None:
    watchdog = Watchdog.start()
    leader, grandchild = spawn_group()
    try:
        watchdog.set_deadline(trio.current_time() + 0.3)
        watchdog.guard(leader.pid)
        watchdog.set_deadline(trio.current_time() + PATIENCE)  # renewed
        await trio.sleep(0.8)
        assert process_alive(leader.pid)
        assert process_alive(grandchild)
    finally:
        leader.kill()
        os.kill(grandchild, signal.SIGKILL)
        watchdog.close()


def test_a_group_guards_itself_before_its_exec() -> None:
    # No guard() from this side: the child told the watchdog itself, before it ran GROUP.
    watchdog = Watchdog.start()
    leader = subprocess.Popen(
        GROUP,
        process_group=0,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=watchdog.guard_in_child(),
    )
    try:
        assert leader.stdout is not None
        grandchild = int(leader.stdout.readline())
        watchdog.close()  # as when kubelock is killed right after the spawn
        wait_dead(leader.pid, grandchild)
    finally:
        leader.kill()
        leader.wait()


def test_an_unguarded_group_is_left_alone_when_kubelock_exits() -> None:
    watchdog = Watchdog.start()
    leader, grandchild = spawn_group()
    try:
        watchdog.guard(leader.pid)
        watchdog.unguard()
        watchdog.close()  # returns once the watchdog has exited
        assert process_alive(leader.pid)
        assert process_alive(grandchild)
    finally:
        leader.kill()
        os.kill(grandchild, signal.SIGKILL)


def test_a_kubelock_about_to_exit_leaves_the_watchdog_to_end_by_itself() -> None:
    # The CLI closes without reaping (it exits at once, and init adopts the watchdog):
    # the watchdog still ends on its own, cleanly, and still kills a guarded group.
    watchdog = Watchdog.start()
    leader, grandchild = spawn_group()
    try:
        watchdog.guard(leader.pid)
        watchdog.close(reap=False)
        _, status = os.waitpid(watchdog.pid, 0)  # here the test stands in for init
        assert os.waitstatus_to_exitcode(status) == 0
        leader.wait(timeout=PATIENCE)
        wait_dead(grandchild)
    finally:
        leader.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_the_watchdog_survives_signals_to_kubelocks_group() -> None:
    watchdog = Watchdog.start()
    try:
        time.sleep(0.2)  # until it has left kubelock's group and set its handlers
        assert os.getpgid(watchdog.pid) == watchdog.pid
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(watchdog.pid, signum)
        time.sleep(0.2)
        assert process_alive(watchdog.pid)
    finally:
        watchdog.close()
    assert not process_alive(watchdog.pid)


def test_a_watchdog_that_is_gone_is_reported_once_and_never_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watchdog = Watchdog.start()
    os.kill(watchdog.pid, signal.SIGKILL)
    os.waitpid(watchdog.pid, 0)
    with caplog.at_level(logging.ERROR, logger="kubelock"):
        for pgid in range(3):
            watchdog.guard(pgid + 1_000_000)  # EPIPE: nobody reads the pipe any more
    assert len(caplog.records) == 1
    assert "nothing stops the command" in caplog.records[0].getMessage()
    watchdog.close()


def _driver() -> None:
    """kubelock's part, reduced: a watchdog guarding a group, then nothing until killed."""
    watchdog = Watchdog.start()
    leader, grandchild = spawn_group()

    async def guard() -> None:
        watchdog.set_deadline(trio.current_time() + 3600)
        watchdog.guard(leader.pid)

    trio.run(guard)
    print(leader.pid, grandchild, flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    _driver()
