"""The API client's policy, against a scripted transport: which answers are retried,
for how long, what 401 does, and what the messages say.

Everything is also exercised against a real kube-apiserver in tests/integration;
answers a real server will not give on demand (429, 503, dropped connections)
are scripted here.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from kubelock.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unreachable,
)
from kubelock.events import ApiRequest, Event
from kubelock.kube.api import ApiClient
from kubelock.kube.auth import ClusterConfig
from kubelock.kube.target import Target

from .fresh import output_of

LEASE = Target("coordination.k8s.io", "v1", "leases", "ns", "app")
LEASE_PATH = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/app"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Virtual time, but let real worker threads (the token read) finish before jumping.
    return trio.testing.MockClock(autojump_threshold=0.05)


class Tokens:
    """A token provider that hands out tok-1, tok-2, ... one per invalidation."""

    def __init__(self) -> None:
        self.generation = 1
        self.invalidations = 0

    def token(self) -> str:
        return f"tok-{self.generation}"

    def invalidate(self) -> None:
        self.invalidations += 1
        self.generation += 1

    def cached(self) -> str | None:
        return self.token()


class SlowTokens(Tokens):
    """Never at hand: every request asks token() in a worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def token(self) -> str:
        self.threads.append(threading.current_thread().name)
        return super().token()

    def cached(self) -> str | None:
        return None


def status(code: int, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
        **extra,
    }


class Script:
    """Answers requests in turn and remembers them."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        return await answer(request)


def client(script: Script, tokens: Tokens | None = None) -> tuple[ApiClient, list[Event]]:
    events: list[Event] = []
    config = ClusterConfig(
        server="https://api.example:6443",
        ssl_context=ssl.create_default_context(),
        namespace="ns",
        source="kubeconfig /k (context c)",
        token=tokens if tokens is not None else Tokens(),
    )
    api = ApiClient(config, observer=events.append, transport=httpx.MockTransport(script))
    return api, events


def codes(events: list[Event]) -> list[str]:
    return [e.code for e in events if isinstance(e, ApiRequest)]


LEASE_OBJECT = {"kind": "Lease", "metadata": {"name": "app", "resourceVersion": "7"}}


async def test_get_returns_the_object_and_reports_the_request() -> None:
    script = Script(httpx.Response(200, json=LEASE_OBJECT))
    api, events = client(script)
    async with api:
        assert await api.get(LEASE) == LEASE_OBJECT
    request = script.requests[0]
    assert request.method == "GET"
    assert request.url == f"https://api.example:6443{LEASE_PATH}"
    assert request.headers["Authorization"] == "Bearer tok-1"
    assert request.headers["User-Agent"].startswith("kubelock/")
    [event] = events
    assert isinstance(event, ApiRequest)
    assert (event.verb, event.code) == ("get", "200")


async def test_server_path_prefix_is_kept() -> None:
    script = Script(httpx.Response(200, json=LEASE_OBJECT))
    api, _ = client(script)
    api = ApiClient(
        ClusterConfig(
            server="https://proxy.example/k8s/clusters/c-1",
            ssl_context=ssl.create_default_context(),
        ),
        transport=httpx.MockTransport(script),
    )
    async with api:
        await api.get(LEASE)
    assert script.requests[0].url.path == f"/k8s/clusters/c-1{LEASE_PATH}"


async def test_forbidden_names_the_verb_the_object_and_the_missing_rule() -> None:
    server_words = (
        'leases.coordination.k8s.io "app" is forbidden: User "bob" cannot update resource '
        '"leases" in API group "coordination.k8s.io" in the namespace "ns"'
    )
    script = Script(httpx.Response(403, json=status(403, "Forbidden", server_words)))
    api, _ = client(script)
    async with api:
        with pytest.raises(Forbidden) as raised:
            await api.replace(LEASE, LEASE_OBJECT)
    assert str(raised.value) == (
        'cannot update leases "app" in namespace "ns": forbidden. Grant the verb with '
        'a Role rule {apiGroups: ["coordination.k8s.io"], resources: ["leases"], '
        f'verbs: ["update"]}}. The server said: {server_words}'
    )
    assert raised.value.server_message == server_words
    assert len(script.requests) == 1


async def test_forbidden_core_resource_names_the_core_group() -> None:
    script = Script(httpx.Response(403, json=status(403, "Forbidden", "no")))
    api, _ = client(script)
    async with api:
        with pytest.raises(Forbidden, match=r'apiGroups: \[""\], resources: \["endpoints"\]'):
            await api.create(
                Target("", "v1", "endpoints", "ns", "app"), {"metadata": {"name": "app"}}
            )


async def test_conflict_is_never_retried() -> None:
    script = Script(httpx.Response(409, json=status(409, "Conflict", "the object was modified")))
    api, events = client(script)
    async with api:
        with pytest.raises(Conflict) as raised:
            await api.replace(LEASE, LEASE_OBJECT)
    assert not isinstance(raised.value, AlreadyExists)
    assert "re-read" in str(raised.value)
    assert codes(events) == ["409"]


async def test_already_exists_on_create() -> None:
    script = Script(
        httpx.Response(409, json=status(409, "AlreadyExists", 'leases "app" already exists'))
    )
    api, _ = client(script)
    async with api:
        with pytest.raises(AlreadyExists, match='cannot create leases "app" in namespace "ns"'):
            await api.create(LEASE, {"metadata": {"name": "app"}})
    assert json.loads(script.requests[0].content) == {"metadata": {"name": "app"}}


async def test_not_found() -> None:
    script = Script(httpx.Response(404, json=status(404, "NotFound", 'leases "app" not found')))
    api, _ = client(script)
    async with api:
        with pytest.raises(NotFound):
            await api.get(LEASE)


async def test_unauthorized_fetches_a_fresh_token_and_retries_once() -> None:
    tokens = Tokens()
    script = Script(
        httpx.Response(401, json=status(401, "Unauthorized", "Unauthorized")),
        httpx.Response(200, json=LEASE_OBJECT),
    )
    api, events = client(script, tokens)
    async with api:
        assert await api.get(LEASE) == LEASE_OBJECT
    assert [r.headers["Authorization"] for r in script.requests] == [
        "Bearer tok-1",
        "Bearer tok-2",
    ]
    assert codes(events) == ["401", "200"]


async def test_a_token_not_at_hand_is_fetched_in_a_worker_thread() -> None:
    tokens = SlowTokens()
    script = Script(
        httpx.Response(401, json=status(401, "Unauthorized", "Unauthorized")),
        httpx.Response(200, json=LEASE_OBJECT),
    )
    api, _ = client(script, tokens)
    async with api:
        assert await api.get(LEASE) == LEASE_OBJECT
    assert [r.headers["Authorization"] for r in script.requests] == [
        "Bearer tok-1",
        "Bearer tok-2",
    ]
    assert len(tokens.threads) == 2
    assert threading.main_thread().name not in tokens.threads


async def test_unauthorized_twice_is_an_error_without_the_token() -> None:
    tokens = Tokens()
    script = Script(httpx.Response(401, json=status(401, "Unauthorized", "Unauthorized")))
    api, _ = client(script, tokens)
    async with api:
        with pytest.raises(Unauthorized) as raised:
            await api.get(LEASE)
    assert len(script.requests) == 2
    assert tokens.invalidations == 1
    assert "tok-" not in str(raised.value)
    assert "kubeconfig /k (context c)" in str(raised.value)


async def test_too_many_requests_waits_for_retry_after(clock: trio.testing.MockClock) -> None:
    script = Script(
        httpx.Response(
            429, headers={"Retry-After": "3"}, json=status(429, "TooManyRequests", "slow down")
        ),
        httpx.Response(200, json=LEASE_OBJECT),
    )
    api, events = client(script)
    async with api:
        started = trio.current_time()
        await api.get(LEASE, timeout=10)
        assert trio.current_time() - started >= 3
    assert codes(events) == ["429", "200"]


async def test_retry_after_beyond_the_deadline_gives_up_at_once(
    clock: trio.testing.MockClock,
) -> None:
    script = Script(
        httpx.Response(
            429, headers={"Retry-After": "30"}, json=status(429, "TooManyRequests", "slow down")
        )
    )
    api, _ = client(script)
    async with api:
        started = trio.current_time()
        with pytest.raises(TooManyRequests) as raised:
            await api.get(LEASE, timeout=10)
        assert trio.current_time() - started < 1
    assert raised.value.retry_after == 30
    assert len(script.requests) == 1


async def test_server_errors_are_retried_until_the_deadline(clock: trio.testing.MockClock) -> None:
    script = Script(httpx.Response(503, text="upstream unavailable"))
    api, events = client(script)
    async with api:
        started = trio.current_time()
        with pytest.raises(ServerError, match=r"HTTP 503.*upstream unavailable"):
            await api.replace(LEASE, LEASE_OBJECT, timeout=5)
        assert trio.current_time() - started <= 5
    assert len(script.requests) > 3
    assert set(codes(events)) == {"503"}


async def test_server_error_then_success(clock: trio.testing.MockClock) -> None:
    script = Script(
        httpx.Response(500, json=status(500, "InternalError", "etcd leader changed")),
        httpx.Response(200, json=LEASE_OBJECT),
    )
    api, _ = client(script)
    async with api:
        assert await api.replace(LEASE, LEASE_OBJECT) == LEASE_OBJECT


async def test_create_is_not_retried_after_a_server_error() -> None:
    # It may have landed: the caller re-reads instead.
    script = Script(httpx.Response(504, json=status(504, "Timeout", "timed out")))
    api, _ = client(script)
    async with api:
        with pytest.raises(ServerError):
            await api.create(LEASE, {"metadata": {"name": "app"}})
    assert len(script.requests) == 1


async def test_create_is_not_retried_after_the_connection_dropped() -> None:
    script = Script(httpx.ReadError("connection reset"))
    api, events = client(script)
    async with api:
        with pytest.raises(Unreachable, match="no answer from the API server"):
            await api.create(LEASE, {"metadata": {"name": "app"}})
    assert len(script.requests) == 1
    assert codes(events) == ["error"]


async def test_create_is_retried_when_nothing_was_sent(clock: trio.testing.MockClock) -> None:
    script = Script(
        httpx.ConnectError("connection refused"),
        httpx.Response(429, json=status(429, "TooManyRequests", "slow down")),
        httpx.Response(201, json=LEASE_OBJECT),
    )
    api, events = client(script)
    async with api:
        assert await api.create(LEASE, {"metadata": {"name": "app"}}) == LEASE_OBJECT
    assert codes(events) == ["error", "429", "201"]


async def test_dropped_connection_on_get_is_retried(clock: trio.testing.MockClock) -> None:
    script = Script(httpx.ReadError("reset"), httpx.Response(200, json=LEASE_OBJECT))
    api, _ = client(script)
    async with api:
        assert await api.get(LEASE) == LEASE_OBJECT


async def test_unreachable_within_the_timeout(clock: trio.testing.MockClock) -> None:
    script = Script(httpx.ConnectError("connection refused"))
    api, _ = client(script)
    async with api:
        started = trio.current_time()
        with pytest.raises(Unreachable, match=r"https://api\.example:6443"):
            await api.get(LEASE, timeout=2)
        assert trio.current_time() - started <= 2


async def test_a_silent_server_is_unreachable_at_the_deadline(
    clock: trio.testing.MockClock,
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    api, events = client(Script(hang))
    async with api:
        started = trio.current_time()
        with pytest.raises(Unreachable, match="within 2s"):
            await api.get(LEASE, timeout=2)
        assert trio.current_time() - started == pytest.approx(2)
    assert codes(events) == ["error"]


async def test_tls_failures_are_not_retried() -> None:
    failure = httpx.ConnectError("tls")
    failure.__cause__ = ssl.SSLCertVerificationError(1, "certificate verify failed")
    script = Script(failure)
    api, _ = client(script)
    async with api:
        with pytest.raises(Unreachable, match="TLS certificate was not accepted"):
            await api.get(LEASE)
    assert len(script.requests) == 1


async def test_an_answer_that_is_not_json() -> None:
    api, _ = client(Script(httpx.Response(200, text="<html>proxy login</html>")))
    async with api:
        with pytest.raises(ApiError, match="not a JSON object"):
            await api.get(LEASE)


def watch_body(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


async def test_watch_asks_for_one_object_and_yields_its_events() -> None:
    modified = {"type": "MODIFIED", "object": LEASE_OBJECT}
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
    script = Script(httpx.Response(200, content=watch_body(modified, bookmark)))
    api, events = client(script)
    async with api, aclosing(api.watch(LEASE, "7", timeout_seconds=60)) as stream:
        seen = [event async for event in stream]
    assert seen == [modified, bookmark]
    params = script.requests[0].url.params
    assert params["watch"] == "true"
    assert params["fieldSelector"] == "metadata.name=app"
    assert params["resourceVersion"] == "7"
    assert params["allowWatchBookmarks"] == "true"
    assert params["timeoutSeconds"] == "60"
    assert codes(events) == ["200"]


async def test_watch_error_410_is_gone() -> None:
    too_old = {"type": "ERROR", "object": status(410, "Expired", "too old resource version: 1")}
    api, _ = client(Script(httpx.Response(200, content=watch_body(too_old))))
    async with api:
        with pytest.raises(Gone, match='resourceVersion "1" is too old'):
            async with aclosing(api.watch(LEASE, "1")) as stream:
                async for _ in stream:
                    pass


async def test_watch_forbidden_names_the_watch_rule() -> None:
    api, _ = client(Script(httpx.Response(403, json=status(403, "Forbidden", "no"))))
    async with api:
        with pytest.raises(Forbidden, match=r'cannot watch leases "app".*verbs: \["watch"\]'):
            async with aclosing(api.watch(LEASE, "1")) as stream:
                async for _ in stream:
                    pass


async def test_watch_retries_once_with_a_fresh_token() -> None:
    tokens = Tokens()
    script = Script(
        httpx.Response(401, json=status(401, "Unauthorized", "Unauthorized")),
        httpx.Response(200, content=watch_body({"type": "ADDED", "object": LEASE_OBJECT})),
    )
    api, _ = client(script, tokens)
    async with api, aclosing(api.watch(LEASE, "")) as stream:
        seen = [event async for event in stream]
    assert len(seen) == 1
    assert "resourceVersion" not in script.requests[1].url.params
    assert tokens.invalidations == 1


def test_httpcore_is_imported_without_http2_and_asyncio_which_stay_importable() -> None:
    check = (
        "import sys; from kubelock.kube.api import import_httpcore_lean; "
        "import_httpcore_lean(); "
        "print(sorted(m for m in ('httpcore', 'h2', 'anyio') if m in sys.modules)); "
        "import h2.connection, anyio; print('importable')"
    )
    shown = output_of(check)
    assert shown.split() == ["['httpcore']", "importable"]
