"""A real Prometheus Pushgateway for the tests of ``--pushgateway``.

Where the binary comes from, first match wins:

1. `PUSHGATEWAY_BINARY`, when set, names the binary; it is trusted as is (a
   path that is not an executable file is an error, not a reason to build).
2. The per-user cache `${XDG_CACHE_HOME:-~/.cache}/kubelock/pushgateway-<version>/
   pushgateway`, keyed by `PUSHGATEWAY_VERSION`.
3. A Pushgateway installed on PATH, as Debian's `prometheus-pushgateway`
   package installs it (`prometheus-pushgateway`, or `pushgateway`). The tests
   use only the push API and `/api/v1/metrics`, stable since Pushgateway 1.0,
   so any installed version serves.
4. Otherwise the cache entry is built from the Go module
   `github.com/prometheus/pushgateway` at `PUSHGATEWAY_VERSION` with the local
   Go toolchain, the same way `kubelock.testing.assets` builds the control
   plane: a throwaway module, `go mod tidy`, `go build`, in a temporary folder
   renamed into place when complete, under a lock file, progress on stderr.

`running_pushgateway()` starts one on a free loopback port for the duration of
a `with` block; it never listens on any other address.

`python -m kubelock.testing.pushgateway` locates or builds it and prints its path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final, TextIO

from ._logs import tail
from .assets import AssetsUnavailable, build_go_command, cache_root, exclusive
from .controlplane import Spawner, answers_ready, free_ports, terminate
from .versions import PUSHGATEWAY_VERSION

__all__ = [
    "BINARY_VARIABLE",
    "PUSHGATEWAY_VERSION",
    "PushgatewayUnavailable",
    "cache_entry",
    "pushgateway_binary",
    "running_pushgateway",
]

BINARY_VARIABLE: Final = "PUSHGATEWAY_BINARY"
INSTALLED_NAMES: Final = ("prometheus-pushgateway", "pushgateway")
"""Names a Pushgateway goes by on PATH: Debian's package, then upstream's."""

STARTUP_TIMEOUT: Final = 30.0
"""Seconds a started Pushgateway has to answer ``/-/ready``."""

_MODULE: Final = "github.com/prometheus/pushgateway"
"""The Go module built when no Pushgateway is installed."""


class PushgatewayUnavailable(RuntimeError):
    """No Pushgateway could be found, built or started."""


def cache_entry() -> Path:
    """The cache folder for `PUSHGATEWAY_VERSION` (holding the `pushgateway` binary)."""
    return cache_root() / f"pushgateway-{PUSHGATEWAY_VERSION}"


def pushgateway_binary(*, progress: TextIO | None = None) -> Path:
    """Return the Pushgateway binary, building it on first use (see the module docstring).

    `progress` (stderr by default) receives what is happening during a build.
    Raises `PushgatewayUnavailable` saying how to provide one.
    """
    out = sys.stderr if progress is None else progress
    override = os.environ.get(BINARY_VARIABLE)
    if override:
        binary = Path(override)
        if not _executable(binary):
            raise PushgatewayUnavailable(
                f"{BINARY_VARIABLE}={override} is not an executable file: point it at a "
                "Pushgateway binary, or unset it to use or build one"
            )
        return binary
    entry = cache_entry()
    if _executable(entry / "pushgateway"):
        return entry / "pushgateway"
    for name in INSTALLED_NAMES:
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    go = shutil.which("go")
    if go is None:
        raise PushgatewayUnavailable(
            _how_to_provide("none installed and no `go` on PATH to build one", suggest_go=True)
        )
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(entry.parent / f"{entry.name}.lock", out):
        if not _executable(entry / "pushgateway"):  # another run built it while we waited
            _build(go, entry, out)
    return entry / "pushgateway"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _how_to_provide(reason: str, *, suggest_go: bool = False) -> str:
    fixes = (
        "install one (Debian: `apt-get install prometheus-pushgateway`) or set "
        f"{BINARY_VARIABLE} to its path"
    )
    if suggest_go:
        fixes += (
            f", or install Go so the tests can build {_MODULE}@{PUSHGATEWAY_VERSION} "
            f"once into {cache_entry()}"
        )
    return f"no Pushgateway for the tests: {reason}; {fixes}"


def _build(go: str, entry: Path, out: TextIO) -> None:
    try:
        build_go_command(go, _MODULE, PUSHGATEWAY_VERSION, _MODULE, "pushgateway", entry, out)
    except AssetsUnavailable as error:
        raise PushgatewayUnavailable(_how_to_provide(f"building it failed: {error}")) from None


@contextlib.contextmanager
def running_pushgateway(
    *, binary: Path | None = None, startup_timeout: float = STARTUP_TIMEOUT
) -> Iterator[str]:
    """Run a Pushgateway on a free 127.0.0.1 port; yield its URL, stop it on exit.

    Started the way the control plane starts its children: its own process
    group, PR_SET_PDEATHSIG from one long-lived thread, so it never outlives
    this process. Metrics are kept in memory only.
    """
    path = binary or pushgateway_binary()
    attempts = 3  # a free port can be taken between probing it and the child binding it
    with tempfile.TemporaryDirectory(prefix="kubelock-pushgateway-") as folder:
        log = Path(folder) / "pushgateway.log"
        for attempt in range(1, attempts + 1):
            [port] = free_ports(1)
            url = f"http://127.0.0.1:{port}"
            child = Spawner.start(
                [str(path), f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log
            )
            try:
                if _wait_ready(child, url, startup_timeout, log):
                    yield url
                    return
                if attempt == attempts:
                    raise PushgatewayUnavailable(
                        f"{path} exited {child.returncode} at start-up:\n{tail(log)}"
                    )
            finally:
                terminate(child)
    raise AssertionError("unreachable")


def _wait_ready(child: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> bool:
    """True once `/-/ready` answers 200; False when the child exited first."""
    try:
        return answers_ready(child, f"{url}/-/ready", timeout)
    except TimeoutError:
        raise PushgatewayUnavailable(
            f"the Pushgateway at {url} was not ready within {timeout:g} s:\n{tail(log)}"
        ) from None


def main() -> int:
    """Locate or build the Pushgateway and print its path."""
    try:
        print(pushgateway_binary())
    except PushgatewayUnavailable as error:
        print(f"kubelock.testing: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
