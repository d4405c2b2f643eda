"""Prometheus metrics, the ``/metrics`` and ``/healthz`` endpoint, and Pushgateway pushes.

One :class:`Metrics` per lock. It is fed every election event through
:meth:`Metrics.observe` (the election's observer), and, around that, by the
supervisor: :meth:`~Metrics.started` when waiting begins and
:meth:`~Metrics.child_exited` with the command's exit status.

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
``kubelock_child_exit_code``                gauge     the command's exit status, once it ended
``kubelock_info{version,lock_type,identity}`` gauge   always 1
=========================================== ========= =======================================

Health (``/healthz``, the liveness semantics of client-go's healthz adaptor):
200 while starting or waiting, and while holding as long as the last
successful renewal (or the acquisition) is at most ``renew_deadline +
HEALTH_TOLERANCE`` seconds old, by trio's clock; 503 after that, including
after the lease was lost for want of renewals.

Import cost matters (an init container starts kubelock on every Pod start):
importing this module costs nothing beyond trio; prometheus-client is imported
when a :class:`Metrics` is made and hypercorn when :meth:`Metrics.serve` runs.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import trio

from ._version import __version__
from .errors import UsageError
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

__all__ = [
    "HEALTH_TOLERANCE",
    "HOLD_BUCKETS",
    "PUSH_INTERVAL",
    "PUSH_JOB",
    "PUSH_TIMEOUT",
    "REQUEST_BUCKETS",
    "Metrics",
]

HEALTH_TOLERANCE: Final = 2.0
"""Seconds past renew-deadline before ``/healthz`` turns 503: a renewal that is
merely slow (the elector bounds each attempt by the deadline) is not yet a
reason for a livenessProbe to restart the Pod."""

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

PUSH_JOB: Final = "kubelock"
"""The Pushgateway job; the grouping key adds the lock ``name`` and ``identity``."""

PUSH_INTERVAL: Final = 15.0
"""Seconds between two pushes while kubelock runs (the default scrape interval)."""

PUSH_TIMEOUT: Final = 10.0
"""Seconds one push may take before it is given up (and logged)."""

_log = logging.getLogger("kubelock")
# hypercorn's own messages ("Running on ...") are chatter for kubelock's users;
# only its warnings and errors get through.
_http_log = logging.getLogger("kubelock.http")

# ASGI, loosely: hypercorn's TypedDicts are more than this small app needs.
_Scope = Mapping[str, Any]
_Receive = Callable[[], Awaitable[Any]]
_Send = Callable[[Any], Awaitable[None]]


class Metrics:
    """The metrics of one lock, its health, and the ways to expose them.

    ``registry`` defaults to a new ``CollectorRegistry`` of its own; one passed
    in must not already hold kubelock's metrics or the process collector.
    Every method that is not ``async`` is synchronous and cheap, safe to call
    from the election's task; :meth:`healthy` needs trio's clock (a running
    trio loop).
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        identity: str,
        lock_type: str,
        *,
        renew_deadline: float,
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
        self.renew_deadline = renew_deadline
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
            "Exit status of the command (128+N when killed by signal N); absent until it ends.",
            lock,
            registry=self.registry,
        )
        Gauge(
            "kubelock_info",
            "Always 1: the kubelock version, lock type and identity of this process.",
            (*lock, "version", "lock_type", "identity"),
            registry=self.registry,
        ).labels(name, namespace, __version__, lock_type, identity).set(1)

        # Health: trio time of the last acquisition or successful renewal, from
        # acquisition until release (kept after a loss); None otherwise.
        self._last_success: float | None = None
        self._exposition: Callable[[_Scope, _Receive, _Send], Awaitable[None]] | None = None

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
                self._last_success = trio.current_time()
            case Renewed(duration=duration):
                self._renewed.inc()
                self._renew_duration.observe(duration)
                self._last_success = trio.current_time()
            case RenewFailed(duration=duration):
                self._renew_failed.inc()
                self._renew_duration.observe(duration)
            case Lost(held=held):
                self._hold.observe(held)
                self._lost.inc()
                self._held.set(0)
                # Health stays judged by the last success: 503 once that is overdue.
            case Released(held=held):
                self._hold.observe(held)
                self._releases.inc()
                self._held.set(0)
                self._last_success = None
            case ApiRequest(verb=verb, code=code, duration=duration):
                self._api_requests.labels(self.name, self.namespace, verb, code).inc()
                self._api_duration.labels(self.name, self.namespace, verb).observe(duration)
            case ChildExited(status=status):
                self.child_exited(status)

    def child_exited(self, code: int) -> None:
        """The command ended with ``code`` (kubelock's exit status for it)."""
        self._child_exit_code.labels(self.name, self.namespace).set(code)

    # -- health -----------------------------------------------------------------

    def healthy(self) -> bool:
        """False once the last successful renewal (or the acquisition) is more than
        renew-deadline + ``HEALTH_TOLERANCE`` old, while holding or after a loss;
        True otherwise (starting, waiting, released)."""
        if self._last_success is None:
            return True
        return trio.current_time() <= self._last_success + self.renew_deadline + HEALTH_TOLERANCE

    def _health_text(self) -> tuple[int, bytes]:
        if self.healthy():
            return 200, b"ok\n"
        assert self._last_success is not None
        age = trio.current_time() - self._last_success
        return 503, (
            f"renewal overdue: last successful renewal {age:.1f}s ago, "
            f"renew deadline {self.renew_deadline:g}s + tolerance {HEALTH_TOLERANCE:g}s\n"
        ).encode()

    # -- the HTTP endpoint ------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``/metrics`` and ``/healthz`` on ``host:port`` until cancelled.

        For ``nursery.start``: the socket is bound and listening before
        ``started`` reports the bound ``(host, port)`` (port 0 picks a free
        one). An address that cannot be listened on (in use, not local, no
        permission) raises :class:`~kubelock.errors.UsageError` before
        ``started``, so the supervisor exits 2 before taking any lock.
        Cancelling the calling scope stops the server at once.
        """
        listener = await _listen(host, port)
        try:
            import hypercorn.config
            import hypercorn.trio

            class _Config(hypercorn.config.Config):
                # Hand hypercorn the socket already bound, so binding errors are ours.
                def create_sockets(self) -> hypercorn.config.Sockets:
                    return hypercorn.config.Sockets([], [listener], [])

            config = _Config()
            config.accesslog = None
            config.errorlog = _http_log
            if _http_log.level == logging.NOTSET:
                _http_log.setLevel(logging.WARNING)
            config.include_server_header = False
            from prometheus_client import make_asgi_app

            self._exposition = make_asgi_app(self.registry)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(
                        hypercorn.trio.serve,
                        self._asgi,
                        config,
                        # Never fires: cancelling the caller's scope is the one way to stop.
                        shutdown_trigger=trio.sleep_forever,
                        mode="asgi",
                    )
                )
                bound = listener.getsockname()
                task_status.started((bound[0], bound[1]))
        finally:
            listener.close()

    async def _asgi(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics" and self._exposition is not None:  # set by serve()
            await self._exposition(scope, receive, send)
            return
        if path == "/healthz":
            status, body = self._health_text()
        elif path == "/":
            status, body = 200, b"kubelock: see /metrics and /healthz\n"
        else:
            status, body = 404, b"not found: kubelock serves /metrics and /healthz\n"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    # -- Pushgateway ------------------------------------------------------------

    async def push(self, url: str) -> bool:
        """Push the current metrics to the Pushgateway at ``url``; True when it took them.

        Job ``kubelock``, grouping key: lock ``name`` and ``identity``, so each
        process keeps its own group. Runs in a worker thread, bounded by
        ``PUSH_TIMEOUT``; cancellation abandons the thread at once. A failure
        is logged on the ``kubelock`` logger and never raises.
        """
        return await self._push(url, failure_level=logging.WARNING)

    async def push_periodically(self, url: str, interval: float = PUSH_INTERVAL) -> None:
        """Push now and every ``interval`` seconds until cancelled; never raises.

        Of consecutive failures only the first is logged as a warning (the
        rest at debug level), so a Pushgateway that is down does not flood the log.
        """
        failing = False
        while True:
            pushed = await self._push(
                url, failure_level=logging.DEBUG if failing else logging.WARNING
            )
            failing = not pushed
            await trio.sleep(interval)

    async def _push(self, url: str, *, failure_level: int) -> bool:
        from prometheus_client import push_to_gateway

        def push() -> None:
            push_to_gateway(
                url,
                job=PUSH_JOB,
                registry=self.registry,
                grouping_key={"name": self.name, "identity": self.identity},
                timeout=PUSH_TIMEOUT,
            )

        try:
            await trio.to_thread.run_sync(push, abandon_on_cancel=True)
        except Exception as error:  # any failure: a push never changes the outcome
            _log.log(failure_level, "could not push metrics to %s: %s", url, error)
            return False
        return True


async def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; UsageError when impossible."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = (
            await trio.socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )[0]
    except socket.gaierror as error:
        raise UsageError(
            f"--metrics-address {shown}: unknown host ({error.strerror}); "
            "use an IP address such as 0.0.0.0 or 127.0.0.1"
        ) from None
    listener = socket.socket(family, kind, proto)
    try:
        # As every server does: a previous run's connections in TIME_WAIT must not
        # block a restart (Linux still refuses a port somebody listens on).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
        listener.setblocking(False)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise UsageError(
                f"--metrics-address {shown}: address already in use; choose another port or free it"
            ) from None
        raise UsageError(
            f"--metrics-address {shown}: cannot listen there ({error.strerror}); "
            "choose an address of this machine and a port you may use"
        ) from None
    return listener
