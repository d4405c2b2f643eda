"""The init-container example on a real cluster: kind, or minikube with E2E_CLUSTER=minikube.

Builds kubelock's image (the repository's Dockerfile) and the example app's
image, loads them into a new cluster, applies examples/init-container, and
checks the story: the migrations ran one Pod at a time and only once, every
Pod became Ready, and each Pod's init container log shows that it waited for
the lock or ran the migrations. A rollout restart then finds nothing to do.
The cluster is deleted afterwards unless KUBELOCK_E2E_KEEP=1.

Skips, saying why, when the cluster tool, kubectl, docker or a running
container engine is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..integration.test_deploy import MIGRATIONS, assert_migrated_one_at_a_time

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "init-container"
CLUSTER_NAME = os.environ.get("E2E_CLUSTER_NAME", "kubelock-e2e")
KUBELOCK_IMAGE = "kubelock:dev"
APP_IMAGE = "kubelock-example-app:dev"  # as examples/init-container/deployment.yaml names it
NAMESPACE = "kubelock-example"
REPLICAS = 3


def command(*argv: str, timeout: float = 900, input: str | None = None) -> str:
    """Run a command, its output on failure in the assertion message; return stdout."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def require(tool: str, why: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.skip(f"{tool} is not installed ({why})")
    return found


@dataclasses.dataclass(frozen=True)
class Cluster:
    tool: str
    context: str

    def kubectl(self, *args: str, timeout: float = 600) -> str:
        return command("kubectl", f"--context={self.context}", *args, timeout=timeout)

    def load(self, image: str) -> None:
        if self.tool == "kind":
            command("kind", "load", "docker-image", image, "--name", CLUSTER_NAME)
        else:
            command("minikube", "-p", CLUSTER_NAME, "image", "load", image)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tool = os.environ.get("E2E_CLUSTER", "kind")
    if tool not in ("kind", "minikube"):
        pytest.fail(f"E2E_CLUSTER={tool}: use kind or minikube")
    require(tool, f"E2E_CLUSTER={tool}")
    require("kubectl", "it applies the example")
    require("docker", "it builds the images")
    engine = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if engine.returncode != 0:
        reason = (engine.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"no container engine answers `docker info`: {reason}")

    if tool == "kind":
        command("kind", "create", "cluster", "--name", CLUSTER_NAME, "--wait", "300s")
        context = f"kind-{CLUSTER_NAME}"
    else:
        command("minikube", "start", "-p", CLUSTER_NAME, "--wait=all")
        context = CLUSTER_NAME
    try:
        yield Cluster(tool, context)
    finally:
        if os.environ.get("KUBELOCK_E2E_KEEP") != "1":
            if tool == "kind":
                command("kind", "delete", "cluster", "--name", CLUSTER_NAME)
            else:
                command("minikube", "delete", "-p", CLUSTER_NAME)


@pytest.fixture(scope="module")
def example(cluster: Cluster) -> Cluster:
    """The images built and loaded, the example applied and rolled out."""
    command("docker", "build", "-t", KUBELOCK_IMAGE, str(REPO), timeout=1800)
    command(
        "docker",
        "build",
        "--build-arg",
        f"KUBELOCK_IMAGE={KUBELOCK_IMAGE}",
        "-t",
        APP_IMAGE,
        str(EXAMPLE / "app"),
    )
    cluster.load(APP_IMAGE)
    cluster.kubectl("apply", "-k", str(EXAMPLE))
    cluster.kubectl(
        "rollout", "status", "deployment/example-app", "-n", NAMESPACE, "--timeout=600s"
    )
    return cluster


def pods(cluster: Cluster) -> list[dict[str, Any]]:
    listed = cluster.json("get", "pods", "-n", NAMESPACE, "-l", "app=example-app")
    return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def database(cluster: Cluster) -> dict[str, str]:
    data: dict[str, str] = cluster.json("get", "configmap", "example-db", "-n", NAMESPACE)["data"]
    return data


def init_log(cluster: Cluster, pod: str) -> str:
    return cluster.kubectl("logs", pod, "-c", "migrate", "-n", NAMESPACE)


def test_the_replicas_migrate_one_at_a_time_and_only_once(example: Cluster) -> None:
    running = pods(example)
    names = [pod["metadata"]["name"] for pod in running]
    assert len(running) == REPLICAS
    assert all(ready(pod) for pod in running), [pod["status"] for pod in running]

    runs = assert_migrated_one_at_a_time(database(example), names)
    assert runs[0].outcome == f"applied {','.join(MIGRATIONS)}"
    assert [run.outcome for run in runs[1:]] == ["nothing to do"] * (REPLICAS - 1)

    logs = {name: init_log(example, name) for name in names}
    for log in logs.values():
        assert "acquired the lock" in log, log
        assert "released the lock" in log, log
    migrated = [name for name, log in logs.items() if "Applying example.0001_initial" in log]
    assert migrated == [runs[0].pod], logs
    others = [name for name in names if name not in migrated]
    for name in others:
        assert "No migrations to apply." in logs[name], logs[name]
    # They all started together, so the others found the lock taken and waited.
    assert any("waiting for the lock, held by" in logs[name] for name in others), logs

    lease = example.json("get", "lease", "migrations", "-n", NAMESPACE)
    assert lease["spec"].get("holderIdentity", "") == ""
    assert lease["spec"].get("leaseTransitions") == REPLICAS - 1


def test_a_rollout_restart_finds_nothing_to_do(example: Cluster) -> None:
    before = {pod["metadata"]["name"] for pod in pods(example)}
    example.kubectl("rollout", "restart", "deployment/example-app", "-n", NAMESPACE)
    example.kubectl(
        "rollout", "status", "deployment/example-app", "-n", NAMESPACE, "--timeout=600s"
    )
    after = [pod["metadata"]["name"] for pod in pods(example) if ready(pod)]
    new = [name for name in after if name not in before]
    assert len(new) == REPLICAS, after

    runs = assert_migrated_one_at_a_time(database(example), new)
    assert [run.outcome for run in runs] == ["nothing to do"] * REPLICAS
