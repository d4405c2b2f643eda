"""Names on the lock object with terminal escapes: shown escaped, never raw (issue 22, hole 14).

Holder identities, waiters and KEYs are written by anyone with ``patch`` on
the lock object; ``--status`` and the logs print them for people.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from kubelock import log
from kubelock.events import WaitFailed, Waiting
from kubelock.locks.base import Observed
from kubelock.locks.once import DONE_ANNOTATION
from kubelock.locks.queue import QUEUE_PREFIX
from kubelock.locks.record import UNREADABLE_RECORD, LeaderElectionRecord
from kubelock.log import log_event, logger, setup_logging
from kubelock.status import as_text, describe

#: Retitles the terminal, then clears it.
TERMINAL_ESCAPES = "pod-a\x1b]0;owned\x07\x1b[2J"
NOW = datetime(2026, 11, 30, 2, 0, 0, tzinfo=UTC)


def observed(holder: str, annotations: dict[str, str]) -> Observed:
    record = LeaderElectionRecord(
        holder_identity=holder,
        lease_duration_seconds=15,
        acquire_time=NOW - timedelta(seconds=60),
        renew_time=NOW - timedelta(seconds=1),
        leader_transitions=4,
    )
    return Observed(record, "7", {"metadata": {"annotations": annotations}})


def test_status_shows_terminal_escapes_in_names_escaped() -> None:
    waiter = json.dumps({"id": "w\u202eevil\x9b", "since": None, "once": "v\x1b2"})
    done = json.dumps([{"key": "k\x1b[31m", "by": "b\x07", "at": None, "token": 1}])
    lock = observed(
        TERMINAL_ESCAPES, {QUEUE_PREFIX + "0123456789abcdef": waiter, DONE_ANNOTATION: done}
    )
    view = describe("leases", "shop", "migrations", lock, NOW)
    text = as_text(view)
    assert not any(c in text for c in "\x1b\x07\x9b\u202e")
    assert "holder:       pod-a\\x1b]0;owned\\x07\\x1b[2J" in text
    assert "  w\\u202eevil\\x9b  since -  --once v\\x1b2" in text
    assert "  k\\x1b[31m  by b\\x07 at - (fencing token 1)" in text
    # -o json: valid JSON, ASCII only, the names as they are.
    as_json = json.dumps(view, indent=2)
    assert as_json.isascii()
    assert json.loads(as_json)["holder"] == TERMINAL_ESCAPES


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(log, "_handler", None)
    monkeypatch.setattr(log, "_format", None)


@pytest.mark.usefixtures("restore_logging")
def test_json_log_lines_escape_c1_controls_and_bidi_overrides() -> None:
    stream = io.StringIO()
    setup_logging("json", stream=stream)
    holder = "pod\x9b\u202e\x7f\ud800"
    log_event(Waiting(holder=holder, since=None, waited=1.0, ahead=None))
    line = stream.getvalue()
    assert line.endswith("\n")
    assert not any(c in line for c in "\x9b\u202e\x7f\ud800")
    assert json.loads(line)["holder"] == holder


@pytest.mark.usefixtures("restore_logging")
def test_text_log_lines_escape_control_characters() -> None:
    stream = io.StringIO()
    setup_logging("text", stream=stream)
    log_event(WaitFailed(error="the server said \x1b[2J\nkubelock: forged line"))
    logger.log(logging.INFO, "taking the lock as %s", TERMINAL_ESCAPES)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "\x1b" not in stream.getvalue()
    assert lines[0].endswith("still waiting: the server said \\x1b[2J\\x0akubelock: forged line")


def test_status_says_when_the_record_does_not_parse() -> None:
    lock = Observed(UNREADABLE_RECORD, "7", {})
    view = describe("configmaps", "shop", "migrations", lock, NOW)
    assert view["held"] is True
    assert view["holder"] is None
    assert view["recordUnreadable"] is True
    assert "holder:       unknown (the record does not parse; counted as held)" in as_text(view)
