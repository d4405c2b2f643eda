"""The clusters the end-to-end tests run on, behind one interface.

`E2E_CLUSTER` picks one:

- `local` (the default): `kubelock.testing.cluster.Cluster`, a single node
  run from the binaries built here, containerd and runc from Debian's packages
  (`scripts/cluster-tools`); needs root. Started once per test session.
- `kind` or `minikube`: a new cluster made with that tool, deleted afterwards
  unless `KUBELOCK_E2E_KEEP=1`.

Every test talks to the cluster through `E2ECluster`: kubectl, loading an
image built by the Docker engine, and stopping and starting the API server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from kubelock.testing import ControlPlaneError
from kubelock.testing.assets import AssetsUnavailable
from kubelock.testing.cluster import Cluster, ClusterError

Say = Callable[[str], None]
"""Prints a line to the terminal, under pytest's capture too (the `say` fixture)."""

CLUSTER_NAME = os.environ.get("E2E_CLUSTER_NAME", "kubelock-e2e")
TOOLS = ("local", "kind", "minikube")


def command(*argv: str, timeout: float = 900, input: str | None = None) -> str:
    """Run a command, its output on failure in the assertion message; return stdout."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def require(tool: str, why: str) -> str:
    """The tool's path; the test fails (never skips) when a chosen cluster lacks it."""
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed ({why})")
    return found


def wait_for(check: Callable[[], Any], *, what: str, timeout: float = 120) -> Any:
    """Poll `check` until it returns something true; return that. Fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@dataclass
class E2ECluster:
    tool: str
    kubectl_argv: list[str]
    local: Cluster | None = None

    def kubectl(self, *args: str, timeout: float = 600, input: str | None = None) -> str:
        return command(*self.kubectl_argv, *args, timeout=timeout, input=input)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def load(self, image: str) -> None:
        """Copy an image from the Docker engine into the cluster's container runtime."""
        if self.local is not None:
            self.local.load_image(docker_image=image)
        elif self.tool == "kind":
            command("kind", "load", "docker-image", image, "--name", CLUSTER_NAME)
        else:
            command("minikube", "-p", CLUSTER_NAME, "image", "load", image)

    def stop_apiserver(self) -> None:
        if self.local is not None:
            self.local.control_plane.stop_apiserver()
        else:  # kubeadm's static Pod: the kubelet stops it when its manifest goes
            self._node_shell("mv /etc/kubernetes/manifests/kube-apiserver.yaml /etc/kubernetes/")

    def start_apiserver(self) -> None:
        if self.local is not None:
            self.local.control_plane.start_apiserver()
        else:
            self._node_shell("mv /etc/kubernetes/kube-apiserver.yaml /etc/kubernetes/manifests/")
        wait_for(self._apiserver_answers, what="the API server to answer again", timeout=300)

    def _apiserver_answers(self) -> bool:
        probe = subprocess.run(
            [*self.kubectl_argv, "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            check=False,
        )
        return probe.returncode == 0

    def _node_shell(self, script: str) -> None:
        if self.tool == "kind":
            command("docker", "exec", f"{CLUSTER_NAME}-control-plane", "sh", "-c", script)
        else:
            command("minikube", "-p", CLUSTER_NAME, "ssh", "--", "sudo", "sh", "-c", script)


@contextmanager
def started_cluster(tool: str, say: Say) -> Iterator[E2ECluster]:
    """Start the chosen cluster, yield it, and delete it (checking `local` left nothing)."""
    if tool not in TOOLS:
        pytest.fail(f"E2E_CLUSTER={tool}: use one of {', '.join(TOOLS)}")
    if tool == "local":
        yield from _local(say)
        return
    require(tool, f"E2E_CLUSTER={tool}")
    require("kubectl", "it applies the examples")
    started = time.monotonic()
    if tool == "kind":
        command("kind", "create", "cluster", "--name", CLUSTER_NAME, "--wait", "300s")
        context = f"kind-{CLUSTER_NAME}"
    else:
        command("minikube", "start", "-p", CLUSTER_NAME, "--wait=all")
        context = CLUSTER_NAME
    say(f"{tool} cluster {CLUSTER_NAME} ready in {time.monotonic() - started:.1f} s")
    try:
        yield E2ECluster(tool, ["kubectl", f"--context={context}"])
    finally:
        if os.environ.get("KUBELOCK_E2E_KEEP") != "1":
            if tool == "kind":
                command("kind", "delete", "cluster", "--name", CLUSTER_NAME)
            else:
                command("minikube", "delete", "-p", CLUSTER_NAME)


def _local(say: Say) -> Iterator[E2ECluster]:
    try:
        local = Cluster()
        local.start()
    except (ClusterError, ControlPlaneError, AssetsUnavailable) as error:
        pytest.fail(f"E2E_CLUSTER=local: {error}")
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in local.phase_seconds.items())
    say(f"local cluster: node Ready in {local.start_seconds:.1f} s ({phases})")
    try:
        yield E2ECluster(
            "local", [str(local.kubectl_binary), f"--kubeconfig={local.kubeconfig}"], local
        )
    finally:
        local.stop()
        leftovers = local.leftovers()
        assert leftovers == [], f"the local cluster left behind: {leftovers}"
