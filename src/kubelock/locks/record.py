"""The election record, as client-go's ``LeaderElectionRecord`` defines it.

Lease objects keep it in ``spec`` (``leaseTransitions`` there); Endpoints and
ConfigMaps keep it as JSON in the annotation
``control-plane.alpha.kubernetes.io/leader`` (``leaderTransitions`` there).

Anyone allowed to patch the object writes what is parsed here, so parsing
never raises anything but ``ValueError``. A record that does not parse (not
JSON, fields of the wrong type, numbers out of range) is read as
:data:`UNREADABLE_RECORD`: held by an unknown holder, never as free. A time
that does not parse only reads as no time: times are shown, never judged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "LEADER_ANNOTATION",
    "MAX_COUNT",
    "UNREADABLE_RECORD",
    "LeaderElectionRecord",
    "annotations_of",
    "format_micro_time",
    "format_time",
    "parse_time",
    "utc_now",
]

LEADER_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"
#: The most a count (lease duration, transitions) may be: Go's int64, as client-go parses it.
MAX_COUNT = 2**63 - 1


def annotations_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The annotations of ``obj`` (an object as the API returned it), empty when none."""
    metadata = obj.get("metadata") or {}
    annotations: Mapping[str, Any] = metadata.get("annotations") or {}
    return annotations


@dataclasses.dataclass(frozen=True)
class LeaderElectionRecord:
    """Who holds the lock, for how long, and how often it changed hands."""

    holder_identity: str = ""
    lease_duration_seconds: int = 0
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    leader_transitions: int = 0
    #: The object's record did not parse: nobody knows who holds it, nor for how long.
    unreadable: bool = False

    @property
    def is_held(self) -> bool:
        """True when somebody claims the lock (an empty holder means released).

        An unreadable record counts as held: whoever wrote it may be running.
        """
        return self.holder_identity != "" or self.unreadable

    # -- Lease (coordination.k8s.io/v1) spec ---------------------------------

    def to_lease_spec(self) -> dict[str, Any]:
        """The Lease ``spec``; times are MicroTime (RFC 3339, microseconds)."""
        spec: dict[str, Any] = {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "leaseTransitions": self.leader_transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = format_micro_time(self.acquire_time)
        if self.renew_time is not None:
            spec["renewTime"] = format_micro_time(self.renew_time)
        return spec

    @classmethod
    def from_lease_spec(cls, spec: dict[str, Any] | None) -> LeaderElectionRecord:
        """Parse a Lease ``spec``; raises ``ValueError`` when a field has the wrong type."""
        return cls._from_fields(spec or {}, "leaseTransitions")

    # -- annotation JSON (Endpoints, ConfigMap) -------------------------------

    def to_annotation(self) -> str:
        """The annotation value, byte-compatible with client-go's (metav1.Time: seconds)."""
        return json.dumps(
            {
                "holderIdentity": self.holder_identity,
                "leaseDurationSeconds": self.lease_duration_seconds,
                "acquireTime": format_time(self.acquire_time),
                "renewTime": format_time(self.renew_time),
                "leaderTransitions": self.leader_transitions,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_annotation(cls, value: str) -> LeaderElectionRecord:
        """Parse the annotation; raises ``ValueError`` when it is not a record."""
        try:
            data = json.loads(value)
        except RecursionError:  # nested deeper than the parser goes
            raise ValueError("leader annotation is nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("leader annotation is not a JSON object")
        return cls._from_fields(data, "leaderTransitions")

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any], transitions: str) -> LeaderElectionRecord:
        """The record in ``fields``; ``ValueError`` for a wrong type, as Go's decoder says."""
        holder = fields.get("holderIdentity")
        if holder is not None and not isinstance(holder, str):
            raise ValueError("holderIdentity is not a string")
        return cls(
            holder_identity=holder or "",
            lease_duration_seconds=_count(fields, "leaseDurationSeconds"),
            acquire_time=parse_time(fields.get("acquireTime")),
            renew_time=parse_time(fields.get("renewTime")),
            leader_transitions=_count(fields, transitions),
        )


#: What an object's record that does not parse reads as: held, by nobody known. The
#: election counts it as held for its own lease duration from when it first saw it.
UNREADABLE_RECORD = LeaderElectionRecord(unreadable=True)


def _count(fields: Mapping[str, Any], name: str) -> int:
    """An integer field: 0 when absent or null; ``ValueError`` unless a JSON integer in range."""
    value = fields.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_COUNT:
        raise ValueError(f"{name} is not an integer in range")
    return value


def utc_now() -> datetime:
    """Wall-clock time for the record's timestamps (never used to judge expiry)."""
    return datetime.now(UTC)


def format_micro_time(moment: datetime) -> str:
    """metav1.MicroTime: ``2006-01-02T15:04:05.000000Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time(moment: datetime | None) -> str | None:
    """metav1.Time: ``2006-01-02T15:04:05Z`` (null when unset, as Go writes a zero time)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    """Parse RFC 3339 with or without fractional seconds; ``None`` for empty values
    and for anything else that is not a time (or not one Python can hold in UTC)."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError, OSError):  # OSError: the local time zone's limits
        return None
