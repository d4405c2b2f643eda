"""What users apply: the kustomizations, the RBAC they grant, and the init-container example.

Against the real kube-apiserver:

- every kustomization under deploy/ and examples/ renders with `kubectl
  kustomize` and passes a server-side dry run (components through an overlay
  on the base, as users use them);
- the base Role is minimal. "Minimal" means: with it, kubelock runs the whole
  life of a lock cleanly (the first run creates the Lease, a later holder
  takes it over, a waiter waits for it, each one releases it); without `get`,
  `create` or `patch`, some step of that life fails with kubelock's RBAC
  message naming the verb. `watch` is optional: without it the same life
  still succeeds, because a waiter whose watch is refused polls every
  --retry-period instead; it is in the base because with it a release wakes
  the waiters within milliseconds instead of up to ~2 retry periods (see
  benchmarks/ for hand-off latency, not an assert here). `patch` may be
  replaced by `update` (a Role written for the Go kubelock): the lock still
  lives its life, written by PUT, and waiters wait outside the queue;
- every example's workloads are admitted, without a warning, in a namespace
  enforcing Pod Security "restricted" (as the examples' own namespaces do), and
  only the container that runs kubelock mounts the ServiceAccount token that
  may write the lock: the app containers cannot take the lock or forge a done
  KEY;
- the init-container example's story: three "Pods" (processes with a Pod's
  in-cluster environment, running the init container's own command) migrate
  one at a time, and only the first finds anything to do.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import secrets
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubelock.kube.auth import SERVICEACCOUNT_DIR
from kubelock.testing import ControlPlane

from .kubelock_proc import (
    clean_environment,
    hold_until,
    kubelock_argv,
    lease,
    run,
    spawn,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kustomize" / "base"
COMPONENTS = REPO / "deploy" / "kustomize" / "components"
EXAMPLE = REPO / "examples" / "init-container"
EXAMPLES = sorted(path.parent for path in (REPO / "examples").glob("*/kustomization.yaml"))

LOCK_NAME = "example-app"  # kubelock's default --name, and the base Role's resourceNames
VERBS = ("get", "create", "patch", "watch")
# Short, valid timings so that waiting out a lease (no `update`: no release) takes seconds.
QUICK = ["--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "500ms"]
RBAC_MESSAGE = "cannot {verb} {resource}"
RBAC_REFUSAL = re.compile(r"cannot (\w+) (leases|endpoints|configmaps)\b")
# kubelock --verbose logs each API call; a refused watch reads like "API watch: 403 in 3ms".
WATCH_REFUSED = re.compile(r"\bwatch\b.*\b403\b")
QUEUE_JOINED = re.compile(r"\bpatch\b.*\b200\b")


MONITORING = REPO / "deploy" / "monitoring"


def kustomization_dirs() -> list[Path]:
    """Every folder with a kustomization.yaml in deploy/ and examples/, but deploy/monitoring:
    its objects need the Prometheus Operator's CRDs (tests/integration/test_monitoring.py)."""
    found = sorted(
        path.parent
        for root in (REPO / "deploy", REPO / "examples")
        for path in root.rglob("kustomization.yaml")
        if path.parent != MONITORING
    )
    return found


def is_component(folder: Path) -> bool:
    return (
        re.search(r"^kind:\s*Component\s*$", (folder / "kustomization.yaml").read_text(), re.M)
        is not None
    )


def overlay(
    folder: Path,
    *,
    resources: Sequence[Path] = (BASE,),
    components: Sequence[Path] = (),
    namespace: str | None = None,
) -> Path:
    """Write a kustomization in `folder` that uses the given ones, as a user's own would."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization"]
    if namespace is not None:
        lines.append(f"namespace: {namespace}")
    lines.append("resources:")
    lines += [f"  - {os.path.relpath(path, folder)}" for path in resources]
    if components:
        lines.append("components:")
        lines += [f"  - {os.path.relpath(path, folder)}" for path in components]
    (folder / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return folder


def render(control_plane: ControlPlane, folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """`kubectl kustomize folder`: the YAML, and the same objects as JSON."""
    rendered = control_plane.kubectl("kustomize", str(folder)).stdout
    as_json = control_plane.kubectl(
        "create", "--dry-run=client", "-o", "json", "-f", "-", input=rendered
    ).stdout
    # One JSON document per object, one after the other.
    decoder, position = json.JSONDecoder(), 0
    objects: list[dict[str, Any]] = []
    while as_json[position:].strip():
        found, end = decoder.raw_decode(as_json, position)
        objects.extend(found["items"] if found.get("kind") == "List" else [found])
        position = end
        while position < len(as_json) and as_json[position].isspace():
            position += 1
    return rendered, objects


def ensure_namespaces(admin: httpx.Client, objects: Sequence[dict[str, Any]]) -> None:
    """Create (for real) the namespaces the objects live in, so a dry run can place them."""
    for name in sorted(
        {o["metadata"]["namespace"] for o in objects if "namespace" in o["metadata"]}
    ):
        created = admin.post("/api/v1/namespaces", json={"metadata": {"name": name}})
        assert created.status_code in (201, 409), created.text


def the_one(objects: Sequence[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def allowed(
    admin: httpx.Client, namespace: str, user: str, verb: str, group: str, resource: str, name: str
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                # RBAC cannot narrow `create` by name: ask as the API server asks.
                "name": "" if verb == "create" else name,
            },
        },
    }
    answer = admin.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    assert answer.status_code == 201, answer.text
    return bool(answer.json()["status"].get("allowed"))


# -- every kustomization renders and the API server accepts it ------------------


def test_the_kustomizations_are_all_found() -> None:
    """The parametrized test below covers what this list names: a moved file fails here."""
    names = {str(path.relative_to(REPO)) for path in kustomization_dirs()}
    assert {
        "deploy/kustomize/base",
        "deploy/kustomize/components/configmaps",
        "deploy/kustomize/components/endpoints",
        "examples/django",
        "examples/init-container",
        "examples/singleton",
    } <= names


@pytest.mark.parametrize(
    "folder", kustomization_dirs(), ids=lambda path: str(path.relative_to(REPO))
)
def test_each_kustomization_renders_and_passes_a_server_side_dry_run(
    control_plane: ControlPlane, admin: httpx.Client, tmp_path: Path, folder: Path
) -> None:
    component = is_component(folder)
    target = overlay(tmp_path / "overlay", components=[folder]) if component else folder
    rendered, objects = render(control_plane, target)
    assert objects, f"{folder} renders nothing"
    ensure_namespaces(admin, objects)

    applied = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert applied.stdout.count("(server dry run)") == len(objects), applied.stdout

    if component:
        role = the_one(objects, "Role", "kubelock")
        assert {resource for rule in role["rules"] for resource in rule["resources"]} == {
            folder.name
        }


# -- the base Role is exactly what kubelock needs ----------------------------------


def apply_base_rbac(
    control_plane: ControlPlane,
    admin: httpx.Client,
    tmp_path: Path,
    namespace: str,
    *,
    lock_type: str = "leases",
    without: str | None = None,
    instead: str | None = None,
) -> None:
    """Apply the base (with the lock type's component) into `namespace`, minus one verb
    (and with `instead` granted where it was).

    Returns once RBAC's cache answers as the Role says.
    """
    components = [] if lock_type == "leases" else [COMPONENTS / lock_type]
    _, objects = render(
        control_plane,
        overlay(tmp_path / "rbac", components=components, namespace=namespace),
    )
    role = the_one(objects, "Role", "kubelock")
    verbs_granted = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs_granted == set(VERBS), f"the base Role grants {sorted(verbs_granted)}"
    group = role["rules"][0]["apiGroups"][0]
    if without is not None:
        for rule in role["rules"]:
            if instead is not None and without in rule["verbs"]:
                rule["verbs"].append(instead)
            rule["verbs"] = [verb for verb in rule["verbs"] if verb != without]
        role["rules"] = [rule for rule in role["rules"] if rule["verbs"]]
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )

    user = f"system:serviceaccount:{namespace}:kubelock"

    def rbac_follows_the_role() -> bool:
        return all(
            allowed(admin, namespace, user, verb, group, lock_type, LOCK_NAME) is (verb != without)
            for verb in VERBS
        ) and (
            instead is None or allowed(admin, namespace, user, instead, group, lock_type, LOCK_NAME)
        )

    wait_for(rbac_follows_the_role, what=f"RBAC to answer as the Role without {without} says")
    # ...and nothing beyond the lock itself.
    assert not allowed(admin, namespace, user, "get", group, lock_type, "another-lock")
    assert not allowed(admin, namespace, user, "list", group, lock_type, "")
    assert not allowed(admin, namespace, user, "delete", group, lock_type, LOCK_NAME)


def life_of_a_lock(
    env: dict[str, str], lock_type: str, admin: httpx.Client, namespace: str, workdir: Path
) -> dict[str, subprocess.CompletedProcess[str]]:
    """The three steps every lock goes through, as three Pods would run them.

    `first` creates the lock and releases it; `holder` takes the existing lock
    over; `waiter` starts while `holder` holds it, so it has to wait (with a
    watch where allowed) until `holder` releases it: `holder` holds until the
    waiter says it waits (or has ended), however slowly the machine starts it.
    """
    options = ["--lock-type", lock_type, *QUICK, "--verbose"]
    results = {"first": run([*options, "--id", "first", "--", "true"], env=env, timeout=60)}

    go = workdir / "go"
    holder = spawn(
        [*options, "--id", "holder", "--", *hold_until(go)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    waiter_log = workdir / "waiter.stderr"
    waiter: subprocess.Popen[str] | None = None

    def holder_holds_or_ended() -> bool:
        if holder.poll() is not None:
            return True
        return holder_identity(admin, namespace, lock_type) == "holder"

    try:
        wait_for(holder_holds_or_ended, what="`holder` to hold the lock or give up")
        with waiter_log.open("w") as stderr_file:
            waiter = spawn(
                [*options, "--id", "waiter", "--", "true"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
            )

        def waiter_waits_or_ended() -> bool:
            assert waiter is not None
            return waiter.poll() is not None or "held by 'holder'" in waiter_log.read_text()

        wait_for(waiter_waits_or_ended, what="`waiter` to wait for `holder` or give up")
        go.touch()
        waiter_stdout, _ = waiter.communicate(timeout=60)
        results["waiter"] = subprocess.CompletedProcess(
            waiter.args, waiter.returncode, waiter_stdout, waiter_log.read_text()
        )
        stdout, stderr = holder.communicate(timeout=60)
    finally:
        go.touch()
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    results["holder"] = subprocess.CompletedProcess(holder.args, holder.returncode, stdout, stderr)
    return results


def holder_identity(admin: httpx.Client, namespace: str, lock_type: str) -> str | None:
    if lock_type == "leases":
        found = lease(admin, namespace, LOCK_NAME)
        return None if found is None else found["spec"].get("holderIdentity")
    answer = admin.get(f"/api/v1/namespaces/{namespace}/{lock_type}/{LOCK_NAME}")
    if answer.status_code == 404:
        return None
    record = (
        answer.json()["metadata"]
        .get("annotations", {})
        .get("control-plane.alpha.kubernetes.io/leader")
    )
    return None if record is None else json.loads(record).get("holderIdentity")


def show(results: dict[str, subprocess.CompletedProcess[str]]) -> str:
    return "\n".join(
        f"--- {name}: exit {result.returncode}\n{result.stderr}" for name, result in results.items()
    )


def assert_clean(
    results: dict[str, subprocess.CompletedProcess[str]],
    refused_verbs: frozenset[str] = frozenset(),
) -> None:
    """Every step succeeded, released the lock, and the waiter really waited.

    No verb was refused but those in ``refused_verbs`` (which a test takes away).
    """
    for result in results.values():
        assert result.returncode == 0, show(results)
        assert "could not release" not in result.stderr, show(results)
        refused = {match.group(1) for match in RBAC_REFUSAL.finditer(result.stderr)}
        assert refused <= refused_verbs, show(results)
    assert "held by 'holder'" in results["waiter"].stderr, show(results)


@pytest.mark.parametrize("lock_type", ["leases", "endpoints", "configmaps"])
def test_with_the_shipped_role_a_lock_lives_its_whole_life_cleanly(
    control_plane: ControlPlane,
    admin: httpx.Client,
    namespace: str,
    tmp_path: Path,
    lock_type: str,
) -> None:
    apply_base_rbac(control_plane, admin, tmp_path, namespace, lock_type=lock_type)
    env = control_plane.in_cluster_environment(namespace, "kubelock", tmp_path / "serviceaccount")

    results = life_of_a_lock(env, lock_type, admin, namespace, tmp_path)

    assert_clean(results)
    assert not WATCH_REFUSED.search(results["waiter"].stderr), show(results)
    # The waiter joined the queue (its one merge patch) rather than waiting outside it.
    assert QUEUE_JOINED.search(results["waiter"].stderr), show(results)


@pytest.mark.parametrize("verb", ["get", "create", "patch"])
def test_without_any_one_required_verb_kubelock_fails_with_its_rbac_message(
    control_plane: ControlPlane,
    admin: httpx.Client,
    namespace: str,
    tmp_path: Path,
    verb: str,
) -> None:
    apply_base_rbac(control_plane, admin, tmp_path, namespace, without=verb)
    env = control_plane.in_cluster_environment(namespace, "kubelock", tmp_path / "serviceaccount")

    results = life_of_a_lock(env, "leases", admin, namespace, tmp_path)

    message = RBAC_MESSAGE.format(verb=verb, resource="leases")
    refused = [r for r in results.values() if r.returncode != 0 and message in r.stderr]
    assert refused, f"no run failed with {message!r}:\n{show(results)}"
    # The very first run needs every verb: get and create to take the lock, patch to
    # give it back. A refused release is a failed run, not a warning beside exit 0.
    assert results["first"] in refused, show(results)
    for result in refused:
        # One line for people, naming the verb to grant, not a traceback.
        assert "Traceback" not in result.stderr, show(results)


def test_without_watch_waiters_poll_and_the_lock_still_lives_its_whole_life(
    control_plane: ControlPlane, admin: httpx.Client, namespace: str, tmp_path: Path
) -> None:
    apply_base_rbac(control_plane, admin, tmp_path, namespace, without="watch")
    env = control_plane.in_cluster_environment(namespace, "kubelock", tmp_path / "serviceaccount")

    results = life_of_a_lock(env, "leases", admin, namespace, tmp_path)

    assert_clean(results, refused_verbs=frozenset({"watch"}))
    # The waiter did try to watch, was refused, said it polls instead, and got the lock.
    assert WATCH_REFUSED.search(results["waiter"].stderr), show(results)
    assert re.search(r"cannot watch leases .* polling every", results["waiter"].stderr)


def test_with_update_instead_of_patch_the_lock_lives_and_waiters_wait_outside_the_queue(
    control_plane: ControlPlane, admin: httpx.Client, namespace: str, tmp_path: Path
) -> None:
    # A Role written for the Go kubelock: update, not patch.
    apply_base_rbac(control_plane, admin, tmp_path, namespace, without="patch", instead="update")
    env = control_plane.in_cluster_environment(namespace, "kubelock", tmp_path / "serviceaccount")

    results = life_of_a_lock(env, "leases", admin, namespace, tmp_path)

    assert_clean(results, refused_verbs=frozenset({"patch"}))
    # The waiter tried to join the queue, was refused, said so, and got the lock.
    assert re.search(r"cannot patch leases .* waiting outside the queue", results["waiter"].stderr)
    # The record was written by PUT (update) after the refused patch.
    assert re.search(r"API update: 200", results["first"].stderr), show(results)


# -- the examples' Pods: Pod Security "restricted", the lock's token only for kubelock --


def pod_templates(objects: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Pod template of every workload among `objects`, by `Kind/name`."""
    templates = {}
    for found in objects:
        spec = found.get("spec", {})
        template = spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get(
            "template"
        )
        if found["kind"] != "PodTemplate" and template is not None:
            templates[f"{found['kind']}/{found['metadata']['name']}"] = template
    return templates


def runs_kubelock(container: dict[str, Any]) -> bool:
    return [*container.get("command", []), *container.get("args", [])][:1] == ["kubelock"]


def lock_name(container: dict[str, Any]) -> str:
    argv = [*container.get("command", []), *container.get("args", [])]
    return argv[argv.index("--name") + 1] if "--name" in argv else LOCK_NAME


def projects_a_token(volume: dict[str, Any]) -> bool:
    sources = volume.get("projected", {}).get("sources", [])
    return any("serviceAccountToken" in source for source in sources)


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A Pod spec's init containers and containers."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def dry_run_pod(admin: httpx.Client, namespace: str, spec: dict[str, Any]) -> httpx.Response:
    """Ask the API server to admit a Pod with `spec`, without creating it."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "admitted"}, "spec": spec}
    return admin.post(f"/api/v1/namespaces/{namespace}/pods", params={"dryRun": "All"}, json=pod)


def assert_only_kubelock_mounts_the_token(where: str, spec: dict[str, Any]) -> None:
    """No container of the Pod `spec` gets the token by default; the ones running
    kubelock mount it where in-cluster auth reads it; no other container has it."""
    assert spec.get("automountServiceAccountToken") is False, where
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for container in containers_of(spec):
        named = f"{where} container {container['name']}"
        mounts = container.get("volumeMounts", [])
        tokens = [m for m in mounts if projects_a_token(volumes[m["name"]])]
        # Anything mounted at the folder, above or inside it, puts or hides a token there.
        at_the_folder = [
            m
            for m in mounts
            if (SERVICEACCOUNT_DIR + "/").startswith(m["mountPath"].rstrip("/") + "/")
            or m["mountPath"].startswith(SERVICEACCOUNT_DIR + "/")
        ]
        if not runs_kubelock(container):
            assert tokens == [], named
            assert at_the_folder == [], named
            continue
        assert len(tokens) == 1, named
        assert tokens == at_the_folder, named
        (mount,) = tokens
        assert mount["mountPath"] == SERVICEACCOUNT_DIR, named
        assert mount.get("readOnly") is True, named
        # What automounting would have put there: token, ca.crt, namespace.
        sources = volumes[mount["name"]]["projected"]["sources"]
        token = {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
        assert token in sources, named
        assert {
            "configMap": {
                "name": "kube-root-ca.crt",
                "items": [{"key": "ca.crt", "path": "ca.crt"}],
            }
        } in sources, named
        assert {
            "downwardAPI": {
                "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
            }
        } in sources, named


def assert_no_other_credential_opens_the_lock(
    admin: httpx.Client,
    namespace: str,
    where: str,
    spec: dict[str, Any],
    objects: Sequence[dict[str, Any]],
) -> None:
    """The ServiceAccount tokens in Secrets the Pod mounts (the app's "database
    password") are of other accounts, none of which may touch the lock."""
    account = spec["serviceAccountName"]
    locks = sorted(
        {
            lock_name(c)
            for c in [*spec.get("initContainers", []), *spec["containers"]]
            if runs_kubelock(c)
        }
    )
    mounted = {volume.get("secret", {}).get("secretName") for volume in spec.get("volumes", [])}
    others = sorted(
        {
            found["metadata"]["annotations"]["kubernetes.io/service-account.name"]
            for found in objects
            if found["kind"] == "Secret"
            and found.get("type") == "kubernetes.io/service-account-token"
            and found["metadata"]["name"] in mounted
        }
    )
    assert account not in others, where
    user = f"system:serviceaccount:{namespace}:{account}"

    def the_account_may_patch_its_locks() -> bool:
        return all(
            allowed(admin, namespace, user, "patch", "coordination.k8s.io", "leases", lock)
            for lock in locks
        )

    # Asked only once RBAC answers for the Role just made: a "no" then means no.
    wait_for(the_account_may_patch_its_locks, what=f"RBAC to allow {account} its lock")
    for other, lock, verb in itertools.product(others, locks, VERBS):
        other_user = f"system:serviceaccount:{namespace}:{other}"
        may = allowed(admin, namespace, other_user, verb, "coordination.k8s.io", "leases", lock)
        assert not may, f"{where}: {other} may {verb} the lock {lock}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: str(path.relative_to(REPO)))
def test_each_example_passes_pod_security_restricted_and_only_kubelock_gets_the_token(
    control_plane: ControlPlane, admin: httpx.Client, tmp_path: Path, example: Path
) -> None:
    # The example as it is, in a namespace of its own: its Namespace object is
    # renamed to it, keeping the example's own Pod Security labels.
    namespace = f"restricted-{example.name}-{secrets.token_hex(3)}"
    rendered, objects = render(
        control_plane, overlay(tmp_path / "example", resources=[example], namespace=namespace)
    )
    labels = the_one(objects, "Namespace", namespace)["metadata"].get("labels", {})
    assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", labels

    applied = control_plane.kubectl("apply", "-f", "-", input=rendered)
    # kubectl prints the API server's warnings ("would violate PodSecurity ...").
    assert "warning" not in applied.stderr.lower(), applied.stderr
    templates = pod_templates(objects)
    assert templates, f"{example} has no workload"
    assert any(
        runs_kubelock(container)
        for template in templates.values()
        for container in [
            *template["spec"].get("initContainers", []),
            *template["spec"]["containers"],
        ]
    ), f"{example} runs no kubelock"
    # The namespace does enforce the profile: a Pod with no securityContext is refused.
    # (A workload that never calls the API, such as examples/django's database, names no
    # ServiceAccount: the bare Pod takes one that exists here, kubelock's.)
    account = next(
        template["spec"]["serviceAccountName"]
        for template in templates.values()
        if "serviceAccountName" in template["spec"]
    )
    bare = {"serviceAccountName": account, "containers": [{"name": "bare", "image": "bare"}]}
    refused = dry_run_pod(admin, namespace, bare)
    assert refused.status_code == 403, refused.text
    assert "violates PodSecurity" in refused.text, refused.text
    if any("serviceAccountName" not in template["spec"] for template in templates.values()):
        # A real cluster's controller makes each namespace's "default" account; this one has none.
        control_plane.create_service_account(namespace, "default", exist_ok=True)
    for workload, template in templates.items():
        # The Pod its controller would create (none runs here): admitted, no warning.
        admitted = dry_run_pod(admin, namespace, template["spec"])
        assert admitted.status_code == 201, f"{workload}: {admitted.text}"
        assert admitted.headers.get_list("warning") == [], workload

        assert_only_kubelock_mounts_the_token(workload, template["spec"])
        spec = template["spec"]
        if any(runs_kubelock(container) for container in containers_of(spec)):
            assert_no_other_credential_opens_the_lock(admin, namespace, workload, spec, objects)


# -- the init-container example's story ----------------------------------------------


MIGRATIONS = ["0001_initial", "0002_customer_email", "0003_order_index"]


@dataclasses.dataclass(frozen=True)
class Run:
    """One line of the example database's `runs`: who migrated, when, and what it did."""

    pod: str
    start: datetime
    end: datetime
    outcome: str


def assert_migrated_one_at_a_time(database: dict[str, str], pods: Sequence[str]) -> list[Run]:
    """The example's ledger (ConfigMap `example-db`) after `pods` ran `migrate` once each.

    Their runs never overlapped, the first applied every migration and the
    others, later, found nothing to do. Returns the runs in order.
    """
    assert database["running"] == "", database
    assert database["applied"].split() == MIGRATIONS, database
    runs = []
    for line in database["runs"].splitlines()[-len(pods) :]:
        pod, start, end, *outcome = line.split()
        runs.append(
            Run(
                pod,
                datetime.fromisoformat(start.removeprefix("start=")),
                datetime.fromisoformat(end.removeprefix("end=")),
                " ".join(outcome),
            )
        )
    assert sorted(run.pod for run in runs) == sorted(pods), database["runs"]
    for previous, following in itertools.pairwise(runs):
        assert previous.end <= following.start, f"two migrations overlapped:\n{database['runs']}"
    return runs


def test_the_example_pods_migrate_one_at_a_time_and_only_the_first_finds_work(
    control_plane: ControlPlane, admin: httpx.Client, namespace: str, tmp_path: Path
) -> None:
    _, objects = render(
        control_plane, overlay(tmp_path / "example", resources=[EXAMPLE], namespace=namespace)
    )
    control_plane.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    user = f"system:serviceaccount:{namespace}:kubelock"
    database_user = f"system:serviceaccount:{namespace}:example-db"
    wait_for(
        lambda: (
            allowed(admin, namespace, user, "patch", "coordination.k8s.io", "leases", "migrations")
            and allowed(admin, namespace, database_user, "update", "", "configmaps", "example-db")
        ),
        what="RBAC to allow kubelock its lock and the app its database",
    )
    # Each its own: kubelock's token opens no database, the database's opens no lock.
    assert not allowed(admin, namespace, user, "get", "", "configmaps", "example-db")
    assert not allowed(
        admin, namespace, database_user, "patch", "coordination.k8s.io", "leases", "migrations"
    )

    # The init container exactly as deployment.yaml has it, with the image's
    # /app/ here and kubelock the one under test.
    deployment = the_one(objects, "Deployment", "example-app")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kubelock"
    (init,) = [container for container in pod["initContainers"] if container["name"] == "migrate"]
    (database_mount,) = [m for m in init["volumeMounts"] if m["name"] == "database-credentials"]
    argv = [*init["command"], *init["args"]]
    assert argv[0] == "kubelock"
    argv = [arg.replace("/app/", f"{EXAMPLE / 'app'}/") for arg in argv[1:]]
    replicas = deployment["spec"]["replicas"]
    assert replicas == 3

    pods = [f"example-app-5d8f-{suffix}" for suffix in ("a1b2c", "d3e4f", "g5h6i")]
    processes = []
    for name in pods:
        env = control_plane.in_cluster_environment(namespace, "kubelock", tmp_path / name)
        # The Secret `example-db-credentials` as the Pod mounts it (no token
        # controller runs here to fill the Secret in: a token of the same account).
        credentials = tmp_path / name / database_mount["mountPath"].lstrip("/")
        control_plane.in_cluster_environment(namespace, "example-db", credentials)
        env |= {
            "HOSTNAME": name,
            "POD_NAME": name,
            "SECONDS_PER_MIGRATION": "1.5",
            "DATABASE_CREDENTIALS": str(credentials),
        }
        processes.append(
            subprocess.Popen(
                kubelock_argv(*argv),
                env=clean_environment(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = {}
    for name, process in zip(pods, processes, strict=True):
        logs[name], _ = process.communicate(timeout=120)
        assert process.returncode == 0, logs[name]

    database = admin.get(f"/api/v1/namespaces/{namespace}/configmaps/example-db").json()["data"]
    runs = assert_migrated_one_at_a_time(database, pods)
    assert runs[0].outcome == f"applied {','.join(MIGRATIONS)}", database["runs"]
    assert [run.outcome for run in runs[1:]] == ["nothing to do", "nothing to do"]

    # What `kubectl logs <pod> -c migrate` shows: the first migrated, the others waited.
    migrated = [name for name in pods if "Applying example.0001_initial" in logs[name]]
    assert migrated == [runs[0].pod], logs
    for name in pods:
        if name not in migrated:
            assert "waiting for the lock, held by" in logs[name], logs[name]
            assert "No migrations to apply." in logs[name], logs[name]
