"""Prometheus metrics: what kubelock records.

One :class:`Metrics` per lock. It is fed every event (the election's, the
API client's, the child's) through :meth:`Metrics.observe`, and by the
supervisor's :meth:`~Metrics.started` when waiting begins. What judges
health is :mod:`kubelock.health`; what serves ``/metrics`` and ``/healthz``
is :mod:`kubelock.endpoint`; what pushes to a Pushgateway is :mod:`kubelock.push`.

Its registry is its own (never prometheus-client's global one), holding the
metrics below plus the standard process and platform collectors. Every
kubelock metric carries the lock's ``name`` and ``namespace`` labels, and only
the few extra labels listed, so cardinality stays bounded:

=========================================== ========= =======================================
metric                                      type      meaning
=========================================== ========= =======================================
``kubelock_lock_wait_seconds``              histogram start to acquisition
``kubelock_lock_hold_seconds``              histogram acquisition to release or loss
``kubelock_acquisitions_total``             counter   times the lock was acquired
``kubelock_lost_total``                     counter   times the lock was lost while held
``kubelock_releases_total``                 counter   orderly ends of holding (given back, or
                                                      left to expire when the API was down)
``kubelock_renewals_total{result}``         counter   renewals, ``result`` success or failure
``kubelock_renew_duration_seconds``         histogram time one renewal attempt took
``kubelock_lock_held``                      gauge     1 while holding the lock
``kubelock_waiting``                        gauge     1 while waiting for the lock
``kubelock_api_requests_total{verb,code}``  counter   Kubernetes API requests by verb and
                                                      HTTP status (``error``: no answer)
``kubelock_api_request_duration_seconds``   histogram API request time, label ``verb``
``kubelock_child_exit_code``                gauge     the command's own exit status (128+N for
                                                      signal N), once it ended; also after a
                                                      lost lease, when kubelock exits 75
``kubelock_info{version,lock_type,identity}`` gauge   always 1
=========================================== ========= =======================================

Import cost matters (an init container starts kubelock on every Pod start):
importing this module costs nothing beyond trio; prometheus-client is imported
when a :class:`Metrics` is made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

from ._version import __version__
from .events import (
    Acquired,
    ApiRequest,
    ChildExited,
    Event,
    Lost,
    Released,
    Renewed,
    RenewFailed,
    WaitFailed,
    Waiting,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["HOLD_BUCKETS", "REQUEST_BUCKETS", "Metrics"]

HOLD_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, math.inf,
)  # fmt: skip
"""Wait and hold times: milliseconds of hand-off up to an hour of migration."""

REQUEST_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0, 600.0, math.inf,
)  # fmt: skip
"""API request and renewal times; the top buckets are for watches, which stay open minutes."""


class Metrics:
    """The metrics of one lock, in a registry of their own.

    ``registry`` defaults to a new ``CollectorRegistry`` of its own; one passed
    in must not already hold kubelock's metrics or the process collector.
    Every method is synchronous and cheap, safe to call from any task.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        identity: str,
        lock_type: str,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lock_type = lock_type
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

        lock = ("name", "namespace")
        self._wait = Histogram(
            "kubelock_lock_wait_seconds",
            "Seconds from start until the lock was acquired.",
            lock,
            buckets=HOLD_BUCKETS,
            registry=self.registry,
        ).labels(name, namespace)
        self._hold = Histogram(
            "kubelock_lock_hold_seconds",
            "Seconds from acquisition until the lock was released or lost.",
            lock,
            buckets=HOLD_BUCKETS,
            registry=self.registry,
        ).labels(name, namespace)
        self._acquisitions = Counter(
            "kubelock_acquisitions",
            "Times the lock was acquired.",
            lock,
            registry=self.registry,
        ).labels(name, namespace)
        self._lost = Counter(
            "kubelock_lost",
            "Times the lock was lost while held (renew deadline passed, or taken over).",
            lock,
            registry=self.registry,
        ).labels(name, namespace)
        self._releases = Counter(
            "kubelock_releases",
            "Orderly ends of holding: the lock given back, or left to expire "
            "when the API could not be reached.",
            lock,
            registry=self.registry,
        ).labels(name, namespace)
        renewals = Counter(
            "kubelock_renewals",
            "Renewal attempts of the held lock, by result (success or failure).",
            (*lock, "result"),
            registry=self.registry,
        )
        self._renewed = renewals.labels(name, namespace, "success")
        self._renew_failed = renewals.labels(name, namespace, "failure")
        self._renew_duration = Histogram(
            "kubelock_renew_duration_seconds",
            "Seconds one renewal attempt took, successful or not.",
            lock,
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        ).labels(name, namespace)
        self._held = Gauge(
            "kubelock_lock_held",
            "1 while this process holds the lock.",
            lock,
            registry=self.registry,
        ).labels(name, namespace)
        self._waiting = Gauge(
            "kubelock_waiting",
            "1 while this process waits for the lock.",
            lock,
            registry=self.registry,
        ).labels(name, namespace)
        self._api_requests = Counter(
            "kubelock_api_requests",
            "Requests to the Kubernetes API, by verb and HTTP status "
            '("error" when no answer came).',
            (*lock, "verb", "code"),
            registry=self.registry,
        )
        self._api_duration = Histogram(
            "kubelock_api_request_duration_seconds",
            "Seconds one request to the Kubernetes API took (a watch: how long it stayed open).",
            (*lock, "verb"),
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._child_exit_code = Gauge(
            "kubelock_child_exit_code",
            "Exit status of the command (128+N when killed by signal N), also when the lease "
            "was lost and kubelock exits 75; absent until it ends.",
            lock,
            registry=self.registry,
        )
        Gauge(
            "kubelock_info",
            "Always 1: the kubelock version, lock type and identity of this process.",
            (*lock, "version", "lock_type", "identity"),
            registry=self.registry,
        ).labels(name, namespace, __version__, lock_type, identity).set(1)

    # -- feeding ----------------------------------------------------------------

    def started(self) -> None:
        """Waiting for the lock begins (before the first request)."""
        self._waiting.set(1)
        self._held.set(0)

    def observe(self, event: Event) -> None:
        """Record one election event; the election's observer (synchronous, no I/O)."""
        match event:
            case Waiting():
                self._waiting.set(1)
            case WaitFailed():
                pass  # the failed request itself is counted by its ApiRequest
            case Acquired(waited=waited):
                self._wait.observe(waited)
                self._acquisitions.inc()
                self._waiting.set(0)
                self._held.set(1)
            case Renewed(duration=duration):
                self._renewed.inc()
                self._renew_duration.observe(duration)
            case RenewFailed(duration=duration):
                self._renew_failed.inc()
                self._renew_duration.observe(duration)
            case Lost(held=held):
                self._hold.observe(held)
                self._lost.inc()
                self._held.set(0)
            case Released(held=held):
                self._hold.observe(held)
                self._releases.inc()
                self._held.set(0)
            case ApiRequest(verb=verb, code=code, duration=duration):
                self._api_requests.labels(self.name, self.namespace, verb, code).inc()
                self._api_duration.labels(self.name, self.namespace, verb).observe(duration)
            case ChildExited(status=status):
                self._child_exit_code.labels(self.name, self.namespace).set(status)
