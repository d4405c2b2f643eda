"""``/healthz``: whether this kubelock is alive, judged from the election's events.

The liveness semantics of client-go's healthz adaptor: healthy while starting
or waiting, and while holding as long as the last successful renewal (or the
acquisition) is at most ``renew_deadline + HEALTH_TOLERANCE`` seconds old, by
trio's clock; unhealthy after that, including after the lease was lost for
want of renewals. An orderly release makes it healthy again.
"""

from __future__ import annotations

from typing import Final

import trio

from .events import Acquired, Event, Released, Renewed

__all__ = ["HEALTH_TOLERANCE", "Health"]

HEALTH_TOLERANCE: Final = 2.0
"""Seconds past renew-deadline before ``/healthz`` turns 503: a renewal that is
merely slow (the elector bounds each attempt by the deadline) is not yet a
reason for a livenessProbe to restart the Pod."""


class Health:
    """The health of one holder; an observer of the election's events.

    :meth:`healthy` and :meth:`report` need trio's clock (a running trio loop).
    """

    def __init__(self, renew_deadline: float) -> None:
        self.renew_deadline = renew_deadline
        # Trio time of the last acquisition or successful renewal, from acquisition
        # until release (kept after a loss, so health is judged by it); None otherwise.
        self._last_success: float | None = None

    def observe(self, event: Event) -> None:
        """Take note of one event (synchronous, no I/O)."""
        match event:
            case Acquired() | Renewed():
                self._last_success = trio.current_time()
            case Released():
                self._last_success = None
            case _:
                pass

    def healthy(self) -> bool:
        """False once the last successful renewal (or the acquisition) is more than
        renew-deadline + ``HEALTH_TOLERANCE`` old, while holding or after a loss;
        True otherwise (starting, waiting, released)."""
        if self._last_success is None:
            return True
        return trio.current_time() <= self._last_success + self.renew_deadline + HEALTH_TOLERANCE

    def report(self) -> tuple[int, bytes]:
        """The HTTP status and body of ``/healthz``: 200 ``ok``, or 503 and why."""
        if self.healthy():
            return 200, b"ok\n"
        assert self._last_success is not None
        age = trio.current_time() - self._last_success
        return 503, (
            f"renewal overdue: last successful renewal {age:.1f}s ago, "
            f"renew deadline {self.renew_deadline:g}s + tolerance {HEALTH_TOLERANCE:g}s\n"
        ).encode()
