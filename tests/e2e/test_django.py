"""examples/django on a real cluster (E2E_CLUSTER: local, kind or minikube).

The images are built (`scripts/image --django`: the app, and postgres:15 or
its stand-in), loaded, and the example applied: PostgreSQL, then three
replicas of the Django app rolled out together, each init container running
`kubelock --name migrations --once $(APP_VERSION) -- python manage.py migrate`.
Checked as a user would see it: the schema was migrated once (one Pod applied
the migrations, the slow data migration's row is there once), every Pod is
Ready and serves /healthz from the database. Then a rolling update to a new
APP_VERSION, whose image adds a migration, applies that migration once. And
the control: the same three replicas without kubelock, let go together on a
fresh database, where at least one migrate fails.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kubelock.locks.once import DONE_ANNOTATION

from .clusters import E2ECluster, Say, command, wait_for
from .conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

EXAMPLE = REPO / "examples" / "django"
NAMESPACE = "kubelock-django"
APP_IMAGE = "kubelock-django-example:dev"  # as deployment.yaml names it
POSTGRES_IMAGE = "postgres:15"  # as postgres.yaml names it
REPLICAS = 3
DATA_MIGRATION = "shop.0003_record_run"
NEW_MIGRATION = "shop.0004_customer_note"
# What racing migrates fail with: a table created twice, a type or row inserted
# twice, or a column one run looks for while another is still altering the table.
COLLISION = re.compile(
    r"already exists"
    r"|duplicate key value violates unique constraint"
    r'|column "[^"]+" of relation "[^"]+" does not exist'
)

# The next version of the app: one more migration, a schema change and a data step.
MIGRATION_0004 = """
import socket

from django.db import migrations, models
from django.utils import timezone


def record_run(apps, schema_editor):
    apps.get_model("shop", "MigrationRun").objects.create(
        migration="shop.0004_customer_note", host=socket.gethostname(), ran_at=timezone.now()
    )


class Migration(migrations.Migration):
    dependencies = [("shop", "0003_record_run")]
    operations = [
        migrations.AddField("customer", "note", models.TextField(blank=True, default="")),
        migrations.RunPython(record_run, migrations.RunPython.noop),
    ]
"""


@pytest.fixture(scope="module")
def django_images(cluster: E2ECluster, say: Say) -> dict[str, str]:
    """The example's images, built (kubelock's is cached by then) and loaded into the cluster."""
    built = command(str(REPO / "scripts" / "image"), "--django", timeout=3600).split()
    postgres = next(image for image in built if "postgres" in image)
    assert APP_IMAGE in built, built
    for image in (APP_IMAGE, postgres):
        cluster.load(image)
    say(f"examples/django's images: {APP_IMAGE}, {postgres}")
    return {"app": APP_IMAGE, "postgres": postgres}


@pytest.fixture(scope="module")
def example(cluster: E2ECluster, say: Say, django_images: dict[str, str]) -> E2ECluster:
    """examples/django applied and rolled out."""
    objects = rendered(cluster, django_images["postgres"])
    web = [
        obj for obj in objects if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "web"
    ]
    rest = [obj for obj in objects if obj not in web]
    apply(cluster, rest)
    rollout(cluster, say, "deployment/postgres", "PostgreSQL")
    # The local cluster gives its Pods no name service: the app finds the
    # database by the Service's address instead of its name.
    address = cluster.json("get", "service", "postgres", "-n", NAMESPACE)["spec"]["clusterIP"]
    cluster.kubectl(
        "patch", "configmap", "database", "-n", NAMESPACE,
        "--patch", json.dumps({"data": {"PGHOST": address}}),
    )  # fmt: skip
    apply(cluster, web)
    rollout(cluster, say, "deployment/web", "the app's first rollout, 3 replicas together")
    return cluster


def rendered(cluster: E2ECluster, postgres_image: str) -> list[dict[str, Any]]:
    """The example as `kubectl apply -k` applies it, with the PostgreSQL image at hand."""
    manifests = cluster.kubectl("kustomize", str(EXAMPLE))
    printed = cluster.kubectl(
        "create", "--dry-run=client", "-o", "json", "-f", "-", input=manifests
    )
    objects = json_objects(printed)
    for obj in objects:
        pod_spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod_spec.get("containers", []):
            if container["image"] == POSTGRES_IMAGE:
                container["image"] = postgres_image
    return objects


def apply(cluster: E2ECluster, objects: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )


def rollout(cluster: E2ECluster, say: Say, deployment: str, what: str) -> None:
    started = datetime.now()
    cluster.kubectl("rollout", "status", deployment, "-n", NAMESPACE, "--timeout=600s")
    say(f"{what}: complete in {(datetime.now() - started).total_seconds():.1f} s")


def pods(cluster: E2ECluster, app: str = "web") -> list[dict[str, Any]]:
    listed = cluster.json("get", "pods", "-n", NAMESPACE, "-l", f"app={app}")
    return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def init_log(cluster: E2ECluster, pod: str) -> str:
    return cluster.kubectl("logs", pod, "-c", "migrate", "-n", NAMESPACE)


def migration_runs(cluster: E2ECluster) -> list[str]:
    """What the data migrations recorded, one line per run (`manage.py showruns`)."""
    out = cluster.kubectl(
        "exec", "deploy/web", "-n", NAMESPACE, "-c", "web", "--", "python", "manage.py", "showruns"
    )
    return [json.loads(line)["migration"] for line in out.splitlines() if line.strip()]


def psql(cluster: E2ECluster, sql: str, database: str = "app") -> str:
    return cluster.kubectl(
        "exec", "deploy/postgres", "-n", NAMESPACE, "--",
        "psql", "-U", "app", "-d", database, "-tAc", sql,
    ).strip()  # fmt: skip


def healthz(cluster: E2ECluster, pod: str) -> dict[str, Any]:
    """The Pod's own /healthz, asked from inside it."""
    script = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=10).read().decode())"
    )
    out = cluster.kubectl("exec", pod, "-n", NAMESPACE, "-c", "web", "--", "python", "-c", script)
    answer: dict[str, Any] = json.loads(out)
    return answer


def assert_migrated_once(cluster: E2ECluster, names: list[str], migration: str, key: str) -> None:
    """One of `names` applied `migration`; the others found `key` done and ran nothing."""
    logs = {name: init_log(cluster, name) for name in names}
    applied = [name for name, log in logs.items() if f"Applying {migration}... OK" in log]
    assert len(applied) == 1, logs
    for name in names:
        if name in applied:
            continue
        assert f"'{key}' is done by '{applied[0]}'" in logs[name], logs[name]
        assert "Operations to perform:" not in logs[name], logs[name]
    assert not psql(
        cluster, "SELECT app, name FROM django_migrations GROUP BY app, name HAVING count(*) > 1"
    )


def test_three_replicas_migrate_the_schema_once_and_serve_from_the_database(
    example: E2ECluster, say: Say
) -> None:
    running = pods(example)
    names = [pod["metadata"]["name"] for pod in running]
    assert len(running) == REPLICAS
    assert all(ready(pod) for pod in running), [pod["status"] for pod in running]

    assert_migrated_once(example, names, "shop.0001_initial", "1")
    assert migration_runs(example) == [DATA_MIGRATION]
    # They started together: the others found the lock taken and waited for it.
    waited = [name for name in names if "waiting for the lock, held by" in init_log(example, name)]
    assert waited, names
    say(f"{len(waited)} of {REPLICAS} Pods waited for the lock, then found version 1 done")

    for name in names:
        answer = healthz(example, name)
        assert answer["status"] == "ok", answer
        assert answer["host"] == name
        # Read from the database: the row the data migration wrote, once.
        assert [run["migration"] for run in answer["migration_runs"]] == [DATA_MIGRATION]

    lease = example.json("get", "lease", "migrations", "-n", NAMESPACE)
    assert lease["spec"].get("holderIdentity", "") == ""
    assert '"1"' in lease["metadata"]["annotations"][DONE_ANNOTATION]


def test_a_rolling_update_to_a_new_version_applies_its_migration_once(
    example: E2ECluster, say: Say, tmp_path: Path
) -> None:
    new_image = APP_IMAGE.replace(":dev", ":e2e-2")
    (tmp_path / "0004_customer_note.py").write_text(MIGRATION_0004)
    (tmp_path / "Dockerfile").write_text(
        f"FROM {APP_IMAGE}\nCOPY 0004_customer_note.py /app/shop/migrations/\n"
    )
    command("docker", "build", "-t", new_image, str(tmp_path), timeout=600)
    example.load(new_image)
    before = {pod["metadata"]["name"] for pod in pods(example)}

    version = {"name": "APP_VERSION", "value": "2"}
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [{"name": "migrate", "image": new_image, "env": [version]}],
                    "containers": [{"name": "web", "image": new_image, "env": [version]}],
                }
            }
        }
    }
    example.kubectl("patch", "deployment", "web", "-n", NAMESPACE, "--patch", json.dumps(patch))
    rollout(example, say, "deployment/web", f"rolling update to {new_image}, APP_VERSION=2")

    running = pods(example)
    new = [pod["metadata"]["name"] for pod in running if pod["metadata"]["name"] not in before]
    assert len(running) == REPLICAS
    assert len(new) == REPLICAS
    assert all(ready(pod) for pod in running)
    assert_migrated_once(example, new, NEW_MIGRATION, "2")
    assert migration_runs(example) == [DATA_MIGRATION, NEW_MIGRATION]
    note_columns = psql(
        example,
        "SELECT count(*) FROM information_schema.columns"
        " WHERE table_name = 'shop_customer' AND column_name = 'note'",
    )
    assert note_columns == "1"
    for name in new:
        assert healthz(example, name)["status"] == "ok"


def test_without_kubelock_replicas_rolled_out_together_fail_to_migrate(
    example: E2ECluster, say: Say
) -> None:
    """The control: the same Deployment with a plain migrate, on a fresh database."""
    web = example.json("get", "deployment", "web", "-n", NAMESPACE)
    unlocked: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web-unlocked", "namespace": NAMESPACE},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": "web-unlocked"}},
            "template": web["spec"]["template"],
        },
    }
    template = unlocked["spec"]["template"]
    template["metadata"] = {"labels": {"app": "web-unlocked"}}
    fresh = {"name": "PGDATABASE", "value": "control"}
    migrate = template["spec"]["initContainers"][0]
    # manage.py migrate once Django is loaded and the database exists: the test
    # creates it when all three wait, so the three runs start together.
    migrate["command"] = ["python", "-c", GATED_MIGRATE]
    migrate.pop("args", None)
    # A failed run's output in its status: a restarted init container's own log
    # may be gone (the kubelet keeps one previous run) before the test reads it.
    migrate["terminationMessagePolicy"] = "FallbackToLogsOnError"
    migrate["env"] = [fresh]
    template["spec"]["containers"][0]["env"] = [fresh]
    apply(example, [unlocked])

    def all_waiting() -> bool:
        found = pods(example, "web-unlocked")
        return len(found) == REPLICAS and all(
            "running" in first_init_status(pod).get("state", {}) for pod in found
        )

    wait_for(all_waiting, what="the three unlocked Pods to wait for their database", timeout=300)
    psql(example, "CREATE DATABASE control", database="app")

    def first_runs_ended() -> list[dict[str, Any]] | None:
        found = pods(example, "web-unlocked")
        ended = [first_run_end(first_init_status(pod)) for pod in found]
        return found if len(found) == REPLICAS and all(ended) else None

    ended = wait_for(first_runs_ended, what="the three plain migrates to end", timeout=300)
    failed = {
        pod["metadata"]["name"]: first_init_status(pod)
        for pod in ended
        if (first_run_end(first_init_status(pod)) or {}).get("exitCode") != 0
    }
    say(f"without kubelock: {len(failed)} of {REPLICAS} migrates failed")
    assert failed, [first_init_status(pod) for pod in ended]
    for status in failed.values():
        # The end of the run's output (the kubelet keeps its last lines with the status).
        output = (first_run_end(status) or {}).get("message", "")
        assert COLLISION.search(output), status
    example.kubectl("delete", "deployment", "web-unlocked", "-n", NAMESPACE)


GATED_MIGRATE = """
import os
import time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
import django
from django.core.management import execute_from_command_line
from django.db import OperationalError, connection

django.setup()
while True:
    try:
        connection.ensure_connection()
        break
    except OperationalError:
        time.sleep(0.1)
connection.close()
execute_from_command_line(["manage.py", "migrate", "--noinput"])
"""


def first_init_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses: list[dict[str, Any]] = pod["status"].get("initContainerStatuses") or [{}]
    return statuses[0]


def first_run_end(status: dict[str, Any]) -> dict[str, Any] | None:
    """How the init container's first run ended: its last state once it restarted."""
    if status.get("restartCount", 0) > 0:
        ended: dict[str, Any] | None = status.get("lastState", {}).get("terminated")
        return ended
    ended = status.get("state", {}).get("terminated")
    return ended


def json_objects(printed: str) -> list[dict[str, Any]]:
    """The objects `kubectl ... -o json` prints one after the other for a multi-object input."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(printed.rstrip()):
        obj, at = decoder.raw_decode(printed, at)
        objects.append(obj)
        at = len(printed) - len(printed[at:].lstrip())
    return objects
