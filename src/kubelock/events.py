"""What the election, the API client and the child report to observers, so
logging and metrics hang off one place.

An observer is a plain callable taking one event; it runs synchronously in
the reporting task and must not block (no I/O beyond a log line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime

__all__ = [
    "Acquired",
    "ApiRequest",
    "ChildExited",
    "Event",
    "Lost",
    "Observer",
    "Released",
    "RenewFailed",
    "Renewed",
    "WaitFailed",
    "Waiting",
]


@dataclasses.dataclass(frozen=True)
class Waiting:
    """The lock is held by somebody else (repeated at a modest interval while it lasts)."""

    holder: str
    since: datetime | None  # the holder's acquireTime, by its own clock
    waited: float  # seconds since this contender started
    ahead: int | None = None  # waiters before this one in the queue (None: not in it)


@dataclasses.dataclass(frozen=True)
class WaitFailed:
    """Talking to the API failed while waiting; kubelock keeps trying."""

    error: str


@dataclasses.dataclass(frozen=True)
class Acquired:
    """This contender now holds the lock."""

    waited: float  # seconds from start to acquisition
    fencing_token: int  # leaderTransitions after acquisition; only ever grows


@dataclasses.dataclass(frozen=True)
class Renewed:
    """A renewal succeeded."""

    duration: float  # seconds the request took


@dataclasses.dataclass(frozen=True)
class RenewFailed:
    """A renewal attempt failed; the lease is not lost yet."""

    error: str
    duration: float


@dataclasses.dataclass(frozen=True)
class Lost:
    """The lock was lost while held: renew deadline passed or somebody else took it."""

    reason: str
    held: float  # seconds it was held


@dataclasses.dataclass(frozen=True)
class Released:
    """The lock was given back (``holderIdentity`` emptied), or left to expire."""

    held: float
    written: bool  # False when the API could not be reached and the lease will expire
    done: str | None = None  # the ``once`` KEY to record as done in the same write


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """One request to the Kubernetes API (for metrics)."""

    verb: str  # get, create, update, watch
    code: str  # HTTP status as text, or "error" when there was no answer
    duration: float


@dataclasses.dataclass(frozen=True)
class ChildExited:
    """The child is gone and reaped."""

    status: int  # what kubelock exits with: the child's code, or 128+N
    signal: int | None  # the signal that killed it, if one did
    ran: float  # seconds from start to exit


Event = (
    Waiting
    | WaitFailed
    | Acquired
    | Renewed
    | RenewFailed
    | Lost
    | Released
    | ApiRequest
    | ChildExited
)
Observer = Callable[[Event], None]
