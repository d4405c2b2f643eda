"""Lock objects written by somebody careless or hostile, with real kubelock processes
against the real kube-apiserver (issue 22).

Anyone with ``patch`` on the lock object writes what kubelock parses: whatever
they write, ``--once`` still runs, records its KEY and releases; waiters do not
crash; and ``--status`` never hands a terminal escape to the operator's terminal.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from kubelock.locks.handoff import HANDOFF_ANNOTATION
from kubelock.locks.once import DONE_ANNOTATION
from kubelock.locks.queue import QUEUE_PREFIX
from kubelock.locks.record import LEADER_ANNOTATION

from .kubelock_proc import lease, run, spawn, wait_for

QUICK = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
CONFIGMAPS = "/api/v1/namespaces/{namespace}/configmaps"
#: In UTC this is before year 1.
BEFORE_YEAR_ONE = "0001-01-01T00:00:00+01:00"
#: Nested far deeper than Python's JSON parser goes.
NESTED = "[" * 20_000 + "]" * 20_000
#: Retitles the terminal, then clears it.
TERMINAL_ESCAPES = "pod-a\x1b]0;owned\x07\x1b[2J"
HOSTILE_ANNOTATIONS = {
    DONE_ANNOTATION: NESTED,
    QUEUE_PREFIX + "0000000000000001": NESTED,
    QUEUE_PREFIX + "0000000000000002": json.dumps({"id": "ghost", "since": BEFORE_YEAR_ONE}),
    QUEUE_PREFIX + "0000000000000003": json.dumps({"id": "x" * 150_000}),
    HANDOFF_ANNOTATION: "1e999",
}


def options(kubeconfig: Path, namespace: str, identity: str, *extra: str) -> list[str]:
    return [
        *("--kubeconfig", str(kubeconfig), "--namespace", namespace, "--name", "app"),
        *("--id", identity, *QUICK, *extra),
    ]


def annotate(admin: httpx.Client, namespace: str, annotations: dict[str, str]) -> None:
    """What anyone with ``patch`` on the Lease can do: a merge patch of its annotations."""
    response = admin.patch(
        f"{LEASES.format(namespace=namespace)}/app",
        json={"metadata": {"annotations": annotations}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    response.raise_for_status()


def annotations_on(admin: httpx.Client, namespace: str) -> dict[str, str]:
    found: dict[str, Any] = lease(admin, namespace, "app") or {}
    result: dict[str, str] = (found.get("metadata") or {}).get("annotations") or {}
    return result


def done_keys(admin: httpx.Client, namespace: str) -> list[str]:
    value = annotations_on(admin, namespace).get(DONE_ANNOTATION) or "[]"
    return [done["key"] for done in json.loads(value)]


def holder(admin: httpx.Client, namespace: str) -> str | None:
    found = lease(admin, namespace, "app")
    return None if found is None else found["spec"].get("holderIdentity")


def test_once_runs_records_the_key_and_releases_on_a_lease_with_malformed_annotations(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "app", "annotations": HOSTILE_ANNOTATIONS},
        "spec": {
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "acquireTime": "0001-01-01T00:00:00.000000+01:00",
            "renewTime": "0001-01-01T00:00:00.000000+01:00",
        },
    }
    admin.post(LEASES.format(namespace=namespace), json=body).raise_for_status()
    result = run([*options(kubeconfig, namespace, "first"), "--once", "v1", "true"])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert done_keys(admin, namespace) == ["v1"]
    assert holder(admin, namespace) == ""


def test_waiters_survive_malformed_annotations_written_while_they_wait(
    kubeconfig: Path, namespace: str, admin: httpx.Client, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    # Holds the lock until the test says go: no timing to guess.
    held = ["sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.05; done', "sh", str(go)]
    first = spawn(
        [*options(kubeconfig, namespace, "first"), "--once", "v1", *held], stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: holder(admin, namespace) == "first", what="first to hold the lock")
        waiting = spawn(
            [*options(kubeconfig, namespace, "waiting"), "--once", "v1", "false"],
            stderr=subprocess.PIPE,
        )

        def in_queue() -> bool:
            return (
                sum(key.startswith(QUEUE_PREFIX) for key in annotations_on(admin, namespace)) == 1
            )

        wait_for(in_queue, what="the first waiter to join the queue")
        annotate(admin, namespace, HOSTILE_ANNOTATIONS)
        # This one reads the malformed annotations before it can join the queue.
        late = spawn(
            [*options(kubeconfig, namespace, "late"), "--once", "v1", "false"],
            stderr=subprocess.PIPE,
        )

        def late_in_queue() -> bool:
            return (
                sum(key.startswith(QUEUE_PREFIX) for key in annotations_on(admin, namespace)) == 5
            )

        wait_for(late_in_queue, what="the late waiter to join the queue")
    finally:
        go.touch()
    _, first_log = first.communicate(timeout=60)
    assert first.returncode == 0, first_log
    for waiter in (waiting, late):
        _, stderr = waiter.communicate(timeout=60)
        # Neither ran its (failing) command: the KEY was recorded as done.
        assert waiter.returncode == 0, stderr
        assert "'v1' is done by 'first'" in stderr, stderr
    assert done_keys(admin, namespace) == ["v1"]
    assert holder(admin, namespace) == ""


def test_once_runs_on_a_configmap_whose_record_times_overflow(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    record = {
        "holderIdentity": "",
        "leaseDurationSeconds": 1,
        "acquireTime": BEFORE_YEAR_ONE,
        "renewTime": BEFORE_YEAR_ONE,
        "leaderTransitions": 3,
    }
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "app", "annotations": {LEADER_ANNOTATION: json.dumps(record)}},
    }
    admin.post(CONFIGMAPS.format(namespace=namespace), json=body).raise_for_status()
    argv = [*options(kubeconfig, namespace, "first", "--lock-type", "configmaps"), "--once", "v1"]
    result = run([*argv, "true"])
    assert result.returncode == 0, result.stderr
    response = admin.get(f"{CONFIGMAPS.format(namespace=namespace)}/app")
    response.raise_for_status()
    written = response.json()["metadata"]["annotations"]
    assert json.loads(written[DONE_ANNOTATION])[0]["key"] == "v1"
    assert json.loads(written[LEADER_ANNOTATION])["leaderTransitions"] == 4


def test_a_configmap_record_that_does_not_parse_is_waited_out_for_a_lease_then_replaced(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "app",
            "annotations": {
                LEADER_ANNOTATION: '{"holderIdentity": "x", "leaseDurationSeconds": 1e999}'
            },
        },
    }
    admin.post(CONFIGMAPS.format(namespace=namespace), json=body).raise_for_status()
    started = time.monotonic()
    result = run([*options(kubeconfig, namespace, "first", "--lock-type", "configmaps"), "true"])
    # Whoever wrote it may be running: never taken as free, only after a lease (6 s).
    assert time.monotonic() - started >= 6
    assert result.returncode == 0, result.stderr
    response = admin.get(f"{CONFIGMAPS.format(namespace=namespace)}/app")
    response.raise_for_status()
    written = json.loads(response.json()["metadata"]["annotations"][LEADER_ANNOTATION])
    assert written["holderIdentity"] == ""  # taken, then released


def test_status_shows_terminal_escapes_in_the_holder_and_waiters_escaped(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "app",
            "annotations": {
                QUEUE_PREFIX + "0000000000000001": json.dumps({"id": "w\u202eevil\x9b"}),
            },
        },
        "spec": {"holderIdentity": TERMINAL_ESCAPES, "leaseDurationSeconds": 60},
    }
    admin.post(LEASES.format(namespace=namespace), json=body).raise_for_status()
    status = ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--name", "app"]
    text = run([*status, "--status"])
    assert text.returncode == 0, text.stderr
    assert not any(character in text.stdout for character in "\x1b\x07\x9b\u202e")
    assert "holder:       pod-a\\x1b]0;owned\\x07\\x1b[2J\n" in text.stdout
    assert "  w\\u202eevil\\x9b  since -" in text.stdout
    as_json = run([*status, "--status", "-o", "json"])
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout.isascii()
    view = json.loads(as_json.stdout)
    assert view["holder"] == TERMINAL_ESCAPES
    assert [waiter["identity"] for waiter in view["waiters"]] == ["w\u202eevil\x9b"]
