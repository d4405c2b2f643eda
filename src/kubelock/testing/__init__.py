"""A real Kubernetes control plane for kubelock's tests.

`ControlPlane` runs kube-apiserver and etcd on loopback with TLS, RBAC and
token authentication; `kubelock.testing.assets.ensure_binaries()` finds or
builds them (pinned in `kubelock.testing.versions`). The project's own test
harness: it needs the `cryptography` package, and it is left out of the wheel
(`pip install kubelock` carries only the tool).

`kubelock.testing.cluster.Cluster` (imported from there: it is for the
end-to-end tests) adds a node to it: kube-controller-manager, kube-scheduler,
kubelet, kube-proxy and containerd, one node Ready.
"""

from .controlplane import (
    ControlPlane,
    ControlPlaneError,
    Identity,
    IdentityFactory,
    InClusterFactory,
    Rule,
    process_alive,
)

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "Identity",
    "IdentityFactory",
    "InClusterFactory",
    "Rule",
    "process_alive",
]
