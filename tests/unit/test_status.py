"""The --status view: plain data for -o json, and lines for people (no I/O here)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubelock.locks.base import Observed
from kubelock.locks.once import DoneKey, done_annotation
from kubelock.locks.queue import entry
from kubelock.locks.record import LeaderElectionRecord
from kubelock.status import as_line, as_text, describe

NOW = datetime(2026, 11, 30, 2, 0, 0, tzinfo=UTC)


def observed(holder: str, renewed_ago: float, done: list[DoneKey] | None = None) -> Observed:
    annotations: dict[str, str] = {}
    for key in done or []:
        annotations.update(done_annotation({"metadata": {"annotations": annotations}}, key))
    record = LeaderElectionRecord(
        holder_identity=holder,
        lease_duration_seconds=15,
        acquire_time=NOW - timedelta(seconds=60),
        renew_time=NOW - timedelta(seconds=renewed_ago),
        leader_transitions=4,
    )
    return Observed(record, "7", {"metadata": {"annotations": annotations}})


def test_a_lock_that_does_not_exist_is_free() -> None:
    view = describe("leases", "shop", "migrations", None, NOW)
    assert view == {
        "kind": "leases",
        "namespace": "shop",
        "name": "migrations",
        "exists": False,
        "held": False,
        "holder": None,
        "done": [],
        "waiters": [],
    }
    assert "nobody (the object does not exist yet)" in as_text(view)


def test_a_held_lock_with_done_keys() -> None:
    done = [DoneKey("v1", "pod-a", NOW - timedelta(days=1), 2), DoneKey("v2", "pod-b", NOW, 4)]
    view = describe("leases", "shop", "migrations", observed("pod-c", 1.5, done), NOW)
    assert view["held"] is True
    assert view["expired"] is False
    assert view["renewAgeSeconds"] == 1.5
    assert [entry["key"] for entry in view["done"]] == ["v1", "v2"]
    text = as_text(view).splitlines()
    assert "holder:       pod-c" in text
    assert "last renewal: 2026-11-30T01:59:58.500000Z (1.5s ago)" in text
    assert "  v2  by pod-b at 2026-11-30T02:00:00.000000Z (fencing token 4)" in text


def test_a_lease_not_renewed_for_longer_than_its_duration_shows_as_expired() -> None:
    view = describe("leases", "shop", "migrations", observed("pod-c", 20), NOW)
    assert view["held"] is False
    assert view["expired"] is True
    assert "holder:       pod-c (lease expired by this machine's clock)" in as_text(view)


def test_a_released_lock() -> None:
    view = describe("configmaps", "shop", "migrations", observed("", 3), NOW)
    assert view["holder"] is None
    assert view["held"] is False
    assert "holder:       nobody (released)" in as_text(view)
    assert "done KEYs:    none" in as_text(view)


def test_the_waiters_in_the_queue_first_in_line_first() -> None:
    seen = observed("pod-c", 1)
    line = [
        entry("pod-e", NOW - timedelta(seconds=2)),
        entry("pod-d", NOW - timedelta(seconds=9), "v3"),
    ]
    seen.raw["metadata"]["annotations"].update({w.key: w.value() for w in line})
    view = describe("leases", "shop", "migrations", seen, NOW)
    assert view["waiters"] == [
        {
            "identity": "pod-d",
            "since": "2026-11-30T01:59:51.000000Z",
            "waitedSeconds": 9.0,
            "once": "v3",
        },
        {
            "identity": "pod-e",
            "since": "2026-11-30T01:59:58.000000Z",
            "waitedSeconds": 2.0,
            "once": None,
        },
    ]
    text = as_text(view).splitlines()
    assert "waiters:      2 (first in line first)" in text
    assert "  pod-d  since 2026-11-30T01:59:51.000000Z (9.0s)  --once v3" in text
    assert "  pod-e  since 2026-11-30T01:59:58.000000Z (2.0s)" in text
    assert "waiters:      none in the queue" in as_text(
        describe("leases", "s", "m", observed("", 3), NOW)
    )


# --- --watch: one line per change when stdout is not a terminal -----------------------


def test_a_watched_lock_changes_one_line_at_a_time() -> None:
    missing = describe("leases", "shop", "migrations", None, NOW)
    assert as_line(missing) == "leases shop/migrations: nobody holds it (the object does not exist)"
    held = describe("leases", "shop", "migrations", observed("pod-a", 1.5), NOW)
    assert as_line(held) == (
        "leases shop/migrations: held by pod-a since 2026-11-30T01:59:00.000000Z, "
        "renewed 2026-11-30T01:59:58.500000Z, lease 15s, transitions 4, 0 waiting, 0 done KEYs"
    )
    expired = describe("leases", "shop", "migrations", observed("pod-a", 20), NOW)
    assert "held by pod-a (lease expired by this machine's clock) since" in as_line(expired)
    released = describe("leases", "shop", "migrations", observed("", 3), NOW)
    assert as_line(released).startswith("leases shop/migrations: nobody holds it (released), ")
    assert "\n" not in as_line(held)


def test_a_watched_line_shows_a_hostile_holder_escaped() -> None:
    hostile = describe("leases", "shop", "migrations", observed("\x1b]0;x\x07\x1b[2J", 1.5), NOW)
    line = as_line(hostile)
    assert "\x1b" not in line
    assert "\x07" not in line
    assert "held by \\x1b]0;x\\x07\\x1b[2J since" in line
