"""The single-file executable users copy into their images, run against the real API server.

The file under test is `$KUBELOCK_EXECUTABLE` when set, else `dist/kubelock`,
rebuilt with scripts/build-executable when older than anything it is built
from (the default variant: without the `kubernetes` package, so in-cluster
only, which is how it runs in a Pod). `KUBELOCK_SKIP_EXECUTABLE=1` skips
this module, for machines that cannot build it; CI builds it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import kubelock
from kubelock.errors import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, EXIT_SIGTERM, EXIT_USAGE
from kubelock.testing import InClusterFactory, process_alive

from .kubelock_proc import (
    EXECUTABLE_VARIABLE,
    clean_environment,
    hold_command,
    lease,
    read_intervals,
    run,
    spawn,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-executable"
DEFAULT_EXECUTABLE = REPO / "dist" / "kubelock"
SKIP_VARIABLE = "KUBELOCK_SKIP_EXECUTABLE"
LEASE_RULES = [
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update", "patch", "watch"],
    }
]
SERVICEACCOUNT = "var/run/secrets/kubernetes.io/serviceaccount"
# What every glibc-based image has; nothing else goes into the empty root.
GLIBC = ("libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1")

# A first build (its own environment, PyInstaller's bootloader) takes minutes on two cores.
pytestmark = pytest.mark.timeout(900)


def built_from() -> Iterator[Path]:
    yield BUILD_SCRIPT
    yield REPO / "pyproject.toml"
    yield REPO / "uv.lock"
    yield from (
        path
        for path in (REPO / "src").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


@pytest.fixture(scope="module")
def executable() -> Path:
    """The executable under test, built first when missing or stale."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the single-file executable is not tested here")
    given = os.environ.get(EXECUTABLE_VARIABLE)
    if given:
        return Path(given).resolve()
    newest_input = max(path.stat().st_mtime for path in built_from())
    if not DEFAULT_EXECUTABLE.exists() or DEFAULT_EXECUTABLE.stat().st_mtime < newest_input:
        built = subprocess.run(
            [str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True, check=False
        )
        if built.returncode != 0:
            pytest.fail(
                f"scripts/build-executable exited {built.returncode} (set {SKIP_VARIABLE}=1 "
                f"to skip the executable's tests):\n{built.stdout[-3000:]}{built.stderr[-3000:]}"
            )
    return DEFAULT_EXECUTABLE


@pytest.fixture
def use_executable(executable: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make kubelock_proc's `run` and `spawn` start the executable."""
    monkeypatch.setenv(EXECUTABLE_VARIABLE, str(executable))
    return executable


def test_it_reports_the_version_it_was_built_from(use_executable: Path) -> None:
    version = run(["--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"kubelock {kubelock.__version__}"
    usage = run(["--help"])
    assert usage.returncode == 0, usage.stderr
    assert "--lease-duration" in usage.stdout


def test_three_contenders_take_turns(
    use_executable: Path, in_cluster: InClusterFactory, namespace: str, tmp_path: Path
) -> None:
    """Three Pods' init containers race for one lock: each holds it alone, all succeed."""
    log = tmp_path / "holds"
    processes = []
    for name in ("pod-a", "pod-b", "pod-c"):
        env = in_cluster(namespace, "kubelock", LEASE_RULES) | {"HOSTNAME": name}
        processes.append(
            spawn(["--name", "race", *hold_command(name, 1, log)], env=env, stderr=subprocess.PIPE)
        )
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    holds = read_intervals(log)
    assert sorted(name for name, _, _ in holds) == ["pod-a", "pod-b", "pod-c"]
    for (_, _, previous_end), (_, next_start, _) in itertools.pairwise(holds):
        assert previous_end <= next_start, holds


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -TERM $$"], EXIT_SIGTERM),
        (["/nonexistent/migrate"], EXIT_NOT_FOUND),
        (["{not_executable}"], EXIT_CANNOT_EXECUTE),
    ],
    ids=["own status", "killed by SIGTERM", "not found", "not executable"],
)
def test_the_exit_status_says_what_happened_and_the_lock_is_released(
    use_executable: Path,
    in_cluster: InClusterFactory,
    namespace: str,
    tmp_path: Path,
    admin: httpx.Client,
    command: list[str],
    status: int,
) -> None:
    not_executable = tmp_path / "migrate.sh"
    not_executable.write_text("echo never\n")
    command = [part.format(not_executable=not_executable) for part in command]
    env = in_cluster(namespace, "kubelock", LEASE_RULES)

    result = run(["--name", "exit-status", "--", *command], env=env)

    assert result.returncode == status, result.stderr
    released = lease(admin, namespace, "exit-status")
    assert released is not None
    assert released["spec"].get("holderIdentity", "") == "", released


def test_bad_usage_exits_2_before_any_request(use_executable: Path, tmp_path: Path) -> None:
    result = run(["--lease-duration", "10s", "--renew-deadline", "10s", "true"])
    assert result.returncode == EXIT_USAGE, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text()
        except OSError:
            continue
        if int(fields[fields.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_killing_the_executable_leaves_no_kubelock_and_no_command_behind(
    use_executable: Path, in_cluster: InClusterFactory, namespace: str, tmp_path: Path
) -> None:
    """The file runs as two processes (PyInstaller's bootloader, then Python): SIGKILL to
    the one users see, which cannot be forwarded, takes the other down too, and with it
    (through the watchdog) the command's whole group."""
    ready = tmp_path / "ready"
    env = in_cluster(namespace, "kubelock", LEASE_RULES)
    command = f"sleep 60 & echo $$ $! > {ready}.tmp; mv {ready}.tmp {ready}; exec sleep 60"
    outer = spawn(["--name", "killed", "--", "sh", "-c", command], env=env)
    group: list[int] = []
    try:
        wait_for(ready.exists, what="the command to start")
        group = [int(pid) for pid in ready.read_text().split()]  # the command, its grandchild
        (inner,) = children(outer.pid)
        outer.kill()
        outer.wait(timeout=10)
        wait_for(lambda: not process_alive(inner), timeout=10, what="kubelock to die with it")
        wait_for(
            lambda: not any(process_alive(pid) for pid in group),
            timeout=10,
            what="the command and its grandchild to die with it",
        )
    finally:
        if outer.poll() is None:
            outer.kill()
        for pid in group:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


def empty_root_runner() -> list[str] | None:
    """How to run a command inside another root folder here, if at all."""
    chroot, unshare = shutil.which("chroot"), shutil.which("unshare")
    if chroot is None:
        return None
    if os.geteuid() == 0:
        return [chroot]
    if unshare is not None:
        as_root = [unshare, "--user", "--map-root-user"]
        if subprocess.run([*as_root, "true"], capture_output=True, check=False).returncode == 0:
            return [*as_root, chroot]
    return None


def glibc_root(executable: Path, root: Path) -> None:
    """A root folder holding glibc, /tmp and the executable, and nothing else."""
    found = subprocess.run(["ldd", str(executable)], capture_output=True, text=True, check=True)
    libraries = [
        Path(word) for line in found.stdout.splitlines() for word in line.split() if word[0] == "/"
    ]
    loader = next(path for path in libraries if path.name.startswith("ld-linux"))
    libc = next(path for path in libraries if path.name == "libc.so.6")
    for source in [loader, *(libc.parent / name for name in GLIBC)]:
        if source.exists():
            target = root / source.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.resolve(), target)
            target.chmod(0o755)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copyfile(executable, root / "usr/local/bin/kubelock")
    (root / "usr/local/bin/kubelock").chmod(0o755)


def test_it_runs_in_an_image_with_nothing_but_glibc(
    executable: Path,
    in_cluster: InClusterFactory,
    namespace: str,
    tmp_path: Path,
    admin: httpx.Client,
) -> None:
    """No Python, no zlib, no CA bundle: only glibc, /tmp, and the Pod's ServiceAccount mount."""
    runner = empty_root_runner()
    if runner is None:
        pytest.skip("cannot enter another root folder here (needs root, or unprivileged unshare)")
    root = tmp_path / "root"
    glibc_root(executable, root)
    env = in_cluster(namespace, "kubelock", LEASE_RULES)
    mount = root / SERVICEACCOUNT
    shutil.copytree(env.pop("KUBELOCK_SERVICEACCOUNT_DIR"), mount)  # where a Pod has it

    result = subprocess.run(
        [
            *runner,
            str(root),
            "/usr/local/bin/kubelock",
            "--name",
            "empty-root",
            "--",
            "/usr/local/bin/kubelock",
            "--version",
        ],
        env=clean_environment(env) | {"HOSTNAME": "bare-pod", "PATH": "/usr/local/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kubelock {kubelock.__version__}"
    assert "bare-pod" in result.stderr, result.stderr
    held = lease(admin, namespace, "empty-root")
    assert held is not None
    assert held["spec"].get("leaseTransitions", 0) == 0
    assert not list((root / "tmp").iterdir()), "the executable left its unpacked files in /tmp"
