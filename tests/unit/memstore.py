"""An in-memory lock store: a test double for the election's unit tests only.

It keeps one object with a resourceVersion, rejects stale writes with
``Conflict`` exactly as the API server does, and streams changes to watchers.
As the API server does, it skips a write that changes nothing: no new
resourceVersion, no watch event. With ``whole_seconds`` it keeps the record's
times as Endpoints and ConfigMap locks do (the annotation's whole seconds),
so two renewals in one second write the same record.

resourceVersions are global, as etcd's revision is: ``others_wrote`` moves
them on without touching the lock, ``compact`` forgets the older ones (a
watch from there is refused with ``Gone``), ``bookmark`` tells open watches
the newest one, ``expire_watches`` ends them with ``Gone``.
Each contender gets its own :class:`MemoryLock` view, so faults (a partition,
a hanging request) can be injected for one contender while others go on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Mapping

import trio

from kubelock.errors import AlreadyExists, Conflict, Forbidden, Gone, NotFound, Unreachable
from kubelock.locks.base import Bookmark, Observed
from kubelock.locks.record import LeaderElectionRecord


class _GoneMarker:
    """Sent down a watch's channel: the watch ends with ``Gone`` (410)."""


_GONE = _GoneMarker()
_WatchItem = Observed | Bookmark | _GoneMarker | None


@dataclasses.dataclass
class Write:
    """One accepted write, for history checks."""

    at: float  # trio time
    by: str  # the view that wrote it
    record: LeaderElectionRecord
    resource_version: str
    verb: str = "update"  # "patch": a queue entry, the record untouched


class MemoryBackend:
    """The shared 'API server': one object, its versions and its watchers."""

    def __init__(self, compare: str = "record", *, whole_seconds: bool = False) -> None:
        # "record": a write fails when the record changed since it was read (the
        # compare-and-swap patch); "version": when anything did (a PUT with the
        # resourceVersion, as for a Role without patch).
        self.compare = compare
        self.whole_seconds = whole_seconds
        self.current: Observed | None = None
        self.version = 0
        self.history: list[Write] = []  # writes of the record
        self.patches: list[Write] = []  # queue entries (merge patches), the record untouched
        self.skipped: list[Write] = []  # writes that changed nothing (no version, no event)
        self._watchers: list[trio.MemorySendChannel[_WatchItem]] = []
        self.compacted_below = 0
        self.deliver_to_watchers = True  # False: watches stay open but silent

    def _store(
        self,
        record: LeaderElectionRecord,
        by: str,
        annotations: Mapping[str, str | None] | None = None,
        verb: str = "update",
    ) -> Observed:
        if self.whole_seconds:
            record = LeaderElectionRecord.from_annotation(record.to_annotation())
        raw = self.current.raw if self.current is not None else {}
        kept = dict((raw.get("metadata") or {}).get("annotations") or {})
        kept.update(annotations or {})
        kept = {key: value for key, value in kept.items() if value is not None}
        if (
            self.current is not None
            and self.current.record == record
            and kept == dict((raw.get("metadata") or {}).get("annotations") or {})
        ):
            # The API server skips a write that changes nothing.
            version = self.current.resource_version
            self.skipped.append(Write(trio.current_time(), by, record, version))
            return self.current
        self.version += 1
        observed = Observed(
            record=record,
            resource_version=str(self.version),
            raw={"metadata": {"annotations": kept}} if kept else {},
        )
        self.current = observed
        write = Write(trio.current_time(), by, record, observed.resource_version, verb)
        (self.history if verb == "update" else self.patches).append(write)
        if self.deliver_to_watchers:
            self._send(observed)
        return observed

    def _send(self, item: _WatchItem) -> None:
        for send in list(self._watchers):
            try:
                send.send_nowait(item)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.remove(send)

    def delete(self) -> None:
        """``kubectl delete``: the object is gone; watchers get a deletion."""
        self.version += 1
        self.current = None
        self._send(None)

    def others_wrote(self, writes: int = 1) -> None:
        """Writes to other objects: the global resourceVersion moves on, the lock's stays."""
        self.version += writes

    def compact(self) -> None:
        """Forget every version older than the newest: watches from them get ``Gone``."""
        self.compacted_below = self.version

    def bookmark(self) -> None:
        """A BOOKMARK to every open watch: nothing changed up to the newest version."""
        self._send(Bookmark(str(self.version)))

    def expire_watches(self) -> None:
        """End every open watch with ``Gone``, as a server whose watch cache moved past it."""
        self._send(_GONE)
        self.drop_watches()

    def write(
        self,
        record: LeaderElectionRecord,
        by: str = "admin",
        annotations: Mapping[str, str | None] | None = None,
    ) -> Observed:
        """A write by somebody outside the election (an admin editing the Lease)."""
        return self._store(record, by, annotations)

    def drop_watches(self) -> None:
        """End every open watch, as an API server restart does."""
        for send in self._watchers:
            send.close()
        self._watchers.clear()


class MemoryLock:
    """One contender's view of the backend, with injectable faults."""

    kind = "leases"
    namespace = "test"

    def __init__(self, backend: MemoryBackend, view: str, name: str = "lock") -> None:
        self.backend = backend
        self.view = view
        self.name = name
        self.latency = 0.0
        self.get_answer_latency = 0.0  # a GET reads at once, and its answer takes this long
        self.partitioned = False  # requests fail at once, as with connection refused
        self.hanging = False  # requests never answer (until cancelled)
        self.watch_forbidden = False
        self.patch_forbidden = False
        self.requests: list[str] = []
        self.lose_answers = 0  # this many updates land, but their answers are lost
        self.update_answer_latency = 0.0  # an update lands at once; its answer takes this long

    def describe(self) -> str:
        return f"leases {self.namespace}/{self.name}"

    async def _request(self, verb: str) -> None:
        self.requests.append(verb)
        if self.hanging:
            await trio.sleep_forever()
        if self.latency:
            # The answer arrives when the sleep ends: acted upon with no further checkpoint.
            await trio.sleep(self.latency)
        else:
            await trio.lowlevel.checkpoint()
        if self.partitioned:
            raise Unreachable(f"cannot reach the API server ({verb})", verb=verb)

    async def get(self) -> Observed | None:
        await self._request("get")
        current = self.backend.current
        if self.get_answer_latency:
            await trio.sleep(self.get_answer_latency)
        return current

    async def create(self, record: LeaderElectionRecord) -> Observed:
        await self._request("create")
        if self.backend.current is not None:
            raise AlreadyExists("already exists", status_code=409, reason="AlreadyExists")
        return self.backend._store(record, self.view)

    async def update(
        self,
        record: LeaderElectionRecord,
        current: Observed,
        *,
        annotations: Mapping[str, str | None] | None = None,
    ) -> Observed:
        await self._request("update")
        stored = self.backend.current
        if stored is None:
            raise NotFound("not found", status_code=404, reason="NotFound")
        if (
            stored.record != current.record
            if self.backend.compare == "record"
            else stored.resource_version != current.resource_version
        ):
            raise Conflict("the object has been modified", status_code=409, reason="Conflict")
        stored = self.backend._store(record, self.view, annotations)
        if self.update_answer_latency:
            await trio.sleep(self.update_answer_latency)
        if self.lose_answers:
            self.lose_answers -= 1
            raise Unreachable("the connection dropped before the answer came", verb="update")
        return stored

    async def annotate(self, annotations: Mapping[str, str | None]) -> Observed:
        await self._request("patch")
        if self.patch_forbidden:
            raise Forbidden("patch is forbidden", status_code=403, reason="Forbidden")
        stored = self.backend.current
        if stored is None:
            raise NotFound("not found", status_code=404, reason="NotFound")
        return self.backend._store(stored.record, self.view, annotations, verb="patch")

    async def watch(
        self, resource_version: str
    ) -> AsyncGenerator[Observed | Bookmark | None, None]:
        await self._request("watch")
        if self.watch_forbidden:
            raise Forbidden("watch is forbidden", status_code=403, reason="Forbidden")
        if resource_version and int(resource_version) < self.backend.compacted_below:
            raise Gone("too old resource version", status_code=410, reason="Expired")
        send, receive = trio.open_memory_channel[_WatchItem](100)
        self.backend._watchers.append(send)
        current = self.backend.current
        if current is not None and int(current.resource_version) > int(resource_version or 0):
            yield current
        # Closed without a checkpoint, as the real watch closes its stream shielded.
        with receive:
            async for item in receive:
                if isinstance(item, _GoneMarker):
                    raise Gone("too old resource version", status_code=410, reason="Expired")
                yield item
