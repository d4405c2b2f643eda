"""One trio nursery that wires the election, the child and the metrics server.

The order of a run, and what each step may write:

1. Load the cluster configuration and (optionally) bind the metrics port.
   Any problem here is a usage error (exit 2): nothing was written.
2. Wait for the lock. A SIGINT/SIGTERM/SIGHUP/SIGQUIT here stops waiting at
   once (exit 128+N). The record was not written, since a waiter only writes
   it when the lock is free, and then it holds it and releases it again; a
   waiter in the queue takes its own entry out. One that comes after the
   lock was taken but before the command was spawned counts the same way:
   the command is not started (it was interrupted before it began, as if the
   signal had come a moment earlier), the lock is released, exit 128+N.
   SIGUSR1/SIGUSR2 until the spawn are logged and ignored.
3. Hold it: the renew loop and the child run side by side. Every signal from
   the spawn until the child is reaped is forwarded to it. If the lease is
   lost, the child's cancel scope is cancelled; its cancellation path sends
   SIGTERM to the child's group at once and SIGKILL no later than the safety
   deadline (before any other contender can take over), whatever
   ``--grace-period`` says. kubelock then exits 75.
4. Release (``holderIdentity`` emptied, so the next waiter starts at once),
   and exit with the child's status. Signals from the child's exit on (the
   release, the final push) are logged and ignored: nothing is left to stop.

One :class:`~kubelock.process.SignalInbox` catches the signals for the whole
run, so none is lost between two steps or re-raised at the end.
"""

from __future__ import annotations

import logging
import os
import signal
from functools import partial
from typing import TYPE_CHECKING

import trio

from .election import Elector
from .errors import EXIT_LEASE_LOST, AlreadyDone, KubelockError, LeaseLost, StatusError
from .events import Acquired, Event, Observer, Renewed
from .process import FORWARDED_SIGNALS, SignalInbox, run_child
from .settings import Settings

if TYPE_CHECKING:
    from .kube.auth import ClusterConfig
    from .watchdog import Watchdog

__all__ = [
    "STOP_WAITING_SIGNALS",
    "run",
    "supervise",
]

logger = logging.getLogger("kubelock")

#: Signals that stop a waiting kubelock (the others are ignored while waiting).
STOP_WAITING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


def run(settings: Settings, watchdog: Watchdog) -> int:
    """Run one kubelock invocation guarded by ``watchdog``; return the exit status.

    The caller forks the watchdog (:meth:`Watchdog.start`) and closes it: the
    fork must happen while kubelock has one thread and no event loop.
    """
    from .clock import BootClock
    from .kube.api import import_httpcore_lean

    import_httpcore_lean()  # before trio starts threads
    # Deadlines on CLOCK_BOOTTIME: a machine's sleep counts as time passed.
    return trio.run(partial(supervise, settings, watchdog, exiting=True), clock=BootClock())


async def supervise(
    settings: Settings, watchdog: Watchdog | None = None, *, exiting: bool = False
) -> int:
    """One run; ``exiting``: the process exits right after, and drops signals until then."""
    from .kube.auth import load_cluster
    from .log import log_event

    config, namespace = load_cluster(settings.kubeconfig, settings.context, settings.namespace)

    observers: list[Observer] = [log_event]
    metrics = None
    if settings.metrics_address is not None or settings.pushgateway is not None:
        from .metrics import Metrics

        metrics = Metrics(settings.name, namespace, settings.identity, settings.lock_type)
        observers.append(metrics.observe)

    def observe(event: Event) -> None:
        for observer in observers:
            observer(event)

    status = 0
    failure: KubelockError | None = None
    with SignalInbox(FORWARDED_SIGNALS, restore=not exiting) as signals:
        async with trio.open_nursery() as services:
            try:
                if metrics is not None:
                    metrics.started()
                    if settings.metrics_address is not None:
                        from .endpoint import serve
                        from .health import Health

                        health = Health(settings.timing.renew_deadline)
                        observers.append(health.observe)
                        host, port = settings.metrics_address
                        bound_host, bound_port = await services.start(
                            serve, metrics.registry, health, host, port
                        )
                        logger.info(
                            "serving /metrics and /healthz on %s:%d", bound_host, bound_port
                        )
                    if settings.pushgateway is not None:
                        from .push import push_periodically

                        services.start_soon(push_periodically, metrics, settings.pushgateway)
                status = await _wait_and_run(
                    settings, config, namespace, observe, signals, watchdog
                )
            except KubelockError as error:
                failure = error  # re-raised outside the nursery, as itself
            services.cancel_scope.cancel()
    if metrics is not None and settings.pushgateway is not None:
        from .push import push

        await push(metrics, settings.pushgateway)
    if failure is not None:
        raise failure
    return status


async def _wait_and_run(
    settings: Settings,
    config: ClusterConfig,
    namespace: str,
    observe: Observer,
    signals: SignalInbox,
    watchdog: Watchdog | None,
) -> int:
    from .locks import open_lock

    def observe_and_guard(event: Event) -> None:
        observe(event)
        if watchdog is not None and isinstance(event, Acquired | Renewed):
            watchdog.set_deadline(elector.safety_deadline)  # each move of the deadline

    async with open_lock(
        config, settings.lock_type, settings.name, namespace, observer=observe
    ) as store:
        elector = Elector(
            store,
            settings.identity,
            settings.timing,
            observer=observe_and_guard,
            once=settings.once,
        )
        logger.info("taking the lock %s as %s", store.describe(), settings.identity)
        try:
            stopped_by = await _acquire_unless_stopped(elector, signals, settings.timeout)
        except AlreadyDone as done:
            logger.info("%s: not running the command", done)
            return 0
        if stopped_by is not None and not elector.is_holding:
            logger.info(
                "%s while waiting: stopped, %s",
                signal.Signals(stopped_by).name,
                "left the queue (the lock itself untouched)"
                if elector.left_queue
                else "released the lock its write had just taken"
                if elector.gave_back
                else "nothing written",
            )
            return 128 + stopped_by
        return await _hold_and_run(
            settings, namespace, elector, observe, signals, watchdog, stopped_by=stopped_by
        )


async def _acquire_unless_stopped(
    elector: Elector,
    signals: SignalInbox,
    timeout: float | None,  # noqa: ASYNC109 -- the election's own give-up time
) -> int | None:
    """Acquire the lock; return the signal number instead if one stopped the wait."""
    stopped_by: int | None = None
    failure: KubelockError | AlreadyDone | None = None
    async with trio.open_nursery() as nursery:

        async def listen() -> None:
            nonlocal stopped_by
            async for signum in signals:
                if signum in STOP_WAITING_SIGNALS:
                    stopped_by = signum
                    nursery.cancel_scope.cancel()
                    return
                logger.info("ignoring %s while waiting", signal.Signals(signum).name)

        nursery.start_soon(listen)
        try:
            await elector.acquire(timeout=timeout)
        except (KubelockError, AlreadyDone) as error:
            failure = error  # re-raised outside the nursery, as itself
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return stopped_by


def _stop_before_spawn(signals: SignalInbox) -> int | None:
    """A stop signal that came before the spawn, if any; others so far are ignored."""
    while (signum := signals.take_nowait()) is not None:
        if signum in STOP_WAITING_SIGNALS:
            return signum
        logger.info("ignoring %s: the command has not started", signal.Signals(signum).name)
    return None


async def _hold_and_run(
    settings: Settings,
    namespace: str,
    elector: Elector,
    observe: Observer,
    signals: SignalInbox,
    watchdog: Watchdog | None,
    *,
    stopped_by: int | None,
) -> int:
    """Run the command under the lock, unless a stop signal (``stopped_by``, or one
    still in ``signals``) came before its spawn: then only release the lock."""
    assert elector.fencing_token is not None
    env = dict(os.environ)
    env.update(
        KUBELOCK_NAME=settings.name,
        KUBELOCK_NAMESPACE=namespace,
        KUBELOCK_IDENTITY=settings.identity,
        KUBELOCK_FENCING_TOKEN=str(elector.fencing_token),
    )
    status = 0
    try:
        async with elector.holding() as held:
            if stopped_by is None:
                stopped_by = _stop_before_spawn(signals)
            if stopped_by is not None:
                logger.info(
                    "%s after the lock was taken: not starting the command; releasing the lock",
                    signal.Signals(stopped_by).name,
                )
                status = 128 + stopped_by
            else:
                status = await run_child(
                    settings.command,
                    env,
                    grace_period=settings.grace_period,
                    hard_deadline=lambda: held.safety_deadline,
                    observer=observe,  # ChildExited: logged, and recorded in the metrics
                    watchdog=watchdog,
                    signals=signals,
                )
            if status == 0:
                elector.work_succeeded()  # --once: the release records KEY as done
    except StatusError as refused:  # the release was refused: the run did not end cleanly
        if refused is not elector.release_refused:
            raise
        logger.error("%s", refused)
        if status == 0:
            status = refused.exit_code
    except LeaseLost:
        logger.error(
            "lost the lock (%s): the command was stopped; exiting %d",
            elector.lost_reason,
            EXIT_LEASE_LOST,
        )
        status = EXIT_LEASE_LOST
    return status
