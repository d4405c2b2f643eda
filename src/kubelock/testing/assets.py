"""The kube-apiserver, etcd and kubectl binaries the test control plane runs.

Where they come from, first match wins:

1. `KUBEBUILDER_ASSETS`, when set, names a folder holding `kube-apiserver` and
   `etcd` (and optionally `kubectl`), the layout controller-runtime's envtest
   uses. It is trusted as is; a folder missing a binary is an error, not a
   reason to build.
2. The per-user cache `${XDG_CACHE_HOME:-~/.cache}/kubelock/controlplane/
   k8s-<version>-etcd-<version>/bin`, keyed by the versions in
   `kubelock.testing.versions`.
3. Otherwise the cache entry is built from source with the local Go toolchain:
   a throwaway Go module that requires `k8s.io/kubernetes` and etcd's server,
   with every staging module Kubernetes replaces by a local path pinned to its
   published v0.X.Y instead (the list is read from Kubernetes' own go.mod).
   The build happens in a temporary folder renamed into place when complete,
   under a lock file, so concurrent test runs build once and never see half a
   cache entry. Progress goes to stderr every 15 s.

Without `KUBEBUILDER_ASSETS` and without Go, `AssetsUnavailable` says how to
fix either; tests never skip silently for lack of binaries.

The single-node cluster (`kubelock.testing.cluster`) also needs
kube-controller-manager, kube-scheduler, kubelet, kube-proxy and the Pod
sandbox's `pause` program. `ensure_node_binaries()` builds them the same way
into a cache entry of their own, `.../kubelock/node/k8s-<version>/bin`, so the
control plane's entry is never rebuilt for them; both builds use the same
throwaway module, so the second one reuses the first one's Go build cache.
`pause` is compiled with the C compiler from `build/pause/linux/pause.c` of the
`k8s.io/kubernetes` module.

`python -m kubelock.testing.assets` locates or builds the control plane's
binaries and prints the folder; `python -m kubelock.testing.assets node` does
the same for the node's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from ._logs import tail
from .versions import ETCD_VERSION, GO_MINIMUM, KUBERNETES_VERSION, STAGING_VERSION

__all__ = [
    "ASSETS_VARIABLE",
    "NODE_BINARIES",
    "REQUIRED_BINARIES",
    "AssetsUnavailable",
    "cache_entry",
    "ensure_binaries",
    "ensure_node_binaries",
    "node_cache_entry",
]

ASSETS_VARIABLE: Final = "KUBEBUILDER_ASSETS"
REQUIRED_BINARIES: Final = ("kube-apiserver", "etcd")
NODE_BINARIES: Final = (
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "pause",
)

PROGRESS_INTERVAL: Final = 15.0
"""Seconds between two "still building" lines on stderr."""

_KUBERNETES_MODULE: Final = "k8s.io/kubernetes"
_ETCD_MODULE: Final = "go.etcd.io/etcd/server/v3"
_PACKAGES: Final = (
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kubectl",
    _ETCD_MODULE,
)
_NODE_PACKAGES: Final = (
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "k8s.io/kubernetes/cmd/kube-scheduler",
    "k8s.io/kubernetes/cmd/kubelet",
    "k8s.io/kubernetes/cmd/kube-proxy",
)
_PAUSE_SOURCE: Final = Path("build", "pause", "linux", "pause.c")
# `go build -o dir/` names a binary after the last path element that is not a
# major-version suffix; etcd's main package is .../server/v3.
_ETCD_OUTPUT_NAMES: Final = ("server", "v3")

_STAGING_REPLACE: Final = re.compile(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+\./staging/\S+\s*$")
_GO_VERSION: Final = re.compile(r"go(\d+)\.(\d+)")


class AssetsUnavailable(RuntimeError):
    """The control-plane binaries could neither be found nor built."""


def cache_root() -> Path:
    """kubelock's per-user cache: `${XDG_CACHE_HOME:-~/.cache}/kubelock`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubelock"


def cache_entry() -> Path:
    """The cache folder for the pinned versions (its `bin` holds the binaries)."""
    return cache_root() / "controlplane" / f"k8s-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def node_cache_entry() -> Path:
    """The cache folder of the node's binaries (its `bin` holds them)."""
    return cache_root() / "node" / f"k8s-{KUBERNETES_VERSION}"


@dataclass(frozen=True)
class _Target:
    """One cache entry: what it holds and how the Go build makes it."""

    what: str
    entry: Path
    required: tuple[str, ...]
    packages: tuple[str, ...]
    estimate: str
    finish: Callable[[Path, Path, Path, TextIO], None] | None = None
    """Called with (module dir of k8s.io/kubernetes, bin, log, out) after `go build`."""


def ensure_binaries(*, progress: TextIO | None = None) -> Path:
    """Return a folder holding `kube-apiserver`, `etcd` and (usually) `kubectl`.

    Builds them on first use, which takes many minutes; `progress` (stderr by
    default) receives a line saying what is happening at least every 15 s.
    Raises `AssetsUnavailable` when neither `KUBEBUILDER_ASSETS` nor Go is there.
    """
    out = sys.stderr if progress is None else progress
    assets = os.environ.get(ASSETS_VARIABLE)
    if assets:
        folder = Path(assets)
        missing = _missing(folder)
        if missing:
            raise AssetsUnavailable(
                f"{ASSETS_VARIABLE}={assets} lacks {', '.join(missing)}: point it at a "
                f"folder holding {' and '.join(REQUIRED_BINARIES)}, or unset it to build them "
                "with Go."
            )
        return folder
    return _ensure(_control_plane(), out)


def ensure_node_binaries(*, progress: TextIO | None = None) -> Path:
    """Return a folder holding the node's binaries (`NODE_BINARIES`).

    Built on first use like `ensure_binaries()`, into `node_cache_entry()`;
    `KUBEBUILDER_ASSETS` does not apply (envtest ships no node components).
    Raises `AssetsUnavailable` without Go or a C compiler.
    """
    return _ensure(_node(), sys.stderr if progress is None else progress)


def _control_plane() -> _Target:
    return _Target(
        what=(
            f"kube-apiserver and kubectl (Kubernetes {KUBERNETES_VERSION}) and etcd {ETCD_VERSION}"
        ),
        entry=cache_entry(),
        required=REQUIRED_BINARIES,
        packages=_PACKAGES,
        estimate="6-15 on 2 cores with a cold Go build cache",
    )


def _node() -> _Target:
    return _Target(
        what=f"{', '.join(NODE_BINARIES[:-1])} and pause (Kubernetes {KUBERNETES_VERSION})",
        entry=node_cache_entry(),
        required=NODE_BINARIES,
        packages=_NODE_PACKAGES,
        estimate="10-25 on 2 cores with a cold Go build cache, less after the control plane's",
        finish=_build_pause,
    )


def _ensure(target: _Target, out: TextIO) -> Path:
    entry = target.entry
    if not _missing(entry / "bin", target.required):
        return entry / "bin"
    go = _go_toolchain()
    entry.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(entry.parent / f"{entry.name}.lock", out):
        if not _missing(entry / "bin", target.required):  # built while we waited
            return entry / "bin"
        _build(go, target, out)
    return entry / "bin"


def _missing(folder: Path, required: Sequence[str] = REQUIRED_BINARIES) -> list[str]:
    return [
        name
        for name in required
        if not (folder / name).is_file() or not os.access(folder / name, os.X_OK)
    ]


def _go_toolchain() -> str:
    """The `go` command, checked to be new enough; raises `AssetsUnavailable`."""
    wanted = ".".join(map(str, GO_MINIMUM))
    fixes = (
        f"set {ASSETS_VARIABLE} to a folder holding {' and '.join(REQUIRED_BINARIES)} "
        f"(Kubernetes {KUBERNETES_VERSION}, etcd {ETCD_VERSION}), or install Go >= {wanted} "
        "so the test suite can build them once into "
        f"{cache_entry() / 'bin'}"
    )
    go = shutil.which("go")
    if go is None:
        raise AssetsUnavailable(
            f"no kube-apiserver/etcd for the integration tests and no `go` on PATH: {fixes}."
        )
    found = subprocess.run(
        [go, "env", "GOVERSION"], capture_output=True, text=True, check=False
    ).stdout.strip()
    match = _GO_VERSION.match(found)
    if match is not None and (int(match[1]), int(match[2])) < GO_MINIMUM:
        raise AssetsUnavailable(
            f"no kube-apiserver/etcd for the integration tests and {go} is {found}, "
            f"older than {wanted}: {fixes}."
        )
    return go


@contextlib.contextmanager
def exclusive(lock_path: Path, out: TextIO) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`, saying so while waiting for it."""
    with open(lock_path, "a+") as lock:
        started = time.monotonic()
        next_report = started
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now >= next_report:
                    lock.seek(0)
                    holder = lock.read().strip() or "another process"
                    say(
                        out,
                        f"waiting for {holder} to finish building "
                        f"(lock {lock_path}), {now - started:.0f} s so far",
                    )
                    next_report = now + PROGRESS_INTERVAL
                time.sleep(0.5)
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}\n")
            lock.flush()
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _build(go: str, target: _Target, out: TextIO) -> None:
    """Build the binaries into a temporary folder, then rename it to the entry.

    The caller holds the build lock, so leftovers of interrupted builds and an
    incomplete entry can be removed safely.
    """
    entry = target.entry
    for stale in entry.parent.glob(f".{entry.name}-build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():
        shutil.rmtree(entry)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-build-", dir=entry.parent))
    # Outside `work`, so a failed build's log outlives the cleanup.
    log = entry.parent / f"{entry.name}.build.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    say(
        out,
        f"building {target.what} with {go} into {entry / 'bin'}; this happens once per "
        f"version and takes minutes ({target.estimate})",
    )
    try:
        kubernetes_dir = _write_module(go, work, log, out)
        run_logged(go, ["mod", "tidy"], work, log, out, "resolving Go modules")
        _check_etcd_version(work / "go.mod")
        (work / "bin").mkdir()
        names = ", ".join(package.rsplit("/", 1)[-1] for package in target.packages)
        run_logged(
            go,
            ["build", "-v", "-trimpath", f"-ldflags={_ldflags()}", "-o", "bin/", *target.packages],
            work,
            log,
            out,
            f"compiling {names}",
        )
        for name in _ETCD_OUTPUT_NAMES:
            if (work / "bin" / name).exists():
                (work / "bin" / name).rename(work / "bin" / "etcd")
        if target.finish is not None:
            target.finish(kubernetes_dir, work / "bin", log, out)
        missing = _missing(work / "bin", target.required)
        if missing:
            raise AssetsUnavailable(
                f"the Go build finished without {', '.join(missing)}; see {log}"
            )
        log.rename(work / "build.log")
        work.rename(entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(out, f"built {target.what} in {time.monotonic() - started:.0f} s: {entry / 'bin'}")


def _build_pause(kubernetes_dir: Path, bin_dir: Path, log: Path, out: TextIO) -> None:
    """Compile the Pod sandbox's `pause` statically from the Kubernetes module."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise AssetsUnavailable(
            "no C compiler to build the Pod sandbox's pause program: install gcc and "
            "libc6-dev (Debian), or set CC"
        )
    source = kubernetes_dir / _PAUSE_SOURCE
    command = [compiler, "-Os", "-static", "-o", str(bin_dir / "pause"), str(source)]
    with open(log, "ab") as sink:
        sink.write(f"$ {' '.join(command)}\n".encode())
        sink.flush()
        code = subprocess.run(command, stdout=sink, stderr=sink, check=False).returncode
    if code != 0:
        raise AssetsUnavailable(
            f"compiling {source} failed ({compiler} exited {code}; a static build needs "
            f"libc6-dev); the end of {log}:\n{tail(log)}"
        )
    say(out, f"compiled pause from {source}")


def _ldflags() -> str:
    """Strip symbols, and stamp the version a release build would report on /version."""
    major, minor, _ = KUBERNETES_VERSION.removeprefix("v").split(".", 2)
    stamp = "k8s.io/component-base/version"
    return (
        f"-s -w -X {stamp}.gitVersion={KUBERNETES_VERSION} -X {stamp}.gitMajor={major} "
        f"-X {stamp}.gitMinor={minor} -X {stamp}.gitTreeState=clean"
    )


def _write_module(go: str, work: Path, log: Path, out: TextIO) -> Path:
    """Write go.mod and tools.go of the throwaway module that builds the binaries.

    The module is the same whichever binaries are built (tools.go imports all
    of them), so both cache entries resolve the same dependency versions and
    share compiled packages in the Go build cache. Returns the folder of the
    downloaded `k8s.io/kubernetes` module.
    """
    described = run_logged(
        go,
        ["mod", "download", "-json", f"{_KUBERNETES_MODULE}@{KUBERNETES_VERSION}"],
        work,
        log,
        out,
        f"downloading {_KUBERNETES_MODULE} {KUBERNETES_VERSION}",
        capture=True,
    )
    info = json.loads(described)
    if info.get("Error"):
        raise AssetsUnavailable(f"go mod download {_KUBERNETES_MODULE}: {info['Error']}")
    kubernetes_mod = Path(info["GoMod"]).read_text()
    staging = [
        match[1]
        for line in kubernetes_mod.splitlines()
        if (match := _STAGING_REPLACE.match(line)) is not None
    ]
    if not staging:
        raise AssetsUnavailable(
            f"found no `=> ./staging/...` replace lines in {info['GoMod']}; "
            "the module layout of Kubernetes changed, update kubelock.testing.assets"
        )
    go_line = next(
        (line.split()[1] for line in kubernetes_mod.splitlines() if line.startswith("go ")),
        ".".join(map(str, GO_MINIMUM)),
    )
    replaces = "".join(f"\t{module} => {module} {STAGING_VERSION}\n" for module in staging)
    (work / "go.mod").write_text(
        "// Generated by kubelock.testing.assets: builds the test control plane.\n"
        "module kubelock.local/controlplane\n\n"
        f"go {go_line}\n\n"
        "require (\n"
        f"\t{_KUBERNETES_MODULE} {KUBERNETES_VERSION}\n"
        f"\t{_ETCD_MODULE} {ETCD_VERSION}\n"
        ")\n\n"
        f"replace (\n{replaces})\n"
    )
    imports = "".join(f'\t_ "{package}"\n' for package in (*_PACKAGES, *_NODE_PACKAGES))
    (work / "tools.go").write_text(
        "//go:build tools\n\n"
        "// Package tools keeps the built commands in go.mod for `go mod tidy`.\n"
        f"package tools\n\nimport (\n{imports})\n"
    )
    return Path(info["Dir"])


def _check_etcd_version(go_mod: Path) -> None:
    """Fail if module resolution moved etcd away from the pinned version."""
    pattern = re.compile(rf"^\s*{re.escape(_ETCD_MODULE)}\s+(\S+)", re.MULTILINE)
    match = pattern.search(go_mod.read_text())
    if match is not None and match[1] != ETCD_VERSION:
        raise AssetsUnavailable(
            f"Kubernetes {KUBERNETES_VERSION} needs etcd {match[1]}, but "
            f"kubelock.testing.versions pins {ETCD_VERSION}: update the pin"
        )


def run_logged(
    go: str,
    args: Sequence[str],
    cwd: Path,
    log: Path,
    out: TextIO,
    what: str,
    *,
    capture: bool = False,
) -> str:
    """Run `go args...` in `cwd`, its output appended to `log`; report progress.

    Returns stdout when `capture` is set. Raises `AssetsUnavailable` with the
    tail of the log when the command fails.
    """
    started = time.monotonic()
    with open(log, "ab") as sink:
        sink.write(f"$ go {' '.join(args)}\n".encode())
        sink.flush()
        child = subprocess.Popen(
            [go, *args],
            cwd=cwd,
            stdout=subprocess.PIPE if capture else sink,
            stderr=sink,
        )
        try:
            if capture:
                # `go mod download` prints one small JSON document at the end.
                stdout, _ = child.communicate()
                return_code = child.returncode
            else:
                stdout = b""
                return_code = _wait_reporting(child, log, out, what, started)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if return_code != 0:
        raise AssetsUnavailable(
            f"{what} failed (go {' '.join(args)} exited {return_code}); "
            f"the end of {log}:\n{tail(log)}"
        )
    return stdout.decode()


def _wait_reporting(
    child: subprocess.Popen[bytes], log: Path, out: TextIO, what: str, started: float
) -> int:
    next_report = started + PROGRESS_INTERVAL
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if now >= next_report:
                last = tail(log, lines=1)
                say(out, f"{what}: {now - started:.0f} s elapsed" + (f" ({last})" if last else ""))
                next_report += PROGRESS_INTERVAL


def build_go_command(
    go: str, module: str, version: str, package: str, binary: str, entry: Path, out: TextIO
) -> Path:
    """Build Go ``package`` of ``module@version`` into ``entry/binary``; return its path.

    The way the control plane is built: a throwaway module, ``go mod tidy``,
    ``go build``, in a temporary folder renamed to ``entry`` when complete.
    The caller holds ``entry``'s build lock (:func:`exclusive`), so leftovers
    of interrupted builds can go. Raises `AssetsUnavailable` with the log's end.
    """
    for stale in entry.parent.glob(f".{entry.name}-build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():
        shutil.rmtree(entry)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-build-", dir=entry.parent))
    log = entry.parent / f"{entry.name}.build.log"  # outside `work`: outlives a failure
    log.unlink(missing_ok=True)
    started = time.monotonic()
    say(out, f"building {package} {version} with {go} into {entry}; once per version")
    try:
        (work / "go.mod").write_text(
            f"// Generated by kubelock.testing: builds the tests' {binary}.\n"
            f"module kubelock.local/{binary}\n\n"
            "go 1.23\n\n"
            f"require {module} {version}\n"
        )
        (work / "tools.go").write_text(
            "//go:build tools\n\n"
            "// Package tools keeps the built command in go.mod for `go mod tidy`.\n"
            f'package tools\n\nimport _ "{package}"\n'
        )
        run_logged(go, ["mod", "tidy"], work, log, out, f"resolving {module}")
        run_logged(
            go,
            ["build", "-trimpath", "-ldflags=-s -w", "-o", binary, package],
            work,
            log,
            out,
            f"compiling {binary}",
        )
        log.rename(work / "build.log")
        work.rename(entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(out, f"built {binary} in {time.monotonic() - started:.0f} s: {entry}")
    return entry / binary


def say(out: TextIO, message: str) -> None:
    print(f"kubelock.testing: {message}", file=out, flush=True)


def main(argv: Sequence[str] = ()) -> int:
    """Locate or build the binaries (`node`: the node's) and print their folder."""
    if list(argv) not in ([], ["node"]):
        print("usage: python -m kubelock.testing.assets [node]", file=sys.stderr)
        return 2
    try:
        print(ensure_node_binaries() if argv else ensure_binaries())
    except AssetsUnavailable as error:
        print(f"kubelock.testing: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
