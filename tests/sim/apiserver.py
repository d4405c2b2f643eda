"""A model of kube-apiserver, spoken to over HTTP: a test double for the simulator.

The simulator runs kubelock's real HTTP client (:class:`kubelock.kube.api.ApiClient`,
its retries and error mapping), its real lock kinds and its real election
against this model, through an httpx transport. What the model does, each
behaviour as the real server does it (``tests/integration/test_model_contract.py``
runs the same operations against both and compares):

* One revision counter for every write, as etcd's; an object's
  ``resourceVersion`` is the revision of its last change. Writes to other
  objects (:meth:`ApiServerModel.touch_elsewhere`) move the counter too.
* A write that leaves the object as it was (a no-op) is skipped: no new
  ``resourceVersion``, no watch event.
* POST: 409 ``AlreadyExists``. PUT: 409 ``Conflict`` when its
  ``metadata.resourceVersion`` is not the current one; on a missing Lease or
  Endpoints it creates the object (201), on a missing ConfigMap 404. JSON patch (RFC 6902):
  a failed ``test``, or a ``remove`` of what is not there, is 422 ``Invalid``
  with the server's generic message. Merge patch (RFC 7386). 404 ``NotFound``.
* Watch (``watch=true``, one object by field selector): from no version, an
  ADDED of the current object, then every change; from an older version,
  every change after it; from a version older than the last compaction, an
  ERROR event with a 410 Status. BOOKMARKs every minute when asked for; the
  watch ends after ``timeoutSeconds``.

Faults are per contender (:class:`Faults`): latency, a partition (the
connection is refused), a black hole (no answer), a response lost after the
write was applied, a watch dropped mid-stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import trio

__all__ = ["ApiServerModel", "Faults", "ModelTransport"]

BOOKMARK_INTERVAL = 60.0
#: The resources whose PUT creates a missing object (their strategy's AllowCreateOnUpdate).
_CREATE_ON_UPDATE = frozenset({"leases", "endpoints"})
_GENERIC_INVALID = "the server rejected our request due to an error in our request"


def _status(code: int, reason: str, message: str) -> httpx.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return httpx.Response(code, json=body)


class _Invalid(Exception):
    """A JSON patch that cannot be applied: 422."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise _Invalid(path)
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(document: Any, parts: list[str]) -> Any:
    for part in parts[:-1]:
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            raise _Invalid("/".join(parts))
    return document


def apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902's add, remove, replace and test on a copy of ``document``."""
    result = copy.deepcopy(document)
    for operation in operations:
        parts = _pointer(str(operation.get("path")))
        parent = _parent(result, parts)
        key = parts[-1]
        op = operation.get("op")
        if not isinstance(parent, dict):
            raise _Invalid("only objects are patched here")
        if op == "test":
            if key not in parent or parent[key] != operation.get("value"):
                raise _Invalid("test failed")
        elif op == "add":
            parent[key] = copy.deepcopy(operation.get("value"))
        elif op == "replace":
            if key not in parent:
                raise _Invalid("replace of a missing member")
            parent[key] = copy.deepcopy(operation.get("value"))
        elif op == "remove":
            if key not in parent:
                raise _Invalid("remove of a missing member")
            del parent[key]
        else:
            raise _Invalid(f"op {op!r}")
    return result


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def _without_version(obj: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(obj)
    stripped.get("metadata", {}).pop("resourceVersion", None)
    return stripped


@dataclasses.dataclass
class _Change:
    revision: int
    kind: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]


class ApiServerModel:
    """The objects of one namespace, their revisions, and the changes watches deliver."""

    def __init__(self) -> None:
        self.revision = 1
        self.objects: dict[str, dict[str, Any]] = {}  # by (resource, name) key
        self.changes: dict[str, list[_Change]] = {}
        self.compacted = 0
        self._wake = trio.Event()
        self.generation = 0  # bumped to end every open watch (a restart)
        self.writes = 0  # writes that changed something
        self.skipped = 0  # no-op writes

    # -- writes -------------------------------------------------------------------

    def _commit(self, key: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.revision)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.changes.setdefault(key, []).append(_Change(self.revision, kind, obj))
        self.writes += 1
        self._wake.set()
        self._wake = trio.Event()
        return copy.deepcopy(obj)

    def touch_elsewhere(self) -> None:
        """A write to some other object: the revision moves on."""
        self.revision += 1

    def compact(self) -> None:
        """Forget the history up to now, as etcd's compaction does."""
        self.compacted = self.revision
        for key, changes in self.changes.items():
            self.changes[key] = [c for c in changes if c.revision > self.compacted]

    def restart(self) -> None:
        """End every open watch, as an API server restart does."""
        self.generation += 1
        self._wake.set()
        self._wake = trio.Event()

    def delete(self, key: str) -> bool:
        current = self.objects.get(key)
        if current is None:
            return False
        self._commit(key, "DELETED", current)
        return True

    # -- the REST verbs, as responses -----------------------------------------------

    def get(self, key: str, name: str, resource: str) -> httpx.Response:
        current = self.objects.get(key)
        if current is None:
            return _not_found(resource, name)
        return httpx.Response(200, json=current)

    def create(self, key: str, name: str, resource: str, body: dict[str, Any]) -> httpx.Response:
        if key in self.objects:
            return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        body = copy.deepcopy(body)
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        return httpx.Response(201, json=self._commit(key, "ADDED", body))

    def replace(self, key: str, name: str, resource: str, body: dict[str, Any]) -> httpx.Response:
        current = self.objects.get(key)
        if current is None:
            if resource not in _CREATE_ON_UPDATE:
                return _not_found(resource, name)
            # Leases and Endpoints allow create on update, whatever version the PUT carries.
            body = copy.deepcopy(body)
            body.setdefault("metadata", {}).pop("resourceVersion", None)
            return httpx.Response(201, json=self._commit(key, "ADDED", body))
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version and version != current["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        return self._write(key, current, body)

    def json_patch(
        self, key: str, name: str, resource: str, operations: list[dict[str, Any]]
    ) -> httpx.Response:
        current = self.objects.get(key)
        if current is None:
            return _not_found(resource, name)
        try:
            patched = apply_json_patch(current, operations)
        except _Invalid:
            return _status(422, "Invalid", _GENERIC_INVALID)
        return self._write(key, current, patched)

    def merge_patch(
        self, key: str, name: str, resource: str, patch: dict[str, Any]
    ) -> httpx.Response:
        current = self.objects.get(key)
        if current is None:
            return _not_found(resource, name)
        return self._write(key, current, apply_merge_patch(current, patch))

    def _write(self, key: str, current: dict[str, Any], written: dict[str, Any]) -> httpx.Response:
        if _without_version(written) == _without_version(current):
            self.skipped += 1  # nothing changed: the server writes nothing
            return httpx.Response(200, json=current)
        return httpx.Response(200, json=self._commit(key, "MODIFIED", written))

    # -- watch --------------------------------------------------------------------

    async def events(
        self, key: str, version: str, bookmarks: bool, seconds: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of one object after ``version`` (none: its current state first)."""
        generation = self.generation
        ends_at = trio.current_time() + seconds
        if version and int(version) < self.compacted:
            yield {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": f"too old resource version: {version} ({self.compacted})",
                    "reason": "Expired",
                    "code": 410,
                },
            }
            return
        if version:
            seen = int(version)
        else:
            current = self.objects.get(key)
            if current is not None:
                yield {"type": "ADDED", "object": copy.deepcopy(current)}
            seen = self.revision
        next_bookmark = trio.current_time() + BOOKMARK_INTERVAL
        while trio.current_time() < ends_at and generation == self.generation:
            for change in self.changes.get(key, []):
                if change.revision > seen:
                    seen = change.revision
                    yield {"type": change.kind, "object": copy.deepcopy(change.obj)}
            if bookmarks and trio.current_time() >= next_bookmark:
                next_bookmark = trio.current_time() + BOOKMARK_INTERVAL
                seen = max(seen, self.revision)
                yield {
                    "type": "BOOKMARK",
                    "object": {"metadata": {"resourceVersion": str(self.revision)}},
                }
            with trio.move_on_at(min(ends_at, next_bookmark)):
                await self._wake.wait()


def _not_found(resource: str, name: str) -> httpx.Response:
    return _status(404, "NotFound", f'{resource} "{name}" not found')


@dataclasses.dataclass
class Faults:
    """One contender's network, as the simulator sets it from moment to moment."""

    rng: random.Random
    latency: float = 0.002  # mean one-way latency
    partitioned: bool = False  # connections refused
    black_hole: bool = False  # requests and answers vanish
    lose_answers: float = 0.0  # the chance an applied write's answer is lost
    drop_watches: float = 0.0  # the chance, per event, that a watch breaks
    dead: bool = False  # the process is gone: nothing it sends arrives

    def delay(self) -> float:
        return self.rng.expovariate(1 / self.latency) if self.latency else 0.0


class _WatchStream(httpx.AsyncByteStream):
    def __init__(self, events: AsyncIterator[dict[str, Any]], faults: Faults) -> None:
        self._events = events
        self._faults = faults

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in self._events:
            await trio.sleep(self._faults.delay())
            if self._faults.partitioned or self._faults.dead:
                raise httpx.ReadError("connection reset")
            if self._faults.black_hole:
                await trio.sleep_forever()
            if self._faults.drop_watches and self._faults.rng.random() < self._faults.drop_watches:
                raise httpx.ReadError("connection reset")
            yield json.dumps(event).encode() + b"\n"

    async def aclose(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


class ModelTransport(httpx.AsyncBaseTransport):
    """The model behind httpx, with one contender's faults."""

    def __init__(self, server: ApiServerModel, faults: Faults) -> None:
        self.server = server
        self.faults = faults

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        faults = self.faults
        if faults.dead:
            await trio.sleep_forever()
        if faults.partitioned:
            await trio.sleep(faults.delay())
            raise httpx.ConnectError("connection refused")
        await trio.sleep(faults.delay())
        if faults.black_hole:
            await trio.sleep_forever()
        response = await self._serve(request)
        is_write = request.method in ("POST", "PUT", "PATCH")
        await trio.sleep(faults.delay())
        if faults.black_hole or faults.dead:
            await trio.sleep_forever()
        if faults.partitioned or (
            is_write and faults.lose_answers and faults.rng.random() < faults.lose_answers
        ):
            raise httpx.ReadError("connection reset after the request was sent")
        return response

    async def _serve(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        # /api/v1/namespaces/NS/RESOURCE[/NAME] or /apis/GROUP/v1/namespaces/NS/RESOURCE[/NAME]
        index = parts.index("namespaces")
        resource = parts[index + 2]
        name = parts[index + 3] if len(parts) > index + 3 else ""
        query = parse_qs(request.url.query.decode())
        server = self.server
        if request.method == "GET" and query.get("watch") == ["true"]:
            selector = query.get("fieldSelector", [""])[0]
            watched = selector.removeprefix("metadata.name=")
            events = server.events(
                f"{resource}/{watched}",
                query.get("resourceVersion", [""])[0],
                query.get("allowWatchBookmarks") == ["true"],
                float(query.get("timeoutSeconds", ["300"])[0]),
            )
            return httpx.Response(200, stream=_WatchStream(events, self.faults))
        body: Any = json.loads(request.content) if request.content else {}
        if request.method == "POST":
            name = body["metadata"]["name"]
            return server.create(f"{resource}/{name}", name, resource, body)
        key = f"{resource}/{name}"
        if request.method == "GET":
            return server.get(key, name, resource)
        if request.method == "PUT":
            return server.replace(key, name, resource, body)
        if request.method == "DELETE":
            if not server.delete(key):
                return _not_found(resource, name)
            success = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
            return httpx.Response(200, json=success | {"details": {"name": name, "kind": resource}})
        if request.method == "PATCH":
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("application/json-patch+json"):
                return server.json_patch(key, name, resource, body)
            return server.merge_patch(key, name, resource, body)
        return _status(405, "MethodNotAllowed", request.method)
