"""The HTTP endpoint: ``/metrics`` (Prometheus text) and ``/healthz``, served by hypercorn.

Imported only when ``--metrics-address`` is given: it loads hypercorn and
prometheus-client's ASGI app, which a run without metrics never pays for.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import hypercorn.config
import hypercorn.trio
import trio
from prometheus_client import make_asgi_app

from .errors import UsageError
from .health import Health

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["serve"]

#: hypercorn's own messages go here; ``setup_logging`` lets only its warnings through.
HTTP_LOGGER = "kubelock.http"

# ASGI, loosely: hypercorn's TypedDicts are more than this small app needs.
_Scope = Mapping[str, Any]
_Receive = Callable[[], Awaitable[Any]]
_Send = Callable[[Any], Awaitable[None]]
_App = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class _BoundConfig(hypercorn.config.Config):
    """hypercorn's configuration, handed the socket kubelock already bound (so binding
    errors are kubelock's, reported before anything is written)."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__()
        self._listener = listener
        self.accesslog = None
        self.errorlog = logging.getLogger(HTTP_LOGGER)
        self.include_server_header = False

    def create_sockets(self) -> hypercorn.config.Sockets:
        return hypercorn.config.Sockets([], [self._listener], [])


async def serve(
    registry: CollectorRegistry,
    health: Health,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` (of ``registry``) and ``/healthz`` on ``host:port`` until cancelled.

    For ``nursery.start``: the socket is bound and listening before
    ``started`` reports the bound ``(host, port)`` (port 0 picks a free
    one). An address that cannot be listened on (in use, not local, no
    permission) raises :class:`~kubelock.errors.UsageError` before
    ``started``, so the supervisor exits 2 before taking any lock.
    Cancelling the calling scope stops the server at once.
    """
    listener = await _listen(host, port)
    try:
        app = functools.partial(_answer, make_asgi_app(registry), health)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    hypercorn.trio.serve,
                    app,
                    _BoundConfig(listener),
                    # Never fires: cancelling the caller's scope is the one way to stop.
                    shutdown_trigger=trio.sleep_forever,
                    mode="asgi",
                )
            )
            bound = listener.getsockname()
            task_status.started((bound[0], bound[1]))
    finally:
        listener.close()


async def _answer(
    exposition: _App, health: Health, scope: _Scope, receive: _Receive, send: _Send
) -> None:
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
    if path == "/metrics":
        await exposition(scope, receive, send)
        return
    if path == "/healthz":
        status, body = health.report()
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
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


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
