"""Hand-off latency and a waiting contender's request rate, on a real control plane.

    uv run python -m benchmarks.handoff [--handoffs 50] [--wait-seconds 60]

Hand-off: two contenders take turns; the latency is from the holder's release
(its update answered) to the waiter's acquisition (its update answered), both
on one trio clock. Request rate: one contender holds (renewing every 2 s),
another waits; the API server's own `apiserver_request_total` counts the
waiter's GET and WATCH requests on leases (the holder only sends PATCHes, its
compare-and-swap renewals; the waiter's one PATCH, joining the queue, comes
before the count starts).
"""

from __future__ import annotations

import argparse
import re
import statistics

import trio

import kubelock
from kubelock import events
from kubelock.testing import ControlPlane

from ._plane import control_plane, percentile


async def handoffs(kubeconfig: str, count: int) -> list[float]:
    released: list[float] = []
    acquired: list[float] = []
    turn = trio.Lock()

    def watcher(event: events.Event) -> None:
        if isinstance(event, events.Released):
            released.append(trio.current_time())
        elif isinstance(event, events.Acquired):
            acquired.append(trio.current_time())

    async def contender(name: str, rounds: int) -> None:
        for _ in range(rounds):
            async with kubelock.Lock(
                "handoff", identity=name, kubeconfig=kubeconfig, observer=watcher
            ):
                await trio.sleep(0.05)
            async with turn:  # let the other one in before contending again
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(contender, "a", (count + 2) // 2)
        nursery.start_soon(contender, "b", (count + 2) // 2)
    # Pair each release with the next acquisition after it.
    latencies = []
    for at in released:
        later = [moment for moment in acquired if moment >= at]
        if later:
            latencies.append(min(later) - at)
    return latencies[:count]


def lease_requests(plane: ControlPlane) -> dict[str, float]:
    """Lease requests the API server has served so far, by verb."""
    counts: dict[str, float] = {}
    for (verb, _), value in lease_requests_by_code(plane).items():
        counts[verb] = counts.get(verb, 0.0) + value
    return counts


def lease_requests_by_code(plane: ControlPlane) -> dict[tuple[str, str], float]:
    """Lease requests the API server has served so far, by (verb, HTTP code)."""
    with plane.admin_client() as client:
        text = client.get("/metrics").text
    counts: dict[tuple[str, str], float] = {}
    pattern = re.compile(r"^apiserver_request_total\{([^}]*)\} (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("resource") == "leases" and labels.get("group") == "coordination.k8s.io":
            key = (labels.get("verb", ""), labels.get("code", ""))
            counts[key] = counts.get(key, 0.0) + float(match.group(2))
    return counts


async def waiting_rate(plane: ControlPlane, kubeconfig: str, seconds: float) -> dict[str, float]:
    async def wait() -> None:
        async with kubelock.Lock("rate", identity="waiter", kubeconfig=kubeconfig):
            pass

    async with (
        kubelock.Lock("rate", identity="holder", kubeconfig=kubeconfig),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(wait)
        await trio.sleep(5)  # past the waiter's start-up requests
        before = await trio.to_thread.run_sync(lease_requests, plane)
        await trio.sleep(seconds)
        after = await trio.to_thread.run_sync(lease_requests, plane)
        nursery.cancel_scope.cancel()
    minutes = seconds / 60
    return {verb: (after.get(verb, 0) - before.get(verb, 0)) / minutes for verb in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handoffs", type=int, default=50)
    parser.add_argument("--wait-seconds", type=float, default=60)
    args = parser.parse_args()
    with control_plane("bench") as (plane, kubeconfig):
        latencies = trio.run(handoffs, str(kubeconfig), args.handoffs)
        ms = [latency * 1000 for latency in latencies]
        print(
            f"hand-off latency over {len(ms)} hand-offs: median {statistics.median(ms):.1f} ms, "
            f"p99 {percentile(ms, 0.99):.1f} ms, min {min(ms):.1f} ms, max {max(ms):.1f} ms"
        )
        rate = trio.run(waiting_rate, plane, str(kubeconfig), args.wait_seconds)
        shown = ", ".join(f"{verb} {value:.1f}" for verb, value in sorted(rate.items()) if value)
        print(f"lease requests per minute while one contender waits and one holds: {shown}")
        print(
            "  (PATCH: the holder's renewals; PUT: the API server's own leases; GET/WATCH/LIST:"
            " the waiter's own requests; a WATCH counts when it ends, after about 5 minutes)"
        )


if __name__ == "__main__":
    main()
