"""The chaos suite's fault-injecting proxy: a real Toxiproxy in front of a loopback echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from kubelock.testing.toxiproxy import Toxiproxy, running_toxiproxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Toxiproxy, int]]:
    """A Toxiproxy, and the loopback port of its proxy "echo" in front of an echo server."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with running_toxiproxy() as proxy:
            port = proxy.proxy("echo", f"127.0.0.1:{server.server_address[1]}")
            yield proxy, port
        server.shutdown()


def round_trip(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"ping")
        assert connection.recv(4) == b"ping"
    return time.monotonic() - started


def test_it_passes_traffic_through(proxied: tuple[Toxiproxy, int]) -> None:
    _, port = proxied
    round_trip(port)


def test_a_latency_toxic_delays_answers_until_removed(proxied: tuple[Toxiproxy, int]) -> None:
    proxy, port = proxied
    proxy.add_toxic("echo", "slow", "latency", {"latency": 300}, "downstream")
    try:
        assert round_trip(port) >= 0.3
    finally:
        proxy.remove_toxic("echo", "slow")


def test_a_disabled_proxy_refuses_connections(proxied: tuple[Toxiproxy, int]) -> None:
    proxy, port = proxied
    proxy.set_enabled("echo", False)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
    finally:
        proxy.set_enabled("echo", True)
    round_trip(port)
