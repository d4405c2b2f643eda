"""Endpoints and ConfigMap locks: the record as JSON in one annotation.

The annotation is ``control-plane.alpha.kubernetes.io/leader`` and its value
is written byte for byte as client-go writes it (field names
``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``, ``renewTime``,
``leaderTransitions``; times in whole seconds), so a Go kubelock and this
one exclude each other on the same object.

An annotation that is missing or does not parse reads as an empty record,
as in client-go; the next write replaces it.
"""

from __future__ import annotations

from typing import Any

from .lease import ApiLock
from .record import LEADER_ANNOTATION, LeaderElectionRecord, annotations_of

__all__ = [
    "AnnotationLock",
    "ConfigMapLock",
    "EndpointsLock",
]


class AnnotationLock(ApiLock):
    """The record in the leader annotation of a core/v1 object."""

    group = ""  # core v1
    record_path = "/metadata/annotations/" + LEADER_ANNOTATION.replace("/", "~1")

    def record_value(self, obj: dict[str, Any]) -> Any:
        value = annotations_of(obj).get(LEADER_ANNOTATION)
        return value if isinstance(value, str) else None

    def record_of(self, obj: dict[str, Any]) -> LeaderElectionRecord:
        value = self.record_value(obj)
        if not value:
            return LeaderElectionRecord()
        try:
            return LeaderElectionRecord.from_annotation(value)
        except (ValueError, TypeError):
            return LeaderElectionRecord()

    def put_record(self, obj: dict[str, Any], record: LeaderElectionRecord) -> None:
        metadata = obj.setdefault("metadata", {})
        annotations = metadata.get("annotations") or {}
        metadata["annotations"] = {**annotations, LEADER_ANNOTATION: record.to_annotation()}


class EndpointsLock(AnnotationLock):
    """The record in an Endpoints object's annotation."""

    kind = "endpoints"
    object_kind = "Endpoints"


class ConfigMapLock(AnnotationLock):
    """The record in a ConfigMap's annotation."""

    kind = "configmaps"
    object_kind = "ConfigMap"
