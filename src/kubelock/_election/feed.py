"""The watch on the lock object, reopened whenever it drops, for a waiter and a holder alike.

Reopened from the newest version known, a bookmark's included. When the
server no longer has that version (410 Gone), reopened from now at once: the
current object comes first. What happens on other failures is the one
difference between the two uses:

* a *waiter* (``while_holding=False``) reports them, backs off exponentially
  (also when watches keep closing as soon as they open), and stops for good
  when watching is not allowed: polling every retry-period still works;
* a *holder* (``while_holding=True``) stays quiet and retries after a
  retry-period, and when watching is not allowed waits forever: its renewals
  find out what the watch would have.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import aclosing

import trio

from ..errors import ApiError, Forbidden, Gone, Unauthorized
from ..events import Observer, WaitFailed
from ..locks.base import Bookmark, LockStore, Observed
from ..settings import JITTER_FACTOR, ElectionTiming
from .view import DELETED, View, is_older

#: The longest pause between a waiter's attempts to reopen a failing watch.
_MAX_BACKOFF = 30.0


class Feed:
    """Changes of one lock object, handed one by one to a callback."""

    def __init__(
        self,
        store: LockStore,
        timing: ElectionTiming,
        view: View,
        emit: Observer,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._timing = timing
        self._view = view
        self._emit = emit
        self._rng = rng

    async def sleep_jittered(self) -> None:
        """A retry-period, plus up to ``JITTER_FACTOR`` of it at random."""
        await trio.sleep(self._timing.retry_period * (1 + self._rng.random() * JITTER_FACTOR))

    async def follow(
        self,
        on_change: Callable[[Observed | None], str | None],
        *,
        while_holding: bool,
    ) -> str:
        """Call ``on_change`` with each change (``None``: the object was deleted).

        Returns what ``on_change`` returned, as soon as that is not ``None``;
        also returns (``""``) when a waiter may not watch. Otherwise runs
        until cancelled, reopening the watch as the module docstring says.
        """
        retry_period = self._timing.retry_period
        backoff = retry_period
        quick_closes = 0
        bookmark = ""
        from_now = False
        while True:
            observed = self._view.observed
            version = observed.resource_version if observed and not from_now else ""
            if version == DELETED:
                version = ""
            if bookmark and (not version or is_older(version, bookmark)):
                version = bookmark
            from_now = False
            opened = trio.current_time()
            try:
                async with aclosing(self._store.watch(version)) as changes:
                    async for change in changes:
                        backoff = retry_period
                        if isinstance(change, Bookmark):
                            bookmark = change.resource_version
                            continue
                        stop = on_change(change)
                        if stop is not None:
                            return stop
            except Gone:
                # Too old to resume: from now on, at once.
                bookmark = ""
                from_now = True
                continue
            except (Forbidden, Unauthorized) as error:
                if while_holding:
                    await trio.sleep_forever()  # not allowed to watch: renewals find out
                # Watching is not allowed (e.g. a Role written for the Go kubelock):
                # polling every retry-period still works, only slower to hand off.
                self._emit(
                    WaitFailed(
                        error=f"{error}; polling every {retry_period:g}s instead "
                        "(grant watch for instant hand-off)"
                    )
                )
                return ""
            except ApiError as error:
                if not while_holding:
                    self._emit(WaitFailed(error=f"watch: {error}"))
                    await trio.sleep(backoff * (1 + self._rng.random()))
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
            quick = trio.current_time() - opened < retry_period
            if while_holding:
                if quick:
                    await self.sleep_jittered()
            # The server closed the watch (its timeout, or a restart): reopen it at
            # once, but back off when watches keep closing as soon as they open.
            elif quick:
                quick_closes += 1
                if quick_closes > 1:
                    await trio.sleep(backoff * (1 + self._rng.random()))
                    backoff = min(backoff * 2, _MAX_BACKOFF)
            else:
                quick_closes = 0
