"""End-to-end tests on a real cluster (kind, or minikube with E2E_CLUSTER=minikube).

Not part of the normal suite: they build images and create a cluster, which
takes minutes and needs a container engine. They run with `just e2e`, that is
`pytest -m e2e tests/e2e`, or with KUBELOCK_E2E=1; otherwise every test here
is skipped, saying how to run it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ENABLE_VARIABLE = "KUBELOCK_E2E"


def e2e_requested(config: pytest.Config) -> bool:
    markexpr = str(config.getoption("markexpr", default="") or "")
    return os.environ.get(ENABLE_VARIABLE) == "1" or (
        "e2e" in markexpr and "not e2e" not in markexpr
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: touch only this folder's.
    if e2e_requested(config):
        return
    skip = pytest.mark.skip(
        reason=f"end-to-end: run with `just e2e` (pytest -m e2e tests/e2e) or {ENABLE_VARIABLE}=1"
    )
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)
