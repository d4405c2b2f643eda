"""Metrics, health and the HTTP endpoint, fed scripted election events.

Expositions are read with prometheus-client's own parser. The endpoint runs
for real on 127.0.0.1, and pushes go to a real Pushgateway.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubelock import events
from kubelock._version import __version__
from kubelock.endpoint import serve
from kubelock.errors import UsageError
from kubelock.health import HEALTH_TOLERANCE, Health
from kubelock.metrics import Metrics
from kubelock.push import push, push_periodically
from kubelock.testing.pushgateway import running_pushgateway

from .fresh import output_of

RENEW_DEADLINE = 10.0


def make_metrics(identity: str = "pod-1") -> Metrics:
    return Metrics("migrations", "apps", identity, "leases")


class Exposition:
    """One parsed exposition: look samples up by name and (a subset of) labels."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, metric: str, /, **labels: str) -> float:
        found = [
            sample.value
            for sample in self.samples
            if sample.name == metric and labels.items() <= sample.labels.items()
        ]
        assert len(found) == 1, f"{len(found)} samples {metric}{labels}"
        return found[0]

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}


def scrape(metrics: Metrics) -> Exposition:
    return Exposition(generate_latest(metrics.registry).decode())


LOCK = {"name": "migrations", "namespace": "apps"}


async def test_a_waiter_that_acquires_renews_and_releases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = make_metrics()
    metrics.started()
    assert scrape(metrics).value("kubelock_waiting", **LOCK) == 1
    assert scrape(metrics).value("kubelock_lock_held", **LOCK) == 0

    metrics.observe(events.Waiting(holder="pod-0", since=None, waited=0.0))
    metrics.observe(events.ApiRequest(verb="get", code="200", duration=0.004))
    metrics.observe(events.ApiRequest(verb="watch", code="200", duration=2.4))
    metrics.observe(events.WaitFailed(error="connection refused"))
    metrics.observe(events.ApiRequest(verb="get", code="error", duration=0.002))
    metrics.observe(events.ApiRequest(verb="update", code="200", duration=0.006))
    metrics.observe(events.Acquired(waited=2.5, fencing_token=3))
    seen = scrape(metrics)
    assert seen.value("kubelock_waiting", **LOCK) == 0
    assert seen.value("kubelock_lock_held", **LOCK) == 1
    assert seen.value("kubelock_acquisitions_total", **LOCK) == 1
    assert seen.value("kubelock_lock_wait_seconds_count", **LOCK) == 1
    assert seen.value("kubelock_lock_wait_seconds_sum", **LOCK) == 2.5
    assert seen.value("kubelock_lock_wait_seconds_bucket", le="2.5", **LOCK) == 1
    assert seen.value("kubelock_lock_wait_seconds_bucket", le="1.0", **LOCK) == 0
    assert seen.value("kubelock_api_requests_total", verb="get", code="200", **LOCK) == 1
    assert seen.value("kubelock_api_requests_total", verb="get", code="error", **LOCK) == 1
    assert seen.value("kubelock_api_requests_total", verb="update", code="200", **LOCK) == 1
    assert seen.value("kubelock_api_request_duration_seconds_count", verb="get", **LOCK) == 2
    assert seen.value("kubelock_api_request_duration_seconds_sum", verb="watch", **LOCK) == 2.4

    metrics.observe(events.Renewed(duration=0.05))
    metrics.observe(events.RenewFailed(error="timed out", duration=1.5))
    metrics.observe(events.Renewed(duration=0.07))
    metrics.observe(events.Released(held=12.0, written=True))
    metrics.observe(events.ChildExited(status=0, signal=None, ran=1.0))
    seen = scrape(metrics)
    assert seen.value("kubelock_renewals_total", result="success", **LOCK) == 2
    assert seen.value("kubelock_renewals_total", result="failure", **LOCK) == 1
    assert seen.value("kubelock_renew_duration_seconds_count", **LOCK) == 3
    assert seen.value("kubelock_renew_duration_seconds_sum", **LOCK) == pytest.approx(1.62)
    assert seen.value("kubelock_lock_hold_seconds_count", **LOCK) == 1
    assert seen.value("kubelock_lock_hold_seconds_sum", **LOCK) == 12.0
    assert seen.value("kubelock_releases_total", **LOCK) == 1
    assert seen.value("kubelock_lost_total", **LOCK) == 0
    assert seen.value("kubelock_lock_held", **LOCK) == 0
    assert seen.value("kubelock_child_exit_code", **LOCK) == 0
    assert (
        seen.value(
            "kubelock_info",
            version=__version__,
            lock_type="leases",
            identity="pod-1",
            **LOCK,
        )
        == 1
    )


async def test_a_lost_lease_counts_as_lost_and_its_hold_time_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = make_metrics()
    metrics.started()
    metrics.observe(events.Acquired(waited=0.01, fencing_token=1))
    metrics.observe(events.Lost(reason="taken over by pod-2", held=40.0))
    metrics.observe(events.ChildExited(status=143, signal=15, ran=40.0))
    seen = scrape(metrics)
    assert seen.value("kubelock_lost_total", **LOCK) == 1
    assert seen.value("kubelock_releases_total", **LOCK) == 0
    assert seen.value("kubelock_lock_hold_seconds_sum", **LOCK) == 40.0
    assert seen.value("kubelock_lock_hold_seconds_bucket", le="60.0", **LOCK) == 1
    assert seen.value("kubelock_lock_held", **LOCK) == 0
    assert seen.value("kubelock_child_exit_code", **LOCK) == 143


def test_every_kubelock_metric_carries_the_lock_labels_and_the_standard_collectors_are_there() -> (
    None
):
    metrics = make_metrics()
    metrics.observe(events.ChildExited(status=1, signal=None, ran=1.0))
    seen = scrape(metrics)
    kubelock_samples = [s for s in seen.samples if s.name.startswith("kubelock_")]
    assert kubelock_samples
    for sample in kubelock_samples:
        assert LOCK.items() <= sample.labels.items(), sample
    assert "process_cpu_seconds_total" in seen.names()
    assert "python_info" in seen.names()
    # Its own registry: a second lock in the same process does not collide.
    make_metrics("pod-2")


def test_the_child_exit_code_is_absent_until_the_child_ends() -> None:
    assert "kubelock_child_exit_code" not in scrape(make_metrics()).names()


async def test_health_turns_503_exactly_past_renew_deadline_plus_tolerance(
    mock_clock: trio.testing.MockClock,
) -> None:
    health = Health(RENEW_DEADLINE)
    mock_clock.jump(3600)
    assert health.healthy(), "waiting is healthy, however long"

    health.observe(events.Acquired(waited=3600, fencing_token=1))
    mock_clock.jump(RENEW_DEADLINE + HEALTH_TOLERANCE)
    assert health.healthy(), "at the threshold itself"
    mock_clock.jump(0.001)
    assert not health.healthy(), "just past it"

    health.observe(events.Renewed(duration=0.05))  # renewals resume: healthy again
    assert health.healthy()
    mock_clock.jump(RENEW_DEADLINE)
    health.observe(events.RenewFailed(error="timed out", duration=1.0))
    assert health.healthy(), "a failed renewal alone changes nothing"
    mock_clock.jump(HEALTH_TOLERANCE + 0.001)
    assert not health.healthy()

    # Lost: still judged by the last success, so it stays unhealthy.
    health.observe(events.Lost(reason="no renewal", held=20))
    assert not health.healthy()


async def test_health_after_an_orderly_release_is_fine(
    mock_clock: trio.testing.MockClock,
) -> None:
    health = Health(RENEW_DEADLINE)
    health.observe(events.Acquired(waited=0, fencing_token=1))
    mock_clock.jump(RENEW_DEADLINE)
    health.observe(events.Released(held=RENEW_DEADLINE, written=False))
    mock_clock.jump(3600)
    assert health.healthy()


def occupied_port() -> socket.socket:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    return taken


async def test_serve_answers_metrics_and_healthz_then_stops_with_its_scope(
    mock_clock: trio.testing.MockClock,
) -> None:
    # A clock that only moves when told: health is set by a jump, and no timeout
    # of the HTTP client or server fires on its own.
    metrics = make_metrics()
    health = Health(RENEW_DEADLINE)
    metrics.started()
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve, metrics.registry, health, "127.0.0.1", 0)
        assert host == "127.0.0.1"
        assert port > 0
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.get(f"{base}/metrics")
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/plain")
            assert Exposition(answer.text).value("kubelock_waiting", **LOCK) == 1
            healthz = await client.get(f"{base}/healthz")
            assert (healthz.status_code, healthz.text) == (200, "ok\n")
            assert (await client.get(f"{base}/elsewhere")).status_code == 404

        for observe in (metrics.observe, health.observe):
            observe(events.Acquired(waited=1, fencing_token=1))
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{base}/healthz")).status_code == 200
            seen = Exposition((await client.get(f"{base}/metrics")).text)
            assert seen.value("kubelock_lock_held", **LOCK) == 1
        mock_clock.jump(RENEW_DEADLINE + HEALTH_TOLERANCE + 1)
        async with httpx.AsyncClient(trust_env=False) as client:
            healthz = await client.get(f"{base}/healthz")
            assert healthz.status_code == 503
            assert "renewal overdue" in healthz.text
        nursery.cancel_scope.cancel()

    # The port is free again: the listening socket went with the task.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.bind(("127.0.0.1", port))
        again.listen(1)


async def test_a_port_in_use_is_a_usage_error_before_started() -> None:
    with occupied_port() as taken:
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(UsageError) as raised:
                await nursery.start(
                    serve, make_metrics().registry, Health(RENEW_DEADLINE), "127.0.0.1", port
                )
    assert str(raised.value) == (
        f"--metrics-address 127.0.0.1:{port}: address already in use; "
        "choose another port or free it"
    )
    assert raised.value.exit_code == 2


@pytest.fixture(scope="module")
def pushgateway() -> Iterator[str]:
    with running_pushgateway() as url:
        yield url


async def test_push_delivers_the_metrics_under_the_grouping_key(pushgateway: str) -> None:
    metrics = make_metrics("pod-1/with-slash")
    metrics.started()
    metrics.observe(events.Acquired(waited=2.5, fencing_token=1))
    metrics.observe(events.Released(held=1.25, written=True))
    metrics.observe(events.ChildExited(status=0, signal=None, ran=1.0))
    assert await push(metrics, pushgateway)

    async with httpx.AsyncClient(trust_env=False) as client:
        groups = (await client.get(f"{pushgateway}/api/v1/metrics")).json()["data"]
        exposition = (await client.get(f"{pushgateway}/metrics")).text
    key = {"job": "kubelock", "name": "migrations", "identity": "pod-1/with-slash"}
    assert key in [group["labels"] for group in groups]
    seen = Exposition(exposition)
    assert seen.value("kubelock_acquisitions_total", **key) == 1
    assert seen.value("kubelock_lock_hold_seconds_sum", **key) == 1.25
    assert seen.value("kubelock_child_exit_code", **key) == 0
    assert seen.value("push_failure_time_seconds", **key) == 0


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_failed_push_is_logged_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kubelock")
    url = f"http://127.0.0.1:{unused_port()}"
    assert not await push(make_metrics(), url)
    assert [(r.name, r.levelno) for r in caplog.records] == [("kubelock", logging.WARNING)]
    assert f"could not push metrics to {url}" in caplog.records[0].getMessage()


async def test_periodic_pushes_warn_once_per_streak_of_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kubelock")
    url = f"http://127.0.0.1:{unused_port()}"
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push_periodically, make_metrics(), url, 0.01)
            while len(caplog.records) < 3:  # noqa: ASYNC110 (caplog has nothing to wait on)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    levels = [record.levelno for record in caplog.records]
    assert levels[:3] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_importing_the_module_loads_neither_prometheus_client_nor_hypercorn() -> None:
    check = (
        "import sys, kubelock.metrics; "
        "print(sorted(m for m in ('prometheus_client', 'hypercorn') if m in sys.modules))"
    )
    loaded = output_of(check)
    assert loaded.strip() == "[]"
