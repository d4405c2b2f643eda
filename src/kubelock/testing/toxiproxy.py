"""A real fault-injecting TCP proxy (Toxiproxy) for the chaos suite.

Where the binary comes from: `TOXIPROXY_BINARY` when set, else the per-user
cache `${XDG_CACHE_HOME:-~/.cache}/kubelock/toxiproxy-<version>/toxiproxy-server`,
built on first use from the Go module `github.com/Shopify/toxiproxy/v2` at
`TOXIPROXY_VERSION` exactly as the control plane and the Pushgateway are built
(`kubelock.testing.assets.build_go_command`, under a lock file).

`running_toxiproxy()` starts one on a free loopback port for a `with` block
and yields a small client of its HTTP API: proxies listen on loopback only.

`python -m kubelock.testing.toxiproxy` locates or builds it and prints its path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TextIO

import httpx

from ._logs import tail
from .assets import AssetsUnavailable, build_go_command, cache_root, exclusive
from .controlplane import Spawner, free_ports, terminate
from .versions import TOXIPROXY_VERSION

__all__ = ["Toxiproxy", "ToxiproxyUnavailable", "running_toxiproxy", "toxiproxy_binary"]

BINARY_VARIABLE: Final = "TOXIPROXY_BINARY"
STARTUP_TIMEOUT: Final = 30.0
_MODULE: Final = "github.com/Shopify/toxiproxy/v2"
_PACKAGE: Final = f"{_MODULE}/cmd/server"
_BINARY: Final = "toxiproxy-server"


class ToxiproxyUnavailable(RuntimeError):
    """No Toxiproxy could be found, built or started."""


def cache_entry() -> Path:
    return cache_root() / f"toxiproxy-{TOXIPROXY_VERSION}"


def toxiproxy_binary(*, progress: TextIO | None = None) -> Path:
    """The `toxiproxy-server` binary, built on first use. Raises `ToxiproxyUnavailable`."""
    out = sys.stderr if progress is None else progress
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        return Path(override)
    entry = cache_entry()
    binary = entry / _BINARY
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise ToxiproxyUnavailable(
            f"no Toxiproxy: install Go so {_MODULE}@{TOXIPROXY_VERSION} can be built, "
            f"or set {BINARY_VARIABLE} to a toxiproxy-server binary"
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(entry.parent / f"{entry.name}.lock", out):
        if not binary.is_file():  # another run built it while we waited
            try:
                build_go_command(go, _MODULE, TOXIPROXY_VERSION, _PACKAGE, _BINARY, entry, out)
            except AssetsUnavailable as error:
                raise ToxiproxyUnavailable(f"building Toxiproxy failed: {error}") from None
    return binary


class Toxiproxy:
    """A client of one running Toxiproxy's HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = httpx.Client(base_url=url, trust_env=False, timeout=10.0)

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        answer = self._client.request(method, path, json=body)
        if answer.status_code >= 300:
            raise ToxiproxyUnavailable(f"{method} {path}: HTTP {answer.status_code}: {answer.text}")
        return answer.json() if answer.content else None

    def proxy(self, name: str, upstream: str) -> int:
        """Create proxy ``name`` in front of ``upstream`` (HOST:PORT); return its loopback port."""
        created = self._call(
            "POST",
            "/proxies",
            {"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": True},
        )
        return int(str(created["listen"]).rpartition(":")[2])

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Disabled, the proxy refuses connections and resets the open ones."""
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def add_toxic(
        self, proxy: str, toxic: str, kind: str, attributes: Mapping[str, int], stream: str
    ) -> None:
        """Add toxic ``toxic`` of type ``kind`` (latency, timeout, reset_peer...) on ``stream``."""
        self._call(
            "POST",
            f"/proxies/{proxy}/toxics",
            {
                "name": toxic,
                "type": kind,
                "stream": stream,
                "toxicity": 1.0,
                "attributes": dict(attributes),
            },
        )

    def remove_toxic(self, proxy: str, toxic: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{toxic}")


@contextlib.contextmanager
def running_toxiproxy(*, binary: Path | None = None) -> Iterator[Toxiproxy]:
    """Run a Toxiproxy on a free loopback port; yield its client; stop it on exit."""
    path = binary or toxiproxy_binary()
    with tempfile.TemporaryDirectory(prefix="kubelock-toxiproxy-") as folder:
        log = Path(folder) / "toxiproxy.log"
        for attempt in range(3):  # a free port can be taken before the child binds it
            [port] = free_ports(1)
            child = Spawner.start([str(path), "-host", "127.0.0.1", "-port", str(port)], log)
            client = Toxiproxy(f"http://127.0.0.1:{port}")
            try:
                deadline = time.monotonic() + STARTUP_TIMEOUT
                while child.poll() is None and time.monotonic() < deadline:
                    with contextlib.suppress(httpx.TransportError):
                        if client._client.get("/version").status_code == 200:
                            yield client
                            return
                    time.sleep(0.05)
                if attempt == 2 or child.poll() is None:
                    raise ToxiproxyUnavailable(f"{path} did not start:\n{tail(log)}")
            finally:
                client.close()
                terminate(child)
    raise AssertionError("unreachable")


def main() -> int:
    try:
        print(toxiproxy_binary())
    except ToxiproxyUnavailable as error:
        print(f"kubelock.testing: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
