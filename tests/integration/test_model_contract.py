"""The simulator's API server model answers as the real kube-apiserver does.

The same requests go to the real kube-apiserver (with etcd) and to the model
of ``tests/sim/apiserver.py``; the outcomes must be the same: status code,
reason, the generic 422 message, whether the write changed the object's
resourceVersion (a write that changes nothing is skipped), and the watch
events that followed (a no-op write sends none). The simulator's findings are
only as good as this test.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.sim.apiserver import ApiServerModel, Faults, ModelTransport

LEASE_SPEC = {
    "holderIdentity": "a",
    "leaseDurationSeconds": 15,
    "acquireTime": "2026-12-01T00:00:00.000000Z",
    "renewTime": "2026-12-01T00:00:00.000000Z",
    "leaseTransitions": 0,
}
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Step:
    method: str
    path: str  # "" for the object, "collection" for its collection
    body: Any = None
    content_type: str = "application/json"
    with_version: bool = False  # PUT: carry the current resourceVersion
    stale_version: bool = False  # PUT: carry the first resourceVersion seen


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str
    message: str
    changed: bool | None  # did the object's resourceVersion move (None: no object answer)


LEADER = "control-plane.alpha.kubernetes.io/leader"
PATHS = {
    "leases": "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}",
    "endpoints": "/api/v1/namespaces/{namespace}/endpoints/{name}",
    "configmaps": "/api/v1/namespaces/{namespace}/configmaps/{name}",
}


def record(kind: str, **spec: Any) -> Any:
    """The record as the lock kind keeps it: a Lease spec, or the leader annotation's JSON."""
    written = {**LEASE_SPEC, **spec}
    return written if kind == "leases" else json.dumps(written, separators=(",", ":"))


def record_path(kind: str) -> str:
    return "/spec" if kind == "leases" else "/metadata/annotations/" + LEADER.replace("/", "~1")


def lock_object(kind: str, name: str, **spec: Any) -> dict[str, Any]:
    if kind == "leases":
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name},
            "spec": record(kind, **spec),
        }
    return {
        "apiVersion": "v1",
        "kind": "Endpoints" if kind == "endpoints" else "ConfigMap",
        "metadata": {"name": name, "annotations": {LEADER: record(kind, **spec)}},
    }


def steps(kind: str, name: str) -> list[Step]:
    renewed = record(kind, renewTime="2026-12-01T00:00:02.000000Z")
    held_by_b = record(kind, holderIdentity="b")
    path = record_path(kind)
    return [
        Step("GET", ""),  # 404
        Step("POST", "collection", lock_object(kind, name)),  # 201
        Step("POST", "collection", lock_object(kind, name)),  # 409 AlreadyExists
        Step("PUT", "", lock_object(kind, name, holderIdentity="b"), with_version=True),
        Step("PUT", "", lock_object(kind, name, holderIdentity="b"), with_version=True),  # no-op
        Step("PUT", "", lock_object(kind, name, holderIdentity="c"), stale_version=True),  # 409
        # The compare-and-swap kubelock sends: test the record, replace it.
        Step(
            "PATCH",
            "",
            [
                {"op": "test", "path": path, "value": held_by_b},
                {"op": "replace", "path": path, "value": renewed},
            ],
            JSON_PATCH,
        ),
        # The same again: its test fails now (422, the server's generic message).
        Step(
            "PATCH",
            "",
            [
                {"op": "test", "path": path, "value": held_by_b},
                {"op": "replace", "path": path, "value": renewed},
            ],
            JSON_PATCH,
        ),
        # A compare-and-swap that writes what is there: a no-op.
        Step(
            "PATCH",
            "",
            [
                {"op": "test", "path": path, "value": renewed},
                {"op": "replace", "path": path, "value": renewed},
            ],
            JSON_PATCH,
        ),
        # Removing an annotation that is not there: 422.
        Step("PATCH", "", [{"op": "remove", "path": "/metadata/annotations/x"}], JSON_PATCH),
        Step("PATCH", "", {"metadata": {"annotations": {"q": "1"}}}, MERGE_PATCH),  # changed
        Step("PATCH", "", {"metadata": {"annotations": {"q": "1"}}}, MERGE_PATCH),  # no-op
        Step("PATCH", "", {"metadata": {"annotations": {"q": None}}}, MERGE_PATCH),  # changed
        Step("DELETE", ""),  # watched as DELETED
        Step("PATCH", "", {"metadata": {"annotations": {"q": "1"}}}, MERGE_PATCH),  # 404
        # A PUT of a deleted object: Leases and Endpoints are created again, ConfigMaps not.
        Step("PUT", "", lock_object(kind, name), with_version=True),
    ]


class Record:
    """The outcomes of the steps, and the versions the object went through."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.versions: list[str] = []

    def see(self, response: httpx.Response) -> None:
        data = response.json() if response.content else {}
        if data.get("kind") == "Status":
            self.outcomes.append(
                Outcome(response.status_code, data.get("reason", ""), data.get("message", ""), None)
            )
            return
        version = (data.get("metadata") or {}).get("resourceVersion")
        changed = None if not self.versions else version != self.versions[-1]
        self.outcomes.append(Outcome(response.status_code, "", "", changed))
        if version is not None and (not self.versions or self.versions[-1] != version):
            self.versions.append(version)

    def watch_params(self, name: str) -> dict[str, str]:
        """Every change after the object was created, as a watch from that version sees it."""
        return {
            "watch": "true",
            "fieldSelector": f"metadata.name={name}",
            "resourceVersion": self.versions[0],
            "timeoutSeconds": "2",
        }


def generic(outcomes: list[Outcome]) -> list[Outcome]:
    """Messages are compared only where the model claims the server's wording."""
    kept = []
    for found in outcomes:
        message = found.message if found.status == 422 else ""
        kept.append(Outcome(found.status, found.reason, message, found.changed))
    return kept


def request_of(step: Step, base: str, versions: list[str]) -> dict[str, Any]:
    body = step.body
    if step.method == "PUT" and body is not None:
        body = json.loads(json.dumps(body))
        if step.with_version and versions:
            body["metadata"]["resourceVersion"] = versions[-1]
        if step.stale_version and versions:
            body["metadata"]["resourceVersion"] = versions[0]
    url = base.rsplit("/", 1)[0] if step.path == "collection" else base
    if step.method == "DELETE":
        return {"method": "DELETE", "url": url}
    content = None if body is None else json.dumps(body).encode()
    return {
        "method": step.method,
        "url": url,
        "content": content,
        "headers": {"Content-Type": step.content_type},
    }


def watch_types(lines: list[str]) -> list[str]:
    return [json.loads(line)["type"] for line in lines if line.strip()]


def run_real(
    admin: httpx.Client, kind: str, namespace: str, name: str
) -> tuple[list[Outcome], list[str]]:
    base = PATHS[kind].format(namespace=namespace, name=name)
    record = Record()
    for step in steps(kind, name):
        record.see(admin.request(**request_of(step, base, record.versions)))
    collection = base.rsplit("/", 1)[0]
    params = record.watch_params(name)
    with admin.stream("GET", collection, params=params, timeout=30) as stream:
        lines = list(stream.iter_lines())
    return record.outcomes, watch_types(lines)


def run_model(kind: str, namespace: str, name: str) -> tuple[list[Outcome], list[str]]:
    base = PATHS[kind].format(namespace=namespace, name=name)
    record = Record()
    lines: list[str] = []

    async def main() -> None:
        transport = ModelTransport(ApiServerModel(), Faults(rng=random.Random(0), latency=0))
        async with httpx.AsyncClient(base_url="https://model.invalid", transport=transport) as api:
            for step in steps(kind, name):
                record.see(await api.request(**request_of(step, base, record.versions)))
            collection = base.rsplit("/", 1)[0]
            params = record.watch_params(name)
            async with api.stream("GET", collection, params=params) as stream:
                lines.extend([line async for line in stream.aiter_lines()])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return record.outcomes, watch_types(lines)


@pytest.mark.parametrize("kind", ["leases", "endpoints", "configmaps"])
def test_the_model_answers_every_request_as_the_real_api_server(
    admin: httpx.Client, namespace: str, kind: str
) -> None:
    real, real_events = run_real(admin, kind, namespace, "contract")
    model, model_events = run_model(kind, namespace, "contract")
    assert generic(model) == generic(real)
    assert model_events == real_events
    # And the behaviours the simulator relies on are there, on both.
    statuses = [found.status for found in real]
    assert statuses[:3] == [404, 201, 409]
    assert real[4].changed is False  # a PUT that changes nothing: no new resourceVersion
    assert real[8].changed is False  # nor a patch that writes what is there
    assert real[7].status == 422
    assert real[9].status == 422
    assert real_events.count("DELETED") == 1
    assert real[15].status == (404 if kind == "configmaps" else 201)
