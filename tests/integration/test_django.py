"""examples/django against a real PostgreSQL: what kubelock is for.

Four replicas of a real Django project start at once on a fresh database.
Without a lock their `manage.py migrate` runs collide (a table or a type
created twice) and some of them fail. Each under `kubelock --once`, all four
exit 0, `migrate` runs once, and the slow data migration's row is there once.

PostgreSQL is Debian's (`apt-get install postgresql`, `just test-tools`),
started here in a temporary folder on a loopback port; Django and psycopg are
the dev group's, at the versions the example's requirements.txt pins.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from kubelock.testing import ControlPlane

from .kubelock_proc import clean_environment, spawn, wait_for

APP = Path(__file__).resolve().parents[2] / "examples" / "django" / "app"
REPLICAS = 4
DATA_MIGRATION = "shop.0003_record_run"
#: Where PostgreSQL's programs are, when not in Debian's /usr/lib/postgresql/N/bin.
BINDIR_VARIABLE = "POSTGRES_BINDIR"
# What a collision between two unlocked runs says (a table, or its row type, made twice).
# What racing migrates fail with: a table created twice, a type or row inserted
# twice, or a column one run looks for while another is still altering the table.
COLLISION = re.compile(
    r"already exists"
    r"|duplicate key value violates unique constraint"
    r'|column "[^"]+" of relation "[^"]+" does not exist'
)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=database, autocommit=True
        )

    def create_database(self) -> str:
        name = f"app_{secrets.token_hex(4)}"
        with self.connect() as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return name

    def environment(self, database: str) -> dict[str, str]:
        """How the example's settings find the database (libpq's own variables)."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGDATABASE": database,
            "PGPASSWORD": "",
            "MIGRATION_SECONDS": "2",
        }


def postgres_bindir() -> Path:
    configured = os.environ.get(BINDIR_VARIABLE)
    candidates = [configured] if configured else sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    pytest.fail(
        f"PostgreSQL's initdb not found: `apt-get install postgresql` (or `just test-tools`), "
        f"or set {BINDIR_VARIABLE} to the folder of initdb and pg_ctl",
        pytrace=False,
    )


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server of its own, on a loopback port, trusting local connections."""
    bindir = postgres_bindir()
    folder = Path(tempfile.mkdtemp(prefix="kubelock-postgres-"))
    # initdb refuses to run as root: as root, the server runs as Debian's `postgres` user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = folder / "data", folder / "postgres.log", free_loopback_port()
    try:
        subprocess.run(
            [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "app",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options,
             "-l", str(log), "-w", "-t", "120", "start"],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        yield Postgres(host="127.0.0.1", port=port, user="app")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def migration_runs(postgres: Postgres, database: str) -> list[str]:
    with postgres.connect(database) as connection:
        rows = connection.execute("SELECT migration FROM shop_migrationrun ORDER BY id")
        return [str(migration) for (migration,) in rows]


def recorded_twice(postgres: Postgres, database: str) -> list[tuple[object, ...]]:
    """Migrations that django_migrations lists more than once."""
    with postgres.connect(database) as connection:
        return connection.execute(
            "SELECT app, name, count(*) FROM django_migrations GROUP BY app, name"
            " HAVING count(*) > 1"
        ).fetchall()


def pinned_versions() -> dict[str, str]:
    text = (APP / "requirements.txt").read_text()
    return {name.lower(): pin for name, pin in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def test_the_django_here_is_the_one_the_example_pins() -> None:
    pins = pinned_versions()
    assert version("django") == pins["django"]
    assert version("psycopg") == pins["psycopg"]


def test_plain_concurrent_migrates_collide(postgres: Postgres, tmp_path: Path) -> None:
    """The control: four unlocked `migrate` runs, let go together once Django is loaded."""
    database = postgres.create_database()
    gate = tmp_path / "go"
    # manage.py migrate, started once Django is set up and `gate` exists: the
    # runs then start within milliseconds of each other, as Pods rolled out together do.
    launcher = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'mysite.settings')\n"
        "import django\n"
        "django.setup()\n"
        "from django.core.management import execute_from_command_line\n"
        "Path(sys.argv[1]).touch()\n"
        "while not Path(sys.argv[2]).exists():\n"
        "    time.sleep(0.01)\n"
        "execute_from_command_line(['manage.py', 'migrate', '--noinput'])\n"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", launcher, str(tmp_path / f"ready-{n}"), str(gate)],
            cwd=APP,
            env=clean_environment(postgres.environment(database)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(REPLICAS)
    ]
    wait_for(
        lambda: all((tmp_path / f"ready-{n}").exists() for n in range(REPLICAS)),
        timeout=120,
        what="the four runs to load Django",
    )
    gate.touch()
    outputs = [run.communicate(timeout=240) for run in runs]
    codes = [run.returncode for run in runs]

    failed = [err for run, (_, err) in zip(runs, outputs, strict=True) if run.returncode != 0]
    assert failed, f"all four unlocked runs succeeded: {codes}"
    for err in failed:
        assert COLLISION.search(err), err


@pytest.mark.parametrize("once", [True, False], ids=["once", "every-pod"])
def test_under_kubelock_every_replica_migrates_and_the_schema_is_migrated_once(
    once: bool,
    postgres: Postgres,
    control_plane: ControlPlane,
    namespace: str,
    kubeconfig: Path,
) -> None:
    database = postgres.create_database()
    # As examples/django's init container runs it, with a --id per Pod.
    lock = ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--name", "migrations"]
    if once:
        lock += ["--once", "v1"]
    migrate = [sys.executable, "manage.py", "migrate", "--noinput"]
    contenders = [
        spawn(
            [*lock, "--id", f"web-{n}", "--", *migrate],
            env=postgres.environment(database),
            cwd=APP,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for n in range(REPLICAS)
    ]
    outputs = [contender.communicate(timeout=240)[0] for contender in contenders]
    codes = [contender.returncode for contender in contenders]

    assert codes == [0] * REPLICAS, outputs
    started = [output for output in outputs if "Operations to perform:" in output]
    migrated = [output for output in outputs if f"Applying {DATA_MIGRATION}... OK" in output]
    assert len(migrated) == 1, outputs
    if once:
        # The other three find the version done and do not run migrate at all.
        assert started == migrated, outputs
        assert sum("'v1' is done by" in output for output in outputs) == REPLICAS - 1, outputs
    else:
        # Each runs migrate in turn; after the first, there is nothing left to do.
        assert len(started) == REPLICAS, outputs
        assert sum("No migrations to apply." in output for output in outputs) == REPLICAS - 1
    assert migration_runs(postgres, database) == [DATA_MIGRATION]
    assert recorded_twice(postgres, database) == []
    check = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--check"],
        cwd=APP,
        env=clean_environment(postgres.environment(database)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
