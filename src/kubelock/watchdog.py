"""The watchdog: a tiny process that kills the command's group when kubelock cannot.

kubelock's own event loop stops the command when the lease is lost. Two cases
escape it: kubelock is killed (SIGKILL, the OOM killer, a crash), or kubelock
is frozen (SIGSTOP, a debugger, a stalled loop) past its safety deadline. The
watchdog covers both. It is forked by the CLI before trio starts, so it shares
no thread and no event loop with kubelock, and it does one thing: it reads
short messages from a pipe and waits on it with ``poll(2)``.

* ``guard PGID``: the command's process group, sent by the command itself
  between its fork and its exec (:meth:`Watchdog.guard_in_child`), so no
  instant passes in which the group exists and the watchdog does not know
  it; kubelock sends it again once the spawn returns.
* ``deadline T``: the lease's safety deadline on ``CLOCK_BOOTTIME`` (see
  :mod:`kubelock.clock`: it goes on counting while the machine sleeps), sent
  after the acquisition and after every successful renewal.
* ``unguard``: the command has exited; sent before kubelock reaps it (the
  unreaped leader keeps its group id from being reused until then).

It SIGKILLs the guarded group when the deadline passes, or at once when the
pipe reaches end-of-file while a group is guarded: the kernel closes
kubelock's end of the pipe however kubelock dies. It ignores every signal it
can, lives in its own process group (a signal to kubelock's group does not
reach it), holds no other file open but stderr (where it logs what it did, in
kubelock's log format), and exits when the pipe closes. Writes to it never
block kubelock: the pipe is non-blocking, and a watchdog that is gone is
reported once. ``poll(2)``'s timeout counts monotonic time, which stops
while the machine sleeps, so the watchdog never sleeps longer than
:data:`MAX_SLEEP` at a time while it guards a deadline: after a resume it
kills an overdue group within that long.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import select
import signal
import struct
import time
from collections.abc import Callable

__all__ = ["Watchdog"]

logger = logging.getLogger("kubelock")

#: One message: a kind byte and a 64-bit argument (a PGID, or a deadline in ns).
_MESSAGE = struct.Struct("<cq")
_GUARD, _DEADLINE, _UNGUARD = b"G", b"D", b"U"
#: kubelock.clock.BOOTTIME, spelled out here: importing that module would import trio.
_CLOCK: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
#: The longest poll(2) while a deadline is guarded, in seconds.
MAX_SLEEP = 0.25
#: Signals the watchdog ignores; SIGKILL and SIGSTOP cannot be.
_IGNORED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGPIPE,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class Watchdog:
    """kubelock's end of the watchdog. Create it with :meth:`start`, before ``trio.run``
    (the CLI does it before trio is even imported).

    None of its methods is a checkpoint or blocks.
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd: int | None = fd
        self._broken = False

    @classmethod
    def start(cls) -> Watchdog:
        """Fork the watchdog. Call it while the process has a single thread."""
        read_end, write_end = os.pipe()
        gc.freeze()  # the child's pages stay shared: the collector never touches them
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the watchdog itself, measured by its tests
            try:
                os.close(write_end)
                _serve(read_end)
            finally:
                os._exit(0)
        gc.unfreeze()
        os.close(read_end)
        os.set_blocking(write_end, False)
        return cls(pid, write_end)

    def guard(self, pgid: int) -> None:
        """Kill process group ``pgid`` if kubelock dies or misses the deadline from now on."""
        self._send(_GUARD, pgid)

    def guard_in_child(self) -> Callable[[], None] | None:
        """A ``preexec_fn``: the new process guards its own group, before its exec.

        It runs in the forked child, where only this write happens (nothing
        that could wait on a lock another thread held at the fork). Should the
        write fail, :meth:`guard` after the spawn still covers the group. When
        the exec then fails, call :meth:`unguard`: the group is gone.
        """
        fd = self._fd
        if fd is None or self._broken:
            return None  # nobody to tell

        def guard_me() -> None:  # pragma: no cover - runs between fork and exec
            with contextlib.suppress(OSError):
                os.write(fd, _MESSAGE.pack(_GUARD, os.getpid()))

        return guard_me

    def set_deadline(self, deadline: float) -> None:
        """The group must be dead by ``deadline``, a ``trio.current_time()`` value."""
        if not math.isfinite(deadline):
            return  # nothing held yet
        import trio  # running by now; not imported at start() to keep the fork small

        at = time.clock_gettime_ns(_CLOCK) + round((deadline - trio.current_time()) * 1e9)
        self._send(_DEADLINE, at)

    def unguard(self) -> None:
        """The group's leader has exited: leave its group alone from now on."""
        self._send(_UNGUARD, 0)

    def close(self, *, reap: bool = True) -> None:
        """Close the pipe (the watchdog then exits) and reap the watchdog.

        ``reap=False`` when kubelock exits right after: the watchdog exits on its
        own, without kubelock waiting for the teardown of its address space
        (a few ms, which waiters that all exit at once pay in turn), and whoever
        adopts it (init, a subreaper) reaps it. What it does is the same either
        way: at end-of-file it kills a group still guarded, else nothing.
        """
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not reap:
            return
        with contextlib.suppress(ChildProcessError):  # a PID-1 reaper may have collected it
            os.waitpid(self.pid, 0)

    def _send(self, kind: bytes, argument: int) -> None:
        if self._fd is None or self._broken:
            return
        try:
            os.write(self._fd, _MESSAGE.pack(kind, argument))
        except OSError as error:  # EPIPE: it is gone; EAGAIN: it stopped reading
            self._broken = True
            logger.error(
                "the watchdog (PID %d) stopped listening (%s): if kubelock is killed or "
                "frozen now, nothing stops the command",
                self.pid,
                error.strerror or error,
            )


def _serve(fd: int) -> None:  # pragma: no cover - runs in the forked watchdog
    """The watchdog's loop: follow the messages, kill the group when due, return at EOF."""
    gc.disable()
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    os.setpgid(0, 0)
    # Hold nothing kubelock's parent may wait on (a pipe on stdout) beyond stderr.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.closerange(3, fd)
    os.closerange(fd + 1, max(fd + 1, null + 1, 1024))
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    group: int | None = None
    deadline: int | None = None
    pending = b""
    while True:
        timeout: float | None = None
        if group is not None and deadline is not None:
            timeout = min(
                max(0.0, (deadline - time.clock_gettime_ns(_CLOCK)) / 1e6), MAX_SLEEP * 1e3
            )
        if poller.poll(None if timeout is None else timeout + 1):
            data = os.read(fd, 4096)
            if not data:
                if group is not None:
                    _kill(group, "kubelock is gone without stopping the command")
                return
            pending += data
            while len(pending) >= _MESSAGE.size:
                kind, argument = _MESSAGE.unpack_from(pending)
                pending = pending[_MESSAGE.size :]
                if kind == _GUARD:
                    group = argument
                elif kind == _DEADLINE:
                    deadline = argument
                elif kind == _UNGUARD:
                    group = None
        if group is not None and deadline is not None and time.clock_gettime_ns(_CLOCK) >= deadline:
            _kill(group, "kubelock did not stop the command by the lease's safety deadline")
            group = None


def _kill(group: int, why: str) -> None:  # pragma: no cover - runs in the forked watchdog
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        return  # already gone
    # kubelock's own log format (text or JSON), on the stderr it shares with kubelock.
    logger.error(
        "watchdog: %s: sent SIGKILL to its process group %d",
        why,
        group,
        extra={"kubelock_event": "watchdog_killed"},
    )
