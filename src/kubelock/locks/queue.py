"""The queue: waiters register on the lock object, and take turns first come, first served.

A contender that finds the lock held adds one annotation to the lock object,
with a JSON merge patch (never a conflict, so arrivals do not collide)::

    queue.kubelock.io/3f2a9c01d4e5b6a7:
      {"id": "web-7d9f-abcde", "since": "2026-11-30T01:02:03.456789Z"}

The key is a digest of the identity; ``since`` is the waiter's wall clock
when it joined, ``once`` its KEY when it runs with ``--once``, and ``turn``
how many seconds it may take to react to a free lock (:data:`TURN_TIMEOUT`
when it watches; a waiter that may only poll adds its longest poll interval). Everyone
reads the same annotations, so everyone agrees on the order: by ``since``,
then identity. When the lock comes free, the first waiter in that order
writes at once; the others write nothing, and see it take the lock through
their watch. So a hand-off costs the release and one acquisition: no 409s,
however many wait.

A waiter that does not take its turn (it died, or is too slow) is passed
over: the waiter ``k`` places behind the free lock's first sight writes
after the turns of the ``k`` ahead of it (an entry without one, from
an older kubelock, counts :data:`TURN_TIMEOUT`), and its write removes the
entries of those it passed. A live waiter that finds its entry gone joins
again, at the back. An acquisition removes its own entry in the same
conditional write; a release that records a ``--once`` KEY removes the
entries waiting for that KEY, since they have nothing left to wait for.

Safety never depends on the queue: it only decides *when* a waiter sends its
ordinary conditional write. Contenders that do not know it (client-go, the Go
kubelock) keep the annotations as they are and exclude everyone as before.
The wall clocks in ``since`` only order waiters; a skewed clock moves its
waiter in the queue, nothing more.

Anybody with ``patch`` on the object can write entries, so what is parsed and
kept is bounded: an entry longer than :data:`MAX_ENTRY_LENGTH`, or whose
identity or KEY is longer than an identity or a KEY may be, is left out like
one that does not parse. A waiter whose own entry would be that long waits
outside the queue. A ``turn`` outside (0, :data:`MAX_TURN`] counts as
:data:`TURN_TIMEOUT`, so that no entry can hold the line up for long.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ..settings import MAX_ONCE_KEY_LENGTH
from .record import annotations_of, format_micro_time, parse_time

__all__ = [
    "MAX_ENTRY_LENGTH",
    "MAX_IDENTITY_LENGTH",
    "MAX_TURN",
    "QUEUE_PREFIX",
    "TURN_TIMEOUT",
    "Waiter",
    "ahead_of",
    "entry",
    "fits",
    "has_entry",
    "queue_key",
    "removals",
    "turns",
    "waiters",
]

QUEUE_PREFIX = "queue.kubelock.io/"
#: How long a waiter has for its turn (seconds after the lock was seen free)
#: before the next one in line writes instead.
TURN_TIMEOUT = 1.0
#: The longest ``turn`` an entry may claim (seconds); beyond it, it counts as TURN_TIMEOUT.
MAX_TURN = 300.0
#: The longest identity an entry (or a done KEY's ``by``) may name: a Pod's name is at
#: most 253 characters, client-go's identities are a host name and a UUID.
MAX_IDENTITY_LENGTH = 512
#: The longest entry parsed: an identity and a KEY as long as they may be, with room for
#: JSON's escapes. Longer ones are never parsed nor kept (the cache holds the parsed ones).
MAX_ENTRY_LENGTH = 1024


def queue_key(identity: str) -> str:
    """The annotation of ``identity``'s entry: a digest, so any identity makes a valid key."""
    # surrogatepass: an --id from argv that is not UTF-8 holds lone surrogates.
    return QUEUE_PREFIX + hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Waiter:
    """One entry of the queue."""

    key: str  # its annotation
    identity: str
    since: datetime | None
    once: str | None = None
    #: Seconds this waiter may take to react to a free lock (``None``: not said, or
    #: out of bounds; it counts as the turn timeout).
    turn: float | None = None

    def value(self) -> str:
        entry: dict[str, Any] = {
            "id": self.identity,
            "since": format_micro_time(self.since) if self.since is not None else None,
        }
        if self.once is not None:
            entry["once"] = self.once
        if self.turn is not None:
            entry["turn"] = self.turn
        return json.dumps(entry, separators=(",", ":"))

    def order(self) -> tuple[str, str]:
        since = format_micro_time(self.since) if self.since is not None else ""
        return (since, self.identity)


def entry(
    identity: str, since: datetime, once: str | None = None, turn: float | None = None
) -> Waiter:
    """The entry ``identity`` adds when it joins the queue at ``since``."""
    return Waiter(queue_key(identity), identity, since, once, turn)


def turns(line: Iterable[Waiter], turn_timeout: float = TURN_TIMEOUT) -> float:
    """How long the waiters of ``line`` have for their turns, one after another."""
    return sum(turn_timeout if waiter.turn is None else waiter.turn for waiter in line)


def waiters(obj: Mapping[str, Any]) -> list[Waiter]:
    """The queue on ``obj`` (a lock object as read), first in line first.

    Entries that do not parse are left out (and never block anybody).
    """
    found = []
    for key, value in annotations_of(obj).items():
        if (
            key.startswith(QUEUE_PREFIX)
            and isinstance(value, str)
            and len(value) <= MAX_ENTRY_LENGTH
        ):
            waiter = _parse(key, value)
            if waiter is not None:
                found.append(waiter)
    return sorted(found, key=Waiter.order)


@functools.lru_cache(maxsize=1024)
def _parse(key: str, value: str) -> Waiter | None:
    """One entry, or ``None`` when it does not parse. Cached: every waiter reads
    every entry on every change of the lock object. The values are at most
    :data:`MAX_ENTRY_LENGTH` long, so the cache is bounded too."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return None
    if not isinstance(parsed, dict):
        return None
    identity, once = parsed.get("id"), parsed.get("once")
    if not isinstance(identity, str) or len(identity) > MAX_IDENTITY_LENGTH:
        return None
    if once is not None and (not isinstance(once, str) or len(once) > MAX_ONCE_KEY_LENGTH):
        return None
    said = parsed.get("turn")
    turn: float | None = None
    # Bounded (hostile values: NaN, inf, negative, huge) and never a bool: else not said.
    if isinstance(said, int | float) and not isinstance(said, bool) and 0 < said <= MAX_TURN:
        turn = float(said)
    return Waiter(
        key=key,
        identity=identity,
        since=parse_time(parsed.get("since")),
        once=once,
        turn=turn,
    )


def fits(waiter: Waiter) -> bool:
    """True when ``waiter``'s entry is within the bounds, so that others see it in line."""
    value = waiter.value()
    return len(value) <= MAX_ENTRY_LENGTH and _parse(waiter.key, value) is not None


def has_entry(obj: Mapping[str, Any], identity: str) -> bool:
    """True when ``identity`` has an entry on ``obj`` (parsable or not)."""
    return queue_key(identity) in annotations_of(obj)


def ahead_of(obj: Mapping[str, Any], identity: str, holder: str = "") -> list[Waiter]:
    """The waiters before ``identity`` in line on ``obj`` (all of them when it has no entry).

    The holder's own entry, if one is left, does not count.
    """
    line = [waiter for waiter in waiters(obj) if waiter.identity != holder]
    mine = queue_key(identity)
    for index, waiter in enumerate(line):
        if waiter.key == mine:
            return line[:index]
    return line


def removals(entries: Iterable[Waiter]) -> dict[str, str | None]:
    """Annotations that remove ``entries`` (in a conditional write or a merge patch)."""
    return {waiter.key: None for waiter in entries}
