"""The image's two layouts side by side: size, and start-up in a container.

    uv run python -m benchmarks.image [--runs 10]

Builds the images with scripts/image (seconds when cached; needs a Docker
engine, or root to start one), then prints the size of the image and of each
layout in it, and medians of wall time of: the two executables copied out of
the image and run on the host (`--version`: their own start-up, without the
engine's); `docker run --rm IMAGE --version`; and `kubelock --name ... --
kubelock --version` in a container, in-cluster against a real control plane
(the host's network, the ServiceAccount token mounted at the standard path).
The commands take turns, so that changes of load hit each alike. Layouts:

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
        "verbs": ["get", "create", "update", "patch", "watch"],
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


def timed(commands: dict[str, list[str]], runs: int) -> dict[str, list[float]]:
    """Wall times of each command, the commands taking turns (load changes hit all alike)."""
    for argv in commands.values():
        subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[label].append(time.perf_counter() - started)
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
        [
            *(docker, "history", "--no-trunc", "--human=false"),
            *("--format", "{{.Size}}\t{{.CreatedBy}}", image),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in history.stdout.splitlines():
        size, created_by = line.split("\t", 1)
        if "COPY" in created_by and "/out/" in created_by:
            print(f"  layer {created_by.split('/out/')[1].split()[0]}: {megabytes(int(size))}")

    with tempfile.TemporaryDirectory() as folder:
        # The same two files outside any container: the executables' own start-up.
        container = subprocess.run(
            [docker, "create", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            for source in ("/usr/local/bin/kubelock", "/usr/local/lib/kubelock"):
                target = Path(folder) / source.split("/")[-2]
                subprocess.run([docker, "cp", f"{container}:{source}", str(target)], check=True)
        finally:
            subprocess.run([docker, "rm", container], capture_output=True, check=True)
        on_host = {
            "folder, on the host: `kubelock --version`": [f"{folder}/lib/kubelock", "--version"],
            "one file, on the host: `kubelock --version`": [f"{folder}/bin", "--version"],
        }
        for label, times in timed(on_host, args.runs).items():
            print(f"{label}: {describe(times)}")

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
        commands = {}
        for label, options in LAYOUTS.items():
            run = [docker, "run", "--rm", *options]
            commands[f"{label}: `docker run --rm IMAGE --version`"] = [*run, image, "--version"]
            commands[f"{label}: `-- kubelock --version` in-cluster"] = [
                *(*run, *pod, image),
                *("--name", "image-bench", "--", "kubelock", "--version"),
            ]
        for label, times in timed(commands, args.runs).items():
            print(f"{label}: {describe(times)}")


if __name__ == "__main__":
    main()
