"""A real kube-apiserver and etcd on loopback, for tests.

`ControlPlane` starts etcd (plain http on 127.0.0.1) and kube-apiserver (TLS on
127.0.0.1, RBAC authorization, static-token and ServiceAccount-token
authentication) on free ports, with every file in one work folder: a CA made
for this run, the serving certificate, the ServiceAccount signing key, the
token file, the etcd data and the two logs (`etcd.log`, `kube-apiserver.log`).

Identities: `admin_token` belongs to `admin` in `system:masters`; the spare
static users `user-1` ... `user-20` (see `spare_users`) have no rights until a
test binds some; ServiceAccount tokens come from the TokenRequest API.

No kube-controller-manager runs, so namespaces are never finalized after a
delete, no `default` ServiceAccount appears in a new namespace, and no token
Secrets are made: create namespaces and ServiceAccounts explicitly and ask the
TokenRequest API for tokens (the helpers here do).

Children are never orphaned. Each runs in its own process group with
PR_SET_PDEATHSIG=SIGKILL, so the kernel kills it when its parent dies, even by
SIGKILL. Linux delivers that signal when the *thread* that started the child
ends, so every child is started from one long-lived helper thread; calling
`start_apiserver()` from a short-lived worker thread is therefore safe.
`stop()` sends SIGTERM to each group, SIGKILL after a grace period, and reaps;
an `atexit` hook does the same if nobody called it.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._logs import tail

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "Identity",
    "IdentityFactory",
    "InClusterFactory",
    "Rule",
    "process_alive",
]

Rule = Mapping[str, Any]
"""An RBAC PolicyRule, e.g. `{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
"verbs": ["get"]}`."""

SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc"
SERVING_NAMES: Final = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
SERVICE_CIDR: Final = "10.0.0.0/24"
"""The Services' ClusterIP range; the `kubernetes` Service gets its first address."""
SPARE_USERS: Final = 20
STOP_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a process."""

_LOOPBACK: Final = "127.0.0.1"
_ADMIN: Final = "admin"
_SA_PREFIX: Final = "system:serviceaccount:"
_PR_SET_PDEATHSIG: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child must not dlopen


class ControlPlaneError(RuntimeError):
    """The control plane failed to start, or a call to it failed."""


@dataclass(frozen=True)
class Identity:
    """A client identity with the rights of one Role in one namespace."""

    username: str
    token: str
    kubeconfig: Path
    """A kubeconfig for this identity, its context's namespace set to `namespace`."""
    namespace: str


class IdentityFactory(Protocol):
    """The `identity` fixture: a fresh identity holding `rules` in `namespace`."""

    def __call__(self, rules: Sequence[Rule], namespace: str | None = None) -> Identity: ...


class InClusterFactory(Protocol):
    """The `in_cluster` fixture: the environment of a Pod running as `service_account`."""

    def __call__(
        self, namespace: str, service_account: str, rules: Sequence[Rule]
    ) -> dict[str, str]: ...


class ControlPlane:
    """etcd and kube-apiserver on loopback; see the module docstring.

    Use as a context manager, or call `start()` and `stop()`. Blocking calls
    only: from trio, wrap the slow ones (`start*`, `stop*`) in
    `trio.to_thread.run_sync`.
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        startup_timeout: float = 60.0,
        address: str = _LOOPBACK,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        """Prepare, without starting anything.

        `bin_dir` defaults to `ensure_binaries()`. `workdir` is kept after
        `stop()` when given (useful for its logs); otherwise a temporary folder
        is made and removed. `address` is where kube-apiserver listens and
        what it advertises (loopback; the single-node cluster gives an address
        its Pods can reach, and then the `kubernetes` Service's endpoints are
        maintained). `apiserver_args` are appended to kube-apiserver's flags.
        """
        if bin_dir is None:
            # Imported here so that `python -m kubelock.testing.assets` runs a fresh module.
            from .assets import ensure_binaries

            bin_dir = ensure_binaries()
        self._bin_dir = bin_dir
        self._owns_workdir = workdir is None
        self._workdir = (
            Path(tempfile.mkdtemp(prefix="kubelock-controlplane-")) if workdir is None else workdir
        )
        self._startup_timeout = startup_timeout
        self._address = address
        self._apiserver_args = list(apiserver_args)
        self._prepared = False
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._started_pids: list[int] = []
        self._admin_token = secrets.token_urlsafe(32)
        self._spare_users = {
            f"user-{n}": secrets.token_urlsafe(32) for n in range(1, SPARE_USERS + 1)
        }
        self._etcd_port = 0
        self._etcd_peer_port = 0
        self._port = 0
        self._ssl: ssl.SSLContext | None = None
        self._names = 0
        self.start_seconds = 0.0
        """How long the last `start()` took, until /readyz answered ok."""

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start etcd and kube-apiserver and wait until the API server is ready."""
        if self.pids:
            raise ControlPlaneError("the control plane is already running")
        started = time.monotonic()
        try:
            self.start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop both processes (SIGTERM, SIGKILL after a grace period) and reap them.

        Removes the work folder unless the caller gave it. Safe to call twice.
        """
        atexit.unregister(self.stop)
        self.stop_apiserver()
        self.stop_etcd()
        shutil.rmtree(self._workdir / "etcd-data", ignore_errors=True)  # tens of MB
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._prepared = False  # a later start() makes everything anew

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start_etcd(self) -> None:
        """Start etcd (same ports and data as before, if restarting); wait until healthy.

        If the API server is running, also wait until it is ready again.
        """
        if self._etcd is not None and self._etcd.poll() is None:
            raise ControlPlaneError("etcd is already running")
        self._prepare()
        peer = f"http://{_LOOPBACK}:{self._etcd_peer_port}"
        self._etcd = self._spawn(
            "etcd",
            [
                "--name=kubelock-test",
                f"--data-dir={self._workdir / 'etcd-data'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=kubelock-test={peer}",
                "--unsafe-no-fsync",  # the data lives as long as the test run
                "--log-level=warn",
            ],
        )
        self._wait_until("etcd", self._etcd, self._etcd_healthy)
        if self._apiserver is not None:
            self._wait_until("kube-apiserver", self._apiserver, self._apiserver_ready)

    def stop_etcd(self) -> None:
        """Stop etcd; the API server keeps running and its storage calls hang, then fail.

        etcd's SIGTERM path waits for its clients' streams, which the API server
        never ends, so with the API server up etcd gets SIGKILL after 1 s.
        Its data survives either way (only the machine crashing could lose it).
        """
        process, self._etcd = self._etcd, None
        if process is not None:
            terminate(process, grace=1.0 if self._apiserver is not None else STOP_GRACE)

    def start_apiserver(self) -> None:
        """Start kube-apiserver (same port and certificates, if restarting); wait for /readyz."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            raise ControlPlaneError("kube-apiserver is already running")
        if self._etcd is None or self._etcd.poll() is not None:
            raise ControlPlaneError("start etcd before kube-apiserver")
        work = self._workdir
        self._apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--bind-address={self._address}",
                f"--advertise-address={self._address}",
                f"--secure-port={self._port}",
                f"--etcd-servers={self.etcd_url}",
                f"--cert-dir={work / 'apiserver-certs'}",
                f"--tls-cert-file={work / 'serving.crt'}",
                f"--tls-private-key-file={work / 'serving.key'}",
                f"--client-ca-file={self.ca_file}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={work / 'tokens.csv'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={work / 'service-account.pub'}",
                f"--service-account-signing-key-file={work / 'service-account.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # On loopback no Pod could use the kubernetes Service's endpoints.
                f"--endpoint-reconciler-type={'none' if self._address == _LOOPBACK else 'lease'}",
                "--profiling=false",
                *self._apiserver_args,
            ],
        )
        self._wait_until("kube-apiserver", self._apiserver, self._apiserver_ready)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver; clients get connection errors until `start_apiserver()`."""
        process, self._apiserver = self._apiserver, None
        if process is not None:
            terminate(process)

    # -- where and who -------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's https URL."""
        return f"https://{self._address}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def etcd_url(self) -> str:
        return f"http://{_LOOPBACK}:{self._etcd_port}"

    @property
    def ca_file(self) -> Path:
        """The PEM file of this run's CA, which signed the serving certificate."""
        return self._workdir / "ca.crt"

    @property
    def workdir(self) -> Path:
        """Certificates, keys, tokens, etcd data and the logs of both processes."""
        return self._workdir

    @property
    def bin_dir(self) -> Path:
        """The folder of the kube-apiserver, etcd (and kubectl) binaries in use."""
        return self._bin_dir

    @property
    def admin_token(self) -> str:
        """The bearer token of `admin`, a member of `system:masters`."""
        return self._admin_token

    @property
    def spare_users(self) -> Mapping[str, str]:
        """Token of each static user `user-1` ... `user-20`; no rights until bound."""
        return dict(self._spare_users)

    @property
    def pids(self) -> dict[str, int]:
        """The pid of each running process, by name (`etcd`, `kube-apiserver`).

        A process that stopped on its own is missing, and `start_*` starts it again.
        """
        started = {"etcd": self._etcd, "kube-apiserver": self._apiserver}
        return {
            name: process.pid
            for name, process in started.items()
            if process is not None and process.poll() is None
        }

    @property
    def started_pids(self) -> list[int]:
        """Every pid this control plane ever started, restarts included."""
        return list(self._started_pids)

    def leftover_pids(self) -> list[int]:
        """Pids this control plane started that are still alive (after `stop()`: none)."""
        return [pid for pid in self._started_pids if process_alive(pid)]

    # -- clients -------------------------------------------------------------

    def write_kubeconfig(
        self,
        path: Path,
        *,
        token: str | None = None,
        namespace: str | None = None,
        context_name: str = "kubelock-test",
    ) -> Path:
        """Write a kubeconfig (JSON, which is YAML) for `token` (default: admin); return `path`."""
        context: dict[str, str] = {"cluster": "kubelock-test", "user": context_name}
        if namespace is not None:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubelock-test",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(
                            self.ca_file.read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": context_name, "user": {"token": token or self._admin_token}}],
            "contexts": [{"name": context_name, "context": context}],
            "current-context": context_name,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as admin (the built one, else the one on PATH); capture its output.

        Raises `ControlPlaneError` with kubectl's stderr when it fails and `check` is set.
        """
        kubectl = self._bin_dir / "kubectl"
        command = str(kubectl) if kubectl.is_file() else shutil.which("kubectl")
        if command is None:
            raise ControlPlaneError(f"no kubectl in {self._bin_dir} nor on PATH")
        kubeconfig = self._workdir / "admin.kubeconfig"
        if not kubeconfig.exists():
            self.write_kubeconfig(kubeconfig)
        result = subprocess.run(
            [command, f"--kubeconfig={kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def client(self, token: str | None = None, *, timeout: float = 30.0) -> httpx.Client:
        """A sync httpx client for the API server, authenticated by `token` (or none)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(
            base_url=self.server,
            verify=self._ssl_context(),
            headers=headers,
            timeout=timeout,
            trust_env=False,  # never send loopback traffic to an HTTP proxy
        )

    def admin_client(self) -> httpx.Client:
        """A sync httpx client authenticated as admin (`system:masters`)."""
        return self.client(self._admin_token)

    # -- objects -------------------------------------------------------------

    def create_namespace(self, name: str) -> dict[str, Any]:
        """Create a namespace (no controller will ever finalize its deletion)."""
        return self._admin_call(
            "POST", "/api/v1/namespaces", {"metadata": {"name": name}}, expect=201
        )

    def create_service_account(
        self, namespace: str, name: str, *, exist_ok: bool = False
    ) -> dict[str, Any]:
        """Create a ServiceAccount (no `default` one exists: no controller makes it)."""
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        if exist_ok:
            with self.admin_client() as client:
                found = client.get(f"{path}/{name}")
            if found.status_code == 200:
                result: dict[str, Any] = found.json()
                return result
        return self._admin_call("POST", path, {"metadata": {"name": name}}, expect=201)

    def request_token(
        self, namespace: str, service_account: str, expiration_seconds: int = 3600
    ) -> str:
        """A token for the ServiceAccount from the TokenRequest API (at least 600 s)."""
        review = self._admin_call(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
            expect=201,
        )
        token: str = review["status"]["token"]
        return token

    def grant(self, namespace: str, subject: str, rules: Sequence[Rule]) -> str:
        """Bind a new Role with `rules` to `subject` in `namespace`; return the Role's name.

        `subject` is a username; `system:serviceaccount:NS:NAME` binds that
        ServiceAccount. Returns once the authorizer applies the binding (the
        RBAC authorizer reads through a cache that trails writes slightly).
        """
        name = self._unique_name(f"kubelock-test-{subject}")
        self._admin_call(
            "POST",
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
            {"metadata": {"name": name}, "rules": [dict(rule) for rule in rules]},
            expect=201,
        )
        if subject.startswith(_SA_PREFIX):
            sa_namespace, _, sa_name = subject.removeprefix(_SA_PREFIX).partition(":")
            bound = {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}
        else:
            bound = {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": subject}
        self._admin_call(
            "POST",
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [bound],
            },
            expect=201,
        )
        for rule in rules:
            if rule.get("resources") and rule.get("verbs"):
                self._wait_allowed(namespace, subject, rule)
                break
        return name

    def create_identity(self, namespace: str, rules: Sequence[Rule], folder: Path) -> Identity:
        """A new ServiceAccount in `namespace` holding `rules`, with a token and kubeconfig.

        ServiceAccounts rather than the spare static users: there is no limit
        on how many, and each is fresh. The kubeconfig goes into `folder`.
        """
        name = self._unique_name("identity")
        self.create_service_account(namespace, name)
        username = f"{_SA_PREFIX}{namespace}:{name}"
        self.grant(namespace, username, rules)
        token = self.request_token(namespace, name)
        kubeconfig = self.write_kubeconfig(
            folder / f"{name}.kubeconfig", token=token, namespace=namespace, context_name=name
        )
        return Identity(username=username, token=token, kubeconfig=kubeconfig, namespace=namespace)

    def in_cluster_environment(
        self, namespace: str, service_account: str, folder: Path
    ) -> dict[str, str]:
        """Make `folder` look like a Pod's service-account mount; return the Pod's variables.

        Writes `token` (from the TokenRequest API; the ServiceAccount must
        exist), `ca.crt` and `namespace`. The returned variables are only the
        in-cluster ones: merge them into the child's environment.
        """
        token = self.request_token(namespace, service_account)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(token)
        shutil.copyfile(self.ca_file, folder / "ca.crt")
        (folder / "namespace").write_text(namespace)
        return {
            "KUBERNETES_SERVICE_HOST": self._address,
            "KUBERNETES_SERVICE_PORT": str(self._port),
            "KUBELOCK_SERVICEACCOUNT_DIR": str(folder),
        }

    # -- internals -----------------------------------------------------------

    def _prepare(self) -> None:
        """Pick ports and write certificates, keys and tokens, once per control plane."""
        if self._prepared:
            return
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._etcd_port, self._etcd_peer_port, self._port = free_ports(3)
        _write_pki(self._workdir, self._address)
        users = [(self._admin_token, _ADMIN, "system:masters")]
        users += [(token, name, "") for name, token in self._spare_users.items()]
        (self._workdir / "tokens.csv").write_text(
            "".join(
                f'{token},{name},{name},"{groups}"\n' if groups else f"{token},{name},{name}\n"
                for token, name, groups in users
            )
        )
        self._prepared = True

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = self._workdir / f"{name}.log"
        argv = [str(self._bin_dir / name), *args]
        atexit.register(self.stop)  # the safety net; registering twice is harmless
        process = Spawner.start(argv, log)
        self._started_pids.append(process.pid)
        return process

    def _wait_until(
        self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]
    ) -> None:
        log = self._workdir / f"{name}.log"
        wait_until_ready(name, process, ready, log, self._startup_timeout, ControlPlaneError)

    def _etcd_healthy(self) -> bool:
        try:
            answer = httpx.get(f"{self.etcd_url}/health", timeout=2.0, trust_env=False)
        except httpx.TransportError:
            return False
        return answer.status_code == 200 and answer.json().get("health") == "true"

    def _apiserver_ready(self) -> bool:
        try:
            answer = httpx.get(
                f"{self.server}/readyz", verify=self._ssl_context(), timeout=2.0, trust_env=False
            )
        except httpx.TransportError:
            return False
        return answer.status_code == 200

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def _admin_call(
        self, method: str, path: str, body: Mapping[str, Any], *, expect: int
    ) -> dict[str, Any]:
        with self.admin_client() as client:
            answer = client.request(method, path, json=body)
        if answer.status_code != expect:
            raise ControlPlaneError(
                f"{method} {path}: {answer.status_code} {_status_message(answer)}"
            )
        result: dict[str, Any] = answer.json()
        return result

    def _wait_allowed(self, namespace: str, subject: str, rule: Rule) -> None:
        resource, _, subresource = str(rule["resources"][0]).partition("/")
        attributes = {
            "namespace": namespace,
            "verb": rule["verbs"][0],
            "group": (rule.get("apiGroups") or [""])[0],
            "resource": resource,
            "subresource": subresource,
            "name": (rule.get("resourceNames") or [""])[0],
        }
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": subject, "resourceAttributes": attributes},
        }
        deadline = time.monotonic() + 10.0
        while True:
            answer = self._admin_call(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review, expect=201
            )
            if answer["status"].get("allowed"):
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"RBAC did not apply the binding of {subject} in {namespace} within 10 s"
                )
            time.sleep(0.02)

    def _unique_name(self, base: str) -> str:
        self._names += 1
        slug = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:40]
        return f"{slug}-{self._names}-{secrets.token_hex(2)}"


def wait_until_ready(
    name: str,
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    log: Path,
    timeout: float,
    error: type[Exception],
) -> None:
    """Poll `ready` until true; raise `error` with the end of `log` if `process` exits or
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise error(
                f"{name} exited with status {process.returncode} while starting; "
                f"the end of {log}:\n{tail(log, lines=40)}"
            )
        if time.monotonic() > deadline:
            raise error(
                f"{name} was not ready after {timeout:.0f} s; "
                f"the end of {log}:\n{tail(log, lines=40)}"
            )
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesized command name, which may hold spaces.
    return stat[stat.rindex(")") + 2] != "Z"


# -- processes ---------------------------------------------------------------


class Spawner:
    """The one thread that starts children; a daemon, it lives as long as the process.

    PR_SET_PDEATHSIG fires when the starting *thread* exits, so a child started
    from a short-lived thread would die with it.
    """

    _instance: Spawner | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[list[str], Path, concurrent.futures.Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        threading.Thread(
            target=self._serve, name="kubelock-controlplane-spawner", daemon=True
        ).start()

    @classmethod
    def start(cls, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        cls._instance._jobs.put((argv, log_path, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            argv, log_path, future = self._jobs.get()
            try:
                future.set_result(_start_child(argv, log_path))
            except BaseException as error:
                future.set_exception(error)


def _start_child(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child between fork and exec
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=die_with_parent,
        )


def terminate(process: subprocess.Popen[bytes], *, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds, reap the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # anything the leader left in its group
        os.killpg(process.pid, signal.SIGKILL)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (free now; the children bind them right after)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((_LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def answers_ready(child: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """True once GET `url` answers 200; False when `child` exited first.

    Raises `TimeoutError` when neither happened within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                return False
            with contextlib.suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return True
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s")


def _status_message(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)


# -- certificates ------------------------------------------------------------


def _write_pki(folder: Path, address: str) -> None:
    """Write this run's CA, the serving certificate and the ServiceAccount key pair.

    The serving certificate names loopback, `address` and the `kubernetes`
    Service's ClusterIP (the first address of `SERVICE_CIDR`).
    """
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_until = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubelock test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    serving_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVING_NAMES]
    service_ip = next(ipaddress.ip_network(SERVICE_CIDR).hosts())
    for ip in dict.fromkeys([_LOOPBACK, address, str(service_ip)]):
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    serving_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(serving_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(serving_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    signing_key = ec.generate_private_key(ec.SECP256R1())

    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "serving.crt").write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(folder / "serving.key", serving_key)
    _write_private_key(folder / "service-account.key", signing_key)
    (folder / "service-account.pub").write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
