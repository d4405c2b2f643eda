"""A stand-in for a Django project's manage.py: `migrate`, `showruns`, `runserver`.

Its "database" is the ConfigMap `example-db` in the Pod's namespace:

- `applied`: the migrations applied so far, one name a line;
- `running`: the Pod whose migration is in progress, else empty;
- `runs`: one line per `migrate` run, written when it ends:
  `<pod> start=<time> end=<time> <what it did>`.

`migrate` is idempotent, as Django's is: it applies only what `applied` lacks,
so after the first run the others find nothing to do. It also checks the
claim kubelock makes: every write carries the resourceVersion it read, so
when two runs overlap, a write conflicts and its run says OVERLAP and fails.

Talks to the API server with the standard library only, as the ServiceAccount
`example-db` (the app's "database password", see database.yaml), whose token,
CA and namespace are mounted at /var/run/secrets/example-db; never with the
Pod's own ServiceAccount, kubelock's, which may write the lock.
`DATABASE_CREDENTIALS` moves that folder (tests emulate a Pod that way).
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MIGRATIONS = ("0001_initial", "0002_customer_email", "0003_order_index")
SECONDS_PER_MIGRATION = float(os.environ.get("SECONDS_PER_MIGRATION", "2"))
DATABASE = os.environ.get("DATABASE_CONFIGMAP", "example-db")
ACCOUNT = Path(os.environ.get("DATABASE_CREDENTIALS") or "/var/run/secrets/example-db")
POD = os.environ.get("POD_NAME") or socket.gethostname()


class Overlap(Exception):
    """Two migrations ran at once."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def say(text: str) -> None:
    print(text, flush=True)


class Database:
    """The ConfigMap, read and written with optimistic concurrency."""

    def __init__(self) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        if ":" in host:
            host = f"[{host}]"
        namespace = (ACCOUNT / "namespace").read_text().strip()
        self.url = (
            f"https://{host}:{os.environ['KUBERNETES_SERVICE_PORT']}"
            f"/api/v1/namespaces/{namespace}/configmaps/{DATABASE}"
        )
        self.tls = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))

    def _call(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        # Always https://: the URL is built above from the Pod's service variables.
        request = urllib.request.Request(  # noqa: S310
            self.url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {(ACCOUNT / 'token').read_text().strip()}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, context=self.tls, timeout=10) as answer:  # noqa: S310
                result: dict[str, Any] = json.load(answer)
                return result
        except urllib.error.HTTPError as error:
            if error.code == 409:
                raise Overlap(f"somebody else wrote {DATABASE} meanwhile") from None
            raise SystemExit(f"{method} {self.url}: {error.code} {error.read().decode()}") from None

    def read(self) -> dict[str, Any]:
        return self._call("GET")

    def write(self, configmap: dict[str, Any]) -> dict[str, Any]:
        """PUT with the resourceVersion that was read: a 409 means another writer."""
        return self._call("PUT", configmap)


def lines(configmap: dict[str, Any], key: str) -> list[str]:
    return [line for line in (configmap.get("data") or {}).get(key, "").splitlines() if line]


def migrate() -> int:
    database = Database()
    started = now()
    state = database.read()
    data = state.setdefault("data", {})
    # Set while a run is in progress. Found set, it is a run that was killed
    # (its Pod deleted mid-way), or one still running: then the final write
    # below conflicts, and one of the two says OVERLAP.
    unfinished = data.get("running", "")
    if unfinished:
        say(f"warning: the run by {unfinished} did not finish")
    data["running"] = POD
    state = database.write(state)  # claims the database, or conflicts

    applied = lines(state, "applied")
    pending = [name for name in MIGRATIONS if name not in applied]
    if not pending:
        say("No migrations to apply.")
    else:
        say("Operations to perform:\n  Apply all migrations: example\nRunning migrations:")
    for name in pending:
        sys.stdout.write(f"  Applying example.{name}...")
        sys.stdout.flush()
        time.sleep(SECONDS_PER_MIGRATION)
        applied.append(name)
        say(" OK")

    data = state["data"]
    outcome = f"applied {','.join(pending)}" if pending else "nothing to do"
    if unfinished:
        outcome += f" (after an unfinished run by {unfinished})"
    data["applied"] = "".join(f"{name}\n" for name in applied)
    data["running"] = ""
    data["runs"] = data.get("runs", "") + f"{POD} start={started} end={now()} {outcome}\n"
    database.write(state)
    return 0


def showruns() -> int:
    for line in lines(Database().read(), "runs"):
        say(line)
    return 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        state = Database().read()
        missing = [name for name in MIGRATIONS if name not in lines(state, "applied")]
        if self.path == "/healthz":
            status, body = (503, f"unapplied: {' '.join(missing)}\n") if missing else (200, "ok\n")
        else:
            status = 200
            body = f"{POD}: schema has {len(MIGRATIONS) - len(missing)}/{len(MIGRATIONS)}"
            body += " migrations\nruns:\n" + "".join(f"  {r}\n" for r in lines(state, "runs"))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        if self.path != "/healthz":
            super().log_message(format, *args)


def runserver(address: str = "0.0.0.0:8000") -> int:
    host, _, port = address.rpartition(":")
    say(f"serving on {host}:{port}")
    http.server.ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
    return 0


def main(argv: list[str]) -> int:
    commands = {"migrate": migrate, "showruns": showruns, "runserver": runserver}
    if not argv or argv[0] not in commands:
        say(f"usage: manage.py {{{','.join(commands)}}} [ADDRESS]")
        return 2
    try:
        return commands[argv[0]](*argv[1:])
    except Overlap as error:
        say(f"OVERLAP: {error}: two migrations ran at once")
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
