"""Every version the test control plane is pinned to, in one place.

Bumping Kubernetes means changing these lines together: the staging modules
(`k8s.io/api`, `k8s.io/client-go`, ...) are released as v0.X.Y beside v1.X.Y,
and etcd is the version that Kubernetes release's own go.mod requires.
The binaries are cached per (Kubernetes, etcd) pair, so a bump rebuilds once.
"""

from typing import Final

__all__ = [
    "ETCD_VERSION",
    "GO_MINIMUM",
    "KUBERNETES_VERSION",
    "PUSHGATEWAY_VERSION",
    "STAGING_VERSION",
]

KUBERNETES_VERSION: Final = "v1.36.3"
"""The `k8s.io/kubernetes` module: kube-apiserver and kubectl."""

STAGING_VERSION: Final = "v0.36.3"
"""The `k8s.io/*` staging modules that Kubernetes replaces with local paths."""

ETCD_VERSION: Final = "v3.6.8"
"""The `go.etcd.io/etcd/server/v3` module required by that Kubernetes release."""

GO_MINIMUM: Final = (1, 26)
"""The oldest Go toolchain that builds them (the `go` line of Kubernetes' go.mod)."""

PUSHGATEWAY_VERSION: Final = "v1.11.4"
"""The Pushgateway for the metrics tests: `github.com/prometheus/pushgateway` when
the Go module proxy serves it, else Debian's `prometheus-pushgateway` on PATH."""

TOXIPROXY_VERSION: Final = "v2.5.0"
"""The fault-injecting TCP proxy of the chaos suite: `github.com/Shopify/toxiproxy/v2`."""
