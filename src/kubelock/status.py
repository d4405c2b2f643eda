"""``kubelock --status``: a read-only view of one lock (it needs only ``get``).

It shows the holder, since when, the last renewal and its age, the lease
duration, the transitions, the ``--once`` KEYs that are done, and the
waiters in the queue, first in line first, as text for people or as JSON
(``-o json``) for scripts. Ages are judged by this
machine's clock against the holder's timestamps, so they are only as right
as the two clocks agree; the election itself never trusts remote clocks.
Names as written on the lock object may hold control characters: the text
shows them escaped (:mod:`kubelock.text`), the JSON as JSON escapes.
"""

from __future__ import annotations

import json
import sys
from contextlib import aclosing
from datetime import datetime
from typing import Any, TextIO

import trio

from .locks.base import Bookmark, Observed
from .locks.once import done_keys
from .locks.queue import waiters
from .locks.record import format_micro_time, utc_now
from .settings import OutputFormat, Settings
from .text import printable


def run(settings: Settings, out: TextIO | None = None) -> int:
    """Read the lock of ``settings`` once and print it (on stdout); return the exit status.

    With ``settings.watch``, print it again at every change until Ctrl-C, which exits 0.
    """
    if not settings.watch:
        return trio.run(_show, settings, out or sys.stdout)
    try:
        return trio.run(_watch, settings, out or sys.stdout)
    except KeyboardInterrupt:
        return 0


async def _show(settings: Settings, out: TextIO) -> int:
    from .kube.auth import load_cluster
    from .locks import open_lock

    config, namespace = load_cluster(settings.kubeconfig, settings.context, settings.namespace)
    async with open_lock(config, settings.lock_type, settings.name, namespace) as store:
        observed = await store.get()
        view = describe(store.kind, namespace, settings.name, observed, utc_now())
    format: OutputFormat = settings.status or "text"
    out.write(json.dumps(view, indent=2) + "\n" if format == "json" else as_text(view))
    return 0


async def _watch(settings: Settings, out: TextIO) -> int:
    """Show the lock, then again at every change the API server's watch reports.

    On a terminal the view is redrawn in place; otherwise each change is one
    line (``-o json``: one JSON object per line). A watch the server closes is
    reopened from the last version seen; one too old for it (410) after a re-read.
    """
    from .errors import Gone
    from .kube.auth import load_cluster
    from .locks import open_lock

    config, namespace = load_cluster(settings.kubeconfig, settings.context, settings.namespace)
    format: OutputFormat = settings.status or "text"
    terminal = out.isatty()
    shown: str | None = None

    def show(observed: Observed | None) -> None:
        nonlocal shown
        view = describe(store.kind, namespace, settings.name, observed, utc_now())
        if terminal:
            text = json.dumps(view, indent=2) + "\n" if format == "json" else as_text(view)
            text = _CLEAR_SCREEN + text
        else:
            text = (json.dumps(view) if format == "json" else as_line(view)) + "\n"
        version = observed.resource_version if observed is not None else None
        if version is None or version != shown:
            out.write(text)
            out.flush()
        shown = version

    async with open_lock(config, settings.lock_type, settings.name, namespace) as store:
        observed = await store.get()
        show(observed)
        # Where a reopened watch resumes: the newest version seen, a bookmark's included.
        resume = observed.resource_version if observed is not None else ""
        while True:
            try:
                async with aclosing(store.watch(resume)) as changes:
                    async for change in changes:
                        if isinstance(change, Bookmark):
                            resume = change.resource_version
                            continue
                        show(change)
                        if change is not None:
                            resume = change.resource_version
            except Gone:
                observed = await store.get()
                show(observed)
                resume = observed.resource_version if observed is not None else ""


_CLEAR_SCREEN = "\x1b[H\x1b[2J"
"""Cursor home, erase the screen: the terminal's view is redrawn from the top."""


def describe(
    kind: str, namespace: str, name: str, observed: Observed | None, now: datetime
) -> dict[str, Any]:
    """The lock as plain data (the JSON of ``-o json``)."""
    view: dict[str, Any] = {"kind": kind, "namespace": namespace, "name": name}
    if observed is None:
        return {
            **view,
            "exists": False,
            "held": False,
            "holder": None,
            "done": [],
            "waiters": [],
        }
    record = observed.record
    renew_age = None
    expired = None
    if record.renew_time is not None:
        renew_age = round((now - record.renew_time).total_seconds(), 3)
        expired = renew_age > record.lease_duration_seconds
    return {
        **view,
        "exists": True,
        "held": record.is_held and not expired,
        "holder": record.holder_identity or None,
        "recordUnreadable": record.unreadable,
        "acquireTime": _time(record.acquire_time),
        "renewTime": _time(record.renew_time),
        "renewAgeSeconds": renew_age,
        "leaseDurationSeconds": record.lease_duration_seconds,
        "expired": expired if record.is_held else None,
        "transitions": record.leader_transitions,
        "done": [
            {
                "key": done.key,
                "by": done.by,
                "at": _time(done.at),
                "fencingToken": done.fencing_token,
            }
            for done in done_keys(observed.raw)
        ],
        "waiters": [
            {
                "identity": waiter.identity,
                "since": _time(waiter.since),
                "waitedSeconds": (
                    round((now - waiter.since).total_seconds(), 3)
                    if waiter.since is not None
                    else None
                ),
                "once": waiter.once,
            }
            for waiter in waiters(observed.raw)
        ],
    }


def as_text(view: dict[str, Any]) -> str:
    """The lock for people, one fact per line."""
    lines = [f"lock:         {view['kind']} {view['namespace']}/{view['name']}"]
    if not view["exists"]:
        lines.append("holder:       nobody (the object does not exist yet)")
        return _lines(lines)
    if view["recordUnreadable"]:
        lines.append("holder:       unknown (the record does not parse; counted as held)")
    elif view["holder"] is None:
        lines.append("holder:       nobody (released)")
    else:
        state = " (lease expired by this machine's clock)" if view["expired"] else ""
        lines.append(f"holder:       {view['holder']}{state}")
        lines.append(f"since:        {view['acquireTime'] or '-'}")
    age = view["renewAgeSeconds"]
    renewed = view["renewTime"] or "-"
    if age is not None:
        renewed += f" ({age:.1f}s ago)"
    lines.append(f"last renewal: {renewed}")
    lines.append(f"lease:        {view['leaseDurationSeconds']}s")
    lines.append(f"transitions:  {view['transitions']}")
    if not view["done"]:
        lines.append("done KEYs:    none")
    else:
        lines.append(f"done KEYs:    {len(view['done'])} (newest last)")
        for done in view["done"]:
            lines.append(
                f"  {done['key']}  by {done['by']} at {done['at'] or '-'} "
                f"(fencing token {done['fencingToken']})"
            )
    if not view["waiters"]:
        lines.append("waiters:      none in the queue")
    else:
        lines.append(f"waiters:      {len(view['waiters'])} (first in line first)")
        for waiter in view["waiters"]:
            waited = waiter["waitedSeconds"]
            since = f" ({waited:.1f}s)" if waited is not None else ""
            once = f"  --once {waiter['once']}" if waiter["once"] is not None else ""
            lines.append(f"  {waiter['identity']}  since {waiter['since'] or '-'}{since}{once}")
    return _lines(lines)


def _lines(lines: list[str]) -> str:
    """The lines as printed: what the lock object says may hold terminal escapes."""
    return "".join(printable(line) + "\n" for line in lines)


def as_line(view: dict[str, Any]) -> str:
    """The lock in one line (``--watch`` when stdout is not a terminal), no newline."""
    where = f"{view['kind']} {view['namespace']}/{view['name']}"
    if not view["exists"]:
        return printable(f"{where}: nobody holds it (the object does not exist)")
    if view["holder"] is None:
        state = "nobody holds it (released)"
    else:
        expired = " (lease expired by this machine's clock)" if view["expired"] else ""
        state = f"held by {view['holder']}{expired} since {view['acquireTime'] or '-'}"
    # The holder's name comes from the lock object: it may hold terminal escapes.
    return printable(
        f"{where}: {state}, renewed {view['renewTime'] or '-'}, "
        f"lease {view['leaseDurationSeconds']}s, transitions {view['transitions']}, "
        f"{len(view['waiters'])} waiting, {len(view['done'])} done KEYs"
    )


def _time(moment: datetime | None) -> str | None:
    return format_micro_time(moment) if moment is not None else None
