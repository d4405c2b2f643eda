"""The child: its own process group, signal forwarding, termination deadlines, exit status.

kubelock runs exactly one command (the *child*) per run:

- The child leads a new process group (``process_group=0``) in kubelock's
  session and inherits stdin, stdout and stderr untouched. Every signal
  kubelock sends goes to the whole group, so a shell's children stop too.
- Its exit status is passed through; killed by signal N it becomes 128+N,
  as a shell reports it.
- :func:`forward_signals` passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and
  SIGUSR2 on to the group until the child is reaped, also while it is being
  terminated. A second SIGTERM/SIGINT, or the grace period running out after
  the first, sends SIGKILL.
- Those signals reach kubelock through a :class:`SignalInbox`, which never
  re-raises a signal: one nobody acted on is logged as ignored, so kubelock
  never dies of a signal it handles (trio's own receiver re-raises what is
  left when it closes, which killed kubelock after its command had exited).
- :meth:`Child.terminate` is the lease-loss path: SIGTERM at once, SIGKILL at
  the grace period's end or at the lease's safety deadline, whichever comes
  first, in a shielded scope, returning only once the child is reaped. Any
  member of the group still alive after the child exits gets SIGKILL too:
  nothing the command started may outlive the lock.
- As PID 1 (a container entrypoint) :func:`run_child` also reaps orphaned
  grandchildren (:mod:`kubelock.reaper`) without ever touching the child's
  own status.
- The kill policy (``grace_period``, and ``hard_deadline``, a callable read
  when needed) is given once, to :meth:`Child.start` or :func:`run_child`.
- When the child is reaped, a :class:`~kubelock.events.ChildExited` goes to
  the observer (logging and metrics hang off it).
- Given a :class:`~kubelock.watchdog.Watchdog`, the group is guarded from
  before the command's exec (the forked child tells the watchdog itself)
  until just before its reap, so it dies even when kubelock is killed or
  frozen past the safety deadline, also in the instant after the spawn.

The group is only signalled while the child is unreaped (running, or a zombie
that holds the group id), so a recycled PID can never be hit. On Linux this
rests on a pidfd, which tells that the child exited without reaping it; where
there is none, the group is not signalled once the child has exited.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import signal
import types
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, KubelockError
from .events import ChildExited, Observer
from .reaper import is_init, outer_process_is_init, reap_orphans, registry
from .settings import DEFAULT_GRACE_PERIOD

if TYPE_CHECKING:
    from .watchdog import Watchdog

__all__ = [
    "FORWARDED_SIGNALS",
    "CannotRun",
    "Child",
    "HardDeadline",
    "SignalInbox",
    "exit_status",
    "forward_signals",
    "run_child",
]

logger = logging.getLogger("kubelock")

#: What kubelock passes on to the child's process group.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
#: Signals that ask the child to stop: the second one, or the grace period, brings SIGKILL.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

#: A test hook, for tests only: set in kubelock's environment, it makes kubelock stop
#: itself (SIGSTOP) right after the spawn, before anything else, so a test can kill it
#: in the instant between the spawn and the watchdog hearing of the new group.
STOP_AFTER_SPAWN = "_KUBELOCK_TEST_STOP_AFTER_SPAWN"

#: A source of the lease's safety deadline (a ``trio.current_time()`` value), read when needed.
HardDeadline = Callable[[], float | None]


class CannotRun(KubelockError):
    """The command could not be started: 127 when not found, 126 otherwise."""

    def __init__(self, program: str, error: OSError) -> None:
        if error.errno == errno.ENOENT:
            reason, code = "not found", EXIT_NOT_FOUND
        elif error.errno == errno.ENOEXEC:
            reason, code = "not an executable (exec format error)", EXIT_CANNOT_EXECUTE
        elif error.errno in (errno.EACCES, errno.EPERM):
            reason, code = "permission denied (is it executable?)", EXIT_CANNOT_EXECUTE
        else:
            reason, code = (error.strerror or str(error)).lower(), EXIT_CANNOT_EXECUTE
        super().__init__(f"cannot run {program!r}: {reason}")
        self.exit_code = code


class SignalInbox:
    """The signals kubelock receives, kept in arrival order until somebody takes them.

    A context manager (enter it inside ``trio.run``, in the main thread) that
    catches ``signals`` for as long as it is open. Read it with
    ``await inbox.receive()`` (or ``async for``), one task at a time, or with
    :meth:`take_nowait`. The handler queues a signal as it runs, so
    :meth:`take_nowait` sees every signal whose handler has run, which
    ``trio.open_signal_receiver`` cannot promise.

    Leaving it never re-raises anything: what nobody took is logged as ignored.
    ``restore=False`` keeps the handlers in place afterwards, dropping the
    signals that still come, for a process that exits right after (so no
    signal meets its default action between the run and the exit).
    """

    def __init__(self, signals: Sequence[int] = FORWARDED_SIGNALS, *, restore: bool = True) -> None:
        self.signals = tuple(signals)
        self._restore = restore
        self._pending: collections.deque[int] = collections.deque()
        self._arrived = trio.lowlevel.ParkingLot()
        self._token: trio.lowlevel.TrioToken | None = None
        self._previous: dict[int, Any] = {}
        self._open = False

    def __enter__(self) -> SignalInbox:
        self._token = trio.lowlevel.current_trio_token()
        self._open = True
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open = False
        if self._restore:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        while self._pending:
            logger.info(
                "ignoring %s: it came when there was no command to pass it to",
                signal.Signals(self._pending.popleft()).name,
            )

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # Runs in the main thread between two bytecodes: queue it, wake the reader, nothing more.
        if not self._open:
            return  # after the run (restore=False): the process is about to exit
        self._pending.append(signum)
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._arrived.unpark_all, idempotent=True)

    def take_nowait(self) -> int | None:
        """The oldest signal not taken yet, or None. Not a checkpoint."""
        return self._pending.popleft() if self._pending else None

    async def receive(self) -> int:
        """Wait for the next signal and take it. A checkpoint; cancelled, it takes nothing."""
        if self._pending:
            await trio.lowlevel.checkpoint()
        while not self._pending:
            await self._arrived.park()
        return self._pending.popleft()

    def __aiter__(self) -> SignalInbox:
        return self

    async def __anext__(self) -> int:
        return await self.receive()


def exit_status(returncode: int) -> int:
    """A ``Popen`` return code as a shell reports it: killed by signal N is 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    """One running command, leading its own process group. Create it with :meth:`start`.

    ``grace_period`` and ``hard_deadline`` are the kill policy of
    :meth:`terminate` (also on :meth:`wait`'s cancellation path);
    ``hard_deadline`` is a callable so that each renewal of the lease moves
    the deadline without telling the child.
    """

    def __init__(
        self,
        process: trio.Process,
        argv: tuple[str, ...],
        *,
        grace_period: float,
        hard_deadline: HardDeadline | None,
        observer: Observer | None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.argv = argv
        self.pid = process.pid
        self.grace_period = grace_period
        self.hard_deadline: HardDeadline = hard_deadline or (lambda: None)
        self._observer = observer
        self._process = process
        self._watchdog = watchdog
        self._started_at = trio.current_time()
        self._watch_lock = trio.Lock()
        self._has_exited = False  # the pidfd said so; the child may still be unreaped
        self._exited: ChildExited | None = None
        self._pidfd: int | None = None
        self._terminal: int | None = None  # the terminal handed to the child's group
        with contextlib.suppress(AttributeError, OSError):  # no pidfd: see the module doc
            self._pidfd = os.pidfd_open(process.pid)

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        hard_deadline: HardDeadline | None = None,
        observer: Observer | None = None,
        watchdog: Watchdog | None = None,
    ) -> Child:
        """Spawn ``argv`` (searched on ``env``'s PATH) in a new process group.

        ``observer`` is told :class:`~kubelock.events.ChildExited` once it is reaped.
        ``watchdog`` guards the new group from the moment it exists until the
        child is reaped (see :mod:`kubelock.watchdog`).

        A checkpoint only before the process exists: once it is spawned,
        ``start`` returns it even if cancelled meanwhile (the cancellation
        surfaces at the caller's next checkpoint, typically :meth:`wait`, which
        then terminates it). Raises :class:`CannotRun` (127 or 126).
        """
        if not argv:
            raise ValueError("argv must name a command")
        registry.spawning += 1
        try:
            process = await trio.lowlevel.open_process(
                list(argv),
                env=None if env is None else dict(env),
                start_new_session=False,
                process_group=0,
                # The new group is guarded from before the exec (its pid is the group id).
                preexec_fn=None if watchdog is None else watchdog.guard_in_child(),
            )
        except OSError as error:
            if watchdog is not None:
                watchdog.unguard()  # the child guarded its group, then its exec failed
            raise CannotRun(argv[0], error) from None
        else:
            registry.children.add(process.pid)
            if STOP_AFTER_SPAWN in os.environ:  # a test hook: see STOP_AFTER_SPAWN
                os.kill(os.getpid(), signal.SIGSTOP)
            if watchdog is not None:
                watchdog.guard(process.pid)
        finally:
            registry.spawning -= 1
        logger.debug("started %r as PID %d", argv[0], process.pid)
        child = cls(
            process,
            tuple(argv),
            grace_period=grace_period,
            hard_deadline=hard_deadline,
            observer=observer,
            watchdog=watchdog,
        )
        child._hand_terminal()
        return child

    def _hand_terminal(self) -> None:
        """In a terminal's foreground, make the child's group the foreground, as a shell does.

        Otherwise a command that reads the terminal (``kubelock -- psql``) is
        stopped by SIGTTIN. SIGCONT resumes it if it already tried. Keyboard
        signals (Ctrl-C) then go to the command, as they would without kubelock.
        """
        try:
            if not os.isatty(0) or os.tcgetpgrp(0) != os.getpgrp():
                return
            os.tcsetpgrp(0, self.pid)
        except OSError:
            return
        self._terminal = 0
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGCONT)

    def _take_back_terminal(self) -> None:
        """Make kubelock's group the terminal's foreground again (SIGTTOU blocked meanwhile)."""
        if self._terminal is None:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
        try:
            os.tcsetpgrp(self._terminal, os.getpgrp())
        except OSError:
            pass
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._terminal = None

    @property
    def status(self) -> int | None:
        """The exit status once the child is reaped (by :meth:`wait` or :meth:`terminate`)."""
        return None if self._exited is None else self._exited.status

    def send_signal(self, signum: int) -> bool:
        """Send ``signum`` to the child's process group; False if there is nobody to signal.

        Not a checkpoint. Never signals once the child has been reaped.
        """
        if self._exited is not None or (self._has_exited and self._pidfd is None):
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError as error:  # a setuid program in the group
            logger.warning("cannot signal the command's process group: %s", error)
            return False
        return True

    def kill(self) -> bool:
        """SIGKILL the child's process group. Not a checkpoint."""
        return self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait until the child exits, reap it and return its exit status.

        A checkpoint. On cancellation (or any other exception while waiting)
        the child is stopped first with :meth:`terminate`, shielded, and then
        the exception propagates;
        :attr:`status` then holds the status. So ``with scope: await
        child.wait()`` never leaves a running child behind.

        When the child exits by itself, whatever it left running in its
        process group (``worker &``) gets SIGKILL before it is reaped: nothing
        the command started may go on once the lock is released.
        """
        try:
            await self._wait_exited()
        except BaseException:
            await self.terminate()
            raise
        # The exited leader is a zombie still holding the group id: stragglers go now.
        if self.kill():
            logger.debug("sent SIGKILL to the command's process group, for anything left in it")
        return await self._reap()

    async def terminate(self) -> int:
        """Stop the child and its group; return its exit status once it is reaped.

        SIGTERM goes to the group at once; SIGKILL follows when
        :attr:`grace_period` seconds have passed or at :attr:`hard_deadline`
        (read now; a ``trio.current_time()`` value), whichever is earlier. Group members
        left behind once the child has exited get SIGKILL at that moment.
        The whole wait runs in a shielded scope, so cancellation cannot cut it
        short: this returns only when the child is reaped. Returns at once if
        it already is.
        """
        if self._exited is not None:
            return self._exited.status
        with trio.CancelScope(shield=True):
            kill_at = trio.current_time() + max(self.grace_period, 0.0)
            hard_deadline = self.hard_deadline()
            if hard_deadline is not None:
                kill_at = min(kill_at, hard_deadline)
            if self.send_signal(signal.SIGTERM):
                logger.info("sent SIGTERM to the command (PID %d)", self.pid)
            with trio.move_on_at(kill_at):
                await self._wait_exited()
            if not self._has_exited:
                logger.warning("the command did not stop in time: sending SIGKILL")
                self.kill()
                await self._wait_exited()
            # The leader is a zombie still holding the group id: stragglers go now.
            self.kill()
            status = await self._reap()
        return status

    async def _wait_exited(self) -> None:
        """Until the child has exited. With a pidfd it stays unreaped; without one it is reaped.

        A checkpoint. Only one task watches at a time; others queue on the lock.
        """
        async with self._watch_lock:
            if self._has_exited:
                return
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await self._process.wait()
            self._has_exited = True

    async def _reap(self) -> int:
        """Collect the exited child's status. A checkpoint only in the unlikely slow path."""
        if self._exited is None:
            if self._watchdog is not None:  # while the zombie still holds the group id
                self._watchdog.unguard()
            returncode = self._process.poll()  # the zombie is reaped here
            if returncode is None:  # pragma: no cover - exited, yet not reapable for an instant
                returncode = await self._process.wait()
            if self._pidfd is not None:
                trio.lowlevel.notify_closing(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None
            registry.children.discard(self.pid)
            self._take_back_terminal()
            self._exited = ChildExited(
                status=exit_status(returncode),
                signal=-returncode if returncode < 0 else None,
                ran=trio.current_time() - self._started_at,
            )
            if self._observer is not None:
                self._observer(self._exited)
        return self._exited.status


async def forward_signals(
    child: Child,
    *,
    received: AsyncIterator[int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward kubelock's signals to the child's group until cancelled.

    Listens for :data:`FORWARDED_SIGNALS` itself, or reads ``received`` (an
    open :class:`SignalInbox` the caller keeps, so no signal falls into a gap
    between two receivers). Reports started once the signal handlers are in
    place (``await nursery.start(forward_signals, child)``). A second
    SIGTERM/SIGINT, or ``child.grace_period`` running out after the first,
    sends SIGKILL. On cancellation it stops forwarding; signals then arriving
    stay in ``received`` for whoever reads it next.
    """
    if received is not None:
        task_status.started()
        await _forward(child, received)
        return
    with SignalInbox() as own:
        task_status.started()
        await _forward(child, own)


async def _forward(child: Child, received: AsyncIterator[int]) -> None:
    async with trio.open_nursery() as nursery:
        stopping = False
        async for signum in received:
            name = signal.Signals(signum).name
            if signum in STOP_SIGNALS and stopping:
                logger.warning("%s again: sending SIGKILL to the command", name)
                child.kill()
                continue
            if not child.send_signal(signum):
                logger.info("ignoring %s: the command has exited", name)
                continue
            logger.info("forwarding %s to the command", name)
            if signum in STOP_SIGNALS:
                stopping = True
                nursery.start_soon(_kill_after_grace, child, name)


async def _kill_after_grace(child: Child, name: str) -> None:
    await trio.sleep(child.grace_period)
    if child.kill():
        logger.warning(
            "the command ignored %s for %gs (--grace-period): sent SIGKILL",
            name,
            child.grace_period,
        )


async def run_child(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    hard_deadline: HardDeadline | None = None,
    observer: Observer | None = None,
    reap: bool | None = None,
    watchdog: Watchdog | None = None,
    signals: SignalInbox | None = None,
    task_status: trio.TaskStatus[Child] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run ``argv`` to the end: spawn, forward signals, reap orphans as PID 1; return its status.

    ``reap`` defaults to :func:`kubelock.reaper.is_init`. Reports the :class:`Child` as
    started (``child = await nursery.start(run_child, ...)``). Signals are read
    from ``signals`` (the caller's open inbox, which also keeps what came before
    the spawn), else from an inbox of its own, open from before the spawn until
    the child is reaped; so no signal meets the default action (killing kubelock)
    while a child runs. Every one that arrives until the child is reaped is
    forwarded to it, also while it is being terminated. Raises :class:`CannotRun`
    (127 or 126).

    A checkpoint. On cancellation (lease loss) the child is terminated, shielded,
    with ``grace_period`` and ``hard_deadline()`` (see :meth:`Child.terminate`), then
    ``Cancelled`` propagates.
    """
    if reap is None:
        reap = is_init() or outer_process_is_init()
    with contextlib.ExitStack() as stack:
        received = signals if signals is not None else stack.enter_context(SignalInbox())
        child = await Child.start(
            argv,
            env,
            grace_period=grace_period,
            hard_deadline=hard_deadline,
            observer=observer,
            watchdog=watchdog,
        )
        task_status.started(child)
        # Shielded, so that it forwards through the child's termination too; cancelled
        # once the child is reaped, leaving later signals in the inbox.
        forwarding = trio.CancelScope(shield=True)

        async def forward() -> None:
            with forwarding:
                await forward_signals(child, received=received)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                if reap:
                    nursery.start_soon(reap_orphans)
                try:
                    status = await child.wait()
                finally:
                    forwarding.cancel()
                nursery.cancel_scope.cancel()
        finally:
            if child.status is None:  # cancelled before wait() took charge of it
                await child.terminate()
        return status
