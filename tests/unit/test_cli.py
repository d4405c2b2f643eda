"""argv → Settings: Go-compatible spellings, where options end, environment, validation.

None of this needs an API server: everything is checked before any I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import types

import pytest

import kubelock
from kubelock import cli
from kubelock.cli import kubectl_argv, parse_args, split_argv
from kubelock.errors import ConfigError, UsageError
from kubelock.settings import ElectionTiming, Settings
from kubelock.testing import process_alive
from kubelock.watchdog import Watchdog

from .fresh import output_of


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KUBELOCK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOSTNAME", "pod-a")


def parsed(*argv: str) -> Settings:
    settings = parse_args(argv)
    assert settings is not None
    return settings


# --- what a user types ---------------------------------------------------------------


def test_the_defaults_are_the_go_originals() -> None:
    settings = parsed("true")
    assert settings.command == ("true",)
    assert settings.name == "example-app"
    assert settings.namespace is None
    assert settings.identity == "pod-a"
    assert settings.timing == ElectionTiming(15.0, 10.0, 2.0)
    assert settings.lock_type == "leases"
    assert settings.grace_period == 20.0
    assert settings.log_format == "text"
    assert not settings.verbose
    assert settings.kubeconfig is None
    assert settings.context is None
    assert settings.metrics_address is None
    assert settings.pushgateway is None


def test_the_identity_falls_back_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTNAME")
    assert parsed("true").identity == socket.gethostname()


@pytest.mark.parametrize(
    "spelling",
    [["--name", "db"], ["--name=db"], ["-name", "db"], ["-name=db"]],
    ids=["--name x", "--name=x", "-name x", "-name=x"],
)
def test_every_spelling_of_an_option(spelling: list[str]) -> None:
    assert parsed(*spelling, "true").name == "db"


def test_a_go_kubelock_invocation_works_unchanged() -> None:
    settings = parsed(
        "-id", "worker-1",
        "-kubeconfig", "/etc/kube/config",
        "-lease-duration", "30s",
        "-name", "migrations",
        "-namespace", "shop",
        "-renew-deadline", "20s",
        "-retry-period", "5s",
        "./migrate.sh",
    )  # fmt: skip
    assert settings == Settings(
        command=("./migrate.sh",),
        identity="worker-1",
        kubeconfig="/etc/kube/config",
        name="migrations",
        namespace="shop",
        timing=ElectionTiming(lease_duration=30.0, renew_deadline=20.0, retry_period=5.0),
    )


def test_the_new_options() -> None:
    settings = parsed(
        "--context", "staging",
        "--lock-type", "configmaps",
        "--grace-period", "1m30s",
        "--log-format=json",
        "-v",
        "--metrics-address", "127.0.0.1:9100",
        "--pushgateway", "http://pushgateway:9091/",
        "true",
    )  # fmt: skip
    assert settings.context == "staging"
    assert settings.lock_type == "configmaps"
    assert settings.grace_period == 90.0
    assert settings.log_format == "json"
    assert settings.verbose
    assert settings.metrics_address == ("127.0.0.1", 9100)
    assert settings.pushgateway == "http://pushgateway:9091"


def test_timeout_once_and_status() -> None:
    settings = parsed("--timeout", "1m30s", "--once", "v1.2.3-abc", "true")
    assert settings.timeout == 90.0
    assert settings.once == "v1.2.3-abc"
    assert settings.status is None
    assert parsed("--timeout=0", "true").timeout == 0.0
    assert parsed("true").timeout is None
    assert parsed("true").once is None
    assert parsed("--status").status == "text"
    assert parsed("--status", "-o", "json").status == "json"
    assert parsed("--status", "--output=json", "--name", "db").name == "db"
    assert not parsed("--status").watch
    assert parsed("--status", "--watch").watch
    assert parsed("--status", "-w", "-o", "json").watch


def test_options_end_at_the_first_word_that_is_not_one() -> None:
    settings = parsed("--name", "db", "python", "manage.py", "migrate", "--noinput", "-v")
    assert settings.command == ("python", "manage.py", "migrate", "--noinput", "-v")
    assert settings.name == "db"
    assert not settings.verbose


def test_double_dash_ends_the_options_too() -> None:
    settings = parsed("--name", "db", "--", "--version", "--help")
    assert settings.command == ("--version", "--help")


def test_a_value_may_start_with_a_dash() -> None:
    assert parsed("--id", "-me-", "true").identity == "-me-"


def test_an_option_value_may_contain_equals_signs() -> None:
    assert parsed("--id=a=b", "true").identity == "a=b"


def test_split_argv_normalises_go_style_for_cyclopts() -> None:
    options, command = split_argv(["-name", "x", "-v", "--id=y", "cmd", "-name", "z"])
    assert options == ["--name=x", "--verbose", "--id=y"]
    assert command == ["cmd", "-name", "z"]


def test_metrics_address_on_all_interfaces() -> None:
    assert parsed("--metrics-address", ":9100", "true").metrics_address == ("0.0.0.0", 9100)
    assert parsed("--metrics-address", "[::1]:80", "true").metrics_address == ("::1", 80)


# --- the environment -------------------------------------------------------------------


def test_every_option_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ID": "from-env",
        "KUBECONFIG": "/env/config",
        "CONTEXT": "env-context",
        "LEASE_DURATION": "40s",
        "RENEW_DEADLINE": "30s",
        "RETRY_PERIOD": "3s",
        "NAME": "env-lock",
        "NAMESPACE": "env-ns",
        "LOCK_TYPE": "endpoints",
        "GRACE_PERIOD": "5s",
        "LOG_FORMAT": "json",
        "VERBOSE": "true",
        "METRICS_ADDRESS": ":9200",
        "PUSHGATEWAY": "https://push.example",
        "TIMEOUT": "2s",
        "ONCE": "v7",
    }.items():
        monkeypatch.setenv(f"KUBELOCK_{name}", value)
    assert parsed("true") == Settings(
        command=("true",),
        identity="from-env",
        kubeconfig="/env/config",
        context="env-context",
        timing=ElectionTiming(lease_duration=40.0, renew_deadline=30.0, retry_period=3.0),
        name="env-lock",
        namespace="env-ns",
        lock_type="endpoints",
        grace_period=5.0,
        log_format="json",
        verbose=True,
        metrics_address=("0.0.0.0", 9200),
        pushgateway="https://push.example",
        timeout=2.0,
        once="v7",
    )


def test_the_command_line_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBELOCK_NAME", "env-lock")
    assert parsed("-name", "cli-lock", "true").name == "cli-lock"


def test_an_empty_variable_means_unset_for_optional_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBELOCK_NAMESPACE", "")
    monkeypatch.setenv("KUBELOCK_METRICS_ADDRESS", "")
    settings = parsed("true")
    assert settings.namespace is None
    assert settings.metrics_address is None


def test_a_bad_value_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBELOCK_LEASE_DURATION", "soon")
    with pytest.raises(UsageError, match=r"^KUBELOCK_LEASE_DURATION: invalid duration 'soon'"):
        parsed("true")


# --- mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "missing the command to run"),
        (["--name", "x"], "missing the command to run"),
        (["--name", "x", "--"], "missing the command to run"),
        (["--nmae", "x", "true"], "unknown option --nmae (did you mean --name?)"),
        (["-lease", "15s", "true"], "unknown option --lease (did you mean --lease-duration?)"),
        (["--name"], "--name needs a value"),
        (["--lease-duration", "15", "true"], "--lease-duration: invalid duration '15'"),
        (["--retry-period", "2x", "true"], "--retry-period: invalid duration '2x'"),
        (["--lease-duration", "10s", "true"], "--lease-duration (10s) must be greater than"),
        (["--renew-deadline", "2s", "true"], "--renew-deadline (2s) must be greater than 1.2"),
        (["--retry-period", "0", "true"], "--retry-period must be greater than zero"),
        (["--lease-duration", "99999999999h", "true"], "invalid duration '99999999999h': out of"),
        (["--lease-duration", "9" * 400 + "h", "true"], "out of range"),
        (["--lease-duration", "596524h", "true"], "must be at most 596523h14m7s"),
        (["--grace-period", "-5s", "true"], "--grace-period must not be negative (got -5s)"),
        (["--name", "My_Lock", "true"], "invalid lock name 'My_Lock'"),
        (["--namespace", "kube.system", "true"], "invalid namespace 'kube.system'"),
        (["--id", "", "true"], "the identity (--id) must not be empty"),
        (["--lock-type", "lease", "true"], "invalid lock type 'lease': use one of leases,"),
        (["--log-format", "xml", "true"], "invalid log format 'xml': use one of text, json"),
        (["--metrics-address", "9100", "true"], "invalid metrics address '9100'"),
        (["--metrics-address", "host:99999", "true"], "invalid metrics address 'host:99999'"),
        (["--pushgateway", "pushgateway:9091", "true"], "invalid pushgateway URL"),
        (["-v=perhaps", "true"], "invalid value for --verbose"),
        (["--timeout", "-1s", "true"], "--timeout must not be negative (got -1s)"),
        (["--timeout", "5", "true"], "--timeout: invalid duration '5'"),
        (["--once", "", "true"], "invalid --once KEY ''"),
        (["--once", "v 1", "true"], "invalid --once KEY 'v 1'"),
        (["--once", "v" * 129, "true"], "use 1 to 128 printable characters"),
        (["--status", "true"], "--status takes no command (got 'true')"),
        (["-o", "json", "true"], "--output only applies to --status"),
        (["--watch", "true"], "--watch only applies to --status"),
        (["--status", "-o", "yaml"], "invalid output format 'yaml': use one of text, json"),
    ],
)
def test_mistakes_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_args(argv)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


# --- main() and `python -m kubelock` ---------------------------------------------------


def kubelock_process(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KUBELOCK_")}
    return subprocess.run(
        [sys.executable, "-m", "kubelock", *argv],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "kubelock: missing the command to run"),
        (["--nmae", "x", "true"], "kubelock: unknown option --nmae (did you mean --name?)"),
        (["-lease-duration", "1x", "true"], "kubelock: --lease-duration: invalid duration '1x'"),
        (["-renew-deadline", "20s", "true"], "kubelock: --lease-duration (15s) must be greater"),
        (["-name", "UPPER", "true"], "kubelock: invalid lock name 'UPPER'"),
    ],
)
def test_a_mistake_is_one_line_on_stderr_and_exit_status_2(argv: list[str], message: str) -> None:
    result = kubelock_process(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1


def test_help_reads_like_the_go_original_plus_the_new_options() -> None:
    result = kubelock_process("-help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage of kubelock:\n")
    for option in (
        "id", "kubeconfig", "context", "lease-duration", "renew-deadline", "retry-period",
        "name", "namespace", "lock-type", "grace-period", "log-format", "verbose",
        "metrics-address", "pushgateway",
    ):  # fmt: skip
        assert re.search(rf"^  (-\w, )?--{option}\b", result.stdout, re.MULTILINE)
        assert f"env: KUBELOCK_{option.upper().replace('-', '_')}" in result.stdout
    for default in ("default: 15s", "default: 10s", "default: 2s", "default: example-app"):
        assert default in result.stdout
    assert "-v, --verbose" in result.stdout
    assert "\x1b[" not in result.stdout  # plain text, no terminal styling


def test_help_wins_over_a_missing_command_and_bad_environment() -> None:
    result = kubelock_process("--name", "x", "--help", KUBELOCK_LEASE_DURATION="bad")
    assert result.returncode == 0
    assert "Usage of kubelock:" in result.stdout


@pytest.mark.parametrize(("argv", "status"), [(["--version"], 0), (["--nmae", "x", "true"], 2)])
def test_the_program_exits_fast_yet_runs_atexit_and_flushes(argv: list[str], status: int) -> None:
    program = (
        "import atexit, sys; atexit.register(print, 'atexit ran'); "
        f"sys.argv = ['kubelock', *{argv!r}]; "
        "from kubelock.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == status
    assert result.stdout.endswith("atexit ran\n")  # buffered output, flushed after atexit
    assert ("kubelock 0" in result.stdout) == (status == 0)


def test_version() -> None:
    result = kubelock_process("--version")
    assert result.returncode == 0
    assert result.stdout == f"kubelock {kubelock.__version__}\n"


@pytest.fixture
def fake_supervisor(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stands in for the supervisor, so main()'s own job is all that runs."""
    kubelock_logger = logging.getLogger("kubelock")  # main() sets up logging: undo it after
    monkeypatch.setattr(kubelock_logger, "handlers", [])
    monkeypatch.setattr(kubelock_logger, "propagate", kubelock_logger.propagate)
    monkeypatch.setattr(kubelock_logger, "level", kubelock_logger.level)
    outcome = types.SimpleNamespace(settings=None, result=0, watchdog_alive=None)

    def run(settings: Settings, watchdog: Watchdog) -> int:
        outcome.settings = settings
        outcome.watchdog_alive = process_alive(watchdog.pid)
        if isinstance(outcome.result, BaseException):
            raise outcome.result
        assert isinstance(outcome.result, int)
        return outcome.result

    module = types.ModuleType("kubelock.supervisor")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kubelock.supervisor", module)
    monkeypatch.setattr(kubelock, "supervisor", module, raising=False)
    return outcome


def test_main_exits_with_what_the_run_returns(fake_supervisor: types.SimpleNamespace) -> None:
    fake_supervisor.result = 42
    with pytest.raises(SystemExit) as caught:
        cli.main(["-name", "db", "true"])
    assert caught.value.code == 42
    assert fake_supervisor.settings.name == "db"
    assert fake_supervisor.watchdog_alive  # forked before the run, closed after it


def test_main_reports_a_kubelock_error_in_one_line(
    fake_supervisor: types.SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_supervisor.result = ConfigError("context 'nope' is not in /k/config")
    with pytest.raises(SystemExit) as caught:
        cli.main(["true"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == "kubelock: context 'nope' is not in /k/config\n"


def test_main_does_not_run_anything_on_bad_usage(fake_supervisor: types.SimpleNamespace) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["--lease-duration", "forever", "true"])
    assert caught.value.code == 2
    assert fake_supervisor.settings is None


# --- the usual invocation is read without cyclopts, exactly as cyclopts reads it ---


def option_words_in(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """kubelock's option words of ``argv``, with ``env`` set for the rest of the test."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli.split_argv(argv)[0]


def test_the_option_table_is_the_one_cyclopts_declares() -> None:
    from kubelock import usage

    assert usage.option_table() == (cli._CANONICAL, cli._TAKES_VALUE)


def test_the_options_are_declared_once_and_the_help_is_built_without_the_cli() -> None:
    from kubelock import options

    fields = [field.name for field in dataclasses.fields(options.Options)]
    assert fields == [option.field for option in options.OPTIONS]
    # kubelock.usage (cyclopts) reads the same table: it needs nothing of kubelock.cli.
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, kubelock.usage; print('kubelock.cli' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert imported.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["true"], {}),
        (["--name", "db", "-v", "--lease-duration=20s", "--", "true"], {}),
        (["-name", "db", "-namespace", "ns", "-id", "pod-1", "true"], {}),
        (["--metrics-address", ":9100", "true"], {"KUBELOCK_PUSHGATEWAY": "http://pg:9091"}),
        (["true"], {"KUBELOCK_NAME": "from-env", "KUBELOCK_RETRY_PERIOD": "1s"}),
        (["--name", "flag", "true"], {"KUBELOCK_NAME": "env"}),
        (["--lock-type", "configmaps", "--log-format", "json", "true"], {"KUBELOCK_ID": "x"}),
    ],
)
def test_the_usual_invocation_reads_as_cyclopts_reads_it(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubelock import usage

    option_words = option_words_in(argv, env, monkeypatch)
    fast = cli._read_options(option_words)
    assert fast is not None
    assert fast == usage.read_options(option_words)


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--help"], {}),
        (["--version"], {}),
        (["--name", "a", "--name", "b", "true"], {}),
        (["--name=", "true"], {}),
        (["--verbose=true", "true"], {}),
        (["true"], {"KUBELOCK_VERBOSE": "1"}),
        (["true"], {"KUBELOCK_NAMESPACE": ""}),
    ],
)
def test_anything_unusual_is_left_to_cyclopts(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli._read_options(option_words_in(argv, env, monkeypatch)) is None


@pytest.mark.parametrize("argv", [["--name", "db", "-v", "--", "true"], ["--version"]])
def test_the_usual_invocation_does_not_import_cyclopts(argv: list[str]) -> None:
    check = (
        "import sys; from kubelock.cli import parse_args; "
        f"parse_args({argv!r}); "
        "print(sorted(m for m in ('cyclopts', 'rich', 'attrs', 'difflib') if m in sys.modules))"
    )
    loaded = output_of(check)
    assert loaded.splitlines()[-1] == "[]"


def test_the_watchdog_is_forked_before_trio_and_httpx_are_imported() -> None:
    # The smaller kubelock is at the fork, the fewer pages it copies afterwards.
    check = (
        "import sys; from kubelock import watchdog; "
        "watchdog.Watchdog.start = lambda: print(sorted(m for m in ('trio', 'httpx') "
        "if m in sys.modules), flush=True) or sys.exit(0); "
        "from kubelock.cli import main; main(['--name', 'db', '--', 'true'])"
    )
    assert output_of(check).splitlines()[-1] == "[]"


def test_the_collector_is_off_during_start_up_and_on_for_the_run() -> None:
    # The program itself (main() reading sys.argv) imports without the cyclic collector;
    # the run, which may hold the lock for hours, has it back.
    check = (
        "import gc, sys, types; "
        "fake = types.ModuleType('kubelock.supervisor'); "
        "fake.run = lambda settings, watchdog: print(gc.isenabled(), gc.get_freeze_count() > 0) "
        "or 0; "
        "sys.modules['kubelock.supervisor'] = fake; "
        "from kubelock.cli import main; from kubelock import log; "
        "log.setup_logging = lambda *args: print(gc.isenabled()); "
        "sys.argv = ['kubelock', '--name', 'db', '--', 'true']; main()"
    )
    assert output_of(check).splitlines()[-2:] == ["False", "True True"]


# --- kubectl lock status NAME --------------------------------------------------------


def test_kubectl_lock_status_is_kubelock_status() -> None:
    argv = kubectl_argv(["status", "migrations", "-n", "shop", "-o", "json", "--context=prod"])
    assert argv == [
        "--status", "--name", "migrations", "--namespace=shop", "--output=json", "--context=prod",
    ]  # fmt: skip
    settings = parse_args(argv)
    assert settings is not None
    assert (settings.name, settings.namespace, settings.status) == ("migrations", "shop", "json")
    assert settings.context == "prod"


def test_kubectl_lock_status_watch_is_kubelock_status_watch() -> None:
    for watch in ("--watch", "-w"):
        argv = kubectl_argv(["status", "migrations", watch])
        assert argv == ["--status", "--name", "migrations", "--watch"]
        settings = parse_args(argv)
        assert settings is not None
        assert settings.watch


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "usage: kubectl lock status NAME"),
        (["take", "x"], "unknown subcommand 'take'"),
        (["status"], "missing the lock's NAME"),
        (["status", "a", "b"], "takes one NAME (got 'a' and 'b')"),
        (["status", "a", "-n"], "--namespace needs a value"),
    ],
)
def test_kubectl_lock_mistakes(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        kubectl_argv(argv)
