"""Every error kubelock raises, and the exit code each one maps to.

The tree, top to bottom (catch the level you care about)::

    KubelockError                 anything kubelock itself reports (exit 1)
    ├── UsageError                bad flags, settings or configuration (exit 2, nothing written)
    │   └── ConfigError           no usable cluster configuration (kubeconfig, context, in-cluster)
    ├── ApiError                  the Kubernetes API did not do what was asked
    │   ├── Unreachable           no answer: connection refused, TLS failure, timeout
    │   └── StatusError           the API server answered with a ``Status`` failure
    │       ├── BadRequest        400 / 422: the request itself is wrong (exit 2)
    │       ├── Unauthorized      401: the credentials were not accepted
    │       ├── Forbidden         403: RBAC denies the verb on the resource
    │       ├── NotFound          404
    │       ├── Conflict          409: the object changed since it was read (stale resourceVersion)
    │       │   └── AlreadyExists 409 on create: somebody else created it first
    │       ├── Gone              410: a watch's resourceVersion is too old
    │       ├── TooManyRequests   429: API priority and fairness asks us to slow down
    │       └── ServerError       5xx
    ├── LeaseLost                 the lock was lost while the guarded work ran (exit 75)
    └── WaitTimedOut              --timeout ran out before the lock was taken (exit 124)

    AlreadyDone                   not an error: the ``--once`` KEY is done (exit 0)

Messages are for people: one line that says what went wrong and what to do,
then the server's own words. Credentials never appear in them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .locks.once import DoneKey

__all__ = [
    "EXIT_CANNOT_EXECUTE",
    "EXIT_ERROR",
    "EXIT_LEASE_LOST",
    "EXIT_NOT_FOUND",
    "EXIT_SIGTERM",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "AlreadyDone",
    "AlreadyExists",
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "Gone",
    "KubelockError",
    "LeaseLost",
    "NotFound",
    "ServerError",
    "StatusError",
    "TooManyRequests",
    "Unauthorized",
    "Unreachable",
    "UsageError",
    "WaitTimedOut",
    "one_line",
]

# The codes kubelock chooses itself. Otherwise the command's status is passed
# through, and a signal N that stops kubelock (or kills the command) is 128+N.
EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: the work was interrupted; a retry is welcome
EXIT_TIMEOUT = 124  # as GNU timeout: stopped waiting, nothing written
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_SIGTERM = 143  # 128 + SIGTERM, the usual way a stopped command ends


class KubelockError(Exception):
    """Anything kubelock reports; ``str()`` is the one-line message for people."""

    exit_code: int = EXIT_ERROR


class UsageError(KubelockError):
    """Bad flags, settings or configuration; nothing was written to the API."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """No usable cluster configuration: kubeconfig, context or in-cluster files."""


class ApiError(KubelockError):
    """The Kubernetes API did not do what was asked."""

    def __init__(self, message: str, *, verb: str = "", resource: str = "") -> None:
        super().__init__(message)
        self.verb = verb
        self.resource = resource


class Unreachable(ApiError):
    """No answer from the API server: connection refused, TLS failure, timeout."""


class StatusError(ApiError):
    """The API server answered with a failure ``Status``."""

    status_code: int = 0

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        reason: str = "",
        server_message: str = "",
        verb: str = "",
        resource: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, verb=verb, resource=resource)
        self.status_code = status_code
        self.reason = reason
        self.server_message = server_message
        self.retry_after = retry_after


class BadRequest(StatusError):
    """400 or 422: the request itself is wrong; retrying cannot help (exit 2)."""

    exit_code = EXIT_USAGE


class Unauthorized(StatusError):
    """401: the credentials were not accepted."""


class Forbidden(StatusError):
    """403: RBAC denies the verb on the resource."""


class NotFound(StatusError):
    """404: the object does not exist."""


class Conflict(StatusError):
    """409: the object changed since it was read; re-read, never overwrite."""


class AlreadyExists(Conflict):
    """409 on create: somebody else created the object first."""


class Gone(StatusError):
    """410: the resourceVersion is too old to watch from; re-read and re-watch."""


class TooManyRequests(StatusError):
    """429: the server asks us to slow down (see ``retry_after``)."""


class ServerError(StatusError):
    """5xx: the API server failed."""


class LeaseLost(KubelockError):
    """The lock was lost while the guarded work ran; the work was stopped."""

    exit_code = EXIT_LEASE_LOST


class WaitTimedOut(KubelockError):
    """``--timeout`` ran out before the lock could be taken; nothing was written."""

    exit_code = EXIT_TIMEOUT


class AlreadyDone(Exception):
    """The ``once`` KEY is recorded as done on the lock: the work must not run again.

    Not a :class:`KubelockError`: the CLI exits 0. ``done`` says who did it and when.
    """

    def __init__(self, message: str, done: DoneKey) -> None:
        super().__init__(message)
        self.done = done


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) made one space: a message's form."""
    return " ".join(text.split())
