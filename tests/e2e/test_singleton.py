"""The singleton example on a real cluster (E2E_CLUSTER: local, kind or minikube).

examples/singleton runs a worker under kubelock with `--metrics-address :9100`
and a liveness probe on `/healthz`. Checked: the holder's and the standby's
/metrics and /healthz answer on their Pod IPs, from inside the cluster (and,
on the local cluster, from the host, which routes to the Pod network); and
with the API server stopped for longer than the renew deadline, kubelock stops
the worker and exits 75, the kubelet restarts the container, and once the API
server is back the new container holds the lock again. Also: kubelock's
container runs with the projected ServiceAccount token the kubelet requested
for its Pod (bound to the Pod, checked by a TokenReview), and no other.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kubelock.kube.auth import SERVICEACCOUNT_DIR

from .clusters import E2ECluster, Say, wait_for
from .conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

EXAMPLE = REPO / "examples" / "singleton"
NAMESPACE = "kubelock-singleton"
SERVICE_ACCOUNT = f"system:serviceaccount:{NAMESPACE}:kubelock"
DEPLOYMENT = "deployment/scheduler"
METRICS_PORT = 9100
RENEW_DEADLINE = 10.0  # kubelock's default, which the example keeps
OUTAGE = RENEW_DEADLINE + 15.0
"""Long enough for kubelock to give up renewing and for the kubelet to restart it."""

FETCH = """
import json, sys, urllib.error, urllib.request
found = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            found[url] = [answer.status, answer.read().decode()]
    except urllib.error.HTTPError as error:
        found[url] = [error.code, error.read().decode()]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def singleton(cluster: E2ECluster, say: Say) -> E2ECluster:
    started = time.monotonic()
    cluster.kubectl("apply", "-k", str(EXAMPLE))
    cluster.kubectl("rollout", "status", DEPLOYMENT, "-n", NAMESPACE, "--timeout=600s")
    say(f"singleton rolled out in {time.monotonic() - started:.1f} s")
    return cluster


def pods(cluster: E2ECluster) -> list[dict[str, Any]]:
    listed = cluster.json("get", "pods", "-n", NAMESPACE, "-l", "app=scheduler")
    return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]


def lease_holder(cluster: E2ECluster) -> str:
    """The lock's holder; "" before the first kubelock has created the Lease."""
    found = subprocess.run(
        [*cluster.kubectl_argv, "get", "lease", "scheduler", "-n", NAMESPACE, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0 and "NotFound" in found.stderr:
        return ""
    assert found.returncode == 0, found.stderr
    holder: str = json.loads(found.stdout)["spec"].get("holderIdentity") or ""
    return holder


def gauge(metrics: str, name: str) -> float:
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.MULTILINE)
    assert match, f"no {name} in:\n{metrics}"
    return float(match[1])


def test_healthz_and_metrics_answer_on_the_pod_ips(singleton: E2ECluster, say: Say) -> None:
    running = wait_for(
        lambda: (found := pods(singleton)) and len(found) == 2 and found,
        what="two scheduler Pods",
    )
    names = {pod["metadata"]["name"] for pod in running}
    holder = wait_for(
        lambda: lease_holder(singleton) in names and lease_holder(singleton), what="a holder"
    )
    by_name = {pod["metadata"]["name"]: pod for pod in running}
    (standby,) = names - {holder}
    urls = {
        (name, path): f"http://{by_name[name]['status']['podIP']}:{METRICS_PORT}{path}"
        for name in (holder, standby)
        for path in ("/healthz", "/metrics")
    }
    # Scraped from inside the cluster: the standby's container fetches both Pods' endpoints.
    fetched = json.loads(
        singleton.kubectl(
            "exec", standby, "-n", NAMESPACE, "--", "python3", "-c", FETCH, *urls.values()
        )
    )
    answers = {key: fetched[url] for key, url in urls.items()}
    for key, (status, _) in answers.items():
        assert status == 200, (key, answers[key])
    assert gauge(answers[holder, "/metrics"][1], "kubelock_lock_held") == 1
    assert gauge(answers[holder, "/metrics"][1], "kubelock_waiting") == 0
    assert gauge(answers[standby, "/metrics"][1], "kubelock_lock_held") == 0
    assert gauge(answers[standby, "/metrics"][1], "kubelock_waiting") == 1
    say(f"{holder} holds, {standby} waits: both serve /healthz 200 and /metrics on their Pod IPs")

    if singleton.local is not None:  # the host routes to the Pod network of the local cluster
        scraped = httpx.get(urls[holder, "/metrics"], timeout=5, trust_env=False)
        assert scraped.status_code == 200
        assert gauge(scraped.text, "kubelock_lock_held") == 1


def test_kubelock_runs_with_the_projected_token_bound_to_its_pod(singleton: E2ECluster) -> None:
    (pod, *_) = wait_for(lambda: pods(singleton), what="a scheduler Pod")
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    # No token by default; the one container, kubelock's, mounts the projected
    # token where in-cluster auth reads it. No Secret holds a token.
    assert spec["automountServiceAccountToken"] is False
    assert not [volume for volume in spec["volumes"] if "secret" in volume], spec["volumes"]
    (container,) = spec["containers"]
    projected = {
        volume["name"]
        for volume in spec["volumes"]
        for source in volume.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    }
    mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in projected]
    assert mounts == [SERVICEACCOUNT_DIR], container["volumeMounts"]
    secrets = singleton.json("get", "secrets", "-n", NAMESPACE)["items"]
    assert [s for s in secrets if s["type"] == "kubernetes.io/service-account-token"] == []

    # The token in the Pod is bound to it: only the kubelet's TokenRequest makes such.
    token = singleton.kubectl(
        "exec", name, "-n", NAMESPACE, "--", "cat", f"{SERVICEACCOUNT_DIR}/token"
    ).strip()
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == SERVICE_ACCOUNT
    assert claims["kubernetes.io"]["pod"]["name"] == name
    review = json.loads(
        singleton.kubectl(
            "create", "-o", "json", "-f", "-",
            input=json.dumps(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                 "spec": {"token": token}}
            ),
        )
    )  # fmt: skip
    assert review["status"]["authenticated"] is True
    assert review["status"]["user"]["username"] == SERVICE_ACCOUNT
    assert review["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [name]
    # With that credential and no other, this Pod's kubelock contends for the lock.
    wait_for(
        lambda: any(
            words in singleton.kubectl("logs", name, "-n", NAMESPACE)
            for words in ("acquired the lock", "waiting for the lock")
        ),
        what=f"{name}'s kubelock to take the lock or wait for it",
    )


def test_an_api_server_outage_past_the_renew_deadline_exits_75_and_the_restart_retakes(
    singleton: E2ECluster, say: Say
) -> None:
    singleton.kubectl("scale", DEPLOYMENT, "-n", NAMESPACE, "--replicas=1")
    (pod,) = wait_for(
        lambda: (found := pods(singleton)) and len(found) == 1 and found, what="one Pod"
    )
    name = pod["metadata"]["name"]
    wait_for(lambda: lease_holder(singleton) == name, what=f"{name} to hold the lock")
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]

    singleton.stop_apiserver()
    stopped = time.monotonic()
    try:
        time.sleep(OUTAGE)
    finally:
        singleton.start_apiserver()
        back = datetime.now(UTC)
    say(f"API server stopped for {time.monotonic() - stopped:.1f} s")

    def restarted() -> dict[str, Any] | None:
        status = singleton.json("get", "pod", name, "-n", NAMESPACE)["status"]
        container: dict[str, Any] = status["containerStatuses"][0]
        done = container["restartCount"] > restarts and "running" in container["state"]
        return container if done else None

    container = wait_for(restarted, what=f"{name}'s container to be restarted", timeout=180)
    assert container["lastState"]["terminated"]["exitCode"] == 75, container
    previous = singleton.kubectl("logs", name, "-n", NAMESPACE, "--previous")
    assert "lost the lock" in previous, previous
    assert "exiting 75" in previous, previous

    log = wait_for(
        lambda: (
            (text := singleton.kubectl("logs", name, "-n", NAMESPACE))
            and "acquired the lock" in text
            and text
        ),
        what="the restarted container to take the lock",
        timeout=120,
    )
    assert lease_holder(singleton) == name
    acquired = next(
        datetime.fromisoformat(line.split()[1])
        for line in log.splitlines()
        if line.startswith("kubelock: ") and "acquired the lock" in line
    )
    started = datetime.fromisoformat(container["state"]["running"]["startedAt"])
    say(
        f"{name} exited 75 and was restarted ({container['restartCount'] - restarts} "
        f"restart(s)) {(started - back).total_seconds():.1f} s after the API server was back; "
        f"the new container took the lock {(acquired - started).total_seconds():.1f} s after "
        "it started"
    )
    for line in log.splitlines():  # what it did meanwhile: the figures above depend on it
        if line.startswith("kubelock: "):
            say(f"  {line}")
