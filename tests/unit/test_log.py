"""Log lines: ``kubelock: <time> ...`` for people, one JSON object per line for machines."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import UTC, datetime

import pytest

from kubelock import log
from kubelock.events import (
    Acquired,
    ApiRequest,
    ChildExited,
    Event,
    Lost,
    Released,
    Renewed,
    RenewFailed,
    Waiting,
)
from kubelock.log import log_event, logger, report_error, setup_logging

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test configures the ``kubelock`` logger; leave it as pytest found it."""
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(log, "_handler", None)
    monkeypatch.setattr(log, "_format", None)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_lines_are_prefixed_and_timed(stream: io.StringIO) -> None:
    setup_logging("text", verbose=False, stream=stream)
    logger.info("hello")
    logger.warning("careful")
    assert re.fullmatch(rf"kubelock: {TIME} hello", lines(stream)[0])
    assert re.fullmatch(rf"kubelock: {TIME} warning: careful", lines(stream)[1])


def test_debug_lines_only_when_verbose(stream: io.StringIO) -> None:
    setup_logging("text", verbose=False, stream=stream)
    log_event(Renewed(duration=0.012))
    assert lines(stream) == []
    setup_logging("text", verbose=True, stream=stream)
    log_event(Renewed(duration=0.012))
    assert lines(stream)[0].endswith("debug: renewed the lock in 12ms")


def test_setting_up_again_replaces_the_handler(stream: io.StringIO) -> None:
    setup_logging("text", verbose=False, stream=stream)
    setup_logging("text", verbose=False, stream=stream)
    logger.info("once")
    assert len(lines(stream)) == 1


WAITING_SINCE = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (
            Waiting(holder="pod-b", since=WAITING_SINCE, waited=3.04),
            "waiting for the lock, held by 'pod-b' since 2025-01-02T03:04:05Z (waited 3s)",
        ),
        (
            Waiting(holder="pod-b", since=None, waited=0.5),
            "waiting for the lock, held by 'pod-b' (waited 500ms)",
        ),
        (
            Waiting(holder="pod-b", since=None, waited=0.5, ahead=2),
            "waiting for the lock, held by 'pod-b', 2 ahead in the queue (waited 500ms)",
        ),
        (
            Acquired(waited=12.345, fencing_token=7),
            "acquired the lock after 12.3s (fencing token 7)",
        ),
        (
            RenewFailed(error="connection refused", duration=1.5),
            "warning: could not renew the lock (after 1.5s): connection refused",
        ),
        (
            Lost(reason="renew deadline passed", held=95.0),
            "error: lost the lock after holding it for 1m35s: renew deadline passed",
        ),
        (Released(held=42.0, written=True), "released the lock after holding it for 42s"),
        (
            Released(held=42.0, written=False),
            "warning: could not release the lock after holding it for 42s: "
            "others can take it when the lease runs out",
        ),
        (
            ChildExited(status=3, signal=None, ran=2.0),
            "the command exited with status 3 after 2s",
        ),
        (
            ChildExited(status=137, signal=9, ran=2.0),
            "the command was killed by SIGKILL (status 137) after 2s",
        ),
    ],
)
def test_each_event_reads_as_a_sentence(
    stream: io.StringIO, event: Event | ChildExited, text: str
) -> None:
    setup_logging("text", verbose=False, stream=stream)
    log_event(event)
    (line,) = lines(stream)
    assert re.fullmatch(rf"kubelock: {TIME} {re.escape(text)}", line), line


def test_json_lines_have_stable_keys_then_the_events_fields(stream: io.StringIO) -> None:
    setup_logging("json", verbose=True, stream=stream)
    log_event(Waiting(holder="pod-b", since=WAITING_SINCE, waited=3.0456))
    log_event(ApiRequest(verb="update", code="409", duration=0.0123))
    logger.info("plain message")
    waiting, request, plain = (json.loads(line) for line in lines(stream))
    assert list(waiting)[:4] == ["time", "level", "msg", "event"]
    assert re.fullmatch(TIME, waiting["time"])
    assert waiting["level"] == "info"
    assert waiting["event"] == "waiting"
    assert waiting["holder"] == "pod-b"
    assert waiting["since"] == "2025-01-02T03:04:05Z"
    assert waiting["waited"] == 3.046
    assert request["event"] == "api_request"
    assert request["level"] == "debug"
    assert request["code"] == "409"
    assert plain["event"] is None
    assert plain["msg"] == "plain message"


def test_json_event_names_are_snake_case(stream: io.StringIO) -> None:
    setup_logging("json", verbose=False, stream=stream)
    log_event(RenewFailed(error="timeout", duration=2.0))
    log_event(ChildExited(status=0, signal=None, ran=1.0))
    assert [json.loads(line)["event"] for line in lines(stream)] == [
        "renew_failed",
        "child_exited",
    ]


def test_report_error_is_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", verbose=False)
    report_error("cannot run 'foo': not found")
    assert capsys.readouterr().err == "kubelock: cannot run 'foo': not found\n"


def test_report_error_is_json_when_logging_is(stream: io.StringIO) -> None:
    setup_logging("json", verbose=False, stream=stream)
    report_error("lost the lock")
    (line,) = lines(stream)
    assert json.loads(line)["level"] == "error"
    assert json.loads(line)["msg"] == "lost the lock"


def test_lines_are_not_repeated_by_the_root_logger(stream: io.StringIO) -> None:
    root = io.StringIO()
    handler = logging.StreamHandler(root)
    logging.getLogger().addHandler(handler)
    try:
        setup_logging("text", verbose=False, stream=stream)
        logger.info("once")
    finally:
        logging.getLogger().removeHandler(handler)
    assert len(lines(stream)) == 1
    assert root.getvalue() == ""


def test_every_event_type_has_a_line_for_people() -> None:
    """An event without a case would crash the observer (and so kubelock) at run time."""
    import dataclasses
    import typing
    from datetime import UTC, datetime

    from kubelock import events as event_types
    from kubelock.log import log_event

    samples = {str: "x", float: 1.0, int: 1, bool: True, "datetime | None": datetime.now(UTC)}
    for event_type in typing.get_args(event_types.Event):
        values = {}
        for field in dataclasses.fields(event_type):
            annotation = field.type if isinstance(field.type, str) else field.type.__name__
            values[field.name] = samples.get(annotation, samples.get(eval(annotation), "x"))  # noqa: S307
        log_event(event_type(**values))
