"""What failures say: Kubernetes ``Status`` replies and transport failures, as exceptions.

A failed reply's ``Status`` becomes one exception of the tree in
:mod:`kubelock.errors` (:func:`status_error`), its message naming the verb,
the object and, for 403, the RBAC rule that is missing, then the server's own
words. A failure below HTTP (connection refused, TLS rejected, no answer
within the deadline) becomes :class:`~kubelock.errors.Unreachable`, in the
most specific words the OS or the TLS library gave (:func:`transport_problem`).
Only :mod:`kubelock.kube.api` uses this module.
"""

from __future__ import annotations

import json
import os
import ssl
from typing import Any

import httpx

from ..errors import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ServerError,
    StatusError,
    TooManyRequests,
    Unauthorized,
    Unreachable,
    one_line,
)
from .target import Target


def status_error(
    verb: str,
    target: Target,
    *,
    code: int,
    status: dict[str, Any],
    source: str,
    resource_version: str = "",
    retry_after_header: str | None = None,
) -> StatusError:
    """The exception for a failure ``Status``, with a message for people."""
    reason = str(status.get("reason") or "")
    server = one_line(str(status.get("message") or reason or f"HTTP {code}"))
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


def status_body(response: httpx.Response) -> dict[str, Any]:
    """The ``Status`` object of a failed reply, or a stand-in built from its text."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict) and data.get("kind") == "Status":
        return data
    text = one_line(response.text)[:200] if response.text else ""
    return {"message": text or response.reason_phrase or f"HTTP {response.status_code}"}


def _retry_after(header: str | None, status: dict[str, Any]) -> float | None:
    """Seconds to wait, from the ``Retry-After`` header or ``details.retryAfterSeconds``."""
    if header:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass  # an HTTP date: the API server never sends one
    details = as_dict(status.get("details"))
    seconds = details.get("retryAfterSeconds")
    if isinstance(seconds, int | float) and seconds > 0:
        return float(seconds)
    return None


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def no_answer_error(
    verb: str,
    target: Target,
    problem: httpx.TransportError,
    tls_was_rejected: bool,
    server: str,
    source: str,
) -> Unreachable:
    """An exchange that failed below HTTP: the TLS certificate, or no answer at all."""
    words = transport_problem(problem)
    if tls_was_rejected:
        text = (
            f"cannot {verb} {target}: the API server's TLS certificate was not accepted "
            f"({words}); check the certificate authority in {source}"
        )
    else:
        text = (
            f"cannot {verb} {target}: no answer from the API server at "
            f"{server} ({words}); check that it runs and is reachable"
        )
    return Unreachable(text, verb=verb, resource=target.resource)


def silent_error(
    verb: str, target: Target, server: str, budget: float, last_error: ApiError | None
) -> Unreachable:
    """No answer within the call's deadline (``budget`` seconds)."""
    hint = f" (last error: {last_error})" if last_error is not None else ""
    return Unreachable(
        f"cannot {verb} {target}: no answer from the API server at "
        f"{server} within {budget:g}s; check that it runs and is "
        f"reachable{hint}",
        verb=verb,
        resource=target.resource,
    )


def tls_rejected(error: BaseException) -> bool:
    return any(isinstance(cause, ssl.SSLError) for cause in _causes(error))


def transport_problem(error: httpx.TransportError) -> str:
    """The most specific words for a failed exchange: the OS's or the TLS library's."""
    for cause in _causes(error):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return getattr(cause, "verify_message", None) or str(cause)
        if isinstance(cause, ssl.SSLError):
            return cause.reason or str(cause)
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
    text = one_line(str(error))
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
