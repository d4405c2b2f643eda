"""A control plane for benchmarks: the test harness's, started once per benchmark."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kubelock.testing import ControlPlane
from kubelock.testing.assets import ensure_binaries


@contextlib.contextmanager
def control_plane(namespace: str) -> Iterator[tuple[ControlPlane, Path]]:
    """A running control plane, a namespace in it, and an admin kubeconfig for that namespace."""
    ensure_binaries()
    with (
        tempfile.TemporaryDirectory(prefix="kubelock-bench-") as folder,
        ControlPlane(workdir=Path(folder) / "plane") as plane,
    ):
        plane.create_namespace(namespace)
        kubeconfig = plane.write_kubeconfig(Path(folder) / "admin.kubeconfig", namespace=namespace)
        yield plane, kubeconfig


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
