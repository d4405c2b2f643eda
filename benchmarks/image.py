"""The image's two layouts side by side: size, and start-up in a container.

    uv run python -m benchmarks.image [--runs 10]

Builds the images with scripts/image (seconds when cached; needs a Docker
engine, or root to start one), then prints the size of the image and of each
layout in it, and the medians of wall time of `docker run --rm IMAGE --version`
and of `kubelock --name ... -- kubelock --version` in-cluster against a real
control plane (the container in the host's network, the ServiceAccount token
mounted at the standard path), for:

- the folder layout, the image's entrypoint, on a read-only root with no /tmp;
- the one-file executable, on a read-only root with an exec-able tmpfs at /tmp
  (what it needs: it unpacks itself there at every start).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ._plane import control_plane

REPO = Path(__file__).resolve().parents[1]
SERVICEACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update", "watch"],
    }
]
LAYOUTS = {
    "folder (entrypoint), no /tmp": ["--read-only"],
    "one file, tmpfs /tmp:exec": [
        "--read-only",
        "--tmpfs=/tmp:exec",
        "--entrypoint=/usr/local/bin/kubelock",
    ],
}


def timed(argv: list[str], runs: int) -> list[float]:
    subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def describe(times: list[float]) -> str:
    return (
        f"median {statistics.median(times) * 1000:.0f} ms "
        f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, {len(times)} runs)"
    )


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    docker = subprocess.run(
        [str(REPO / "scripts/docker-engine"), "client"], capture_output=True, text=True, check=True
    ).stdout.strip()
    image, _ = subprocess.run(
        [str(REPO / "scripts/image")], capture_output=True, text=True, check=True
    ).stdout.split()

    inspected = json.loads(
        subprocess.run(
            [docker, "image", "inspect", image], capture_output=True, text=True, check=True
        ).stdout
    )[0]
    print(f"{image}: {megabytes(inspected['Size'])}")
    history = subprocess.run(
        [docker, "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in history.stdout.splitlines():
        size, created_by = line.split("\t", 1)
        if "COPY" in created_by and "/out/" in created_by:
            print(f"  layer {created_by.split('/out/')[1].split()[0]}: {megabytes(int(size))}")

    with control_plane("bench") as (plane, _), tempfile.TemporaryDirectory() as folder:
        plane.create_service_account("bench", "bench")
        plane.grant("bench", "system:serviceaccount:bench:bench", LEASE_RULES)
        mount = Path(folder) / "sa"
        env = plane.in_cluster_environment("bench", "bench", mount)
        mount.chmod(0o755)
        pod = [
            "--network=host",
            f"--volume={mount}:{SERVICEACCOUNT}:ro",
            f"--env=KUBERNETES_SERVICE_HOST={env['KUBERNETES_SERVICE_HOST']}",
            f"--env=KUBERNETES_SERVICE_PORT={env['KUBERNETES_SERVICE_PORT']}",
            "--env=HOSTNAME=bench",
        ]
        for label, options in LAYOUTS.items():
            run = [docker, "run", "--rm", *options]
            version = timed([*run, image, "--version"], args.runs)
            locked = timed(
                [*run, *pod, image, "--name", "image-bench", "--", "kubelock", "--version"],
                args.runs,
            )
            print(f"{label:>30}: `docker run --rm IMAGE --version` {describe(version)}")
            print(f"{'':>30}  `... -- kubelock --version` in-cluster {describe(locked)}")


if __name__ == "__main__":
    main()
