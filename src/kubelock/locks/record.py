"""The election record, as client-go's ``LeaderElectionRecord`` defines it.

Lease objects keep it in ``spec`` (``leaseTransitions`` there); Endpoints and
ConfigMaps keep it as JSON in the annotation
``control-plane.alpha.kubernetes.io/leader`` (``leaderTransitions`` there).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "LEADER_ANNOTATION",
    "LeaderElectionRecord",
    "annotations_of",
    "format_micro_time",
    "format_time",
    "parse_time",
    "utc_now",
]

LEADER_ANNOTATION = "control-plane.alpha.kubernetes.io/leader"


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

    @property
    def is_held(self) -> bool:
        """True when somebody claims the lock (an empty holder means released)."""
        return self.holder_identity != ""

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
        spec = spec or {}
        return cls(
            holder_identity=str(spec.get("holderIdentity") or ""),
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=parse_time(spec.get("acquireTime")),
            renew_time=parse_time(spec.get("renewTime")),
            leader_transitions=int(spec.get("leaseTransitions") or 0),
        )

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
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("leader annotation is not a JSON object")
        return cls(
            holder_identity=str(data.get("holderIdentity") or ""),
            lease_duration_seconds=int(data.get("leaseDurationSeconds") or 0),
            acquire_time=parse_time(data.get("acquireTime")),
            renew_time=parse_time(data.get("renewTime")),
            leader_transitions=int(data.get("leaderTransitions") or 0),
        )


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
    """Parse RFC 3339 with or without fractional seconds; ``None`` for empty values."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None
