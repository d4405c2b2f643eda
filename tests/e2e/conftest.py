"""End-to-end tests on a real cluster: by default the local single-node cluster
(`kubelock.testing.cluster`), or kind or minikube with E2E_CLUSTER=kind|minikube.

Not part of the normal suite: they build images and start a cluster, which
takes minutes, root (local) and a Docker engine. They run with `just e2e`, that
is `pytest -m e2e tests/e2e`, or with KUBELOCK_E2E=1; otherwise every test here
is skipped, saying how to run it. Once requested, a missing prerequisite fails
the test with what to install: they never skip for it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clusters import E2ECluster, Say, command, require, started_cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENABLE_VARIABLE = "KUBELOCK_E2E"
KUBELOCK_IMAGE = "kubelock:dev"
APP_IMAGE = "kubelock-example-app:dev"  # as the examples' Deployments name it


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


def cluster_tool() -> str:
    return os.environ.get("E2E_CLUSTER", "local")


@pytest.fixture(scope="session")
def say(request: pytest.FixtureRequest) -> Say:
    """Print a line to the terminal even under capture: the figures a run measured."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def show(line: str) -> None:
        shown = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with shown:
            print(f"\ne2e: {line}", flush=True)

    return show


@pytest.fixture(scope="session")
def images(say: Say) -> list[str]:
    """kubelock's image and the example app's, built by the Docker engine."""
    require("docker", "it builds the images")
    started = time.monotonic()
    built = _build_images()
    say(f"images {', '.join(built)} built in {time.monotonic() - started:.0f} s")
    return built


def _build_images() -> list[str]:
    script = REPO / "scripts" / "image"
    if script.exists():  # the image issue's builder: stand-in bases when nothing can be pulled
        return command(str(script), timeout=3600).split()
    command("docker", "build", "-t", KUBELOCK_IMAGE, str(REPO), timeout=3600)
    command(
        "docker",
        "build",
        "--build-arg",
        f"KUBELOCK_IMAGE={KUBELOCK_IMAGE}",
        "-t",
        APP_IMAGE,
        str(REPO / "examples" / "init-container" / "app"),
        timeout=1800,
    )
    return [KUBELOCK_IMAGE, APP_IMAGE]


@pytest.fixture(scope="module")
def cluster(say: Say, images: list[str]) -> Iterator[E2ECluster]:
    """A cluster for this module, the images loaded; `local` is checked to leave nothing."""
    with started_cluster(cluster_tool(), say) as started:
        loaded = time.monotonic()
        for image in images:
            started.load(image)
        say(f"images loaded into {started.tool} in {time.monotonic() - loaded:.1f} s")
        yield started
