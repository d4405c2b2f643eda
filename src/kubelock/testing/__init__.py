"""A real Kubernetes control plane for kubelock's tests.

`ControlPlane` runs kube-apiserver and etcd on loopback with TLS, RBAC and
token authentication; `kubelock.testing.assets.ensure_binaries()` finds or
builds them (pinned in `kubelock.testing.versions`). Test-only: it needs the
`cryptography` package.
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
