"""Where the Kubernetes API is and how to authenticate to it.

:func:`load_config` looks, in this order, for:

1. the kubeconfig file given explicitly (``--kubeconfig``);
2. the files listed in ``$KUBECONFIG`` (merged as kubectl merges them: the
   first file that sets a value wins);
3. the in-cluster configuration of a Pod: ``KUBERNETES_SERVICE_HOST`` and
   ``KUBERNETES_SERVICE_PORT`` plus the mounted ServiceAccount folder
   (``$KUBELOCK_SERVICEACCOUNT_DIR``, else
   ``/var/run/secrets/kubernetes.io/serviceaccount``);
4. ``~/.kube/config``.

Kubeconfig files are read by the official ``kubernetes`` package's loader
(tokens, token files, client certificates, CA data, exec credential plugins
such as EKS's and GKE's), imported only when a kubeconfig is actually used,
so an in-cluster run never imports it.

Tokens expire: bound ServiceAccount tokens are rotated by the kubelet, exec
plugins hand out short-lived ones. So a :class:`ClusterConfig` carries a
:class:`TokenProvider`, not a token: the API client asks it before each
request and calls :meth:`~TokenProvider.invalidate` after a 401.

TLS verification is always on; a kubeconfig that asks to skip it is refused.
Tokens and keys never appear in messages or ``repr``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, one_line
from ..settings import validate_namespace

__all__ = [
    "SERVICEACCOUNT_DIR",
    "SERVICEACCOUNT_DIR_ENV",
    "TOKEN_MAX_AGE",
    "ClusterConfig",
    "FileTokenProvider",
    "KubeconfigTokenProvider",
    "TokenProvider",
    "load_cluster",
    "load_config",
    "load_in_cluster",
]

#: Where a Pod finds its ServiceAccount token, CA bundle and namespace.
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Overrides :data:`SERVICEACCOUNT_DIR` (tests, unusual mounts).
SERVICEACCOUNT_DIR_ENV = "KUBELOCK_SERVICEACCOUNT_DIR"
#: A token file is re-read at least this often (the kubelet rotates bound tokens).
TOKEN_MAX_AGE = 60.0

_INSTALL_HINT = (
    "pip install 'kubelock[kubeconfig]' to read kubeconfig files, "
    "or run kubelock inside a Pod to use its in-cluster configuration"
)
if getattr(sys, "frozen", False):  # the single-file executable, built without it
    _INSTALL_HINT = (
        "this kubelock executable reads only a Pod's in-cluster configuration; "
        "for kubeconfig files use `pip install 'kubelock[kubeconfig]'` "
        "or the executable built with --with-kubernetes"
    )


class TokenProvider(Protocol):
    """Hands out the current bearer token; thread-safe, may block briefly.

    ``token()`` may read a file or run an exec credential plugin, so callers
    in trio run it in a worker thread. ``invalidate()`` is cheap and never
    blocks: it only makes the next ``token()`` fetch a fresh one.
    """

    def token(self) -> str:
        """The bearer token to send (without the ``Bearer`` prefix)."""
        ...

    def invalidate(self) -> None:
        """The server rejected the token (401): fetch a fresh one next time."""
        ...

    def cached(self) -> str | None:
        """The token when it is at hand (in memory and fresh), without blocking; else
        ``None``, and ``token()`` (in a worker thread) gets it."""
        ...


class FileTokenProvider:
    """A token kept in a file, re-read at most every ``max_age`` seconds and after a 401.

    If a re-read fails (the kubelet swaps the file atomically, but a mount can
    vanish), the last token read is kept; the server will say whether it still works.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_age: float = TOKEN_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._read_at = 0.0
        self._stale = True

    def token(self) -> str:
        with self._lock:
            now = self._clock()
            if self._stale or now - self._read_at >= self._max_age:
                try:
                    fresh = _read_token(self.path)
                except ConfigError:
                    if not self._token:
                        raise
                else:
                    self._token = fresh
                self._read_at = now
                self._stale = False
            return self._token

    def invalidate(self) -> None:
        self._stale = True

    def cached(self) -> str | None:
        if not self._lock.acquire(blocking=False):
            return None  # another thread is reading the file
        try:
            fresh = not self._stale and self._clock() - self._read_at < self._max_age
            return self._token if fresh and self._token else None
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"FileTokenProvider({str(self.path)!r})"


class KubeconfigTokenProvider:
    """A token from a kubeconfig user entry, via the ``kubernetes`` loader.

    The loader refreshes expiring tokens (exec plugins, auth providers) on
    its own when asked for the token; after a 401 the whole user entry is
    loaded again, which re-runs an exec plugin or re-reads a ``tokenFile``.
    """

    def __init__(self, loader: Any, configuration: Any, source: str) -> None:
        self._loader = loader
        self._configuration = configuration
        self._source = source
        self._lock = threading.Lock()
        self._stale = False

    def token(self) -> str:
        with self._lock:
            with _capture_loader_errors() as problems:
                try:
                    if self._stale:
                        self._loader.load_and_set(self._configuration)
                        self._stale = False
                    header = self._configuration.get_api_key_with_prefix("BearerToken")
                except Exception as error:  # the loader raises many kinds
                    raise ConfigError(
                        f"cannot refresh the credentials of {self._source}: {one_line(str(error))}"
                    ) from None
            if problems:
                raise ConfigError(
                    f"cannot refresh the credentials of {self._source}: {'; '.join(problems)}"
                )
            return _bearer(header, self._source)

    def invalidate(self) -> None:
        self._stale = True

    def cached(self) -> str | None:
        return None  # asking the loader may run an exec plugin: always in a thread

    def __repr__(self) -> str:
        return f"KubeconfigTokenProvider({self._source!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class ClusterConfig:
    """One API server and the credentials to use with it.

    ``ssl_context`` verifies the server against the configured CA (or the
    system's) and carries the client certificate, if any. ``token`` is
    ``None`` when the client certificate alone authenticates.
    """

    server: str  # https://host:port, maybe with a path prefix
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)
    namespace: str = "default"
    source: str = ""  # for messages: "in-cluster (/var/run/...)", "kubeconfig /p (context c)"
    token: TokenProvider | None = None
    client_certificate: bool = False
    tls_server_name: str | None = None  # verify the server's certificate for this name
    proxy: str | None = None

    @property
    def auth(self) -> str:
        """How requests authenticate, for messages: ``token``, ``client certificate``, ``none``."""
        if self.token is not None:
            return "token"
        return "client certificate" if self.client_certificate else "none"


def load_config(kubeconfig: str | None = None, context: str | None = None) -> ClusterConfig:
    """Find the API server and credentials (see the module docstring for the order).

    Raises :class:`~kubelock.errors.ConfigError` (exit 2) with a one-line
    message naming what was looked for and what was wrong.
    """
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"kubeconfig {path} does not exist or is not a file; "
                "pass the path of a kubeconfig file to --kubeconfig"
            )
        return _from_kubeconfig([path], context, origin=f"kubeconfig {path}")

    listed = os.environ.get("KUBECONFIG", "")
    if listed:
        paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
        existing = [p for p in paths if p.is_file()]
        if existing:
            return _from_kubeconfig(
                existing, context, origin="kubeconfig " + os.pathsep.join(map(str, existing))
            )
        if not _in_cluster_available():
            raise ConfigError(
                f"no cluster configuration: none of the files in $KUBECONFIG ({listed}) "
                "exist and KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set "
                "(not in a Pod); fix KUBECONFIG or pass --kubeconfig"
            )

    if _in_cluster_available():
        if context is not None:
            raise ConfigError(
                f'context "{context}" was asked for, but no kubeconfig was found and the '
                "in-cluster configuration has no contexts; drop --context or pass --kubeconfig"
            )
        return load_in_cluster()

    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return _from_kubeconfig([default], context, origin=f"kubeconfig {default}")
    raise ConfigError(
        "no cluster configuration: no --kubeconfig given, $KUBECONFIG is not set, "
        "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set (not in a Pod) "
        f"and {default} does not exist; pass --kubeconfig, set KUBECONFIG, or run in a Pod"
    )


def load_cluster(
    kubeconfig: str | None, context: str | None, namespace: str | None
) -> tuple[ClusterConfig, str]:
    """The configuration (:func:`load_config`) and the lock's namespace: ``namespace``, else
    the kubeconfig context's or the Pod's. A bad namespace is a ``UsageError``."""
    config = load_config(kubeconfig, context)
    namespace = namespace or config.namespace
    validate_namespace(namespace)
    return config, namespace


# -- in-cluster ---------------------------------------------------------------


def _in_cluster_available() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and bool(
        os.environ.get("KUBERNETES_SERVICE_PORT")
    )


def load_in_cluster() -> ClusterConfig:
    """The configuration a Pod has: service variables plus the ServiceAccount folder.

    Never imports ``kubernetes``.
    """
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(
            "in-cluster configuration needs KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT (set in every Pod); pass --kubeconfig outside a Pod"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    folder = Path(os.environ.get(SERVICEACCOUNT_DIR_ENV) or SERVICEACCOUNT_DIR)
    source = f"in-cluster ({folder})"

    token = FileTokenProvider(folder / "token")
    token.token()  # fail now, with exit 2, when the token is missing

    ca_file = folder / "ca.crt"
    if not ca_file.is_file():
        raise ConfigError(
            f"in-cluster configuration is incomplete: {ca_file} is missing; "
            "mount the ServiceAccount (automountServiceAccountToken: true) or pass --kubeconfig"
        )
    context = _ssl_context(str(ca_file), None, None, source)

    namespace = "default"
    namespace_file = folder / "namespace"
    try:
        namespace = namespace_file.read_text(encoding="utf-8").strip() or "default"
    except FileNotFoundError:
        pass
    except OSError as error:
        raise ConfigError(
            f"in-cluster configuration: cannot read {namespace_file} ({error.strerror}); "
            "check the ServiceAccount mount"
        ) from None

    return ClusterConfig(
        server=f"https://{host}:{port}",
        ssl_context=context,
        namespace=namespace,
        source=source,
        token=token,
    )


def _read_token(path: Path) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(
            f"cannot read the ServiceAccount token {path} ({error.strerror or error}); "
            "mount the ServiceAccount (automountServiceAccountToken: true) or pass --kubeconfig"
        ) from None
    if not value:
        raise ConfigError(
            f"the ServiceAccount token {path} is empty; check the ServiceAccount mount"
        )
    return value


# -- kubeconfig -----------------------------------------------------------------


def _from_kubeconfig(paths: list[Path], context: str | None, *, origin: str) -> ClusterConfig:
    try:
        # Imported here so that in-cluster runs never load the (large) client.
        client: Any = importlib.import_module("kubernetes.client")
        kube_config: Any = importlib.import_module("kubernetes.config.kube_config")
    except ImportError:
        raise ConfigError(
            f"cannot read {origin}: the optional 'kubernetes' package is not installed; "
            + _INSTALL_HINT
        ) from None

    # Merge as kubectl does: for named clusters, users and contexts the first
    # file wins; the loader's merger handles those and relative paths per file.
    merger = kube_config.KubeConfigMerger("")
    for path in paths:
        try:
            merger.load_config(str(path))
        except Exception as error:  # YAML, OS and loader errors alike
            raise ConfigError(
                f"cannot read kubeconfig {path}: {one_line(str(error))}; fix or replace the file"
            ) from None
    merged = merger.config
    if merged is None or not isinstance(merged.value, dict):
        raise ConfigError(f"{origin} holds no configuration; fix or replace the file")

    # ...but the merger lets the *last* file's current-context win; kubectl, the first.
    current = ""
    for path in paths:
        data = merger.config_files.get(str(path))
        if isinstance(data, dict) and data.get("current-context"):
            current = str(data["current-context"])
            break
    merged.value["current-context"] = current

    names = [str(_node_value(item).get("name", "")) for item in merged.value.get("contexts") or []]
    available = ", ".join(names) if names else "none"
    chosen = context if context is not None else current
    if not chosen:
        raise ConfigError(
            f"{origin} has no current-context; pass --context (available: {available})"
        )
    if chosen not in names:
        raise ConfigError(
            f'context "{chosen}" not found in {origin}; available contexts: {available}'
        )
    source = f"{origin} (context {chosen})"

    configuration = client.Configuration()
    with _capture_loader_errors() as problems:
        try:
            loader = kube_config.KubeConfigLoader(
                config_dict=merged, active_context=chosen, config_base_path=None
            )
            loader.load_and_set(configuration)
        except Exception as error:  # ConfigException, KeyError, OSError, plugin failures
            raise ConfigError(f"invalid {source}: {one_line(str(error))}") from None

    server = str(configuration.host or "").rstrip("/")
    if not server.startswith("https://"):
        raise ConfigError(
            f"{source}: the server {server or '(none)'} is not an https:// URL; "
            "kubelock only talks to the API server over verified TLS"
        )
    if configuration.verify_ssl is False:
        raise ConfigError(
            f"{source} sets insecure-skip-tls-verify; kubelock always verifies the "
            "API server: set certificate-authority-data instead"
        )

    header = configuration.api_key.get("BearerToken")
    cert_file = getattr(configuration, "cert_file", None)
    key_file = getattr(configuration, "key_file", None)
    if problems and not header and not cert_file:
        raise ConfigError(f"{source}: no credentials: {'; '.join(problems)}")

    token: TokenProvider | None = None
    if header:
        _bearer(header, source)  # reject what kubelock cannot send
        token = KubeconfigTokenProvider(loader, configuration, source)

    context_entry = _node_value(loader.current_context).get("context") or {}
    namespace = str(_node_value(context_entry).get("namespace") or "default")

    return ClusterConfig(
        server=server,
        ssl_context=_ssl_context(configuration.ssl_ca_cert, cert_file, key_file, source),
        namespace=namespace,
        source=source,
        token=token,
        client_certificate=bool(cert_file),
        tls_server_name=getattr(configuration, "tls_server_name", None) or None,
        proxy=configuration.proxy or None,
    )


def _node_value(node: Any) -> dict[str, Any]:
    """The plain dict behind the loader's ``ConfigNode`` wrappers."""
    value = getattr(node, "value", node)
    return value if isinstance(value, dict) else {}


def _bearer(header: str | None, source: str) -> str:
    """The token out of an ``Authorization`` value the loader built."""
    if not header:
        raise ConfigError(f"{source} gave no token; check its user entry")
    scheme, _, value = header.partition(" ")
    value = value.strip()  # token files end in a newline, as client-go trims
    if scheme.lower() != "bearer" or not value:
        raise ConfigError(
            f"{source} uses {scheme or 'an unknown'} authentication, which Kubernetes no "
            "longer accepts; use a token, a client certificate or an exec plugin"
        )
    return value


def _ssl_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None, source: str
) -> ssl.SSLContext:
    """Verification against ``ca_file`` (else the system's CAs), plus the client certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"{source}: cannot load the certificate authority {ca_file} ({_ssl_problem(error)}); "
            "check certificate-authority(-data)"
        ) from None
    if cert_file:
        if not key_file:
            raise ConfigError(
                f"{source} has a client certificate without a key; set client-key(-data)"
            )
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"{source}: cannot load the client certificate and key ({_ssl_problem(error)}); "
                "check client-certificate(-data) and client-key(-data)"
            ) from None
    return context


def _ssl_problem(error: OSError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or "not PEM"
    return error.strerror or str(error)


@contextmanager
def _capture_loader_errors() -> Iterator[list[str]]:
    """Collect what the loader logs instead of raising (it logs exec plugin failures)."""
    problems: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            problems.append(one_line(record.getMessage()))
            return False
        return True

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield problems
    finally:
        root.removeFilter(keep)
