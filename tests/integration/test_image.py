"""The container image, run in real containers by a real Docker engine against the real API server.

The images under test are built by scripts/image (the script users and CI
run; the BuildKit cache makes an unchanged rebuild take seconds): the image
(the default variant), the image built with VARIANT=with-kubernetes, and the
example's app image, a Debian-based image that takes the one-file executable
with COPY --from. Their tags are this session's own (`kubelock:test-<id>`...),
removed after it, so that builds from other checkouts sharing the engine never
replace what is under test. `KUBELOCK_IMAGE`, `KUBELOCK_APP_IMAGE` and
`KUBELOCK_KUBECONFIG_IMAGE` name images to test instead, unbuilt.
`KUBELOCK_SKIP_IMAGE=1` skips this module, for machines without Docker; CI
runs it.

The engine: a running one, else (as root) one started by
`scripts/docker-engine start` for this session and stopped after it.

Containers run with `--network host`. The harness's API server listens on
127.0.0.1 only (servers in tests stay on loopback) with a serving certificate
for 127.0.0.1, and a container in the host's network namespace reaches it
there, as a Pod reaches `KUBERNETES_SERVICE_HOST`: kubelock's in-cluster code
path is the same whatever that address is. The ServiceAccount token comes
from the TokenRequest API and is mounted read-only at the standard path.

The image holds no shell, so the tests that need a command with a shell run
a tools image: the image plus Debian's dash (as /bin/sh), date and sleep
copied from the app image; its entrypoint, user, environment and kubelock
files are the image's own.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import kubelock
from kubelock.errors import EXIT_USAGE
from kubelock.testing import IdentityFactory, InClusterFactory

from .kubelock_proc import hold_command, lease, read_intervals, wait_for

REPO = Path(__file__).resolve().parents[2]
SKIP_VARIABLE = "KUBELOCK_SKIP_IMAGE"
SERVICEACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
NONROOT = "65532"
SESSION = secrets.token_hex(4)
LABEL = "org.kubelock.test"
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update", "patch", "watch"],
    }
]
TOOLS_DOCKERFILE = """\
ARG KUBELOCK_IMAGE
ARG APP_IMAGE
FROM ${APP_IMAGE} AS tools
FROM ${KUBELOCK_IMAGE}
COPY --from=tools /usr/bin/dash /bin/sh
COPY --from=tools /usr/bin/date /usr/bin/sleep /usr/bin/
"""

# A cold build (stand-in bases, both layouts, two variants) takes minutes on two cores.
pytestmark = pytest.mark.timeout(1200)


@dataclass(frozen=True)
class Images:
    kubelock: str
    """The image itself (default variant): the folder layout as entrypoint."""
    app: str
    """A Debian-based app image holding the one-file executable (COPY --from)."""
    tools: str
    """`kubelock` plus a shell, date and sleep, for commands under the lock."""


@pytest.fixture(scope="session")
def docker() -> Iterator[str]:
    """The docker client; the engine runs for the session (started and stopped here if need be)."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the container image is not tested here")
    engine = REPO / "scripts" / "docker-engine"
    pid_file = REPO / "build" / f"test-dockerd-{os.getpid()}.pid"
    pid_file.parent.mkdir(exist_ok=True)
    started = subprocess.run(
        [str(engine), "start", "--pid-file", str(pid_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode != 0:
        pytest.fail(
            f"no Docker engine (set {SKIP_VARIABLE}=1 to skip the image's tests):\n{started.stderr}"
        )
    client = subprocess.run(
        [str(engine), "client"], capture_output=True, text=True, check=True
    ).stdout.strip()
    yield client
    remove_test_containers(client)
    if pid_file.exists():
        subprocess.run([str(engine), "stop", pid_file.read_text().strip()], check=False)
        pid_file.unlink()


def remove_test_containers(docker: str) -> None:
    found = subprocess.run(
        [docker, "ps", "-aq", "--filter", f"label={LABEL}"], capture_output=True, text=True
    ).stdout.split()
    if found:
        subprocess.run([docker, "rm", "-f", *found], capture_output=True, check=False)


def run_container(docker: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`docker run --rm --read-only ARGS` to completion, output captured."""
    return subprocess.run(
        [docker, "run", "--rm", "--read-only", f"--label={LABEL}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def build_image(*args: str) -> list[str]:
    """Run scripts/image; return the tags it built."""
    built = subprocess.run(
        [str(REPO / "scripts" / "image"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"scripts/image {' '.join(args)} exited {built.returncode}:\n{built.stderr}")
    return built.stdout.split()


def remove_images(docker: str, tags: list[str]) -> None:
    subprocess.run([docker, "rmi", *tags], capture_output=True, check=False)


@pytest.fixture(scope="session")
def images(docker: str) -> Iterator[Images]:
    built = []
    given, app = os.environ.get("KUBELOCK_IMAGE"), os.environ.get("KUBELOCK_APP_IMAGE")
    if given is None or app is None:
        given, app = built = build_image(
            *("--tag", f"kubelock:test-{SESSION}"),
            *("--app-tag", f"kubelock-example-app:test-{SESSION}"),
        )
    tools_image = f"kubelock-test-tools:{SESSION}"
    tools = subprocess.run(
        [
            docker,
            "build",
            "--build-arg",
            f"KUBELOCK_IMAGE={given}",
            "--build-arg",
            f"APP_IMAGE={app}",
            "-t",
            tools_image,
            "-",
        ],
        input=TOOLS_DOCKERFILE,
        capture_output=True,
        text=True,
        env=os.environ | {"DOCKER_BUILDKIT": "1"},
        check=False,
    )
    assert tools.returncode == 0, tools.stderr
    yield Images(kubelock=given, app=app, tools=tools_image)
    remove_test_containers(docker)
    remove_images(docker, [tools_image, *built])


@pytest.fixture(scope="session")
def kubeconfig_image(docker: str) -> Iterator[str]:
    """The image built with VARIANT=with-kubernetes."""
    given = os.environ.get("KUBELOCK_KUBECONFIG_IMAGE")
    if given is not None:
        yield given
        return
    (tag,) = build_image(
        "--variant", "with-kubernetes", "--no-app", "--tag", f"kubelock:test-{SESSION}-kubeconfig"
    )
    yield tag
    remove_images(docker, [tag])


@dataclass(frozen=True)
class Layout:
    """How users run kubelock in a container."""

    in_app_image: bool
    """The one-file executable copied into a Debian-based app image; else the image itself."""
    tmp: str | None
    """Options of the tmpfs at /tmp (as an emptyDir gives); None: no /tmp mount at all."""


# The image itself: the folder layout, read-only root, nothing mounted at /tmp.
# The one-file executable in an app image: read-only root, an exec-able /tmp.
LAYOUTS = {
    "image": Layout(in_app_image=False, tmp=None),
    "copied into an app image": Layout(in_app_image=True, tmp="exec"),
}


class Pods:
    """Containers made to look like Pods: in-cluster variables, the token at the standard path."""

    def __init__(
        self,
        docker: str,
        images: Images,
        in_cluster: InClusterFactory,
        namespace: str,
        folder: Path,
    ) -> None:
        self.docker = docker
        self._images = images
        self._in_cluster = in_cluster
        self._namespace = namespace
        self.shared = folder / "shared"
        """Mounted at /shared in every container, writable by all."""
        self.shared.mkdir()
        self.shared.chmod(0o777)  # written by uid 65532 in the containers

    def argv(
        self, layout: Layout, args: Sequence[str], *, name: str, detach: bool = False
    ) -> list[str]:
        """`docker run` of kubelock ARGS as Pod `name`, read-only root.

        Detached containers stay after they exit, for their status and logs;
        the session removes them.
        """
        env = self._in_cluster(self._namespace, "kubelock", LEASE_RULES)
        mount = env.pop("KUBELOCK_SERVICEACCOUNT_DIR")
        argv = [
            self.docker,
            "run",
            "--detach" if detach else "--rm",
            "--network=host",
            "--read-only",
            f"--label={LABEL}",
            f"--name=kubelock-test-{name}-{secrets.token_hex(3)}",
            f"--volume={mount}:{SERVICEACCOUNT}:ro",
            f"--volume={self.shared}:/shared",
            f"--env=HOSTNAME={name}",
            *(f"--env={key}={value}" for key, value in env.items()),
        ]
        if layout.tmp is not None:
            argv.append(f"--tmpfs=/tmp:{layout.tmp}")
        if layout.in_app_image:
            return [*argv, "--entrypoint=/usr/local/bin/kubelock", self._images.app, *args]
        return [*argv, self._images.tools, *args]

    def start(self, layout: Layout, args: Sequence[str], *, name: str) -> str:
        """Start detached; return the container's ID."""
        return subprocess.run(
            self.argv(layout, args, name=name, detach=True),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def logs(self, container: str) -> str:
        """What kubelock logged (its stderr)."""
        return subprocess.run(
            [self.docker, "logs", container], capture_output=True, text=True, check=False
        ).stderr


@pytest.fixture
def pods(
    docker: str, images: Images, in_cluster: InClusterFactory, namespace: str, tmp_path: Path
) -> Pods:
    return Pods(docker, images, in_cluster, namespace, tmp_path)


def test_version_as_nonroot_on_a_read_only_root(docker: str, images: Images) -> None:
    """No /tmp, no writable path at all: the entrypoint still runs, as uid 65532."""
    user = subprocess.run(
        [docker, "image", "inspect", "--format", "{{.Config.User}}", images.kubelock],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert user == f"{NONROOT}:{NONROOT}"

    result = run_container(docker, images.kubelock, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kubelock {kubelock.__version__}"


def test_the_one_file_executable_needs_an_exec_able_tmp(docker: str, images: Images) -> None:
    """What the README tells users of COPY --from: /tmp must be writable and not noexec."""
    one_file = ["--entrypoint=/usr/local/bin/kubelock", images.kubelock, "--version"]

    noexec = run_container(docker, "--tmpfs=/tmp", *one_file)
    exec_able = run_container(docker, "--tmpfs=/tmp:exec", *one_file)

    assert noexec.returncode != 0
    assert "failed to map segment from shared object" in noexec.stderr, noexec.stderr
    assert exec_able.returncode == 0, exec_able.stderr
    assert exec_able.stdout.strip() == f"kubelock {kubelock.__version__}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_three_containers_take_turns(
    pods: Pods, admin: httpx.Client, namespace: str, layout: str
) -> None:
    """Three Pods' init containers race for one lock: each holds it alone, all succeed."""
    log = Path("/shared/holds")
    racers = [
        subprocess.Popen(
            pods.argv(LAYOUTS[layout], ["--name", "race", *hold_command(name, 1, log)], name=name),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("pod-a", "pod-b", "pod-c")
    ]
    for racer in racers:
        _, stderr = racer.communicate(timeout=180)
        assert racer.returncode == 0, stderr

    holds = read_intervals(pods.shared / "holds")
    assert sorted(name for name, _, _ in holds) == ["pod-a", "pod-b", "pod-c"]
    for (_, _, previous_end), (_, next_start, _) in itertools.pairwise(holds):
        assert previous_end <= next_start, holds
    released = lease(admin, namespace, "race")
    assert released is not None
    assert released["spec"].get("holderIdentity", "") == "", released


# The holder notes SIGTERM when it arrives, then exits; the waiter notes when it starts.
HOLDER = (
    "trap 'echo \"term $(date +%s.%N)\" >> /shared/events; exit 0' TERM;"
    ' echo "holding $(date +%s.%N)" >> /shared/events;'
    " while :; do sleep 0.05; done"
)
WAITER = 'echo "started $(date +%s.%N)" >> /shared/events'
HANDOFF_LEASE = 60  # seconds: a waiter that started sooner was let in by the release


def events(pods: Pods) -> list[tuple[str, float]]:
    path = pods.shared / "events"
    if not path.exists():
        return []
    return [(word, float(stamp)) for word, stamp in map(str.split, path.read_text().splitlines())]


def hand_off(pods: Pods, layout: Layout) -> tuple[list[tuple[str, float]], str]:
    """Holder and waiter containers; `docker stop` the holder. The events, the holder's status."""
    lock = ["--name", "handoff", "--lease-duration", f"{HANDOFF_LEASE}s", "--"]
    holder = pods.start(layout, [*lock, "sh", "-c", HOLDER], name="holder")
    wait_for(lambda: events(pods), timeout=60, what="the holder's command to start")
    waiter = pods.start(layout, [*lock, "sh", "-c", WAITER], name="waiter")
    wait_for(
        lambda: "waiting for the lock, held by 'holder'" in pods.logs(waiter),
        timeout=60,
        what="the waiter to wait",
    )
    subprocess.run([pods.docker, "stop", "--time=30", holder], capture_output=True, check=True)
    waited = subprocess.run(
        [pods.docker, "wait", waiter, holder],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    waiter_status, holder_status = waited.stdout.split()
    assert waiter_status == "0", pods.logs(waiter)
    return events(pods), holder_status


@pytest.mark.parametrize("layout", LAYOUTS)
def test_docker_stop_hands_the_lock_to_the_waiting_container(
    pods: Pods, admin: httpx.Client, namespace: str, layout: str
) -> None:
    """`docker stop` reaches the command as SIGTERM through kubelock; the lock is released
    on the way out, so the waiter starts long before the holder's lease could expire."""
    happened, holder_status = hand_off(pods, LAYOUTS[layout])

    assert holder_status == "0", "the holder's command exits 0 on SIGTERM, and so must kubelock"
    assert [word for word, _ in happened] == ["holding", "term", "started"], happened
    stamps = dict(happened)
    handoff = stamps["started"] - stamps["term"]
    print(f"hand-off after docker stop ({layout}): {handoff * 1000:.0f} ms")
    assert handoff < HANDOFF_LEASE / 2, "the waiter waited for the lease to expire"
    held = lease(admin, namespace, "handoff")
    assert held is not None
    assert held["spec"].get("leaseTransitions") == 1, held
    assert held["spec"].get("holderIdentity", "") == "", held


def pid_namespace_processes(pid: int) -> list[tuple[int, str, str]]:
    """`(pid, state, uid)` of every process in the PID namespace of host PID `pid`."""
    namespace = os.readlink(f"/proc/{pid}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != namespace:
                continue
            stat = (entry / "stat").read_text()
            uid = next(
                line.split()[1]
                for line in (entry / "status").read_text().splitlines()
                if line.startswith("Uid:")
            )
        except OSError:
            continue  # gone meanwhile
        found.append((int(entry.name), stat[stat.rindex(")") + 2], uid))
    return found


# Three orphans: each inner shell exits at once, leaving a subshell that ends
# 0.1 s later with nobody but PID 1 (or its subreaper) to reap it.
ORPHANS = 'for i in 1 2 3; do sh -c "(sleep 0.1; echo orphan >> /shared/orphans) &"; done; sleep 60'


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pid_1_reaps_orphans(pods: Pods, layout: str) -> None:
    """kubelock as a container's entrypoint leaves no zombies behind its command."""
    container = pods.start(
        LAYOUTS[layout], ["--name", "reaper", "--", "sh", "-c", ORPHANS], name="reaper"
    )
    try:
        orphans = pods.shared / "orphans"
        wait_for(
            lambda: orphans.exists() and len(orphans.read_text().split()) == 3,
            timeout=60,
            what="three orphans to end",
        )
        pid = int(
            subprocess.run(
                [pods.docker, "inspect", "--format", "{{.State.Pid}}", container],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        processes = pid_namespace_processes(pid)
        assert {uid for _, _, uid in processes} == {NONROOT}, processes
        wait_for(
            lambda: not [p for p in pid_namespace_processes(pid) if p[1] == "Z"],
            timeout=10,
            what=f"no zombies in the container (now: {pid_namespace_processes(pid)})",
        )
    finally:
        subprocess.run([pods.docker, "rm", "--force", container], capture_output=True)


def test_both_variants_read_what_they_should(
    docker: str,
    images: Images,
    kubeconfig_image: str,
    identity: IdentityFactory,
    admin: httpx.Client,
    namespace: str,
    tmp_path: Path,
) -> None:
    """with-kubernetes takes the lock with a kubeconfig; the default refuses, writing nothing."""
    folder = tmp_path / "kube"
    folder.mkdir()
    config = folder / "config"
    shutil.copyfile(identity(LEASE_RULES).kubeconfig, config)
    config.chmod(0o644)  # read by uid 65532
    args = ["--kubeconfig", "/kube/config", "--name", "variant", "--", "kubelock", "--version"]
    mount = ["--network=host", f"--volume={folder}:/kube:ro"]

    without = run_container(docker, *mount, images.kubelock, *args)
    assert without.returncode == EXIT_USAGE, without.stderr
    assert len(without.stderr.strip().splitlines()) == 1, without.stderr
    assert "--with-kubernetes" in without.stderr
    assert lease(admin, namespace, "variant") is None

    # The kubernetes package writes a kubeconfig's embedded certificates to
    # files in $TMPDIR: this variant, given a kubeconfig, needs a writable /tmp.
    with_kubernetes = run_container(
        docker, *mount, "--tmpfs=/tmp", "--env=HOSTNAME=kubeconfig-pod", kubeconfig_image, *args
    )
    assert with_kubernetes.returncode == 0, with_kubernetes.stderr
    assert with_kubernetes.stdout.strip() == f"kubelock {kubelock.__version__}"
    held = lease(admin, namespace, "variant")
    assert held is not None
    assert held["spec"].get("leaseTransitions", 0) == 0
