"""--once, --timeout and --status, run as real processes against the real kube-apiserver."""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelock.errors import EXIT_TIMEOUT
from kubelock.locks.once import DONE_ANNOTATION
from kubelock.locks.record import format_micro_time
from kubelock.testing import ControlPlane, IdentityFactory

from .kubelock_proc import (
    clean_environment,
    hold_command,
    lease,
    read_intervals,
    run,
    spawn,
    wait_for,
)

QUICK = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def options(kubeconfig: Path, namespace: str, name: str, *extra: str) -> list[str]:
    return ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--name", name, *extra]


def counting_command(log: Path, seconds: float, status: int = 0) -> list[str]:
    """Appends one line per run to ``log``, sleeps, exits ``status``."""
    script = f'echo "$KUBELOCK_IDENTITY" >> "$1"; sleep {seconds}; exit {status}'
    return ["sh", "-c", script, "sh", str(log)]


def done_entries(admin: httpx.Client, namespace: str, name: str) -> list[dict[str, Any]]:
    record = lease(admin, namespace, name)
    assert record is not None
    value = (record["metadata"].get("annotations") or {}).get(DONE_ANNOTATION)
    return json.loads(value) if value else []


def write_held_lease(
    admin: httpx.Client, namespace: str, name: str, holder: str, seconds: int = 60
) -> dict[str, Any]:
    """A Lease held by somebody who never renews nor releases (for as long as a test runs)."""
    now = format_micro_time(datetime.now(UTC))
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "annotations": {"example.com/owner": "someone else"}},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": seconds,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 4,
        },
    }
    response = admin.post(LEASES.format(namespace=namespace), json=body)
    response.raise_for_status()
    created: dict[str, Any] = response.json()
    return created


# --- --once --------------------------------------------------------------------------


def test_ten_contenders_with_once_run_the_command_exactly_once(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    runs = tmp_path / "runs"
    processes = [
        spawn(
            [
                *options(kubeconfig, namespace, "migrate", "--id", f"pod-{index}", *QUICK),
                "--once",
                "v1",
                *counting_command(runs, 2),
            ],
            stderr=subprocess.PIPE,
        )
        for index in range(10)
    ]
    outcomes = [(process.wait(timeout=120), process.stderr) for process in processes]
    assert [code for code, _ in outcomes] == [0] * 10, [
        stderr.read() for _, stderr in outcomes if stderr
    ]
    ran = runs.read_text().split()
    assert len(ran) == 1
    [done] = done_entries(admin, namespace, "migrate")
    assert done["key"] == "v1"
    assert done["by"] == ran[0]
    record = lease(admin, namespace, "migrate")
    assert record is not None
    assert done["token"] == record["spec"]["leaseTransitions"]
    assert record["spec"]["holderIdentity"] == ""

    # A contender arriving later with the same KEY exits 0 without running it,
    # and without writing anything.
    version = record["metadata"]["resourceVersion"]
    late = run(
        [
            *options(kubeconfig, namespace, "migrate", "--id", "late"),
            "--once",
            "v1",
            *counting_command(runs, 0),
        ]
    )
    assert late.returncode == 0, late.stderr
    assert runs.read_text().split() == ran
    assert f"'v1' is done by '{ran[0]}'" in late.stderr
    after = lease(admin, namespace, "migrate")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == version


def test_a_failed_run_records_nothing_and_the_next_contender_runs_the_key(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    runs = tmp_path / "runs"
    failing = run(
        [
            *options(kubeconfig, namespace, "migrate", "--id", "first"),
            "--once",
            "v2",
            *counting_command(runs, 0, status=3),
        ]
    )
    assert failing.returncode == 3, failing.stderr
    assert done_entries(admin, namespace, "migrate") == []
    succeeding = run(
        [
            *options(kubeconfig, namespace, "migrate", "--id", "second"),
            "--once",
            "v2",
            *counting_command(runs, 0),
        ]
    )
    assert succeeding.returncode == 0, succeeding.stderr
    assert runs.read_text().split() == ["first", "second"]
    assert [(d["key"], d["by"]) for d in done_entries(admin, namespace, "migrate")] == [
        ("v2", "second")
    ]


def test_a_waiter_learns_from_its_watch_that_the_key_is_done(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """With a 30 s retry period, only the watch explains the waiter leaving within seconds."""
    slow = ["--lease-duration", "60s", "--renew-deadline", "40s", "--retry-period", "30s"]
    runs = tmp_path / "runs"
    holder = spawn(
        [
            *options(kubeconfig, namespace, "migrate", "--id", "holder", *slow),
            "--once",
            "v3",
            *counting_command(runs, 3),
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(runs.exists, what="the holder's command to start")
    waiter = spawn(
        [
            *options(kubeconfig, namespace, "migrate", "--id", "waiter", *slow),
            "--once",
            "v3",
            *counting_command(runs, 0),
        ],
        stderr=subprocess.PIPE,
    )
    assert holder.wait(timeout=60) == 0
    released = time.monotonic()
    assert waiter.wait(timeout=60) == 0
    assert time.monotonic() - released < 10  # well before its 30 s poll
    assert runs.read_text().split() == ["holder"]


# --- --timeout ------------------------------------------------------------------------


def test_timeout_behind_a_holder_exits_124_and_leaves_the_lock_unchanged(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    write_held_lease(admin, namespace, "busy", "somebody")
    before = lease(admin, namespace, "busy")
    marker = tmp_path / "ran"
    started = time.monotonic()
    result = run([*options(kubeconfig, namespace, "busy"), "--timeout", "2s", "touch", str(marker)])
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert "gave up waiting for the lock leases" in result.stderr
    assert "held by 'somebody'" in result.stderr
    assert elapsed >= 2
    assert not marker.exists()
    assert lease(admin, namespace, "busy") == before


def test_timeout_zero_tries_once_and_exits_at_once(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    write_held_lease(admin, namespace, "busy", "somebody")
    before = lease(admin, namespace, "busy")
    marker = tmp_path / "ran"
    started = time.monotonic()
    result = run([*options(kubeconfig, namespace, "busy"), "--timeout", "0", "touch", str(marker)])
    elapsed = time.monotonic() - started
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert not marker.exists()
    assert lease(admin, namespace, "busy") == before
    # What took the time was starting Python, never a wait: far below a retry period
    # of waiting plus start-up.
    assert elapsed < 2 + 2
    # On a free lock, the one try takes it.
    free = run([*options(kubeconfig, namespace, "free"), "--timeout", "0", "touch", str(marker)])
    assert free.returncode == 0, free.stderr
    assert marker.exists()


def test_a_done_key_wins_over_timeout(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    runs = tmp_path / "runs"
    first = run(
        [
            *options(kubeconfig, namespace, "migrate"),
            "--once",
            "v4",
            *counting_command(runs, 0),
        ]
    )
    assert first.returncode == 0, first.stderr
    record = lease(admin, namespace, "migrate")
    assert record is not None
    # Somebody holds the lock now: --timeout 0 would fail, but the KEY is done.
    record["spec"]["holderIdentity"] = "somebody"
    record["spec"]["leaseDurationSeconds"] = 60
    record["spec"]["renewTime"] = format_micro_time(datetime.now(UTC))
    admin.put(f"{LEASES.format(namespace=namespace)}/migrate", json=record).raise_for_status()
    again = run(
        [
            *options(kubeconfig, namespace, "migrate"),
            "--once",
            "v4",
            "--timeout",
            "0",
            *counting_command(runs, 0),
        ]
    )
    assert again.returncode == 0, again.stderr
    assert len(runs.read_text().split()) == 1


# --- contenders that know nothing of --once -----------------------------------------


class ClientGoContender:
    """A contender as client-go's LeaseLock writes: GET the Lease, and when it is free
    or expired, PUT the fetched object back with only ``spec`` changed (so annotations
    it does not know survive), conditional on its resourceVersion."""

    def __init__(self, admin: httpx.Client, namespace: str, name: str, log: Path) -> None:
        self.admin = admin
        self.url = f"{LEASES.format(namespace=namespace)}/{name}"
        self.log = log
        self.conflicts = 0

    def hold_once(self, seconds: float, lease_seconds: int = 6) -> None:
        observed: tuple[str, float] | None = None  # (resourceVersion, local time seen)
        while True:
            response = self.admin.get(self.url)
            if response.status_code == 404:
                time.sleep(0.1)
                continue
            response.raise_for_status()
            obj = response.json()
            spec = obj["spec"]
            version = obj["metadata"]["resourceVersion"]
            if observed is None or observed[0] != version:
                observed = (version, time.monotonic())
            expired = time.monotonic() > observed[1] + spec.get("leaseDurationSeconds", 0)
            if spec.get("holderIdentity") and not expired:
                time.sleep(0.2)  # client-go's retry period, shortened
                continue
            now = format_micro_time(datetime.now(UTC))
            obj["spec"] = {
                **spec,
                "holderIdentity": "client-go",
                "leaseDurationSeconds": lease_seconds,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": spec.get("leaseTransitions", 0) + 1,
            }
            obj["metadata"].setdefault("annotations", {})["example.com/written-by"] = "client-go"
            answer = self.admin.put(self.url, json=obj)
            if answer.status_code == 409:
                self.conflicts += 1
                continue
            answer.raise_for_status()
            break
        start = time.time()
        time.sleep(seconds)
        end = time.time()
        obj = answer.json()
        obj["spec"] = {
            **obj["spec"],
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "renewTime": format_micro_time(datetime.now(UTC) - timedelta(seconds=0)),
        }
        self.admin.put(self.url, json=obj).raise_for_status()
        with self.log.open("a") as file:
            file.write(f"client-go {start} {end}\n")


def test_a_client_go_contender_excludes_and_is_excluded_and_keeps_the_done_keys(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    log = tmp_path / "holds"
    runs = tmp_path / "runs"
    first = spawn(
        [
            *options(kubeconfig, namespace, "shared", "--id", "first", *QUICK),
            "--once",
            "m1",
            *hold_command("first", 2, log),
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: lease(admin, namespace, "shared"), what="the first holder")
    go = ClientGoContender(admin, namespace, "shared", log)
    go_thread = threading.Thread(target=go.hold_once, args=(2,))
    go_thread.start()
    time.sleep(0.5)
    second = spawn(
        [
            *options(kubeconfig, namespace, "shared", "--id", "second", *QUICK),
            "--once",
            "m2",
            *hold_command("second", 2, log),
        ],
        stderr=subprocess.PIPE,
    )
    assert first.wait(timeout=60) == 0
    go_thread.join(timeout=60)
    assert second.wait(timeout=60) == 0
    intervals = read_intervals(log)
    assert sorted(name for name, _, _ in intervals) == ["client-go", "first", "second"]
    for (_, _, end), (_, next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start
    # The client-go writes kept kubelock's done KEYs, and kubelock's kept its annotation.
    assert [entry["key"] for entry in done_entries(admin, namespace, "shared")] == ["m1", "m2"]
    record = lease(admin, namespace, "shared")
    assert record is not None
    assert record["metadata"]["annotations"]["example.com/written-by"] == "client-go"
    # And m1 stays done for kubelock, whoever held the lock since.
    again = run(
        [*options(kubeconfig, namespace, "shared"), "--once", "m1", *counting_command(runs, 0)]
    )
    assert again.returncode == 0, again.stderr
    assert not runs.exists()


# --- --status ---------------------------------------------------------------------------


def test_status_shows_a_held_lock_with_its_done_keys(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    runs = tmp_path / "runs"
    for key in ("v1", "v2"):
        result = run(
            [
                *options(kubeconfig, namespace, "app", "--id", f"ran-{key}"),
                "--once",
                key,
                *counting_command(runs, 0),
            ]
        )
        assert result.returncode == 0, result.stderr
    holder = spawn(
        [*options(kubeconfig, namespace, "app", "--id", "holder-pod", *QUICK), "sleep", "30"],
        stderr=subprocess.PIPE,
    )
    try:

        def held() -> bool:
            record = lease(admin, namespace, "app")
            return bool(record and record["spec"].get("holderIdentity") == "holder-pod")

        wait_for(held, what="holder-pod to hold the lock")
        waiters = []
        for name, extra in (("first-waiter", ["--once", "v3"]), ("second-waiter", [])):
            waiters.append(
                spawn(
                    [*options(kubeconfig, namespace, "app", "--id", name, *extra), "true"],
                    stderr=subprocess.DEVNULL,
                )
            )

            def joined(count: int = len(waiters)) -> bool:
                record = lease(admin, namespace, "app") or {}
                entries = (record.get("metadata") or {}).get("annotations") or {}
                joined: int = sum(key.startswith("queue.kubelock.io/") for key in entries)
                return joined == count

            wait_for(joined, what=f"{name} to join the queue")
        text = run([*options(kubeconfig, namespace, "app"), "--status"])
        as_json = run([*options(kubeconfig, namespace, "app"), "--status", "-o", "json"])
    finally:
        for process in [holder, *waiters]:
            process.terminate()
            process.wait(timeout=30)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == f"lock:         leases {namespace}/app"
    assert lines[1] == "holder:       holder-pod"
    assert any(line.startswith("last renewal: ") and "s ago)" in line for line in lines)
    assert "lease:        6s" in lines
    assert "transitions:  2" in lines
    assert "done KEYs:    2 (newest last)" in lines
    assert any(line.startswith("  v1  by ran-v1 at ") for line in lines)
    assert any(line.startswith("  v2  by ran-v2 at ") for line in lines)
    assert "waiters:      2 (first in line first)" in lines
    first = lines.index("waiters:      2 (first in line first)") + 1
    assert lines[first].startswith("  first-waiter  since ")
    assert lines[first].endswith("  --once v3")
    assert lines[first + 1].startswith("  second-waiter  since ")

    assert as_json.returncode == 0, as_json.stderr
    view = json.loads(as_json.stdout)
    assert view["held"] is True
    assert view["holder"] == "holder-pod"
    assert view["leaseDurationSeconds"] == 6
    assert view["transitions"] == 2
    assert 0 <= view["renewAgeSeconds"] < 6
    assert [(d["key"], d["by"], d["fencingToken"]) for d in view["done"]] == [
        ("v1", "ran-v1", 0),
        ("v2", "ran-v2", 1),
    ]
    assert [(w["identity"], w["once"]) for w in view["waiters"]] == [
        ("first-waiter", "v3"),
        ("second-waiter", None),
    ]


def test_status_needs_only_get(
    identity: IdentityFactory, namespace: str, admin: httpx.Client
) -> None:
    write_held_lease(admin, namespace, "app", "somebody")
    reader = identity(
        [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}]
    )
    result = run(
        ["--kubeconfig", str(reader.kubeconfig), "--name", "app", "--status", "-o", "json"]
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["holder"] == "somebody"


def test_once_on_a_configmap_lock_keeps_the_leader_annotation_beside_the_keys(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    runs = tmp_path / "runs"
    argv = [
        *options(kubeconfig, namespace, "cm", "--lock-type", "configmaps"),
        "--once",
        "v1",
        *counting_command(runs, 0),
    ]
    for _ in range(2):
        result = run(argv)
        assert result.returncode == 0, result.stderr
    assert len(runs.read_text().split()) == 1
    response = admin.get(f"/api/v1/namespaces/{namespace}/configmaps/cm")
    response.raise_for_status()
    annotations = response.json()["metadata"]["annotations"]
    assert json.loads(annotations[DONE_ANNOTATION])[0]["key"] == "v1"
    leader = json.loads(annotations["control-plane.alpha.kubernetes.io/leader"])
    assert leader["holderIdentity"] == ""


def test_kubectl_lock_status_runs_as_a_kubectl_plugin(
    control_plane: ControlPlane, kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    """The real kubectl finds `kubectl-lock` on PATH and hands it `status NAME -o json`."""
    kubectl = control_plane.bin_dir / "kubectl"
    if not kubectl.is_file():
        pytest.skip(f"no kubectl in {control_plane.bin_dir}")
    write_held_lease(admin, namespace, "app", "somebody")
    plugin_dir = Path(sys.executable).parent  # where the kubectl-lock console script is
    assert (plugin_dir / "kubectl-lock").is_file()
    result = subprocess.run(
        [str(kubectl), "lock", "status", "app", "-n", namespace, "-o", "json"],
        env=clean_environment(
            {"KUBECONFIG": str(kubeconfig), "PATH": f"{plugin_dir}:{os.environ['PATH']}"}
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert (view["namespace"], view["name"], view["holder"]) == (namespace, "app", "somebody")


def test_status_watch_prints_a_line_per_change_and_ctrl_c_ends_it_with_0(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    shown, errors, go = tmp_path / "watch.out", tmp_path / "watch.err", tmp_path / "go"
    with shown.open("w") as stdout, errors.open("w") as stderr:
        watcher = spawn(
            [*options(kubeconfig, namespace, "app"), "--status", "--watch"],
            stdout=stdout,
            stderr=stderr,
        )
    where = f"leases {namespace}/app: "
    holder: subprocess.Popen[str] | None = None
    try:
        wait_for(
            lambda: f"{where}nobody holds it (the object does not exist)\n" in shown.read_text(),
            what="the watcher to show the lock missing",
        )
        holder = spawn(
            [
                *options(kubeconfig, namespace, "app", "--id", "holder-pod", *QUICK),
                "--",
                sys.executable,
                "-c",
                f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)",
            ]
        )
        wait_for(
            lambda: f"{where}held by holder-pod since " in shown.read_text(),
            what="the watcher to show the holder",
        )
        go.touch()
        assert holder.wait(timeout=60) == 0
        wait_for(
            lambda: f"{where}nobody holds it (released), " in shown.read_text(),
            what="the watcher to show the release",
        )
        assert watcher.poll() is None, errors.read_text()
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0, errors.read_text()
    finally:
        go.touch()
        for process in (watcher, holder):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    lines = shown.read_text().splitlines()
    assert all(line.startswith(where) for line in lines), lines
    # One line per change: the holder's renewals each show, nothing shows twice in a row.
    assert all(a != b for a, b in itertools.pairwise(lines)), lines
    assert "Traceback" not in errors.read_text()


def test_status_watch_on_a_terminal_redraws_the_whole_view(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    controller, terminal = pty.openpty()
    errors = tmp_path / "watch.err"
    with errors.open("w") as stderr:
        watcher = spawn(
            [*options(kubeconfig, namespace, "app"), "--status", "-w"],
            stdout=terminal,
            stderr=stderr,
        )
    os.close(terminal)
    seen = b""

    def shown(text: str) -> bool:
        nonlocal seen
        while select.select([controller], [], [], 0)[0]:
            try:
                seen += os.read(controller, 65536)
            except OSError:  # the watcher closed the terminal
                break
        return text.encode() in seen

    try:
        wait_for(
            lambda: shown(
                f"\x1b[H\x1b[2Jlock:         leases {namespace}/app\r\n"
                "holder:       nobody (the object does not exist yet)\r\n"
            ),
            what="the watcher to draw the missing lock",
        )
        run([*options(kubeconfig, namespace, "app", "--id", "quick-pod", *QUICK), "--", "true"])
        wait_for(
            lambda: shown("holder:       nobody (released)\r\n"),
            what="the watcher to redraw the released lock",
        )
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 0, errors.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        os.close(controller)
    assert seen.count(b"\x1b[H\x1b[2J") >= 2
    assert "Traceback" not in errors.read_text()
