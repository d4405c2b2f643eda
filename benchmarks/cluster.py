"""Start-up and stop of the local single-node cluster (`kubelock.testing.cluster`).

    uv run python -m benchmarks.cluster [--runs N]

Starts and stops the cluster N times (default 5; needs root and
scripts/cluster-tools) and prints the median and range of: start-up until the
node is Ready and kube-proxy has synced, each start-up phase, a first Pod
(the sandbox image) until Ready, and `stop()`. Binaries must be built already
(`python -m kubelock.testing.assets` and `... assets node`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from kubelock.testing.assets import ensure_binaries, ensure_node_binaries
from kubelock.testing.cluster import SANDBOX_IMAGE, Cluster

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "bench", "namespace": "default"},
    "spec": {"containers": [{"name": "pause", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never"}]},
}


def once(figures: dict[str, list[float]]) -> None:
    cluster = Cluster()
    cluster.start()
    try:
        figures["start-up, until the node is Ready"].append(cluster.start_seconds)
        for phase, seconds in cluster.phase_seconds.items():
            figures[f"  {phase}"].append(seconds)
        created = time.monotonic()
        while True:  # the default ServiceAccount is made by the controller-manager
            try:
                cluster.kubectl("apply", "-f", "-", input=json.dumps(POD))
                break
            except Exception:
                if time.monotonic() - created > 60:
                    raise
                time.sleep(0.1)
        cluster.kubectl("wait", "pod/bench", "--for=condition=Ready", "--timeout=120s")
        figures["a first Pod, created to Ready"].append(time.monotonic() - created)
    finally:
        stopping = time.monotonic()
        cluster.stop()
        figures["stop()"].append(time.monotonic() - stopping)
    leftovers = cluster.leftovers()
    if leftovers:
        raise SystemExit(f"the cluster left behind: {leftovers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    ensure_binaries()
    ensure_node_binaries()
    figures: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        once(figures)
    print(f"local cluster, {runs} runs: median (min-max) seconds")
    for what, values in figures.items():
        print(f"{what:40} {statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
