"""Pushing the metrics to a Prometheus Pushgateway (``--pushgateway``).

Job ``kubelock``, grouping key: the lock ``name`` and the ``identity``, so
each process keeps its own group. prometheus-client pushes in a worker
thread; a push never raises and never changes kubelock's outcome.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .metrics import Metrics

__all__ = ["PUSH_INTERVAL", "PUSH_JOB", "PUSH_TIMEOUT", "push", "push_periodically"]

PUSH_JOB: Final = "kubelock"
"""The Pushgateway job; the grouping key adds the lock ``name`` and ``identity``."""

PUSH_INTERVAL: Final = 15.0
"""Seconds between two pushes while kubelock runs (the default scrape interval)."""

PUSH_TIMEOUT: Final = 10.0
"""Seconds one push may take before it is given up (and logged)."""

_log = logging.getLogger("kubelock")


async def push(metrics: Metrics, url: str) -> bool:
    """Push the current ``metrics`` to the Pushgateway at ``url``; True when it took them.

    Runs in a worker thread, bounded by ``PUSH_TIMEOUT``; cancellation
    abandons the thread at once. A failure is logged on the ``kubelock``
    logger and never raises.
    """
    return await _push(metrics, url, failure_level=logging.WARNING)


async def push_periodically(metrics: Metrics, url: str, interval: float = PUSH_INTERVAL) -> None:
    """Push now and every ``interval`` seconds until cancelled; never raises.

    Of consecutive failures only the first is logged as a warning (the
    rest at debug level), so a Pushgateway that is down does not flood the log.
    """
    failing = False
    while True:
        pushed = await _push(
            metrics, url, failure_level=logging.DEBUG if failing else logging.WARNING
        )
        failing = not pushed
        await trio.sleep(interval)


async def _push(metrics: Metrics, url: str, *, failure_level: int) -> bool:
    from prometheus_client import push_to_gateway

    def send() -> None:
        push_to_gateway(
            url,
            job=PUSH_JOB,
            registry=metrics.registry,
            grouping_key={"name": metrics.name, "identity": metrics.identity},
            timeout=PUSH_TIMEOUT,
        )

    try:
        await trio.to_thread.run_sync(send, abandon_on_cancel=True)
    except Exception as error:  # any failure: a push never changes the outcome
        _log.log(failure_level, "could not push metrics to %s: %s", url, error)
        return False
    return True
