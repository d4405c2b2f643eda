"""Random and hostile lock objects, thrown at every parser and at the output (Hypothesis).

Whatever anyone with ``patch`` writes on the lock object: no exception
escapes a parser, what the queue parses (and caches) stays within its bounds,
and no control character reaches the text printed for people; the JSON stays
JSON and says the same. The exact reproducers are in test_hostile.py.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import Any, cast
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubelock import log
from kubelock.events import Released, WaitFailed, Waiting
from kubelock.kube.api import ApiClient
from kubelock.locks import queue
from kubelock.locks.annotation import ConfigMapLock
from kubelock.locks.base import Observed
from kubelock.locks.handoff import HANDOFF_ANNOTATION, MAX_WINDOW, MIN_WINDOW, handoff_window
from kubelock.locks.lease import LeaseLock
from kubelock.locks.once import DONE_ANNOTATION, DoneKey, done_annotation, done_keys, find_done
from kubelock.locks.queue import (
    MAX_ENTRY_LENGTH,
    MAX_IDENTITY_LENGTH,
    QUEUE_PREFIX,
    ahead_of,
    has_entry,
    waiters,
)
from kubelock.locks.record import LEADER_ANNOTATION, LeaderElectionRecord, parse_time
from kubelock.log import log_event, logger, setup_logging
from kubelock.settings import MAX_ONCE_KEY_LENGTH, LogFormat
from kubelock.status import as_text, describe

NOW = datetime(2026, 11, 30, 2, 0, 0, tzinfo=UTC)
#: What must never reach a terminal raw (the newline ending each line aside).
UNSAFE = {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0))}
UNSAFE |= {*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}
UNSAFE |= set(map(chr, range(0xD800, 0xE000)))

HOSTILE_FRAGMENTS = [
    "\x1b]0;owned\x07",
    "\x1b[2J",
    "\x1b]52;c;aGk=\x07",  # OSC 52: the clipboard
    "\x9b31m",
    "\u202e",
    "\u2066",
    "\x7f",
    "\x00",
    "\ud800",
    "\n",
    "\\x1b",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00",
    "1e999",
    "-1e999",
    "NaN",
]
FIELDS = [
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaderTransitions",
    "leaseTransitions",
    "id",
    "since",
    "once",
    "key",
    "by",
    "at",
    "token",
]

hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(HOSTILE_FRAGMENTS),
    st.lists(st.one_of(st.text(max_size=4), st.sampled_from(HOSTILE_FRAGMENTS)), max_size=6).map(
        "".join
    ),
    st.integers(min_value=500, max_value=2000).map("y".__mul__),  # over the bounds
)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(),
        hostile_text,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), hostile_text), children, max_size=5),
    ),
    max_leaves=8,
)
# Objects with the fields the parsers look for, each given a random (often wrong) value.
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=len(FIELDS))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


annotation_values = st.one_of(
    hostile_text,
    json_values.map(json.dumps),
    records.map(json.dumps),
    st.lists(records, max_size=4).map(json.dumps),
    st.sampled_from([100, 2000, 100_000]).map(_nested),
    st.integers(min_value=0, max_value=300_000).map(
        lambda length: json.dumps({"id": "x" * length, "since": None})
    ),
)
annotation_keys = st.one_of(
    st.sampled_from([LEADER_ANNOTATION, DONE_ANNOTATION, HANDOFF_ANNOTATION]),
    st.text(alphabet="0123456789abcdef", min_size=16, max_size=16).map(QUEUE_PREFIX.__add__),
    hostile_text,
)
lock_objects = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries(
            {"annotations": st.dictionaries(annotation_keys, annotation_values, max_size=6)}
        )
    },
    optional={"spec": st.one_of(records, json_values)},
)
#: A few seconds in all; no example database written into the worktree.
SETTINGS = settings(
    max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def configmap_lock() -> ConfigMapLock:
    return ConfigMapLock(cast(ApiClient, None), "lock", "test")


def lease_lock() -> LeaseLock:
    return LeaseLock(cast(ApiClient, None), "lock", "test")


@contextmanager
def parsed_lengths() -> Iterator[list[int]]:
    """The length of every queue entry value handed to the (caching) parser meanwhile."""
    lengths: list[int] = []
    parse = queue._parse

    def spy(key: str, value: str) -> queue.Waiter | None:
        lengths.append(len(value))
        return parse(key, value)

    with mock.patch.object(queue, "_parse", spy):
        yield lengths


@SETTINGS
@given(obj=lock_objects, identity=hostile_text, key=hostile_text)
def test_no_parser_raises_and_the_queue_parses_only_what_is_within_bounds(
    obj: dict[str, Any], identity: str, key: str
) -> None:
    for lock in (configmap_lock(), lease_lock()):
        record = lock.record_of(obj)
        assert isinstance(record, LeaderElectionRecord)
        assert record.acquire_time is None or record.acquire_time.tzinfo is not None
    with parsed_lengths() as lengths:
        line = waiters(obj)
        ahead_of(obj, identity, record.holder_identity)
    assert all(length <= MAX_ENTRY_LENGTH for length in lengths)
    for waiter in line:
        assert len(waiter.identity) <= MAX_IDENTITY_LENGTH
        assert waiter.once is None or len(waiter.once) <= MAX_ONCE_KEY_LENGTH
    has_entry(obj, identity)
    for done in done_keys(obj):
        assert len(done.key) <= MAX_ONCE_KEY_LENGTH
        assert len(done.by) <= MAX_IDENTITY_LENGTH
    find_done(obj, key)
    written = done_annotation(obj, DoneKey("v1", "me", NOW, 1))
    assert json.loads(written[DONE_ANNOTATION])[-1]["key"] == "v1"
    window = handoff_window(obj)
    assert math.isfinite(window)
    assert MIN_WINDOW <= window <= MAX_WINDOW


@SETTINGS
@given(value=annotation_values)
def test_a_leader_annotation_parses_or_raises_value_error(value: str) -> None:
    with suppress(ValueError):
        LeaderElectionRecord.from_annotation(value)


@SETTINGS
@given(value=st.one_of(json_values, hostile_text))
def test_a_time_parses_to_utc_or_to_none(value: object) -> None:
    moment = parse_time(value)
    assert moment is None or moment.utcoffset() == UTC.utcoffset(None)


def printed_safely(text: str) -> bool:
    return not UNSAFE.intersection(text.replace("\n", ""))


@SETTINGS
@given(obj=lock_objects, holder=hostile_text)
def test_status_text_has_no_control_characters_and_the_json_says_the_same(
    obj: dict[str, Any], holder: str
) -> None:
    record = configmap_lock().record_of(obj)
    if not record.unreadable:
        record = LeaderElectionRecord(holder_identity=holder, renew_time=record.renew_time)
    view = describe("configmaps", "shop", "migrations", Observed(record, "7", obj), NOW)
    text = as_text(view)
    assert printed_safely(text)
    assert text.endswith("\n")
    as_json = json.dumps(view, indent=2)
    assert as_json.isascii()
    assert json.loads(as_json) == view


@contextmanager
def log_lines(format: LogFormat) -> Iterator[io.StringIO]:
    """The ``kubelock`` logger's lines in ``format`` meanwhile (then set up as it was)."""
    stream = io.StringIO()
    saved = logger.handlers, logger.propagate, logger.level, log._handler, log._format
    try:
        setup_logging(format, stream=stream)
        yield stream
    finally:
        logger.handlers, logger.propagate, logger.level, log._handler, log._format = saved


@SETTINGS
@given(words=st.lists(hostile_text, min_size=1, max_size=4))
def test_log_lines_have_no_control_characters_and_stay_one_line_each(words: list[str]) -> None:
    for format in ("text", "json"):
        with log_lines(format) as stream:
            for word in words:
                log_event(Waiting(holder=word, since=None, waited=1.0, ahead=None))
                log_event(WaitFailed(error=word))
                log_event(Released(held=1.0, written=False, done=word))
        lines = stream.getvalue().split("\n")
        assert lines.pop() == ""
        assert len(lines) == 3 * len(words)
        assert all(printed_safely(line) for line in lines)
        if format == "json":
            holders = [json.loads(line).get("holder") for line in lines[::3]]
            assert holders == words
