"""Signals in every window of a run: each is forwarded to the command or deliberately ignored.

Real kubelock processes against the real kube-apiserver. Each window is held
open by the test's own means, not by timing: the API server frozen (SIGSTOP)
while kubelock releases; a command that ignores SIGTERM while kubelock stops
it after losing the lock; kubelock's own stderr, a pipe the test keeps full,
blocking it right after it took the lock and before it spawned the command.
Whatever arrives, kubelock exits with the command's status (or the documented
one), never killed by the signal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubelock.errors import EXIT_LEASE_LOST
from kubelock.testing import ControlPlane

from .kubelock_proc import lease, spawn, wait_for

FAST = ["--lease-duration", "15s", "--renew-deadline", "10s", "--retry-period", "2s"]
SHORT = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
#: The number of write(2) in /proc/PID/syscall, by machine.
WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}
F_SETPIPE_SZ = 1031


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: its clients' requests hang meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def reaped(pid: int) -> bool:
    """Gone altogether: not even a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


def holder_of(admin: httpx.Client, namespace: str, name: str) -> str | None:
    record = lease(admin, namespace, name)
    return None if record is None else str(record["spec"].get("holderIdentity"))


def blocked_writing(pid: int, fd: int) -> bool:
    """Whether the process's main thread sits in write(2) on ``fd``."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    return (
        len(fields) > 1
        and fields[0] == str(WRITE_SYSCALL[platform.machine()])
        and int(fields[1], 16) == fd
    )


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_during_the_release_leaves_the_commands_status(
    control_plane: ControlPlane,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    admin: httpx.Client,
    signum: signal.Signals,
) -> None:
    pid_file, go = tmp_path / "pid", tmp_path / "go"
    with (tmp_path / "kubelock.log").open("w") as log:
        process = spawn(
            [
                "--kubeconfig",
                str(kubeconfig),
                "--name",
                "releasing",
                *FAST,
                "sh",
                "-c",
                f"echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; "
                f"while [ ! -e {go} ]; do sleep 0.05; done; exit 3",
            ],
            stderr=log,
        )
    try:
        wait_for(pid_file.exists, what="the command to start")
        command = int(pid_file.read_text())
        with frozen(control_plane.pids["kube-apiserver"]):
            go.touch()
            # Reaped: kubelock is releasing the lock now, its request hanging on the frozen server.
            wait_for(lambda: reaped(command), what="kubelock to reap the command")
            process.send_signal(signum)
        assert process.wait(timeout=60) == 3, (tmp_path / "kubelock.log").read_text()
    finally:
        process.kill()
        process.wait()
    record = lease(admin, namespace, "releasing")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""  # released once the server came back
    assert f"ignoring {signum.name}" in (tmp_path / "kubelock.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_while_the_command_is_stopped_after_a_lost_lease_is_forwarded(
    control_plane: ControlPlane,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    started, terminated, got_usr1 = tmp_path / "started", tmp_path / "terminated", tmp_path / "usr1"
    process = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "stopping",
            *SHORT,
            "sh",
            "-c",
            f"trap 'touch {terminated}' TERM; trap 'touch {got_usr1}' USR1; "
            f"touch {started}; while true; do sleep 0.05; done",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(started.exists, what="the command to start")
        # The API server frozen: no renewal lands, so kubelock loses the lease at its
        # renew deadline and stops the command, which shrugs SIGTERM off: the stopping
        # lasts until SIGKILL at the safety deadline. (A lock taken over through the
        # API would have it SIGKILLed at once: no window to send a signal in.)
        with frozen(control_plane.pids["kube-apiserver"]):
            wait_for(terminated.exists, timeout=60, what="kubelock to stop the command")
            process.send_signal(signum)
            assert process.wait(timeout=60) == EXIT_LEASE_LOST
    finally:
        process.kill()
        process.wait()
    if signum == signal.SIGUSR1:
        assert got_usr1.exists()  # forwarded while the command was being stopped


def test_sigterm_after_the_lock_is_taken_and_before_the_spawn_releases_without_running(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    if platform.machine() not in WRITE_SYSCALL:
        pytest.skip(f"write(2)'s number on {platform.machine()} is not known here")
    holding, done, ran = tmp_path / "holding", tmp_path / "done", tmp_path / "ran"
    holder = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "prespawn",
            "--id",
            "holder",
            "sh",
            "-c",
            f"touch {holding}; while [ ! -e {done} ]; do sleep 0.05; done",
        ]
    )
    read_end, write_end = os.pipe()
    waiter: subprocess.Popen[str] | None = None
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)  # the smallest a pipe gets
        wait_for(holding.exists, what="the holder's command")
        waiter = spawn(
            [
                "--kubeconfig",
                str(kubeconfig),
                "--name",
                "prespawn",
                "--id",
                "waiter",
                "touch",
                str(ran),
            ],
            stderr=write_end,
        )
        os.close(write_end)
        said = b""
        while b"held by 'holder'" not in said:
            chunk = os.read(read_end, 4096)
            assert chunk, said.decode()
            said += chunk
        # Fill the pipe (through a description of its own, so the waiter's stays blocking):
        # the waiter's next log line, the one saying it took the lock, blocks in write(2).
        filler = os.open(f"/proc/self/fd/{read_end}", os.O_WRONLY | os.O_NONBLOCK)
        try:
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(filler, b"-" * 4096)
        finally:
            os.close(filler)
        done.touch()  # the holder's command ends; it releases; the waiter takes the lock
        assert holder.wait(timeout=60) == 0
        wait_for(lambda: holder_of(admin, namespace, "prespawn") == "waiter", what="the take-over")
        wait_for(lambda: blocked_writing(waiter.pid, 2), what="the waiter to block on its log")
        waiter.send_signal(signal.SIGTERM)
        while os.read(read_end, 65536):
            pass  # unblocked; read to the end
        assert waiter.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        os.close(read_end)
        for process in (holder, waiter):
            if process is not None:
                process.kill()
                process.wait()
    assert not ran.exists()  # the command was never started
    record = lease(admin, namespace, "prespawn")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""  # released
