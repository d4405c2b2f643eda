"""The thundering herd: requests, hand-off latency and overtakes with many contenders.

    uv run python -m benchmarks.herd [--contenders 10 30 100] [--runs 3] [--hold 0.1]
                                     [--modes queue outside]

N contenders (one `kubelock.Lock` each, with its own connections and watch,
as N Pods would have) arrive one every `--stagger` seconds, take the lock in
turn, hold it for `--hold` seconds (shorter than a retry period: no renewals)
and leave. Each run is made twice, alternately: with the waiters in the queue
(kubelock's default), and outside it (as with `--timeout`, or a Role without
`patch`: the hand-off window). For each run it prints:

* lease writes (PUT, POST and PATCH, 409s included) and reads (GET, LIST) per
  turn, from the API server's own `apiserver_request_total`, less the rate the
  API server's own leases cost when idle; a turn is one contender's acquisition
  and release. The writes are split into those of the record that landed
  (one acquisition and one release per turn: 2), those refused (409, or 422
  from a compare-and-swap whose test failed: somebody else wrote the record
  first) and, the rest, the waiters' entries in the queue (one per waiter,
  made while it waits);
* hand-off latency: from a release landing to the next acquisition landing
  (one trio clock, all contenders in this process);
* overtakes: acquisitions won while a contender that arrived earlier was
  still waiting (0 is first come, first served).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import trio

import kubelock
from kubelock import events
from kubelock.testing import ControlPlane

from ._plane import control_plane, percentile
from .handoff import lease_requests_by_code

WRITES = ("PUT", "POST", "PATCH")
#: A write that did not land: a conflict, or a compare-and-swap whose test failed.
REFUSED = ("409", "422")
READS = ("GET", "LIST")


class Run:
    """What one run of N contenders observed."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.acquired: list[tuple[float, str]] = []
        self.released: list[float] = []

    def watcher(self, name: str) -> events.Observer:
        def observe(event: events.Event) -> None:
            if isinstance(event, events.Acquired):
                self.acquired.append((trio.current_time(), name))
            elif isinstance(event, events.Released):
                self.released.append(trio.current_time())

        return observe

    def latencies(self) -> list[float]:
        """From each release to the first acquisition after it."""
        times = sorted(moment for moment, _ in self.acquired)
        result = []
        for at in self.released:
            later = [moment for moment in times if moment >= at]
            if later:
                result.append(later[0] - at)
        return result

    def overtakes(self) -> int:
        """Acquisitions made while an earlier arrival was still waiting."""
        done: set[str] = set()
        count = 0
        for _, name in sorted(self.acquired):
            if any(
                other not in done and arrived < self.arrived[name]
                for other, arrived in self.arrived.items()
                if other != name
            ):
                count += 1
            done.add(name)
        return count


async def contend(
    kubeconfig: str, lock_name: str, contenders: int, stagger: float, hold: float, mode: str
) -> Run:
    run = Run()
    # "outside": with a time limit a waiter stays out of the queue and spreads its
    # write over the hand-off window instead (what kubelock did before the queue).
    timeout = 3600.0 if mode == "outside" else None

    async def contender(name: str) -> None:
        run.arrived[name] = trio.current_time()
        async with kubelock.Lock(
            lock_name,
            identity=name,
            kubeconfig=kubeconfig,
            observer=run.watcher(name),
            timeout=timeout,
        ):
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        for index in range(contenders):
            nursery.start_soon(contender, f"c{index:03d}")
            await trio.sleep(stagger)
    return run


def totals(counts: dict[tuple[str, str], float], verbs: tuple[str, ...]) -> float:
    return sum(value for (verb, _), value in counts.items() if verb in verbs)


def idle_rate(plane: ControlPlane, seconds: float) -> dict[tuple[str, str], float]:
    """Lease requests per second while no contender runs (the API server's own leases)."""
    before = lease_requests_by_code(plane)
    time.sleep(seconds)
    after = lease_requests_by_code(plane)
    return {key: (after[key] - before.get(key, 0.0)) / seconds for key in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stagger", type=float, default=0.01, help="seconds between arrivals")
    parser.add_argument("--hold", type=float, default=0.1, help="seconds each holds the lock")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["queue", "outside"],
        choices=["queue", "outside"],
        help="queue: waiters join the queue; outside: they wait outside it (the hand-off "
        "window), as with --timeout or a Role without patch. Alternated in one run.",
    )
    args = parser.parse_args()
    with control_plane("bench") as (plane, kubeconfig):
        background = idle_rate(plane, 10)
        for contenders, attempt, mode in itertools.product(
            args.contenders, range(args.runs), args.modes
        ):
            before = lease_requests_by_code(plane)
            wall = time.monotonic()
            run = trio.run(
                contend,
                str(kubeconfig),
                f"herd-{mode}-{contenders}-{attempt}",
                contenders,
                args.stagger,
                args.hold,
                mode,
            )
            elapsed = time.monotonic() - wall
            after = lease_requests_by_code(plane)
            delta = {
                key: after[key] - before.get(key, 0.0) - background.get(key, 0.0) * elapsed
                for key in after
            }
            writes = totals(delta, WRITES)
            refused = sum(
                v for (verb, code), v in delta.items() if verb in WRITES and code in REFUSED
            )
            # Each turn lands exactly one acquisition and one release; the
            # rest of what landed is the waiters' entries in the queue.
            joins = writes - refused - 2 * contenders
            reads = totals(delta, READS)
            ms = [latency * 1000 for latency in run.latencies()]
            print(
                f"{contenders:>4} contenders, {mode:>7}, run {attempt + 1}: "
                f"{writes / contenders:.2f} writes/turn: 2 of the record + "
                f"{refused / contenders:.2f} refused + {joins / contenders:.2f} joining "
                f"the queue ({refused:.0f} refused in {writes:.0f}), "
                f"{reads / contenders:.2f} reads/turn; hand-off median "
                f"{statistics.median(ms):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms; "
                f"overtakes {run.overtakes()}/{len(run.acquired)}; {elapsed:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
