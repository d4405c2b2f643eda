"""The kubelock command, run as a real process against the real kube-apiserver."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kubelock.errors import EXIT_ERROR, EXIT_LEASE_LOST, EXIT_NOT_FOUND, EXIT_USAGE
from kubelock.testing import ControlPlane, IdentityFactory, InClusterFactory

from .kubelock_proc import (
    hold_command,
    lease,
    lease_names,
    read_intervals,
    renew_time,
    run,
    spawn,
    wait_for,
)

FAST = ["--lease-duration", "15s", "--renew-deadline", "10s", "--retry-period", "2s"]


def test_three_contenders_take_turns_without_waiting_out_the_lease(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    """The original README's three terminals: the sleeps never overlap, all three run."""
    log = tmp_path / "holds"
    started = time.monotonic()
    processes = [
        spawn(
            [
                "--kubeconfig",
                str(kubeconfig),
                "--namespace",
                namespace,
                "--name",
                "race",
                "--id",
                name,
                *FAST,
                *hold_command(name, 1, log),
            ],
            stderr=subprocess.PIPE,
        )
        for name in ("one", "two", "three")
    ]
    codes = [process.wait(timeout=120) for process in processes]
    elapsed = time.monotonic() - started
    assert codes == [0, 0, 0], [p.stderr.read() for p in processes if p.stderr]
    intervals = read_intervals(log)
    assert sorted(name for name, _, _ in intervals) == ["one", "three", "two"]
    for (_, _, end), (_, next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start
    # Each hand-off went through a release: three 1 s holds took far less than one
    # lease duration (15 s), which any hand-off by expiry would have needed.
    assert elapsed < 15
    record = lease(admin, namespace, "race")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""
    assert record["spec"]["leaseTransitions"] == 2


def test_init_container_form_passes_the_commands_options_through(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    """`command: [kubelock, --name, x]`, `args: [python, ..., --noinput]`: no `--` needed."""
    result = run(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "example-app",
            "--namespace",
            namespace,
            sys.executable,
            "-c",
            "import sys; print(sys.argv[1:])",
            "--noinput",
            "-v",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['--noinput', '-v']"
    assert lease(admin, namespace, "example-app") is not None


@pytest.mark.parametrize(
    "spelling",
    [["-name", "go-style"], ["-name=go-style"], ["--name=go-style"], ["--name", "go-style"]],
)
def test_go_style_and_equals_spellings_name_the_lock(
    kubeconfig: Path, namespace: str, admin: httpx.Client, spelling: list[str]
) -> None:
    result = run(
        ["-kubeconfig", str(kubeconfig), f"-namespace={namespace}", *spelling, "--", "true"]
    )
    assert result.returncode == 0, result.stderr
    assert lease_names(admin, namespace) == ["go-style"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["true"], 0),
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "exit 42"], 42),
        (["sh", "-c", "kill -KILL $$"], 137),
    ],
)
def test_the_commands_exit_status_is_passed_through(
    kubeconfig: Path, namespace: str, admin: httpx.Client, command: list[str], expected: int
) -> None:
    result = run(["--kubeconfig", str(kubeconfig), "--name", "status", "--", *command])
    assert result.returncode == expected, result.stderr
    record = lease(admin, namespace, "status")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""  # released


def test_missing_command_exits_127_and_releases(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    result = run(["--kubeconfig", str(kubeconfig), "--name", "missing", "--", "no-such-cmd-x"])
    assert result.returncode == EXIT_NOT_FOUND, result.stderr
    assert "no-such-cmd-x" in result.stderr
    assert "not found" in result.stderr
    record = lease(admin, namespace, "missing")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""


def test_sigterm_is_forwarded_the_lock_released_and_the_next_one_starts(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    trapped = tmp_path / "trapped"
    log = tmp_path / "holds"
    first = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "term",
            "--id",
            "first",
            *FAST,
            "sh",
            "-c",
            f"trap 'echo TERM > {trapped}; exit 7' TERM; "
            f'echo "first $(date +%s.%N) 0" >> {log}; while true; do sleep 0.1; done',
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(log.exists, what="the first child to start")
    second = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "term",
            "--id",
            "second",
            *FAST,
            "sh",
            "-c",
            f'echo "second $(date +%s.%N) 0" >> {log}',
        ],
        stderr=subprocess.PIPE,
    )
    time.sleep(1)  # let the second one start waiting
    first.send_signal(signal.SIGTERM)
    terminated_at = time.time()
    assert first.wait(timeout=60) == 7
    assert trapped.read_text().strip() == "TERM"
    assert second.wait(timeout=60) == 0
    second_started = next(start for name, start, _ in read_intervals(log) if name == "second")
    # Started through the release, long before the 15 s lease could have run out.
    assert second_started - terminated_at < 15


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    process = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "stubborn",
            "--grace-period",
            "1s",
            "sh",
            "-c",
            f"trap '' TERM; touch {ready}; while true; do sleep 0.1; done",
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(ready.exists, what="the child to start")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGKILL


def test_sigterm_while_waiting_exits_143_and_writes_nothing(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    ready = tmp_path / "ready"
    holder = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "busy",
            "--id",
            "holder",
            "sh",
            "-c",
            f"touch {ready}; sleep 30",
        ]
    )
    try:
        wait_for(ready.exists, what="the holder's child")
        before = lease(admin, namespace, "busy")
        waiter_log = tmp_path / "waiter.log"
        with waiter_log.open("w") as stderr:
            waiter = spawn(
                ["--kubeconfig", str(kubeconfig), "--name", "busy", "--id", "waiter", "true"],
                stderr=stderr,
            )
        wait_for(
            lambda: "held by 'holder'" in waiter_log.read_text(),
            what="the waiter to report who holds the lock",
        )
        waiter.send_signal(signal.SIGTERM)
        assert waiter.wait(timeout=30) == 143
        after = lease(admin, namespace, "busy")
        assert before is not None
        assert after is not None
        # Only the holder's renewals happened meanwhile: the waiter wrote nothing.
        assert after["spec"]["holderIdentity"] == "holder"
        assert after["spec"]["leaseTransitions"] == before["spec"]["leaseTransitions"]
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)


SHORT = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]
# A child that ignores SIGTERM and writes a heartbeat (Unix time) every 50 ms.
HEARTBEAT = (
    "trap '' TERM; while true; do date +%s.%N > {beat}.tmp; mv {beat}.tmp {beat}; sleep 0.05; done"
)


def test_lease_lost_with_the_api_server_down_kills_the_child_before_takeover_is_possible(
    control_plane: ControlPlane,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    admin: httpx.Client,
) -> None:
    beat = tmp_path / "beat"
    process = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "fragile",
            *SHORT,
            "--grace-period",
            "60s",
            "sh",
            "-c",
            HEARTBEAT.format(beat=beat),
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(beat.exists, what="the child's first heartbeat")
    time.sleep(2.5)  # a couple of renewals
    control_plane.stop_apiserver()
    try:
        code = process.wait(timeout=60)
    finally:
        control_plane.start_apiserver()
    assert code == EXIT_LEASE_LOST
    last_beat = float(beat.read_text())
    time.sleep(0.5)
    assert float(beat.read_text()) == last_beat  # the child is gone, not just quiet
    record = lease(admin, namespace, "fragile")
    assert record is not None
    # Nobody could take over before the last stored renewal + lease duration:
    # the child (which ignored SIGTERM, with a 60 s grace period) was dead by then.
    assert last_beat < renew_time(record) + 6
    assert process.stderr is not None
    assert "lost the lock" in process.stderr.read()


def test_lease_taken_over_through_the_api_stops_the_child(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    beat = tmp_path / "beat"
    process = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "stolen",
            *SHORT,
            "sh",
            "-c",
            HEARTBEAT.format(beat=beat),
        ],
        stderr=subprocess.PIPE,
    )
    wait_for(beat.exists, what="the child's first heartbeat")
    record = lease(admin, namespace, "stolen")
    assert record is not None
    last_renewal = renew_time(record)
    record["spec"]["holderIdentity"] = "intruder"
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/stolen"
    while True:
        response = admin.put(path, json=record)
        if response.status_code != 409:
            break
        fresh = lease(admin, namespace, "stolen")
        assert fresh is not None
        last_renewal = renew_time(fresh)  # the holder renewed meanwhile
        record = {**fresh, "spec": {**fresh["spec"], "holderIdentity": "intruder"}}
    response.raise_for_status()
    assert process.wait(timeout=60) == EXIT_LEASE_LOST
    # The child ignores SIGTERM (grace period 20 s): SIGKILL came by the safety deadline,
    # before held_until (its last renewal's send + the 6 s lease), when others may take over.
    assert float(beat.read_text()) < last_renewal + 6
    after = lease(admin, namespace, "stolen")
    assert after is not None
    assert after["spec"]["holderIdentity"] == "intruder"  # not released over the intruder


def test_a_killed_holder_is_succeeded_only_after_the_lease_runs_out(
    kubeconfig: Path, namespace: str, tmp_path: Path, admin: httpx.Client
) -> None:
    log = tmp_path / "holds"
    ready = tmp_path / "ready"
    holder = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "crash",
            "--id",
            "holder",
            *SHORT,
            "sh",
            "-c",
            f"echo $$ > {ready}; exec sleep 60",
        ],
    )
    wait_for(lambda: ready.exists() and ready.read_text().strip(), what="the holder's child")
    waiter = spawn(
        [
            "--kubeconfig",
            str(kubeconfig),
            "--name",
            "crash",
            "--id",
            "waiter",
            *SHORT,
            *hold_command("waiter", 0, log),
        ],
    )
    time.sleep(1.5)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    os.kill(int(ready.read_text()), signal.SIGKILL)  # its child too, as a node failure would
    record = lease(admin, namespace, "crash")
    assert record is not None
    last_renewal = renew_time(record)
    assert waiter.wait(timeout=60) == 0
    ((_, started, _),) = read_intervals(log)
    assert started >= last_renewal + 6


def test_in_cluster_it_finds_its_namespace_and_runs(
    in_cluster: InClusterFactory, namespace: str, admin: httpx.Client
) -> None:
    env = in_cluster(
        namespace,
        "migrator",
        [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "create", "update", "patch", "watch"],
            }
        ],
    )
    result = run(
        ["--name", "pod-lock", "sh", "-c", 'echo "$KUBELOCK_NAMESPACE $KUBELOCK_FENCING_TOKEN"'],
        env={**env, "HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [namespace, "0"]
    assert lease_names(admin, namespace) == ["pod-lock"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "command"),
        (["--bogus", "x", "true"], "--bogus"),
        (["--lease-duration", "fifteen", "true"], "duration"),
        (["--lease-duration", "10s", "--renew-deadline", "10s", "true"], "--lease-duration"),
        (["--renew-deadline", "2s", "--retry-period", "2s", "true"], "--renew-deadline"),
        (["--lease-duration", "99999999999h", "true"], "out of range"),
        (["--lease-duration", "800000h", "true"], "32-bit number of seconds"),
        (["--name", "Bad_Name", "true"], "lock name"),
        (["--namespace", "Bad_NS", "true"], "namespace"),
        (["--lock-type", "secrets", "true"], "lock type"),
        (["--context", "no-such-context", "true"], "no-such-context"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    kubeconfig: Path, namespace: str, admin: httpx.Client, args: list[str], message: str
) -> None:
    result = run(["--kubeconfig", str(kubeconfig), *args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert lease_names(admin, namespace) == []


def test_a_request_the_api_server_rejects_exits_2_at_once_naming_it(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    # Annotations may hold 256 KiB in all: this ConfigMap leaves no room for the lock's.
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    crowded = {"filler": "x" * (256 * 1024 - 100)}
    admin.post(
        path, json={"metadata": {"name": "crowded", "annotations": crowded}}
    ).raise_for_status()
    before = admin.get(f"{path}/crowded").json()["metadata"]["resourceVersion"]
    result = run(
        ["--kubeconfig", str(kubeconfig), "--lock-type", "configmaps", "--name", "crowded", "true"],
        timeout=60,  # retrying, as it did, never ends
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    errors = [line for line in result.stderr.splitlines() if "cannot " in line]
    assert len(errors) == 1, result.stderr
    assert f'cannot update configmaps "crowded" in namespace "{namespace}"' in errors[0]
    assert "Too long" in errors[0]  # the server's own words, naming the field
    assert admin.get(f"{path}/crowded").json()["metadata"]["resourceVersion"] == before


def test_unreadable_kubeconfig_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("this: [is not a kubeconfig")
    for path in (broken, tmp_path / "missing"):
        result = run(["--kubeconfig", str(path), "true"])
        assert result.returncode == 2, result.stderr
        assert str(path) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_no_cluster_configuration_at_all_exits_2(tmp_path: Path) -> None:
    result = run(["true"], env={"HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_original_readmes_three_terminals_with_one_id_still_take_turns(
    kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    """Its README runs `kubelock --kubeconfig ... --id 1 --name example-app sleep 10` 3 times."""
    log = tmp_path / "holds"
    processes = [
        spawn(
            [
                "--kubeconfig",
                str(kubeconfig),
                "--id",
                "1",
                "--name",
                "example-app",
                "--namespace",
                namespace,
                *FAST,
                *hold_command(f"terminal-{n}", 1, log),
            ],
            stderr=subprocess.DEVNULL,
        )
        for n in range(3)
    ]
    assert [process.wait(timeout=120) for process in processes] == [0, 0, 0]
    intervals = read_intervals(log)
    assert len(intervals) == 3
    for (_, _, end), (_, next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start


def test_rbac_denial_exits_1_naming_the_missing_rule_and_writes_nothing(
    identity: IdentityFactory, namespace: str, admin: httpx.Client
) -> None:
    reader = identity(
        [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}]
    )
    result = run(["--kubeconfig", str(reader.kubeconfig), "--name", "guarded", "true"])
    assert result.returncode == EXIT_ERROR, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "cannot create" in line]
    assert len(error_lines) == 1, result.stderr
    assert f'cannot create leases "guarded" in namespace "{namespace}"' in error_lines[0]
    assert 'verbs: ["create"]' in error_lines[0]
    assert lease_names(admin, namespace) == []


def test_renewals_survive_a_rotated_service_account_token(
    control_plane: ControlPlane,
    in_cluster: InClusterFactory,
    namespace: str,
    tmp_path: Path,
    admin: httpx.Client,
) -> None:
    """The kubelet rotates bound tokens; a two-hour migration must not lose its lock to it."""
    env = in_cluster(
        namespace,
        "migrator",
        [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "create", "update", "patch", "watch"],
            }
        ],
    )
    token_file = Path(env["KUBELOCK_SERVICEACCOUNT_DIR"]) / "token"
    ready = tmp_path / "ready"
    process = spawn(
        ["--name", "rotated", *SHORT, "sh", "-c", f"touch {ready}; sleep 20"],
        env=env,
        stderr=subprocess.PIPE,
    )
    wait_for(ready.exists, what="the child to start")
    # Invalidate the old token: a ServiceAccount deleted and made again has a new
    # UID, and tokens bound to the old one are refused (after the API server's
    # 10 s token cache). The kubelet would write the new token into the mount.
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/migrator"
    admin.delete(path).raise_for_status()
    control_plane.create_service_account(namespace, "migrator")
    token_file.write_text(control_plane.request_token(namespace, "migrator"))
    assert process.wait(timeout=120) == 0  # not 75: no renewal was lost to the rotation
    assert process.stderr is not None
    assert "lost the lock" not in process.stderr.read()
    record = lease(admin, namespace, "rotated")
    assert record is not None
    assert record["spec"]["holderIdentity"] == ""  # released with the new token
