"""``kubelock [OPTIONS] COMMAND [ARGS...]``: argv → :class:`~kubelock.settings.Settings`.

Compatible with the Go ``kubelock``: the same flags and defaults, spelled
``-name x``, ``-name=x``, ``--name x`` or ``--name=x``. Options end at the
first word that is not an option (or at ``--``), so everything after it
belongs to the command: ``kubelock --name db python manage.py migrate
--noinput`` gives ``--noinput`` to python.

Parsing happens in two steps. :func:`split_argv` walks argv itself, because
only kubelock knows where its options end; it also rewrites Go-style
``-name`` to ``--name``. The options (declared once, in
:mod:`kubelock.options`) are then read here, with the
``KUBELOCK_<NAME>`` environment variables, as cyclopts would read it; for
``--help``, ``--version`` and unusual forms it goes to cyclopts
(:mod:`kubelock.usage`), whose import start-up need not pay for otherwise.
Everything is validated before any network I/O; a mistake is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from .errors import KubelockError, UsageError
from .options import DEFAULT_OPTIONS, OPTIONS, VERSION_TEXT, Options, env_var
from .settings import (
    ElectionTiming,
    Settings,
    default_identity,
    flag,
    parse_duration,
    parse_metrics_address,
    validate_lock_type,
    validate_log_format,
    validate_once_key,
    validate_output,
    validate_pushgateway,
    validate_timing,
)

__all__ = [
    "kubectl_argv",
    "kubectl_main",
    "main",
    "parse_args",
    "split_argv",
]

_T = TypeVar("_T")

#: --help and --version: printed by cyclopts (kubelock.usage), not options of a run.
_PRINTED_SPELLINGS = {"--help": ("--help", "-h"), "--version": ("--version",)}
_PRINTED = frozenset(_PRINTED_SPELLINGS)
#: Every spelling → its long name, and the long names that take a value.
_CANONICAL = {spelling: option.long for option in OPTIONS for spelling in option.spellings} | {
    spelling: long for long, spellings in _PRINTED_SPELLINGS.items() for spelling in spellings
}
_TAKES_VALUE = {option.long for option in OPTIONS if option.takes_value}
#: The options that take no value (as Options' field names).
_FLAGS = tuple(option.field for option in OPTIONS if not option.takes_value)


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
        import difflib  # only for a mistyped option: not on every start

        close = difflib.get_close_matches(spelled, longs, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_options(option_words: list[str]) -> Options | None:
    """The usual invocation, read without cyclopts; None when it is not that usual.

    Usual: no ``--help`` or ``--version``, every option at most once, with a
    non-empty value where it takes one and none where it does not, and no
    empty or ``--verbose`` environment variable. Options not on the command
    line come from the environment (``KUBELOCK_<NAME>``), else the default, as
    cyclopts reads them.
    """
    given: dict[str, str | None] = {}
    flags = dict.fromkeys(_FLAGS, False)
    for word in option_words:
        long, has_value, value = word.partition("=")
        key = long[2:].replace("-", "_")
        if long in _PRINTED or key in given or flags.get(key):
            return None
        if key in flags:
            if has_value:
                return None
            flags[key] = True
            continue
        if not value:
            return None
        given[key] = value
    if any(os.environ.get(env_var(key)) is not None for key in flags):
        return None
    values: dict[str, Any] = dict(flags)
    for field in dataclasses.fields(Options):
        key = field.name
        if key in flags:
            continue
        if key in given:
            values[key] = given[key]
            continue
        from_env = os.environ.get(env_var(key))
        if from_env == "":
            return None
        values[key] = getattr(DEFAULT_OPTIONS, key) if from_env is None else from_env
    return Options(**values)


def parse_args(argv: Sequence[str]) -> Settings | None:
    """argv (without the program name) → validated :class:`Settings`; no I/O.

    Returns None when ``--help`` or ``--version`` was asked for and has been
    printed to stdout. Raises :class:`UsageError` for anything wrong.
    """
    option_words, command = split_argv(argv)
    if option_words == ["--version"]:  # the one printout that needs no cyclopts
        print(VERSION_TEXT)
        return None
    given = _read_options(option_words)
    if given is None:
        from .usage import read_options  # cyclopts: --help, --version, unusual argv

        given = read_options(option_words)
    if given is None:
        return None  # --help or --version, already printed
    if given.status:
        if command:
            raise UsageError(f"--status takes no command (got {command[0]!r}); see kubelock --help")
    elif not command:
        raise UsageError(
            "missing the command to run: kubelock [OPTIONS] COMMAND [ARGS...]; see kubelock --help"
        )
    on_command_line = {word.partition("=")[0] for word in option_words}

    def source(option: str) -> str:
        """Name what the user wrote, so a bad value from the environment is easy to find."""
        if option not in on_command_line and os.environ.get(env_var(option[2:])) is not None:
            return env_var(option[2:])
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

    output = checked("--output", validate_output, given.output)
    if output != "text" and not given.status:
        raise UsageError("--output only applies to --status; see kubelock --help")
    if given.watch and not given.status:
        raise UsageError("--watch only applies to --status; see kubelock --help")
    metrics = given.metrics_address or None
    pushgateway = given.pushgateway or None
    timeout = given.timeout or None
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
        timeout=None if timeout is None else duration("--timeout", timeout),
        once=(
            None
            if given.once is None
            else checked("--once", lambda key: validate_once_key(key, spell=flag), given.once)
        ),
        status=output if given.status else None,
        watch=given.watch,
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``kubelock`` console script: parse, run under the lock, exit with the status.

    Given no ``argv`` (the program itself, reading ``sys.argv``), it ends the
    process with :func:`_exit_now`; given ``argv`` (tests), with ``SystemExit``.
    """
    if argv is None:
        gc.disable()  # until start-up is done: see _started
    status = _run(sys.argv[1:] if argv is None else argv, exiting=argv is None)
    if argv is None:
        _exit_now(status)
    sys.exit(status)


#: ``kubectl lock status NAME``'s options → kubelock's (the rest are spelled alike).
_KUBECTL_SPELLINGS = {"-n": "--namespace"}
_KUBECTL_USAGE = (
    "usage: kubectl lock status NAME [-n NAMESPACE] [-o text|json] [-w] [--lock-type TYPE] "
    "[--kubeconfig PATH] [--context NAME]"
)


def kubectl_argv(argv: Sequence[str]) -> list[str]:
    """``kubectl lock status NAME [OPTIONS]`` (a kubectl plugin) → ``kubelock --status`` argv.

    Raises :class:`UsageError` for anything but ``status`` with one NAME.
    """
    if not argv or argv[0] != "status":
        what = (
            f"unknown subcommand {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        )
        raise UsageError(what + _KUBECTL_USAGE)
    name: str | None = None
    options: list[str] = []
    words = iter(argv[1:])
    for word in words:
        spelled, has_value, value = word.partition("=")
        spelled = _KUBECTL_SPELLINGS.get(spelled, spelled)
        spelled = _CANONICAL.get(spelled, spelled)
        if not spelled.startswith("-"):
            if name is not None:
                raise UsageError(f"kubectl lock status takes one NAME (got {name!r} and {word!r})")
            name = word
        elif has_value:
            options.append(f"{spelled}={value}")
        elif spelled in _TAKES_VALUE:
            following = next(words, None)
            if following is None:
                raise UsageError(f"{spelled} needs a value; {_KUBECTL_USAGE}")
            options.append(f"{spelled}={following}")
        else:
            options.append(spelled)
    if name is None:
        raise UsageError(f"missing the lock's NAME; {_KUBECTL_USAGE}")
    return ["--status", "--name", name, *options]


def kubectl_main() -> NoReturn:
    """The ``kubectl-lock`` console script: ``kubectl lock status NAME`` (read-only)."""
    from .log import report_error

    try:
        argv = kubectl_argv(sys.argv[1:])
    except UsageError as error:
        report_error(str(error))
        _exit_now(error.exit_code)
    _exit_now(_run(argv, exiting=True))


def _run(argv: Sequence[str], *, exiting: bool = False) -> int:
    # The log module and the supervisor are imported late: --help, --version and
    # usage errors stay light. `exiting`: the process ends right after (_exit_now).
    try:
        settings = parse_args(argv)
        if settings is None:
            return 0  # --help or --version, printed
        from .log import setup_logging

        setup_logging(settings.log_format, settings.verbose)
        if settings.status is not None:
            from . import status

            _started()
            return status.run(settings)
        from .watchdog import Watchdog

        # Forked before trio and httpx are imported: a third of the pages to share, and
        # fewer for kubelock to copy as it writes to them.
        watchdog = Watchdog.start()
        try:
            from . import supervisor

            _started()
            return supervisor.run(settings, watchdog)
        finally:
            watchdog.close(reap=not exiting)
    except KubelockError as error:
        from .log import report_error

        report_error(str(error))
        return error.exit_code


def _started() -> None:
    """Start-up is done: let the cyclic garbage collector work again, if main() stopped it.

    Start-up (mostly imports) allocates much and frees little, so the collections
    it would trigger find next to nothing: about 10 ms of CPU on every start,
    which 20 init containers starting on one node pay 20 times over. What start-up
    made lives as long as the process, so it is frozen: later collections skip it
    (and leave the watchdog's shared pages untouched).
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _exit_now(status: int) -> NoReturn:
    """Exit with ``status`` without the interpreter's teardown of every module and object.

    That teardown costs tens of milliseconds of CPU on every run and does
    nothing kubelock needs: by now the lock is released and the child reaped.
    What does matter still happens: ``atexit`` handlers run (logging's flush,
    the kubeconfig loader's removal of its temporary files) and stdout and
    stderr are flushed.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
