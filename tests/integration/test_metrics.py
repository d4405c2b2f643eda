"""Metrics, health and Pushgateway of the real CLI, against the real kube-apiserver.

Each story runs `python -m kubelock` processes with short timings, scrapes
their endpoints on 127.0.0.1, and reads expositions with prometheus-client's
parser. Pushes go to a real Pushgateway.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
import trio

from kubelock.testing import ControlPlane
from kubelock.testing.pushgateway import running_pushgateway

from ..unit.test_metrics import Exposition

# Short enough for quick stories, long enough for a loaded 2-core machine.
TIMING = ("--lease-duration=15s", "--renew-deadline=3s", "--retry-period=1s")
LOCK_NAME = "migrations"
DEADLINE = 60.0  # seconds any one story may take before it fails


class Starter(Protocol):
    def __call__(
        self, identity: str, *options: str, command: list[str]
    ) -> subprocess.Popen[bytes]: ...


@pytest.fixture
def start_kubelock(kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[Starter]:
    """`start_kubelock(identity, *options, command=[...])`: a kubelock process, killed after."""
    started: list[subprocess.Popen[bytes]] = []
    env = {key: value for key, value in os.environ.items() if not key.startswith("KUBELOCK_")}

    def start(identity: str, *options: str, command: list[str]) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "kubelock",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={namespace}",
            f"--name={LOCK_NAME}",
            f"--id={identity}",
            *TIMING,
            *options,
            "--",
            *command,
        ]
        with open(tmp_path / f"{identity}.stderr", "ab") as stderr:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def stderr_of(tmp_path: Path, identity: str) -> str:
    return (tmp_path / f"{identity}.stderr").read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def waits_for(path: Path) -> list[str]:
    """A child that runs until `path` exists (at most a minute), then prints the time."""
    return python(
        "import os, time\n"
        f"end = time.monotonic() + {DEADLINE}\n"
        f"while not os.path.exists({str(path)!r}) and time.monotonic() < end:\n"
        "    time.sleep(0.05)\n"
        "print(time.time(), flush=True)\n"
    )


async def get(port: int, path: str) -> httpx.Response:
    """GET from a kubelock endpoint, retrying until it listens (the process may be starting)."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        while True:
            try:
                return await client.get(f"http://127.0.0.1:{port}{path}")
            except httpx.ConnectError:
                await trio.sleep(0.05)


async def scrape(port: int) -> Exposition:
    answer = await get(port, "/metrics")
    assert answer.status_code == 200
    return Exposition(answer.text)


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (every 50 ms) until it holds; the story's deadline bounds the wait."""
    with trio.move_on_after(DEADLINE):
        while not check():  # noqa: ASYNC110 (a process or file to poll, nothing to wait on)
            await trio.sleep(0.05)
        return
    raise AssertionError(f"waited {DEADLINE:g} s for {what}")


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    await until(lambda: process.poll() is not None, "process exit")
    assert process.returncode is not None
    return process.returncode


@pytest.fixture(scope="module")
def pushgateway() -> Iterator[str]:
    with running_pushgateway() as url:
        yield url


async def pushed(pushgateway: str, identity: str) -> Exposition:
    """The metrics the Pushgateway holds for one kubelock, checking its grouping key."""
    key = {"job": "kubelock", "name": LOCK_NAME, "identity": identity}
    async with httpx.AsyncClient(trust_env=False) as client:
        groups = (await client.get(f"{pushgateway}/api/v1/metrics")).json()["data"]
        assert key in [group["labels"] for group in groups]
        text = (await client.get(f"{pushgateway}/metrics")).text
    exposition = Exposition(text)
    exposition.samples = [s for s in exposition.samples if key.items() <= s.labels.items()]
    return exposition


LOCK = {"name": LOCK_NAME}


async def test_a_waiter_shows_waiting_then_pushes_one_wait_and_one_hold(
    start_kubelock: Starter, pushgateway: str, tmp_path: Path
) -> None:
    holder_port, waiter_port = free_port(), free_port()
    done = tmp_path / "holder-may-finish"
    holder = start_kubelock(
        "holder", f"--metrics-address=127.0.0.1:{holder_port}", command=waits_for(done)
    )
    with trio.fail_after(DEADLINE):
        while True:  # the holder's endpoint says when it holds the lock
            if (await scrape(holder_port)).value("kubelock_lock_held", **LOCK) == 1:
                break
            await trio.sleep(0.05)

    waiter = start_kubelock(
        "waiter",
        f"--metrics-address=127.0.0.1:{waiter_port}",
        f"--pushgateway={pushgateway}",
        command=python("import time; time.sleep(1)"),
    )
    seen = await scrape(waiter_port)
    seen_waiting_at = time.time()
    assert seen.value("kubelock_waiting", **LOCK) == 1
    assert seen.value("kubelock_lock_held", **LOCK) == 0
    assert seen.value("kubelock_acquisitions_total", **LOCK) == 0
    assert (await get(waiter_port, "/healthz")).status_code == 200, "healthy while waiting"
    assert (await get(holder_port, "/healthz")).status_code == 200, "healthy while holding"

    done.touch()
    assert await wait_exit(holder) == 0
    assert holder.stdout is not None
    holder_finished_at = float(holder.stdout.read())
    assert await wait_exit(waiter) == 0

    final = await pushed(pushgateway, "waiter")
    assert final.value("kubelock_acquisitions_total", **LOCK) == 1
    assert final.value("kubelock_lock_wait_seconds_count", **LOCK) == 1
    assert final.value("kubelock_lock_hold_seconds_count", **LOCK) == 1
    assert final.value("kubelock_lock_hold_seconds_sum", **LOCK) >= 1.0
    # It waited at least from when it was seen waiting until the holder's command ended.
    assert final.value("kubelock_lock_wait_seconds_sum", **LOCK) >= (
        holder_finished_at - seen_waiting_at
    )
    assert final.value("kubelock_releases_total", **LOCK) == 1
    assert final.value("kubelock_child_exit_code", **LOCK) == 0
    assert final.value("kubelock_waiting", **LOCK) == 0


async def test_healthz_turns_503_while_a_lost_lease_stops_the_command(
    start_kubelock: Starter, control_plane: ControlPlane, tmp_path: Path
) -> None:
    port = free_port()
    ready = tmp_path / "child-ready"
    # The command takes 8 s to exit on SIGTERM: longer than renew-deadline +
    # tolerance after the loss, shorter than the lease's safety deadline.
    slow_to_stop = python(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(8), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(120)\n"
    )
    holder = start_kubelock("holder", f"--metrics-address=127.0.0.1:{port}", command=slow_to_stop)
    await until(ready.exists, "the command to start")
    assert (await get(port, "/healthz")).status_code == 200

    control_plane.stop_apiserver()
    try:
        with trio.fail_after(DEADLINE):
            while True:
                health = await get(port, "/healthz")
                if health.status_code != 200:
                    break
                await trio.sleep(0.1)
        assert holder.poll() is None, "503 came before kubelock ended"
        assert health.status_code == 503
        assert "renewal overdue" in health.text
        seen = await scrape(port)
        assert seen.value("kubelock_lost_total", **LOCK) == 1
        assert seen.value("kubelock_renewals_total", result="failure", **LOCK) >= 1
        assert await wait_exit(holder) == 75
    finally:
        control_plane.start_apiserver()


async def test_a_run_pushes_its_final_metrics_under_job_name_and_identity(
    start_kubelock: Starter, pushgateway: str
) -> None:
    run = start_kubelock("pusher", f"--pushgateway={pushgateway}", command=["true"])
    assert await wait_exit(run) == 0
    final = await pushed(pushgateway, "pusher")
    assert final.value("kubelock_acquisitions_total", **LOCK) == 1
    assert final.value("kubelock_child_exit_code", **LOCK) == 0
    assert final.value("kubelock_info", identity="pusher", lock_type="leases", **LOCK) == 1


async def test_a_metrics_port_in_use_exits_2_before_any_lease_is_written(
    start_kubelock: Starter, control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = start_kubelock("blocked", f"--metrics-address=127.0.0.1:{port}", command=["true"])
        assert await wait_exit(run) == 2
    message = stderr_of(tmp_path, "blocked")
    assert (
        f"--metrics-address 127.0.0.1:{port}: address already in use; "
        "choose another port or free it"
    ) in message
    assert "Traceback" not in message
    with control_plane.admin_client() as admin:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LOCK_NAME}"
        assert admin.get(path).status_code == 404
