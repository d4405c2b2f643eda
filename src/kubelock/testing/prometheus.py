"""A real Prometheus server and promtool for the tests of deploy/monitoring/.

Where the binaries come from, first match wins: `PROMETHEUS_BINARY` /
`PROMTOOL_BINARY` when set (trusted as is), else `prometheus` / `promtool` on
PATH, as Debian's `prometheus` package installs them (`just test-tools` does).
The tests use the rules file format, `promtool check rules` / `test rules`
and the HTTP API's query, query_range and alerts endpoints, stable across
Prometheus 2.x.

`running_prometheus()` starts one on a free loopback port with a data folder
of its own for the duration of a `with` block; it never listens on any other
address, and never outlives the test process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from ._logs import tail
from .controlplane import Spawner, answers_ready, free_ports, terminate

__all__ = ["PrometheusUnavailable", "prometheus_binary", "promtool_binary", "running_prometheus"]

STARTUP_TIMEOUT: Final = 60.0
"""Seconds a started Prometheus has to answer ``/-/ready`` (it replays its empty WAL first)."""


class PrometheusUnavailable(RuntimeError):
    """No Prometheus (or promtool) could be found or started."""


def prometheus_binary() -> Path:
    """The Prometheus server binary; raises `PrometheusUnavailable` saying how to provide one."""
    return _binary("prometheus", "PROMETHEUS_BINARY")


def promtool_binary() -> Path:
    """promtool (rules checks and unit tests); raises `PrometheusUnavailable` when missing."""
    return _binary("promtool", "PROMTOOL_BINARY")


def _binary(name: str, variable: str) -> Path:
    override = os.environ.get(variable)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PrometheusUnavailable(
                f"{variable}={override} is not an executable file: point it at {name}, "
                "or unset it to use the one on PATH"
            )
        return path
    found = shutil.which(name)
    if found is None:
        raise PrometheusUnavailable(
            f"no {name} for the tests: run `just test-tools` (Debian: `apt-get install "
            f"prometheus`), or set {variable} to its path"
        )
    return Path(found)


@contextlib.contextmanager
def running_prometheus(
    config: str, *, rule_files: dict[str, str] | None = None, binary: Path | None = None
) -> Iterator[str]:
    """Run Prometheus with `config` (prometheus.yml's text) on a free 127.0.0.1 port.

    `rule_files` maps file names to their text, written beside the config
    (name them in the config's ``rule_files:``). Yields the server's URL; on
    exit stops it and removes its data folder.
    """
    path = binary or prometheus_binary()
    attempts = 3  # a free port can be taken between probing it and the child binding it
    with tempfile.TemporaryDirectory(prefix="kubelock-prometheus-") as folder:
        root = Path(folder)
        (root / "prometheus.yml").write_text(config)
        for name, text in (rule_files or {}).items():
            (root / name).write_text(text)
        log = root / "prometheus.log"
        for attempt in range(1, attempts + 1):
            [port] = free_ports(1)
            url = f"http://127.0.0.1:{port}"
            argv = [
                str(path),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ]
            child = Spawner.start(argv, log)
            try:
                if _wait_ready(child, url, log):
                    yield url
                    return
                if attempt == attempts:
                    raise PrometheusUnavailable(
                        f"{path} exited {child.returncode} at start-up:\n{tail(log)}"
                    )
            finally:
                terminate(child)
    raise AssertionError("unreachable")


def _wait_ready(child: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    """True once `/-/ready` answers 200; False when the child exited first."""
    try:
        return answers_ready(child, f"{url}/-/ready", STARTUP_TIMEOUT)
    except TimeoutError:
        raise PrometheusUnavailable(
            f"Prometheus at {url} was not ready within {STARTUP_TIMEOUT:g} s:\n{tail(log)}"
        ) from None
