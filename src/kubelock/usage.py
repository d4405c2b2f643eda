"""The cyclopts application behind ``kubelock --help``, ``--version`` and unusual argv.

:func:`kubelock.cli.parse_args` reads the usual invocation, and a lone
``--version``, itself; it hands the options here (which imports cyclopts,
rich and attrs: tens of milliseconds of start-up) only for ``--help`` and for
what it does not read itself: a repeated option, an empty value,
``--verbose`` given a value or set through the environment. Both read the
options from the one table in :mod:`kubelock.options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
from typing import TYPE_CHECKING, Annotated, Any

import cyclopts
from cyclopts import App, Parameter

from .errors import UsageError, one_line
from .options import DEFAULT_OPTIONS, OPTIONS, VERSION_TEXT, Option, Options, env_var

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


def _parameter(option: Option) -> inspect.Parameter:
    """``option`` as a keyword parameter of the function cyclopts reads options into."""
    if not option.takes_value:
        kind: Any = bool
    elif option.default is None:
        kind = str | None
    else:
        kind = str
    extra: dict[str, Any] = {}
    if option.shown_default is not None:
        extra["show_default"] = option.shown_default
    if option.alias is not None:
        extra["alias"] = option.alias
    declared = Parameter(
        name=option.long,
        env_var=env_var(option.name),
        metavar=option.metavar,
        help=option.help,
        negative=(),
        **extra,
    )
    return inspect.Parameter(
        option.field,
        inspect.Parameter.KEYWORD_ONLY,
        default=option.default,
        annotation=Annotated[kind, declared],
    )


def _read(**given: Any) -> Options:
    return dataclasses.replace(DEFAULT_OPTIONS, **given)


# cyclopts reads the options from this signature, built from kubelock.options.
_read.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_parameter(option) for option in OPTIONS], return_annotation=Options
)
_read.__annotations__ = {
    parameter.name: parameter.annotation
    for parameter in _read.__signature__.parameters.values()  # type: ignore[attr-defined]
} | {"return": Options}


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
    app.default(_read)
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
