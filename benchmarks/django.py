"""examples/django on the local cluster: rollout time with kubelock --once and with a plain migrate.

    uv run python -m benchmarks.django [--replicas 3 10]

Needs root, scripts/cluster-tools and a Docker engine: it builds the images
(`scripts/image --django`), starts the local single-node cluster
(`kubelock.testing.cluster`), applies examples/django's PostgreSQL, then for
each replica count and each way of migrating makes a fresh database and a new
Deployment of the example's app pointed at it, all replicas at once:

- `kubelock --once`: the init container as examples/django has it;
- `plain migrate`: `python manage.py migrate --noinput`, no lock.

It prints, per case, the time from `kubectl apply` until every Pod is Ready,
how many `migrate` runs started (restarts of a failed init container
included), how many of them failed, and how many times the slow data
migration ran (its rows in shop_migrationrun). One run per case: a rollout's time
depends on the kubelet's restart back-off more than on anything measured here.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from kubelock.testing.assets import ensure_binaries, ensure_node_binaries
from kubelock.testing.cluster import Cluster

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "django"
NAMESPACE = "kubelock-django"
POSTGRES_IMAGE = "postgres:15"
PLAIN_MIGRATE = ["python", "manage.py", "migrate", "--noinput"]


def build_images() -> tuple[str, str]:
    built = subprocess.run(
        [str(REPO / "scripts" / "image"), "--django"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return built[-2], built[-1]  # the app's image, then PostgreSQL's


def apply(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", "-n", NAMESPACE, *args, "-o", "json"))


def psql(cluster: Cluster, sql: str, database: str = "app") -> str:
    return cluster.kubectl(
        "exec", "deploy/postgres", "-n", NAMESPACE, "--",
        "psql", "-U", "app", "-d", database, "-tAc", sql,
    ).strip()  # fmt: skip


def set_up(cluster: Cluster, postgres_image: str) -> dict[str, Any]:
    """PostgreSQL and everything else of the example but the app; returns the app's Deployment."""
    manifests = cluster.kubectl("kustomize", str(EXAMPLE))
    objects = json_objects(
        cluster.kubectl("create", "--dry-run=client", "-o", "json", "-f", "-", input=manifests)
    )
    for obj in objects:
        for container in (
            obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            if container["image"] == POSTGRES_IMAGE:
                container["image"] = postgres_image
    web = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "web")
    apply(cluster, [o for o in objects if o is not web])
    cluster.kubectl("rollout", "status", "deployment/postgres", "-n", NAMESPACE, "--timeout=600s")
    # No name service for the local cluster's Pods: the database by its Service's address.
    address = get(cluster, "service", "postgres")["spec"]["clusterIP"]
    cluster.kubectl(
        "patch", "configmap", "database", "-n", NAMESPACE,
        "--patch", json.dumps({"data": {"PGHOST": address}}),
    )  # fmt: skip
    return web


def rollout(cluster: Cluster, web: dict[str, Any], replicas: int, locked: bool) -> dict[str, Any]:
    name = f"web-{'once' if locked else 'plain'}-{replicas}"
    database = name.replace("-", "_")
    psql(cluster, f"CREATE DATABASE {database}")
    deployment = copy.deepcopy(web)
    deployment["metadata"] = {"name": name, "namespace": NAMESPACE}
    deployment["spec"]["replicas"] = replicas
    deployment["spec"]["selector"] = {"matchLabels": {"app": name}}
    template = deployment["spec"]["template"]
    template["metadata"] = {"labels": {"app": name}}
    migrate = template["spec"]["initContainers"][0]
    if not locked:
        migrate["command"] = PLAIN_MIGRATE
        migrate.pop("args", None)
    # A version of its own: --once skips a version the lock records as done.
    env = [{"name": "PGDATABASE", "value": database}, {"name": "APP_VERSION", "value": name}]
    for container in [migrate, *template["spec"]["containers"]]:
        container["env"] = env

    started = time.monotonic()
    apply(cluster, [deployment])
    while get(cluster, "deployment", name).get("status", {}).get("readyReplicas", 0) < replicas:
        if time.monotonic() - started > 900:
            raise SystemExit(f"{name}: not all {replicas} Pods Ready after 900 s")
        time.sleep(0.2)
    seconds = time.monotonic() - started

    pods = get(cluster, "pods", "-l", f"app={name}")["items"]
    runs = failed = 0
    for pod in pods:
        status = pod["status"]["initContainerStatuses"][0]
        restarts = status["restartCount"]
        failed += restarts  # each restart follows a failed run
        if locked:
            log = cluster.kubectl("logs", pod["metadata"]["name"], "-c", "migrate", "-n", NAMESPACE)
            runs += restarts + ("Operations to perform:" in log)
        else:
            runs += restarts + 1
    # The slow data migration writes one row each time it runs to the end.
    data_runs = int(psql(cluster, "SELECT count(*) FROM shop_migrationrun", database))
    cluster.kubectl("delete", "deployment", name, "-n", NAMESPACE, "--wait=true")
    return {"seconds": seconds, "runs": runs, "failed": failed, "data_runs": data_runs}


def json_objects(printed: str) -> list[dict[str, Any]]:
    """The objects `kubectl ... -o json` prints one after the other for a multi-object input."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(printed.rstrip()):
        obj, at = decoder.raw_decode(printed, at)
        objects.append(obj)
        at = len(printed) - len(printed[at:].lstrip())
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[3, 10])
    options = parser.parse_args()
    ensure_binaries()
    ensure_node_binaries()
    app_image, postgres_image = build_images()
    cluster = Cluster()
    cluster.start()
    try:
        for image in (app_image, postgres_image):
            cluster.load_image(docker_image=image)
        web = set_up(cluster, postgres_image)
        header = f"{'replicas':>8}  {'migrating':<16}  {'to all Ready':>12}  {'migrate runs':>12}"
        print(f"{header}  failed  data migration ran")
        for replicas in options.replicas:
            for locked in (True, False):
                result = rollout(cluster, web, replicas, locked)
                way = "kubelock --once" if locked else "plain migrate"
                print(
                    f"{replicas:>8}  {way:<16}  {result['seconds']:>10.1f} s"
                    f"  {result['runs']:>12}  {result['failed']:>6}  {result['data_runs']}",
                    flush=True,
                )
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
