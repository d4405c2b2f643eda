"""The queue on the lock object, with real kubelock processes against the real kube-apiserver.

Waiters take the lock in the order they came, with no refused write; a
waiter that died is passed over and its entry removed; a waiter stopped while
waiting takes its entry out; a waiter that may only poll is not passed over.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from kubelock.testing import ControlPlane

from .kubelock_proc import hold_until, lease, spawn, wait_for
from .test_deploy import LOCK_NAME, apply_base_rbac

QUICK = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
QUEUE_PREFIX = "queue.kubelock.io/"
# A write that did not land: a 409, or a 422 from a compare-and-swap whose test failed.
REFUSED_WRITE = re.compile(r"API (patch|update|create): (409|422)")


def options(kubeconfig: Path, namespace: str, identity: str, *extra: str) -> list[str]:
    return [
        "--kubeconfig",
        str(kubeconfig),
        "--namespace",
        namespace,
        "--name",
        "queue",
        "--id",
        identity,
        *QUICK,
        *extra,
    ]


def entries(admin: httpx.Client, namespace: str, name: str = "queue") -> list[str]:
    """The identities in the queue, as the lock object says."""
    found: dict[str, Any] = lease(admin, namespace, name) or {}
    annotations = (found.get("metadata") or {}).get("annotations") or {}
    return sorted(
        json.loads(value)["id"]
        for key, value in annotations.items()
        if key.startswith(QUEUE_PREFIX)
    )


def holder(admin: httpx.Client, namespace: str, name: str = "queue") -> str | None:
    found = lease(admin, namespace, name)
    return None if found is None else found["spec"].get("holderIdentity")


def test_waiters_take_the_lock_in_the_order_they_came_and_no_write_is_refused(
    kubeconfig: Path, namespace: str, admin: httpx.Client, tmp_path: Path
) -> None:
    log = tmp_path / "order"
    command = ["sh", "-c", f'echo "$KUBELOCK_IDENTITY" >> "{log}"; sleep 0.2']
    # The holder holds until all five are in line, however slowly they start.
    go = tmp_path / "go"
    first = spawn(
        [*options(kubeconfig, namespace, "first", "--verbose"), *hold_until(go)],
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: holder(admin, namespace) == "first", what="first to hold the lock")
    # Five waiters, each started once the one before it is in the queue.
    names = [f"w{index}" for index in range(5)]
    waiters = []
    for index, name in enumerate(names):
        waiters.append(
            spawn(
                [*options(kubeconfig, namespace, name, "--verbose"), *command],
                stderr=subprocess.PIPE,
            )
        )

        def joined(count: int = index + 1) -> bool:
            return len(entries(admin, namespace)) == count

        wait_for(joined, what=f"{name} to join the queue")
    go.touch()
    _, first_log = first.communicate(timeout=60)
    assert first.returncode == 0, first_log
    # Waiters joining while it held never made its renewals or release fail.
    assert not REFUSED_WRITE.search(first_log), first_log
    logs = [waiter.communicate(timeout=60)[1] for waiter in waiters]
    for index, (waiter, stderr) in enumerate(zip(waiters, logs, strict=True)):
        assert waiter.returncode == 0, stderr
        # Each says where it stands: those who came before it, still waiting.
        assert "held by 'first' since" in stderr, stderr
        assert f", {index} ahead in the queue" in stderr, stderr
        # A join, a take and a release each, all at the first try: never beaten
        # to the lock, nor refused for the others joining meanwhile.
        assert not REFUSED_WRITE.search(stderr), stderr
        assert stderr.count("API patch: 200") == 3, stderr
    assert log.read_text().split() == names
    assert entries(admin, namespace) == []


def test_a_release_recording_the_key_takes_the_entries_waiting_for_it_along(
    kubeconfig: Path, namespace: str, admin: httpx.Client, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    first = spawn(
        [*options(kubeconfig, namespace, "first", "--once", "v1"), *hold_until(go)],
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: holder(admin, namespace) == "first", what="first to hold the lock")
    waiters = []
    for name in ("w0", "w1"):
        waiters.append(
            spawn(
                [*options(kubeconfig, namespace, name, "--once", "v1", "--verbose"), "false"],
                stderr=subprocess.PIPE,
            )
        )

        def joined(count: int = len(waiters)) -> bool:
            return len(entries(admin, namespace)) == count

        wait_for(joined, what=f"{name} to join the queue")
    go.touch()
    assert first.wait(timeout=60) == 0
    for waiter in waiters:
        _, stderr = waiter.communicate(timeout=60)
        # The KEY was done: neither ran its (failing) command...
        assert waiter.returncode == 0, stderr
        assert "'v1' is done by 'first'" in stderr, stderr
        # ...and neither had to take its entry out: the release did, with the KEY.
        assert stderr.count("API patch: 200") == 1, stderr
    assert entries(admin, namespace) == []


def test_a_killed_waiter_is_passed_over_and_its_entry_removed(
    kubeconfig: Path, namespace: str, admin: httpx.Client, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    first = spawn(
        [*options(kubeconfig, namespace, "first"), *hold_until(go)], stderr=subprocess.DEVNULL
    )
    wait_for(lambda: holder(admin, namespace) == "first", what="first to hold the lock")
    doomed = spawn([*options(kubeconfig, namespace, "doomed"), "true"], stderr=subprocess.DEVNULL)
    wait_for(lambda: entries(admin, namespace) == ["doomed"], what="doomed to join the queue")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    patient = spawn([*options(kubeconfig, namespace, "patient"), "true"], stderr=subprocess.PIPE)
    wait_for(lambda: entries(admin, namespace) == ["doomed", "patient"], what="patient to join")
    go.touch()
    _, stderr = patient.communicate(timeout=60)
    assert patient.returncode == 0, stderr
    assert first.wait(timeout=60) == 0
    # patient took its turn after doomed's and removed doomed's entry with its own.
    assert entries(admin, namespace) == []


def test_a_waiter_stopped_while_waiting_takes_its_entry_out(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    first = spawn(
        [*options(kubeconfig, namespace, "first"), "sleep", "30"], stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: holder(admin, namespace) == "first", what="first to hold the lock")
        stopped = spawn(
            [*options(kubeconfig, namespace, "stopped"), "true"], stderr=subprocess.PIPE
        )
        wait_for(lambda: entries(admin, namespace) == ["stopped"], what="stopped to join")
        stopped.send_signal(signal.SIGTERM)
        _, stderr = stopped.communicate(timeout=30)
        assert stopped.returncode == 128 + signal.SIGTERM, stderr
        assert "left the queue" in stderr, stderr
        assert entries(admin, namespace) == []
        assert holder(admin, namespace) == "first"
    finally:
        first.terminate()
        first.wait(timeout=30)


def test_a_first_waiter_without_watch_takes_its_turn_before_a_later_one_that_watches(
    control_plane: ControlPlane,
    kubeconfig: Path,
    namespace: str,
    admin: httpx.Client,
    tmp_path: Path,
) -> None:
    # The Role's lock (its resourceNames), without watch: the waiter given it polls.
    apply_base_rbac(control_plane, admin, tmp_path, namespace, without="watch")
    without_watch = control_plane.in_cluster_environment(
        namespace, "kubelock", tmp_path / "serviceaccount"
    )
    # The default retry-period (2s): the polling waiter hears of a release up to 4.4s
    # late, far more than the 1s turn a waiter that watches has.
    admin_options = ["--kubeconfig", str(kubeconfig), "--namespace", namespace]
    log = tmp_path / "order"
    command = ["sh", "-c", f'echo "$KUBELOCK_IDENTITY" >> "{log}"']
    go = tmp_path / "go"
    first = spawn([*admin_options, "--id", "first", *hold_until(go)], stderr=subprocess.DEVNULL)
    wait_for(lambda: holder(admin, namespace, LOCK_NAME) == "first", what="first to hold")
    polling_log = tmp_path / "polling.stderr"
    with polling_log.open("w") as stderr_file:
        polling = spawn(
            ["--id", "polling", "--verbose", *command], env=without_watch, stderr=stderr_file
        )
    wait_for(
        lambda: "polling every" in polling_log.read_text(),
        what="the waiter without watch to be refused its watch",
    )
    watching = spawn([*admin_options, "--id", "watching", *command], stderr=subprocess.PIPE)

    def both_in_line() -> bool:
        return entries(admin, namespace, LOCK_NAME) == ["polling", "watching"]

    wait_for(both_in_line, what="both waiters to join the queue")
    # Released just after the polling waiter read the lock (still held): it hears
    # of the release only at its next poll, a retry-period or more later.
    gets = polling_log.read_text().count("API get: 200")
    wait_for(
        lambda: polling_log.read_text().count("API get: 200") > gets,
        what="the polling waiter to poll",
    )
    go.touch()
    assert first.wait(timeout=60) == 0
    _, watching_log = watching.communicate(timeout=60)
    assert watching.returncode == 0, watching_log
    assert polling.wait(timeout=60) == 0, polling_log.read_text()
    # The polling waiter came first and took its turn first: not passed over.
    assert log.read_text().split() == ["polling", "watching"], polling_log.read_text()
    assert "joining the queue again" not in polling_log.read_text()
    assert entries(admin, namespace, LOCK_NAME) == []
