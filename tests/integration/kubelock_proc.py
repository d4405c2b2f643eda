"""Running kubelock as a real process, as a user (or a Pod) runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

#: Run this file instead of `python -m kubelock` (the single-file executable, say).
EXECUTABLE_VARIABLE = "KUBELOCK_EXECUTABLE"


def kubelock_argv(*args: str) -> list[str]:
    executable = os.environ.get(EXECUTABLE_VARIABLE)
    if executable:
        return [executable, *args]
    return [sys.executable, "-m", "kubelock", *args]


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any cluster configuration of the machine's own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("KUBELOCK_", "KUBERNETES_")) and key != "KUBECONFIG"
    }
    if EXECUTABLE_VARIABLE in os.environ:
        env[EXECUTABLE_VARIABLE] = os.environ[EXECUTABLE_VARIABLE]
    env.update(extra or {})
    return env


def spawn(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        kubelock_argv(*args),
        env=clean_environment(env),
        text=True,
        **popen,
    )


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kubelock_argv(*args),
        env=clean_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lease(admin: httpx.Client, namespace: str, name: str) -> dict[str, Any] | None:
    response = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def lease_names(admin: httpx.Client, namespace: str) -> list[str]:
    response = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases")
    response.raise_for_status()
    return [item["metadata"]["name"] for item in response.json()["items"]]


def renew_time(lease_object: dict[str, Any]) -> float:
    """The Lease's renewTime as a Unix timestamp (written by kubelock on this machine)."""
    text = lease_object["spec"]["renewTime"].replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def read_intervals(path: Path) -> list[tuple[str, float, float]]:
    """Lines `NAME START END` written by the children: who held the lock, and when."""
    intervals = []
    for line in path.read_text().splitlines():
        name, start, end = line.split()
        intervals.append((name, float(start), float(end)))
    return sorted(intervals, key=lambda interval: interval[1])


# A child that records when it held the lock: `NAME START END`, appended to a file.
HOLD = 'start=$(date +%s.%N); sleep "$2"; echo "$1 $start $(date +%s.%N)" >> "$3"'


def hold_command(name: str, seconds: float, log: Path) -> list[str]:
    return ["sh", "-c", HOLD, "sh", name, str(seconds), str(log)]


# A child that holds the lock until the test says so: it waits for a file to appear.
WAIT_FOR_FILE = 'while [ ! -e "$1" ]; do sleep 0.02; done'


def hold_until(go: Path) -> list[str]:
    """A command that runs until the test creates ``go`` (an event, not a duration)."""
    return ["sh", "-c", WAIT_FOR_FILE, "sh", str(go)]


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
