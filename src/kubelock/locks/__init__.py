"""Lock kinds behind one protocol: Lease (the default), Endpoints and ConfigMap."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ..errors import UsageError
from ..events import Observer
from ..kube.api import ApiClient
from ..kube.auth import ClusterConfig
from .annotation import ConfigMapLock, EndpointsLock
from .base import Bookmark, LockStore, Observed
from .lease import ApiLock, LeaseLock
from .record import LEADER_ANNOTATION, LeaderElectionRecord

__all__ = [
    "LEADER_ANNOTATION",
    "ApiLock",
    "Bookmark",
    "ConfigMapLock",
    "EndpointsLock",
    "LeaderElectionRecord",
    "LeaseLock",
    "LockStore",
    "Observed",
    "make_lock",
    "open_lock",
]

_KINDS: dict[str, type[ApiLock]] = {
    "leases": LeaseLock,
    "endpoints": EndpointsLock,
    "configmaps": ConfigMapLock,
}


def make_lock(
    lock_type: str, api: ApiClient, name: str, namespace: str, *, timeout: float | None = None
) -> LockStore:
    """The lock of kind ``lock_type`` ("leases", "endpoints", "configmaps") named ``name``."""
    try:
        kind = _KINDS[lock_type]
    except KeyError:
        raise UsageError(
            f"invalid lock type {lock_type!r}: use one of {', '.join(_KINDS)}"
        ) from None
    return kind(api, name, namespace, timeout=timeout)


@contextlib.asynccontextmanager
async def open_lock(
    config: ClusterConfig,
    lock_type: str,
    name: str,
    namespace: str,
    *,
    observer: Observer | None = None,
) -> AsyncIterator[LockStore]:
    """The lock ``name`` on the API server of ``config``; its connections close on exit."""
    async with ApiClient(config, observer=observer) as api:
        yield make_lock(lock_type, api, name, namespace)
