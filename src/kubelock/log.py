"""Log lines on stderr: ``kubelock: <time> <message>``, or one JSON object per line.

Everything kubelock says goes through the ``kubelock`` logger. The JSON form
has stable keys: ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``msg``,
``event`` (the election event's name, or null) and then the event's own
fields, so log pipelines can match on ``event`` rather than on wording.
Control characters in a message (names as written on the lock object) are
escaped in both forms (:mod:`kubelock.text`), so a line is always one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from .events import (
    Acquired,
    ApiRequest,
    ChildExited,
    Event,
    Lost,
    Released,
    Renewed,
    RenewFailed,
    WaitFailed,
    Waiting,
)
from .settings import LogFormat, format_duration
from .text import printable, printable_json

__all__ = [
    "log_event",
    "report_error",
    "setup_logging",
]

logger = logging.getLogger("kubelock")

_handler: logging.Handler | None = None  # the one setup_logging() installed
_format: LogFormat | None = None


def setup_logging(
    format: LogFormat = "text", verbose: bool = False, *, stream: TextIO | None = None
) -> None:
    """Send the ``kubelock`` logger to ``stream`` (stderr): INFO and up, DEBUG with ``verbose``.

    Calling it again replaces the previous setup.
    """
    global _handler, _format
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    _handler.setFormatter(_JsonFormatter() if format == "json" else _TextFormatter())
    _format = format
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    # The metrics endpoint's server (hypercorn) says "Running on ..." and the
    # like: chatter for kubelock's users. Only its warnings and errors get through.
    logging.getLogger("kubelock.http").setLevel(logging.WARNING)


def report_error(message: str) -> None:
    """The last word of a failed run: ``kubelock: <message>`` on stderr (JSON if so configured)."""
    if _format == "json":
        logger.error(message)
    else:
        print(f"kubelock: {printable(message)}", file=sys.stderr, flush=True)


def log_event(event: Event) -> None:
    """Log one election event (or the child's exit) as a line for people. An :data:`Observer`."""
    level, message = _describe(event)
    fields = {
        field.name: _json_value(getattr(event, field.name)) for field in dataclasses.fields(event)
    }
    logger.log(
        level, message, extra={"kubelock_event": _event_name(event), "kubelock_fields": fields}
    )


def _describe(event: Event) -> tuple[int, str]:
    match event:
        case Waiting(holder=holder, since=since, waited=waited, ahead=ahead):
            held = f"held by {holder!r}" if holder else "held by somebody else"
            if since is not None:
                held += f" since {_timestamp(since)}"
            if ahead is not None:
                held += f", {ahead} ahead in the queue"
            return logging.INFO, f"waiting for the lock, {held} (waited {_seconds(waited)})"
        case WaitFailed(error=error):
            return logging.WARNING, f"still waiting: {error}"
        case Acquired(waited=waited, fencing_token=token):
            return (
                logging.INFO,
                f"acquired the lock after {_seconds(waited)} (fencing token {token})",
            )
        case Renewed(duration=duration):
            return logging.DEBUG, f"renewed the lock in {_seconds(duration)}"
        case RenewFailed(error=error, duration=duration):
            return (
                logging.WARNING,
                f"could not renew the lock (after {_seconds(duration)}): {error}",
            )
        case Lost(reason=reason, held=held):
            return logging.ERROR, f"lost the lock after holding it for {_seconds(held)}: {reason}"
        case Released(held=held, written=True, done=str(key)):
            return (
                logging.INFO,
                f"released the lock after holding it for {_seconds(held)}, "
                f"recording {key!r} as done",
            )
        case Released(held=held, written=True):
            return logging.INFO, f"released the lock after holding it for {_seconds(held)}"
        case Released(held=held, done=str(key)):
            return (
                logging.WARNING,
                f"could not release the lock after holding it for {_seconds(held)}: "
                f"others can take it when the lease runs out, and {key!r} is not recorded "
                "as done, so the next one runs it again",
            )
        case Released(held=held):
            return (
                logging.WARNING,
                f"could not release the lock after holding it for {_seconds(held)}: "
                "others can take it when the lease runs out",
            )
        case ApiRequest(verb=verb, code=code, duration=duration):
            return logging.DEBUG, f"API {verb}: {code} in {_seconds(duration)}"
        case ChildExited(status=status, signal=None, ran=ran):
            return logging.INFO, f"the command exited with status {status} after {_seconds(ran)}"
        case ChildExited(status=status, signal=number, ran=ran):
            return (
                logging.INFO,
                f"the command was killed by {_signal_name(number)} (status {status}) "
                f"after {_seconds(ran)}",
            )
    raise TypeError(f"not an event: {event!r}")  # pragma: no cover - the match is exhaustive


def _event_name(event: object) -> str:
    """``RenewFailed`` → ``renew_failed``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()


def _seconds(seconds: float) -> str:
    """``3.2s``, ``1m30s``, ``12ms``: rounded to what a person wants to read."""
    if seconds < 1:
        return format_duration(round(seconds, 3))
    return format_duration(round(seconds, 1))


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _signal_name(number: int | None) -> str:
    import signal

    try:
        return signal.Signals(number or 0).name
    except ValueError:
        return f"signal {number}"


def _json_value(value: object) -> Any:
    if isinstance(value, datetime):
        return _timestamp(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def _record_time(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _TextFormatter(logging.Formatter):
    """``kubelock: 2025-01-02T03:04:05.678Z message``; a level word unless INFO."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"kubelock: {_record_time(record)} {level}{printable(record.getMessage())}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, msg, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _record_time(record),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "event": getattr(record, "kubelock_event", None),
        }
        for key, value in getattr(record, "kubelock_fields", {}).items():
            line.setdefault(key, value)
        if record.exc_info:
            line.setdefault("error", self.formatException(record.exc_info))
        return printable_json(json.dumps(line, ensure_ascii=False, default=str))
