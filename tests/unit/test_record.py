"""The election record: client-go's field names, time formats and round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from kubelock.locks.record import (
    LEADER_ANNOTATION,
    LeaderElectionRecord,
    format_micro_time,
    format_time,
    parse_time,
)

ACQUIRED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
RENEWED = datetime(2024, 5, 6, 7, 8, 19, 654321, tzinfo=UTC)
RECORD = LeaderElectionRecord(
    holder_identity="pod-a",
    lease_duration_seconds=15,
    acquire_time=ACQUIRED,
    renew_time=RENEWED,
    leader_transitions=3,
)


def test_the_annotation_key_is_client_gos() -> None:
    assert LEADER_ANNOTATION == "control-plane.alpha.kubernetes.io/leader"


def test_annotation_is_written_as_client_go_writes_it() -> None:
    # Field order, names, whole-second times and compact separators as Go's encoding/json.
    assert RECORD.to_annotation() == (
        '{"holderIdentity":"pod-a","leaseDurationSeconds":15,'
        '"acquireTime":"2024-05-06T07:08:09Z","renewTime":"2024-05-06T07:08:19Z",'
        '"leaderTransitions":3}'
    )


def test_annotation_round_trip_keeps_everything_but_sub_second_time() -> None:
    parsed = LeaderElectionRecord.from_annotation(RECORD.to_annotation())
    assert parsed == LeaderElectionRecord(
        holder_identity="pod-a",
        lease_duration_seconds=15,
        acquire_time=ACQUIRED.replace(microsecond=0),
        renew_time=RENEWED.replace(microsecond=0),
        leader_transitions=3,
    )


def test_annotation_written_by_go_parses() -> None:
    # What a Go kubelock leaves behind, including a released (empty) holder.
    go = (
        '{"holderIdentity":"","leaseDurationSeconds":1,"acquireTime":"2024-05-06T07:08:09Z",'
        '"renewTime":"2024-05-06T07:08:19Z","leaderTransitions":7}'
    )
    record = LeaderElectionRecord.from_annotation(go)
    assert not record.is_held
    assert record.lease_duration_seconds == 1
    assert record.leader_transitions == 7
    assert record.renew_time == datetime(2024, 5, 6, 7, 8, 19, tzinfo=UTC)


def test_unset_times_are_null_as_go_writes_a_zero_time() -> None:
    data = json.loads(LeaderElectionRecord(holder_identity="x").to_annotation())
    assert data["acquireTime"] is None
    assert data["renewTime"] is None
    assert LeaderElectionRecord.from_annotation(json.dumps(data)).acquire_time is None


@pytest.mark.parametrize("value", ["[]", '"text"', "42"])
def test_annotation_that_is_not_an_object_is_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        LeaderElectionRecord.from_annotation(value)


def test_annotation_that_is_not_json_is_rejected() -> None:
    with pytest.raises(ValueError, match="Expecting value"):
        LeaderElectionRecord.from_annotation("not json")


def test_lease_spec_uses_micro_time_and_lease_transitions() -> None:
    assert RECORD.to_lease_spec() == {
        "holderIdentity": "pod-a",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 3,
        "acquireTime": "2024-05-06T07:08:09.123456Z",
        "renewTime": "2024-05-06T07:08:19.654321Z",
    }


def test_lease_spec_round_trip_is_exact() -> None:
    assert LeaderElectionRecord.from_lease_spec(RECORD.to_lease_spec()) == RECORD


def test_empty_or_missing_lease_spec_reads_as_an_empty_record() -> None:
    assert LeaderElectionRecord.from_lease_spec(None) == LeaderElectionRecord()
    assert LeaderElectionRecord.from_lease_spec({}) == LeaderElectionRecord()
    assert not LeaderElectionRecord().is_held


def test_lease_spec_without_times_omits_them() -> None:
    spec = LeaderElectionRecord(holder_identity="a", lease_duration_seconds=5).to_lease_spec()
    assert "acquireTime" not in spec
    assert "renewTime" not in spec


def test_formats_convert_to_utc() -> None:
    local = datetime(2024, 1, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_micro_time(local) == "2024-01-01T10:00:00.000005Z"
    assert format_time(local) == "2024-01-01T10:00:00Z"
    assert format_time(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-06T07:08:09Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T07:08:09.123456Z", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)),
        ("2024-05-06T09:08:09+02:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
    ],
)
def test_parse_time_reads_rfc3339(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed is not None
    assert parsed.tzinfo is not None


@pytest.mark.parametrize("value", [None, "", 0, "yesterday", 12.5])
def test_parse_time_gives_none_for_what_is_not_a_time(value: object) -> None:
    assert parse_time(value) is None


def test_record_is_frozen() -> None:
    with pytest.raises(AttributeError):
        RECORD.holder_identity = "b"  # type: ignore[misc]
