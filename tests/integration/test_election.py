"""The election through the Python API, against the real kube-apiserver."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import kubelock
from kubelock import events
from kubelock.errors import LeaseLost
from kubelock.testing import ControlPlane

from .kubelock_proc import lease

QUICK: dict[str, Any] = {"lease_duration": 6, "renew_deadline": 4, "retry_period": 1}


@pytest.mark.parametrize("contenders", [2, 10])
async def test_contenders_never_hold_the_lease_at_the_same_time(
    kubeconfig: Path, namespace: str, admin: httpx.Client, contenders: int
) -> None:
    holds: list[tuple[str, float, float, int]] = []
    holding: set[str] = set()
    overlaps: list[set[str]] = []

    async def contend(name: str) -> None:
        lock = kubelock.Lock("shared", identity=name, kubeconfig=str(kubeconfig), **QUICK)
        async with lock as held:
            holding.add(name)
            if len(holding) > 1:
                overlaps.append(set(holding))
            start = time.time()
            await trio.sleep(0.2)
            holds.append((name, start, time.time(), held.fencing_token))
            holding.discard(name)

    async with trio.open_nursery() as nursery:
        for i in range(contenders):
            nursery.start_soon(contend, f"c{i}")

    assert overlaps == []
    assert len(holds) == contenders
    ordered = sorted(holds, key=lambda hold: hold[1])
    for (_, _, end, token), (_, start, _, next_token) in itertools.pairwise(ordered):
        assert end <= start
        assert next_token > token  # fencing tokens only grow
    record = lease(admin, namespace, "shared")
    assert record is not None
    assert record["spec"]["leaseTransitions"] == contenders - 1
    assert record["spec"]["holderIdentity"] == ""


async def test_a_release_wakes_the_waiter_through_the_watch_not_the_poll(
    kubeconfig: Path, namespace: str
) -> None:
    """With a 30 s retry period, only the watch can explain a hand-off within seconds."""
    slow: dict[str, Any] = {"lease_duration": 60, "renew_deadline": 40, "retry_period": 30}
    waiter_requests: list[events.ApiRequest] = []
    released_at: list[float] = []
    acquired_at: list[float] = []

    def record_requests(event: events.Event) -> None:
        if isinstance(event, events.ApiRequest):
            waiter_requests.append(event)

    async def hold_then_release(task_status: trio.TaskStatus[None]) -> None:
        async with kubelock.Lock("watched", identity="a", kubeconfig=str(kubeconfig), **slow):
            task_status.started()
            await trio.sleep(2)
            mark = len(waiter_requests)
        released_at.append(trio.current_time())
        task_status_mark.append(mark)

    task_status_mark: list[int] = []

    async def wait() -> None:
        async with kubelock.Lock(
            "watched", identity="b", kubeconfig=str(kubeconfig), observer=record_requests, **slow
        ):
            acquired_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(hold_then_release)
        nursery.start_soon(wait)

    assert acquired_at[0] - released_at[0] < 10  # a poll would have taken 30 s or more
    after_release = waiter_requests[task_status_mark[0] :]
    # One round trip: the watched record went straight into the acquiring write (the
    # compare-and-swap patch); no GET.
    assert [(r.verb, r.code) for r in after_release if r.verb != "watch"][:1] == [("patch", "200")]


async def test_api_server_stopped_while_holding_is_reported_as_loss_in_time(
    control_plane: ControlPlane, kubeconfig: Path, namespace: str
) -> None:
    seen: list[tuple[float, events.Event]] = []
    stopped_at: list[float] = []
    held_until: list[float] = []
    try:
        with pytest.raises(LeaseLost, match="renew deadline"):
            async with kubelock.Lock(
                "outage",
                identity="a",
                kubeconfig=str(kubeconfig),
                observer=lambda event: seen.append((trio.current_time(), event)),
                **QUICK,
            ) as held:
                await trio.sleep(2.5)
                # When the stop begins: the holder's open watch makes the API server's
                # graceful stop take seconds, and renewals fail from its start.
                stopped_at.append(trio.current_time())
                await trio.to_thread.run_sync(control_plane.stop_apiserver)
                held_until.append(held.held_until)
                await trio.sleep(60)
    finally:
        await trio.to_thread.run_sync(control_plane.start_apiserver)
    lost = [(at, event) for at, event in seen if isinstance(event, events.Lost)]
    assert len(lost) == 1
    lost_at = lost[0][0]
    # Loss is decided at the renew deadline: before the lease could be taken over.
    assert stopped_at[0] <= lost_at < held.held_until
    assert held.held_until - lost_at == pytest.approx(6 - 4, abs=0.5)


async def test_a_lease_edited_by_another_identity_is_reported_as_lost(
    kubeconfig: Path, namespace: str, admin: httpx.Client
) -> None:
    with pytest.raises(LeaseLost, match="intruder"):
        async with kubelock.Lock("edited", identity="a", kubeconfig=str(kubeconfig), **QUICK):
            record = lease(admin, namespace, "edited")
            assert record is not None
            record["spec"]["holderIdentity"] = "intruder"
            path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/edited"
            response = await trio.to_thread.run_sync(lambda: admin.put(path, json=record))
            response.raise_for_status()
            await trio.sleep(60)
    after = lease(admin, namespace, "edited")
    assert after is not None
    assert after["spec"]["holderIdentity"] == "intruder"


def test_blocking_hold_is_interrupted_when_the_api_server_goes_away(
    control_plane: ControlPlane, kubeconfig: Path, namespace: str
) -> None:
    stopper = threading.Timer(1.5, control_plane.stop_apiserver)
    body_completed = False
    try:
        with (
            pytest.raises(LeaseLost),
            kubelock.hold("sync", identity="a", kubeconfig=str(kubeconfig), **QUICK),
        ):
            stopper.start()
            time.sleep(120)  # blocking code: interrupted by the loss, not finished
            body_completed = True
        assert not body_completed  # LeaseLost was raised inside the body, not at its end
    finally:
        stopper.join()
        control_plane.start_apiserver()
