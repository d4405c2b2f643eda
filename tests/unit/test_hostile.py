"""Lock objects written by somebody careless or hostile (anyone with ``patch`` on the Lease).

Whatever they write, kubelock must not crash and must not grow its memory
without bound (issue 22, holes 12 and 13; hole 14, the terminal, is in
test_hostile_output.py). These are the exact reproducers; the property-based
test (test_hostile_properties.py) throws random variations at the same code.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any, cast

import pytest
import trio
import trio.testing

from kubelock.kube.api import ApiClient
from kubelock.locks import queue
from kubelock.locks.annotation import ConfigMapLock
from kubelock.locks.handoff import HANDOFF_ANNOTATION
from kubelock.locks.once import DONE_ANNOTATION, find_done
from kubelock.locks.queue import QUEUE_PREFIX, waiters
from kubelock.locks.record import (
    LEADER_ANNOTATION,
    UNREADABLE_RECORD,
    LeaderElectionRecord,
    parse_time,
)

from .memstore import MemoryBackend
from .test_election import TIMING, contender

#: In UTC this is before year 1: ``astimezone`` overflows.
BEFORE_YEAR_ONE = "0001-01-01T00:00:00+01:00"
#: Nested deeper than Python's recursion limit, and still within an annotation's 256 KiB.
NESTED = "[" * 100_000 + "]" * 100_000


def annotated(annotations: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"annotations": annotations}}


def configmap_lock() -> ConfigMapLock:
    """A ConfigMap lock only to read records with (it never talks to an API server here)."""
    return ConfigMapLock(cast(ApiClient, None), "lock", "test")


# --- 12: malformed values never crash kubelock ---------------------------------------


def test_a_time_before_year_one_in_utc_reads_as_no_time() -> None:
    assert parse_time(BEFORE_YEAR_ONE) is None


def test_a_leader_annotation_with_an_overflowing_time_still_reads() -> None:
    value = json.dumps(
        {"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": BEFORE_YEAR_ONE}
    )
    record = configmap_lock().record_of(annotated({LEADER_ANNOTATION: value}))
    assert record.renew_time is None
    assert not record.is_held


@pytest.mark.parametrize(
    "value",
    [
        '{"holderIdentity": "pod-a", "leaseDurationSeconds": 1e999}',
        NESTED,
        '{"holderIdentity": ' + NESTED + "}",
        "not json",
        "[]",
    ],
    ids=["infinite-duration", "nested", "nested-holder", "not-json", "not-an-object"],
)
def test_a_leader_annotation_that_does_not_parse_counts_as_held(value: str) -> None:
    """Never as free: whoever wrote it may be running; contenders wait out a lease first."""
    with pytest.raises(ValueError, match=r"."):
        LeaderElectionRecord.from_annotation(value)
    record = configmap_lock().record_of(annotated({LEADER_ANNOTATION: value}))
    assert record.is_held


@pytest.mark.parametrize("value", [NESTED, json.dumps([{"key": "v1", "at": BEFORE_YEAR_ONE}])])
def test_a_done_annotation_that_does_not_parse_is_ignored(value: str) -> None:
    found = find_done(annotated({DONE_ANNOTATION: value}), "v1")
    assert found is None or found.at is None


@pytest.mark.parametrize(
    "value", [NESTED, json.dumps({"id": "pod-b", "since": BEFORE_YEAR_ONE})], ids=["n", "t"]
)
def test_a_queue_entry_that_does_not_parse_is_ignored(value: str) -> None:
    found = waiters(annotated({QUEUE_PREFIX + "0123456789abcdef": value}))
    assert found == [] or found[0].since is None


async def test_once_runs_records_the_key_and_releases_whatever_the_annotations_say(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    hostile = {
        DONE_ANNOTATION: NESTED,
        QUEUE_PREFIX + "0000000000000001": NESTED,
        QUEUE_PREFIX + "0000000000000002": json.dumps({"id": "ghost", "since": BEFORE_YEAR_ONE}),
        HANDOFF_ANNOTATION: "1e999",
    }
    backend._store(LeaderElectionRecord(), "admin", hostile, verb="patch")
    elector = contender(backend, "a", once="v1")
    await elector.acquire()
    elector.work_succeeded()
    assert await elector.release()
    assert backend.current is not None
    assert backend.current.record.holder_identity == ""
    done = find_done(backend.current.raw, "v1")
    assert done is not None
    assert done.by == "a"


# --- 13: what is parsed and kept is bounded ------------------------------------------


def test_rewriting_one_queue_entry_with_fresh_large_values_keeps_memory_bounded() -> None:
    queue._parse.cache_clear()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(200):
            value = json.dumps({"id": f"{index:06d}" + "x" * 128 * 1024, "since": None})
            waiters(annotated({QUEUE_PREFIX + "0123456789abcdef": value}))
        del value
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        queue._parse.cache_clear()
    assert retained < 4 * 2**20


# --- a leader record that does not parse: held by nobody known, for one lease -------


async def test_a_record_that_does_not_parse_is_waited_out_for_a_lease_then_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    backend.write(UNREADABLE_RECORD)
    waiter = contender(backend, "b")
    started = trio.current_time()
    await waiter.acquire()
    # Its own lease duration (the record names none), from when it first saw the record.
    assert trio.current_time() - started >= TIMING.lease_duration
    assert backend.current is not None
    assert backend.current.record.holder_identity == "b"


async def test_a_holder_whose_record_is_garbled_loses_the_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = MemoryBackend()
    holder = contender(backend, "a")
    await holder.acquire()
    await trio.sleep(1)
    backend.write(UNREADABLE_RECORD)
    reason = await holder.keep_renewing()
    assert reason == "the lock was taken over by a record that does not parse"
