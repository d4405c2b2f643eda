"""``kubelock [OPTIONS] COMMAND [ARGS...]``: argv → :class:`~kubelock.settings.Settings`.

Compatible with the Go ``kubelock``: the same flags and defaults, spelled
``-name x``, ``-name=x``, ``--name x`` or ``--name=x``. Options end at the
first word that is not an option (or at ``--``), so everything after it
belongs to the command: ``kubelock --name db python manage.py migrate
--noinput`` gives ``--noinput`` to python.

Parsing happens in two steps. :func:`split_argv` walks argv itself, because
only kubelock knows where its options end; it also rewrites Go-style
``-name`` to ``--name``. The options part then goes to cyclopts, which reads
the ``KUBELOCK_<NAME>`` environment variables and prints ``--help``.
Everything is validated before any network I/O; a mistake is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import cyclopts
from cyclopts import App, Parameter

from ._version import __version__
from .errors import KubelockError, UsageError, one_line
from .settings import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_LEASE_DURATION,
    DEFAULT_NAME,
    DEFAULT_RENEW_DEADLINE,
    DEFAULT_RETRY_PERIOD,
    LOCK_TYPES,
    LOG_FORMATS,
    ElectionTiming,
    Settings,
    default_identity,
    flag,
    format_duration,
    parse_duration,
    parse_metrics_address,
    validate_lock_type,
    validate_log_format,
    validate_pushgateway,
    validate_timing,
)

if TYPE_CHECKING:
    from cyclopts.help import HelpPanel
    from rich.console import Console, ConsoleOptions

__all__ = [
    "ENV_PREFIX",
    "main",
    "parse_args",
    "split_argv",
]

ENV_PREFIX = "KUBELOCK_"
_T = TypeVar("_T")

_DESCRIPTION = """\
Run COMMAND while holding a named lock kept in the Kubernetes API, then release
the lock. Contenders wait until the holder releases the lock or its lease runs
out. Options end at the first word that is not an option, or at "--".
Every option can also be set by the environment variable shown beside it."""

_EPILOGUE = """\
Exit status:
  the command's own      it ran (128+N when killed by signal N)
  1                      the lock could not be taken or given back (RBAC denied it)
  2                      bad usage or configuration, or a request the API server
                         rejected as invalid; nothing was written
  75                     the lock was lost while the command ran; it was stopped
  126, 127               the command could not be run, or was not found
  130, 143               interrupted (SIGINT, SIGTERM) while waiting for the lock"""


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper().replace("-", "_")


def _option(name: str, metavar: str | None, help: str, **kwargs: Any) -> Parameter:
    return Parameter(
        name=f"--{name}", env_var=_env(name), metavar=metavar, help=help, negative=(), **kwargs
    )


@dataclasses.dataclass(frozen=True)
class _Options:
    """The options as given (command line over environment over default), not yet checked."""

    id: str | None
    kubeconfig: str | None
    context: str | None
    lease_duration: str
    renew_deadline: str
    retry_period: str
    name: str
    namespace: str | None
    lock_type: str
    grace_period: str
    log_format: str
    verbose: bool
    metrics_address: str | None
    pushgateway: str | None


def _options(
    *,
    id: Annotated[
        str | None,
        _option(
            "id",
            "string",
            "the holder identity written into the lock",
            show_default="$HOSTNAME, else the host name",
        ),
    ] = None,
    kubeconfig: Annotated[
        str | None,
        _option(
            "kubeconfig",
            "path",
            "the kubeconfig file",
            show_default="$KUBECONFIG, else the Pod's ServiceAccount, else ~/.kube/config",
        ),
    ] = None,
    context: Annotated[
        str | None,
        _option("context", "name", "the kubeconfig context", show_default="its current context"),
    ] = None,
    lease_duration: Annotated[
        str,
        _option(
            "lease-duration",
            "duration",
            "how long contenders wait after the holder's last renewal before taking over",
        ),
    ] = format_duration(DEFAULT_LEASE_DURATION),
    renew_deadline: Annotated[
        str,
        _option(
            "renew-deadline",
            "duration",
            "how long the holder keeps trying to renew before it gives up the lock",
        ),
    ] = format_duration(DEFAULT_RENEW_DEADLINE),
    retry_period: Annotated[
        str,
        _option("retry-period", "duration", "how often to renew, or to retry taking the lock"),
    ] = format_duration(DEFAULT_RETRY_PERIOD),
    name: Annotated[str, _option("name", "string", "the lock's name")] = DEFAULT_NAME,
    namespace: Annotated[
        str | None,
        _option(
            "namespace",
            "string",
            "the lock's namespace",
            show_default="the Pod's own, or the kubeconfig context's, else default",
        ),
    ] = None,
    lock_type: Annotated[
        str,
        _option("lock-type", "|".join(LOCK_TYPES), "the kind of object that holds the lock"),
    ] = LOCK_TYPES[0],
    grace_period: Annotated[
        str,
        _option(
            "grace-period",
            "duration",
            "how long the command gets to stop after SIGTERM before SIGKILL",
        ),
    ] = format_duration(DEFAULT_GRACE_PERIOD),
    log_format: Annotated[
        str, _option("log-format", "|".join(LOG_FORMATS), "how log lines look on stderr")
    ] = LOG_FORMATS[0],
    verbose: Annotated[
        bool,
        _option("verbose", None, "also log renewals and API requests", alias="-v"),
    ] = False,
    metrics_address: Annotated[
        str | None,
        _option(
            "metrics-address",
            "HOST:PORT",
            "serve Prometheus /metrics and /healthz here",
            show_default="off",
        ),
    ] = None,
    pushgateway: Annotated[
        str | None,
        _option(
            "pushgateway", "URL", "push the metrics to this Pushgateway at exit", show_default="off"
        ),
    ] = None,
) -> _Options:
    given = locals()
    return _Options(**{field.name: given[field.name] for field in dataclasses.fields(_Options)})


_COMMAND_HELP = {"-h, --help": "show this help and exit", "--version": "print the version and exit"}


class _GoStyleHelp:
    """Help that reads like the Go original's ``Usage of kubelock:`` (a cyclopts formatter)."""

    def render_usage(self, console: Console, options: ConsoleOptions, usage: object) -> None:
        _print(console, "Usage of kubelock:\n  kubelock [OPTIONS] COMMAND [ARGS...]\n")

    def render_description(
        self, console: Console, options: ConsoleOptions, description: object
    ) -> None:
        _print(console, _DESCRIPTION + "\n")

    def __call__(self, console: Console, options: ConsoleOptions, panel: HelpPanel) -> None:
        if panel.format == "parameter":
            _print(console, "Options:")
        for entry in panel.entries:
            label = ", ".join(entry.positive_shorts + entry.positive_names)
            if entry.metavar:
                label += f" {entry.metavar}"
            lines = [f"  {label}", "        " + _COMMAND_HELP.get(label, _plain(entry.description))]
            notes = []
            if entry.metavar and entry.default is not None:
                notes.append(f"default: {entry.default}")
            if entry.env_var:
                notes.append(f"env: {entry.env_var[0]}")
            if notes:
                lines.append(f"        ({'; '.join(notes)})")
            _print(console, "\n".join(lines))
        if panel.format == "command":  # the last panel: --help and --version
            _print(console, "\n" + _EPILOGUE)


def _plain(renderable: object) -> str:
    """A cyclopts description (a rich renderable) as one line of plain text."""
    if renderable is None:
        return ""
    from rich.console import Console

    plain = Console(file=io.StringIO(), width=10_000, no_color=True, highlight=False)
    with plain.capture() as captured:
        plain.print(renderable, markup=False, end="")
    return " ".join(captured.get().split())


def _print(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)


def _make_app() -> App:
    app = App(
        name="kubelock",
        help=_DESCRIPTION,
        version=f"kubelock {__version__}",
        version_format="plaintext",
        help_format="plaintext",
        help_formatter=_GoStyleHelp(),
        group_parameters=cyclopts.Group("Options", sort_key=0),
        group_commands=cyclopts.Group("Commands", sort_key=1),
        exit_on_error=False,
        print_error=False,
        help_on_error=False,
        result_action="return_value",
    )
    app.default(_options)
    return app


_APP = _make_app()


def _option_table() -> tuple[dict[str, str], set[str]]:
    """Every spelling kubelock accepts → its canonical long name; and which take a value."""
    canonical: dict[str, str] = {}
    takes_value: set[str] = set()
    for argument in _APP.assemble_argument_collection():
        long = argument.names[0]
        for spelling in argument.names:
            canonical[spelling] = long
        if argument.token_count()[0]:
            takes_value.add(long)
    for flags in (_APP.help_flags, _APP.version_flags):
        names = (flags,) if isinstance(flags, str) else tuple(flags)
        for spelling in names:
            canonical[spelling] = next(n for n in names if n.startswith("--"))
    return canonical, takes_value


_CANONICAL, _TAKES_VALUE = _option_table()


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split argv into kubelock's options (as ``--name=value``) and the command.

    Options end at ``--`` or at the first word that does not start with
    ``-``. Go-style ``-name`` is read as ``--name``. Raises
    :class:`UsageError` for an unknown option or a missing value.
    """
    options: list[str] = []
    position = 0
    while position < len(argv):
        word = argv[position]
        if word == "--":
            return options, list(argv[position + 1 :])
        if not word.startswith("-") or word == "-":
            break
        spelled, has_value, value = word.partition("=")
        if not spelled.startswith("--") and len(spelled) > 2:
            spelled = "-" + spelled  # Go style: -name is --name
        long = _CANONICAL.get(spelled)
        if long is None:
            raise UsageError(
                f"unknown option {spelled}{_did_you_mean(spelled)}; see kubelock --help"
            )
        if long in _TAKES_VALUE and not has_value:
            position += 1
            if position == len(argv):
                raise UsageError(f"{long} needs a value; see kubelock --help")
            value, has_value = argv[position], "="
        options.append(f"{long}={value}" if has_value else long)
        position += 1
    return options, list(argv[position:])


def _did_you_mean(spelled: str) -> str:
    longs = sorted({name for name in _CANONICAL if name.startswith("--")})
    close = [name for name in longs if name.startswith(spelled)]  # an abbreviation
    if len(close) != 1:
        close = difflib.get_close_matches(spelled, longs, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_args(argv: Sequence[str]) -> Settings | None:
    """argv (without the program name) → validated :class:`Settings`; no I/O.

    Returns None when ``--help`` or ``--version`` was asked for and has been
    printed to stdout. Raises :class:`UsageError` for anything wrong.
    """
    option_words, command = split_argv(argv)
    try:
        given = _APP(option_words)
    except cyclopts.CycloptsError as error:
        raise UsageError(f"{_usage_message(error)}; see kubelock --help") from None
    if not isinstance(given, _Options):
        return None  # --help or --version, already printed
    if not command:
        raise UsageError(
            "missing the command to run: kubelock [OPTIONS] COMMAND [ARGS...]; see kubelock --help"
        )
    on_command_line = {word.partition("=")[0] for word in option_words}

    def source(option: str) -> str:
        """Name what the user wrote, so a bad value from the environment is easy to find."""
        if option not in on_command_line and os.environ.get(_env(option[2:])) is not None:
            return _env(option[2:])
        return option

    def duration(option: str, text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as error:
            raise UsageError(f"{source(option)}: {error}") from None

    def checked(option: str, check: Callable[[str], _T], text: str) -> _T:
        try:
            return check(text)
        except UsageError as error:
            if source(option) == option:
                raise  # the message already names the option's value
            raise UsageError(f"{source(option)}: {error}") from None

    def timing() -> ElectionTiming:
        lease_duration = duration("--lease-duration", given.lease_duration)
        renew_deadline = duration("--renew-deadline", given.renew_deadline)
        retry_period = duration("--retry-period", given.retry_period)
        # Checked here first so that messages name the flags, not the keywords.
        validate_timing(lease_duration, renew_deadline, retry_period, spell=flag)
        return ElectionTiming(lease_duration, renew_deadline, retry_period)

    metrics = given.metrics_address or None
    pushgateway = given.pushgateway or None
    return Settings(
        command=tuple(command),
        identity=given.id if given.id is not None else default_identity(),
        name=given.name,
        namespace=given.namespace or None,
        kubeconfig=given.kubeconfig or None,
        context=given.context or None,
        lock_type=checked("--lock-type", validate_lock_type, given.lock_type),
        timing=timing(),
        grace_period=duration("--grace-period", given.grace_period),
        log_format=checked("--log-format", validate_log_format, given.log_format),
        verbose=given.verbose,
        metrics_address=(
            None
            if metrics is None
            else checked("--metrics-address", parse_metrics_address, metrics)
        ),
        pushgateway=(
            None
            if pushgateway is None
            else checked("--pushgateway", validate_pushgateway, pushgateway)
        ),
    )


def _usage_message(error: Exception) -> str:
    """cyclopts' message, as one line that continues a sentence."""
    text = one_line(str(error)).rstrip(".")
    return text[:1].lower() + text[1:]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``kubelock`` console script: parse, run under the lock, exit with the status."""
    from .log import report_error, setup_logging

    try:
        settings = parse_args(sys.argv[1:] if argv is None else argv)
        if settings is None:
            sys.exit(0)
        setup_logging(settings.log_format, settings.verbose)
        from . import supervisor  # imported late: parsing and --help stay light

        status = supervisor.run(settings)
    except KubelockError as error:
        report_error(str(error))
        sys.exit(error.exit_code)
    sys.exit(status)
