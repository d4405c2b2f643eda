"""Endpoints and ConfigMap locks: the record as JSON in one annotation.

The annotation is ``control-plane.alpha.kubernetes.io/leader`` and its value
is written byte for byte as client-go writes it (field names
``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``, ``renewTime``,
``leaderTransitions``; times in whole seconds), so a Go kubelock and this
one exclude each other on the same object.

An annotation that is missing or empty reads as an empty record (free). One
that does not parse (anybody with ``patch`` can write one) never reads as
free: client-go cannot go on at all (its every attempt fails with "error
retrieving resource lock") until somebody repairs it; kubelock reads it as
held by an unknown holder (:data:`~.record.UNREADABLE_RECORD`) for one lease
from when it first saw it, and after that replaces it with a conditional
write like any expired record. A holder that finds its record so replaced
has lost the lock, as when anybody else takes it.
"""

from __future__ import annotations

from typing import Any

from .lease import ApiLock
from .record import LEADER_ANNOTATION, UNREADABLE_RECORD, LeaderElectionRecord, annotations_of

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
        except ValueError:
            return UNREADABLE_RECORD

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
