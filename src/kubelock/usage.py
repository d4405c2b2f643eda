"""The cyclopts application behind ``kubelock --help``, ``--version`` and unusual argv.

:func:`kubelock.cli.parse_args` reads the usual invocation, and a lone
``--version``, itself; it hands the options here (which imports cyclopts,
rich and attrs: tens of milliseconds of start-up) only for ``--help`` and for
what it does not read itself: a repeated option, an empty value,
``--verbose`` given a value or set through the environment. The options, their help texts
and environment variables are declared here once; :data:`kubelock.cli.OPTIONS`
lists the same names, and a unit test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING, Annotated, Any

import cyclopts
from cyclopts import App, Parameter

from .cli import DEFAULT_OPTIONS, VERSION_TEXT, Options, env_var
from .errors import UsageError, one_line
from .settings import LOCK_TYPES, LOG_FORMATS

if TYPE_CHECKING:
    from cyclopts.help import HelpPanel
    from rich.console import Console, ConsoleOptions

__all__ = ["option_table", "read_options"]

_DESCRIPTION = """\
Run COMMAND while holding a named lock kept in the Kubernetes API, then release
the lock. Contenders wait until the holder releases the lock or its lease runs
out, queued on the lock first come, first served. Options end at the first
word that is not an option, or at "--".
Every option can also be set by the environment variable shown beside it."""

_EPILOGUE = """\
Exit status:
  the command's own      it ran (128+N when killed by signal N)
  0                      also: with --once, KEY was already done (the command did not run)
  1                      the lock could not be taken or given back (RBAC denied it)
  2                      bad usage or configuration, or a request the API server
                         rejected as invalid; nothing was written
  75                     the lock was lost while the command ran; it was stopped
  124                    --timeout ran out while waiting for the lock; nothing written
  126, 127               the command could not be run, or was not found
  130, 143               interrupted (SIGINT, SIGTERM) while waiting for the lock,
                         or before the command started (the lock is released)"""


def _option(name: str, metavar: str | None, help: str, **kwargs: Any) -> Parameter:
    return Parameter(
        name=f"--{name}", env_var=env_var(name), metavar=metavar, help=help, negative=(), **kwargs
    )


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
    ] = DEFAULT_OPTIONS.lease_duration,
    renew_deadline: Annotated[
        str,
        _option(
            "renew-deadline",
            "duration",
            "how long the holder keeps trying to renew before it gives up the lock",
        ),
    ] = DEFAULT_OPTIONS.renew_deadline,
    retry_period: Annotated[
        str,
        _option("retry-period", "duration", "how often to renew, or to retry taking the lock"),
    ] = DEFAULT_OPTIONS.retry_period,
    name: Annotated[str, _option("name", "string", "the lock's name")] = DEFAULT_OPTIONS.name,
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
    ] = DEFAULT_OPTIONS.lock_type,
    grace_period: Annotated[
        str,
        _option(
            "grace-period",
            "duration",
            "how long the command gets to stop after SIGTERM before SIGKILL",
        ),
    ] = DEFAULT_OPTIONS.grace_period,
    log_format: Annotated[
        str, _option("log-format", "|".join(LOG_FORMATS), "how log lines look on stderr")
    ] = DEFAULT_OPTIONS.log_format,
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
    timeout: Annotated[
        str | None,
        _option(
            "timeout",
            "duration",
            "stop waiting for the lock after this long and exit 124, nothing written: such a "
            "waiter stays out of the queue (0: try once)",
            show_default="wait as long as it takes",
        ),
    ] = None,
    once: Annotated[
        str | None,
        _option(
            "once",
            "KEY",
            "run COMMAND at most once per KEY (a version, a migrations hash): once it "
            "exited 0, every contender with that KEY exits 0 without running it",
            show_default="off",
        ),
    ] = None,
    status: Annotated[
        bool,
        _option(
            "status",
            None,
            "show the lock (holder, renewals, done KEYs, waiters) and exit; no COMMAND, "
            "needs only 'get'",
        ),
    ] = False,
    output: Annotated[
        str,
        _option("output", "text|json", "how --status prints the lock", alias="-o"),
    ] = "text",
) -> Options:
    given = locals()
    return Options(**{field.name: given[field.name] for field in dataclasses.fields(Options)})


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
        version=VERSION_TEXT,
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


def option_table() -> tuple[dict[str, str], set[str]]:
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


def read_options(option_words: list[str]) -> Options | None:
    """The options (``--name=value`` words, from :func:`kubelock.cli.split_argv`), with
    the environment and the defaults; None when ``--help`` or ``--version`` was printed."""
    try:
        given = _APP(option_words)
    except cyclopts.CycloptsError as error:
        raise UsageError(f"{_usage_message(error)}; see kubelock --help") from None
    return given if isinstance(given, Options) else None


def _usage_message(error: Exception) -> str:
    """cyclopts' message, as one line that continues a sentence."""
    text = one_line(str(error)).rstrip(".")
    return text[:1].lower() + text[1:]
