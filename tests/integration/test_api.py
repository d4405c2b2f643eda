"""The API client against the real kube-apiserver: what each answer turns into,
how credentials are found and refreshed, and what happens when the server is gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kubelock.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    Unauthorized,
    Unreachable,
)
from kubelock.events import ApiRequest, Event
from kubelock.kube.api import ApiClient
from kubelock.kube.auth import ClusterConfig, load_config
from kubelock.kube.target import Target
from kubelock.testing import ControlPlane, IdentityFactory, InClusterFactory

LEASE_RULE = {
    "apiGroups": ["coordination.k8s.io"],
    "resources": ["leases"],
    "verbs": ["get", "create", "update", "patch", "watch"],
}


def lease_at(namespace: str, name: str = "app") -> Target:
    return Target("coordination.k8s.io", "v1", "leases", namespace, name)


def lease(name: str = "app", holder: str = "pod-a") -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


def codes(events: list[Event]) -> list[str]:
    return [e.code for e in events if isinstance(e, ApiRequest)]


@pytest.fixture
def admin_config(kubeconfig: Path) -> ClusterConfig:
    return load_config(str(kubeconfig), None)


@pytest.fixture
def restores_control_plane(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The session's control plane, running again after the test whatever it stopped."""
    yield control_plane
    if "kube-apiserver" not in control_plane.pids:
        control_plane.start_apiserver()


async def test_create_get_replace_round_trip(admin_config: ClusterConfig, namespace: str) -> None:
    events: list[Event] = []
    async with ApiClient(admin_config, observer=events.append) as api:
        assert admin_config.namespace == namespace
        created = await api.create(lease_at(namespace), lease())
        assert created["metadata"]["namespace"] == namespace
        read = await api.get(lease_at(namespace))
        assert read["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]

        read["spec"]["holderIdentity"] = "pod-b"
        replaced = await api.replace(lease_at(namespace), read)
        assert replaced["spec"]["holderIdentity"] == "pod-b"
        assert replaced["metadata"]["resourceVersion"] != read["metadata"]["resourceVersion"]
    assert codes(events) == ["201", "200", "200"]
    assert [e.verb for e in events if isinstance(e, ApiRequest)] == ["create", "get", "update"]


async def test_a_missing_object_is_not_found(admin_config: ClusterConfig, namespace: str) -> None:
    async with ApiClient(admin_config) as api:
        with pytest.raises(
            NotFound, match=f'cannot get leases "nothing" in namespace "{namespace}"'
        ):
            await api.get(lease_at(namespace, "nothing"))


async def test_a_second_create_finds_it_already_exists(
    admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        await api.create(lease_at(namespace), lease())
        with pytest.raises(AlreadyExists) as raised:
            await api.create(lease_at(namespace), lease(holder="pod-b"))
    assert raised.value.status_code == 409
    assert "already exists" in raised.value.server_message


async def test_a_replace_based_on_a_stale_version_conflicts_and_is_not_retried(
    admin_config: ClusterConfig, namespace: str
) -> None:
    events: list[Event] = []
    async with ApiClient(admin_config, observer=events.append) as api:
        first = await api.create(lease_at(namespace), lease())
        second = dict(first, spec={**first["spec"], "holderIdentity": "pod-b"})
        await api.replace(lease_at(namespace), second)

        stale = dict(first, spec={**first["spec"], "holderIdentity": "pod-c"})
        with pytest.raises(Conflict) as raised:
            await api.replace(lease_at(namespace), stale)
    assert not isinstance(raised.value, AlreadyExists)
    assert "the object has been modified" in raised.value.server_message
    assert codes(events) == ["201", "200", "409"]


async def test_forbidden_names_the_missing_rule_and_granting_it_works(
    control_plane: ControlPlane, identity: IdentityFactory, namespace: str
) -> None:
    reader = identity(
        [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]}]
    )
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=_json(lease()))
    async with ApiClient(load_config(str(reader.kubeconfig), None)) as api:
        current = await api.get(lease_at(namespace))
        with pytest.raises(Forbidden) as raised:
            await api.replace(lease_at(namespace), current)
        message = str(raised.value)
        assert message.startswith(
            f'cannot update leases "app" in namespace "{namespace}": forbidden. '
            'Grant the verb with a Role rule {apiGroups: ["coordination.k8s.io"], '
            'resources: ["leases"], verbs: ["update"]}. The server said: '
        )
        assert reader.username in message  # the server's own words follow
        assert reader.token not in message

        # The advice is right: exactly that rule makes the same call work.
        await trio.to_thread.run_sync(
            lambda: control_plane.grant(
                namespace,
                reader.username,
                [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "verbs": ["update"],
                    }
                ],
            )
        )
        await api.replace(lease_at(namespace), current)


async def test_a_rejected_token_is_unauthorized_after_one_fresh_try(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    kubeconfig = control_plane.write_kubeconfig(
        tmp_path / "bad.kubeconfig", token="not-a-valid-token", namespace=namespace
    )
    events: list[Event] = []
    async with ApiClient(load_config(str(kubeconfig), None), observer=events.append) as api:
        with pytest.raises(Unauthorized) as raised:
            await api.get(lease_at(namespace))
    assert codes(events) == ["401", "401"]
    assert "not-a-valid-token" not in str(raised.value)
    assert str(kubeconfig) in str(raised.value)


async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "no-ca.kubeconfig"
    kubeconfig.write_text(
        _json(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": control_plane.server}}],
                "users": [{"name": "u", "user": {"token": control_plane.admin_token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    events: list[Event] = []
    async with ApiClient(load_config(str(kubeconfig), None), observer=events.append) as api:
        with pytest.raises(Unreachable, match="TLS certificate was not accepted"):
            await api.get(lease_at(namespace))
    assert codes(events) == ["error"]  # not retried: it cannot get better


async def test_watch_yields_another_clients_update(
    admin_config: ClusterConfig, admin: httpx.Client, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        created = await api.create(lease_at(namespace), lease())
        await api.create(lease_at(namespace, "other"), lease(name="other"))  # must not show up
        version = created["metadata"]["resourceVersion"]

        def update_elsewhere() -> None:
            for name in ("other", "app"):
                current = admin.get(lease_at(namespace, name).path).json()
                current["spec"]["holderIdentity"] = "pod-b"
                assert admin.put(lease_at(namespace, name).path, json=current).status_code == 200

        seen: list[dict[str, Any]] = []
        with trio.fail_after(30):
            async with aclosing(api.watch(lease_at(namespace), version)) as events:
                await trio.to_thread.run_sync(update_elsewhere)
                async for event in events:
                    if event["type"] != "BOOKMARK":
                        seen.append(event)
                        break
    [event] = seen
    assert event["type"] == "MODIFIED"
    assert event["object"]["metadata"]["name"] == "app"
    assert event["object"]["spec"]["holderIdentity"] == "pod-b"


async def test_watch_from_a_version_that_is_too_old_is_gone(
    restores_control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        created = await api.create(lease_at(namespace), lease())
        version = created["metadata"]["resourceVersion"]
        for holder in ("pod-b", "pod-c"):
            created["spec"]["holderIdentity"] = holder
            created = await api.replace(lease_at(namespace), created)
        # A restarted API server's watch cache begins at the newest version:
        # anything older is gone, as after a compaction in a long-running cluster.
        await trio.to_thread.run_sync(restores_control_plane.stop_apiserver)
        await trio.to_thread.run_sync(restores_control_plane.start_apiserver)
        with trio.fail_after(30), pytest.raises(Gone) as raised:
            async with aclosing(api.watch(lease_at(namespace), version)) as events:
                async for _ in events:
                    pass
    assert raised.value.status_code == 410
    assert f'resourceVersion "{version}" is too old' in str(raised.value)
    assert "too old resource version" in raised.value.server_message


async def test_watch_ends_when_the_server_closes_it(
    admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        created = await api.create(lease_at(namespace), lease())
        version = created["metadata"]["resourceVersion"]
        with trio.fail_after(30):
            async with aclosing(
                api.watch(lease_at(namespace), version, timeout_seconds=1)
            ) as events:
                changes = [e async for e in events if e["type"] != "BOOKMARK"]
    assert changes == []


async def test_in_cluster_token_rotation_is_picked_up_after_a_401(
    control_plane: ControlPlane,
    admin: httpx.Client,
    in_cluster: InClusterFactory,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = in_cluster(namespace, "migrator", [LEASE_RULE])
    monkeypatch.delenv("KUBECONFIG", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = load_config(None, None)
    assert config.source.startswith("in-cluster")
    assert config.namespace == namespace
    token_file = Path(environment["KUBELOCK_SERVICEACCOUNT_DIR"]) / "token"
    old_token = token_file.read_text()

    events: list[Event] = []
    async with ApiClient(config, observer=events.append) as api:
        await api.create(lease_at(namespace), lease())

        def rotate() -> None:
            # Recreating the ServiceAccount invalidates every token bound to the old one;
            # the kubelet would then write a token for the new one into the mount.
            accounts = f"/api/v1/namespaces/{namespace}/serviceaccounts"
            assert admin.delete(f"{accounts}/migrator").status_code == 200
            control_plane.create_service_account(namespace, "migrator")
            token_file.write_text(control_plane.request_token(namespace, "migrator"))
            # The API server caches good token checks for 10 s: wait until the old one fails.
            review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
            deadline = time.monotonic() + 30
            with control_plane.client(old_token) as old:
                reviews = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
                while old.post(reviews, json=review).status_code != 401:
                    assert time.monotonic() < deadline, "the old token still works after 30 s"
                    time.sleep(0.5)

        await trio.to_thread.run_sync(rotate)
        events.clear()
        read = await api.get(lease_at(namespace))
    assert read["spec"]["holderIdentity"] == "pod-a"
    assert codes(events) == ["401", "200"]


async def test_a_stopped_api_server_is_unreachable_within_the_timeout(
    restores_control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    plane = restores_control_plane
    async with ApiClient(admin_config) as api:
        await api.create(lease_at(namespace), lease())
        await trio.to_thread.run_sync(plane.stop_apiserver)

        started = time.monotonic()
        with pytest.raises(Unreachable) as raised:
            await api.get(lease_at(namespace), timeout=2)
        elapsed = time.monotonic() - started
        assert elapsed < 2.5
        assert admin_config.server in str(raised.value)
        assert "connection refused" in str(raised.value)

        with pytest.raises(Unreachable):
            async with aclosing(api.watch(lease_at(namespace), "")) as events:
                async for _ in events:
                    pass

        # Once it is back, the same client carries on.
        await trio.to_thread.run_sync(plane.start_apiserver)
        assert (await api.get(lease_at(namespace)))["spec"]["holderIdentity"] == "pod-a"


async def test_a_running_watch_fails_when_the_api_server_stops(
    restores_control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    plane = restores_control_plane
    async with ApiClient(admin_config) as api:
        created = await api.create(lease_at(namespace), lease())
        version = created["metadata"]["resourceVersion"]
        created["spec"]["holderIdentity"] = "pod-b"
        await api.replace(lease_at(namespace), created)
        with trio.fail_after(60):
            async with aclosing(api.watch(lease_at(namespace), version)) as events:
                first = await anext(events)  # the watch is open and streaming
                assert first["object"]["spec"]["holderIdentity"] == "pod-b"
                await trio.to_thread.run_sync(plane.stop_apiserver)
                with pytest.raises(Unreachable, match="lost its watch"):
                    async for _ in events:
                        pass


def _json(value: Any) -> str:
    return json.dumps(value)
