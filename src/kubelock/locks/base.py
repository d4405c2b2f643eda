"""What the election knows of storage: one small protocol, like client-go's
``resourcelock.Interface``. Lease, Endpoints and ConfigMap locks implement it;
so does the in-memory test double used by the unit tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Protocol

from .record import LeaderElectionRecord

__all__ = [
    "Bookmark",
    "LockStore",
    "Observed",
]


@dataclasses.dataclass(frozen=True)
class Observed:
    """One read of the lock object: its record, its resourceVersion, and the raw object.

    ``raw`` is the object as the server returned it; ``update`` writes it back
    with only the record changed, so labels and annotations others set survive.
    """

    record: LeaderElectionRecord
    resource_version: str
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Bookmark:
    """A watch's word that nothing changed up to ``resource_version``: resume from there.

    The object's own resourceVersion stays as it was while nobody writes it,
    and the server forgets old versions; a watch reopened from a bookmark's
    version is not refused as too old (410 Gone).
    """

    resource_version: str


class LockStore(Protocol):
    """Get, create, update, annotate and watch one lock object by name.

    Every method is a trio checkpoint. Failures raise the classes in
    :mod:`kubelock.errors`: ``AlreadyExists`` from ``create`` and ``Conflict``
    from ``update`` when somebody else wrote first; never a blind overwrite.
    """

    kind: str  # "leases", "endpoints" or "configmaps"
    name: str
    namespace: str

    def describe(self) -> str:
        """``namespace/name`` with the kind, for messages: ``leases kube-system/foo``."""
        ...

    async def get(self) -> Observed | None:
        """The current record, or ``None`` when the object does not exist.

        An object without a (parsable) record reads as an empty record.
        """
        ...

    async def create(self, record: LeaderElectionRecord) -> Observed:
        """Create the object holding ``record``; ``AlreadyExists`` if it exists."""
        ...

    async def update(
        self,
        record: LeaderElectionRecord,
        current: Observed,
        *,
        annotations: Mapping[str, str | None] | None = None,
    ) -> Observed:
        """Replace the record of ``current``; ``Conflict`` if it changed since.

        ``annotations`` are set (``None``: removed) in the same write; others
        are left as they are.
        """
        ...

    async def annotate(self, annotations: Mapping[str, str | None]) -> Observed:
        """Set (``None``: remove) ``annotations`` with one merge patch; ``NotFound``
        when there is no object. Not conditional: it never conflicts, and never
        touches the record.
        """
        ...

    def watch(self, resource_version: str) -> AsyncGenerator[Observed | Bookmark | None, None]:
        """Changes after ``resource_version``: an ``Observed`` per change, ``None`` on
        deletion, a :class:`Bookmark` now and then. From ``""``: the current object first.

        The iterator ends when the server closes the watch; ``Gone`` when the
        version is too old. Callers close it with ``contextlib.aclosing``.
        """
        ...
