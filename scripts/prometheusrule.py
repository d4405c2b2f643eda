"""Write deploy/monitoring/prometheusrule.yaml from deploy/monitoring/alerts.yaml.

    uv run python scripts/prometheusrule.py

alerts.yaml is the one source of the alerts (a plain Prometheus rules file);
the Prometheus Operator's PrometheusRule carries the same groups in its spec.
tests/unit/test_monitoring.py fails when the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"

HEADER = """\
# Generated from alerts.yaml by scripts/prometheusrule.py: edit alerts.yaml, then run
#   uv run python scripts/prometheusrule.py
# The README's "Monitoring" section explains each alert and its threshold.
"""


class _Literal(str):
    """A multi-line string written as a YAML block (``|-``), as alerts.yaml writes expressions."""


def _literal(dumper: yaml.SafeDumper, text: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style="|")


def _blocks(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _blocks(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_blocks(item) for item in value]
    if isinstance(value, str) and "\n" in value:
        return _Literal(value)
    return value


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule object holding the rules file's groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "kubelock"},
        "spec": {"groups": rules["groups"]},
    }


def render(rules: dict[str, Any]) -> str:
    """prometheusrule.yaml's text for the parsed rules file."""
    dumper = yaml.SafeDumper
    dumper.add_representer(_Literal, _literal)
    body = yaml.dump(
        _blocks(prometheus_rule(rules)),
        Dumper=dumper,
        sort_keys=False,
        width=1000,
        allow_unicode=True,
    )
    return HEADER + body


def main() -> int:
    PROMETHEUS_RULE.write_text(render(yaml.safe_load(ALERTS.read_text())))
    print(f"wrote {PROMETHEUS_RULE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
