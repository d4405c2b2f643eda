"""The hand-off window: how long waiters spread their writes when the lock comes free.

Without it, every waiter writes the moment it sees a release and all but one
get a 409: with 30 contenders about 15 writes per hand-off reach the API
server. With it, a waiter that sees the lock come free waits a random delay
in ``[0, window)`` first; the one with the shortest delay writes, and the
others see the new holder through their watch before their delay ends, so
they write nothing. A waiter that sees the lock free at its very first look
writes at once, so an uncontended lock costs nothing.

The window must grow with the number of waiters (few collisions) and vanish
when one waits alone (a quick hand-off). Nobody knows how many wait, but the
winner's own delay tells: it is the smallest of N draws, about
``window / (N + 1)``. So the winner corrects the window towards one sized for
that many (:func:`next_window`) and publishes it in the annotation
``kubelock.io/handoff-window`` of the same conditional write that releases
the lock; every waiter reads the same window from that release.

Contenders that do not know the scheme (client-go, the Go kubelock) keep the
annotation as it is and exclude everyone as before: the scheme only decides
*when* a waiter sends its ordinary conditional write, never whether it is safe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .record import annotations_of

HANDOFF_ANNOTATION = "kubelock.io/handoff-window"
#: How wide the window is per other waiter, in units of how late news reaches them.
SPREAD_FACTOR = 4.0
#: The least lateness assumed: one write's round trip on a quiet API server (seconds).
MIN_LATENESS = 0.003
#: The window before any winner has published one.
DEFAULT_WINDOW = 0.02
MIN_WINDOW = 0.001
MAX_WINDOW = 2.0
#: The most one hand-off may shrink or grow the window.
MAX_STEP = 2.0


def handoff_window(obj: Mapping[str, Any]) -> float:
    """The window published on ``obj`` (a lock object as read), else :data:`DEFAULT_WINDOW`."""
    try:
        window = float(annotations_of(obj).get(HANDOFF_ANNOTATION) or DEFAULT_WINDOW)
    except (TypeError, ValueError):
        return DEFAULT_WINDOW
    if not math.isfinite(window):
        return DEFAULT_WINDOW
    return min(max(window, MIN_WINDOW), MAX_WINDOW)


def next_window(window: float, winning_delay: float, lateness: float = 0.0) -> float:
    """The window to publish after winning with ``winning_delay`` drawn from ``[0, window)``.

    The winner's delay is the smallest of N draws, so ``window / delay`` estimates
    how many waited. With nobody else waiting the window shrinks towards
    :data:`MIN_WINDOW` (a lone waiter should not wait); with others, it grows to
    :data:`SPREAD_FACTOR` times their number times how late news of a write
    reaches them (``lateness``: how long after the release, by the releaser's
    clock, the winner heard of it; at least :data:`MIN_LATENESS`), so that the
    next shortest delay usually ends after they have seen the winner's write.

    A step of half the log-ratio to that target: one draw is noisy (the minimum
    of N uniform draws is roughly exponential), so the window settles over a
    few hand-offs rather than jumping on each.
    """
    waited = window / max(winning_delay, MIN_WINDOW / 100)
    others = max(waited - 2.0, 0.0)
    target = SPREAD_FACTOR * max(lateness, MIN_LATENESS) * others + MIN_WINDOW
    step = math.sqrt(target / window)
    step = min(max(step, 1 / MAX_STEP), MAX_STEP)
    return min(max(window * step, MIN_WINDOW), MAX_WINDOW)


def handoff_annotation(window: float) -> dict[str, str]:
    return {HANDOFF_ANNOTATION: f"{window:.4f}"}
