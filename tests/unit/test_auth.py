"""Finding the cluster and the credentials: kubeconfig order and merging, contexts,
in-cluster files, token re-reading, and the messages when something is missing."""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubelock.errors import EXIT_USAGE, ConfigError
from kubelock.kube.auth import ClusterConfig, FileTokenProvider, load_config, load_in_cluster

# -- fixtures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_data(self) -> str:
        return base64.b64encode(self.ca_pem).decode()

    @property
    def cert_data(self) -> str:
        return base64.b64encode(self.cert_pem).decode()

    @property
    def key_data(self) -> str:
        return base64.b64encode(self.key_pem).decode()


def _make_pki() -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


_PKI = _make_pki()


@pytest.fixture
def pki() -> Pki:
    return _PKI


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No kubeconfig, not in a Pod, and a home folder of our own."""
    for name in (
        "KUBECONFIG",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "KUBELOCK_SERVICEACCOUNT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))


def kubeconfig(
    path: Path,
    *,
    current: str | None = None,
    clusters: dict[str, dict[str, Any]] | None = None,
    users: dict[str, dict[str, Any]] | None = None,
    contexts: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a kubeconfig (JSON is YAML) with the named entries."""
    data: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": n, "cluster": c} for n, c in (clusters or {}).items()],
        "users": [{"name": n, "user": u} for n, u in (users or {}).items()],
        "contexts": [{"name": n, "context": c} for n, c in (contexts or {}).items()],
    }
    if current is not None:
        data["current-context"] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def simple_kubeconfig(
    path: Path,
    pki: Pki,
    *,
    name: str = "one",
    server: str = "https://one.example:6443",
    token: str = "token-one",  # noqa: S107
    namespace: str | None = None,
) -> Path:
    context: dict[str, Any] = {"cluster": name, "user": name}
    if namespace:
        context["namespace"] = namespace
    return kubeconfig(
        path,
        current=name,
        clusters={name: {"server": server, "certificate-authority-data": pki.ca_data}},
        users={name: {"token": token}},
        contexts={name: context},
    )


def service_account(folder: Path, pki: Pki, *, namespace: str = "apps") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text("sa-token")
    (folder / "ca.crt").write_bytes(pki.ca_pem)
    (folder / "namespace").write_text(namespace)
    return folder


@pytest.fixture
def in_pod(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki: Pki) -> Path:
    """The environment of a Pod: service variables and a ServiceAccount folder."""
    folder = service_account(tmp_path / "sa", pki)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBELOCK_SERVICEACCOUNT_DIR", str(folder))
    return folder


def token_of(config: ClusterConfig) -> str:
    assert config.token is not None
    return config.token.token()


# -- where the configuration comes from ------------------------------------------------


def test_explicit_kubeconfig_wins_over_everything(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, in_pod: Path
) -> None:
    explicit = simple_kubeconfig(tmp_path / "explicit", pki, server="https://explicit:1")
    listed = simple_kubeconfig(tmp_path / "listed", pki, server="https://listed:1")
    simple_kubeconfig(tmp_path / "home/.kube/config", pki, server="https://home:1")
    monkeypatch.setenv("KUBECONFIG", str(listed))

    config = load_config(str(explicit), None)

    assert config.server == "https://explicit:1"
    assert config.source == f"kubeconfig {explicit} (context one)"


def test_kubeconfig_variable_comes_before_in_cluster(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, in_pod: Path
) -> None:
    listed = simple_kubeconfig(tmp_path / "listed", pki, server="https://listed:1")
    monkeypatch.setenv("KUBECONFIG", str(listed))
    assert load_config(None, None).server == "https://listed:1"


def test_in_cluster_comes_before_home_kubeconfig(tmp_path: Path, pki: Pki, in_pod: Path) -> None:
    simple_kubeconfig(tmp_path / "home/.kube/config", pki, server="https://home:1")
    config = load_config(None, None)
    assert config.server == "https://10.0.0.1:443"
    assert config.source == f"in-cluster ({in_pod})"


def test_home_kubeconfig_is_the_last_resort(tmp_path: Path, pki: Pki) -> None:
    home_config = simple_kubeconfig(tmp_path / "home/.kube/config", pki, server="https://home:1")
    config = load_config(None, None)
    assert config.server == "https://home:1"
    assert str(home_config) in config.source


def test_nothing_found_says_what_was_looked_for() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, None)
    message = str(raised.value)
    assert "no cluster configuration" in message
    for looked_for in ("--kubeconfig", "$KUBECONFIG", "KUBERNETES_SERVICE_HOST", ".kube/config"):
        assert looked_for in message
    assert "\n" not in message
    assert raised.value.exit_code == EXIT_USAGE


def test_explicit_kubeconfig_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kubeconfig .*/missing does not exist"):
        load_config(str(tmp_path / "missing"), None)


def test_kubeconfig_variable_naming_only_missing_files_is_an_error(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never fall back to ~/.kube/config (maybe another cluster) when KUBECONFIG is set.
    simple_kubeconfig(tmp_path / "home/.kube/config", pki)
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/a:{tmp_path}/b")
    with pytest.raises(ConfigError, match=r"none of the files in \$KUBECONFIG"):
        load_config(None, None)


def test_kubeconfig_variable_naming_only_missing_files_falls_back_to_in_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_pod: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/a")
    assert load_config(None, None).source.startswith("in-cluster")


# -- merging KUBECONFIG lists -------------------------------------------------------------


def test_kubeconfig_list_merges_first_file_wins(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(
        tmp_path / "first",
        current="dev",
        clusters={
            "shared": {"server": "https://first:1", "certificate-authority-data": pki.ca_data}
        },
        users={"shared": {"token": "first-token"}},
        contexts={"dev": {"cluster": "shared", "user": "shared", "namespace": "first-ns"}},
    )
    second = kubeconfig(
        tmp_path / "second",
        current="prod",  # ignored: the first file set current-context
        clusters={
            "shared": {"server": "https://second:1", "certificate-authority-data": pki.ca_data},
            "prod": {"server": "https://prod:1", "certificate-authority-data": pki.ca_data},
        },
        users={"shared": {"token": "second-token"}, "prod": {"token": "prod-token"}},
        contexts={
            "dev": {"cluster": "prod", "user": "prod"},
            "prod": {"cluster": "prod", "user": "prod", "namespace": "prod-ns"},
        },
    )
    missing = tmp_path / "missing"
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(map(str, [missing, first, second])))

    dev = load_config(None, None)
    assert dev.server == "https://first:1"
    assert token_of(dev) == "first-token"
    assert dev.namespace == "first-ns"
    assert dev.source == f"kubeconfig {first}:{second} (context dev)"

    prod = load_config(None, "prod")  # only the second file has it
    assert prod.server == "https://prod:1"
    assert token_of(prod) == "prod-token"
    assert prod.namespace == "prod-ns"


def test_current_context_comes_from_a_later_file_when_the_first_has_none(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(
        tmp_path / "first",
        clusters={"c": {"server": "https://c:1", "certificate-authority-data": pki.ca_data}},
        users={"u": {"token": "t"}},
        contexts={"ctx": {"cluster": "c", "user": "u"}},
    )
    second = kubeconfig(tmp_path / "second", current="ctx")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    assert load_config(None, None).server == "https://c:1"


# -- contexts --------------------------------------------------------------------------------


@pytest.fixture
def two_contexts(tmp_path: Path, pki: Pki) -> Path:
    return kubeconfig(
        tmp_path / "config",
        current="alpha",
        clusters={
            "a": {"server": "https://a:1", "certificate-authority-data": pki.ca_data},
            "b": {"server": "https://b:1/prefix/", "certificate-authority-data": pki.ca_data},
        },
        users={"a": {"token": "ta"}, "b": {"token": "tb"}},
        contexts={
            "alpha": {"cluster": "a", "user": "a"},
            "beta": {"cluster": "b", "user": "b", "namespace": "team-b"},
        },
    )


def test_current_context_is_used_by_default(two_contexts: Path) -> None:
    config = load_config(str(two_contexts), None)
    assert config.server == "https://a:1"
    assert config.namespace == "default"
    assert config.source.endswith("(context alpha)")


def test_context_can_be_chosen(two_contexts: Path) -> None:
    config = load_config(str(two_contexts), "beta")
    assert config.server == "https://b:1/prefix"
    assert config.namespace == "team-b"
    assert token_of(config) == "tb"


def test_unknown_context_is_named_and_the_available_ones_listed(two_contexts: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(str(two_contexts), "gamma")
    assert str(raised.value) == (
        f'context "gamma" not found in kubeconfig {two_contexts}; available contexts: alpha, beta'
    )


def test_no_current_context_asks_for_one(tmp_path: Path, pki: Pki) -> None:
    path = kubeconfig(
        tmp_path / "config",
        clusters={"a": {"server": "https://a:1", "certificate-authority-data": pki.ca_data}},
        contexts={"alpha": {"cluster": "a"}},
    )
    with pytest.raises(
        ConfigError, match=r"no current-context; pass --context \(available: alpha\)"
    ):
        load_config(str(path), None)


def test_context_with_in_cluster_configuration_is_refused(in_pod: Path) -> None:
    with pytest.raises(ConfigError, match='context "x" was asked for'):
        load_config(None, "x")


# -- broken kubeconfigs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("clusters: [unclosed", "while parsing"),
        ("", "is empty"),
    ],
)
def test_unreadable_kubeconfig_names_the_file_and_the_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "config"
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), None)
    message = str(raised.value)
    assert message.startswith(f"cannot read kubeconfig {path}: ")
    assert problem in message
    assert "\n" not in message


def test_context_pointing_at_a_missing_cluster(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", current="c", contexts={"c": {"cluster": "nowhere"}})
    with pytest.raises(ConfigError, match=r"invalid kubeconfig .* \(context c\): .*nowhere"):
        load_config(str(path), None)


def test_skipping_tls_verification_is_refused(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={"c": {"server": "https://c:1", "insecure-skip-tls-verify": True}},
        users={"u": {"token": "t"}},
        contexts={"c": {"cluster": "c", "user": "u"}},
    )
    with pytest.raises(ConfigError, match="insecure-skip-tls-verify; kubelock always verifies"):
        load_config(str(path), None)


def test_plain_http_server_is_refused(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={"c": {"server": "http://localhost:8001"}},
        contexts={"c": {"cluster": "c"}},
    )
    with pytest.raises(ConfigError, match=r"http://localhost:8001 is not an https:// URL"):
        load_config(str(path), None)


def test_invalid_certificate_authority_is_reported(tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={
            "c": {
                "server": "https://c:1",
                "certificate-authority-data": base64.b64encode(b"not a cert").decode(),
            }
        },
        contexts={"c": {"cluster": "c"}},
    )
    with pytest.raises(ConfigError, match="cannot load the certificate authority"):
        load_config(str(path), None)


def test_missing_kubernetes_package_says_how_to_install_it(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = simple_kubeconfig(tmp_path / "config", pki)
    for module in ("kubernetes", "kubernetes.client", "kubernetes.config.kube_config"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), None)
    assert "pip install 'kubelock[kubeconfig]'" in str(raised.value)
    assert "inside a Pod" in str(raised.value)


# -- kinds of credentials --------------------------------------------------------------------


def test_client_certificate_goes_into_the_tls_context(tmp_path: Path, pki: Pki) -> None:
    path = kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={"c": {"server": "https://c:1", "certificate-authority-data": pki.ca_data}},
        users={"u": {"client-certificate-data": pki.cert_data, "client-key-data": pki.key_data}},
        contexts={"c": {"cluster": "c", "user": "u"}},
    )
    config = load_config(str(path), None)
    assert config.token is None
    assert config.client_certificate
    assert config.auth == "client certificate"


def test_relative_certificate_paths_resolve_against_their_file(tmp_path: Path, pki: Pki) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "ca.pem").write_bytes(pki.ca_pem)
    (folder / "me.pem").write_bytes(pki.cert_pem)
    (folder / "me.key").write_bytes(pki.key_pem)
    path = kubeconfig(
        folder / "config",
        current="c",
        clusters={"c": {"server": "https://c:1", "certificate-authority": "ca.pem"}},
        users={"u": {"client-certificate": "me.pem", "client-key": "me.key"}},
        contexts={"c": {"cluster": "c", "user": "u"}},
    )
    assert load_config(str(path), None).client_certificate


def test_token_file_is_read_again_after_invalidate(tmp_path: Path, pki: Pki) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    path = kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={"c": {"server": "https://c:1", "certificate-authority-data": pki.ca_data}},
        users={"u": {"tokenFile": str(token_file)}},
        contexts={"c": {"cluster": "c", "user": "u"}},
    )
    config = load_config(str(path), None)
    assert token_of(config) == "first"
    token_file.write_text("second\n")
    assert config.token is not None
    config.token.invalidate()
    assert token_of(config) == "second"


def exec_plugin(tmp_path: Path, *, expires_in: float | None, fail: bool = False) -> Path:
    """A credential plugin that hands out token-1, token-2, ... and counts its runs."""
    script = tmp_path / "plugin.py"
    counter = tmp_path / "runs"
    script.write_text(
        textwrap.dedent(
            f"""
            import datetime, json, pathlib, sys
            counter = pathlib.Path({str(counter)!r})
            runs = int(counter.read_text()) + 1 if counter.exists() else 1
            counter.write_text(str(runs))
            if {fail!r}:
                sys.exit("plugin: cannot reach the identity provider")
            status = {{"token": f"token-{{runs}}"}}
            expires_in = {expires_in!r}
            if expires_in is not None:
                now = datetime.datetime.now(datetime.UTC)
                moment = now + datetime.timedelta(seconds=expires_in)
                status["expirationTimestamp"] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
            print(json.dumps({{
                "apiVersion": "client.authentication.k8s.io/v1",
                "kind": "ExecCredential",
                "status": status,
            }}))
            """
        )
    )
    return script


def exec_kubeconfig(tmp_path: Path, pki: Pki, plugin: Path) -> Path:
    return kubeconfig(
        tmp_path / "config",
        current="c",
        clusters={"c": {"server": "https://c:1", "certificate-authority-data": pki.ca_data}},
        users={
            "u": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": sys.executable,
                    "args": [str(plugin)],
                    "interactiveMode": "Never",
                }
            }
        },
        contexts={"c": {"cluster": "c", "user": "u"}},
    )


def test_exec_plugin_token_is_refreshed_after_invalidate(tmp_path: Path, pki: Pki) -> None:
    plugin = exec_plugin(tmp_path, expires_in=3600)
    config = load_config(str(exec_kubeconfig(tmp_path, pki, plugin)), None)
    assert token_of(config) == "token-1"
    assert token_of(config) == "token-1"  # still valid: the plugin is not run again
    assert config.token is not None
    config.token.invalidate()
    assert token_of(config) == "token-2"


def test_exec_plugin_token_is_refreshed_when_it_expires(tmp_path: Path, pki: Pki) -> None:
    # The loader refreshes tokens that expire within five minutes.
    plugin = exec_plugin(tmp_path, expires_in=60)
    config = load_config(str(exec_kubeconfig(tmp_path, pki, plugin)), None)
    assert token_of(config) == "token-2"
    assert token_of(config) == "token-3"


def test_failing_exec_plugin_is_a_configuration_error(tmp_path: Path, pki: Pki) -> None:
    plugin = exec_plugin(tmp_path, expires_in=None, fail=True)
    with pytest.raises(ConfigError) as raised:
        load_config(str(exec_kubeconfig(tmp_path, pki, plugin)), None)
    assert "no credentials" in str(raised.value)
    assert "cannot reach the identity provider" in str(raised.value)


def test_repr_never_shows_the_token(tmp_path: Path, pki: Pki) -> None:
    secret = "s3cr3t-token-value"
    config = load_config(str(simple_kubeconfig(tmp_path / "config", pki, token=secret)), None)
    assert token_of(config) == secret
    assert secret not in repr(config)
    assert secret not in repr(config.token)


# -- in-cluster ----------------------------------------------------------------------------


def test_in_cluster_reads_the_service_account_folder(in_pod: Path) -> None:
    config = load_in_cluster()
    assert config.server == "https://10.0.0.1:443"
    assert config.namespace == "apps"
    assert token_of(config) == "sa-token"
    assert "sa-token" not in repr(config)


def test_in_cluster_ipv6_host_gets_brackets(monkeypatch: pytest.MonkeyPatch, in_pod: Path) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert load_config(None, None).server == "https://[fd00::1]:443"


def test_in_cluster_namespace_defaults_when_the_file_is_missing(in_pod: Path) -> None:
    (in_pod / "namespace").unlink()
    assert load_in_cluster().namespace == "default"


@pytest.mark.parametrize("missing", ["token", "ca.crt"])
def test_in_cluster_missing_files_are_named(in_pod: Path, missing: str) -> None:
    (in_pod / missing).unlink()
    with pytest.raises(ConfigError) as raised:
        load_config(None, None)
    assert str(in_pod / missing) in str(raised.value)
    assert "automountServiceAccountToken" in str(raised.value)


def test_token_file_is_reread_after_max_age_and_after_invalidate(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "token"
    path.write_text("one")
    provider = FileTokenProvider(path, max_age=60.0, clock=lambda: now[0])
    assert provider.token() == "one"

    path.write_text("two")  # the kubelet rotated it
    now[0] = 59.0
    assert provider.token() == "one"  # not read again yet
    now[0] = 60.0
    assert provider.token() == "two"

    path.write_text("three")
    provider.invalidate()  # a 401: read at once
    assert provider.token() == "three"


def test_a_token_file_read_within_max_age_is_at_hand_without_blocking(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "token"
    path.write_text("one")
    provider = FileTokenProvider(path, max_age=60.0, clock=lambda: now[0])
    assert provider.cached() is None  # never read yet: token() must read the file
    assert provider.token() == "one"
    assert provider.cached() == "one"
    now[0] = 60.0
    assert provider.cached() is None  # too old: token() re-reads it
    assert provider.token() == "one"
    provider.invalidate()
    assert provider.cached() is None  # after a 401: token() re-reads it


def test_token_file_that_vanishes_keeps_the_last_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one")
    provider = FileTokenProvider(path)
    assert provider.token() == "one"
    path.unlink()
    provider.invalidate()
    assert provider.token() == "one"


def test_in_cluster_loading_never_imports_kubernetes(in_pod: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from kubelock.kube.auth import load_config
        import kubelock.kube.api, kubelock.locks
        config = load_config(None, None)
        assert config.source.startswith("in-cluster"), config.source
        loaded = sorted(m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes."))
        print(loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
