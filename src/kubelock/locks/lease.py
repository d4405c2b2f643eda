"""The Lease lock (coordination.k8s.io/v1), kubelock's default, plus what every API lock shares.

A Lease keeps the record in its ``spec`` (``holderIdentity``,
``leaseDurationSeconds``, ``acquireTime``, ``renewTime``,
``leaseTransitions``), exactly where client-go's ``LeaseLock`` keeps it.

Every write of the record is conditional on the record being as last read,
and nothing is ever overwritten:

* With ``patch`` allowed, it is a JSON patch whose first operation *tests*
  that the record is as read (the whole Lease ``spec``, or the leader
  annotation), then replaces it and sets the write's annotations. The API
  server applies a patch atomically, so this is a compare-and-swap on the
  record alone: a waiter joining the queue meanwhile (a merge patch of its
  own annotation, :mod:`.queue`) does not make it fail, while any write of the
  record by anybody does. A failed test is a 422, like an invalid patch; a
  re-read tells the two apart (the record changed: ``Conflict``).
* Otherwise (a Role without ``patch``, as written for the Go kubelock, or an
  object without a record yet) it is a PUT of the object as last read with
  ``metadata.resourceVersion`` set to the version read: if anybody wrote in
  between, the server answers 409.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..kube.api import ApiClient
from ..kube.target import Target
from .base import Bookmark, Observed
from .record import UNREADABLE_RECORD, LeaderElectionRecord, annotations_of

__all__ = [
    "ApiLock",
    "LeaseLock",
]


class ApiLock:
    """A lock kept in one namespaced object; subclasses say where the record lives.

    Implements :class:`~kubelock.locks.base.LockStore`.
    """

    kind: str  # the resource: "leases", "endpoints", "configmaps"
    group: str  # "coordination.k8s.io", "" (core)
    version: str = "v1"
    object_kind: str  # "Lease", "Endpoints", "ConfigMap"

    def __init__(
        self, api: ApiClient, name: str, namespace: str, *, timeout: float | None = None
    ) -> None:
        self.api = api
        self.name = name
        self.namespace = namespace
        self.timeout = timeout  # per call; None: the client's default
        self.target = Target(self.group, self.version, self.kind, namespace, name)
        # Until the API says 403 to a patch: then PUT with the resourceVersion.
        self.patch_allowed = True

    def describe(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.namespace!r}, {self.name!r})"

    # -- where the record lives (per kind) ------------------------------------------

    def record_of(self, obj: dict[str, Any]) -> LeaderElectionRecord:
        """The record in ``obj``: an empty record when it has none, and
        :data:`~.record.UNREADABLE_RECORD` (held) when it has one that does not parse."""
        raise NotImplementedError

    def put_record(self, obj: dict[str, Any], record: LeaderElectionRecord) -> None:
        """Write ``record`` into ``obj`` in place, leaving everything else as it is."""
        raise NotImplementedError

    #: The JSON pointer of the record in the object.
    record_path: str

    def record_value(self, obj: dict[str, Any]) -> Any:
        """The JSON value at :attr:`record_path` in ``obj``, ``None`` when there is none."""
        raise NotImplementedError

    # -- LockStore ------------------------------------------------------------------

    async def get(self) -> Observed | None:
        try:
            obj = await self.api.get(self.target, timeout=self.timeout)
        except NotFound:
            return None
        return self._observed(obj)

    async def create(self, record: LeaderElectionRecord) -> Observed:
        obj: dict[str, Any] = {
            "apiVersion": self.target.api_version,
            "kind": self.object_kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
        }
        self.put_record(obj, record)
        created = await self.api.create(self.target, obj, timeout=self.timeout)
        return self._observed(created)

    async def update(
        self,
        record: LeaderElectionRecord,
        current: Observed,
        *,
        annotations: Mapping[str, str | None] | None = None,
    ) -> Observed:
        for _ in range(3):
            operations = self._compare_and_swap(record, current, annotations or {})
            if operations is None or not self.patch_allowed:
                break
            try:
                patched = await self.api.json_patch(self.target, operations, timeout=self.timeout)
            except Forbidden as refused:
                self.patch_allowed = False
                try:
                    return await self._replace(record, current, annotations)
                except Forbidden:
                    raise refused from None  # patch is what to grant
            except BadRequest:
                fresh = await self.get()
                if fresh is None:
                    raise NotFound(
                        f"{self.describe()} was deleted", status_code=404, reason="NotFound"
                    ) from None
                if self._shows(fresh, operations[1]["value"], annotations or {}):
                    # Our own write: sent again after a lost answer (5xx, a dropped
                    # connection), it landed the first time, so the test failed.
                    return fresh
                if self.record_value(fresh.raw) != self.record_value(current.raw):
                    raise Conflict(
                        f"the record of {self.describe()} changed since it was read",
                        status_code=409,
                        reason="Conflict",
                    ) from None
                if fresh.resource_version == current.resource_version:
                    raise  # nothing changed: the write itself is invalid
                current = fresh  # only others' annotations changed: again, on top of them
                continue
            return self._observed(patched)
        return await self._replace(record, current, annotations)

    def _shows(
        self, fresh: Observed, record_value: Any, annotations: Mapping[str, str | None]
    ) -> bool:
        """True when ``fresh`` is exactly what a write of ours would have made it."""
        if self.record_value(fresh.raw) != record_value:
            return False
        present = annotations_of(fresh.raw)
        return all(present.get(key) == value for key, value in annotations.items())

    def _compare_and_swap(
        self,
        record: LeaderElectionRecord,
        current: Observed,
        annotations: Mapping[str, str | None],
    ) -> list[dict[str, Any]] | None:
        """The JSON patch that writes ``record`` only if the record is as in ``current``.

        ``None`` when it cannot be said that way (no record to test; annotations
        to set on an object that has none, where adding the whole map could
        drop a waiter's entry added meanwhile): then a PUT it is.
        """
        tested = self.record_value(current.raw)
        existing = (current.raw.get("metadata") or {}).get("annotations")
        if tested is None or (annotations and not isinstance(existing, dict)):
            return None
        written = copy.deepcopy(current.raw)
        self.put_record(written, record)
        operations: list[dict[str, Any]] = [
            {"op": "test", "path": self.record_path, "value": tested},
            {"op": "replace", "path": self.record_path, "value": self.record_value(written)},
        ]
        for key, value in annotations.items():
            path = "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
            if value is None:
                # "remove" fails on a missing key; "add" first makes it always there.
                operations += [{"op": "add", "path": path, "value": ""}]
                operations += [{"op": "remove", "path": path}]
            else:
                operations.append({"op": "add", "path": path, "value": value})
        return operations

    async def _replace(
        self,
        record: LeaderElectionRecord,
        current: Observed,
        annotations: Mapping[str, str | None] | None,
    ) -> Observed:
        obj = copy.deepcopy(current.raw) if current.raw else {}
        obj.setdefault("apiVersion", self.target.api_version)
        obj.setdefault("kind", self.object_kind)
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("name", self.name)
        metadata.setdefault("namespace", self.namespace)
        metadata["resourceVersion"] = current.resource_version
        if annotations:
            merged = {**(metadata.get("annotations") or {}), **annotations}
            metadata["annotations"] = {k: v for k, v in merged.items() if v is not None}
        self.put_record(obj, record)
        try:
            replaced = await self.api.replace(self.target, obj, timeout=self.timeout)
        except Conflict:
            # A PUT sent again after a lost answer conflicts with its own first attempt.
            fresh = await self.get()
            if fresh is not None and self._shows(fresh, self.record_value(obj), annotations or {}):
                return fresh
            raise
        return self._observed(replaced)

    async def annotate(self, annotations: Mapping[str, str | None]) -> Observed:
        patch = {"metadata": {"annotations": dict(annotations)}}
        patched = await self.api.merge_patch(self.target, patch, timeout=self.timeout)
        return self._observed(patched)

    async def watch(
        self, resource_version: str
    ) -> AsyncGenerator[Observed | Bookmark | None, None]:
        events = self.api.watch(self.target, resource_version)
        async with aclosing(events):
            async for event in events:
                kind = event.get("type")
                obj = event.get("object")
                if kind == "DELETED":
                    yield None
                elif kind in ("ADDED", "MODIFIED") and isinstance(obj, dict):
                    yield self._observed(obj)
                elif kind == "BOOKMARK" and isinstance(obj, dict):
                    version = (obj.get("metadata") or {}).get("resourceVersion")
                    if version:
                        yield Bookmark(str(version))

    def _observed(self, obj: dict[str, Any]) -> Observed:
        metadata = obj.get("metadata") or {}
        return Observed(
            record=self.record_of(obj),
            resource_version=str(metadata.get("resourceVersion") or ""),
            raw=obj,
        )


#: The keys of a Lease spec that hold the record; other spec fields are left alone.
_RECORD_KEYS = (
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
)


class LeaseLock(ApiLock):
    """The record in a ``coordination.k8s.io/v1`` Lease's ``spec``."""

    kind = "leases"
    group = "coordination.k8s.io"
    object_kind = "Lease"
    record_path = "/spec"

    def record_value(self, obj: dict[str, Any]) -> Any:
        spec = obj.get("spec")
        return spec if isinstance(spec, dict) else None

    def record_of(self, obj: dict[str, Any]) -> LeaderElectionRecord:
        spec = obj.get("spec")
        try:
            return LeaderElectionRecord.from_lease_spec(spec if isinstance(spec, dict) else None)
        except ValueError:  # the API server checks the types; this is only for the unexpected
            return UNREADABLE_RECORD

    def put_record(self, obj: dict[str, Any], record: LeaderElectionRecord) -> None:
        spec = obj.get("spec")
        spec = {k: v for k, v in spec.items() if k not in _RECORD_KEYS} if spec else {}
        written = record.to_lease_spec()
        if not written.get("leaseDurationSeconds"):
            # The API server only accepts positive durations; unset means "none".
            del written["leaseDurationSeconds"]
        spec.update(written)
        obj["spec"] = spec
