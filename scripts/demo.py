"""The demo: a local control plane and three kubelocks racing for one lock.

    uv run python scripts/demo.py        (or: just demo)

Like the original README's three terminals: each runs `sleep 3` under the lock
`example-app`. kubelock's own JSON log lines give the timeline; the demo exits
non-zero if two holds ever overlapped.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO

from kubelock.testing import ControlPlane
from kubelock.testing.assets import ensure_binaries

CONTENDERS = ("one", "two", "three")
BAR_WIDTH = 48


def collect(name: str, stream: IO[str], events: list[tuple[float, str, str, str]]) -> None:
    for line in stream:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        moment = datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
        events.append((moment, name, record.get("event") or "", record["msg"]))


def main() -> int:
    print("demo: finding or building kube-apiserver and etcd (the first build takes minutes)")
    ensure_binaries(progress=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kubelock-demo-") as folder:
        started = time.monotonic()
        with ControlPlane(workdir=Path(folder) / "plane") as plane:
            print(f"demo: control plane up at {plane.server} in {time.monotonic() - started:.1f}s")
            plane.create_namespace("demo")
            kubeconfig = plane.write_kubeconfig(Path(folder) / "kubeconfig", namespace="demo")
            events: list[tuple[float, str, str, str]] = []
            processes = []
            readers = []
            t0 = time.time()
            for name in CONTENDERS:
                argv = [
                    sys.executable, "-m", "kubelock",
                    "--kubeconfig", str(kubeconfig), "--id", name,
                    "--name", "example-app", "--namespace", "demo",
                    "--log-format", "json",
                    "sleep", "3",
                ]  # fmt: skip
                print(f"demo: $ kubelock --id {name} --name example-app --namespace demo sleep 3")
                process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
                reader = threading.Thread(target=collect, args=(name, process.stderr, events))
                reader.start()
                processes.append(process)
                readers.append(reader)
            codes = [process.wait(timeout=120) for process in processes]
            for reader in readers:
                reader.join()
            lease = plane.kubectl("get", "lease", "example-app", "-n", "demo", "-o", "wide")
    return report(sorted(events), t0, codes, lease.stdout)


def report(
    events: list[tuple[float, str, str, str]], t0: float, codes: list[int], lease: str
) -> int:
    print("\ntimeline (seconds since the three started):")
    for moment, name, _, message in events:
        print(f"  {moment - t0:6.2f}  {name:<5}  {message}")
    holds: dict[str, list[float]] = {}
    for moment, name, event, _ in events:
        if event == "acquired":
            holds[name] = [moment - t0]
        elif event == "released" and name in holds:
            holds[name].append(moment - t0)
    end = max((hold[-1] for hold in holds.values()), default=1.0)
    print("\nwho held the lock:")
    for name in CONTENDERS:
        hold = holds.get(name, [])
        if len(hold) != 2:
            print(f"  {name:<5}  (no complete hold)")
            continue
        begin = round(hold[0] / end * BAR_WIDTH)
        length = max(1, round((hold[1] - hold[0]) / end * BAR_WIDTH))
        bar = "." * begin + "#" * length
        print(f"  {name:<5}  {bar:<{BAR_WIDTH}}  {hold[0]:5.2f}s - {hold[1]:5.2f}s")
    ordered = sorted(hold for hold in holds.values() if len(hold) == 2)
    overlapping = any(a[1] > b[0] for a, b in itertools.pairwise(ordered))
    print(f"\n{lease.rstrip()}")
    print(f"\nexit codes: {codes}")
    if overlapping or len(ordered) != len(CONTENDERS) or any(codes):
        print("demo: FAILED: holds overlapped, or a contender did not finish")
        return 1
    print("demo: three holds, one at a time; each started as soon as the previous one released")
    return 0


if __name__ == "__main__":
    sys.exit(main())
