"""The init-container example on a real cluster (E2E_CLUSTER: local, kind or minikube).

The images are built, loaded into the cluster, examples/init-container is
applied, and the story is checked as a user would see it: the migrations ran
one Pod at a time and only once, every Pod became Ready, and each init
container's log shows that it waited for the lock or ran the migrations. Then:
a rollout restart finds nothing to do; a rolling update to a new image tag
migrates again, one Pod at a time; only the init container has the
ServiceAccount token kubelock uses (the projected one the kubelet requested for
the Pod), and no credential in the app container can read or write the lock;
and a Pod deleted while its init container holds the lock passes the kubelet's
SIGTERM to the migration, releases the lock, and the next Pod's migration
starts within a second.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Collection
from datetime import datetime
from typing import Any

import pytest

from kubelock.kube.auth import SERVICEACCOUNT_DIR

from ..integration.test_deploy import MIGRATIONS, assert_migrated_one_at_a_time
from .clusters import E2ECluster, Say, command, wait_for
from .conftest import APP_IMAGE, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

EXAMPLE = REPO / "examples" / "init-container"
NAMESPACE = "kubelock-example"
DEPLOYMENT = "deployment/example-app"
REPLICAS = 3
_STAMP = re.compile(r"^kubelock: (\S+Z) (.*)$")
# Run in the app container: is there a token where kubelock's would be, and what
# does the API server answer to each credential the container has, reading the
# Lease and annotating it as a forger of done KEYs would?
TRY_THE_LOCK = """
import json, os, ssl, sys, urllib.error, urllib.request
lock_folder, lock = sys.argv[1:3]
host = os.environ["KUBERNETES_SERVICE_HOST"]
base = f"https://[{host}]" if ":" in host else f"https://{host}"
base += f":{os.environ['KUBERNETES_SERVICE_PORT']}"
answers = {}
for entry in sorted(os.listdir("/var/run/secrets")):
    folder = os.path.join("/var/run/secrets", entry)
    if not os.path.isfile(os.path.join(folder, "token")):
        continue
    read = lambda name: open(os.path.join(folder, name)).read().strip()
    url = f"{base}/apis/coordination.k8s.io/v1/namespaces/{read('namespace')}/leases/{lock}"
    tls = ssl.create_default_context(cafile=os.path.join(folder, "ca.crt"))
    answers[folder] = {}
    for verb, method, body in [
        ("get", "GET", None),
        ("patch", "PATCH", b'{"metadata":{"annotations":{"kubelock.io/e2e-forged":"x"}}}'),
    ]:
        request = urllib.request.Request(url, method=method, data=body, headers={
            "Authorization": "Bearer " + read("token"),
            "Content-Type": "application/merge-patch+json",
        })
        try:
            with urllib.request.urlopen(request, context=tls, timeout=10) as answer:
                answers[folder][verb] = answer.status
        except urllib.error.HTTPError as error:
            answers[folder][verb] = error.code
present = os.path.exists(os.path.join(lock_folder, "token"))
print(json.dumps({"lock_token_present": present, "answers": answers}))
"""


@pytest.fixture(scope="module")
def example(cluster: E2ECluster, say: Say) -> E2ECluster:
    """examples/init-container applied and rolled out."""
    cluster.kubectl("apply", "-k", str(EXAMPLE))
    rollout(cluster, say, "the example's first rollout")
    return cluster


def rollout(cluster: E2ECluster, say: Say, what: str) -> None:
    started = datetime.now()
    cluster.kubectl("rollout", "status", DEPLOYMENT, "-n", NAMESPACE, "--timeout=600s")
    say(f"{what}: complete in {(datetime.now() - started).total_seconds():.1f} s")


def pods(cluster: E2ECluster) -> list[dict[str, Any]]:
    listed = cluster.json("get", "pods", "-n", NAMESPACE, "-l", "app=example-app")
    return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def database(cluster: E2ECluster) -> dict[str, str]:
    data: dict[str, str] = cluster.json("get", "configmap", "example-db", "-n", NAMESPACE)["data"]
    return data


def reset_database(cluster: E2ECluster) -> None:
    """Apply the example's empty "database" again: the next rollout migrates from scratch."""
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE / "database.yaml"))
    assert database(cluster)["applied"] == ""


def init_log(cluster: E2ECluster, pod: str) -> str:
    return cluster.kubectl("logs", pod, "-c", "migrate", "-n", NAMESPACE)


def stamped(log: str, message: str) -> datetime:
    """When kubelock logged the first line starting with `message`."""
    for line in log.splitlines():
        match = _STAMP.match(line)
        if match and match[2].startswith(message):
            return datetime.fromisoformat(match[1])
    raise AssertionError(f"no kubelock line {message!r} in:\n{log}")


def test_the_replicas_migrate_one_at_a_time_and_only_once(example: E2ECluster, say: Say) -> None:
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
    waits = {
        name: line
        for name in others
        for line in logs[name].splitlines()
        if "waiting for the lock, held by" in line
    }
    assert waits, logs
    for name, line in waits.items():
        say(f"{name}: {line}")

    lease = example.json("get", "lease", "migrations", "-n", NAMESPACE)
    assert lease["spec"].get("holderIdentity", "") == ""
    assert lease["spec"].get("leaseTransitions") == REPLICAS - 1


def test_a_rollout_restart_finds_nothing_to_do(example: E2ECluster, say: Say) -> None:
    before = {pod["metadata"]["name"] for pod in pods(example)}
    example.kubectl("rollout", "restart", DEPLOYMENT, "-n", NAMESPACE)
    rollout(example, say, "rollout restart")
    after = [pod["metadata"]["name"] for pod in pods(example) if ready(pod)]
    new = [name for name in after if name not in before]
    assert len(new) == REPLICAS, after

    runs = assert_migrated_one_at_a_time(database(example), new)
    assert [run.outcome for run in runs] == ["nothing to do"] * REPLICAS


def test_a_rolling_update_to_a_new_tag_migrates_one_pod_at_a_time(
    example: E2ECluster, say: Say
) -> None:
    new_image = APP_IMAGE.replace(":dev", ":e2e-update")
    command("docker", "tag", APP_IMAGE, new_image)
    example.load(new_image)
    reset_database(example)
    before = {pod["metadata"]["name"] for pod in pods(example)}
    example.kubectl(
        "set", "image", DEPLOYMENT, "-n", NAMESPACE, f"migrate={new_image}", f"app={new_image}"
    )
    rollout(example, say, f"rolling update to {new_image}")

    running = pods(example)
    assert len(running) == REPLICAS
    assert all(ready(pod) for pod in running)
    images = {c["image"] for pod in running for c in pod["spec"]["initContainers"]}
    assert images == {new_image}
    new = [pod["metadata"]["name"] for pod in running if pod["metadata"]["name"] not in before]
    assert len(new) == REPLICAS
    runs = assert_migrated_one_at_a_time(database(example), new)
    assert runs[0].outcome == f"applied {','.join(MIGRATIONS)}"
    assert [run.outcome for run in runs[1:]] == ["nothing to do"] * (REPLICAS - 1)


def test_only_the_init_container_has_the_lock_token_and_the_app_cannot_write_the_lock(
    example: E2ECluster,
) -> None:
    pod = pods(example)[0]
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    # The one ServiceAccount token volume is the projected, kubelet-rotated
    # token, mounted in `migrate` alone, where kubelock's in-cluster auth reads it.
    projected = [
        volume
        for volume in spec["volumes"]
        if any(
            "serviceAccountToken" in source
            for source in volume.get("projected", {}).get("sources", [])
        )
    ]
    assert len(projected) == 1, spec["volumes"]
    mounted = {
        container["name"]: mount["mountPath"]
        for container in [*spec["initContainers"], *spec["containers"]]
        for mount in container.get("volumeMounts", [])
        if mount["name"] == projected[0]["name"]
    }
    assert mounted == {"migrate": SERVICEACCOUNT_DIR}, mounted
    # With that credential and no other, this Pod's kubelock took the lock.
    assert "acquired the lock" in init_log(example, name)

    # No Secret holds a token of kubelock's account: the one token Secret is the
    # app's database credential.
    secrets = example.json("get", "secrets", "-n", NAMESPACE)["items"]
    token_owners = [
        s["metadata"]["annotations"]["kubernetes.io/service-account.name"]
        for s in secrets
        if s["type"] == "kubernetes.io/service-account-token"
    ]
    assert token_owners == ["example-db"], token_owners

    # From inside the running app: no token at kubelock's folder, and every
    # credential it does have is refused the Lease.
    tried = json.loads(
        example.kubectl(
            "exec", name, "-n", NAMESPACE, "-c", "app", "--",
            "python3", "-c", TRY_THE_LOCK, SERVICEACCOUNT_DIR, "migrations",
        )
    )  # fmt: skip
    assert tried["lock_token_present"] is False, tried
    assert tried["answers"] == {"/var/run/secrets/example-db": {"get": 403, "patch": 403}}, tried
    lease = example.json("get", "lease", "migrations", "-n", NAMESPACE)
    assert "kubelock.io/e2e-forged" not in lease["metadata"].get("annotations", {})


def test_a_pod_deleted_while_holding_the_lock_hands_over_within_a_second(
    example: E2ECluster, say: Say
) -> None:
    # All three Pods start together on an empty database, with slow migrations.
    example.kubectl("scale", DEPLOYMENT, "-n", NAMESPACE, "--replicas=0")
    wait_for(lambda: not _all_pods(example), what="the example's Pods to go", timeout=180)
    reset_database(example)
    example.kubectl(
        "set", "env", DEPLOYMENT, "-n", NAMESPACE, "-c", "migrate", "SECONDS_PER_MIGRATION=20"
    )
    example.kubectl("scale", DEPLOYMENT, "-n", NAMESPACE, f"--replicas={REPLICAS}")

    holder = wait_for(lambda: _migrating(example), what="a Pod to hold the lock", timeout=300)
    # Once the first migration runs, the database says a run is in progress.
    wait_for(
        lambda: "Applying example.0001_initial" in init_log(example, holder),
        what=f"{holder} to start migrating",
    )
    # Follow its log until its init container ends: the Pod object goes right after.
    follow = subprocess.Popen(
        [*example.kubectl_argv, "logs", "-f", holder, "-c", "migrate", "-n", NAMESPACE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    example.kubectl("delete", "pod", holder, "-n", NAMESPACE, "--wait=false")
    deleted_log, _ = follow.communicate(timeout=120)

    # The kubelet's SIGTERM reached kubelock, which passed it to the migration.
    signalled = stamped(deleted_log, "forwarding SIGTERM to the command")
    assert "released the lock" in deleted_log, deleted_log
    assert "Applying example.0003" not in deleted_log, deleted_log  # stopped mid-way

    successor = wait_for(
        lambda: _migrating(example, besides={holder}),
        what="the next Pod to take the lock",
        timeout=120,
    )
    acquired = stamped(init_log(example, successor), "acquired the lock")
    # From the SIGTERM (the command then stops, kubelock releases) to the next
    # Pod holding the lock. (Not from the "released" line: that is logged once the
    # release's response is back, and the next holder may log its acquisition first.)
    handover = (acquired - signalled).total_seconds()
    say(f"{holder} got SIGTERM at {signalled:%H:%M:%S.%f}; {successor} acquired the lock "
        f"{handover:.3f} s later")  # fmt: skip
    assert 0 < handover < 1.0, (signalled, acquired)
    assert f"warning: the run by {holder} did not finish" in init_log(example, successor)
    rollout(example, say, "after the deletion")


def _all_pods(cluster: E2ECluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.json(
        "get", "pods", "-n", NAMESPACE, "-l", "app=example-app"
    )["items"]
    return items


def _migrating(cluster: E2ECluster, besides: Collection[str] = ()) -> str | None:
    """The Pod whose init container runs the migrations now, if any."""
    for pod in pods(cluster):
        name: str = pod["metadata"]["name"]
        if name in besides:
            continue
        log = subprocess.run(
            [*cluster.kubectl_argv, "logs", name, "-c", "migrate", "-n", NAMESPACE],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if "holds the lock, migrating" in log and "released the lock" not in log:
            return name
    return None
