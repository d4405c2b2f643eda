"""The test control plane is the real thing: RBAC, conflicts, watches, tokens, faults.

These tests check the harness itself, so that kubelock's tests can rely on it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelock.errors import EXIT_TIMEOUT
from kubelock.testing import ControlPlane, IdentityFactory, InClusterFactory, process_alive

from .kubelock_proc import spawn

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "watch", "create", "update"],
    }
]


def lease(name: str, holder: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


def create_lease(client: httpx.Client, namespace: str, name: str, holder: str = "") -> Any:
    created = client.post(LEASES.format(namespace=namespace), json=lease(name, holder))
    assert created.status_code == 201, created.text
    return created.json()


def test_rbac_forbids_a_lease_to_an_identity_without_rights_and_admin_creates_it(
    control_plane: ControlPlane, admin: httpx.Client, identity: IdentityFactory, namespace: str
) -> None:
    config_reader = identity([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    leases = LEASES.format(namespace=namespace)
    with control_plane.client(config_reader.token) as restricted:
        refused = restricted.post(leases, json=lease("migrations"))
        assert refused.status_code == 403, refused.text
        assert refused.json()["reason"] == "Forbidden"
        assert config_reader.username in refused.json()["message"]

        create_lease(admin, namespace, "migrations", holder="admin")
        assert restricted.get(f"{leases}/migrations").status_code == 403
        assert restricted.get(f"/api/v1/namespaces/{namespace}/configmaps/none").status_code == 404


def test_a_spare_static_user_is_authenticated_but_has_no_rights_until_granted(
    control_plane: ControlPlane, admin: httpx.Client, namespace: str
) -> None:
    create_lease(admin, namespace, "migrations")
    path = f"{LEASES.format(namespace=namespace)}/migrations"
    with control_plane.client(control_plane.spare_users["user-7"]) as user:
        assert user.get(path).status_code == 403
        control_plane.grant(namespace, "user-7", LEASE_RULES)
        assert user.get(path).status_code == 200


def test_a_pod_environment_reaches_the_api_server_as_its_service_account(
    in_cluster: InClusterFactory, namespace: str
) -> None:
    environment = in_cluster(namespace, "migrator", LEASE_RULES)
    mount = Path(environment["KUBELOCK_SERVICEACCOUNT_DIR"])
    server = (
        f"https://{environment['KUBERNETES_SERVICE_HOST']}:{environment['KUBERNETES_SERVICE_PORT']}"
    )
    pod_namespace = (mount / "namespace").read_text()
    assert pod_namespace == namespace
    with httpx.Client(
        base_url=server,
        verify=ssl.create_default_context(cafile=str(mount / "ca.crt")),
        headers={"Authorization": f"Bearer {(mount / 'token').read_text()}"},
        trust_env=False,
    ) as pod:
        created = pod.post(LEASES.format(namespace=pod_namespace), json=lease("migrations"))
        assert created.status_code == 201, created.text
        assert pod.get("/api/v1/namespaces").status_code == 403


def test_kubeconfigs_default_to_the_test_namespace(
    control_plane: ControlPlane, identity: IdentityFactory, kubeconfig: Path, namespace: str
) -> None:
    kubectl = str(control_plane.bin_dir / "kubectl")
    manifest = json.dumps(lease("migrations"))
    created = subprocess.run(
        [kubectl, f"--kubeconfig={kubeconfig}", "create", "-f", "-", "-o", "name"],
        input=manifest,
        capture_output=True,
        text=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    reader = identity(LEASE_RULES)
    found = subprocess.run(
        [kubectl, f"--kubeconfig={reader.kubeconfig}", "get", "lease", "migrations", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["metadata"]["namespace"] == namespace


def test_an_update_with_a_stale_resource_version_conflicts(
    admin: httpx.Client, namespace: str
) -> None:
    first = create_lease(admin, namespace, "migrations")
    path = f"{LEASES.format(namespace=namespace)}/migrations"

    first["spec"]["holderIdentity"] = "pod-a"
    assert admin.put(path, json=first).status_code == 200

    first["spec"]["holderIdentity"] = "pod-b"  # still carries the old resourceVersion
    stale = admin.put(path, json=first)
    assert stale.status_code == 409, stale.text
    assert stale.json()["reason"] == "Conflict"
    assert admin.get(path).json()["spec"]["holderIdentity"] == "pod-a"


def test_a_watch_on_one_lease_sees_another_clients_update_and_nothing_else(
    control_plane: ControlPlane, admin: httpx.Client, identity: IdentityFactory, namespace: str
) -> None:
    leases = LEASES.format(namespace=namespace)
    watched = create_lease(admin, namespace, "migrations")
    create_lease(admin, namespace, "other")
    watcher = identity(LEASE_RULES)
    query = {
        "watch": "true",
        "fieldSelector": "metadata.name=migrations",
        "resourceVersion": watched["metadata"]["resourceVersion"],
    }
    with (
        control_plane.client(watcher.token, timeout=10.0) as client,
        client.stream("GET", leases, params=query) as events,
    ):
        assert events.status_code == 200
        for name in ("other", "migrations"):  # only the second may reach the watcher
            current = admin.get(f"{leases}/{name}").json()
            current["spec"]["holderIdentity"] = "pod-a"
            assert admin.put(f"{leases}/{name}", json=current).status_code == 200
        event = json.loads(next(events.iter_lines()))

    assert event["type"] == "MODIFIED"
    assert event["object"]["metadata"]["name"] == "migrations"
    assert event["object"]["spec"]["holderIdentity"] == "pod-a"


def test_a_token_request_token_authenticates_until_its_service_account_is_deleted(
    control_plane: ControlPlane, admin: httpx.Client, namespace: str
) -> None:
    control_plane.create_service_account(namespace, "migrator")
    token = control_plane.request_token(namespace, "migrator", expiration_seconds=600)
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    reviews = "/apis/authentication.k8s.io/v1/selfsubjectreviews"

    with control_plane.client(token) as client:
        who = client.post(reviews, json=review)
        assert who.status_code == 201, who.text
        user = who.json()["status"]["userInfo"]
        assert user["username"] == f"system:serviceaccount:{namespace}:migrator"

        deleted = admin.delete(f"/api/v1/namespaces/{namespace}/serviceaccounts/migrator")
        assert deleted.status_code == 200
        # The API server caches successful token checks for 10 s.
        deadline = time.monotonic() + 30
        while (status := client.post(reviews, json=review).status_code) == 201:
            assert time.monotonic() < deadline, "the token still works 30 s after the delete"
            time.sleep(0.5)
    assert status == 401


def test_clients_fail_while_the_api_server_is_down_and_find_their_data_after_restart(
    restores_control_plane: ControlPlane, admin: httpx.Client, namespace: str
) -> None:
    plane = restores_control_plane
    path = f"{LEASES.format(namespace=namespace)}/migrations"
    create_lease(admin, namespace, "migrations", holder="pod-a")

    plane.stop_apiserver()
    with pytest.raises(httpx.ConnectError):
        admin.get(path)

    plane.start_apiserver()
    assert admin.get(path).json()["spec"]["holderIdentity"] == "pod-a"


def test_the_api_server_times_out_while_etcd_is_down_and_recovers_after_restart(
    restores_control_plane: ControlPlane, admin: httpx.Client, namespace: str
) -> None:
    plane = restores_control_plane
    leases = LEASES.format(namespace=namespace)
    create_lease(admin, namespace, "migrations", holder="pod-a")

    plane.stop_etcd()
    with pytest.raises(httpx.TimeoutException):  # the server would answer 504 after ~30 s
        admin.post(leases, json=lease("other"), timeout=2.0)

    plane.start_etcd()
    assert admin.get(f"{leases}/migrations").json()["spec"]["holderIdentity"] == "pod-a"


def test_a_stopped_control_plane_leaves_no_process(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    with ControlPlane(bin_dir=control_plane.bin_dir, workdir=tmp_path) as second:
        pids = list(second.pids.values())
        assert len(pids) == 2
        assert all(process_alive(pid) for pid in pids)
    assert not [pid for pid in pids if process_alive(pid)]
    assert second.leftover_pids() == []


PR_SET_CHILD_SUBREAPER = 36
OWNER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from kubelock.testing import ControlPlane

    plane = ControlPlane(bin_dir=Path(sys.argv[1]), workdir=Path(sys.argv[2]))
    plane.start()
    print(json.dumps(list(plane.pids.values())), flush=True)
    time.sleep(600)
    """
)


def test_a_sigkilled_owner_leaves_no_process(control_plane: ControlPlane, tmp_path: Path) -> None:
    # As a subreaper, this process inherits the owner's orphans: it can see how they died
    # and reap them, rather than leave zombies to an init that may not reap.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER, str(control_plane.bin_dir), str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert owner.stdout is not None
            pids: list[int] = json.loads(owner.stdout.readline() or "[]")
            assert len(pids) == 2, "the owner did not start its control plane"
            assert all(process_alive(pid) for pid in pids)
            os.kill(owner.pid, signal.SIGKILL)  # no atexit, no stop(): only PDEATHSIG is left
        finally:
            owner.kill()
            owner.wait()

        deadline = time.monotonic() + 10
        alive = set(pids)
        while alive:
            for pid in sorted(alive):
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    assert os.WIFSIGNALED(status)
                    assert os.WTERMSIG(status) == signal.SIGKILL
                    alive.discard(pid)
            assert time.monotonic() < deadline, f"orphaned after the owner's SIGKILL: {alive}"
            time.sleep(0.1)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_kubelock_with_a_timeout_gives_up_on_its_own_while_the_api_server_is_down(
    restores_control_plane: ControlPlane,
    kubeconfig: Path,
    admin: httpx.Client,
    namespace: str,
    tmp_path: Path,
) -> None:
    # Issue 22: every call is bounded by what the election can afford, here the
    # --timeout deadline; a call of the client's own default (30 s) outlived it.
    plane = restores_control_plane
    ran = tmp_path / "ran"
    plane.stop_apiserver()
    waiter = spawn(
        ["--kubeconfig", str(kubeconfig), "--name", "outage", "--timeout", "3s", "touch", str(ran)],
        stderr=subprocess.PIPE,
    )
    try:
        try:
            gave_up: int | None = waiter.wait(timeout=3 + 15)  # the deadline, and a wide margin
        except subprocess.TimeoutExpired:
            gave_up = None
        plane.start_apiserver()
        status = waiter.wait(timeout=60)
    finally:
        waiter.kill()
    assert gave_up is not None, "kubelock was still waiting for the API server past --timeout"
    assert status == EXIT_TIMEOUT
    assert not ran.exists()
    assert admin.get(f"{LEASES.format(namespace=namespace)}/outage").status_code == 404
