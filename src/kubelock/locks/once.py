"""Run once per KEY: the done KEYs kept on the lock object itself.

They live in one annotation, ``kubelock.io/done``, as a JSON list, oldest
first, of at most :data:`DONE_KEEP` entries::

    [{"key": "v1", "by": "web-7d9f-abcde", "at": "2026-11-30T01:02:03.456789Z", "token": 3}]

``by`` is the holder identity that ran the command, ``at`` its wall clock
when it released, ``token`` its fencing token. The annotation is written only
in the same conditional write as a release after the command succeeded, and
every other field and annotation of the object is left as it was, so client-go
and Go kubelock contenders on the same object are not disturbed (they keep
annotations they do not know when they update the record).

An annotation that does not parse reads as no KEY done: the next run writes
a fresh one. The worst outcome is a command run once more, never twice at the
same time. An entry that does not parse, or whose ``key`` or ``by`` is longer
than a KEY or an identity may be (:data:`MAX_ONCE_KEY_LENGTH`,
:data:`~.queue.MAX_IDENTITY_LENGTH`), is left out, and the next release drops it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..settings import MAX_ONCE_KEY_LENGTH
from .queue import MAX_IDENTITY_LENGTH
from .record import annotations_of, format_micro_time, parse_time

DONE_ANNOTATION = "kubelock.io/done"
#: How many done KEYs the lock object keeps (the oldest are dropped first).
DONE_KEEP = 20


@dataclasses.dataclass(frozen=True)
class DoneKey:
    """One KEY whose command succeeded: who ran it, when, with which fencing token."""

    key: str
    by: str
    at: datetime | None
    fencing_token: int

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "by": self.by,
            "at": format_micro_time(self.at) if self.at is not None else None,
            "token": self.fencing_token,
        }


def done_keys(obj: Mapping[str, Any]) -> tuple[DoneKey, ...]:
    """The done KEYs recorded on ``obj`` (a lock object as read), oldest first."""
    value = annotations_of(obj).get(DONE_ANNOTATION)
    if not isinstance(value, str) or not value:
        return ()
    try:
        entries = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return ()
    if not isinstance(entries, list):
        return ()
    keys = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        key, by, token = entry.get("key"), entry.get("by") or "", entry.get("token")
        if not isinstance(key, str) or len(key) > MAX_ONCE_KEY_LENGTH:
            continue
        if not isinstance(by, str) or len(by) > MAX_IDENTITY_LENGTH:
            continue
        keys.append(
            DoneKey(
                key=key,
                by=by,
                at=parse_time(entry.get("at")),
                fencing_token=token if type(token) is int else 0,  # not a bool
            )
        )
    return tuple(keys)


def find_done(obj: Mapping[str, Any], key: str) -> DoneKey | None:
    """The record of ``key`` on ``obj``, or ``None`` when it is not done."""
    for done in done_keys(obj):
        if done.key == key:
            return done
    return None


def done_annotation(obj: Mapping[str, Any], done: DoneKey) -> dict[str, str]:
    """The annotation to write so that ``obj`` also records ``done`` (bounded, newest last)."""
    kept = [entry for entry in done_keys(obj) if entry.key != done.key]
    kept.append(done)
    value = json.dumps([entry.to_json() for entry in kept[-DONE_KEEP:]], separators=(",", ":"))
    return {DONE_ANNOTATION: value}


def describe_done(done: DoneKey) -> str:
    """``done by 'pod-a' at 2026-...Z (fencing token 3)``, for messages."""
    at = f" at {done.at.strftime('%Y-%m-%dT%H:%M:%SZ')}" if done.at is not None else ""
    return f"done by {done.by!r}{at} (fencing token {done.fencing_token})"
