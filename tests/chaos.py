"""The chaos suite: contenders loop on one lock while faults are injected; overlaps are counted.

    uv run python -m tests.chaos [--contenders 6] [--seconds 900] [--handoffs 1000] [--seed N]

K kubelock processes (real ones, ``python -m kubelock``) loop on one Lease of
the harness's real control plane, each talking to the API server through a
real fault-injecting TCP proxy (Toxiproxy, built from its Go module into the
cache as the control plane is). Each run's command is a child process that
appends its heartbeat (Unix time) to its own file every 50 ms; some run
longer than the lease, so renewals matter. A fault thread, driven by a seeded
random generator, injects one fault at a time:

* ``kill``: SIGKILL to the kubelock whose command is running;
* ``freeze``: SIGSTOP to it, SIGCONT after longer than the lease;
* ``apiserver``: kube-apiserver SIGKILLed, restarted on the same port;
* ``etcd``: etcd SIGKILLed, restarted on the same data;
* ``latency``, ``timeout``, ``reset``, ``refuse``: through the proxy, for a
  few seconds: added latency, connections that stall, connections reset,
  connections refused.

The checker then judges by the heartbeats alone: an *overlap* is two commands
alive at once (one's first beat before another's last); *hand-offs* count
consecutive commands; *recovery* is the time from a fault's end until a
command runs again (0 when one was running through it). The run ends after
``--seconds``, or once ``--handoffs`` hand-offs are in; it then stops
everything it started and exits 1 on any overlap or when fewer hand-offs than
``--handoffs`` were seen.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kubelock.testing import ControlPlane
from kubelock.testing.assets import ensure_binaries
from kubelock.testing.toxiproxy import Toxiproxy, running_toxiproxy

LEASE = 4.0
TIMING = ["--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "500ms"]
LOCK = "chaos"
NAMESPACE = "chaos"
#: The command: heartbeats to a file every 50 ms for the given seconds.
BEATING = (
    "import sys, time\n"
    "end = time.time() + float(sys.argv[2])\n"
    "with open(sys.argv[1], 'a', buffering=1) as beats:\n"
    "    while True:\n"
    "        now = time.time()\n"
    "        beats.write(f'{now:.6f}\\n')\n"
    "        if now >= end:\n"
    "            break\n"
    "        time.sleep(0.05)\n"
)
#: How runs end under chaos: done, lease lost (75), SIGKILLed by a fault (-9), or stopped
#: at the end (143; -15 before kubelock's handlers are in place).
EXPECTED_EXITS = frozenset({0, 75, -9, 143, -15})
FAULTS = ("kill", "freeze", "apiserver", "etcd", "latency", "timeout", "reset", "refuse")


@dataclasses.dataclass
class Fault:
    kind: str
    started: float
    ended: float = 0.0


class Contender:
    """One kubelock after another, for one identity, until stopped."""

    def __init__(
        self, index: int, kubeconfig: Path, beats: Path, rng: random.Random, log: Path
    ) -> None:
        self.identity = f"c{index}"
        self.kubeconfig = kubeconfig
        self.beats = beats
        self.rng = rng
        self.log = log
        self.runs = 0
        self.exit_codes: collections.Counter[int] = collections.Counter()
        self.unexpected: list[str] = []  # the last line of each run that ended otherwise
        self.process: subprocess.Popen[bytes] | None = None
        self.current_beats: Path | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=self.identity, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        with open(self.log, "ab") as log:
            while not self._stopping.is_set():
                self.runs += 1
                # Mostly short commands; one in ten outlives the lease, so renewals matter.
                if self.rng.random() < 0.1:
                    seconds = self.rng.uniform(LEASE + 0.5, LEASE + 2.5)
                else:
                    seconds = self.rng.uniform(0.05, 0.5)
                beats = self.beats / f"{self.identity}-{self.runs:05d}"
                argv = [
                    sys.executable,
                    "-m",
                    "kubelock",
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--name",
                    LOCK,
                    "--id",
                    self.identity,
                    *TIMING,
                    "--",
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    BEATING,
                    str(beats),
                    f"{seconds:.3f}",
                ]
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.current_beats = beats
                    log.flush()
                    said_from = log.tell()
                    self.process = subprocess.Popen(argv, stdout=log, stderr=log)
                code = self.process.wait()
                self.exit_codes[code] += 1
                if code not in EXPECTED_EXITS:
                    with open(self.log, "rb") as said:
                        said.seek(said_from)
                        lines = said.read().decode(errors="replace").splitlines()
                    self.unexpected.append(f"exit {code}: {lines[-1] if lines else '(silent)'}")

    def holding(self) -> bool:
        """True while this contender's command beats (its last beat is under 0.2 s old)."""
        beats = self.current_beats
        try:
            return beats is not None and time.time() - beats.stat().st_mtime < 0.2
        except FileNotFoundError:
            return False

    def signal(self, signum: int) -> bool:
        with self._lock:
            process = self.process
            if process is None or process.poll() is not None:
                return False
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
            return True

    def stop(self) -> None:
        """End the loop: SIGTERM to kubelock (it stops its command), SIGKILL if it lingers."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout=60)


class Chaos:
    """The fault thread: one fault at a time, chosen and timed by the seeded generator."""

    def __init__(
        self,
        plane: ControlPlane,
        proxy: Toxiproxy,
        contenders: list[Contender],
        rng: random.Random,
        kinds: tuple[str, ...],
    ) -> None:
        self.plane = plane
        self.proxy = proxy
        self.contenders = contenders
        self.rng = rng
        self.kinds = kinds
        self.faults: list[Fault] = []
        self.errors = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopping.wait(self.rng.uniform(2.0, 6.0)):
            kind = self.rng.choice(self.kinds)
            fault = Fault(kind, time.time())
            try:
                injected = getattr(self, f"_{kind}")()
            except Exception as error:  # e.g. a restart slower than the harness waits
                print(f"chaos: {kind} failed: {error}", file=sys.stderr, flush=True)
                self.errors += 1
                self._restore()
                continue
            if injected:
                fault.ended = time.time()
                self.faults.append(fault)
                print(
                    f"chaos: {kind} for {fault.ended - fault.started:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )

    def _restore(self) -> None:
        """Bring the control plane and the proxy back, whatever a failed fault left."""
        with contextlib.suppress(Exception):
            self.proxy.set_enabled("apiserver", True)
        with contextlib.suppress(Exception):
            self.proxy.remove_toxic("apiserver", "chaos")
        if "etcd" not in self.plane.pids:
            self.plane.start_etcd()
        if "kube-apiserver" not in self.plane.pids:
            self.plane.start_apiserver()

    def _holder(self) -> Contender | None:
        holding = [contender for contender in self.contenders if contender.holding()]
        return holding[0] if holding else None

    def _kill(self) -> bool:
        holder = self._holder()
        return holder is not None and holder.signal(signal.SIGKILL)

    def _freeze(self) -> bool:
        holder = self._holder()
        if holder is None or not holder.signal(signal.SIGSTOP):
            return False
        time.sleep(LEASE + self.rng.uniform(1.0, 2.0))
        holder.signal(signal.SIGCONT)
        return True

    def _apiserver(self) -> bool:
        pid = self.plane.pids["kube-apiserver"]
        os.kill(pid, signal.SIGKILL)
        self.plane.stop_apiserver()  # reaps it
        time.sleep(self.rng.uniform(0.0, 2.0))
        self.plane.start_apiserver()  # same port and certificates; waits for /readyz
        return True

    def _etcd(self) -> bool:
        pid = self.plane.pids["etcd"]
        os.kill(pid, signal.SIGKILL)
        self.plane.stop_etcd()
        time.sleep(self.rng.uniform(0.0, 2.0))
        self.plane.start_etcd()  # same data; waits until etcd and the API server are ready
        return True

    def _toxic(self, kind: str, attributes: dict[str, int], stream: str = "downstream") -> bool:
        self.proxy.add_toxic("apiserver", "chaos", kind, attributes, stream)
        time.sleep(self.rng.uniform(1.0, 5.0))
        self.proxy.remove_toxic("apiserver", "chaos")
        return True

    def _latency(self) -> bool:
        latency = self.rng.choice([200, 500, 1000, 2500])
        return self._toxic("latency", {"latency": latency, "jitter": latency // 4})

    def _timeout(self) -> bool:
        return self._toxic("timeout", {"timeout": 0}, stream="upstream")  # stalls, never answers

    def _reset(self) -> bool:
        return self._toxic("reset_peer", {"timeout": 0})

    def _refuse(self) -> bool:
        self.proxy.set_enabled("apiserver", False)
        time.sleep(self.rng.uniform(1.0, 5.0))
        self.proxy.set_enabled("apiserver", True)
        return True


@dataclasses.dataclass
class Verdict:
    commands: int
    handoffs: int
    overlaps: list[tuple[str, str, float]]
    recoveries: list[tuple[float, Fault]]


def judge(beats: Path, faults: list[Fault]) -> Verdict:
    """Overlaps, hand-offs and recoveries, from the heartbeat files alone."""
    intervals = []
    for path in beats.iterdir():
        times = [float(line) for line in path.read_text().split()]
        if times:
            intervals.append((times[0], times[-1], path.name))
    intervals.sort()
    overlaps = []
    latest_end, latest_name = float("-inf"), ""
    for start, end, name in intervals:
        if start <= latest_end:
            overlaps.append((latest_name, name, latest_end - start))
        if end > latest_end:
            latest_end, latest_name = end, name
    recoveries = []
    for fault in faults:
        if any(start <= fault.ended <= end for start, end, _ in intervals):
            recoveries.append((0.0, fault))
            continue
        later = [start for start, _, _ in intervals if start > fault.ended]
        if later:
            recoveries.append((min(later) - fault.ended, fault))
    return Verdict(len(intervals), max(0, len(intervals) - 1), overlaps, recoveries)


def handoffs_so_far(beats: Path) -> int:
    return max(0, len(os.listdir(beats)) - 1)


@contextlib.contextmanager
def proxied_plane(folder: Path) -> Iterator[tuple[ControlPlane, Toxiproxy, Path]]:
    """The control plane, a Toxiproxy in front of its API server, and a kubeconfig through it."""
    ensure_binaries()
    with ControlPlane(workdir=folder / "plane") as plane, running_toxiproxy() as proxy:
        plane.create_namespace(NAMESPACE)
        port = proxy.proxy("apiserver", f"127.0.0.1:{plane.port}")
        kubeconfig = plane.write_kubeconfig(folder / "kubeconfig", namespace=NAMESPACE)
        config = json.loads(kubeconfig.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
        kubeconfig.write_text(json.dumps(config))
        yield plane, proxy, kubeconfig


def run(options: argparse.Namespace, say: Callable[[str], None]) -> int:
    rng = random.Random(options.seed)
    kinds = tuple(options.faults.split(",")) if options.faults else FAULTS
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubelock-chaos-") as name:
        folder = Path(name)
        beats = folder / "beats"
        beats.mkdir()
        with proxied_plane(folder) as (plane, proxy, kubeconfig):
            contenders = [
                Contender(i, kubeconfig, beats, random.Random(rng.random()), folder / f"c{i}.log")
                for i in range(options.contenders)
            ]
            chaos = Chaos(plane, proxy, contenders, random.Random(rng.random()), kinds)
            for contender in contenders:
                contender.start()
            chaos.start()
            try:
                while time.monotonic() - started < options.seconds:
                    if handoffs_so_far(beats) >= options.handoffs:
                        break
                    time.sleep(1.0)
            finally:
                chaos.stop()
                for contender in contenders:
                    contender.stop()
            leftover = [
                path.name for path in beats.iterdir() if time.time() - path.stat().st_mtime < 0.5
            ]
            time.sleep(1.0)
            still_beating = [
                path.name for path in beats.iterdir() if time.time() - path.stat().st_mtime < 0.5
            ]
            verdict = judge(beats, chaos.faults)
            exit_codes: collections.Counter[int] = collections.Counter()
            unexpected: collections.Counter[str] = collections.Counter()
            for contender in contenders:
                exit_codes.update(contender.exit_codes)
                unexpected.update(contender.unexpected)
        elapsed = time.monotonic() - started
    by_kind = collections.Counter(fault.kind for fault in chaos.faults)
    say(f"seed {options.seed}, {options.contenders} contenders, {elapsed:.0f} s")
    say(f"commands run: {verdict.commands}; hand-offs: {verdict.handoffs}")
    say(f"overlaps (by heartbeats): {len(verdict.overlaps)}")
    for first, second, seconds in verdict.overlaps[:10]:
        say(f"  OVERLAP {first} and {second} by {seconds * 1000:.0f} ms")
    say(
        "faults: "
        + ", ".join(f"{kind} {by_kind[kind]}" for kind in kinds)
        + f" ({sum(by_kind.values())} in all)"
    )
    if verdict.recoveries:
        slowest, fault = max(verdict.recoveries, key=lambda pair: pair[0])
        say(
            f"recovery (fault's end to a command running): median "
            f"{statistics.median(r for r, _ in verdict.recoveries):.2f} s, slowest {slowest:.2f} s "
            f"(after {fault.kind})"
        )
    say(f"kubelock exit codes: {dict(sorted(exit_codes.items()))}")
    for line, count in unexpected.most_common(10):
        say(f"  {count} x {line[:300]}")
    if chaos.errors:
        say(f"faults that failed to run (restored and skipped): {chaos.errors}")
    if still_beating:
        say(f"commands still beating after the stop: {still_beating} (were: {leftover})")
    leftovers = plane.leftover_pids()
    if leftovers:
        say(f"control-plane processes left behind: {leftovers}")
    failed = bool(verdict.overlaps or still_beating or leftovers)
    if verdict.handoffs < options.handoffs:
        say(f"FAILED: {verdict.handoffs} hand-offs, fewer than the {options.handoffs} asked for")
        failed = True
    if verdict.overlaps:
        say("FAILED: two commands ran at once")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1800, help="the run's bound")
    parser.add_argument("--handoffs", type=int, default=1000, help="stop once this many are in")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--faults", default="", help=f"comma-separated subset of {FAULTS}")
    options = parser.parse_args()

    def say(line: str) -> None:
        print(f"chaos: {line}", flush=True)

    sys.exit(run(options, say))


if __name__ == "__main__":
    main()
