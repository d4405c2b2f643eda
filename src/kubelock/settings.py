"""Frozen settings, Go duration parsing, and the validation rules.

Everything here is pure: no I/O, no API calls, so bad input is rejected
before anything is written to the cluster.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable
from typing import Literal

from .errors import UsageError

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_LEASE_DURATION",
    "DEFAULT_NAME",
    "DEFAULT_RENEW_DEADLINE",
    "DEFAULT_RETRY_PERIOD",
    "JITTER_FACTOR",
    "LOCK_TYPES",
    "LOG_FORMATS",
    "ElectionTiming",
    "LockType",
    "LogFormat",
    "Settings",
    "default_identity",
    "flag",
    "format_duration",
    "parse_duration",
    "parse_metrics_address",
    "validate_lock_type",
    "validate_log_format",
    "validate_name",
    "validate_namespace",
    "validate_pushgateway",
    "validate_timing",
]

LockType = Literal["leases", "endpoints", "configmaps"]
LOCK_TYPES: tuple[LockType, ...] = ("leases", "endpoints", "configmaps")

DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
#: client-go's JitterFactor: retries wait retry_period * (1 + up to 1.2).
JITTER_FACTOR = 1.2

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
#: Go's time.Duration is an int64 count of nanoseconds: nothing longer parses there.
MAX_DURATION = (2**63 - 1) / 1e9
#: leaseDurationSeconds is an int32 in every lock kind's record.
MAX_LEASE_SECONDS = 2**31 - 1
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration (``300ms``, ``15s``, ``1m30s``, ``1h``) into seconds.

    A bare ``0`` is accepted, as in Go; other numbers need a unit.
    """
    value = text.strip()
    sign = 1.0
    if value[:1] in "+-" and value:
        sign = -1.0 if value[0] == "-" else 1.0
        value = value[1:]
    if value == "0":
        return 0.0
    if not value:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(value):
        match = _PART.match(value, pos)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: use Go syntax such as 300ms, 15s, 1m30s or 1h"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if total > MAX_DURATION:
        raise ValueError(
            f"invalid duration {text!r}: out of range (at most {format_duration(MAX_DURATION)})"
        )
    return sign * total


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling: ``15s``, ``1m30s``, ``300ms``."""
    if seconds == 0:
        return "0s"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole_minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    text = ""
    if hours:
        text += f"{hours}h"
    if minutes:
        text += f"{minutes}m"
    if rest or not text:
        text += f"{rest:g}s"
    return text


@dataclasses.dataclass(frozen=True)
class ElectionTiming:
    """The three durations of client-go's election, in seconds."""

    lease_duration: float = DEFAULT_LEASE_DURATION
    renew_deadline: float = DEFAULT_RENEW_DEADLINE
    retry_period: float = DEFAULT_RETRY_PERIOD

    def __post_init__(self) -> None:
        validate_timing(self.lease_duration, self.renew_deadline, self.retry_period)


def validate_timing(
    lease_duration: float,
    renew_deadline: float,
    retry_period: float,
    *,
    spell: Callable[[str], str] = str,
) -> None:
    """client-go's rule: lease-duration > renew-deadline > 1.2 x retry-period > 0.

    ``spell`` names each setting in messages, given its keyword: as the
    keyword itself by default (``retry_period``, as ``kubelock.Lock`` takes
    it); the CLI passes :func:`flag` (``--retry-period``). Also what the lock
    records can hold: finite durations, a lease of at most
    :data:`MAX_LEASE_SECONDS` (an int32 on the API server).
    """
    lease, renew, retry = spell("lease_duration"), spell("renew_deadline"), spell("retry_period")
    for name, value in ((lease, lease_duration), (renew, renew_deadline), (retry, retry_period)):
        if not math.isfinite(value):
            raise UsageError(f"{name} must be a finite duration (got {value})")
    if retry_period <= 0:
        raise UsageError(f"{retry} must be greater than zero (got {format_duration(retry_period)})")
    if lease_duration <= renew_deadline:
        raise UsageError(
            f"{lease} ({format_duration(lease_duration)}) must be greater than "
            f"{renew} ({format_duration(renew_deadline)}): raise the first or "
            "lower the second"
        )
    if renew_deadline <= JITTER_FACTOR * retry_period:
        raise UsageError(
            f"{renew} ({format_duration(renew_deadline)}) must be greater than "
            f"{JITTER_FACTOR} x {retry} ({format_duration(retry_period)}): "
            "raise the first or lower the second"
        )
    if lease_duration < 1:
        raise UsageError(
            f"{lease} ({format_duration(lease_duration)}) must be at least 1s: "
            "Kubernetes stores it in whole seconds"
        )
    if math.ceil(lease_duration) > MAX_LEASE_SECONDS:
        raise UsageError(
            f"{lease} ({format_duration(lease_duration)}) must be at most "
            f"{format_duration(MAX_LEASE_SECONDS)}: Kubernetes stores it as a 32-bit "
            "number of seconds"
        )


def flag(keyword: str) -> str:
    """The command-line flag of a setting: ``retry_period`` → ``--retry-period``."""
    return "--" + keyword.replace("_", "-")


_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


def validate_name(name: str) -> None:
    """A lock name is the object's name: a DNS-1123 subdomain (253 characters at most)."""
    if not name or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        raise UsageError(
            f"invalid lock name {name!r}: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit (at most 253 characters)"
        )


def validate_namespace(namespace: str) -> None:
    """A namespace is a DNS-1123 label (63 characters at most)."""
    if not namespace or len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
        raise UsageError(
            f"invalid namespace {namespace!r}: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (at most 63 characters)"
        )


def validate_lock_type(lock_type: str) -> LockType:
    for known in LOCK_TYPES:
        if lock_type == known:
            return known
    raise UsageError(f"invalid lock type {lock_type!r}: use one of {', '.join(LOCK_TYPES)}")


# --- The whole configuration of one run -------------------------------------

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

DEFAULT_NAME = "example-app"
#: How long a signalled child gets before SIGKILL: short enough that kubelock
#: can still release the lock inside Kubernetes' default 30 s termination grace.
DEFAULT_GRACE_PERIOD = 20.0


def validate_log_format(log_format: str) -> LogFormat:
    for known in LOG_FORMATS:
        if log_format == known:
            return known
    raise UsageError(f"invalid log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[IPv6]:PORT`` into ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(
            f"invalid metrics address {text!r}: use HOST:PORT, such as :9100 or 127.0.0.1:9100"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"invalid metrics address {text!r}: write IPv6 hosts as [::1]:9100")
    if any(character.isspace() or character in "[]/" for character in host):
        raise UsageError(f"invalid metrics address {text!r}: {host!r} is not a host name")
    return (host or "0.0.0.0", int(port_text))


#: The longest ``--once`` KEY: the done KEYs share the object's 256 KiB of annotations.
MAX_ONCE_KEY_LENGTH = 128


def validate_once_key(key: str, *, spell: Callable[[str], str] = str) -> str:
    """A ``once`` KEY: 1 to 128 printable characters without spaces (a version, a hash).

    ``spell`` names the setting in messages, as for :func:`validate_timing`.
    """
    if (
        not key
        or len(key) > MAX_ONCE_KEY_LENGTH
        or not key.isprintable()
        or any(character.isspace() for character in key)
    ):
        raise UsageError(
            f"invalid {spell('once')} KEY {key!r}: use 1 to {MAX_ONCE_KEY_LENGTH} printable "
            "characters without spaces, such as the app's version or a hash of its migrations"
        )
    return key


OutputFormat = Literal["text", "json"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("text", "json")


def validate_output(output: str) -> OutputFormat:
    for known in OUTPUT_FORMATS:
        if output == known:
            return known
    raise UsageError(f"invalid output format {output!r}: use one of {', '.join(OUTPUT_FORMATS)}")


def validate_timeout(timeout: float, *, spell: Callable[[str], str] = str) -> float:
    """How long to wait for the lock: not negative (0 tries once)."""
    if timeout < 0:
        raise UsageError(
            f"{spell('timeout')} must not be negative (got {format_duration(timeout)}); "
            "0 tries once without waiting"
        )
    return timeout


def validate_pushgateway(url: str) -> str:
    """A Pushgateway base URL: ``http(s)://host[:port][/path]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise UsageError(
            f"invalid pushgateway URL {url!r}: use http://HOST:PORT or https://HOST:PORT"
        )
    return url.rstrip("/")


def default_identity() -> str:
    """``$HOSTNAME`` (a Pod's name), else the host name, as the Go kubelock does."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything one run needs, validated on construction (no I/O)."""

    command: tuple[str, ...]  # what to run while holding the lock; the CLI requires one
    identity: str  # holderIdentity written into the lock
    name: str = DEFAULT_NAME
    namespace: str | None = None  # None: the kubeconfig's or the Pod's namespace
    kubeconfig: str | None = None  # None: $KUBECONFIG, then in-cluster, then ~/.kube/config
    context: str | None = None  # None: the kubeconfig's current context
    lock_type: LockType = "leases"
    timing: ElectionTiming = dataclasses.field(default_factory=ElectionTiming)
    grace_period: float = DEFAULT_GRACE_PERIOD  # seconds between SIGTERM and SIGKILL
    log_format: LogFormat = "text"
    verbose: bool = False
    metrics_address: tuple[str, int] | None = None  # None: no metrics server
    pushgateway: str | None = None  # None: push nothing
    timeout: float | None = None  # None: wait as long as it takes; 0: try once
    once: str | None = None  # run the command at most once per KEY across contenders
    status: OutputFormat | None = None  # show the lock in this format; run no command
    watch: bool = False  # with status: show it again at every change, until interrupted

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.namespace is not None:
            validate_namespace(self.namespace)
        if not self.identity:
            raise UsageError("the identity (--id) must not be empty")
        validate_lock_type(self.lock_type)
        validate_log_format(self.log_format)
        if self.timeout is not None:
            validate_timeout(self.timeout, spell=flag)
        if self.once is not None:
            validate_once_key(self.once, spell=flag)
        if self.grace_period < 0:
            raise UsageError(
                f"--grace-period must not be negative (got {format_duration(self.grace_period)})"
            )
