"""Typed async calls on one Kubernetes object, over httpx under trio.

Each call names its object with a :class:`Target` (group, version, resource,
namespace, name): the path is built from it, and its words name the object
in messages. :class:`ApiClient` does ``get``, ``create``, ``replace`` (PUT),
``json_patch`` (RFC 6902: the locks' compare-and-swap, a ``test`` then the
write), ``merge_patch`` (RFC 7386: setting or removing annotations, as the
queue does) and ``watch``, and turns every failure into the tree in
:mod:`kubelock.errors` (the wording is in :mod:`kubelock.kube._errors`), with
a message that names the verb, the object and, for 403, the RBAC rule that is
missing. Which verbs a lock uses, and its fallback to PUT where ``patch`` is
not granted, is up to :mod:`kubelock.locks.lease`.

Retries (each request is bounded by its own deadline, ``timeout``):

* 429 and 5xx answers and dropped connections are retried with exponential
  backoff and full jitter, or after the server's ``Retry-After``, as long as
  the deadline allows; then the last error is raised.
* A 409 is never retried: somebody else wrote first, the caller re-reads.
* ``replace`` is retried like ``get``: it carries the ``resourceVersion`` it
  was based on, so a retry of a PUT that did land gets a 409, never a blind
  overwrite. So are the patches: a JSON patch that did land fails its own
  ``test`` when sent again (a 422), and a merge patch is the same whenever
  it lands.
* ``create`` is retried only when the server surely did not act on it (429,
  or the connection could not even be opened). Otherwise the error is raised
  and the caller re-reads: the object may exist now, possibly created by this
  very request. kubelock's election does that re-read in any case.
* After a 401 the token provider is invalidated and the request is sent once
  more with a fresh token (bound ServiceAccount tokens and exec-plugin
  tokens rotate).

Every HTTP exchange is reported to the observer as an
:class:`~kubelock.events.ApiRequest`. Tokens are never logged.

The client is layered as httpx's own: a call's retry policy and deadline
(:meth:`ApiClient._call`, and :meth:`ApiClient._open_watch` for watches) sit
on the auth layer (:meth:`ApiClient._authorized`: a fresh token once after a
401), which sits on one request (:meth:`ApiClient._send`: the exchange, its
report, transport failures).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Self

import httpx
import trio

from .._version import __version__
from ..errors import (
    ApiError,
    KubelockError,
    StatusError,
    Unreachable,
    one_line,
)
from ..events import ApiRequest, Observer
from ._errors import (
    as_dict,
    no_answer_error,
    silent_error,
    status_body,
    status_error,
    tls_rejected,
    transport_problem,
)
from .auth import ClusterConfig
from .target import Target

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

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_WATCH_SECONDS",
    "ApiClient",
    "import_httpcore_lean",
]

#: httpcore imports these whenever they are installed (h2 comes with hypercorn,
#: anyio with httpx); kubelock speaks HTTP/1.1 under trio and uses neither.
_UNUSED_BY_HTTPCORE = ("h2", "anyio")


def import_httpcore_lean() -> None:
    """Import httpcore (which httpx imports when its first client is made) without h2 and
    anyio: about 20 ms of CPU an init container saves on every start.

    They are hidden only while httpcore imports (httpcore then leaves out
    HTTP/2 and its asyncio backend), so whoever imports them later, such as
    hypercorn for ``--metrics-address``, gets them. Call it only while no
    other thread may import (the CLI does, before starting trio).
    """
    if "httpcore" in sys.modules:
        return
    hidden = [name for name in _UNUSED_BY_HTTPCORE if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        import httpcore  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


class _NoAnswer(Exception):
    """One exchange failed below HTTP (connection, TLS, dropped stream); internal to this module."""

    def __init__(self, problem: httpx.TransportError) -> None:
        super().__init__(str(problem))
        self.problem = problem
        #: The connection was never opened: the server surely did not see the request.
        self.sent_nothing = isinstance(problem, httpx.ConnectError | httpx.ConnectTimeout)
        self.tls_rejected = tls_rejected(problem)


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

    # -- the calls ---------------------------------------------------------------

    async def get(
        self,
        target: Target,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- see the module docstring
    ) -> dict[str, Any]:
        """The object ``target``; ``NotFound`` when there is none."""
        return await self._call("get", "GET", target, target.path, timeout=timeout)

    async def create(
        self,
        target: Target,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """POST ``body`` (the object ``target``) into its collection; ``AlreadyExists``
        when the name is taken.

        Not retried once the request may have reached the server: on an error
        the object may or may not exist, so re-read it.
        """
        return await self._call(
            "create",
            "POST",
            target,
            target.collection_path,
            body=body,
            may_repeat=False,
            timeout=timeout,
        )

    async def replace(
        self,
        target: Target,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """PUT ``body``; ``Conflict`` when its ``metadata.resourceVersion`` is stale."""
        return await self._call("update", "PUT", target, target.path, body=body, timeout=timeout)

    async def json_patch(
        self,
        target: Target,
        operations: list[dict[str, Any]],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """A JSON patch (RFC 6902) of ``target``; a failed ``test`` operation is a
        ``BadRequest`` (422), as is any other invalid patch: tell them apart by re-reading.
        """
        return await self._patch(target, operations, "application/json-patch+json", timeout)

    async def merge_patch(
        self,
        target: Target,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386) of ``target``: not conditional, so never a 409.

        Only for changes that are the same whenever they land (setting or, with
        ``None``, removing annotations), so it may be sent again.
        """
        return await self._patch(target, body, "application/merge-patch+json", timeout)

    async def _patch(
        self,
        target: Target,
        body: dict[str, Any] | list[dict[str, Any]],
        content_type: str,
        timeout: float | None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        return await self._call(
            "patch",
            "PATCH",
            target,
            target.path,
            body=body,
            content_type=content_type,
            timeout=timeout,
        )

    async def watch(
        self,
        target: Target,
        resource_version: str,
        *,
        timeout_seconds: int = DEFAULT_WATCH_SECONDS,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Events ``{"type": ..., "object": ...}`` for ``target`` after ``resource_version``.

        Types are ADDED, MODIFIED, DELETED and BOOKMARK. The generator ends
        when the server closes the watch (after about ``timeout_seconds``);
        an ``ERROR`` event raises its status (``Gone`` for 410: the version is
        too old, re-read and watch again). Opening the watch is bounded by
        ``timeout``; a stream that then goes silent raises ``Unreachable``.
        Close it with ``contextlib.aclosing``.
        """
        params = {
            "watch": "true",
            "fieldSelector": f"metadata.name={target.name}",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if resource_version:
            params["resourceVersion"] = resource_version
        opened = await self._open_watch(target, params, timeout)
        try:
            async for line in opened.aiter_lines():
                if not line.strip():
                    continue
                event = _decode(line, "watch", target)
                if event.get("type") == "ERROR":
                    status = event.get("object")
                    raise status_error(
                        "watch",
                        target,
                        code=int(as_dict(status).get("code") or 500),
                        status=as_dict(status),
                        source=self.config.source,
                        resource_version=resource_version,
                    )
                yield event
        except httpx.TransportError as error:
            raise Unreachable(
                f"kubelock lost its watch on {target}: {transport_problem(error)}; "
                "it will re-read the lock",
                verb="watch",
                resource=target.resource,
            ) from None
        finally:
            with trio.CancelScope(shield=True):
                await opened.aclose()

    # -- retries and deadlines --------------------------------------------------------

    async def _call(
        self,
        verb: str,
        method: str,
        target: Target,
        path: str,
        *,
        body: dict[str, Any] | list[dict[str, Any]] | None = None,
        content_type: str | None = None,
        may_repeat: bool = True,
        timeout: float | None,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """One call with its retry policy, bounded by ``timeout`` (the client's default).

        ``may_repeat``: the request may be sent again after it possibly reached
        the server (false for ``create``, which then only repeats after a 429
        or a connection that never opened).
        """
        budget = self.timeout if timeout is None else timeout
        deadline = trio.current_time() + budget
        attempt = 0
        last_error: ApiError | None = None
        while True:
            started = trio.current_time()
            error: ApiError
            retry_after: float | None = None
            with trio.move_on_at(deadline) as request_scope:
                try:
                    response = await self._authorized(
                        verb, target, method, path, json=body, content_type=content_type
                    )
                except _NoAnswer as failure:
                    error = self._no_answer(verb, target, failure)
                    if failure.tls_rejected or not (may_repeat or failure.sent_nothing):
                        raise error from None
                else:
                    if response.is_success:
                        return _as_object(response, verb, target)
                    status_error = self._failure(verb, target, response)
                    code = response.status_code
                    if code not in _RETRIED_STATUS or not (may_repeat or code == 429):
                        raise status_error
                    error, retry_after = status_error, status_error.retry_after
            if request_scope.cancelled_caught:  # the deadline passed mid-request
                self._report(verb, "error", started)
                raise self._silent(verb, target, budget, last_error)

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
        target: Target,
        params: dict[str, str],
        timeout: float | None,  # noqa: ASYNC109
    ) -> httpx.Response:
        """The open stream of a watch; its opening is bounded by ``timeout``, never retried."""
        budget = self.timeout if timeout is None else timeout
        read_timeout = float(params["timeoutSeconds"]) + WATCH_READ_MARGIN
        started = trio.current_time()
        response: httpx.Response | None = None
        with trio.move_on_after(budget):
            try:
                response = await self._authorized(
                    "watch",
                    target,
                    "GET",
                    target.collection_path,
                    params=params,
                    read_timeout=read_timeout,
                    stream=True,
                )
            except _NoAnswer as failure:
                raise self._no_answer("watch", target, failure) from None
        if response is None:
            self._report("watch", "error", started)
            raise self._silent("watch", target, budget, None)
        if response.is_success:
            return response
        raise self._failure(
            "watch", target, response, resource_version=params.get("resourceVersion", "")
        )

    # -- auth ---------------------------------------------------------------------------

    async def _authorized(
        self,
        verb: str,
        target: Target,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | list[dict[str, Any]] | None = None,
        content_type: str | None = None,
        params: dict[str, str] | None = None,
        read_timeout: float | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request with the current token; after a 401, once more with a fresh one."""
        fresh_token = False
        while True:
            headers = await self._auth_headers(verb, target)
            if content_type is not None:
                headers["Content-Type"] = content_type
            response = await self._send(
                verb,
                method,
                path,
                headers=headers,
                json=json,
                params=params,
                read_timeout=read_timeout,
                stream=stream,
            )
            if stream and not response.is_success:  # read the Status, then close
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
            return response

    async def _auth_headers(self, verb: str, target: Target) -> dict[str, str]:
        provider = self.config.token
        if provider is None:
            return {}
        token = provider.cached()  # nearly always: no thread hop per request
        try:
            if token is None:
                # May read a file or run an exec plugin: keep the event loop free.
                token = await trio.to_thread.run_sync(provider.token, abandon_on_cancel=True)
        except KubelockError as problem:
            raise ApiError(
                f"cannot {verb} {target}: no credentials: {problem}",
                verb=verb,
                resource=target.resource,
            ) from None
        return {"Authorization": f"Bearer {token}"}

    # -- one request --------------------------------------------------------------------

    async def _send(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        json: dict[str, Any] | list[dict[str, Any]] | None,
        params: dict[str, str] | None,
        read_timeout: float | None,
        stream: bool,
    ) -> httpx.Response:
        """One HTTP exchange, reported to the observer; ``_NoAnswer`` when none came."""
        started = trio.current_time()
        try:
            request = self._client.build_request(
                method,
                path,
                json=json,
                params=params,
                headers=headers,
                timeout=httpx.Timeout(None, read=read_timeout) if read_timeout else None,
                extensions=self._extensions,
            )
            response = await self._client.send(request, stream=stream)
        except httpx.TransportError as problem:
            self._report(verb, "error", started)
            raise _NoAnswer(problem) from None
        self._report(verb, str(response.status_code), started)
        return response

    def _report(self, verb: str, code: str, started: float) -> None:
        if self._observer is not None:
            self._observer(ApiRequest(verb=verb, code=code, duration=trio.current_time() - started))

    # -- what failures say --------------------------------------------------------------

    def _no_answer(self, verb: str, target: Target, failure: _NoAnswer) -> Unreachable:
        return no_answer_error(
            verb,
            target,
            failure.problem,
            failure.tls_rejected,
            self.config.server,
            self.config.source,
        )

    def _silent(
        self, verb: str, target: Target, budget: float, last_error: ApiError | None
    ) -> Unreachable:
        return silent_error(verb, target, self.config.server, budget, last_error)

    def _failure(
        self, verb: str, target: Target, response: httpx.Response, *, resource_version: str = ""
    ) -> StatusError:
        return status_error(
            verb,
            target,
            code=response.status_code,
            status=status_body(response),
            source=self.config.source,
            resource_version=resource_version,
            retry_after_header=response.headers.get("Retry-After"),
        )


def _as_object(response: httpx.Response, verb: str, target: Target) -> dict[str, Any]:
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


def _decode(line: str, verb: str, target: Target) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(
            f"cannot {verb} {target}: the API server sent a watch event that is "
            f"not JSON: {one_line(line)[:100]}",
            verb=verb,
            resource=target.resource,
        )
    return data
