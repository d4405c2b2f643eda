"""deploy/monitoring/: the alerts pass promtool's own checks and unit tests, and the
files that must agree do.

promtool is the real one (Debian's `prometheus` package; `just test-tools`).
The rules and dashboard queries against a real Prometheus scraping real
kubelocks: tests/integration/test_monitoring.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubelock.testing.prometheus import promtool_binary

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERTS_TEST = MONITORING / "alerts_test.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboard.json"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> list[str]:
    return [rule["alert"] for group in load(ALERTS)["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool_binary()), *args],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promtool_finds_the_rules_file_valid() -> None:
    checked = promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in checked.stdout


def test_the_prometheusrule_holds_the_rules_file_unchanged() -> None:
    rule = load(PROMETHEUS_RULE)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load(ALERTS)["groups"], (
        "prometheusrule.yaml differs from alerts.yaml: "
        "run `uv run python scripts/prometheusrule.py`"
    )


def test_every_alert_fires_in_promtools_unit_test_and_the_test_passes() -> None:
    tests = load(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert fired == set(alert_names()), "each alert needs a case where it fires"
    assert quiet == set(alert_names()), "each alert needs a case where it stays quiet"
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtools_unit_test_fails_when_a_threshold_moves(tmp_path: Path) -> None:
    """The unit test pins the thresholds: a rules file with another one fails it."""
    changed = ALERTS.read_text().replace("for: 30m", "for: 40m")
    assert changed != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(changed)
    (tmp_path / ALERTS_TEST.name).write_text(ALERTS_TEST.read_text())
    result = subprocess.run(
        [str(promtool_binary()), "test", "rules", ALERTS_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert "KubelockHeldTooLong" in result.stdout + result.stderr


def test_every_alert_has_a_severity_a_summary_and_a_documented_entry() -> None:
    monitoring = (REPO / "docs" / "monitoring.md").read_text()
    for group in load(ALERTS)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
            assert re.search(rf"^\| `{rule['alert']}` \|", monitoring, re.M), (
                f"docs/monitoring.md's table lacks {rule['alert']}"
            )


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_is_importable_and_every_query_follows_its_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kubelock"
    assert "__inputs" not in dashboard, "a data source variable instead: importable as is"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "name"} <= variables.keys()
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(titles)
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    targets = dashboard_targets(dashboard)
    assert targets
    for title, expr in targets:
        assert 'namespace=~"$namespace"' in expr, title
        assert 'name=~"$name"' in expr, title
    shown = " ".join(expr for _, expr in targets)
    for metric in (
        "kubelock_lock_wait_seconds_bucket",
        "kubelock_lock_hold_seconds_bucket",
        "kubelock_lock_held",
        "kubelock_waiting",
        "kubelock_renewals_total",
        "kubelock_api_requests_total",
        "kubelock_lost_total",
    ):
        assert metric in shown, f"the dashboard does not show {metric}"
