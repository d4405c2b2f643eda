"""The clock kubelock's deadlines run on: it keeps counting while the machine sleeps.

trio's default clock is ``CLOCK_MONOTONIC``, which stops while the machine is
suspended (a laptop running kind, a paused VM). A holder resumed after a sleep
longer than its lease would count the time asleep as never having passed:
its safety deadline still ahead, its command running on although other
contenders may have taken the lock meanwhile. ``CLOCK_BOOTTIME`` (Linux) is
``CLOCK_MONOTONIC`` plus the time spent suspended, so on resume every deadline
that passed during the sleep has passed for kubelock too. Where there is no
``CLOCK_BOOTTIME``, it is ``CLOCK_MONOTONIC``.

The kernel's own timeouts (``epoll_wait``, ``poll``) still count monotonic
time, so a wait begun before the sleep ends that much later after it: the
clock therefore never sleeps longer than :data:`MAX_SLEEP` at a time, so a
resumed kubelock looks at its deadlines within that long.
"""

from __future__ import annotations

import time

import trio

__all__ = ["BOOTTIME", "MAX_SLEEP", "BootClock"]

#: The clock id read: ``CLOCK_BOOTTIME`` where there is one, else ``CLOCK_MONOTONIC``.
#: (:mod:`kubelock.watchdog` reads the same one; it cannot import this module's trio.)
BOOTTIME: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
#: The longest single sleep of the event loop, in seconds (see the module doc).
MAX_SLEEP = 1.0


class BootClock(trio.abc.Clock):
    """trio's clock on :data:`BOOTTIME`: ``trio.run(main, clock=BootClock())``.

    ``current_time()`` is :data:`BOOTTIME` in seconds, without trio's random
    offset, so the watchdog (another process) reads the same clock.
    """

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.clock_gettime(BOOTTIME)

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return min(deadline - self.current_time(), MAX_SLEEP)
