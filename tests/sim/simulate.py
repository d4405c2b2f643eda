"""The deterministic simulator: many contenders, one lock, seeded faults, one invariant.

``python -m tests.sim.simulate --handoffs 50000`` (``just simulate``) runs seeds
0, 1, 2, ... until that many hand-offs have been simulated. Each seed is one
trio run under ``MockClock`` (time jumps whenever every task waits, so an
hour of leases takes a fraction of a second) with the scheduler made
deterministic, so a seed replays exactly: ``--seed N --trace`` prints it.

What runs is kubelock's own code: the HTTP client (retries, deadlines, error
mapping), the lock kinds, the election and its holding path. Each contender
is a *process*: it takes the lock, runs a *command* (a stretch of simulated
time) inside ``Elector.holding()``, and starts again. The API server is the
model of :mod:`tests.sim.apiserver`, reached through each process's own
network.

Faults, drawn from the seed: latency and latency spikes, partitions, black
holes, answers lost after the write was applied, dropped watches, the lock
object deleted, etcd compaction (so watches resume with 410), API server
restarts (every watch ends), a process SIGKILLed (its command killed at once
by the watchdog, as the real one does) or stopped by a signal while waiting,
and wall clocks stepped back. Lock kind, timings (the defaults, or 2s/1s/500ms)
and the number of contenders are drawn per seed.

The invariant, checked at every command start: no two commands run at once.
A command runs from the moment its process holds the lock until it ended by
itself, or was killed: after a lost lease, SIGTERM and a stop that takes a
drawn time, but never past the safety deadline (the CLI's SIGKILL); after
SIGKILL of its process, at once (the watchdog).

``SIM_VERBOSE=1`` adds every election event and API request to the trace.

Not modelled: a frozen process (SIGSTOP), whose command the real watchdog
kills at the safety deadline; suspend; the supervisor's signal windows.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import multiprocessing
import os
import random
import resource
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import trio
import trio.testing
from trio._core import _run as trio_run

from kubelock.election import Elector
from kubelock.errors import AlreadyDone, ApiError, KubelockError, LeaseLost, WaitTimedOut
from kubelock.events import Acquired, Event, Lost, Released
from kubelock.kube.api import ApiClient
from kubelock.kube.auth import ClusterConfig
from kubelock.locks import make_lock
from kubelock.settings import ElectionTiming

from .apiserver import ApiServerModel, Faults, ModelTransport

KINDS = ("leases", "endpoints", "configmaps")
TIMINGS = {
    "default": ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=2),
    "short": ElectionTiming(lease_duration=2, renew_deadline=1, retry_period=0.5),
}
FAULTS = (
    "partition",
    "black hole",
    "lost answers",
    "dropped watches",
    "latency spike",
    "delete",
    "compact",
    "restart",
    "kill",
    "signal while waiting",
    "clock step",
)
EPOCH = datetime(2026, 12, 1, tzinfo=UTC)
_SSL = ssl.create_default_context()


@dataclasses.dataclass
class Violation:
    seed: int
    at: float
    what: str
    trace: list[str]


@dataclasses.dataclass
class Outcome:
    """What one seed did: picklable, so seeds can run in worker processes."""

    seed: int
    kind: str
    timing_name: str
    contenders: int
    handoffs: int
    faults: collections.Counter[str]
    violations: list[Violation]
    simulated: float
    skipped_writes: int
    trace: list[str]


class World:
    """One seed's run: the model API server, the processes, the commands, the trace."""

    def __init__(
        self,
        seed: int,
        *,
        handoffs: int,
        trace_all: bool,
        without: frozenset[str] = frozenset(),
        kind: str | None = None,
        timings: str | None = None,
    ) -> None:
        self.seed = seed
        self.fault_kinds = tuple(fault for fault in FAULTS if fault not in without)
        self.rng = random.Random(seed)
        self.server = ApiServerModel()
        self.kind = self.rng.choice(KINDS)
        self.timing_name = self.rng.choice(tuple(TIMINGS))
        self.kind = kind or self.kind
        self.timing_name = timings or self.timing_name
        self.timing = TIMINGS[self.timing_name]
        self.contenders = self.rng.randint(2, 5)
        self.target = handoffs
        self.handoffs = 0
        self.running: dict[str, float] = {}  # whose command runs, since when
        self.violations: list[Violation] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.trace: collections.deque[str] = collections.deque(maxlen=None if trace_all else 80)
        self.networks: dict[str, Faults] = {}
        self.clock_offsets: dict[str, float] = {}
        self.processes: dict[str, Process] = {}
        self.finished = trio.Event()
        self.verbose = bool(os.environ.get("SIM_VERBOSE"))

    def log(self, who: str, what: str) -> None:
        self.trace.append(f"{trio.current_time():10.4f}  {who:4} {what}")

    def wall_clock(self, who: str) -> Callable[[], datetime]:
        def now() -> datetime:
            seconds = trio.current_time() + self.clock_offsets.get(who, 0.0)
            return EPOCH + timedelta(seconds=seconds)

        return now

    # -- the invariant ------------------------------------------------------------------

    def command_started(self, who: str) -> None:
        self.log(who, "command starts")
        others = [other for other in self.running if other != who]
        if others:
            self.violations.append(
                Violation(
                    self.seed,
                    trio.current_time(),
                    f"{who}'s command started while {', '.join(others)}'s ran",
                    list(self.trace),
                )
            )
        self.running[who] = trio.current_time()
        self.handoffs += 1
        if self.handoffs >= self.target:
            self.finished.set()

    def command_ended(self, who: str, how: str) -> None:
        if self.running.pop(who, None) is not None:
            self.log(who, f"command ends ({how})")


class Process:
    """One kubelock process: its API client, its elector, and what it is doing."""

    def __init__(self, world: World, name: str) -> None:
        self.world = world
        self.name = name
        self.scope = trio.CancelScope()
        self.holding = False
        self.killed = False


async def run_process(world: World, name: str, rng: random.Random) -> None:
    """One contender's life: take the lock, run the command, again, until the run ends."""
    network = world.networks[name]
    config = ClusterConfig(server="https://model.invalid", ssl_context=_SSL, namespace="sim")
    while True:
        process = Process(world, name)
        world.processes[name] = process
        network.dead = False

        def observe(event: Event, who: str = name) -> None:
            if world.verbose or isinstance(event, Acquired | Lost | Released):
                world.log(who, repr(event))

        with process.scope:
            async with ApiClient(
                config,
                transport=ModelTransport(world.server, network),
                observer=observe if world.verbose else None,
            ) as api:
                store = make_lock(world.kind, api, "lock", "sim")
                elector = Elector(
                    store,
                    name,
                    world.timing,
                    observer=observe,
                    wall_clock=world.wall_clock(name),
                    rng=random.Random(rng.random()),
                )
                try:
                    await elector.acquire()
                except (KubelockError, AlreadyDone, WaitTimedOut) as error:
                    world.log(name, f"gave up: {error}")
                    continue
                process.holding = True
                world.command_started(name)
                await hold(world, process, elector, rng)
        world.command_ended(name, "its process ended")
        await trio.sleep(rng.uniform(0, world.timing.retry_period))


async def hold(world: World, process: Process, elector: Elector, rng: random.Random) -> None:
    """Run the command inside ``holding()``; on loss it is stopped as the CLI stops it."""
    name = process.name
    try:
        async with elector.holding() as held:
            ended_by_itself = False
            try:
                # Mostly short commands (many hand-offs), some that outlive many renewals.
                if rng.random() < 0.8:
                    await trio.sleep(rng.uniform(0, 3 * world.timing.retry_period))
                else:
                    await trio.sleep(rng.uniform(0, 4 * world.timing.lease_duration))
                ended_by_itself = True
            finally:
                if ended_by_itself:
                    world.command_ended(name, "exit 0")
                elif not process.killed:
                    # SIGTERM, a drawn time to stop, SIGKILL at the safety deadline.
                    stop = rng.uniform(0, world.timing.lease_duration)
                    with trio.CancelScope(shield=True):
                        await trio.sleep_until(
                            min(trio.current_time() + stop, held.safety_deadline)
                        )
                    world.command_ended(name, "stopped after the lease was lost")
    except LeaseLost as lost:
        world.log(name, f"lease lost: {lost}")
    except ApiError as error:
        world.log(name, f"release refused: {error}")


async def inject_faults(world: World, rng: random.Random) -> None:
    """Faults at drawn moments, each healing after a drawn time."""
    lease = world.timing.lease_duration
    names = sorted(world.networks)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(rng.expovariate(1 / lease))
            if not world.fault_kinds:
                return
            fault = rng.choice(world.fault_kinds)
            who = rng.choice(names)
            network = world.networks[who]
            duration = rng.uniform(0, 2 * lease)
            world.faults[fault] += 1
            world.log(who if fault not in ("delete", "compact", "restart") else "api", fault)
            match fault:
                case (
                    "partition"
                    | "black hole"
                    | "lost answers"
                    | "dropped watches"
                    | ("latency spike")
                ):
                    nursery.start_soon(heal_later, world, network, fault, duration)
                case "delete":
                    world.server.delete(f"{world.kind}/lock")
                case "compact":
                    world.server.compact()
                case "restart":
                    world.server.restart()
                case "kill":
                    process = world.processes.get(who)
                    if process is not None:
                        process.killed = True
                        network.dead = True  # nothing it sends arrives any more
                        world.command_ended(who, "SIGKILL: the watchdog killed it")
                        process.scope.cancel()
                case "signal while waiting":
                    process = world.processes.get(who)
                    if process is not None and not process.holding:
                        process.scope.cancel()
                case "clock step":
                    world.clock_offsets[who] = world.clock_offsets.get(who, 0.0) - rng.uniform(0, 3)


async def heal_later(world: World, network: Faults, fault: str, duration: float) -> None:
    match fault:
        case "partition":
            network.partitioned = True
        case "black hole":
            network.black_hole = True
        case "lost answers":
            network.lose_answers = 0.5
        case "dropped watches":
            network.drop_watches = 0.3
        case "latency spike":
            network.latency = 0.3
    await trio.sleep(duration)
    network.partitioned = False
    network.black_hole = False
    network.lose_answers = 0.0
    network.drop_watches = 0.0
    network.latency = 0.002


async def elsewhere(world: World) -> None:
    """Other objects change too: the revision counter moves on between our writes."""
    while True:
        await trio.sleep(world.rng.uniform(0, 0.5))
        world.server.touch_elsewhere()


async def simulate(world: World) -> None:
    rng = world.rng
    names = [f"c{index}" for index in range(world.contenders)]
    for name in names:
        world.networks[name] = Faults(rng=random.Random(rng.random()))
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(run_process, world, name, random.Random(rng.random()))
        nursery.start_soon(inject_faults, world, random.Random(rng.random()))
        nursery.start_soon(elsewhere, world)
        with trio.move_on_after(world.target * 20 * world.timing.lease_duration):
            await world.finished.wait()
        nursery.cancel_scope.cancel()


@dataclasses.dataclass(frozen=True)
class Options:
    """How each seed runs (the command line, less the seeds)."""

    per_seed: int = 200
    trace_all: bool = False
    without: frozenset[str] = frozenset()
    kind: str | None = None
    timings: str | None = None


def run_seed(seed: int, options: Options) -> Outcome:
    """One seed, replayed exactly: the same seed gives the same trace."""
    deterministic_scheduling()
    random.seed(seed)  # the HTTP client's backoff draws from the module's generator
    trio_run._r.seed(seed)
    world = World(
        seed,
        handoffs=options.per_seed,
        trace_all=options.trace_all,
        without=options.without,
        kind=options.kind,
        timings=options.timings,
    )
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(simulate, world, clock=clock)
    return Outcome(
        seed,
        world.kind,
        world.timing_name,
        world.contenders,
        world.handoffs,
        world.faults,
        world.violations,
        clock.current_time(),
        world.server.skipped,
        list(world.trace) if options.trace_all else [],
    )


def deterministic_scheduling() -> None:
    """Make trio's scheduler replayable (what its Hypothesis plugin does)."""
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--handoffs", type=int, default=50_000, help="in all (default 50000)")
    parser.add_argument("--per-seed", type=int, default=200, help="hand-offs per seed")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes")
    parser.add_argument("--trace", action="store_true", help="print the seed's whole trace")
    parser.add_argument("--kind", choices=KINDS, help="every seed on this lock kind")
    parser.add_argument("--timings", choices=tuple(TIMINGS), help="every seed with these")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=FAULTS,
        metavar="FAULT",
        help=f"leave out this fault (repeat for more): {', '.join(FAULTS)}",
    )
    arguments = parser.parse_args(argv)
    options = Options(
        per_seed=arguments.per_seed,
        trace_all=arguments.trace,
        without=frozenset(arguments.without),
        kind=arguments.kind,
        timings=arguments.timings,
    )
    replay = (
        f"--per-seed {arguments.per_seed}"
        + "".join(f" --without '{fault}'" for fault in arguments.without)
        + (f" --kind {arguments.kind}" if arguments.kind else "")
        + (f" --timings {arguments.timings}" if arguments.timings else "")
    )
    started = time.monotonic()
    cpu_started = time.process_time()
    total = 0
    seeds = 0
    faults: collections.Counter[str] = collections.Counter()
    violations: list[Violation] = []
    skipped = 0
    if arguments.seed is not None:
        outcomes: Iterator[Outcome] = iter([run_seed(arguments.seed, options)])
        pool = None
    else:
        # Seeds in order; enough of them for the hand-offs asked (a seed makes per-seed).
        needed = -(-arguments.handoffs // arguments.per_seed)
        seed_list = range(arguments.first_seed, arguments.first_seed + needed)
        if arguments.jobs > 1:
            context = multiprocessing.get_context("fork")
            pool = context.Pool(arguments.jobs)
            outcomes = pool.imap(functools.partial(run_seed, options=options), seed_list)
        else:
            pool = None
            outcomes = (run_seed(seed, options) for seed in seed_list)
    for outcome in outcomes:
        seeds += 1
        total += outcome.handoffs
        faults += outcome.faults
        skipped += outcome.skipped_writes
        if arguments.trace:
            print("\n".join(outcome.trace))
        for violation in outcome.violations:
            violations.append(violation)
            print(
                f"simulate: VIOLATION seed {violation.seed} ({outcome.kind}, "
                f"{outcome.timing_name} timings, {outcome.contenders} contenders) at "
                f"{violation.at:.4f}: {violation.what}\n"
                f"  replay: python -m tests.sim.simulate --seed {violation.seed} {replay} "
                "--trace\n  the trace up to it:\n    " + "\n    ".join(violation.trace[-40:]),
                flush=True,
            )
    if pool is not None:
        pool.close()
        pool.join()
    cpu = time.process_time() - cpu_started
    if pool is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, once joined
        cpu += children.ru_utime + children.ru_stime
    elapsed = time.monotonic() - started
    print(
        f"simulate: {total} hand-offs over {seeds} seeds, {sum(faults.values())} faults "
        f"({', '.join(f'{name} {count}' for name, count in sorted(faults.items()))}), "
        f"{skipped} writes the server skipped as no-ops, {len(violations)} violations, "
        f"{elapsed:.0f} s ({cpu:.0f} s of CPU, {total / max(cpu, 1e-9):.0f} hand-offs per "
        "CPU second)"
    )
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
