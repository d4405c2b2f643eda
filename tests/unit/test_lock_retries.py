"""A lock's write whose first attempt landed though its answer was lost.

The API client sends a PATCH again after a 5xx or a dropped connection. When
the first attempt was committed, the second one's test of the record fails
(422): the lock must read that as its own write having landed, not as a
conflict. Scripted transport: a real server does not lose answers on demand.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from kubelock.locks import LeaderElectionRecord, LeaseLock

from .test_api import Script, client, status

LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/app"
AT = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def lease(spec: dict[str, Any], version: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "app", "namespace": "ns", "resourceVersion": version},
        "spec": spec,
    }


OLD = LeaderElectionRecord("a", 15, AT, AT, 0)
NEW = LeaderElectionRecord("b", 15, AT.replace(second=30), AT.replace(second=30), 1)


@pytest.mark.parametrize(
    "lost_answer",
    [
        httpx.Response(503, json=status(503, "ServiceUnavailable", "try again")),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=["503", "dropped"],
)
async def test_a_patch_sent_again_after_it_landed_is_the_write_itself(
    autojump_clock: trio.testing.MockClock, lost_answer: httpx.Response | Exception
) -> None:
    stored: dict[str, Any] = {"spec": OLD.to_lease_spec(), "version": "5"}

    async def commit_then_lose(request: httpx.Request) -> httpx.Response:
        operations = json.loads(request.content)
        assert operations[0] == {"op": "test", "path": "/spec", "value": stored["spec"]}
        stored["spec"], stored["version"] = operations[1]["value"], "6"
        if isinstance(lost_answer, Exception):
            raise lost_answer
        return lost_answer

    async def test_fails(request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, json=status(422, "Invalid", "the test operation failed"))

    async def read(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=lease(dict(stored["spec"]), str(stored["version"])))

    script = Script(read, commit_then_lose, test_fails, read)
    api, _ = client(script)
    async with api:
        lock = LeaseLock(api, "app", "ns")
        current = await lock.get()
        assert current is not None
        updated = await lock.update(NEW, current)
    assert updated.record == NEW
    assert updated.resource_version == "6"
    assert [r.method for r in script.requests] == ["GET", "PATCH", "PATCH", "GET"]


async def test_a_put_sent_again_after_it_landed_is_the_write_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A Role without patch: the lock writes with PUT and the resourceVersion read.
    stored: dict[str, Any] = {"spec": OLD.to_lease_spec(), "version": "5"}

    async def commit_then_fail(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["metadata"]["resourceVersion"] == stored["version"]
        stored["spec"], stored["version"] = body["spec"], "6"
        return httpx.Response(503, json=status(503, "ServiceUnavailable", "try again"))

    async def conflict(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json=status(409, "Conflict", "the object has been modified"))

    async def read(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=lease(dict(stored["spec"]), str(stored["version"])))

    script = Script(read, commit_then_fail, conflict, read)
    api, _ = client(script)
    async with api:
        lock = LeaseLock(api, "app", "ns")
        lock.patch_allowed = False
        current = await lock.get()
        assert current is not None
        updated = await lock.update(NEW, current)
    assert updated.record == NEW
    assert [r.method for r in script.requests] == ["GET", "PUT", "PUT", "GET"]
