"""The holes of issue 22 against the real kube-apiserver: the server's own ways
(skipping a write that changes nothing, deleting a held lock, 410 Gone, a
patch retried after it landed) must never let two hold at once."""

from __future__ import annotations

from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from kubelock import events
from kubelock.election import Elector
from kubelock.kube.api import ApiClient
from kubelock.kube.auth import ClusterConfig, load_config
from kubelock.locks import Bookmark, LeaderElectionRecord, make_lock
from kubelock.settings import ElectionTiming

FAST = ElectionTiming(lease_duration=4, renew_deadline=3, retry_period=0.3)
#: A wall clock that stands still (as one stepped back does): every renewal writes the same time.
STOPPED = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def admin_config(kubeconfig: Path) -> ClusterConfig:
    return load_config(str(kubeconfig), None)


@pytest.mark.parametrize("kind", ["configmaps", "leases"])
async def test_every_renewal_counted_is_a_change_the_waiters_see(
    kind: str, admin_config: ClusterConfig, namespace: str
) -> None:
    async with ApiClient(admin_config) as api:
        renewals = 0
        seen_changes = 0
        counted: int | None = None  # the renewals counted, once renewing stopped
        renewed_five = trio.Event()
        caught_up = trio.Event()

        def count(event: events.Event) -> None:
            nonlocal renewals
            if isinstance(event, events.Renewed):
                renewals += 1
                if renewals >= 5:
                    renewed_five.set()

        holder = Elector(
            make_lock(kind, api, "steady", namespace),
            "holder",
            FAST,
            observer=count,
            wall_clock=lambda: STOPPED,
        )
        await holder.acquire()
        acquired = await make_lock(kind, api, "steady", namespace).get()
        assert acquired is not None
        since = acquired.resource_version

        async def watch_changes() -> None:
            # What a waiter sees: a MODIFIED event per write the server stored.
            nonlocal seen_changes
            watcher = make_lock(kind, api, "steady", namespace)
            async with aclosing(watcher.watch(since)) as changes:
                async for change in changes:
                    assert change is not None
                    seen_changes += 1
                    if counted is not None and seen_changes >= counted:
                        caught_up.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_changes)
            renewing = trio.CancelScope()
            nursery.start_soon(_renew_in, holder, renewing)
            with trio.fail_after(30):
                await renewed_five.wait()
            renewing.cancel()
            # Every renewal the holder counted is a write a waiter sees.
            counted = renewals
            if seen_changes >= counted:
                caught_up.set()
            with trio.fail_after(10):
                await caught_up.wait()
            nursery.cancel_scope.cancel()
        assert holder.lost_reason is None


async def _renew_in(holder: Elector, scope: trio.CancelScope) -> None:
    with scope:
        await holder.keep_renewing()


async def test_the_lock_watch_passes_on_the_servers_bookmarks(
    admin_config: ClusterConfig, namespace: str
) -> None:
    # The lock's own resourceVersion stays old while nobody writes it, and the
    # server forgets old versions (a watch from there: 410 Gone). Its bookmarks
    # (about once a minute) carry the newest version to resume from.
    async with ApiClient(admin_config) as api:
        lock = make_lock("leases", api, "quiet", namespace)
        created = await lock.create(LeaderElectionRecord("a", 15))
        other = make_lock("leases", api, "busy", namespace)
        written = await other.create(LeaderElectionRecord("x", 15))
        for round_ in range(3):
            written = await other.update(LeaderElectionRecord(f"x{round_}", 15), written)
        with trio.fail_after(150):
            async with aclosing(lock.watch(created.resource_version)) as changes:
                async for change in changes:
                    if isinstance(change, Bookmark):
                        bookmark = change
                        break
        assert int(bookmark.resource_version) >= int(written.resource_version)
        # The watch resumes from the bookmark: no 410, nothing changed since.
        with trio.move_on_after(2):
            async with aclosing(lock.watch(bookmark.resource_version)) as changes:
                async for change in changes:
                    assert isinstance(change, Bookmark), change
