"""Typed async calls on one Kubernetes object by path, over httpx under trio.

:class:`ApiClient` does four things — ``get``, ``create``, ``replace`` (PUT;
kubelock updates rather than patches, so the Roles written for the Go
kubelock, with verbs get/create/update, keep working) and ``watch`` — and
turns every failure into the tree in :mod:`kubelock.errors`, with a message
that names the verb, the object and, for 403, the RBAC rule that is missing.

Retries (each request is bounded by its own deadline, ``timeout``):

* 429 and 5xx answers and dropped connections are retried with exponential
  backoff and full jitter, or after the server's ``Retry-After``, as long as
  the deadline allows; then the last error is raised.
* A 409 is never retried: somebody else wrote first, the caller re-reads.
* ``replace`` is retried like ``get``: it carries the ``resourceVersion`` it
  was based on, so a retry of a PUT that did land gets a 409, never a blind
  overwrite.
* ``create`` is retried only when the server surely did not act on it (429,
  or the connection could not even be opened). Otherwise the error is raised
  and the caller re-reads: the object may exist now, possibly created by this
  very request. kubelock's election does that re-read in any case.
* After a 401 the token provider is invalidated and the request is sent once
  more with a fresh token (bound ServiceAccount tokens and exec-plugin
  tokens rotate).

Every HTTP exchange is reported to the observer as an
:class:`~kubelock.events.ApiRequest`. Tokens are never logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import ssl
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
import trio

from .._version import __version__
from ..errors import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    KubelockError,
    NotFound,
    ServerError,
    StatusError,
    TooManyRequests,
    Unauthorized,
    Unreachable,
)
from ..events import ApiRequest, Observer
from .auth import ClusterConfig

#: Default bound on one call, retries included, when the caller gives none.
DEFAULT_TIMEOUT = 30.0
#: How long the API server keeps a watch open before closing it cleanly.
DEFAULT_WATCH_SECONDS = 300
#: A watch that sends nothing for this long past its own timeout is presumed dead.
WATCH_READ_MARGIN = 30.0
#: Backoff between retries: full jitter over base * 2**attempt, capped.
BACKOFF_BASE = 0.2
BACKOFF_CAP = 5.0

_RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


def object_path(api_version: str, resource: str, namespace: str, name: str | None = None) -> str:
    """The path of a namespaced collection, or of one object in it.

    ``object_path("coordination.k8s.io/v1", "leases", "ns", "x")`` is
    ``/apis/coordination.k8s.io/v1/namespaces/ns/leases/x``; core ``v1``
    objects live under ``/api/v1``.
    """
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{resource}"
    return path if name is None else f"{path}/{quote(name, safe='')}"


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a request is about, for messages and RBAC advice."""

    group: str
    resource: str
    namespace: str
    name: str

    _PATH = re.compile(
        r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)"
        r"/namespaces/(?P<namespace>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?/?$"
    )

    @classmethod
    def parse(cls, path: str, name: str = "") -> _Target:
        match = cls._PATH.match(path)
        if match is None:
            return cls(group="", resource=path, namespace="", name=name)
        return cls(
            group=match["group"] or "",
            resource=match["resource"],
            namespace=match["namespace"],
            name=match["name"] or name,
        )

    def __str__(self) -> str:
        text = self.resource
        if self.name:
            text += f' "{self.name}"'
        if self.namespace:
            text += f' in namespace "{self.namespace}"'
        return text

    def rbac_rule(self, verb: str) -> str:
        return f'{{apiGroups: ["{self.group}"], resources: ["{self.resource}"], verbs: ["{verb}"]}}'


class ApiClient:
    """One connection pool to one API server; use as ``async with ApiClient(config) as api``.

    All methods are trio checkpoints and may be cancelled; a cancelled
    request is abandoned (its connection closed), never half-reported.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        observer: Observer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.config = config
        self.timeout = timeout
        self._observer = observer
        self._extensions: dict[str, Any] = {}
        if config.tls_server_name:
            self._extensions["sni_hostname"] = config.tls_server_name
        self._client = httpx.AsyncClient(
            base_url=config.server,
            verify=config.ssl_context,
            proxy=config.proxy,
            transport=transport,
            timeout=None,  # noqa: S113 -- every call is bounded by its own trio deadline
            headers={"User-Agent": f"kubelock/{__version__}", "Accept": "application/json"},
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"ApiClient({self.config.server!r}, source={self.config.source!r})"

    # -- the four calls -----------------------------------------------------------

    async def get(
        self,
        path: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- see the module docstring
    ) -> dict[str, Any]:
        """The object at ``path``; ``NotFound`` when there is none."""
        return await self._call("get", "GET", path, timeout=timeout)

    async def create(
        self,
        collection_path: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """POST ``body`` into the collection; ``AlreadyExists`` when the name is taken.

        Not retried once the request may have reached the server: on an error
        the object may or may not exist, so re-read it.
        """
        name = str((body.get("metadata") or {}).get("name") or "")
        return await self._call(
            "create", "POST", collection_path, body=body, name=name, timeout=timeout
        )

    async def replace(
        self,
        path: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """PUT ``body``; ``Conflict`` when its ``metadata.resourceVersion`` is stale."""
        return await self._call("update", "PUT", path, body=body, timeout=timeout)

    async def watch(
        self,
        collection_path: str,
        name: str,
        resource_version: str,
        *,
        timeout_seconds: int = DEFAULT_WATCH_SECONDS,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Events ``{"type": ..., "object": ...}`` for object ``name`` after ``resource_version``.

        Types are ADDED, MODIFIED, DELETED and BOOKMARK. The generator ends
        when the server closes the watch (after about ``timeout_seconds``);
        an ``ERROR`` event raises its status (``Gone`` for 410: the version is
        too old, re-read and watch again). Opening the watch is bounded by
        ``timeout``; a stream that then goes silent raises ``Unreachable``.
        Close it with ``contextlib.aclosing``.
        """
        target = _Target.parse(collection_path, name)
        params = {
            "watch": "true",
            "fieldSelector": f"metadata.name={name}",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        opened = await self._open_watch(collection_path, params, target, timeout)
        try:
            async for line in opened.aiter_lines():
                if not line.strip():
                    continue
                event = _decode(line, "watch", target)
                if event.get("type") == "ERROR":
                    status = event.get("object")
                    raise _status_error(
                        "watch",
                        target,
                        code=int(_as_dict(status).get("code") or 500),
                        status=_as_dict(status),
                        source=self.config.source,
                        resource_version=resource_version,
                    )
                yield event
        except httpx.TransportError as error:
            raise Unreachable(
                f"kubelock lost its watch on {target}: {_transport_problem(error)}; "
                "it will re-read the lock",
                verb="watch",
                resource=target.resource,
            ) from None
        finally:
            with trio.CancelScope(shield=True):
                await opened.aclose()

    # -- machinery ------------------------------------------------------------------

    async def _call(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        name: str = "",
        timeout: float | None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        budget = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + budget
        target = _Target.parse(path, name)
        attempt = 0
        fresh_token = False
        last_error: ApiError | None = None

        while True:
            response: httpx.Response | None = None
            error: ApiError | None = None
            sent_nothing = False
            started = trio.current_time()
            with trio.move_on_at(deadline):
                try:
                    request = self._client.build_request(
                        method,
                        path,
                        json=body,
                        headers=await self._auth_headers(verb, target),
                        extensions=self._extensions,
                    )
                    response = await self._client.send(request)
                except httpx.TransportError as problem:
                    self._report(verb, "error", started)
                    if _tls_rejected(problem):
                        raise Unreachable(
                            f"cannot {verb} {target}: the API server's TLS "
                            f"certificate was not accepted ({_transport_problem(problem)}); "
                            f"check the certificate authority in {self.config.source}",
                            verb=verb,
                            resource=target.resource,
                        ) from None
                    sent_nothing = isinstance(problem, httpx.ConnectError | httpx.ConnectTimeout)
                    error = Unreachable(
                        f"cannot {verb} {target}: no answer from the API server at "
                        f"{self.config.server} ({_transport_problem(problem)}); "
                        "check that it runs and is reachable",
                        verb=verb,
                        resource=target.resource,
                    )
            if response is None and error is None:  # the deadline passed mid-request
                self._report(verb, "error", started)
                hint = f" (last error: {last_error})" if last_error is not None else ""
                raise Unreachable(
                    f"cannot {verb} {target}: no answer from the API server at "
                    f"{self.config.server} within {budget:g}s; check that it runs and is "
                    f"reachable{hint}",
                    verb=verb,
                    resource=target.resource,
                )

            retry_after: float | None = None
            if response is not None:
                self._report(verb, str(response.status_code), started)
                if response.is_success:
                    return _as_object(response, verb, target)
                if (
                    response.status_code == 401
                    and not fresh_token
                    and self.config.token is not None
                ):
                    self.config.token.invalidate()
                    fresh_token = True
                    continue
                status_error = _status_error(
                    verb,
                    target,
                    code=response.status_code,
                    status=_status_body(response),
                    source=self.config.source,
                    retry_after_header=response.headers.get("Retry-After"),
                )
                retryable = response.status_code in _RETRIED_STATUS and (
                    verb != "create" or response.status_code == 429
                )
                if not retryable:
                    raise status_error
                error = status_error
                retry_after = status_error.retry_after
            else:
                assert error is not None
                if verb == "create" and not sent_nothing:
                    raise error

            delay = (
                retry_after
                if retry_after is not None
                else random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            )
            if trio.current_time() + delay >= deadline:
                raise error
            last_error = error
            attempt += 1
            await trio.sleep(delay)

    async def _open_watch(
        self,
        path: str,
        params: dict[str, str],
        target: _Target,
        timeout: float | None,  # noqa: ASYNC109
    ) -> httpx.Response:
        budget = self.timeout if timeout is None else timeout
        read_timeout = float(params["timeoutSeconds"]) + WATCH_READ_MARGIN
        fresh_token = False
        while True:
            started = trio.current_time()
            response: httpx.Response | None = None
            with trio.move_on_after(budget):
                try:
                    request = self._client.build_request(
                        "GET",
                        path,
                        params=params,
                        headers=await self._auth_headers("watch", target),
                        timeout=httpx.Timeout(None, read=read_timeout),
                        extensions=self._extensions,
                    )
                    response = await self._client.send(request, stream=True)
                except httpx.TransportError as problem:
                    self._report("watch", "error", started)
                    raise Unreachable(
                        f"cannot watch {target}: no answer from the API server at "
                        f"{self.config.server} ({_transport_problem(problem)}); "
                        "check that it runs and is reachable",
                        verb="watch",
                        resource=target.resource,
                    ) from None
            if response is None:
                self._report("watch", "error", started)
                raise Unreachable(
                    f"cannot watch {target}: no answer from the API server at "
                    f"{self.config.server} within {budget:g}s; check that it runs and is reachable",
                    verb="watch",
                    resource=target.resource,
                )
            self._report("watch", str(response.status_code), started)
            if response.is_success:
                return response
            with trio.CancelScope(shield=True):
                try:
                    await response.aread()
                except httpx.TransportError:
                    pass
                finally:
                    await response.aclose()
            if response.status_code == 401 and not fresh_token and self.config.token is not None:
                self.config.token.invalidate()
                fresh_token = True
                continue
            raise _status_error(
                "watch",
                target,
                code=response.status_code,
                status=_status_body(response),
                source=self.config.source,
                resource_version=params.get("resourceVersion", ""),
                retry_after_header=response.headers.get("Retry-After"),
            )

    async def _auth_headers(self, verb: str, target: _Target) -> dict[str, str]:
        provider = self.config.token
        if provider is None:
            return {}
        try:
            # May read a file or run an exec plugin: keep the event loop free.
            token = await trio.to_thread.run_sync(provider.token, abandon_on_cancel=True)
        except KubelockError as problem:
            raise ApiError(
                f"cannot {verb} {target}: no credentials: {problem}",
                verb=verb,
                resource=target.resource,
            ) from None
        return {"Authorization": f"Bearer {token}"}

    def _report(self, verb: str, code: str, started: float) -> None:
        if self._observer is not None:
            self._observer(ApiRequest(verb=verb, code=code, duration=trio.current_time() - started))


# -- Status → exception ---------------------------------------------------------


def _status_error(
    verb: str,
    target: _Target,
    *,
    code: int,
    status: dict[str, Any],
    source: str,
    resource_version: str = "",
    retry_after_header: str | None = None,
) -> StatusError:
    """The exception for a failure ``Status``, with a message for people."""
    reason = str(status.get("reason") or "")
    server = _one_line(str(status.get("message") or reason or f"HTTP {code}"))
    retry_after = _retry_after(retry_after_header, status)
    head = f"cannot {verb} {target}"

    kind: type[StatusError]
    if code in (400, 422):
        kind = BadRequest
        text = (
            f"{head}: the API server rejected the request as invalid (HTTP {code}), "
            "so kubelock stops instead of retrying; fix what the server names"
        )
    elif code == 401:
        kind = Unauthorized
        text = (
            f"{head}: the API server did not accept the credentials from {source}; "
            "renew the token or fix the kubeconfig"
        )
    elif code == 403:
        kind = Forbidden
        text = f"{head}: forbidden. Grant the verb with a Role rule {target.rbac_rule(verb)}"
    elif code == 404:
        kind = NotFound
        text = f"{head}: not found; check the namespace and the name"
    elif code == 409 and reason == "AlreadyExists":
        kind = AlreadyExists
        text = f"{head}: it already exists (somebody else created it first); re-read it"
    elif code == 409:
        kind = Conflict
        text = f"{head}: it changed since it was read (conflict); re-read it, never overwrite"
    elif code == 410:
        kind = Gone
        version = f' "{resource_version}"' if resource_version else ""
        text = f"{head}: the resourceVersion{version} is too old (gone); re-read and watch again"
    elif code == 429:
        kind = TooManyRequests
        text = f"{head}: the API server asks to slow down (too many requests); retry later"
    elif code >= 500:
        kind = ServerError
        text = (
            f"{head}: the API server failed (HTTP {code}); retry later or check the control plane"
        )
    else:
        kind = StatusError
        text = f"{head}: unexpected answer HTTP {code}"
    return kind(
        f"{text}. The server said: {server}",
        status_code=code,
        reason=reason,
        server_message=server,
        verb=verb,
        resource=target.resource,
        retry_after=retry_after,
    )


def _status_body(response: httpx.Response) -> dict[str, Any]:
    """The ``Status`` object of a failed reply, or a stand-in built from its text."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("kind") == "Status":
        return data
    text = _one_line(response.text)[:200] if response.text else ""
    return {"message": text or response.reason_phrase or f"HTTP {response.status_code}"}


def _retry_after(header: str | None, status: dict[str, Any]) -> float | None:
    """Seconds to wait, from the ``Retry-After`` header or ``details.retryAfterSeconds``."""
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass  # an HTTP date: the API server never sends one
    details = _as_dict(status.get("details"))
    seconds = details.get("retryAfterSeconds")
    if isinstance(seconds, int | float) and seconds > 0:
        return float(seconds)
    return None


def _as_object(response: httpx.Response, verb: str, target: _Target) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise ApiError(
            f"cannot {verb} {target}: the API server answered "
            f"HTTP {response.status_code} with something that is not a JSON object; "
            "is the server address right?",
            verb=verb,
            resource=target.resource,
        )
    return data


def _decode(line: str, verb: str, target: _Target) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(
            f"cannot {verb} {target}: the API server sent a watch event that is "
            f"not JSON: {_one_line(line)[:100]}",
            verb=verb,
            resource=target.resource,
        )
    return data


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tls_rejected(error: BaseException) -> bool:
    return any(isinstance(cause, ssl.SSLError) for cause in _causes(error))


def _transport_problem(error: httpx.TransportError) -> str:
    """The most specific words for a failed exchange: the OS's or the TLS library's."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return getattr(cause, "verify_message", None) or str(cause)
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
    text = _one_line(str(error))
    return text or type(error).__name__


def _causes(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            seen.extend(current.exceptions)
        current = current.__cause__ or current.__context__
    return seen


def _one_line(text: str) -> str:
    return " ".join(text.split())
