"""deploy/monitoring/ with real parts: a real Prometheus scraping real kubelocks.

The story: a holder (scraped on its /metrics, as a PodMonitor would) holds the
lock; a one-shot run (pushing to a real Pushgateway, scraped with honor_labels)
waits for it, long enough for the waiting alert; the API server stops, so the
holder's renewals fail and it loses its lease; the API server comes back, the
one-shot run takes the lock over and holds it long enough for the holding
alert; then it is killed without its final push. Prometheus (its own data
folder, a loopback port, 1 s scrapes and evaluations) runs a copy of
alerts.yaml with short thresholds. Afterwards, through Prometheus's HTTP API:
every alert fired for the right series, every alert expression (as shipped and
as shortened) and every dashboard query evaluates and returns series.

Also: the component renders with `kubectl kustomize`, its core objects pass a
server-side dry run, and the threshold patch its kustomization documents works.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from kubelock.testing import ControlPlane
from kubelock.testing.prometheus import running_prometheus
from kubelock.testing.pushgateway import running_pushgateway

from .test_deploy import ensure_namespaces, overlay
from .test_metrics import LOCK_NAME, Starter, free_port, python, start_kubelock, until

__all__ = ["start_kubelock"]  # the fixture, shared with test_metrics

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
DEADLINE = 120.0  # seconds any one step of the story may take before it fails

HOLDER_JOB = "monitoring/kubelock"  # the job a PodMonitor's scrape gives the holder's series
PUSHED_JOB = "kubelock"  # the job of series pushed by kubelock, kept by honor_labels
STALE_PUSH = 25  # seconds; above kubelock's 15 s push interval, with room for a busy machine
SHORT_FOR = {
    "KubelockRenewalsFailing": "0s",
    "KubelockHeldTooLong": "2s",
    "KubelockWaitingTooLong": "2s",
}


def alerts() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return rules


def shortened(rules: dict[str, Any]) -> dict[str, Any]:
    """The rules with thresholds a test can wait out; each replacement must apply."""
    copy: dict[str, Any] = json.loads(json.dumps(rules))
    for rule in copy["groups"][0]["rules"]:
        name = rule["alert"]
        if name in SHORT_FOR:
            assert "for" in rule, name
            rule["for"] = SHORT_FOR[name]
        expr = rule["expr"]
        if "push_time_seconds" in expr:
            assert "> 120)" in expr, name
            expr = expr.replace("> 120)", f"> {STALE_PUSH})")
        if name == "KubelockRenewalsFailing":
            # One renewal a second: 10 s hold ~10 renewals, and the few failures
            # before the loss are well over 10% of them.
            assert expr.count("[5m]") == 2, expr
            expr = expr.replace("[5m]", "[10s]")
        rule["expr"] = expr
    return copy


def expressions(rules: dict[str, Any]) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in rules["groups"][0]["rules"]}


def prometheus_config(holder: str, pushgateway: str) -> str:
    return yaml.safe_dump(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yaml"],
            "scrape_configs": [
                {
                    "job_name": HOLDER_JOB,
                    "honor_labels": True,
                    "static_configs": [{"targets": [holder]}],
                },
                {
                    "job_name": "kubelock-pushgateway",
                    "honor_labels": True,
                    "static_configs": [{"targets": [pushgateway]}],
                },
            ],
        }
    )


class PrometheusApi:
    """The few HTTP API calls the story needs; any error answer fails the test."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client

    async def _get(self, path: str, **params: str) -> Any:
        answer = await self.client.get(f"{self.url}{path}", params=params)
        body = answer.json()
        assert answer.status_code == 200, f"{path} {params}: {answer.status_code} {body}"
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    async def firing(self, alertname: str, **labels: str) -> bool:
        data = await self._get("/api/v1/alerts")
        return any(
            alert["state"] == "firing"
            and alert["labels"]["alertname"] == alertname
            and labels.items() <= alert["labels"].items()
            for alert in data["alerts"]
        )

    async def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = await self._get(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1"
        )
        assert data["resultType"] == "matrix"
        result: list[dict[str, Any]] = data["result"]
        return result

    async def label_values(self, label: str, match: str) -> list[str]:
        values: list[str] = await self._get(f"/api/v1/label/{label}/values", **{"match[]": match})
        return values


async def until_async(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` every 200 ms until it holds, for at most DEADLINE seconds."""
    with trio.move_on_after(DEADLINE):
        while not await check():  # noqa: ASYNC110 (a server to poll, nothing to wait on)
            await trio.sleep(0.2)
        return
    raise AssertionError(f"waited {DEADLINE:g} s for {what}")


def matching(series: list[dict[str, Any]], **labels: str) -> list[dict[str, Any]]:
    return [one for one in series if labels.items() <= one["metric"].items()]


def numbers(series: list[dict[str, Any]]) -> list[float]:
    return [float(value) for one in series for _, value in one["values"]]


@pytest.fixture
def pushgateway() -> Iterator[str]:
    with running_pushgateway() as url:
        yield url


def waits_for(path: Path, *, announce: Path) -> list[str]:
    """A command that creates `announce`, then runs until `path` exists."""
    return python(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(announce)!r}).touch()\n"
        f"while not os.path.exists({str(path)!r}):\n"
        "    time.sleep(0.05)\n"
    )


@pytest.mark.timeout(600)
async def test_alerts_fire_and_dashboard_queries_answer_on_a_real_prometheus(
    start_kubelock: Starter,
    restores_control_plane: ControlPlane,
    pushgateway: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    control_plane = restores_control_plane
    holder_port = free_port()
    holding = tmp_path / "holder-holds"
    # The holder's command takes 5 s to stop on SIGTERM, so a scrape sees its loss.
    slow_to_stop = python(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(5), sys.exit(0)))\n"
        f"pathlib.Path({str(holding)!r}).touch()\n"
        "time.sleep(300)\n"
    )
    rules = shortened(alerts())
    config = prometheus_config(f"127.0.0.1:{holder_port}", pushgateway.removeprefix("http://"))
    with running_prometheus(config, rule_files={"alerts.yaml": yaml.safe_dump(rules)}) as url:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            prometheus = PrometheusApi(url, client)
            started = time.time()

            holder = start_kubelock(
                "holder", f"--metrics-address=127.0.0.1:{holder_port}", command=slow_to_stop
            )
            await until(holding.exists, "the holder to hold the lock")

            run_holds = tmp_path / "one-shot-holds"
            one_shot = start_kubelock(
                "one-shot",
                f"--pushgateway={pushgateway}",
                command=waits_for(tmp_path / "never", announce=run_holds),
            )
            pushed = {"job": PUSHED_JOB, "name": LOCK_NAME, "identity": "one-shot"}
            await until_async(
                lambda: prometheus.firing("KubelockWaitingTooLong", **pushed),
                "the waiting alert",
            )

            control_plane.stop_apiserver()
            try:
                scraped = {"job": HOLDER_JOB, "name": LOCK_NAME, "namespace": namespace}
                await until_async(
                    lambda: prometheus.firing("KubelockLeaseLost", **scraped),
                    "the lost-lease alert",
                )
                await until(lambda: holder.poll() is not None, "the holder to exit")
                assert holder.returncode == 75
            finally:
                control_plane.start_apiserver()

            # The lease runs out; the one-shot run takes the lock and pushes that it holds.
            await until(run_holds.exists, "the one-shot run to hold the lock")
            await until_async(
                lambda: prometheus.firing("KubelockHeldTooLong", **pushed), "the holding alert"
            )
            one_shot.kill()  # no final push: its last one says it holds
            one_shot.wait()
            await until_async(
                lambda: prometheus.firing("KubelockFinalPushMissing", **pushed),
                "the missing-push alert",
            )
            assert not await prometheus.firing("KubelockHeldTooLong", **pushed), (
                "a run whose pushes stopped is the missing push's alert, not a holding one"
            )
            # A step past the last evaluation, so the ranges below include it.
            ended = time.time() + 1.0

            # Every alert fired, for the series it is about.
            expected = {
                "KubelockLeaseLost": scraped,
                "KubelockRenewalsFailing": scraped,
                "KubelockHeldTooLong": pushed,
                "KubelockWaitingTooLong": pushed,
                "KubelockFinalPushMissing": pushed,
            }
            assert expected.keys() == expressions(rules).keys()
            fired = await prometheus.query_range('ALERTS{alertstate="firing"}', started, ended)
            for alertname, labels in expected.items():
                assert matching(fired, alertname=alertname, **labels), f"{alertname} never fired"

            # Each expression, shortened and as shipped, evaluates; the shortened ones
            # returned the series each alert is about.
            for alertname, expr in expressions(rules).items():
                series = await prometheus.query_range(expr, started, ended)
                assert matching(series, **expected[alertname]), alertname
            for expr in expressions(alerts()).values():
                await prometheus.query_range(expr, started, ended)
            # As shipped, the lost lease counts over 10 minutes: it is still there.
            lost = expressions(alerts())["KubelockLeaseLost"]
            assert matching(await prometheus.query_range(lost, started, ended), **scraped)

            # The dashboard: its variables list the lock, its queries all answer.
            await dashboard_answers(prometheus, namespace, started, ended)


async def dashboard_answers(
    prometheus: PrometheusApi, namespace: str, started: float, ended: float
) -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    variables = {
        v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["name"] != "datasource"
    }
    assert variables["namespace"]["query"] == "label_values(kubelock_info, namespace)"
    assert namespace in await prometheus.label_values("namespace", "kubelock_info")
    names = f'kubelock_info{{namespace=~"{namespace}"}}'
    assert (
        variables["name"]["query"] == 'label_values(kubelock_info{namespace=~"$namespace"}, name)'
    )
    assert LOCK_NAME in await prometheus.label_values("name", names)

    span = f"{math.ceil(ended - started)}s"
    substitutions = {
        "$namespace": namespace,
        "$name": LOCK_NAME,
        "$__rate_interval": "20s",  # 4 x the 1 s scrape, and more than the 15 s between pushes
        "$__range": span,
    }
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable left in {expr}"
            series = await prometheus.query_range(expr, started, ended)
            values = [value for value in numbers(series) if not math.isnan(value)]
            assert values, f"{panel['title']}: {expr} returned no values"
            if "lost" in panel["title"].lower():
                assert max(values) > 0, f"{panel['title']}: no lost lease shown"


def test_the_component_renders_and_its_core_objects_pass_a_server_side_dry_run(
    control_plane: ControlPlane, admin: httpx.Client, tmp_path: Path, namespace: str
) -> None:
    target = overlay(
        tmp_path / "overlay", resources=(), components=[MONITORING], namespace=namespace
    )
    objects = kustomize(control_plane, target)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("ConfigMap", "kubelock-dashboard"),
        ("Deployment", "kubelock-pushgateway"),
        ("PodMonitor", "kubelock"),
        ("PodMonitor", "kubelock-pushgateway"),
        ("PrometheusRule", "kubelock"),
        ("Service", "kubelock-pushgateway"),
    ]
    assert all(o["metadata"]["namespace"] == namespace for o in objects)
    by_kind = {o["kind"]: o for o in objects}
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == alerts()["groups"]
    dashboard = by_kind["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubelock.json"]) == json.loads(
        (MONITORING / "dashboard.json").read_text()
    )
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        assert all(endpoint["honorLabels"] for endpoint in monitor["spec"]["podMetricsEndpoints"])

    # Without the Prometheus Operator's CRDs the API server knows only the core objects.
    core = [o for o in objects if o["apiVersion"] != "monitoring.coreos.com/v1"]
    ensure_namespaces(admin, core)
    applied = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": core}),
    )
    assert applied.stdout.count("(server dry run)") == len(core), applied.stdout


def kustomize(control_plane: ControlPlane, folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize folder`, parsed here: the API server knows no Operator kinds."""
    rendered = control_plane.kubectl("kustomize", str(folder)).stdout
    return [found for found in yaml.safe_load_all(rendered) if found]


def documented_patch() -> str:
    """The `patches:` example in the component's kustomization.yaml comments."""
    text = (MONITORING / "kustomization.yaml").read_text()
    block = re.search(r"^#   patches:\n((?:#     .*\n)+)", text, re.M)
    assert block is not None, "kustomization.yaml documents a threshold patch"
    lines = ["patches:", *(line.removeprefix("#   ") for line in block.group(1).splitlines())]
    return "\n".join(lines) + "\n"


def test_the_documented_threshold_patch_changes_the_holding_alert(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    target = overlay(tmp_path / "overlay", resources=(), components=[MONITORING])
    with open(target / "kustomization.yaml", "a") as kustomization:
        kustomization.write(documented_patch())
    objects = kustomize(control_plane, target)
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    held = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "KubelockHeldTooLong"]
    assert held[0]["for"] == "2h"
