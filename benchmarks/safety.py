"""What the watchdog costs, and how fast the command dies when kubelock cannot stop it.

    uv run python -m benchmarks.safety [--runs 5]

* Start-up: the time ``Watchdog.start()`` takes (the fork) in a process that
  has imported what the CLI has imported at that point; memory: the forked
  watchdog's RSS, PSS and private (USS) bytes from /proc/PID/smaps_rollup.
* kubelock SIGKILLed: from the SIGKILL to the command's death (a pidfd on the
  command, so the moment is exact), on the real control plane.
* kubelock frozen (SIGSTOP): the command's death relative to ``held_until``,
  taken as the last stored renewTime plus the lease duration (renewTime is
  stamped just before the renewal is sent, so this ``held_until`` is at most
  a few milliseconds early). Negative: dead before anyone could take over.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from ._plane import control_plane

LEASE = 6.0
SHORT = ["--lease-duration", "6s", "--renew-deadline", "4s", "--retry-period", "1s"]


def watchdog_cost(runs: int) -> None:
    import kubelock.cli
    import kubelock.supervisor
    from kubelock.watchdog import Watchdog

    del kubelock.cli
    starts, rss, pss, uss = [], [], [], []
    for _ in range(runs):
        began = time.perf_counter()
        watchdog = Watchdog.start()
        starts.append(time.perf_counter() - began)
        time.sleep(0.3)  # settled: signals set, files closed, waiting in poll()
        fields = {}
        for line in Path(f"/proc/{watchdog.pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
        rss.append(fields["Rss"])
        pss.append(fields["Pss"])
        uss.append(fields["Private_Clean"] + fields["Private_Dirty"])
        watchdog.close()
    print(
        f"watchdog start-up (fork): median {statistics.median(starts) * 1000:.2f} ms "
        f"(min {min(starts) * 1000:.2f}, max {max(starts) * 1000:.2f}) over {runs} runs"
    )
    print(
        f"watchdog memory: RSS {statistics.median(rss) / 1024:.1f} MiB (shared with kubelock), "
        f"PSS {statistics.median(pss) / 1024:.1f} MiB, "
        f"private {statistics.median(uss) / 1024:.2f} MiB (medians)"
    )


def kubelock(kubeconfig: Path, name: str, pidfile: Path) -> subprocess.Popen[bytes]:
    command = f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; trap '' TERM; exec sleep 600"
    return subprocess.Popen(
        [
            *[sys.executable, "-m", "kubelock", "--kubeconfig", str(kubeconfig), "--name", name],
            *[*SHORT, "--grace-period", "60s", "sh", "-c", command],
        ],
        stderr=subprocess.DEVNULL,
    )


def command_pidfd(pidfile: Path) -> int:
    deadline = time.monotonic() + 60
    while not pidfile.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the command did not start")
        time.sleep(0.01)
    return os.pidfd_open(int(pidfile.read_text()))


def died_at(pidfd: int, timeout: float) -> float:
    """``time.time()`` when the process behind ``pidfd`` exited."""
    if not select.select([pidfd], [], [], timeout)[0]:
        raise RuntimeError(f"the command was still alive after {timeout:g} s")
    return time.time()


def renew_time(plane: object, namespace: str, name: str) -> float:
    with plane.admin_client() as admin:  # type: ignore[attr-defined]
        spec = admin.get(
            f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        ).json()["spec"]
    return datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00")).timestamp()


def deaths(runs: int) -> None:
    namespace = "bench-safety"
    killed: list[float] = []
    frozen: list[float] = []
    with control_plane(namespace) as (plane, kubeconfig), tempfile.TemporaryDirectory() as folder:
        for run in range(runs):
            pidfile = Path(folder) / f"killed-{run}"
            process = kubelock(kubeconfig, f"killed-{run}", pidfile)
            pidfd = command_pidfd(pidfile)
            time.sleep(0.5)
            sent = time.time()
            process.send_signal(signal.SIGKILL)
            killed.append(died_at(pidfd, 30) - sent)
            process.wait()
            os.close(pidfd)

            pidfile = Path(folder) / f"frozen-{run}"
            process = kubelock(kubeconfig, f"frozen-{run}", pidfile)
            pidfd = command_pidfd(pidfile)
            time.sleep(1.5)
            process.send_signal(signal.SIGSTOP)
            died = died_at(pidfd, LEASE + 30)
            held_until = renew_time(plane, namespace, f"frozen-{run}") + LEASE
            frozen.append(died - held_until)
            process.send_signal(signal.SIGCONT)
            process.wait()
            os.close(pidfd)
    print(
        f"kubelock SIGKILLed -> command dead: median {statistics.median(killed) * 1000:.1f} ms "
        f"(max {max(killed) * 1000:.1f} ms) over {runs} runs"
    )
    print(
        f"kubelock SIGSTOPped -> command dead, relative to held_until: median "
        f"{statistics.median(frozen) * 1000:+.0f} ms (latest {max(frozen) * 1000:+.0f} ms) over "
        f"{runs} runs; lease {LEASE:g}s, safety margin {min(1.0, LEASE / 10) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    watchdog_cost(max(options.runs, 5))
    deaths(options.runs)


if __name__ == "__main__":
    main()
