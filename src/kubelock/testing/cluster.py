"""A real single-node Kubernetes cluster on this machine, for the end-to-end tests.

`Cluster` runs, from binaries, what `hack/local-up-cluster.sh` runs:

- etcd and kube-apiserver: a `ControlPlane` listening on the host end of a
  veth pair, so that the node and its Pods reach it;
- kube-controller-manager (ServiceAccounts and their token controller, the
  root CA publisher, Deployments, ReplicaSets, garbage collection, ...) and
  kube-scheduler, on the host, serving on loopback only;
- containerd (with runc and the CNI `bridge` plugin), the kubelet and
  kube-proxy (iptables mode) inside a network namespace of their own,
  `kubelock-<id>`, so that the bridge, the Pods' routes and every iptables
  chain they add live and die with it; the host only gets a route to the Pod
  network through the veth pair, which goes away with the namespace.

The Kubernetes binaries come from `assets.ensure_binaries()` (control plane)
and `assets.ensure_node_binaries()` (node components and `pause`, built into a
cache entry of their own); containerd, runc, the CNI plugins, iptables and
conntrack from Debian's packages (`scripts/cluster-tools` installs them).
Nothing is pulled: the sandbox image is made here from the built `pause`, and
the tests import their images with `load_image()`.

It needs root, cgroups and overlayfs, as any node does. On cgroup v1 the
kubelet runs with `failCgroupV1: false` and the `cgroupfs` driver; every Pod
cgroup lives under one cgroup root per cluster, `/kubelock-<id>`. containerd
runs with `restrict_oom_score_adj` because the capability bounding set here
may lack CAP_SYS_RESOURCE.

`stop()` stops everything it started and removes what the cluster made:
containers and their shims, mounts under the work folder and the Pods'
network namespaces, the node's network namespace (its veth, bridge, routes and
iptables chains), the cgroups, CNI state and the kubelet's `/var/log/containers`
links, and restores the three kernel settings the kubelet changes.
`leftovers()` lists whatever is still there; the tests assert it is empty.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import httpx

from .controlplane import (
    SERVICE_CIDR,
    ControlPlane,
    ControlPlaneError,
    Spawner,
    free_ports,
    process_alive,
    wait_until_ready,
)
from .controlplane import terminate as terminate_group

__all__ = [
    "NODE_NAME",
    "POD_CIDR",
    "SANDBOX_IMAGE",
    "Cluster",
    "ClusterError",
    "clean_stale",
]

NODE_NAME: Final = "kubelock-node"
POD_CIDR: Final = "10.232.0.0/24"
SANDBOX_IMAGE: Final = "kubelock.local/pause:built"
"""The name the built `pause` program is imported under; containerd's sandbox image."""

HOST_ADDRESS: Final = "10.231.0.1"
"""The host's end of the veth pair: kube-apiserver listens here."""
NODE_ADDRESS: Final = "10.231.0.2"
"""The node's end, in its network namespace: the kubelet's and kube-proxy's address."""
_LINK_PREFIX: Final = 24

_TOOLS: Final = ("containerd", "runc", "ctr", "iptables", "conntrack", "nsenter", "ip")
_CNI_DIRS: Final = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
_KERNEL_SETTINGS: Final = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
"""What the kubelet sets on start (protectKernelDefaults off); restored on stop."""
_STATE_FILE: Final = "cluster-state.json"
_SHARED_PATHS: Final = (
    Path("/run/netns"),  # the Pods' network namespaces, made by containerd's CRI
    Path("/var/lib/cni"),  # CNI's result cache
    Path("/var/log/containers"),  # the kubelet's links to container logs
)
"""Host folders outside the work folder where the cluster leaves entries. (Not
`/run/containerd/s`: the shims' sockets there may be a Docker engine's too, and
ours remove theirs when their task is deleted.)"""


class ClusterError(RuntimeError):
    """The cluster could not start, or a call to it failed."""


@dataclass
class _Process:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class _HostState:
    """What was there before the cluster started, to tell its leftovers apart."""

    entries: dict[Path, set[str]] = field(default_factory=dict)
    """The entries of each of `_SHARED_PATHS`."""
    existed: set[Path] = field(default_factory=set)
    """Which of `_SHARED_PATHS` existed."""
    kernel: dict[str, str] = field(default_factory=dict)
    chains: set[str] = field(default_factory=set)


class Cluster:
    """One node, Ready; see the module docstring. A context manager, or `start()`/`stop()`."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        bin_dir: Path | None = None,
        node_bin_dir: Path | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        from .assets import ensure_binaries, ensure_node_binaries

        self._bin_dir = ensure_binaries() if bin_dir is None else bin_dir
        self._node_bin_dir = ensure_node_binaries() if node_bin_dir is None else node_bin_dir
        self._owns_workdir = workdir is None
        # Short: containerd's socket path must fit in a sockaddr_un.
        self._workdir = (
            Path(tempfile.mkdtemp(prefix="kubelock-cluster-")) if workdir is None else workdir
        )
        self._set_id(secrets.token_hex(3))
        self._startup_timeout = startup_timeout
        self._processes: list[_Process] = []
        self._started_pids: list[int] = []
        self._before = _HostState()
        self._made_netns = False
        self.control_plane = ControlPlane(
            bin_dir=self._bin_dir,
            workdir=self._workdir / "controlplane",
            startup_timeout=startup_timeout,
            address=HOST_ADDRESS,
            # kubectl logs/exec: the node's address, not its name (no DNS here).
            apiserver_args=["--kubelet-preferred-address-types=InternalIP"],
        )
        self.start_seconds = 0.0
        """How long the last `start()` took, until the node was Ready and Services routed."""
        self.phase_seconds: dict[str, float] = {}
        """Seconds each start-up phase took (network, control plane, containerd, ...)."""

    def _set_id(self, cluster_id: str) -> None:
        self._id = cluster_id
        self.netns = f"kubelock-{cluster_id}"
        self.cgroup_root = f"/kubelock-{cluster_id}"
        self._host_link = f"klh{cluster_id}"
        self._node_link = f"kln{cluster_id}"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start everything and wait until the node is Ready and kube-proxy has synced."""
        check_prerequisites()
        started = time.monotonic()
        atexit.register(self.stop)
        try:
            clean_stale()
            self._phase("host state", self._record_host_state)
            self._phase("network", self._make_network)
            self._phase("control plane", self.control_plane.start)
            self._phase("containerd", self._start_containerd)
            self._phase("sandbox image", self._import_sandbox_image)
            self._phase("controllers", self._start_controllers)
            self._phase("kubelet", self._start_kubelet)
            self._phase("kube-proxy", self._start_kube_proxy)
            self._phase("node ready", self._wait_node_ready)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop everything and remove what the cluster made on the host. Safe to call twice."""
        atexit.unregister(self.stop)
        errors: list[str] = []
        for step in (
            self._stop_node,
            self._stop_containers,
            self._stop_processes,
            self.control_plane.stop,
            self._unmount,
            self._remove_network,
            self._remove_cgroups,
            self._remove_host_entries,
            self._restore_kernel_settings,
        ):
            try:
                step()
            except Exception as error:  # keep cleaning up; report at the end
                errors.append(f"{step.__name__}: {error}")
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        if errors:
            raise ClusterError("stopping the cluster: " + "; ".join(errors))

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

    # -- what tests use ------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (`system:masters`)."""
        return self._workdir / "admin.kubeconfig"

    @property
    def kubectl_binary(self) -> Path:
        return self._bin_dir / "kubectl"

    @property
    def started_pids(self) -> list[int]:
        """Every pid the cluster started directly (the control plane's included)."""
        return [*self._started_pids, *self.control_plane.started_pids]

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 300) -> str:
        """Run kubectl as admin; return stdout. Raises `ClusterError` with stderr on failure."""
        result = subprocess.run(
            [str(self.kubectl_binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    def load_image(self, archive: Path | None = None, *, docker_image: str | None = None) -> None:
        """Import an image archive (`docker save`'s or OCI) into the node's containerd.

        With `docker_image`, pipes `docker save docker_image` into the import.
        """
        if (archive is None) == (docker_image is None):
            raise ValueError("give an archive or a docker image")
        command = [*self._ctr(), "images", "import", "-"]
        if archive is not None:
            with open(archive, "rb") as source:
                _run(command, stdin=source)
            return
        assert docker_image is not None
        save = subprocess.Popen(["docker", "save", docker_image], stdout=subprocess.PIPE)
        try:
            _run(command, stdin=save.stdout)
        finally:
            if save.stdout is not None:
                save.stdout.close()
            if save.wait() != 0:
                raise ClusterError(f"docker save {docker_image} exited {save.returncode}")

    def in_node(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (e.g. curl a Pod's IP)."""
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def leftovers(self) -> list[str]:
        """What the cluster made that is still there; empty after `stop()`."""
        found = [
            f"process {pid} ({_command_name(pid)})"
            for pid in self.started_pids
            if process_alive(pid)
        ]
        found += [f"process {pid} (shim)" for pid in self._shim_pids()]
        found += [f"mount {point}" for point in self._own_mounts()]
        found += [
            f"mount {folder}"
            for folder in self._before.existed ^ set(_SHARED_PATHS)
            if self._before.entries and _is_mount_point(folder)
        ]
        if Path(f"/run/netns/{self.netns}").exists():
            found.append(f"network namespace {self.netns}")
        if _link_exists(self._host_link):
            found.append(f"link {self._host_link}")
        found += [
            f"cgroup {path}"
            for path in _cgroup_hierarchies()
            if (path / self.cgroup_root.lstrip("/")).exists()
        ]
        for folder, before in self._before.entries.items():
            if folder.exists() and folder not in self._before.existed:
                found.append(str(folder))
            else:
                found += [f"{folder}/{name}" for name in sorted(_entries(folder) - before)]
        found += [
            f"iptables chain {chain} (host)" for chain in sorted(_chains() - self._before.chains)
        ]
        for setting, value in self._before.kernel.items():
            if _read_kernel(setting) != value:
                found.append(f"/proc/sys/{setting} is {_read_kernel(setting)}, was {value}")
        if self._owns_workdir and self._workdir.exists():
            found.append(f"work folder {self._workdir}")
        return found

    # -- start-up ------------------------------------------------------------

    def _phase(self, name: str, step: Any) -> None:
        started = time.monotonic()
        step()
        self.phase_seconds[name] = time.monotonic() - started

    def _record_host_state(self) -> None:
        self._before = _HostState(
            entries={folder: _entries(folder) for folder in _SHARED_PATHS},
            kernel={setting: _read_kernel(setting) for setting in _KERNEL_SETTINGS},
            existed={folder for folder in _SHARED_PATHS if folder.exists()},
            chains=_chains(),
        )
        # What `clean_stale()` needs if this process dies without `stop()`.
        self._workdir.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "id": self._id,
            "bin_dir": str(self._bin_dir),
            "node_bin_dir": str(self._node_bin_dir),
            "entries": {
                str(folder): sorted(names) for folder, names in self._before.entries.items()
            },
            "existed": [str(folder) for folder in self._before.existed],
            "kernel": self._before.kernel,
        }
        (self._workdir / _STATE_FILE).write_text(json.dumps(state))

    def _adopt(self, state: dict[str, Any]) -> None:
        """Take over what a dead process's cluster left, from its state file."""
        self._set_id(state["id"])
        self._made_netns = True
        self._before = _HostState(
            entries={Path(folder): set(names) for folder, names in state["entries"].items()},
            existed={Path(folder) for folder in state["existed"]},
            kernel=state["kernel"],
        )

    def _make_network(self) -> None:
        for address in (HOST_ADDRESS, NODE_ADDRESS):
            if _address_in_use(address):
                raise ClusterError(
                    f"{address} is already on an interface of this machine: another "
                    "kubelock test cluster is running (one at a time; those of dead "
                    "processes are cleaned up first), or stop what uses "
                    f"10.231.0.0/{_LINK_PREFIX}"
                )
        _run(["ip", "netns", "add", self.netns])
        self._made_netns = True
        host, node = self._host_link, self._node_link
        _run(["ip", "link", "add", host, "type", "veth", "peer", "name", node])
        _run(["ip", "link", "set", node, "netns", self.netns])
        _run(["ip", "addr", "add", f"{HOST_ADDRESS}/{_LINK_PREFIX}", "dev", host])
        _run(["ip", "link", "set", host, "up"])
        inside = ["ip", "netns", "exec", self.netns]
        _run([*inside, "ip", "addr", "add", f"{NODE_ADDRESS}/{_LINK_PREFIX}", "dev", node])
        _run([*inside, "ip", "link", "set", node, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        _run([*inside, "ip", "route", "add", "default", "via", HOST_ADDRESS])
        _run([*inside, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        with contextlib.suppress(ClusterError):  # per namespace on recent kernels only
            _run([*inside, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
        # Replies to Pods and requests to Pod IPs go through the node; this
        # route goes away with the veth pair.
        _run(["ip", "route", "add", POD_CIDR, "via", NODE_ADDRESS, "dev", host])

    def _start_containerd(self) -> None:
        root = self._workdir / "containerd"
        for sub in ("root", "state", "opt", "runc", "net.d"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        cni_bin = next((folder for folder in _CNI_DIRS if (folder / "bridge").exists()), None)
        assert cni_bin is not None  # check_prerequisites
        conflist = {
            "cniVersion": "0.4.0",
            "name": "kubelock",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "kubelock0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self._workdir / "cni-ipam"),
                    },
                },
                # The node's namespace has its own, empty, FORWARD chain; with a
                # Docker engine's DROP policy (host namespace) this plugin is what
                # lets Pod traffic through.
                {"type": "firewall", "backend": "iptables"},
            ],
        }
        (root / "net.d" / "10-kubelock.conflist").write_text(json.dumps(conflist, indent=2))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (root / "config.toml").write_text(
            "version = 2\n"
            f'root = "{root / "root"}"\n'
            f'state = "{root / "state"}"\n'
            "[grpc]\n"
            f'  address = "{self._containerd_socket}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{root / "opt"}"\n'
            f"[{cri}]\n"
            f'  sandbox_image = "{SANDBOX_IMAGE}"\n'
            "  restrict_oom_score_adj = true\n"
            "  netns_mounts_under_state_dir = true\n"
            '  stream_server_address = "127.0.0.1"\n'
            '  stream_server_port = "0"\n'
            f"[{cri}.containerd]\n"
            '  snapshotter = "overlayfs"\n'
            '  default_runtime_name = "runc"\n'
            f"[{cri}.containerd.runtimes.runc]\n"
            '  runtime_type = "io.containerd.runc.v2"\n'
            f"[{cri}.containerd.runtimes.runc.options]\n"
            "  SystemdCgroup = false\n"
            f'  Root = "{root / "runc"}"\n'
            f"[{cri}.cni]\n"
            f'  bin_dir = "{cni_bin}"\n'
            f'  conf_dir = "{root / "net.d"}"\n'
        )
        process = self._spawn(
            "containerd",
            [shutil.which("containerd") or "containerd", f"--config={root / 'config.toml'}"],
            in_node=True,
        )
        self._wait_for("containerd", process, self._containerd_ready)

    @property
    def _containerd_socket(self) -> Path:
        return self._workdir / "containerd" / "containerd.sock"

    def _ctr(self) -> list[str]:
        return ["ctr", f"--address={self._containerd_socket}", "--namespace=k8s.io"]

    def _containerd_ready(self) -> bool:
        if not self._containerd_socket.exists():
            return False
        probe = subprocess.run(
            [*self._ctr(), "plugins", "ls"], capture_output=True, text=True, check=False
        )
        return probe.returncode == 0 and any(
            line.split()[:2] == ["io.containerd.grpc.v1", "cri"] and line.split()[-1] == "ok"
            for line in probe.stdout.splitlines()
            if line.strip()
        )

    def _import_sandbox_image(self) -> None:
        archive = self._workdir / "pause.oci.tar"
        archive.write_bytes(oci_archive(self._node_bin_dir / "pause", SANDBOX_IMAGE, ["/pause"]))
        self.load_image(archive)

    def _start_controllers(self) -> None:
        self.control_plane.write_kubeconfig(self.kubeconfig)
        plane = self.control_plane.workdir
        manager_port, scheduler_port = free_ports(2)

        def common(port: int) -> list[str]:
            """As admin; /healthz on loopback only; one instance, so no leader election."""
            kubeconfig = self.kubeconfig
            return [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
            ]

        manager = self._spawn(
            "kube-controller-manager",
            [
                str(self._node_bin_dir / "kube-controller-manager"),
                *common(manager_port),
                f"--service-account-private-key-file={plane / 'service-account.key'}",
                f"--root-ca-file={self.control_plane.ca_file}",
                "--use-service-account-credentials=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*",
                "--concurrent-deployment-syncs=2",
                "--concurrent-replicaset-syncs=2",
            ],
        )
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(self._node_bin_dir / "kube-scheduler"),
                *common(scheduler_port),
            ],
        )
        self._wait_for("kube-controller-manager", manager, self._healthz(manager_port))
        self._wait_for("kube-scheduler", scheduler, self._healthz(scheduler_port))

    def _start_kubelet(self) -> None:
        root = self._workdir / "kubelet"
        root.mkdir(exist_ok=True)
        for hierarchy in _cgroup_hierarchies():
            own = hierarchy / self.cgroup_root.lstrip("/")
            own.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset cgroup starts empty
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (own / name).write_text((hierarchy / name).read_text())
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_ADDRESS,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self._containerd_socket}",
            "podLogsDir": str(self._workdir / "pod-logs"),
            "volumePluginDir": str(root / "volume-plugins"),
            "clusterDomain": "cluster.local",
            # No name service for the Pods: nothing they run may query one off this machine.
            "resolvConf": "",
            "serializeImagePulls": False,
            # A shared test machine: evict only when really short.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
        }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        kubelet = self._spawn(
            "kubelet",
            [
                str(self._node_bin_dir / "kubelet"),
                f"--config={root / 'config.json'}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_ADDRESS}",
                "--v=1",
            ],
            in_node=True,
        )
        self._wait_for("kubelet", kubelet, self._node_registered)

    def _start_kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_ADDRESS,
            "healthzBindAddress": f"{NODE_ADDRESS}:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Per-namespace conntrack settings are read-only: leave them alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        path = self._workdir / "kube-proxy.json"
        path.write_text(json.dumps(config, indent=2))
        proxy = self._spawn(
            "kube-proxy",
            [str(self._node_bin_dir / "kube-proxy"), f"--config={path}", "--v=1"],
            in_node=True,
        )
        self._wait_for("kube-proxy", proxy, self._proxy_synced)

    def _wait_node_ready(self) -> None:
        kubelet = self._process("kubelet")
        self._wait_for("kubelet", kubelet, self._node_ready)

    # -- readiness probes ----------------------------------------------------

    def _healthz(self, port: int) -> Callable[[], bool]:
        def probe() -> bool:
            try:
                # A self-signed certificate made in memory; loopback only.
                answer = httpx.get(
                    f"https://127.0.0.1:{port}/healthz",
                    verify=False,  # noqa: S501
                    timeout=2,
                    trust_env=False,
                )
            except httpx.TransportError:
                return False
            return answer.status_code == 200

        return probe

    def _node(self) -> dict[str, Any] | None:
        with self.control_plane.admin_client() as client:
            answer = client.get(f"/api/v1/nodes/{NODE_NAME}")
        if answer.status_code != 200:
            return None
        node: dict[str, Any] = answer.json()
        return node

    def _node_registered(self) -> bool:
        return self._node() is not None

    def _node_ready(self) -> bool:
        node = self._node()
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _proxy_synced(self) -> bool:
        try:
            answer = httpx.get(f"http://{NODE_ADDRESS}:10256/healthz", timeout=2, trust_env=False)
        except httpx.TransportError:
            return False
        return answer.status_code == 200

    # -- processes -----------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], *, in_node: bool = False
    ) -> subprocess.Popen[bytes]:
        if in_node:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        log = self._workdir / f"{name}.log"
        process = Spawner.start(argv, log)
        self._processes.append(_Process(name, process, log))
        self._started_pids.append(process.pid)
        return process

    def _process(self, name: str) -> subprocess.Popen[bytes]:
        return next(p.process for p in self._processes if p.name == name)

    def _wait_for(
        self, name: str, process: subprocess.Popen[bytes], ready: Callable[[], bool]
    ) -> None:
        log = self._workdir / f"{name}.log"
        wait_until_ready(name, process, ready, log, self._startup_timeout, ClusterError)

    # -- clean-up ------------------------------------------------------------

    def _stop_node(self) -> None:
        """Stop the kubelet and kube-proxy first: nothing restarts containers then."""
        for name in ("kubelet", "kube-proxy"):
            for entry in [p for p in self._processes if p.name == name]:
                terminate_group(entry.process)
                self._processes.remove(entry)

    def _stop_containers(self) -> None:
        """Kill every container, then their shims; the Pod sandboxes' netns go in `_unmount`."""
        if self._containerd_running():
            for task in self._tasks():
                subprocess.run(
                    [*self._ctr(), "tasks", "kill", "--signal=SIGKILL", task],
                    capture_output=True,
                    check=False,
                )
            # containerd's CRI deletes a task once it exits, and its shim then ends.
            deadline = time.monotonic() + 10
            while self._tasks() and time.monotonic() < deadline:
                time.sleep(0.1)
        # A shim outlives containerd; ours are told apart by their -address.
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._shim_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Anything still in the Pods' cgroups (a container whose shim died first).
        for hierarchy in _cgroup_hierarchies():
            own = hierarchy / self.cgroup_root.lstrip("/")
            if own.exists():
                for procs in own.rglob("cgroup.procs"):
                    for member in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(member), signal.SIGKILL)

    def _tasks(self) -> list[str]:
        listed = subprocess.run(
            [*self._ctr(), "tasks", "ls", "-q"], capture_output=True, text=True, check=False
        )
        return listed.stdout.split()

    def _containerd_running(self) -> bool:
        return any(p.name == "containerd" and p.process.poll() is None for p in self._processes)

    def _shim_pids(self) -> list[int]:
        socket = str(self._containerd_socket)
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv
            if ours and process_alive(int(proc.name)):
                found.append(int(proc.name))
        return found

    def _stop_processes(self) -> None:
        while self._processes:
            entry = self._processes.pop()
            terminate_group(entry.process)

    def _own_mounts(self) -> list[str]:
        """Mount points under the work folder, and the Pods' netns made since start."""
        netns = Path("/run/netns")
        new_netns = {
            str(netns / name) for name in _entries(netns) - self._before.entries.get(netns, set())
        }
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = _unescape(line.split()[4])
            if point.startswith(f"{self._workdir}/") or point in new_netns:
                found.append(point)
        return found

    def _unmount(self) -> None:
        for point in reversed(self._own_mounts()):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _remove_network(self) -> None:
        if self._made_netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
            self._made_netns = False
        if _link_exists(self._host_link):
            subprocess.run(["ip", "link", "del", self._host_link], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            own = hierarchy / self.cgroup_root.lstrip("/")
            if not own.exists():
                continue
            deadline = time.monotonic() + 10
            inner = sorted(
                (p for p in own.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            )
            for folder in [*inner, own]:
                while True:
                    try:
                        folder.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:  # busy: its last process is still exiting
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)

    def _remove_host_entries(self) -> None:
        for folder, before in self._before.entries.items():
            for name in _entries(folder) - before:
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if folder.exists() and folder not in self._before.existed:
                if _is_mount_point(folder):  # `ip netns add` bind-mounts /run/netns
                    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
                shutil.rmtree(folder, ignore_errors=True)

    def _restore_kernel_settings(self) -> None:
        for setting, value in self._before.kernel.items():
            if _read_kernel(setting) != value:
                Path("/proc/sys", setting).write_text(value)


# -- host helpers --------------------------------------------------------------


def clean_stale() -> list[Path]:
    """Stop and remove the clusters whose process died without `stop()` (SIGKILL, a crash).

    Its containers' shims outlive it, and so do its mounts, network namespace
    and cgroups: found by the state file in each default work folder
    (`$TMPDIR/kubelock-cluster-*`) whose process is gone. Returns their folders.
    """
    cleaned = []
    for state_file in sorted(Path(tempfile.gettempdir()).glob(f"kubelock-cluster-*/{_STATE_FILE}")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if process_alive(int(state["pid"])):
            continue
        folder = state_file.parent
        stale = Cluster(
            workdir=folder,
            bin_dir=Path(state["bin_dir"]),
            node_bin_dir=Path(state["node_bin_dir"]),
        )
        stale._adopt(state)
        with contextlib.suppress(ClusterError):
            stale.stop()
        shutil.rmtree(folder, ignore_errors=True)
        cleaned.append(folder)
    return cleaned


def check_prerequisites() -> None:
    """Raise `ClusterError` saying what to install or change when the node cannot run."""
    if os.geteuid() != 0:
        raise ClusterError("the local cluster needs root (containerd, mounts, network namespaces)")
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if not any((folder / "bridge").exists() for folder in _CNI_DIRS):
        missing.append("the CNI plugins")
    if missing:
        raise ClusterError(
            f"the local cluster needs {', '.join(missing)}: run scripts/cluster-tools "
            "(as root it installs Debian's containerd, runc, containernetworking-plugins, "
            "iptables and conntrack)"
        )
    if not _cgroup_hierarchies():
        raise ClusterError(f"no cgroup hierarchy under {_CGROUP_ROOT}")


def oci_archive(binary: Path, name: str, entrypoint: Sequence[str]) -> bytes:
    """An OCI image archive of one static `binary` at `/<its name>`, tagged `name`."""
    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = layer.gettarinfo(str(binary), arcname=binary.name)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        with open(binary, "rb") as program:
            layer.addfile(info, program)
    layer_bytes = layer_buffer.getvalue()
    layer_digest = _digest(layer_bytes)
    config = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": list(entrypoint)},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    )
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer_bytes),
                }
            ],
        }
    )
    index = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                    },
                }
            ],
        }
    )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        files = {
            "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
            "index.json": index,
            **{
                f"blobs/sha256/{_digest(blob).removeprefix('sha256:')}": blob
                for blob in (layer_bytes, config, manifest)
            },
        }
        for path, content in files.items():
            entry = tarfile.TarInfo(path)
            entry.size = len(content)
            archive.addfile(entry, io.BytesIO(content))
    return out.getvalue()


def _canonical(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _digest(blob: bytes) -> str:
    return f"sha256:{hashlib.sha256(blob).hexdigest()}"


def _run(argv: Sequence[str], *, stdin: Any = None) -> str:
    result = subprocess.run(
        list(argv), stdin=stdin, capture_output=True, text=stdin is None, check=False
    )
    if result.returncode != 0:
        error = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
        raise ClusterError(f"{' '.join(argv)} exited {result.returncode}: {error.strip()}")
    out = result.stdout
    return out if isinstance(out, str) else out.decode()


def _entries(folder: Path) -> set[str]:
    try:
        return {entry.name for entry in folder.iterdir()}
    except FileNotFoundError:
        return set()


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (and the v2 one) mounted under /sys/fs/cgroup."""
    if (_CGROUP_ROOT / "cgroup.controllers").exists():  # pure v2
        return [_CGROUP_ROOT]
    return sorted(
        path
        for path in _CGROUP_ROOT.iterdir()
        if path.is_dir() and not path.is_symlink() and (path / "cgroup.procs").exists()
    )


def _read_kernel(setting: str) -> str:
    return Path("/proc/sys", setting).read_text().strip()


def _chains() -> set[str]:
    """iptables chains of the host's network namespace, as `table/chain`."""
    found: set[str] = set()
    for table in ("filter", "nat", "mangle"):
        listed = subprocess.run(
            ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=False
        )
        found |= {
            f"{table}/{line.split()[1]}"
            for line in listed.stdout.splitlines()
            if line.startswith("-N ")
        }
    return found


def _address_in_use(address: str) -> bool:
    shown = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=False
    )
    return f" {address}/" in shown.stdout


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _is_mount_point(path: Path) -> bool:
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(_unescape(line.split()[4]) == str(path) for line in mountinfo)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape")


@contextlib.contextmanager
def running_cluster(**options: Any) -> Iterator[Cluster]:
    """A started `Cluster`, stopped on exit."""
    cluster = Cluster(**options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> int:
    """Start a cluster, print where its kubeconfig is and the start-up time, stop on Ctrl-C."""
    try:
        with running_cluster() as cluster:
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in cluster.phase_seconds.items())
            print(
                f"kubelock.testing.cluster: node Ready in {cluster.start_seconds:.1f} s ({phases})"
            )
            print(f"export KUBECONFIG={cluster.kubeconfig}  # Ctrl-C stops the cluster")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except (ClusterError, ControlPlaneError) as error:
        print(f"kubelock.testing.cluster: {error}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
