"""The local cluster itself (E2E_CLUSTER=local): it starts, runs a Pod behind a
Service, and `stop()` leaves nothing behind on the host.

Checked from outside the `Cluster` object as well as with its own
`leftovers()`: while it runs, its processes, mounts, network namespace,
cgroups and the iptables chains in the node's namespace exist; after `stop()`
none does, and the host's own iptables chains are what they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubelock.testing.cluster import NODE_NAME, SANDBOX_IMAGE, Cluster

from .clusters import Say, wait_for
from .conftest import cluster_tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def host_chains() -> set[str]:
    found = set()
    for table in ("filter", "nat", "mangle"):
        listed = subprocess.run(
            ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=True
        ).stdout
        found |= {
            f"{table}/{line.split()[1]}" for line in listed.splitlines() if line.startswith("-N")
        }
    return found


def mounts_under(folder: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(f"{folder}/")]


def processes_naming(text: str) -> list[int]:
    """Pids whose command line mentions `text` (the cluster's work folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_the_cluster_runs_a_pod_and_stop_leaves_nothing_behind(say: Say) -> None:
    if cluster_tool() != "local":
        pytest.skip(f"checks the local cluster; E2E_CLUSTER={cluster_tool()}")
    chains_before = host_chains()
    cluster = Cluster()
    cluster.start()
    workdir = str(cluster.workdir)
    try:
        say(f"local cluster: node Ready in {cluster.start_seconds:.1f} s")
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json"))["items"]
        assert [node["metadata"]["name"] for node in nodes] == [NODE_NAME]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "pause", "namespace": "default", "labels": {"app": "pause"}},
            "spec": {
                "containers": [
                    {"name": "pause", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never"}
                ],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        }
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "pause", "namespace": "default"},
            "spec": {"selector": {"app": "pause"}, "ports": [{"port": 80}]},
        }
        items = {"apiVersion": "v1", "kind": "List", "items": [pod, service]}
        # The default ServiceAccount comes from the controller-manager.
        wait_for(
            lambda: cluster.kubectl("get", "serviceaccounts", "-n", "default", "-o", "name"),
            what="the default ServiceAccount",
        )
        cluster.kubectl("apply", "-f", "-", input=json.dumps(items))
        started = time.monotonic()
        cluster.kubectl("wait", "pod/pause", "--for=condition=Ready", "--timeout=120s")
        say(f"a Pod was Ready {time.monotonic() - started:.1f} s after it was created")

        # While it runs, all of this exists (so the checks below can fail).
        assert cluster.leftovers() != []
        assert mounts_under(cluster.workdir)  # the Pod's rootfs, token volume, netns
        assert processes_naming(workdir)
        assert Path(f"/run/netns/{cluster.netns}").exists()
        node_chains = cluster.in_node("iptables", "-w", "-t", "nat", "-S").stdout
        assert "-N KUBE-SERVICES" in node_chains  # kube-proxy's, in the node's namespace
        assert any(Path("/sys/fs/cgroup").glob(f"*{cluster.cgroup_root}"))
    finally:
        stopped = time.monotonic()
        cluster.stop()
        say(f"local cluster: stopped in {time.monotonic() - stopped:.1f} s")

    assert cluster.leftovers() == []
    assert mounts_under(cluster.workdir) == []
    assert processes_naming(workdir) == []
    assert not Path(f"/run/netns/{cluster.netns}").exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.netns not in listed
    assert not any(Path("/sys/fs/cgroup").glob(f"*{cluster.cgroup_root}"))
    assert host_chains() == chains_before


KILLED_OWNER = """
import json, sys, time
from kubelock.testing.cluster import SANDBOX_IMAGE, Cluster
cluster = Cluster()
cluster.start()
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pause", "namespace": "default"},
       "spec": {"containers": [{"name": "pause", "image": SANDBOX_IMAGE,
                                "imagePullPolicy": "Never"}]}}
for _ in range(100):  # until the controller-manager has made the default ServiceAccount
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        break
    except Exception:
        time.sleep(0.2)
cluster.kubectl("wait", "pod/pause", "--for=condition=Ready", "--timeout=120s")
print(json.dumps({"workdir": str(cluster.workdir), "netns": cluster.netns,
                  "cgroup_root": cluster.cgroup_root}), flush=True)
time.sleep(600)
"""


def test_a_cluster_whose_process_was_killed_is_cleaned_up_by_the_next_start(say: Say) -> None:
    if cluster_tool() != "local":
        pytest.skip(f"checks the local cluster; E2E_CLUSTER={cluster_tool()}")
    owner = subprocess.Popen(
        [sys.executable, "-c", KILLED_OWNER], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    started = json.loads(owner.stdout.readline())
    owner.kill()  # no stop(), no atexit: its containers' shims live on
    owner.wait()
    workdir = started["workdir"]
    assert processes_naming(workdir)  # the shims, and the Pod still runs
    assert Path(f"/run/netns/{started['netns']}").exists()
    assert mounts_under(Path(workdir))

    cluster = Cluster()
    cluster.start()  # cleans up the dead one first
    try:
        assert not Path(workdir).exists()
        assert processes_naming(workdir) == []
        assert mounts_under(Path(workdir)) == []
        assert not Path(f"/run/netns/{started['netns']}").exists()
        assert not any(Path("/sys/fs/cgroup").glob(f"*{started['cgroup_root']}"))
        say("a killed cluster's leftovers were removed by the next start")
    finally:
        cluster.stop()
    assert cluster.leftovers() == []
