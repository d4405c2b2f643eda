"""Fixtures for the whole suite: one real control plane, and identities on it.

A test that uses `control_plane` (directly or through `restores_control_plane`,
`namespace`, `admin`, `identity`, `in_cluster`, `kubeconfig`) is marked
`integration`. Before such a test runs, the binaries are found or built (with
progress on the terminal); when neither is possible the session stops with
the reason, it never skips.

Identities are ServiceAccounts with TokenRequest tokens: any number, each
fresh; the control plane's spare static users `user-1`... stay free for tests
that want a plain user.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from kubelock.testing import ControlPlane, Identity, IdentityFactory, InClusterFactory, Rule
from kubelock.testing.assets import AssetsUnavailable, ensure_binaries


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs against the real kube-apiserver of `control_plane`"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Find or build the binaries before any test runs, outside any test's timeout."""
    if not any(item.get_closest_marker("integration") for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    shown = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with shown:  # a first build takes minutes: its progress must reach the terminal
        try:
            ensure_binaries()
        except AssetsUnavailable as error:
            pytest.exit(str(error), returncode=1)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """kube-apiserver and etcd for the session; afterwards, none of its processes live on."""
    # Under pytest's temporary folder, so the logs of the last runs stay for a post-mortem.
    plane = ControlPlane(workdir=tmp_path_factory.mktemp("control-plane"))
    plane.start()
    yield plane
    plane.stop()
    leftover = plane.leftover_pids()
    assert not leftover, f"control-plane processes still alive after stop(): {leftover}"


@pytest.fixture
def restores_control_plane(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The session's control plane for a fault test: running again after it, whatever it stopped."""
    yield control_plane
    if "etcd" not in control_plane.pids:
        control_plane.start_etcd()
    if "kube-apiserver" not in control_plane.pids:
        control_plane.start_apiserver()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> str:
    """A new namespace named after the test (left behind: nothing finalizes deletions)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:48].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    control_plane.create_namespace(name)
    return name


@pytest.fixture
def admin(control_plane: ControlPlane) -> Iterator[httpx.Client]:
    """A sync httpx client authenticated as a member of `system:masters`."""
    with control_plane.admin_client() as client:
        yield client


@pytest.fixture
def identity(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> IdentityFactory:
    """`identity(rules, namespace=None)`: a new ServiceAccount bound to a Role with `rules`.

    It lives in `namespace` (default: the test's), as do its Role and kubeconfig context.
    """
    test_namespace = namespace

    def make(rules: Sequence[Rule], namespace: str | None = None) -> Identity:
        return control_plane.create_identity(namespace or test_namespace, rules, tmp_path)

    return make


@pytest.fixture
def in_cluster(control_plane: ControlPlane, tmp_path: Path) -> InClusterFactory:
    """`in_cluster(namespace, service_account, rules)`: the variables of a Pod running as it.

    The ServiceAccount is created unless it exists (two Pods may share one),
    gets a Role with `rules`, and each call writes its own mount folder.
    """
    mounts = itertools.count(1)

    def make(namespace: str, service_account: str, rules: Sequence[Rule]) -> dict[str, str]:
        control_plane.create_service_account(namespace, service_account, exist_ok=True)
        control_plane.grant(
            namespace, f"system:serviceaccount:{namespace}:{service_account}", rules
        )
        folder = tmp_path / f"serviceaccount-{next(mounts)}"
        return control_plane.in_cluster_environment(namespace, service_account, folder)

    return make


@pytest.fixture
def kubeconfig(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Path:
    """An admin kubeconfig whose context defaults to `namespace`."""
    return control_plane.write_kubeconfig(tmp_path / "admin.kubeconfig", namespace=namespace)
