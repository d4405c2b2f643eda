"""The public Python API: ``async with kubelock.Lock(...)`` and a blocking ``hold()``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

from .election import Elector, Held
from .errors import EXIT_LEASE_LOST, LeaseLost
from .events import Observer
from .locks.base import LockStore
from .settings import (
    DEFAULT_LEASE_DURATION,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    ElectionTiming,
    LockType,
    default_identity,
    validate_lock_type,
    validate_name,
    validate_namespace,
    validate_once_key,
    validate_timeout,
)

__all__ = ["Held", "Lock", "hold"]


class Lock:
    """A named lock kept in the Kubernetes API.

    ``async with Lock("migrations") as held:`` waits until the lock is held,
    runs the body while renewing it, and releases it when the body ends, also
    when the body raises or is cancelled. If the lease is lost while the body
    runs, the body's cancel scope is cancelled, ``held.lost`` says why, and
    the ``async with`` raises :class:`~kubelock.errors.LeaseLost`.

    Configuration is found as kubectl finds it (``kubeconfig`` path, else
    ``$KUBECONFIG``, else in-cluster, else ``~/.kube/config``); ``store``
    replaces all of that with a ready :class:`~kubelock.locks.base.LockStore`.

    ``timeout``: give up waiting after that many seconds with
    :class:`~kubelock.errors.WaitTimedOut` (``0``: try once). ``once``: a KEY
    (a version, a migrations hash); when a body with that KEY has completed
    without an exception, the release records it on the lock, and from then
    on entering raises :class:`~kubelock.errors.AlreadyDone` at once, instead
    of waiting, for every contender with that KEY.
    """

    def __init__(
        self,
        name: str = "example-app",
        *,
        namespace: str | None = None,
        identity: str | None = None,
        lock_type: LockType | str = "leases",
        lease_duration: float = DEFAULT_LEASE_DURATION,
        renew_deadline: float = DEFAULT_RENEW_DEADLINE,
        retry_period: float = DEFAULT_RETRY_PERIOD,
        kubeconfig: str | None = None,
        context: str | None = None,
        observer: Observer | None = None,
        store: LockStore | None = None,
        timeout: float | None = None,
        once: str | None = None,
    ) -> None:
        validate_name(name)
        if namespace is not None:
            validate_namespace(namespace)
        self.name = name
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.lock_type = validate_lock_type(lock_type)
        self.timing = ElectionTiming(lease_duration, renew_deadline, retry_period)
        self.kubeconfig = kubeconfig
        self.context = context
        self.observer = observer
        self._store = store
        self.timeout = None if timeout is None else validate_timeout(timeout)
        self.once = None if once is None else validate_once_key(once)
        self._active: contextlib.AbstractAsyncContextManager[Held] | None = None

    async def __aenter__(self) -> Held:
        if self._active is not None:
            raise RuntimeError("this Lock is already held; create one Lock per holder")
        self._active = self._hold()
        return await self._active.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool | None:
        active, self._active = self._active, None
        assert active is not None
        return await active.__aexit__(exc_type, exc, tb)

    @contextlib.asynccontextmanager
    async def _open_store(self) -> AsyncIterator[LockStore]:
        if self._store is not None:
            yield self._store
            return
        from .kube.auth import load_cluster
        from .locks import open_lock

        config, namespace = load_cluster(self.kubeconfig, self.context, self.namespace)
        async with open_lock(
            config, self.lock_type, self.name, namespace, observer=self.observer
        ) as store:
            yield store

    @contextlib.asynccontextmanager
    async def _hold(self) -> AsyncIterator[Held]:
        async with self._open_store() as store:
            elector = Elector(
                store, self.identity, self.timing, observer=self.observer, once=self.once
            )
            await elector.acquire(timeout=self.timeout)
            async with elector.holding() as held:
                yield held
                elector.work_succeeded()  # only reached when the body completed


class _BodyFailed(Exception):
    """The blocking body of :func:`hold` raised: leave the ``once`` KEY unrecorded."""


@contextlib.contextmanager
def hold(
    name: str = "example-app",
    *,
    interrupt_signal: signal.Signals = signal.SIGUSR2,
    exit_at_safety_deadline: bool = True,
    **options: Any,
) -> Iterator[Held]:
    """Hold the lock around blocking code (a Django management command, a cron script).

    The election runs in a background thread with its own trio loop; the body
    runs in the calling thread, which must be the main thread. When the lease
    is lost, the background thread sends ``interrupt_signal`` to the main
    thread, whose handler raises :class:`~kubelock.errors.LeaseLost` inside
    the guarded code (blocking system calls are interrupted too). If the body
    is still running at the safety deadline (it caught the exception, or is
    stuck in C code), the process exits with status 75 before any other
    contender can take the lock, unless ``exit_at_safety_deadline`` is False.
    Other ``options`` are those of :class:`Lock`.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("kubelock.hold() must run in the main thread (it uses a signal)")
    lock = Lock(name, **options)
    acquired = threading.Event()
    body_done = threading.Event()
    state: dict[str, Any] = {}
    main_ident = threading.main_thread().ident
    assert main_ident is not None

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        raise LeaseLost(f"lost the lock {lock.name}: {state.get('lost', 'lease lost')}")

    async def background() -> None:
        release = trio.Event()
        state["release"] = release
        state["token"] = trio.lowlevel.current_trio_token()
        try:
            async with lock as held:
                state["held"] = held
                acquired.set()
                await release.wait()
                if state.get("body_failed"):
                    raise _BodyFailed  # so that a ``once`` KEY is not recorded
        except _BodyFailed:
            pass
        except LeaseLost as error:
            state["lost"] = str(error)
            if not body_done.is_set():
                signal.pthread_kill(main_ident, interrupt_signal)
                if exit_at_safety_deadline:
                    await trio.sleep_until(state["held"].safety_deadline)
                    if not body_done.is_set():
                        print(
                            f"kubelock: {error}; the guarded code did not stop, exiting",
                            file=sys.stderr,
                            flush=True,
                        )
                        os._exit(EXIT_LEASE_LOST)
        except BaseException as error:
            state["error"] = error
        finally:
            acquired.set()

    previous = signal.signal(interrupt_signal, on_signal)
    from .clock import BootClock

    thread = threading.Thread(
        target=trio.run,
        args=(background,),
        kwargs={"clock": BootClock()},  # a machine's sleep counts as time passed
        name="kubelock",
        daemon=True,
    )
    thread.start()
    try:
        acquired.wait()
        if "error" in state:
            raise state["error"]
        try:
            yield state["held"]
        except BaseException:
            state["body_failed"] = True
            raise
        finally:
            body_done.set()
            if "lost" not in state:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(state["release"].set, trio_token=state["token"])
            thread.join()
        if "error" in state:
            raise state["error"]
        if "lost" in state:
            raise LeaseLost(state["lost"])
    finally:
        signal.signal(interrupt_signal, previous)
