"""kubelock's command-line options, declared once.

Each option's name, metavar, help text, default and other spellings are
written here and nowhere else. :mod:`kubelock.cli` reads the usual invocation
from this table without importing cyclopts (tens of milliseconds of
start-up); :mod:`kubelock.usage` builds the cyclopts application behind
``--help`` and unusual argv from the same table. Nothing here imports
cyclopts.
"""

from __future__ import annotations

import dataclasses

from ._version import __version__
from .settings import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_LEASE_DURATION,
    DEFAULT_NAME,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    LOCK_TYPES,
    LOG_FORMATS,
    format_duration,
)

__all__ = [
    "DEFAULT_OPTIONS",
    "ENV_PREFIX",
    "OPTIONS",
    "VERSION_TEXT",
    "Option",
    "Options",
    "env_var",
]

ENV_PREFIX = "KUBELOCK_"
#: What ``kubelock --version`` prints.
VERSION_TEXT = f"kubelock {__version__}"


def env_var(name: str) -> str:
    """Option ``name``'s environment variable: ``lease-duration`` → ``KUBELOCK_LEASE_DURATION``."""
    return ENV_PREFIX + name.upper().replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: ``--NAME METAVAR`` (no metavar: a flag, which takes no value)."""

    name: str
    metavar: str | None
    help: str
    #: Its value when nobody set it (on the command line or in the environment).
    default: str | bool | None = None
    #: What --help says the default is, when the default value alone would not tell.
    shown_default: str | None = None
    #: Another spelling, such as ``-v``.
    alias: str | None = None

    @property
    def long(self) -> str:
        return f"--{self.name}"

    @property
    def field(self) -> str:
        """Its field in :class:`Options`: ``lease-duration`` → ``lease_duration``."""
        return self.name.replace("-", "_")

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.long,) if self.alias is None else (self.long, self.alias)


#: Every option, in the order --help lists them.
OPTIONS: tuple[Option, ...] = (
    Option(
        "id",
        "string",
        "the holder identity written into the lock",
        shown_default="$HOSTNAME, else the host name",
    ),
    Option(
        "kubeconfig",
        "path",
        "the kubeconfig file",
        shown_default="$KUBECONFIG, else the Pod's ServiceAccount, else ~/.kube/config",
    ),
    Option("context", "name", "the kubeconfig context", shown_default="its current context"),
    Option(
        "lease-duration",
        "duration",
        "how long contenders wait after the holder's last renewal before taking over",
        format_duration(DEFAULT_LEASE_DURATION),
    ),
    Option(
        "renew-deadline",
        "duration",
        "how long the holder keeps trying to renew before it gives up the lock",
        format_duration(DEFAULT_RENEW_DEADLINE),
    ),
    Option(
        "retry-period",
        "duration",
        "how often to renew, or to retry taking the lock",
        format_duration(DEFAULT_RETRY_PERIOD),
    ),
    Option("name", "string", "the lock's name", DEFAULT_NAME),
    Option(
        "namespace",
        "string",
        "the lock's namespace",
        shown_default="the Pod's own, or the kubeconfig context's, else default",
    ),
    Option(
        "lock-type", "|".join(LOCK_TYPES), "the kind of object that holds the lock", LOCK_TYPES[0]
    ),
    Option(
        "grace-period",
        "duration",
        "how long the command gets to stop after SIGTERM before SIGKILL",
        format_duration(DEFAULT_GRACE_PERIOD),
    ),
    Option("log-format", "|".join(LOG_FORMATS), "how log lines look on stderr", LOG_FORMATS[0]),
    Option("verbose", None, "also log renewals and API requests", False, alias="-v"),
    Option(
        "metrics-address",
        "HOST:PORT",
        "serve Prometheus /metrics and /healthz here",
        shown_default="off",
    ),
    Option(
        "pushgateway", "URL", "push the metrics to this Pushgateway at exit", shown_default="off"
    ),
    Option(
        "timeout",
        "duration",
        "stop waiting for the lock after this long and exit 124, nothing written: such a "
        "waiter stays out of the queue (0: try once)",
        shown_default="wait as long as it takes",
    ),
    Option(
        "once",
        "KEY",
        "run COMMAND at most once per KEY (a version, a migrations hash): once it "
        "exited 0, every contender with that KEY exits 0 without running it",
        shown_default="off",
    ),
    Option(
        "status",
        None,
        "show the lock (holder, renewals, done KEYs, waiters) and exit; no COMMAND, "
        "needs only 'get'",
        False,
    ),
    Option(
        "watch",
        None,
        "with --status: show the lock again at every change (one line per change "
        "when not on a terminal) until Ctrl-C; needs 'watch' too",
        False,
        alias="-w",
    ),
    Option("output", "text|json", "how --status prints the lock", "text", alias="-o"),
)


@dataclasses.dataclass(frozen=True)
class Options:
    """The options as given (command line over environment over default), not yet checked."""

    id: str | None
    kubeconfig: str | None
    context: str | None
    lease_duration: str
    renew_deadline: str
    retry_period: str
    name: str
    namespace: str | None
    lock_type: str
    grace_period: str
    log_format: str
    verbose: bool
    metrics_address: str | None
    pushgateway: str | None
    timeout: str | None
    once: str | None
    status: bool
    watch: bool
    output: str


#: The value of each option nobody set (on the command line or in the environment).
DEFAULT_OPTIONS = Options(**{option.field: option.default for option in OPTIONS})  # type: ignore[arg-type]
