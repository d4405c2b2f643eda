"""The three lock kinds against the real kube-apiserver: each stores the record
where client-go does, writes only with the version it read, and sees others' writes."""

from __future__ import annotations

import dataclasses
import json
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from kubelock.errors import AlreadyExists, BadRequest, Conflict, Forbidden, UsageError
from kubelock.kube.api import ApiClient
from kubelock.kube.auth import ClusterConfig, load_config
from kubelock.kube.target import Target
from kubelock.locks import (
    LEADER_ANNOTATION,
    Bookmark,
    ConfigMapLock,
    EndpointsLock,
    LeaderElectionRecord,
    LeaseLock,
    LockStore,
    Observed,
    make_lock,
)
from kubelock.locks.record import UNREADABLE_RECORD
from kubelock.testing import ControlPlane, IdentityFactory

KINDS = ["leases", "endpoints", "configmaps"]
API_VERSIONS = {"leases": "coordination.k8s.io/v1", "endpoints": "v1", "configmaps": "v1"}

#: The Role the Go kubelock's documentation asks for: no "watch".
GO_KUBELOCK_RULES = [
    {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "create", "update"]},
]

ACQUIRED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def record(
    holder: str = "pod-a", *, renewed_second: int = 9, transitions: int = 0
) -> LeaderElectionRecord:
    return LeaderElectionRecord(
        holder_identity=holder,
        lease_duration_seconds=15,
        acquire_time=ACQUIRED,
        renew_time=ACQUIRED.replace(second=renewed_second),
        leader_transitions=transitions,
    )


@pytest.fixture
def admin_config(kubeconfig: Path) -> ClusterConfig:
    return load_config(str(kubeconfig), None)


def target_of(kind: str, namespace: str, name: str = "app") -> Target:
    group, _, version = API_VERSIONS[kind].rpartition("/")
    return Target(group, version, kind, namespace, name)


def expected_as_stored(kind: str, written: LeaderElectionRecord) -> LeaderElectionRecord:
    """Annotations keep whole seconds (metav1.Time); Lease spec keeps microseconds."""
    if kind == "leases":
        return written
    return LeaderElectionRecord.from_annotation(written.to_annotation())


@pytest.mark.parametrize("kind", KINDS)
async def test_create_get_update_round_trip(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        lock = make_lock(kind, api, "app", namespace)
        assert lock.describe() == f"{kind} {namespace}/app"
        assert await lock.get() is None

        created = await lock.create(record())
        assert created.record == expected_as_stored(kind, record())
        assert created.resource_version

        read = await lock.get()
        assert read is not None
        assert read.record == created.record
        assert read.resource_version == created.resource_version

        renewed = await lock.update(record(renewed_second=19), read)
        assert renewed.record == expected_as_stored(kind, record(renewed_second=19))
        assert renewed.resource_version != read.resource_version
        again = await lock.get()
        assert again is not None
        assert again.record == renewed.record


@pytest.mark.parametrize("kind", KINDS)
async def test_an_update_from_a_stale_read_conflicts(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        mine = make_lock(kind, api, "app", namespace)
        theirs = make_lock(kind, api, "app", namespace)
        seen = await mine.create(record("pod-a"))
        await theirs.update(record("pod-b", transitions=1), seen)  # somebody else wins

        with pytest.raises(Conflict) as raised:
            await mine.update(record("pod-a", renewed_second=30), seen)
        assert not isinstance(raised.value, AlreadyExists)
        current = await mine.get()
        assert current is not None
        assert current.record.holder_identity == "pod-b"  # never overwritten


@pytest.mark.parametrize("kind", KINDS)
async def test_an_update_lands_when_only_others_annotations_changed_since_the_read(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        mine = make_lock(kind, api, "app", namespace)
        waiter = make_lock(kind, api, "app", namespace)
        created = await mine.create(record("pod-a", transitions=0))
        seen = await mine.update(
            record("pod-a", renewed_second=10), created, annotations={"a.example/x": "1"}
        )
        # A waiter joins (its own annotation, a merge patch): the version moves on...
        joined = await waiter.annotate({"queue.kubelock.io/0123456789abcdef": '{"id": "w"}'})
        assert joined.resource_version != seen.resource_version
        assert joined.record == seen.record
        # ...and a write based on the older version still lands, keeping the join,
        # since the record itself is as it was read. Annotations set and removed with it.
        written = await mine.update(
            record("pod-a", renewed_second=20),
            seen,
            annotations={"a.example/x": None, "b.example/y": "2", "absent.example/z": None},
        )
        assert isinstance(mine, LeaseLock | EndpointsLock | ConfigMapLock)
        assert mine.patch_allowed
        annotations = written.raw["metadata"]["annotations"]
        assert annotations["queue.kubelock.io/0123456789abcdef"] == '{"id": "w"}'
        assert annotations["b.example/y"] == "2"
        assert "a.example/x" not in annotations
        assert "absent.example/z" not in annotations
        written_record = record("pod-a", renewed_second=20)
        assert written.record == expected_as_stored(kind, written_record)


async def test_an_invalid_record_is_refused_as_such_not_taken_for_a_conflict(
    admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        lock = LeaseLock(api, "app", namespace)
        seen = await lock.create(record("pod-a"))
        invalid = dataclasses.replace(record("pod-a", renewed_second=30), lease_duration_seconds=-1)
        with pytest.raises(BadRequest):
            await lock.update(invalid, seen)
        current = await lock.get()
        assert current is not None
        assert current.resource_version == seen.resource_version


@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_create_finds_it_already_exists(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        await make_lock(kind, api, "app", namespace).create(record("pod-a"))
        with pytest.raises(AlreadyExists):
            await make_lock(kind, api, "app", namespace).create(record("pod-b"))


@pytest.mark.parametrize("kind", KINDS)
async def test_watch_sees_another_clients_update_and_the_deletion(
    kind: str, admin_config: ClusterConfig, admin: httpx.Client, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        lock = make_lock(kind, api, "app", namespace)
        created = await lock.create(record("pod-a"))
        await make_lock(kind, api, "other", namespace).create(record("pod-x"))

        async with ApiClient(admin_config) as elsewhere:
            other_client = make_lock(kind, elsewhere, "app", namespace)
            changes: list[Observed | Bookmark | None] = []
            with trio.fail_after(30):
                async with aclosing(lock.watch(created.resource_version)) as stream:
                    await other_client.update(record("pod-b", transitions=1), created)
                    changes.append(await anext(stream))
                    await trio.to_thread.run_sync(
                        lambda: admin.delete(target_of(kind, namespace).path).raise_for_status()
                    )
                    changes.append(await anext(stream))
    first, deleted = changes
    assert isinstance(first, Observed)
    assert first.record.holder_identity == "pod-b"
    assert first.record.leader_transitions == 1
    assert deleted is None


@pytest.mark.parametrize("kind", KINDS)
async def test_an_update_keeps_what_others_wrote_on_the_object(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        lock = make_lock(kind, api, "app", namespace)
        await lock.create(record("pod-a"))
        target = target_of(kind, namespace)
        labelled = await api.get(target)
        labelled["metadata"].setdefault("labels", {})["team"] = "payments"
        labelled["metadata"].setdefault("annotations", {})["note"] = "keep me"
        await api.replace(target, labelled)

        current = await lock.get()
        assert current is not None
        updated = await lock.update(record("pod-b", transitions=1), current)
        stored = await api.get(target)
    assert updated.record.holder_identity == "pod-b"
    assert stored["metadata"]["labels"] == {"team": "payments"}
    assert stored["metadata"]["annotations"]["note"] == "keep me"


@pytest.mark.parametrize("kind", ["endpoints", "configmaps"])
async def test_annotation_is_client_gos_and_kubectl_reads_it(
    kind: str, control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        await make_lock(kind, api, "app", namespace).create(record("pod-a", transitions=2))
    printed = control_plane.kubectl(
        "get",
        kind,
        "app",
        "-n",
        namespace,
        "-o",
        r"jsonpath={.metadata.annotations.control-plane\.alpha\.kubernetes\.io/leader}",
    ).stdout
    assert json.loads(printed) == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-05-06T07:08:09Z",
        "renewTime": "2024-05-06T07:08:09Z",
        "leaderTransitions": 2,
    }
    assert printed == record("pod-a", transitions=2).to_annotation()


async def test_lease_spec_is_client_gos(
    control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        await LeaseLock(api, "app", namespace).create(record("pod-a", transitions=2))
    printed = control_plane.kubectl("get", "lease", "app", "-n", namespace, "-o", "json").stdout
    assert json.loads(printed)["spec"] == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-05-06T07:08:09.123456Z",
        "renewTime": "2024-05-06T07:08:09.123456Z",
        "leaseTransitions": 2,
    }


async def test_a_record_written_by_go_is_read(
    control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    go_written = (
        '{"holderIdentity":"go-pod","leaseDurationSeconds":30,'
        '"acquireTime":"2024-05-06T07:08:09Z","renewTime":"2024-05-06T07:09:09Z",'
        '"leaderTransitions":4}'
    )
    endpoints = {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "app", "annotations": {LEADER_ANNOTATION: go_written}},
    }
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(endpoints))
    async with ApiClient(admin_config) as api:
        observed = await EndpointsLock(api, "app", namespace).get()
    assert observed is not None
    assert observed.record.holder_identity == "go-pod"
    assert observed.record.lease_duration_seconds == 30
    assert observed.record.leader_transitions == 4


async def test_an_object_whose_record_does_not_parse_reads_held_and_can_be_replaced(
    control_plane: ControlPlane, admin_config: ClusterConfig, namespace: str
) -> None:
    # Held by nobody known (the election waits out a lease first), never free.
    configmap: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "app", "annotations": {LEADER_ANNOTATION: "garbage"}},
        "data": {"kept": "yes"},
    }
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(configmap))
    async with ApiClient(admin_config) as api:
        lock = ConfigMapLock(api, "app", namespace)
        current = await lock.get()
        assert current is not None
        assert current.record == UNREADABLE_RECORD
        assert current.record.is_held
        taken = await lock.update(record("pod-a"), current)
    assert taken.record.holder_identity == "pod-a"
    assert taken.raw["data"] == {"kept": "yes"}


async def test_a_released_lease_with_no_duration_is_accepted(
    admin_config: ClusterConfig, namespace: str
) -> None:
    # The API server rejects leaseDurationSeconds 0, so an empty record omits it.
    async with ApiClient(admin_config) as api:
        lock = LeaseLock(api, "app", namespace)
        created = await lock.create(LeaderElectionRecord())
        assert not created.record.is_held
        held = await lock.update(record("pod-a"), created)
        released = await lock.update(LeaderElectionRecord(leader_transitions=1), held)
    assert not released.record.is_held
    assert released.record.leader_transitions == 1


async def test_the_go_kubelock_role_suffices_except_for_watching(
    identity: IdentityFactory, namespace: str
) -> None:
    user = identity(GO_KUBELOCK_RULES)
    async with ApiClient(load_config(str(user.kubeconfig), None)) as api:
        lock = EndpointsLock(api, "app", namespace)
        assert await lock.get() is None
        created = await lock.create(record("pod-a"))
        updated = await lock.update(record("pod-a", renewed_second=20), created)
        # Watching needs one more verb; the election falls back to polling without it.
        with pytest.raises(Forbidden, match=r'verbs: \["watch"\]'):
            async with aclosing(lock.watch(updated.resource_version)) as stream:
                await anext(stream)


async def test_a_lock_without_rights_is_forbidden_with_the_rule_to_add(
    identity: IdentityFactory, namespace: str
) -> None:
    user = identity([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    async with ApiClient(load_config(str(user.kubeconfig), None)) as api:
        with pytest.raises(Forbidden) as raised:
            await LeaseLock(api, "app", namespace).get()
    assert str(raised.value).startswith(
        f'cannot get leases "app" in namespace "{namespace}": forbidden. '
        'Grant the verb with a Role rule {apiGroups: ["coordination.k8s.io"], '
        'resources: ["leases"], verbs: ["get"]}. The server said: '
    )


async def test_make_lock_knows_the_three_kinds(admin_config: ClusterConfig) -> None:
    async with ApiClient(admin_config) as api:
        kinds = {kind: type(make_lock(kind, api, "x", "ns")) for kind in KINDS}
        assert kinds == {
            "leases": LeaseLock,
            "endpoints": EndpointsLock,
            "configmaps": ConfigMapLock,
        }
        lock: LockStore = make_lock("leases", api, "x", "ns")
        assert (lock.kind, lock.name, lock.namespace) == ("leases", "x", "ns")
        with pytest.raises(UsageError, match="invalid lock type 'secrets'"):
            make_lock("secrets", api, "x", "ns")
