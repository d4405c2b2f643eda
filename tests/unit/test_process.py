"""The child under trio, with real processes and real signals.

Tests that need kubelock itself to receive a signal run this file as a small
driver (``python test_process.py [--grace S] [--subreaper] -- COMMAND...``)
in a subprocess, so the signal is real and never reaches pytest.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from kubelock.errors import KubelockError
from kubelock.events import ChildExited, Event
from kubelock.process import CannotRun, Child, SignalInbox, exit_status, run_child
from kubelock.reaper import reap_zombies

PYTHON = sys.executable
#: Generous bound for anything that should take well under a second.
PATIENCE = 30.0


def python(code: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(code)]


# A child that reports SIGTERM and stays (or exits 7 with `exit_on_term`).
SIGNAL_REPORTER = """
    import os, signal, sys, time
    exit_on_term = {exit_on_term}
    def report(signum, frame):
        print("got", signal.Signals(signum).name, flush=True)
        if exit_on_term and signum == signal.SIGTERM:
            sys.exit(7)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(sig, report)
    signal.signal(signal.SIGINT, report)
    print("ready", os.getpid(), os.getpgrp(), flush=True)
    while True:
        time.sleep(0.05)
"""


def signal_reporter(*, exit_on_term: bool) -> list[str]:
    return python(SIGNAL_REPORTER.format(exit_on_term=exit_on_term))


# --- the direct API, in-process --------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 42])
async def test_the_exit_code_is_passed_through(code: int) -> None:
    seen: list[Event] = []
    child = await Child.start(python(f"raise SystemExit({code})"), observer=seen.append)
    assert await child.wait() == code
    assert child.status == code
    [exited] = seen
    assert isinstance(exited, ChildExited)
    assert exited.signal is None


async def test_killed_by_a_signal_is_128_plus_n() -> None:
    seen: list[Event] = []
    child = await Child.start(
        python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), observer=seen.append
    )
    assert await child.wait() == 137
    [exited] = seen
    assert isinstance(exited, ChildExited)
    assert exited.signal == signal.SIGKILL


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(42) == 42
    assert exit_status(-15) == 143


async def test_a_missing_command_is_127() -> None:
    with pytest.raises(CannotRun) as caught:
        await Child.start(["kubelock-test-no-such-command"])
    assert caught.value.exit_code == 127
    assert str(caught.value) == "cannot run 'kubelock-test-no-such-command': not found"
    assert isinstance(caught.value, KubelockError)


async def test_a_file_without_execute_permission_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(CannotRun) as caught:
        await Child.start([str(script)])
    assert caught.value.exit_code == 126
    assert "permission denied" in str(caught.value)


async def test_a_file_that_is_no_program_is_126(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF but not really\x00\x01\x02")
    garbage.chmod(0o755)
    with pytest.raises(CannotRun) as caught:
        await Child.start([str(garbage)])
    assert caught.value.exit_code == 126


async def test_the_child_leads_its_own_group_and_inherits_the_environment() -> None:
    child = await Child.start(
        python(
            "import os; assert os.getpgrp() == os.getpid() != os.getppid()"
            "; assert os.environ['KUBELOCK_TEST'] == 'yes'"
        ),
        {**os.environ, "KUBELOCK_TEST": "yes"},
    )
    assert await child.wait() == 0
    assert child.pid != os.getpgrp()


async def test_a_grandchild_gets_the_groups_signal(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild-got-sigterm"
    grandchild = textwrap.dedent(f"""
        import signal, sys, time
        def stop(signum, frame):
            open({str(marker)!r}, "w").close()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("grandchild ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    program = tmp_path / "grandchild.py"
    program.write_text(grandchild)
    ready = tmp_path / "ready"
    # A shell that waits for its grandchild: it is the group that gets SIGTERM. The
    # shell only leaves once the grandchild has (else, under load, the SIGKILL for
    # what is left in the group when the leader exits could beat the grandchild's
    # handler); were SIGTERM sent to the shell alone, it would wait forever.
    script = f'trap "wait; exit 143" TERM; {PYTHON} {program} > {ready} & wait'
    child = await Child.start(["sh", "-c", script])
    with trio.fail_after(PATIENCE):
        await _until(lambda: ready.exists() and "ready" in ready.read_text())
        assert child.send_signal(signal.SIGTERM)
        assert await child.wait() == 143  # the shell ended on SIGTERM
        assert marker.exists()  # and the grandchild, signalled with it, saw SIGTERM too


async def test_terminate_sigkills_a_child_that_ignores_sigterm_after_the_grace() -> None:
    child = await Child.start(signal_reporter(exit_on_term=False), grace_period=0.3)
    with trio.fail_after(PATIENCE):
        await _wait_until_ready(child)
        status = await child.terminate()
    assert status == 137


async def test_terminate_lets_a_cooperative_child_finish() -> None:
    child = await Child.start(signal_reporter(exit_on_term=True), grace_period=PATIENCE)
    with trio.fail_after(PATIENCE):
        await _wait_until_ready(child)
        status = await child.terminate()
    assert status == 7


async def stubborn_child(deadline: list[float | None]) -> Child:
    """A child that ignores SIGTERM, with an hour's grace and the hard deadline ``deadline[0]``."""
    return await Child.start(
        signal_reporter(exit_on_term=False), grace_period=3600, hard_deadline=lambda: deadline[0]
    )


async def test_a_hard_deadline_earlier_than_the_grace_period_wins() -> None:
    deadline: list[float | None] = [None]
    child = await stubborn_child(deadline)
    with trio.fail_after(PATIENCE):
        await _wait_until_ready(child)
        began = trio.current_time()
        deadline[0] = began + 0.3
        status = await child.terminate()
    took = trio.current_time() - began
    assert status == 137
    assert took >= 0.3  # SIGKILL came at the hard deadline, not before
    assert took < PATIENCE  # and the hour-long grace did not apply


async def test_terminate_after_the_child_exited_returns_its_status() -> None:
    child = await Child.start(python("raise SystemExit(5)"), grace_period=0)
    assert await child.wait() == 5
    assert await child.terminate() == 5
    assert not child.send_signal(signal.SIGTERM)  # reaped: nobody to signal


async def test_cancelling_wait_terminates_the_child_and_propagates() -> None:
    """The lease-loss path: the supervisor cancels the scope around wait()."""
    child = await Child.start(signal_reporter(exit_on_term=False), grace_period=0.3)
    with trio.fail_after(PATIENCE):
        await _wait_until_ready(child)
        with trio.CancelScope() as lease:
            lease.cancel()
            await child.wait()
            pytest.fail("wait() must re-raise the cancellation")
    assert lease.cancelled_caught
    assert child.status == 137  # it ignored SIGTERM, so the grace period ran out


async def test_cancellation_uses_the_current_hard_deadline() -> None:
    deadline: list[float | None] = [None]
    child = await stubborn_child(deadline)
    with trio.fail_after(PATIENCE):
        await _wait_until_ready(child)
        deadline[0] = trio.current_time() + 0.3  # a renewal moved the safety deadline
        with trio.move_on_after(0):
            await child.wait()
    assert child.status == 137


async def test_terminate_kills_what_the_child_left_behind(tmp_path: Path) -> None:
    pid_file = tmp_path / "straggler.pid"
    straggler = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(3600)"
    )
    child = await Child.start(["sh", "-c", f'{PYTHON} -c "{straggler}" & wait'], grace_period=3600)
    with trio.fail_after(PATIENCE):
        await _until(lambda: pid_file.exists() and pid_file.read_text() != "")
        straggler_pid = int(pid_file.read_text())
        assert await child.terminate() == 143
        await _until(lambda: not _is_alive(straggler_pid))


async def test_the_reaper_leaves_our_own_child_alone() -> None:
    child = await Child.start(python("raise SystemExit(9)"))
    with trio.fail_after(PATIENCE):
        await _until(lambda: _is_zombie(child.pid))
    assert child.pid not in reap_zombies()
    assert await child.wait() == 9


async def test_run_child_returns_the_status() -> None:
    assert await run_child(python("raise SystemExit(4)"), reap=False) == 4


async def test_the_inbox_holds_a_signal_from_its_handler_on_and_drops_the_rest_on_leaving() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    with SignalInbox([signal.SIGUSR1, signal.SIGUSR2]) as inbox:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert inbox.take_nowait() == signal.SIGUSR1  # queued by the handler, no checkpoint
        assert inbox.take_nowait() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        with trio.fail_after(PATIENCE):
            assert await inbox.receive() == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGUSR1)  # nobody takes it
    # trio's own receiver would re-raise it here, killing this process.
    assert signal.getsignal(signal.SIGUSR1) == previous


# --- kubelock-like runs in a subprocess, with real signals -------------------------


def test_sigterm_is_forwarded_and_the_childs_status_returned() -> None:
    with Driver(signal_reporter(exit_on_term=True)) as driver:
        ready = driver.expect("ready")
        child_group = int(ready.split()[2])
        assert child_group != driver.process.pid  # the child is in its own group
        driver.signal(signal.SIGHUP)
        driver.expect("got SIGHUP")
        driver.signal(signal.SIGUSR1)
        driver.expect("got SIGUSR1")
        driver.signal(signal.SIGTERM)
        driver.expect("got SIGTERM")
        assert driver.finish() == 7


def test_a_second_sigterm_sends_sigkill() -> None:
    with Driver(signal_reporter(exit_on_term=False), grace=3600) as driver:
        driver.expect("ready")
        driver.signal(signal.SIGTERM)
        driver.expect("got SIGTERM")
        driver.signal(signal.SIGINT)  # SIGINT counts as the second stop request too
        assert driver.finish() == 137


def test_the_grace_period_after_a_forwarded_sigterm_ends_in_sigkill() -> None:
    with Driver(signal_reporter(exit_on_term=False), grace=0.3) as driver:
        driver.expect("ready")
        driver.signal(signal.SIGTERM)
        driver.expect("got SIGTERM")
        assert driver.finish() == 137


def test_sigint_is_forwarded_not_raised() -> None:
    child = python("""
        import signal, sys, time
        signal.signal(signal.SIGINT, lambda *_: sys.exit(11))
        print("ready", flush=True)
        time.sleep(3600)
    """)
    with Driver(child) as driver:
        driver.expect("ready")
        driver.signal(signal.SIGINT)
        assert driver.finish() == 11
        assert "Traceback" not in driver.stderr()


def test_a_missing_command_prints_one_line_and_exits_127() -> None:
    with Driver(["kubelock-test-no-such-command", "--flag"]) as driver:
        assert driver.finish() == 127
        message = "kubelock: cannot run 'kubelock-test-no-such-command': not found\n"
        assert driver.stderr() == message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="subreapers are Linux-only")
def test_a_subreaper_reaps_orphaned_grandchildren() -> None:
    """The child orphans a grandchild; only the reaper can make its zombie disappear."""
    child = python("""
        import os, subprocess, sys, time
        # The middle shell exits at once, so `sleep` is orphaned and reparented to the driver.
        shell = ["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"]
        orphan = int(subprocess.run(shell, capture_output=True, text=True).stdout)
        print("orphan", orphan, flush=True)
        deadline = time.monotonic() + 30
        seen = set()
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{orphan}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except FileNotFoundError:
                print("orphan gone after", " ".join(sorted(seen)), flush=True)
                sys.exit(5)
            seen.add(f"{fields[0]}:{'driver' if int(fields[1]) == os.getppid() else 'other'}")
            time.sleep(0.01)
        print("orphan never reaped", seen, flush=True)
        sys.exit(1)
    """)
    with Driver(child, subreaper=True) as driver:
        driver.expect("orphan")
        gone = driver.expect("orphan gone after")
        assert "Z:driver" in gone or "S:driver" in gone  # it was reparented to the driver
        assert driver.finish() == 5  # and the driver still got its own child's status


# --- helpers ----------------------------------------------------------------------


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (callers bound the wait with ``trio.fail_after``)."""
    while True:
        if condition():
            return
        await trio.sleep(0.02)


async def _wait_until_ready(child: Child) -> None:
    """Until the child has installed its SIGTERM handler (its stdout is not ours to read)."""
    await _until(lambda: bool(_caught_signals(child.pid) & (1 << (signal.SIGTERM - 1))))


def _caught_signals(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return False


class Driver:
    """This file run as a kubelock-like process: run_child() under trio.run()."""

    def __init__(self, argv: list[str], *, grace: float = 3600, subreaper: bool = False) -> None:
        options = ["--grace", str(grace)] + (["--subreaper"] if subreaper else [])
        self.process = subprocess.Popen(
            [PYTHON, __file__, *options, "--", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a signal for the driver never reaches pytest
        )
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self._selector.register(self.process.stdout, selectors.EVENT_READ)
        self._buffer = b""

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._selector.close()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.process.stdout.close()
        self.process.stderr.close()

    def expect(self, prefix: str) -> str:
        """The next stdout line, which must start with ``prefix``."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + PATIENCE
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line starting with {prefix!r}; got {self._buffer!r}"
            if self._selector.select(remaining):
                chunk = os.read(self.process.stdout.fileno(), 4096)
                assert chunk, f"stdout closed waiting for {prefix!r}: {self.stderr()}"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        text = line.decode()
        assert text.startswith(prefix), f"expected {prefix!r}, got {text!r}"
        return text

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)  # the driver only, never the child's group

    def finish(self) -> int:
        return self.process.wait(timeout=PATIENCE)

    def stderr(self) -> str:
        assert self.process.stderr is not None
        if self.process.poll() is None:
            return ""
        return self.process.stderr.read().decode()


def _drive(args: list[str]) -> int:
    """The driver's own main: ``[--grace S] [--subreaper] -- COMMAND...``."""
    from kubelock.reaper import become_subreaper

    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    grace = float(options[options.index("--grace") + 1]) if "--grace" in options else 3600.0
    subreaper = "--subreaper" in options
    if subreaper:
        become_subreaper()
    try:
        return trio.run(partial_run(command, grace, subreaper))
    except KubelockError as error:
        print(f"kubelock: {error}", file=sys.stderr)
        return error.exit_code


def partial_run(command: list[str], grace: float, reap: bool) -> Callable[[], Awaitable[int]]:
    async def main() -> int:
        return await run_child(command, grace_period=grace, reap=reap)

    return main


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1:]))


async def test_what_the_command_left_running_dies_when_it_exits(tmp_path: Path) -> None:
    """`worker & exit 0` must not keep working once the lock is released."""
    pid_file = tmp_path / "worker.pid"
    child = await Child.start(["sh", "-c", f"sleep 3600 & echo $! > {pid_file}; exit 0"])
    with trio.fail_after(PATIENCE):
        assert await child.wait() == 0
        worker_pid = int(pid_file.read_text())
        await _until(lambda: not _is_alive(worker_pid))


def test_a_command_can_read_the_terminal_kubelock_runs_in(tmp_path: Path) -> None:
    """In a terminal's foreground, the command gets the terminal (else SIGTTIN stops it)."""
    script = shutil.which("script")
    assert script is not None, "util-linux's `script` gives this test a terminal"
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            """
            import trio
            from kubelock.process import run_child

            async def main() -> None:
                status = await run_child(["sh", "-c", "read line; echo got $line"], reap=False)
                print("status", status)

            trio.run(main)
            """
        )
    )
    result = subprocess.run(
        [script, "-qec", f"{sys.executable} {driver}", "/dev/null"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "got hello" in result.stdout, result.stdout + result.stderr
    assert "status 0" in result.stdout
